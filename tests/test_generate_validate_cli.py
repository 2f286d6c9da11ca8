"""`zeroplan generate` and `zeroplan validate` driven through the CLI entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from zeroplan.adapters.deepspeed_adapter import validate_config
from zeroplan.cli.main import main

REPO = Path(__file__).resolve().parent.parent
TEAM_SPEC = REPO / "benchmarks" / "configsets" / "internvl_team.toml"
SET_NAMES = ["zero_stage1_config.json", "zero_stage2_config.json", "zero_stage3_config.json",
             "zero_stage3_config_100b.json", "zero_stage3_config_34b.json"]


@pytest.fixture()
def generated(tmp_path, capsys):
    out = tmp_path / "configs"
    assert main(["generate", "--out", str(out)]) == 0
    capsys.readouterr()
    return out


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("zeroplan: error: ")
    return err


def test_generate_writes_the_validated_set(generated):
    assert sorted(p.name for p in generated.iterdir()) == SET_NAMES
    for path in generated.iterdir():
        text = path.read_text()
        config = json.loads(text)
        assert text == json.dumps(config, indent=2, sort_keys=True) + "\n"
        assert "train_micro_batch_size_per_gpu" in validate_config(config, 8)


def test_check_passes_on_an_untouched_folder(generated, capsys):
    assert main(["generate", "--out", str(generated), "--check"]) == 0
    assert "up to date" in capsys.readouterr().out


def test_check_reports_a_changed_value_with_a_diff(generated, capsys):
    path = generated / "zero_stage3_config.json"
    config = json.loads(path.read_text())
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 12345
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    assert main(["generate", "--out", str(generated), "--check"]) == 1
    captured = capsys.readouterr()
    assert f"--- {path}" in captured.out and "+++ generated/zero_stage3_config.json" in captured.out
    assert '-    "stage3_param_persistence_threshold": 12345,' in captured.out
    assert "zero_stage1_config.json" not in captured.out
    assert "1 config file(s)" in captured.err


def test_check_reports_missing_files_and_names_other_files_without_failing(generated, capsys):
    (generated / "mine.json").write_text("{}\n")
    assert main(["generate", "--out", str(generated), "--check"]) == 0  # another JSON file is not drift
    assert "not compared: mine.json" in capsys.readouterr().out
    (generated / "zero_stage2_config.json").unlink()
    assert main(["generate", "--out", str(generated), "--check"]) == 1
    out = capsys.readouterr().out
    assert "--- /dev/null\n+++ generated/zero_stage2_config.json" in out
    assert f"--- {generated / 'mine.json'}" not in out and "/dev/null\n" not in out.split("zero_stage2")[1]
    assert not (generated / "zero_stage2_config.json").exists()


def test_check_fails_on_a_missing_folder(tmp_path, capsys):
    assert main(["generate", "--out", str(tmp_path / "none"), "--check"]) == 1
    assert not (tmp_path / "none").exists()


def test_generate_from_the_example_spec(tmp_path, capsys):
    out = tmp_path / "team"
    assert main(["generate", "--out", str(out), "--spec", str(TEAM_SPEC)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert "internvl2_5-8b_8gpus_zero1.json" in names and "internvl2-40b_16gpus_planned.json" in names
    eight = json.loads((out / "internvl2_5-8b_8gpus_zero1.json").read_text())
    assert (eight["train_batch_size"], eight["train_micro_batch_size_per_gpu"], eight["gradient_accumulation_steps"]) \
        == (128, 4, 4)
    planned = json.loads((out / "internvl2-40b_16gpus_planned.json").read_text())
    assert planned["train_batch_size"] == 128
    assert main(["generate", "--out", str(out), "--spec", str(TEAM_SPEC), "--check"]) == 0


@pytest.mark.parametrize("spec,message", [
    ('[[config]]\nmodel = "8b"\ngpus = 8\nstage = 1\ncolour = "red"\n', "unknown key"),
    ('[[config]]\nmodel = "8b"\nstage = 1\n', "'gpus' is required"),
    ('[[config]]\nmodel = "8b"\ngpus = -8\nstage = 1\n', "--gpus"),
    ('[[config]]\nmodel = "8b"\ngpus = 8\nstage = 5\n', "stage"),
    ('[[config]]\nmodel = "8b"\ngpus = 8\n', "global_batch"),
    ('[[config]]\nmodel = "8b"\ngpus = 8\nstage = 2\noffload_optimizer = "cpu"\noptimizer = "client"\n', "client"),
    ('model = \n', "cannot read spec"),
    ('flavour = "hf"\n', "at least one"),
])
def test_bad_specs_are_one_line_and_write_nothing(tmp_path, capsys, spec, message):
    path = tmp_path / "spec.toml"
    path.write_text(spec)
    out = tmp_path / "out"
    assert main(["generate", "--out", str(out), "--spec", str(path)]) == 2
    assert message in _one_error_line(capsys)
    assert not out.exists()


def test_validate_reports_schema_autos_and_fit(generated, capsys):
    args = ["validate", str(generated / "zero_stage3_config.json"), "--model", "26b", "--gpus", "8",
            "--gpu", "a100-80gb", "--micro-batch", "1", "--seq-len", "4096", "--freeze", "vision"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "DeepSpeed accepts it (ZeRO stage 3" in out and "gradient_clipping" in out and "verdict: fits" in out
    assert main(args + ["--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["fits"] is True and payload["verdict"] == "fits" and payload["stage"] == 3
    assert payload["margin_bytes"] == payload["usable_bytes"] - payload["per_gpu_bytes"]["peak"] > 0
    assert payload["usable_bytes"] == int(payload["capacity_bytes"] * 0.95) and payload["unknown_keys"] == []
    assert 0 < payload["margin_percent"] < 100
    assert "bf16.enabled" in payload["auto_fields"]


def test_validate_says_when_it_does_not_fit(tmp_path, capsys):
    out = tmp_path / "team"
    assert main(["generate", "--out", str(out), "--spec", str(TEAM_SPEC)]) == 0
    capsys.readouterr()
    rc = main(["validate", str(out / "internvl2_5-8b_8gpus_zero1.json"), "--model", "8b", "--gpus", "8",
               "--gpu", "rtx4090", "--seq-len", "8192", "--json"])
    payload = json.loads(capsys.readouterr().out)
    assert rc == 3 and payload["fits"] is False and payload["margin_bytes"] < 0 and payload["auto_fields"] == []


def _write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("case", ["missing", "malformed", "array", "duplicate", "rejected", "model", "gpu",
                                  "zero_gpus", "negative_gpus", "batch"])
def test_validate_bad_inputs_exit_2_with_one_line(tmp_path, capsys, case):
    good = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4, "train_batch_size": 64,
            "zero_optimization": {"stage": 2}}
    config, model, gpus, gpu = _write(tmp_path, "good.json", json.dumps(good)), "8b", "8", "a100-80gb"
    expected = {
        "missing": "does not exist", "malformed": "not valid JSON", "array": "not an object",
        "duplicate": "duplicate key", "rejected": "DeepSpeed rejects", "model": "unknown model",
        "gpu": "unknown GPU", "zero_gpus": "--gpus", "negative_gpus": "--gpus", "batch": "train_batch_size 64",
    }[case]
    if case == "missing":
        config = str(tmp_path / "nope.json")
    elif case == "malformed":
        config = _write(tmp_path, "bad.json", '{"zero_optimization": {"stage": 2,}}')
    elif case == "array":
        config = _write(tmp_path, "array.json", "[1, 2]")
    elif case == "duplicate":
        config = _write(tmp_path, "dup.json", '{"train_micro_batch_size_per_gpu": 1, "train_micro_batch_size_per_gpu": 2}')
    elif case == "rejected":
        config = _write(tmp_path, "rej.json", json.dumps({**good, "zero_optimization": {"stage": 2, "bogus": 1}}))
    elif case == "model":
        model = "13b-nonsense"
    elif case == "gpu":
        gpu = "tpu-v9"
    elif case == "zero_gpus":
        gpus = "0"
    elif case == "negative_gpus":
        gpus = "-4"
    elif case == "batch":
        gpus = "16"
    rc = main(["validate", config, "--model", model, "--gpus", gpus, "--gpu", gpu])
    assert rc == 2
    assert expected in _one_error_line(capsys)


def test_validate_json_is_the_only_thing_on_stdout_in_a_fresh_process(generated):
    """DeepSpeed logs to stdout when first imported; --json output must stay parseable."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", "from zeroplan.cli.main import app; app()", "validate", str(generated / "zero_stage1_config.json"),
         "--model", "8b", "--gpus", "8", "--gpu", "a100-80gb", "--json"],
        capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode in (0, 3), result.stderr
    assert json.loads(result.stdout)["config"].endswith("zero_stage1_config.json")


def test_committed_configs_are_up_to_date(capsys):
    """What .github/workflows/zeroplan-configs.yml checks in CI."""
    configs = REPO / "configs"
    if not configs.is_dir():
        pytest.skip("no configs/ folder in this checkout")
    assert main(["generate", "--out", str(configs), "--check"]) == 0, capsys.readouterr().out


def test_a_spec_table_shares_runspecs_field_names_and_lists_only_its_own_keys():
    from dataclasses import fields

    from zeroplan.core import configset
    from zeroplan.core.run import RunSpec

    run_fields = {f.name for f in fields(RunSpec)}
    assert configset.RUN_KEYS == {"model", "stage", "micro_batch", "gradient_accumulation", "gpu", "offload_optimizer",
                                  "offload_params", "seq_len", "tiles", "lora_rank", "lr"}  # none lost to a rename
    assert configset.RUN_KEYS <= run_fields and not configset.CONFIG_KEYS & run_fields
    assert configset.SPEC_KEYS == configset.RUN_KEYS | configset.CONFIG_KEYS
