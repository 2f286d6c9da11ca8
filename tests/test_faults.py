"""Faults outside zeroplan: NVML missing or failing, DeepSpeed not importable, a GPU partly used.

Sweep faults (a point that OOMs, hangs or dies; SIGKILL of the sweep and a rerun) are covered by
tests/test_bench_resume.py and not repeated here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from zeroplan.adapters import nvml
from zeroplan.adapters.nvml import ProbedGPU, ProbeResult
from zeroplan.cli.main import main
from zeroplan.adapters.gpus import choose_gpu
from zeroplan.core.profiles import DEFAULT_GPU, load_gpu

ROOT = Path(__file__).resolve().parents[1]
GIB = 1 << 30


def _fake_pynvml(fail_at: str | None, shutdowns: list) -> types.ModuleType:
    """A pynvml with one H100 whose call named `fail_at` raises like NVML does."""
    module = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    def call(name, value):
        def function(*args):
            if name == fail_at:
                raise NVMLError(f"{name}: Unknown Error")
            return value
        return function

    memory = types.SimpleNamespace(total=80 * GIB, free=30 * GIB, used=50 * GIB)
    module.NVMLError = NVMLError
    module.NVML_FEATURE_ENABLED = 1
    module.nvmlInit = call("nvmlInit", None)
    module.nvmlShutdown = lambda: shutdowns.append(True)
    module.nvmlDeviceGetCount = call("nvmlDeviceGetCount", 1)
    module.nvmlDeviceGetHandleByIndex = call("nvmlDeviceGetHandleByIndex", object())
    module.nvmlDeviceGetPciInfo = call("nvmlDeviceGetPciInfo", types.SimpleNamespace(busId=b"0000:01:00.0"))
    module.nvmlDeviceGetMemoryInfo = call("nvmlDeviceGetMemoryInfo", memory)
    module.nvmlDeviceGetName = call("nvmlDeviceGetName", b"NVIDIA H100 80GB HBM3")
    module.nvmlDeviceGetNvLinkState = call("nvmlDeviceGetNvLinkState", 0)
    module.nvmlSystemGetDriverVersion = call("nvmlSystemGetDriverVersion", b"570.86")
    module.nvmlSystemGetCudaDriverVersion = call("nvmlSystemGetCudaDriverVersion", 12080)
    return module


FAULTS = {
    "pynvml missing": (None, "nvidia-ml-py is not installed"),
    "init raises": ("nvmlInit", "NVML unavailable"),
    "count raises": ("nvmlDeviceGetCount", "NVML query failed"),
    "memory query raises": ("nvmlDeviceGetMemoryInfo", "NVML query failed"),
    "name query raises": ("nvmlDeviceGetName", "NVML query failed"),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_nvml_faults_mean_no_gpu_found_and_the_default_profile(fault, monkeypatch, tmp_path, capsys,
                                                               skip_deepspeed_validation):
    fail_at, reason = FAULTS[fault]
    shutdowns: list = []
    monkeypatch.setitem(sys.modules, "pynvml", None if fault == "pynvml missing" else _fake_pynvml(fail_at, shutdowns))
    result = nvml.probe()
    assert not result.found and reason in result.reason
    if fail_at not in (None, "nvmlInit"):
        assert shutdowns, "NVML initialised but never shut down"

    assert main(["probe"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("no GPU found") and reason in out
    assert main(["probe", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["found"] is False

    default = load_gpu(DEFAULT_GPU)
    assert main(["estimate", "--model", "tiny", "--gpus", "1", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["gpu"] == default.name and "default GPU profile" in payload["gpu_origin"]
    assert payload["capacity_bytes"] <= default.memory_bytes
    assert main(["recommend", "--model", "tiny", "--gpus", "1", "--out", str(tmp_path / "ds.json")]) == 0
    out = " ".join(capsys.readouterr().out.split())  # rich wraps lines
    assert "no GPU found" in out and f"default GPU profile {default.name}" in out


def test_a_working_nvml_gives_the_probed_gpu(monkeypatch, capsys):
    """The fake itself works, so the faults above are the faults and not a broken fake."""
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(None, []))
    assert main(["probe", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["found"] and payload["gpus"][0]["profile"] == load_gpu("h100-80gb").name


def test_a_partly_used_gpu_is_planned_with_its_free_memory(monkeypatch, capsys):
    total, free = load_gpu("h100-80gb").memory_bytes, 30 * GIB
    probed = ProbeResult(gpus=(ProbedGPU(0, "NVIDIA H100 80GB HBM3", total, free, total - free),),
                         driver_version="570", cuda_version="12.8")
    chosen = choose_gpu(None, probe=lambda: probed)
    assert chosen.profile.memory_bytes == free and "free memory" in chosen.origin
    idle = choose_gpu(None, probe=lambda: ProbeResult(gpus=(ProbedGPU(0, "NVIDIA H100 80GB HBM3", total, total, 0),)))
    assert idle.profile.memory_bytes == total and "free memory" not in idle.origin

    monkeypatch.setattr(nvml, "probe", lambda: probed)
    assert main(["estimate", "--model", "8b", "--gpus", "8", "--json"]) == 0
    busy = json.loads(capsys.readouterr().out)
    monkeypatch.setattr(nvml, "probe", lambda: ProbeResult(gpus=(ProbedGPU(0, "NVIDIA H100 80GB HBM3", total,
                                                                            total, 0),)))
    assert main(["estimate", "--model", "8b", "--gpus", "8", "--json"]) == 0
    full = json.loads(capsys.readouterr().out)
    assert busy["capacity_bytes"] < full["capacity_bytes"] and "free memory" in busy["gpu_origin"]


# ------------------------------------------------------------ DeepSpeed not importable


@pytest.fixture(scope="module")
def without_deepspeed(tmp_path_factory):
    """An environment whose `import deepspeed` fails, for child processes (the recommend
    validator is a child process too, and inherits it)."""
    shadow = tmp_path_factory.mktemp("shadow")
    (shadow / "deepspeed").mkdir()
    (shadow / "deepspeed" / "__init__.py").write_text('raise ImportError("deepspeed hidden by test_faults")\n')
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(shadow), str(ROOT)]), COLUMNS="200")
    return env


def _zeroplan(env, *argv, cwd):
    return subprocess.run([sys.executable, "-m", "zeroplan", *argv], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def test_the_shadow_really_hides_deepspeed(without_deepspeed, tmp_path):
    done = subprocess.run([sys.executable, "-c", "import deepspeed"], env=without_deepspeed, capture_output=True,
                          text=True)
    assert done.returncode == 1 and "hidden by test_faults" in done.stderr


def test_estimate_answers_without_deepspeed_and_says_its_estimator_is_unavailable(without_deepspeed, tmp_path):
    done = _zeroplan(without_deepspeed, "estimate", "--model", "tiny", "--gpus", "2", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    payload = json.loads(done.stdout)
    assert payload["per_gpu_bytes"]["peak"] > 0
    baseline = payload["deepspeed_estimator_bytes"]
    assert baseline["for_stage"] is None and "not importable" in baseline["reason"]
    table = _zeroplan(without_deepspeed, "estimate", "--model", "tiny", "--gpus", "2", cwd=tmp_path)
    assert table.returncode == 0 and "DeepSpeed estimator" in table.stdout and "n/a" in table.stdout
    assert "Traceback" not in table.stderr + done.stderr


def test_recommend_answers_without_deepspeed_and_says_the_config_was_not_validated(without_deepspeed, tmp_path):
    done = _zeroplan(without_deepspeed, "recommend", "--model", "tiny", "--gpus", "2", "--out", "ds.json", "--json",
                     "--trainer", "zeroplan", cwd=tmp_path)  # a concrete config: its batch is a number
    assert done.returncode == 0, done.stderr
    payload = json.loads(done.stdout)
    assert "not validated" in payload["validation"] and "deepspeed" in payload["validation"].lower()
    assert json.loads((tmp_path / "ds.json").read_text())["train_micro_batch_size_per_gpu"] >= 1
    table = _zeroplan(without_deepspeed, "recommend", "--model", "tiny", "--gpus", "2", "--out", "ds.json",
                      cwd=tmp_path)
    assert table.returncode == 0 and "not validated" in table.stdout


def test_validate_without_deepspeed_is_one_line_naming_it(without_deepspeed, tmp_path):
    (tmp_path / "ds.json").write_text('{"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2}}')
    done = _zeroplan(without_deepspeed, "validate", "ds.json", "--model", "tiny", "--gpus", "1", cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert done.stderr.startswith("zeroplan: error:") and "deepspeed" in done.stderr.lower()
