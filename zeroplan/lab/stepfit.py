"""Fit the step-time model's per-GPU constants to measured runs (used by `zeroplan calibrate`).

Every term of zeroplan.core.steptime is a measured quantity (FLOPs, layer passes, tensor visits, module
passes) times one constant of the GPU and its software stack. The step is the larger of the GPU's
time and the host's time for the passes, plus the serial parts (zeroplan.core.steptime.seconds_of),
so each run's time is linear in the constants once it is known which side bounds it: the GPU side
in (1/compute_efficiency, layer_gpu_s), the host side in (layer_overhead_s,
compiled_layer_overhead_s, recompute_layer_overhead_s, stage3_module_overhead_s and
step_tensor_overhead_s for ZeRO-2's hooks), the serial side in step_tensor_overhead_s. The fit
alternates: label every run GPU- or host-bound under the current constants, solve the non-negative
least squares of the relative step-time error (a long accumulated step and a short one count alike)
for those labels, relabel, until the labels stop changing (or 20 rounds, keeping the best). A
constant no run's active side exercises keeps the GPU profile's current value.
misaligned_gemm_efficiency is not fitted: it is the measured speed of cuBLAS's fallback kernels (a
kernel profile), kept from the GPU profile.
Pure Python: no torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from zeroplan.core.tuning import tuned_plan
from zeroplan.core.errors import InvalidInput
from zeroplan.core.plan import Plan, TrainShape
from zeroplan.core.profiles import GPUProfile, ModelProfile, load_gpu, load_model, pad_vocab
from zeroplan.core.steptime import StepTerms, constants, gpu_seconds, host_seconds, seconds_of, step_terms

NAMES = ("compute_efficiency", "misaligned_gemm_efficiency", "layer_overhead_s", "compiled_layer_overhead_s",
         "recompute_layer_overhead_s", "step_tensor_overhead_s", "stage3_module_overhead_s", "layer_gpu_s")
MAX_LABEL_ROUNDS = 20


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


def _features(run: TimedRun, values: dict[str, float], host_bound: bool) -> tuple[list[float], float]:
    """The run's row (what each fitted constant multiplies, on the side that bounds it plus the
    serial side) and target (measured seconds less the terms no fitted constant scales: memory-bound
    work on the GPU side, communication, offload and Adam, and the LM head's products on the
    fallback kernels, whose speed is measured, not fitted)."""
    terms, peak = run.terms(), run.gpu.bf16_dense_tflops * 1e12
    boundary_visits = terms.tensor_visits - terms.hook_tensor_visits
    serial_known = terms.fixed_s - terms.memory_bound_s
    if host_bound:
        row = [0.0, 0.0, terms.eager_layer_passes, terms.compiled_layer_passes, terms.recomputed_layer_passes,
               terms.tensor_visits, terms.module_passes, 0.0]
        return row, run.measured_step_s - serial_known
    row = [(terms.compute_flops - terms.misaligned_flops) / peak, 0.0, 0.0, 0.0, 0.0, boundary_visits, 0.0,
           terms.eager_layer_passes]
    slow = terms.misaligned_flops / peak / values["misaligned_gemm_efficiency"]
    return row, run.measured_step_s - serial_known - terms.memory_bound_s - slow


def _host_bound(run: TimedRun, values: dict[str, float]) -> bool:
    terms = run.terms()
    return host_seconds(terms, values) > gpu_seconds(terms, run.gpu, values)


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
    """Fit the constants to `runs` (all on one GPU kind) by alternating the runs' GPU- or host-bound
    labels and a non-negative least squares of the relative step-time error; returns the eight
    constants (unexercised ones kept from `gpu`)."""
    if len(runs) < 3:
        raise InvalidInput(f"fitting the step-time model needs at least 3 finished runs, got {len(runs)}")
    start = constants(gpu)
    values = dict(start)
    labels = [_host_bound(run, values) for run in runs]
    best: tuple[float, dict[str, float]] | None = None
    for _ in range(MAX_LABEL_ROUNDS):
        values = _fit_labelled(runs, labels, start)
        loss = sum((predicted_step_s(run, values) / run.measured_step_s - 1) ** 2 for run in runs)
        if best is None or loss < best[0]:
            best = (loss, values)
        relabelled = [_host_bound(run, values) for run in runs]
        if relabelled == labels:
            break
        labels = relabelled
    return best[1]


def _fit_labelled(runs: list[TimedRun], labels: list[bool], start: dict[str, float]) -> dict[str, float]:
    """Non-negative least squares of the relative error with each run's bounding side given."""
    current = dict(start)
    rows, targets = [], []
    for run, host_bound in zip(runs, labels):
        row, target = _features(run, current, host_bound)
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
            values["step_tensor_overhead_s"], values["stage3_module_overhead_s"], values["layer_gpu_s"]]


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
