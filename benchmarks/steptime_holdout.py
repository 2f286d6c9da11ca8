"""Held-out accuracy of the step-time model: the additive model (host costs added to GPU time) against
the overlap-aware one (the larger of GPU and host time, plus the serial parts), each fitted on one half
of the committed single-node runs and scored on the other.

The runs: every steady finished run of zeroplan's own training loop in reports/h100_*/results.jsonl and
reports/h200_*/results.jsonl (zeroplan.lab.stepfit.steady), each timed in its own mode (the older runs
are all "sync"). Runs through the HF Trainer (spec trainer "hf": reports/h200_hf_*) are left out: they
were made to measure memory, and their steps add the Trainer's own per-step work.
The split: a run is in the fit half when the first byte of sha256(point id) is even, so a point run in
several sweeps lands on one side only; reports/h200_timing is held out entirely. The fit takes what
`zeroplan calibrate` takes from its half (one GPU, no offload, no ZeRO-3 with compiled layers), pooled
over the H100 and the H200 (the same GH100 die and host stack: one set of constants, each run under
its own GPU profile's bandwidths). Offload runs are scored separately: before = the additive model with
the default offload rates, after = the overlap-aware model with the profile's measured host figures.
Last, the committed constants (main's, and the profiles' now, both from zeroplan calibrate over the
calibration sweeps, which do not include h200_timing) on the h200_timing runs and every offload run.

    PYTHONPATH=$PWD python benchmarks/steptime_holdout.py --out reports/steptime_overlap/holdout.json
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import hashlib
import json
import statistics
from pathlib import Path

from zeroplan.core.atomic import write_atomic
from zeroplan.core.run import RunSpec
from zeroplan.core.steptime import StepTerms, constants, seconds_of, step_terms
from zeroplan.lab.jsonl import read
from zeroplan.lab.stepfit import TimedRun, _solve, fit, steady, timed_run
from zeroplan.core.profiles import load_gpu

HELD_OUT_SWEEPS = ("h200_timing",)
OFFLOAD_SWEEPS = ("h100_matrix_offload", "h100_offload_accum", "h200_timing")
# The H100's [calibrated] step-time constants on main before the overlap-aware model (2026-11-25, 69 runs),
# which the H200 profile shared: the committed "before".
MAIN_CONSTANTS = {"compute_efficiency": 0.6513, "misaligned_gemm_efficiency": 0.099, "layer_overhead_s": 0.0039026,
                  "compiled_layer_overhead_s": 0.0006659, "recompute_layer_overhead_s": 0.0018795,
                  "step_tensor_overhead_s": 0.0001191, "stage3_module_overhead_s": 0.0011801}


def in_fit_half(record: dict) -> bool:
    """The deterministic split: even first byte of sha256 of the point id."""
    point = RunSpec.from_dict(record["spec"]).point_id()
    return hashlib.sha256(point.encode()).digest()[0] % 2 == 0


def load_runs(root: Path, steady_only: bool = True) -> list[tuple[str, dict, TimedRun]]:
    """(sweep, record, run) for every steady (or, with steady_only False, every) finished run of the
    H100 and H200 sweeps."""
    out = []
    paths = sorted(glob.glob(str(root / "h100_*" / "results.jsonl")) + glob.glob(str(root / "h200_*" / "results.jsonl")))
    for path in paths:
        sweep = Path(path).parent.name
        for record in read(Path(path)).records:
            if (record.get("spec") or {}).get("trainer", "zeroplan") != "zeroplan":
                continue
            run = timed_run(record) if steady(record) or not steady_only else None
            if run is not None:
                out.append((sweep, record, run))
    return out


def calibratable(run: TimedRun) -> bool:
    """What zeroplan calibrate fits on (zeroplan.lab.calibrate.fit_step_constants)."""
    return (run.plan.world_size == 1 and run.plan.offload_optimizer == "none" and run.plan.offload_params == "none"
            and not (run.plan.stage == 3 and run.shape.compiled))


def additive_seconds(terms: StepTerms, gpu, values: dict[str, float]) -> float:
    """The previous model: every host cost added to the GPU's time."""
    peak = gpu.bf16_dense_tflops * 1e12
    compute = terms.compute_flops / (peak * values["compute_efficiency"])
    slow = terms.misaligned_flops * (1 / values["misaligned_gemm_efficiency"] - 1 / values["compute_efficiency"]) / peak
    return (compute + max(slow, 0.0) + terms.eager_layer_passes * values["layer_overhead_s"]
            + terms.compiled_layer_passes * values["compiled_layer_overhead_s"]
            + terms.recomputed_layer_passes * values["recompute_layer_overhead_s"]
            + terms.tensor_visits * values["step_tensor_overhead_s"]
            + terms.module_passes * values["stage3_module_overhead_s"] + terms.fixed_s)


def fit_additive(runs: list[TimedRun], start: dict[str, float]) -> dict[str, float]:
    """The previous calibration: non-negative least squares of the additive model's relative error."""
    names = ["inverse", "layer_overhead_s", "compiled_layer_overhead_s", "recompute_layer_overhead_s",
             "step_tensor_overhead_s", "stage3_module_overhead_s"]
    rows, targets = [], []
    for run in runs:
        terms, peak = old_terms(run), run.gpu.bf16_dense_tflops * 1e12
        row = [(terms.compute_flops - terms.misaligned_flops) / peak, terms.eager_layer_passes,
               terms.compiled_layer_passes, terms.recomputed_layer_passes, terms.tensor_visits, terms.module_passes]
        slow = terms.misaligned_flops / peak / start["misaligned_gemm_efficiency"]
        weight = 1 / run.measured_step_s
        rows.append([x * weight for x in row])
        targets.append((run.measured_step_s - terms.fixed_s - slow) * weight)
    fixed = {i: 0.0 for i in range(len(names)) if not any(row[i] for row in rows)}
    for i in list(fixed):
        fixed[i] = 1 / start["compute_efficiency"] if i == 0 else start[names[i]]
    while True:
        free = [i for i in range(len(names)) if i not in fixed]
        residual = [t - sum(row[i] * v for i, v in fixed.items()) for row, t in zip(rows, targets)]
        solved = dict(zip(free, _solve([[sum(r[i] * r[j] for r in rows) for j in free] for i in free],
                                       [sum(r[i] * x for r, x in zip(rows, residual)) for i in free])))
        negative = [i for i, v in solved.items() if v < 0]
        if not negative:
            break
        fixed.update({i: 0.0 for i in negative})
    coefficients = {**fixed, **solved}
    values = dict(start)
    values["compute_efficiency"] = 1 / coefficients[0]
    for i in range(1, len(names)):
        values[names[i]] = coefficients[i]
    return values


def old_terms(run: TimedRun) -> StepTerms:
    """The run's terms with the offload term at the default rates (no [host] table), as before."""
    return step_terms(run.profile, run.shape, run.plan, dataclasses.replace(run.gpu, host={}), run.accumulation)


def summary(errors: list[float]) -> dict:
    """Median, mean and worst |relative error| and the count."""
    absolute = [abs(e) for e in errors]
    return {"runs": len(errors), "median_abs": round(statistics.median(absolute), 4) if absolute else None,
            "mean_abs": round(statistics.fmean(absolute), 4) if absolute else None,
            "worst_abs": round(max(absolute), 4) if absolute else None}


def committed_rows(runs: list[tuple[str, dict, TimedRun]]) -> list[dict]:
    """The h200_timing runs and every offload run (unsteady ones too, marked: ZeRO-3 with parameter
    offload ran 3 warm-up micro-steps, one short of stepfit.steady) under the committed constants: main's additive
    model (MAIN_CONSTANTS, offload at the PCIe figure) against the profiles' constants now, and,
    for offload runs, the term at the Adam kernel's measured rate (cpu_adam_kernel_elems_per_s)."""
    rows = []
    for sweep, record, run in runs:
        offload = run.plan.offload_optimizer != "none" or run.plan.offload_params != "none"
        if sweep not in HELD_OUT_SWEEPS and not (offload and sweep in OFFLOAD_SWEEPS):
            continue
        before = additive_seconds(old_terms(run), run.gpu, {**constants(run.gpu), **MAIN_CONSTANTS})
        after = seconds_of(run.terms(), run.gpu, constants(run.gpu))
        row = {"sweep": sweep, "label": run.label, "timing": record["spec"].get("timing", "sync"), "offload": offload,
               "steady": steady(record),
               "measured_s": round(run.measured_step_s, 4), "main_s": round(before, 4), "now_s": round(after, 4),
               "main_error": round(before / run.measured_step_s - 1, 4),
               "now_error": round(after / run.measured_step_s - 1, 4)}
        kernel_rate = run.gpu.host.get("cpu_adam_kernel_elems_per_s")
        if offload and kernel_rate:
            gpu = dataclasses.replace(run.gpu, host={**run.gpu.host, "cpu_adam_elems_per_s": kernel_rate})
            kernel = seconds_of(step_terms(run.profile, run.shape, run.plan, gpu, run.accumulation), gpu, constants(gpu))
            row["adam_kernel_rate_error"] = round(kernel / run.measured_step_s - 1, 4)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reports", type=Path, default=Path("reports"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    runs = load_runs(args.reports)
    fit_half = [run for sweep, record, run in runs
                if sweep not in HELD_OUT_SWEEPS and in_fit_half(record) and calibratable(run)]
    held = [(sweep, record, run) for sweep, record, run in runs if sweep in HELD_OUT_SWEEPS or not in_fit_half(record)]
    start = constants(load_gpu("h100"))
    old_values = fit_additive(fit_half, start)
    new_values = fit(fit_half, load_gpu("h100"))
    rows = []
    for sweep, record, run in held:
        old = additive_seconds(old_terms(run), run.gpu, old_values)
        new = seconds_of(run.terms(), run.gpu, new_values)
        rows.append({"sweep": sweep, "point_id": RunSpec.from_dict(record["spec"]).point_id(), "label": run.label,
                     "gpu": run.gpu.name, "stage": run.plan.stage, "timing": record["spec"].get("timing", "sync"),
                     "offload": run.plan.offload_optimizer != "none" or run.plan.offload_params != "none",
                     "measured_s": round(run.measured_step_s, 4), "additive_s": round(old, 4),
                     "overlap_s": round(new, 4), "additive_error": round(old / run.measured_step_s - 1, 4),
                     "overlap_error": round(new / run.measured_step_s - 1, 4)})
    plain = [r for r in rows if not r["offload"] and r["sweep"] not in HELD_OUT_SWEEPS]
    per_stage = {}
    for stage in sorted({r["stage"] for r in plain}):
        chosen = [r for r in plain if r["stage"] == stage]
        per_stage[str(stage)] = {"additive": summary([r["additive_error"] for r in chosen]),
                                 "overlap": summary([r["overlap_error"] for r in chosen])}
    per_stage["all"] = {"additive": summary([r["additive_error"] for r in plain]),
                        "overlap": summary([r["overlap_error"] for r in plain])}
    offload = [r for r in rows if r["offload"]]
    result = {"split": "fit half: first byte of sha256(point id) even; reports/h200_timing held out entirely",
              "fit_runs": len(fit_half), "held_out_runs": len(rows),
              "additive_constants": {k: round(v, 7) for k, v in old_values.items()},
              "overlap_constants": new_values, "held_out_per_stage": per_stage,
              "offload": {"additive": summary([r["additive_error"] for r in offload]),
                          "overlap": summary([r["overlap_error"] for r in offload])},
              "committed": committed_rows(load_runs(args.reports, steady_only=False)), "rows": rows}
    write_atomic(args.out, json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("rows", "committed")}, indent=1))
    for r in rows:
        print(f"{r['sweep']:22s} {r['timing']:4s} z{r['stage']} {r['label'][:58]:58s} {r['measured_s']:7.3f} "
              f"{r['additive_s']:7.3f} {r['additive_error']:+.3f} {r['overlap_s']:7.3f} {r['overlap_error']:+.3f}")
    print("committed constants (main -> now):")
    for r in result["committed"]:
        print(f"{r['sweep']:22s} {r['timing']:4s} {r['label'][:58]:58s} {r['measured_s']:7.3f} {r['main_s']:7.3f} "
              f"{r['main_error']:+.3f} {r['now_s']:7.3f} {r['now_error']:+.3f} {r.get('adam_kernel_rate_error', '')}")


if __name__ == "__main__":
    main()
