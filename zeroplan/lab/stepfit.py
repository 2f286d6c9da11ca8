"""Fit the step-time model's per-GPU constants to measured runs (used by `zeroplan calibrate`).

Every term of zeroplan.core.steptime is a measured quantity (FLOPs, layer passes, tensor visits, module
passes) times one constant of the GPU and its software stack, so the step time is linear in
(1/compute_efficiency, 1/misaligned_gemm_efficiency - 1/compute_efficiency, layer_overhead_s,
compiled_layer_overhead_s, recompute_layer_overhead_s, step_tensor_overhead_s,
stage3_module_overhead_s). The fit is a
non-negative least squares on the relative error of each run's step time (a long accumulated step
and a short one count alike). misaligned_gemm_efficiency is not fitted: it is the measured speed of
cuBLAS's fallback kernels (a kernel profile), kept from the GPU profile. A constant no run exercises (no compiled run, no ZeRO-3 run, no
misaligned vocabulary) keeps the GPU profile's current value instead of being fitted.
Pure Python: no torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from zeroplan.core.tuning import tuned_plan
from zeroplan.core.errors import InvalidInput
from zeroplan.core.plan import Plan, TrainShape
from zeroplan.core.profiles import GPUProfile, ModelProfile, load_gpu, load_model, pad_vocab
from zeroplan.core.steptime import StepTerms, constants, seconds_of, step_terms

NAMES = ("compute_efficiency", "misaligned_gemm_efficiency", "layer_overhead_s", "compiled_layer_overhead_s",
         "recompute_layer_overhead_s", "step_tensor_overhead_s", "stage3_module_overhead_s")


@dataclass(frozen=True)
class TimedRun:
    """One measured run as the step-time model sees it."""

    label: str
    profile: ModelProfile
    shape: TrainShape
    plan: Plan
    gpu: GPUProfile
    accumulation: int
    measured_step_s: float

    def terms(self) -> StepTerms:
        return step_terms(self.profile, self.shape, self.plan, self.gpu, self.accumulation)


def timed_run(record: dict, gpu: GPUProfile | None = None) -> TimedRun | None:
    """The record of a finished runner result as a TimedRun (None if it has no step time)."""
    from zeroplan.core.run import RunSpec

    if record.get("status") != "ok" or not record.get("step_time_s") or not record.get("spec"):
        return None
    spec = RunSpec.from_dict(record["spec"])
    profile = pad_vocab(load_model(spec.model), spec.vocab_multiple)
    shape = spec.shape()
    plan = tuned_plan(profile, shape, spec.plan())
    drawn = record.get("tiles_per_sample")
    if drawn is not None and not spec.packed:
        # Time follows the work done: runs whose samples drew fewer tiles than the maximum did less.
        shape = dataclasses.replace(shape, tiles=max(0, round(float(drawn))))
    gpu = gpu or load_gpu(record.get("gpu_profile") or record.get("device") or "h100")
    from zeroplan.lab.bench import describe

    return TimedRun(describe(spec), profile, shape, plan, gpu, spec.gradient_accumulation, float(record["step_time_s"]))


ZERO3_STEADY_WARMUP_MICRO_STEPS = 4


def steady(record: dict) -> bool:
    """Whether the run's timed steps are steady-state. ZeRO-3's are not until its parameter
    coordinator has traced the modules' order and prefetches by it: the same 2B ZeRO-3 point took
    1.31 s a step after 2 warm-up steps and 0.85 s after 4 (reports/h100_fast_z3,
    reports/h100_z3_steady), so ZeRO-3 runs count once at least 4 micro-steps ran before timing."""
    spec = record.get("spec") or {}
    if spec.get("stage") != 3:
        return True
    return spec.get("warmup_steps", 0) * spec.get("gradient_accumulation", 1) >= ZERO3_STEADY_WARMUP_MICRO_STEPS


def predicted_step_s(run: TimedRun, values: dict[str, float] | None = None) -> float:
    """The model's step time for the run, under `values` (default: the run's GPU profile)."""
    return seconds_of(run.terms(), run.gpu, values or constants(run.gpu))


def _features(run: TimedRun, misaligned_efficiency: float) -> tuple[list[float], float]:
    """The run's row (what each fitted constant multiplies) and target (measured seconds less the
    terms no fitted constant scales: memory-bound work, communication, Adam, and the LM head's
    products on the fallback kernels, whose speed is measured, not fitted)."""
    terms, peak = run.terms(), run.gpu.bf16_dense_tflops * 1e12
    row = [(terms.compute_flops - terms.misaligned_flops) / peak, 0.0, terms.eager_layer_passes,
           terms.compiled_layer_passes, terms.recomputed_layer_passes, terms.tensor_visits, terms.module_passes]
    slow = terms.misaligned_flops / peak / misaligned_efficiency
    return row, run.measured_step_s - terms.fixed_s - slow


def _solve(matrix: list[list[float]], vector: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting (small dense systems)."""
    n = len(vector)
    a = [row[:] + [vector[i]] for i, row in enumerate(matrix)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
        if abs(a[pivot][col]) < 1e-30:
            raise InvalidInput("the runs do not determine the step-time constants (too few or too alike)")
        a[col], a[pivot] = a[pivot], a[col]
        for r in range(n):
            if r != col:
                factor = a[r][col] / a[col][col]
                a[r] = [x - factor * y for x, y in zip(a[r], a[col])]
    return [a[i][n] / a[i][i] for i in range(n)]


def fit(runs: list[TimedRun], gpu: GPUProfile) -> dict[str, float]:
    """Non-negative least squares of the relative step-time error over `runs` (all on one GPU
    kind); returns the seven constants (unexercised ones kept from `gpu`)."""
    if len(runs) < 3:
        raise InvalidInput(f"fitting the step-time model needs at least 3 finished runs, got {len(runs)}")
    current = constants(gpu)
    rows, targets = [], []
    for run in runs:
        row, target = _features(run, current["misaligned_gemm_efficiency"])
        weight = 1.0 / run.measured_step_s
        rows.append([x * weight for x in row])
        targets.append(target * weight)
    fixed = {index for index in range(len(NAMES)) if not any(row[index] for row in rows)}
    while True:
        free = [i for i in range(len(NAMES)) if i not in fixed]
        known = _coefficients(current)
        residual = [t - sum(row[i] * known[i] for i in fixed) for row, t in zip(rows, targets)]
        normal = [[sum(row[i] * row[j] for row in rows) for j in free] for i in free]
        rhs = [sum(row[i] * r for row, r in zip(rows, residual)) for i in free]
        solved = dict(zip(free, _solve(normal, rhs)))
        negative = [i for i, value in solved.items() if value < 0]
        if not negative:
            break
        for i in negative:  # a constant that would go negative is held at zero
            fixed.add(i)
            current = {**current, **_from_coefficient(i, 0.0, current)}
    coefficients = {**{i: _coefficients(current)[i] for i in fixed}, **solved}
    return _values(coefficients, current)


def _coefficients(values: dict[str, float]) -> list[float]:
    inverse = 1 / values["compute_efficiency"]
    return [inverse, 1 / values["misaligned_gemm_efficiency"] - inverse, values["layer_overhead_s"],
            values["compiled_layer_overhead_s"], values["recompute_layer_overhead_s"],
            values["step_tensor_overhead_s"], values["stage3_module_overhead_s"]]


def _from_coefficient(index: int, value: float, current: dict[str, float]) -> dict[str, float]:
    if index == 0:
        return {"compute_efficiency": 1 / value if value > 0 else current["compute_efficiency"]}
    if index == 1:
        return {"misaligned_gemm_efficiency": 1 / (value + 1 / current["compute_efficiency"])}
    return {NAMES[index]: value}


def _values(coefficients: dict[int, float], current: dict[str, float]) -> dict[str, float]:
    if coefficients[0] <= 1:
        raise InvalidInput("the fitted compute efficiency is above 100 %: the runs are too few or too noisy")
    efficiency = 1 / coefficients[0]
    values = {"compute_efficiency": round(efficiency, 4),
              "misaligned_gemm_efficiency": current["misaligned_gemm_efficiency"]}
    for index in range(2, len(NAMES)):
        values[NAMES[index]] = round(coefficients[index], 7)
    return values
