"""A report rendered from a small results file has the tables, the right numbers and valid PNGs."""

from __future__ import annotations

import json

import pytest

from zeroplan.lab import points, report
from zeroplan.cli.main import main
from zeroplan.core.profiles import load_gpu

GIB = 1 << 30
SHAPE = {"micro_batch": 1, "seq_len": 4096, "tiles": 7, "grad_ckpt": True, "world_size": 1}


def record(model, stage, status, measured_gib=None, predicted_gib=None, estimator_gib=None, **extra):
    data = {"point_id": f"{model}-{stage}", "model": model, "stage": stage, "status": status, **SHAPE,
            "device": "NVIDIA H100 80GB HBM3", "date": f"2025-11-2{stage}T10:00:00+00:00",
            "bench_command": "zeroplan bench --sweep benchmarks/h100_stages.toml --results r.jsonl",
            "versions": {"torch": "2.13.0", "deepspeed": "0.19.8"}}
    if measured_gib is not None:
        data.update(measured_peak_allocated_bytes=int(measured_gib * GIB),
                    measured_peak_reserved_bytes=int((measured_gib + 2) * GIB),
                    tokens_per_s=12345.6, mfu=0.41, step_time_s=0.6625)
    if predicted_gib is not None:
        data["predicted_peak_bytes"] = int(predicted_gib * GIB)
        data["predicted"] = {"params": int(predicted_gib * GIB * 0.25), "grads": int(predicted_gib * GIB * 0.25),
                             "optimizer_states": int(predicted_gib * GIB * 0.3), "activations": int(predicted_gib * GIB * 0.2)}
    if estimator_gib is not None:
        data["deepspeed_estimator_bytes"] = int(estimator_gib * GIB)
    return {**data, **extra}


FIXTURE = [
    record("InternVL2_5-1B", 0, "oom", predicted_gib=90, reason="CUDA out of memory | tried 2 GiB"),
    record("InternVL2_5-1B", 1, "ok", 40, 42, 50),
    record("InternVL2_5-1B", 2, "ok", 30, 27, 33),
    record("InternVL2_5-1B", 3, "ok", 20, 20.4, 18),
    record("InternVL2_5-2B", 2, "ok", 50, 52),
]


@pytest.fixture
def results(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in FIXTURE) + '{"point_id": "torn')
    return path


def test_readme_has_the_tables_and_the_numbers(results, tmp_path):
    out = tmp_path / "report"
    assert main(["report", str(results), "--out", str(out)]) == 0
    text = (out / "README.md").read_text()
    assert "NVIDIA H100 80GB HBM3" in text and "2025-11-20T10:00:00+00:00 to 2025-11-23T10:00:00+00:00" in text
    assert "`zeroplan bench --sweep benchmarks/h100_stages.toml --results r.jsonl`" in text
    assert "deepspeed 0.19.8, torch 2.13.0" in text
    assert "### InternVL2_5-1B: micro-batch 1, 4096 tokens, 7 tiles, checkpointing on, 1 rank" in text
    assert "| | ZeRO-0 | ZeRO-1 | ZeRO-2 | ZeRO-3 |" in text
    assert "| status | **oom** | ok | ok | ok |" in text
    assert "| peak allocated (GiB) | — | 40.00 | 30.00 | 20.00 |" in text
    assert "| peak reserved (GiB) | — | 42.00 | 32.00 | 22.00 |" in text
    assert "| tokens/s | — | 12,346 | 12,346 | 12,346 |" in text
    assert "| MFU | — | 41.0% | 41.0% | 41.0% |" in text
    assert "| step time (s) | — | 0.662 | 0.662 | 0.662 |" in text
    assert "| InternVL2_5-1B | mb1 ckpt | 0 | oom | 90.00 | — | — | — | — |" in text
    assert "| InternVL2_5-1B | mb1 ckpt | 2 | ok | 27.00 | 30.00 | -10.0% | 33.00 | +10.0% |" in text
    assert "| InternVL2_5-2B | mb1 ckpt | 2 | ok | 52.00 | 50.00 | +4.0% | — | — |" in text
    assert ("**zeroplan**: median absolute error 4.5%, worst 10.0%, 1 under-estimate(s) of 4 measured points."
            in text)
    assert ("**DeepSpeed estimator**: median absolute error 10.0%, worst 25.0%, 1 under-estimate(s) of 3 measured "
            "points." in text)
    assert "**oom**, CUDA out of memory \\| tried 2 GiB" in text
    assert "![memory_internvl2_5-1b.png](memory_internvl2_5-1b.png)" in text


def test_plots_are_valid_pngs_per_model_and_nothing_temporary_is_left(results, tmp_path):
    image = pytest.importorskip("PIL.Image")
    out = tmp_path / "report"
    files = report.write_report(results, out, "zeroplan report")
    names = sorted(path.name for path in files.plots)
    assert names == ["memory_internvl2_5-1b.png", "memory_internvl2_5-2b.png",
                     "throughput_internvl2_5-1b.png", "throughput_internvl2_5-2b.png"]
    for path in files.plots:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with image.open(path) as png:
            png.verify()
            assert png.size[0] >= 600 and png.size[1] >= 400
    report.write_report(results, out, "zeroplan report")
    assert sorted(p.name for p in out.iterdir()) == sorted(names + ["README.md"])


def test_a_record_without_a_spec_field_falls_back_to_the_embedded_spec():
    point = points.to_point({"point_id": "x", "status": "ok", "spec": {"model": "m", "stage": 2, "micro_batch": 4,
                             "seq_len": 64, "tiles": 2, "grad_ckpt": False, "frozen": ["vision"], "lora_rank": 0,
                             "world_size": 2, "offload_optimizer": "cpu", "offload_params": "none"}})
    assert (point.model, point.stage) == ("m", 2)
    assert points.shape_label(point.shape) == ("micro-batch 4, 64 tokens, 2 tiles, checkpointing off, 2 ranks, "
                                               "optimizer offload to cpu, frozen vision")


@pytest.mark.parametrize("content,message", [
    ("", "no usable result lines"),
    ('{"point_id": "a", "model": "m"}\n{"torn', "no usable result lines (1 unreadable)"),
    (None, "does not exist"),
])
def test_bad_or_empty_results_are_one_line_exit_2(tmp_path, capsys, content, message):
    path = tmp_path / "results.jsonl"
    if content is not None:
        path.write_text(content)
    assert main(["report", str(path), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_the_runners_full_breakdown_and_allocated_prediction_are_used():
    full = {"params": 10, "grads": 20, "master_weights": 30, "optimizer_states": 40, "activations_vision": 5,
            "activations_llm": 6, "logits_and_loss": 7, "buffers": 8, "step_transient": 9, "overhead": 11,
            "peak_allocated": 150, "peak": 200}
    assert points.predicted_terms({"predicted_breakdown": full}) == {
        "params": 10, "grads": 20, "optimizer_states": 70, "activations": 18, "buffers": 8, "overhead": 11}
    point = points.to_point(record("m", 1, "ok", 1, predicted_peak_allocated_bytes=GIB // 2))
    assert points.predicted_allocated(point) == GIB // 2
    lines, ours, _ = report.prediction_rows([point])
    assert ours.errors_pct == (-50.0,) and ours.under_estimates == 1


def test_memory_plot_compares_like_with_like_and_names_device_and_length():
    from zeroplan.lab import plots

    record = {"model": "m", "stage": 1, "status": "ok", "micro_batch": 1, "seq_len": 4096, "tiles": 1,
              "grad_ckpt": True, "device": "NVIDIA H100 80GB HBM3", "predicted_peak_bytes": 30 * 2**30,
              "predicted_peak_allocated_bytes": 20 * 2**30, "predicted_peak_reserved_bytes": 25 * 2**30,
              "measured_peak_allocated_bytes": 21 * 2**30, "measured_peak_reserved_bytes": 24 * 2**30}
    point = points.to_point(record)
    bars = dict((label, (predicted, measured)) for label, predicted, measured in plots.memory_bars(point))
    assert bars["allocated"] == (20 * 2**30, 21 * 2**30)  # never the 30 GiB total against allocated
    assert bars["reserved"] == (25 * 2**30, 24 * 2**30)
    title = plots.memory_title("m", [point])
    assert "H100" in title and "4096 tokens" in title
    assert plots.capacity_bytes([point]) == load_gpu("h100").memory_bytes


def test_report_and_accuracy_report_share_one_error_definition():
    import ast
    from pathlib import Path

    assert points.relative_error(110, 100) == 0.1 and points.relative_error(1, 0) is None
    root = Path(__file__).resolve().parents[1]
    for path in (root / "zeroplan/lab/report.py", root / "benchmarks/accuracy_report.py"):
        tree = ast.parse(path.read_text())
        names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
        assert "relative_error" in names, path


def test_peak_reserved_is_predicted_beside_measured_where_records_hold_both(tmp_path):
    rows = [record("InternVL2_5-1B", 1, "ok", 40, 42, predicted_peak_reserved_bytes=int(41 * GIB)),  # measured 42
            record("InternVL2_5-1B", 3, "ok", 20, 21, predicted_peak_reserved_bytes=int(23.1 * GIB)),  # measured 22
            record("InternVL2_5-2B", 2, "ok", 50, 52)]  # no reserved prediction: left out of that table
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["report", str(path), "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "README.md").read_text()
    section = text.split("## Predicted vs measured peak reserved")[1]
    assert "| InternVL2_5-1B | mb1 ckpt | 1 | ok | 41.00 | 42.00 | -2.4% |" in section
    assert "| InternVL2_5-1B | mb1 ckpt | 3 | ok | 23.10 | 22.00 | +5.0% |" in section
    assert "InternVL2_5-2B" not in section.split("##")[0]
    assert "**zeroplan, peak reserved**: median absolute error 3.7%, worst 5.0%, 1 under-estimate(s) of 2" in section
    # without any reserved prediction the section is left out
    path.write_text(json.dumps(rows[2]) + "\n")
    assert main(["report", str(path), "--out", str(tmp_path / "plain")]) == 0
    assert "## Predicted vs measured peak reserved" not in (tmp_path / "plain" / "README.md").read_text()
