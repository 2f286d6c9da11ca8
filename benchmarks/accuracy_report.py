"""Issue 5's accuracy matrix: every GPU run under reports/h100_*/ predicted by zeroplan with and
without the H100's calibrated constants, beside DeepSpeed's own estimator, and the step-time model
beside the measured step times. Pure zeroplan core, no GPU needed:

    .venv/bin/python benchmarks/accuracy_report.py            # writes reports/accuracy/

The calibration came from the sweeps in CALIBRATION_SWEEPS (see the [calibrated]
table of zeroplan/profiles/gpus/h100-80gb.toml); the other sweeps are out of sample for it.
"""

from __future__ import annotations

import glob
import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path

from zeroplan.core.atomic import write_files_atomic
from zeroplan.lab.calibrate import points_from_records
from zeroplan.lab.jsonl import read
from zeroplan.lab.points import relative_error
from zeroplan.core.memory import estimate
from zeroplan.core.profiles import load_gpu
from zeroplan.lab.records import drawn_tiles, record_profile
from zeroplan.lab.stepfit import predicted_step_s, steady, timed_run
from zeroplan.core.steptime import step_time

CALIBRATION_SWEEPS = ("h100_check", "h100_matrix_long", "h100_stages_4b", "h100_stages", "h100_matrix_short",
                      "h100_fast_2b", "h100_fast_stages", "h100_z3_steady", "h100_4b_fit")
GIB = 2**30


def rows_for(sweep: Path, calibrated, plain) -> list[dict]:
    records = read(sweep / "results.jsonl").records
    rows = []
    for record in records:
        status = record["status"]
        ok = points_from_records([record])
        point = ok[0] if ok else None
        if point is None:  # a failed run: only its shape and plan are read, so the measurements are placeholders
            fake = dict(record, status="ok", measured_peak_allocated_bytes=1, measured_peak_reserved_bytes=1,
                        step_time_s=record.get("step_time_s") or 1.0)
            point = points_from_records([fake])[0]
        profile = record_profile(record)
        steps, accumulation = point.step_tiles, point.gradient_accumulation
        with_cal = estimate(profile, point.shape, point.plan, calibrated, steps, accumulation, point.compiled)
        without = estimate(profile, point.shape, point.plan, plain, steps, accumulation, point.compiled)
        # The step-time model sees a run as zeroplan calibrate's fit does (zeroplan.lab.stepfit.timed_run:
        # the tiles its samples drew on average, since time follows the work done).
        timed = timed_run(record, calibrated) if status == "ok" else None
        if timed is not None:
            time_cal = predicted_step_s(timed)
            time_plain = predicted_step_s(replace(timed, gpu=plain))
        else:
            time_cal = step_time(profile, point.spec_shape, point.plan, calibrated, accumulation).step_s
            time_plain = step_time(profile, point.spec_shape, point.plan, plain, accumulation).step_s
        baseline = ((record.get("deepspeed_estimator_bytes") or {}).get("for_stage") or {}).get("gpu_bytes")
        spec = record["spec"]
        row = {
            "sweep": sweep.name, "model": record["model"], "stage": spec["stage"], "micro_batch": spec["micro_batch"],
            "seq_len": spec["seq_len"], "tiles": spec["tiles"], "fixed_tiles": spec.get("fixed_tiles", False),
            "largest_tiles": point.shape.tiles, "tiles_source": drawn_tiles(record)[1], "step_tiles": steps,
            "grad_ckpt": spec["grad_ckpt"], "frozen": spec.get("frozen", []), "lora_rank": spec.get("lora_rank", 0),
            "offload_optimizer": spec.get("offload_optimizer", "none"), "status": status,
            "kernels": spec.get("kernels", "eager"), "packed": spec.get("packed", False),
            "compile": spec.get("compile", False), "gradient_accumulation": accumulation,
            "vocab_multiple": spec.get("vocab_multiple", 1),
            "in_calibration_set": sweep.name in CALIBRATION_SWEEPS,
            "predicted_allocated": with_cal.peak_allocated, "predicted_reserved_calibrated": with_cal.peak_reserved,
            "predicted_reserved_uncalibrated": without.peak_reserved,
            "predicted_peak_calibrated": with_cal.peak, "predicted_peak_uncalibrated": without.peak,
            "capacity": calibrated.memory_bytes, "deepspeed_estimator": baseline,
            "predicted_step_s_calibrated": time_cal, "predicted_step_s_uncalibrated": time_plain,
        }
        if status == "ok":
            measured_alloc, measured_res = record["measured_peak_allocated_bytes"], record["measured_peak_reserved_bytes"]
            row.update(measured_allocated=measured_alloc, measured_reserved=measured_res,
                       measured_nvml_used=record.get("nvml_peak_used_bytes"), measured_step_s=record["step_time_s"],
                       mfu=record.get("mfu"),
                       error_allocated=relative_error(with_cal.peak_allocated, measured_alloc),
                       error_reserved_calibrated=relative_error(with_cal.peak_reserved, measured_res),
                       error_reserved_uncalibrated=relative_error(without.peak_reserved, measured_res),
                       error_nvml_calibrated=relative_error(with_cal.peak, record.get("nvml_peak_used_bytes")),
                       error_nvml_uncalibrated=relative_error(without.peak, record.get("nvml_peak_used_bytes")),
                       error_deepspeed=relative_error(baseline, measured_alloc),
                       error_step_calibrated=relative_error(time_cal, record["step_time_s"]),
                       error_step_uncalibrated=relative_error(time_plain, record["step_time_s"]),
                       steady=steady(record))
        rows.append(row)
    return rows


def summary(values: list[float]) -> str:
    if not values:
        return "n/a"
    absolute = [abs(v) for v in values]
    return f"median {statistics.median(absolute):.1%}, worst {max(absolute):.1%} (n={len(values)})"


def label(row: dict) -> str:
    parts = [f"mb{row['micro_batch']}", f"{row['seq_len']} tok", f"{row['tiles']}{'' if row['fixed_tiles'] else '~'} tiles",
             "ckpt" if row["grad_ckpt"] else "no ckpt"]
    if row["frozen"]:
        parts.append("frozen " + "+".join(row["frozen"]))
    if row["lora_rank"]:
        parts.append(f"LoRA {row['lora_rank']}")
    if row["offload_optimizer"] != "none":
        parts.append("opt offload")
    if row["tiles_source"].startswith("replayed") and row["largest_tiles"] != row["tiles"]:
        parts.append(f"largest micro-batch {row['largest_tiles']} tiles/sample")
    for key, text in (("packed", "packed varlen"), ("compile", "compiled")):
        if row.get(key):
            parts.append(text)
    if row.get("kernels", "eager") != "eager":
        parts.append(row["kernels"])
    if row.get("gradient_accumulation", 1) > 1:
        parts.append(f"GAS {row['gradient_accumulation']}")
    if row.get("vocab_multiple", 1) > 1:
        parts.append(f"vocab/{row['vocab_multiple']}")
    return ", ".join(parts)


def pct(value) -> str:
    return "—" if value is None else f"{value:+.1%}"


def mfu(row: dict) -> str:
    return "—" if row.get("mfu") is None else f"{row['mfu']:.1%}"


def gib(value) -> str:
    return "—" if value is None else f"{value / GIB:.2f}"


def render(rows: list[dict], device: str, when: str) -> str:
    ok = [r for r in rows if r["status"] == "ok"]
    out_of_sample = [r for r in ok if not r["in_calibration_set"]]
    fixed = [r for r in ok if r["fixed_tiles"] or r["tiles"] <= 1]
    liger = [r for r in ok if r["kernels"] != "eager"]
    timed = [r for r in ok if r["offload_optimizer"] == "none" and r["steady"]
             and not (r["stage"] == 3 and r.get("compile"))]
    lines = [
        "# Accuracy of zeroplan's memory and step-time models on one H100",
        "",
        f"- device: {device}; runs made on {when} (see each sweep's results.jsonl for its date and versions)",
        "- produced by: `.venv/bin/python benchmarks/accuracy_report.py` from `reports/h100_*/results.jsonl`",
        "- measured peak allocated = `torch.cuda.max_memory_allocated()` over the training steps; reserved = "
        "`torch.cuda.max_memory_reserved()`; NVML = the peak 'used' memory NVML reported; DeepSpeed's estimator = "
        "`estimate_zero2/3_model_states_mem_needs` for the run's stage (model states only, so its error shows what "
        "it leaves out)",
        "- predicted allocated: zeroplan.core.memory's phases over zeroplan.core.activations' saved tensors; predicted reserved: "
        "the caching allocator's rules (zeroplan.core.allocator) replayed over the steps' allocations and frees "
        "(zeroplan.core.step_events); nothing in either is fitted to these runs",
        "- calibrated = the [calibrated] constants of zeroplan/profiles/gpus/h100-80gb.toml, measured by `zeroplan calibrate` "
        f"on {', '.join(CALIBRATION_SWEEPS)} (the CUDA context, so it moves the NVML-level peak; reserved memory "
        "differs only through the usable capacity; and the step-time constants, zeroplan.lab.stepfit); uncalibrated = "
        "the same profile without them (step time then takes zeroplan.core.steptime's defaults)",
        "- tiles: the runs before commit 7f0861d drew 4-10 tiles per sample around the spec's 7 (`~`); each run is "
        "predicted for its largest micro-batch, from the recorded `step_tiles` or, for older records, the runner's "
        "draw replayed and checked against the recorded `tiles_per_sample` (zeroplan.lab.records); the replayed allocator "
        "also gets every step's tiles",
        "",
        "## Summary",
        "",
        f"- peak allocated, every run: {summary([r['error_allocated'] for r in ok])}",
        f"- peak allocated, runs with exactly the spec's tiles: {summary([r['error_allocated'] for r in fixed])}",
        f"- peak allocated, out of the calibration set: {summary([r['error_allocated'] for r in out_of_sample])}",
        f"- peak allocated, Liger-Kernel runs: {summary([r['error_allocated'] for r in liger])}",
        f"- under-estimates of peak allocated by more than 5 %: "
        f"{sum(1 for r in ok if r['error_allocated'] < -0.05)} of {len(ok)} (every finished run)",
        f"- peak reserved, every run, calibrated: {summary([r['error_reserved_calibrated'] for r in ok])}; "
        f"uncalibrated: {summary([r['error_reserved_uncalibrated'] for r in ok])}",
        f"- peak reserved, runs with exactly the spec's tiles: "
        f"{summary([r['error_reserved_calibrated'] for r in fixed])}; runs whose draws are reconstructed "
        f"or recorded: {summary([r['error_reserved_calibrated'] for r in ok if r not in fixed])}",
        f"- under-estimates of peak reserved by more than 5 %: "
        f"{sum(1 for r in ok if r['error_reserved_calibrated'] < -0.05)} of {len(ok)}",
        f"- NVML peak used (reserved + CUDA context), calibrated: "
        f"{summary([r['error_nvml_calibrated'] for r in ok if r['error_nvml_calibrated'] is not None])}; "
        f"uncalibrated: {summary([r['error_nvml_uncalibrated'] for r in ok if r['error_nvml_uncalibrated'] is not None])}",
        f"- DeepSpeed's estimator against peak allocated: "
        f"{summary([r['error_deepspeed'] for r in ok if r['error_deepspeed'] is not None])}",
        f"- step time, calibrated: {summary([r['error_step_calibrated'] for r in timed])}; "
        f"uncalibrated: {summary([r['error_step_uncalibrated'] for r in timed])} (runs without offload, "
        f"the {sum(1 for r in ok if not r['steady'])} ZeRO-3 runs timed after fewer than 4 warm-up micro-steps "
        "left out: zeroplan.lab.stepfit.steady, and ZeRO-3 with compiled layers, which zeroplan never plans)",
    ]
    ooms = [r for r in rows if r["status"] == "oom"]
    predicted_oom = sum(1 for r in ooms if r["predicted_peak_calibrated"] > r["capacity"])
    fits_ok = sum(1 for r in ok if r["predicted_peak_calibrated"] <= r["capacity"])
    lines += [
        f"- out-of-memory runs the model called 'does not fit': {predicted_oom} of {len(ooms)}; finished runs it "
        f"called 'fits': {fits_ok} of {len(ok)}",
        "",
        "## Every run",
        "",
        "| sweep | model | stage | shape | status | measured alloc GiB | predicted alloc GiB | error | measured reserved GiB "
        "| predicted reserved (cal / uncal) GiB | error (cal / uncal) | NVML error (cal / uncal) | DeepSpeed estimator GiB "
        "| its error | measured step s | predicted step s (cal / uncal) | MFU |",
        "|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['sweep']}{' (cal)' if r['in_calibration_set'] else ''} | {r['model']} | {r['stage']} | {label(r)} "
            f"| {r['status']} | {gib(r.get('measured_allocated'))} | {gib(r['predicted_allocated'])} "
            f"| {pct(r.get('error_allocated'))} | {gib(r.get('measured_reserved'))} "
            f"| {gib(r['predicted_reserved_calibrated'])} / {gib(r['predicted_reserved_uncalibrated'])} "
            f"| {pct(r.get('error_reserved_calibrated'))} / {pct(r.get('error_reserved_uncalibrated'))} "
            f"| {pct(r.get('error_nvml_calibrated'))} / {pct(r.get('error_nvml_uncalibrated'))} "
            f"| {gib(r['deepspeed_estimator'])} | {pct(r.get('error_deepspeed'))} "
            f"| {r.get('measured_step_s') or 0:.3f} | {r['predicted_step_s_calibrated']:.3f} / "
            f"{r['predicted_step_s_uncalibrated']:.3f} | {mfu(r)} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    calibrated = load_gpu("h100")
    plain = replace(calibrated, calibrated={})
    rows = []
    for folder in sorted(glob.glob("reports/h100_*")):
        if Path(folder, "results.jsonl").is_file():
            rows += rows_for(Path(folder), calibrated, plain)
    device = Path("reports/h100_check/device.txt").read_text().strip().replace("\n", "; ")
    when = sorted({json.loads(line)["date"][:10] for f in glob.glob("reports/h100_*/results.jsonl")
                   for line in open(f) if line.strip()})
    text = render(rows, device, ", ".join(when))
    write_files_atomic({"reports/accuracy/README.md": text,
                        "reports/accuracy/rows.json": json.dumps(rows, indent=1) + "\n"})
    print(text.split("## Every run")[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
