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


def test_estimate_json_gives_the_plan_s_step_time_and_takes_accumulation(capsys):
    args = ("estimate", "--model", "2b", "--gpus", "2", "--stage", "1", "--gpu", "h200", "--no-grad-ckpt", "--json")
    one = json.loads(run(capsys, *args)[1])
    four = json.loads(run(capsys, *args, "--grad-accum", "4")[1])
    assert one["gradient_accumulation"] == 1 and four["gradient_accumulation"] == 4
    # ZeRO-1 holds the micro-steps' gradients to the boundary: more memory, and four micro-steps' time
    assert four["per_gpu_bytes"]["peak"] > one["per_gpu_bytes"]["peak"]
    # four micro-steps' compute, one optimizer step's bookkeeping
    assert 2 * one["predicted_step_time_s"] < four["predicted_step_time_s"] < 4 * one["predicted_step_time_s"]
    assert four["predicted_tokens_per_s"] == pytest.approx(2 * 4 * 4096 / four["predicted_step_time_s"])
    assert 0 < four["predicted_mfu"] < 1


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
    assert code == 3 and "no plan fits" in err and "node RAM" in err
    assert "would fit with" in err or "no single change" in err
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
    (["estimate", "--model", "8b", "--grad-accum", "0"], "--grad-accum"),
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
