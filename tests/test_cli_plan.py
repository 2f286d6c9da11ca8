"""estimate, recommend and probe through the CLI: output shape, files written, and one-line errors."""

import json

import pytest

from zeroplan.adapters.nvml import ProbedGPU, ProbeResult
from zeroplan.cli.main import main
from zeroplan.adapters.gpus import choose_gpu


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_estimate_json_has_the_documented_keys(capsys):
    code, out, _ = run(capsys, "estimate", "--model", "40b", "--gpus", "16", "--stage", "3", "--json")
    assert code == 0
    payload = json.loads(out)
    assert set(payload["per_gpu_bytes"]) == {"params", "grads", "optimizer_states", "activations", "buffers",
                                             "overhead", "peak"}
    assert payload["world_size"] == 16 and payload["stage"] == 3
    assert "no GPU found" in payload["gpu_origin"] or "probed" in payload["gpu_origin"]
    assert "deepspeed_estimator_bytes" in payload


def test_estimate_table_names_the_default_profile(capsys):
    code, out, _ = run(capsys, "estimate", "--model", "8b", "--gpus", "8", "--stage", "1", "--gpu", "h100")
    assert code == 0 and "peak" in out and "H100" in out


def test_recommend_writes_a_config_and_json(capsys, tmp_path):
    target = tmp_path / "ds.json"
    # The bundled runner's stack: its fast recipe (fused loss) fits ZeRO-1, its config is concrete.
    code, out, _ = run(capsys, "recommend", "--model", "8b", "--gpus", "8", "--out", str(target), "--json",
                       "--trainer", "zeroplan")
    assert code == 0
    payload = json.loads(out)
    rec = payload["recommended"]
    for key in ("stage", "micro_batch", "gradient_accumulation", "grad_ckpt", "offload_optimizer", "offload_params",
                "predicted_peak_bytes", "predicted_tokens_per_s"):
        assert key in rec
    assert rec["stage"] == 1
    assert all("rejected_because" in alt for alt in payload["alternatives"])
    written = json.loads(target.read_text())
    assert written == payload["deepspeed_config"]
    assert written["zero_optimization"]["stage"] == rec["stage"]
    assert written["train_batch_size"] == 128
    assert set(payload["launch"]) >= {"deepspeed", "torchrun", "srun"}


def test_recommend_nothing_fits_exits_3(capsys, tmp_path):
    target = tmp_path / "ds.json"
    code, _, err = run(capsys, "recommend", "--model", "78b", "--gpus", "1", "--global-batch", "1", "--gpu", "l40s",
                       "--seq-len", "16384", "--plain", "--out", str(target))
    assert code == 3 and "no plan fits" in err and "would fit with" in err
    assert not target.exists()


@pytest.mark.parametrize("argv,needle", [
    (["estimate", "--model", "41b", "--gpus", "8"], "unknown model"),
    (["estimate", "--model", "8b", "--gpus", "0"], "--gpus"),
    (["estimate", "--model", "8b", "--gpus", "-4"], "--gpus"),
    (["estimate", "--model", "8b", "--gpus", "8", "--gpu", "v100"], "unknown GPU"),
    (["estimate", "--model", "8b", "--gpus", "8", "--stage", "4"], "stage"),
    (["estimate", "--model", "8b", "--gpus", "8", "--tiles", "40", "--seq-len", "4096"], "tiles"),
    (["recommend", "--model", "8b", "--gpus", "24", "--global-batch", "128"], "split evenly"),
    (["recommend", "--model", "8b", "--gpus", "8", "--headroom", "nan"], "headroom"),
    (["estimate", "--model", "8b", "--gpus", "abc"], "--gpus"),
    (["estimate", "--model", "8b", "--freeze", "ears"], "freeze"),
])
def test_bad_input_is_one_line_exit_2(capsys, argv, needle):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and needle in err
    assert "Traceback" not in out + err


def test_probe_without_nvml_says_no_gpu(capsys, monkeypatch):
    import zeroplan.adapters.nvml as nvml

    monkeypatch.setattr(nvml, "probe", lambda: ProbeResult(reason="NVML unavailable: test"))
    code, out, _ = run(capsys, "probe")
    assert code == 0 and "no GPU found" in out


def test_probed_gpu_with_less_free_memory_plans_with_free():
    busy = ProbeResult(gpus=(ProbedGPU(0, "NVIDIA H100 80GB HBM3", 85520809984, 40 << 30, 45 << 30),))
    chosen = choose_gpu(None, probe=lambda: busy)
    assert chosen.profile.memory_bytes == 40 << 30 and "free memory" in chosen.origin


def test_nvml_raising_falls_back_to_default(monkeypatch):
    import sys
    import types

    fake = types.SimpleNamespace(nvmlInit=lambda: (_ for _ in ()).throw(RuntimeError("driver gone")))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    chosen = choose_gpu(None)
    assert "no GPU found" in chosen.origin and "driver gone" in chosen.origin
