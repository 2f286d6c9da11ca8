"""The runner's speed options on the CPU: varlen attention over packed rows gives what sdpa's
packed mask gives, the padded vocabulary keeps the real one for FLOPs, and a run with gradient
accumulation, packing, varlen and a padded vocabulary trains under real DeepSpeed (gloo, 2 ranks).
Liger-Kernel and the CUDA varlen kernel need a GPU: those tests are marked `gpu`."""

from __future__ import annotations

import pytest

from zeroplan.core.errors import InvalidInput
from zeroplan.core.profiles import load_model, pad_vocab
from zeroplan.runner.launch import run_spec
from zeroplan.core.run import RunSpec

CPU_ENV = {"OMP_NUM_THREADS": "1"}


def _packed_inputs(torch):
    first, second, third = (torch.randint(3, 900, (1, n)) for n in (12, 10, 6))
    ids = torch.cat([torch.cat([first, second], 1), torch.cat([third, torch.zeros(1, 16, dtype=torch.long)], 1)])
    positions = torch.stack([torch.cat([torch.arange(12), torch.arange(10)]),
                             torch.cat([torch.arange(6), torch.arange(16)])])
    return ids, positions, (first, second, third)


def test_varlen_kwargs_mark_every_sample_and_padding_tail():
    torch = pytest.importorskip("torch")
    from zeroplan.runner.fast import varlen_kwargs

    _, positions, _ = _packed_inputs(torch)
    bounds = varlen_kwargs(positions)
    assert bounds["cu_seq_lens_q"].tolist() == [0, 12, 22, 28, 44]
    assert bounds["max_length_q"] == 16 and bounds["cu_seq_lens_q"].dtype == torch.int32


def test_varlen_attention_matches_each_sample_alone():
    torch = pytest.importorskip("torch")
    from zeroplan.adapters.hf_model import internvl_config
    from zeroplan.runner import fast

    import transformers

    profile = load_model("tiny")
    config = internvl_config(profile)
    fast.attn_config(config, "varlen")
    assert config.text_config._attn_implementation == fast.VARLEN
    assert config.vision_config._attn_implementation == "sdpa"
    torch.manual_seed(0)
    model = transformers.InternVLForConditionalGeneration(config).float().eval()
    ids, positions, samples = _packed_inputs(torch)
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=positions, use_cache=False,
                       **fast.varlen_kwargs(positions)).logits
        alone = [model(input_ids=s, use_cache=False).logits for s in samples]
    assert torch.allclose(packed[0, :12], alone[0][0], atol=1e-4)
    assert torch.allclose(packed[0, 12:22], alone[1][0], atol=1e-4)
    assert torch.allclose(packed[1, :6], alone[2][0], atol=1e-4)
    # and it is not what attention across the boundary would give
    with torch.no_grad():
        leaky = model(input_ids=ids[:1], use_cache=False,
                      **fast.varlen_kwargs(torch.arange(22).unsqueeze(0))).logits
    assert not torch.allclose(leaky[0, 12:22], alone[1][0], atol=1e-4)


def test_padded_vocabulary_rounds_up_and_flops_keep_the_real_one():
    from zeroplan.runner.model import flops_profile

    profile = load_model("2b")
    assert profile.llm.vocab_size == 92553
    padded = pad_vocab(profile, 128)
    assert padded.llm.vocab_size == 92672 and padded.llm.vocab_size % 128 == 0
    assert pad_vocab(profile, 1) is profile and pad_vocab(padded, 128) is padded
    spec = RunSpec(model="2b", vocab_multiple=128)
    assert flops_profile(spec, padded).llm.vocab_size == 92553


@pytest.mark.parametrize("bad", [dict(attn_implementation="varlen"), dict(kernels="fused"),
                                 dict(gradient_accumulation=0), dict(vocab_multiple=0)])
def test_spec_rejects_bad_speed_options(bad):
    with pytest.raises(InvalidInput):
        RunSpec(**bad)


def test_new_fields_at_their_defaults_keep_old_point_ids():
    old = RunSpec(model="tiny", stage=1)
    assert old.point_id() == RunSpec(model="tiny", stage=1, kernels="eager", compile=False,
                                     gradient_accumulation=1, vocab_multiple=1).point_id()
    assert old.point_id() != RunSpec(model="tiny", stage=1, gradient_accumulation=2).point_id()


@pytest.mark.slow
def test_compiled_layers_compute_what_the_eager_ones_do():
    torch = pytest.importorskip("torch")
    from zeroplan.adapters.hf_model import build_model, image_token_id
    from zeroplan.runner import fast
    from zeroplan.runner.data import batches

    profile = load_model("tiny")
    spec = RunSpec(model="tiny", seq_len=64, tiles=2, grad_ckpt=False, compile=True)
    model = build_model(profile, "cpu", torch.float32, "sdpa").train()
    inputs = {**next(batches(profile, image_token_id(profile), spec, 0, 1)).inputs, "use_cache": False}
    eager = model(**inputs).loss
    eager.backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    assert fast.compile_layers(model) == profile.llm.num_layers + profile.vision.num_layers
    compiled = model(**inputs).loss
    compiled.backward()
    assert torch.allclose(compiled, eager, rtol=1e-5)
    for name, grad in eager_grads.items():
        assert torch.allclose(dict(model.named_parameters())[name].grad, grad, rtol=1e-3, atol=1e-6), name


@pytest.mark.slow
def test_packed_varlen_accumulating_compiled_run_trains_under_deepspeed(tmp_path):
    """Also with only the first decoder layer checkpointed and the optimizer in several groups."""
    spec = RunSpec(model="tiny", stage=1, micro_batch=2, seq_len=64, tiles=2, steps=4, warmup_steps=1,
                   world_size=2, lr=5e-3, packed=True, attn_implementation="varlen",
                   gradient_accumulation=2, vocab_multiple=64, compile=True, ckpt_layers=1,
                   optimizer_group_elems=30_000)
    # Dynamo and AOTAutograd as on the GPU, without inductor's C++ build for every layer (minutes on
    # two cores); test_compiled_layers_compute_what_the_eager_ones_do runs inductor itself.
    result = run_spec(spec, tmp_path, timeout_s=240, env={**CPU_ENV, "ZEROPLAN_COMPILE_BACKEND": "aot_eager"})
    assert result["status"] == "ok", result.get("reason")
    assert result["ds_config"]["gradient_accumulation_steps"] == 2
    assert result["ds_config"]["train_batch_size"] == 2 * 2 * 2
    assert len(result["losses"]) == 4 and result["losses"][-1] < result["losses"][0]
    # each measured step holds both micro-batches: 2 micro-batches × 2 rows × 64 tokens per rank
    measured = result["step_times_s"][spec.warmup_steps:]
    tokens_per_step = result["tokens_per_s"] * sum(measured) / len(measured)
    assert tokens_per_step == pytest.approx(2 * 2 * 2 * 64)  # ranks × micro-batches × rows × tokens
    profile = load_model("tiny")
    assert result["speed_options"] == {"compiled_layers": profile.llm.num_layers + profile.vision.num_layers}


@pytest.mark.gpu
def test_liger_kernels_train_the_native_model():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("Liger-Kernel needs CUDA")
    pytest.importorskip("liger_kernel")
    from zeroplan.adapters.hf_model import build_model, image_token_id
    from zeroplan.runner import fast
    from zeroplan.runner.data import batches

    profile = pad_vocab(load_model("tiny"), 64)
    spec = RunSpec(model="tiny", seq_len=64, tiles=2, grad_ckpt=False, kernels="liger")
    model = build_model(profile, "cuda", torch.bfloat16, "sdpa").train()
    batch = next(batches(profile, image_token_id(profile), spec, 0, 1))
    inputs = {k: v.cuda() for k, v in batch.inputs.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    reference = model(**inputs, use_cache=False).loss
    fast.apply_liger(model, zero3=False)
    fused = model(**inputs, use_cache=False).loss
    fused.backward()
    assert torch.allclose(fused.float(), reference.float(), rtol=2e-2)
    assert model.lm_head.weight.grad is not None


def test_packed_rows_share_the_row_tiles_among_their_samples():
    pytest.importorskip("torch")
    from zeroplan.adapters.hf_model import image_token_id
    from zeroplan.runner.data import batches

    profile = load_model("tiny")
    spec = RunSpec(model="tiny", micro_batch=3, seq_len=128, tiles=5, fixed_tiles=True, packed=True)
    stream = batches(profile, image_token_id(profile), spec, 0, 1)
    for _ in range(4):
        batch = next(stream)
        assert batch.tiles == 3 * 5  # exactly `tiles` per packed row, however many samples it holds
        assert batch.samples > 3


def test_bench_flags_reach_the_points_and_bad_ones_exit_2(capsys, tmp_path):
    from zeroplan.cli.main import main

    results = tmp_path / "r.jsonl"
    argv = ["bench", "--model", "2b", "--stages", "1", "--seq-len", "8192", "--tiles", "8", "--grad-ckpt", "off",
            "--packed", "--attn", "varlen", "--compile", "--grad-accum", "16", "--vocab-multiple", "128",
            "--kernels", "liger-loss", "--results", str(results), "--dry-run"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "packed-varlen" in out and "liger-loss" in out and "gas16" in out and "vocab/128" in out
    assert not results.exists()
    for bad in (["--kernels", "fused"], ["--attn", "varlen"], ["--grad-accum", "0"]):
        assert main(["bench", "--model", "2b", "--results", str(results), "--dry-run", *bad]) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
