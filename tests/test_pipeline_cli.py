"""The whole measuring pipeline as a user runs it: `zeroplan bench` launches the real runner (tiny
InternVL, gloo, 2 ranks) under ZeRO 1-3, then `zeroplan report` renders what it measured. On a GPU
the same test runs one point on CUDA and checks the measured peaks against the prediction."""

import json

import pytest

from zeroplan.cli.main import main
from zeroplan.runner.record import STABLE_KEYS

CPU_ONLY_NONE = {"measured_peak_allocated_bytes", "measured_peak_reserved_bytes"}


@pytest.mark.slow
def test_bench_then_report_on_two_cpu_ranks(tmp_path, capsys):
    pytest.importorskip("deepspeed")
    results = tmp_path / "results.jsonl"
    code = main(["bench", "--model", "tiny", "--stages", "1,2,3", "--micro-batch", "1", "--grad-ckpt", "on",
                 "--seq-len", "64", "--tiles", "2", "--gpus", "2", "--steps", "3", "--warmup-steps", "1", "--results", str(results)])
    assert code == 0
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert sorted(r["stage"] for r in records) == [1, 2, 3]
    for record in records:
        assert record["status"] == "ok", record.get("reason")
        assert record["world_size"] == 2 and len(record["losses"]) == 3
        for key in STABLE_KEYS:
            assert key in record
            if key not in CPU_ONLY_NONE:
                assert record[key] is not None, key
        assert record["predicted_peak_bytes"] > 0 and record["tokens_per_s"] > 0
    out = tmp_path / "report"
    assert main(["report", str(results), "--out", str(out)]) == 0
    text = (out / "README.md").read_text()
    assert "ZeRO-1" in text and "ZeRO-3" in text and "tiny-internvl" in text
    assert (out / "memory_tiny-internvl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.gpu
def test_one_point_on_cuda_is_predicted_within_ten_percent(tmp_path):
    results = tmp_path / "results.jsonl"
    code = main(["bench", "--model", "1b", "--stages", "1", "--micro-batch", "1", "--grad-ckpt", "on",
                 "--seq-len", "4096", "--tiles", "7", "--gpus", "1", "--steps", "4", "--warmup-steps", "2", "--results", str(results)])
    assert code == 0
    record = json.loads(results.read_text().splitlines()[0])
    assert record["status"] == "ok", record.get("reason")
    measured = record["measured_peak_allocated_bytes"]
    assert abs(record["predicted_peak_allocated_bytes"] - measured) / measured < 0.10
