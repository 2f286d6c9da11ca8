"""Profiles resolve, validate, and their parameter counts equal what transformers builds."""

import pytest

from zeroplan.core.errors import InvalidProfile, UnknownGPU, UnknownModel, ZeroplanError
from zeroplan.core.params import count_parameters, model_tensors
from zeroplan.core.profiles import gpu_names, load_gpu, load_model, model_names

# Totals the InternVL family publishes (shared/internvl-facts.md), in billions, to 0.1 B.
PUBLISHED_BILLIONS = {"1b": 0.9, "2b": 2.2, "8b": 8.1, "26b": 25.5, "40b": 40.1, "76b": 76.3, "78b": 78.4}


@pytest.mark.parametrize("name", model_names())
def test_parameter_counts_equal_transformers_meta_model(name):
    pytest.importorskip("transformers")
    from zeroplan.adapters.hf_model import meta_parameter_counts

    profile = load_model(name)
    counts = count_parameters(profile)
    meta = meta_parameter_counts(profile)
    assert (counts.total, counts.vision, counts.projector, counts.llm) == (
        meta["total"], meta["vision"], meta["projector"], meta["llm"])
    assert counts.largest_layer == meta["largest_layer"]
    assert [(t.name, t.numel) for t in model_tensors(profile)] == meta["tensors"]


@pytest.mark.parametrize("short,billions", sorted(PUBLISHED_BILLIONS.items()))
def test_totals_match_published_sizes(short, billions):
    assert round(count_parameters(load_model(short)).total / 1e9, 1) == pytest.approx(billions, abs=0.051)


def test_short_full_and_path_names_resolve(tmp_path):
    assert load_model("40b").name == "InternVL2-40B"
    assert load_model("InternVL2-40B").name == "InternVL2-40B"
    assert load_model("internvl2_5-8b").name == "InternVL2_5-8B"
    path = tmp_path / "mine.toml"
    path.write_text(open(load_model("tiny").path).read().replace('"tiny-internvl"', '"mine"')
                    .replace('vision = "tiny-vit"', 'vision = "tiny-vit"'))
    assert load_model(str(path)).name == "mine"


@pytest.mark.parametrize("bad", ["", "41b", "x" * 500, "nope.toml"])
def test_unknown_model_is_one_typed_error(bad):
    with pytest.raises(UnknownModel):
        load_model(bad)


def test_a_file_that_is_not_a_profile_is_rejected():
    with pytest.raises(ZeroplanError):
        load_model("/etc/passwd")


def test_unknown_model_message_lists_short_names():
    with pytest.raises(UnknownModel, match="40b"):
        load_model("41b")


@pytest.mark.parametrize("text", ["not toml [", "name = 1", '[llm]\nname="x"', "\x00\x01"])
def test_malformed_profile_files_are_rejected(tmp_path, text):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(InvalidProfile):
        load_model(str(path))


def test_gpu_profiles_load_and_resolve():
    for name in gpu_names():
        gpu = load_gpu(name)
        assert gpu.memory_bytes > 16 << 30 and gpu.bf16_dense_tflops > 50
    assert load_gpu("NVIDIA H100 80GB HBM3").name == "H100-SXM5-80GB"
    with pytest.raises(UnknownGPU):
        load_gpu("v100")
