"""Fit the step-time model's per-GPU constants to measured runs (used by `zeroplan calibrate`).

Every term of zeroplan.core.steptime is a measured quantity (FLOPs, layer passes, tensor visits, module
passes) times one constant of the GPU and its software stack. The step is the power mean of order
`overlap_exponent` of the GPU's and the host's time for the passes, plus the serial parts
(zeroplan.core.steptime.seconds_of), so it is not linear in the constants. The fit minimises the
sum of squared relative step-time errors (a long accumulated step and a short one count alike) with
a Nelder-Mead search over the non-negative constants (compute efficiency, the GPU-side and host-side
per-layer costs, the per-tensor and per-module costs), once for each exponent of OVERLAP_EXPONENTS,
and keeps the exponent and constants with the smallest error. It starts from the GPU profile's
constants and restarts from its best point, so the result is deterministic. A constant no run
exercises (no compiled run, no ZeRO-3 run, no ZeRO-2 run) keeps the GPU profile's current value.
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
from zeroplan.core.steptime import StepTerms, constants, seconds_of, step_terms

FITTED = ("compute_efficiency", "layer_gpu_s", "layer_overhead_s", "compiled_layer_overhead_s",
          "recompute_layer_overhead_s", "step_tensor_overhead_s", "stage3_module_overhead_s", "grad_hook_overhead_s")
NAMES = (*FITTED, "misaligned_gemm_efficiency", "overlap_exponent")
# 1 adds host and GPU time; 64 is within 1.1 % of taking the larger (2 ** (1 / 64) = 1.011).
OVERLAP_EXPONENTS = (1.0, 2.0, 4.0, 8.0, 64.0)
SEARCH_ROUNDS = 3
SEARCH_STEPS = 1500


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
    """Fit the constants to `runs` (all on one GPU kind): for each overlap exponent a Nelder-Mead
    search of the squared relative step-time error; returns every constant of
    zeroplan.core.steptime.constants (unexercised ones and misaligned_gemm_efficiency kept from `gpu`)."""
    if len(runs) < 3:
        raise InvalidInput(f"fitting the step-time model needs at least 3 finished runs, got {len(runs)}")
    current = constants(gpu)
    terms = [(run.terms(), run.gpu, run.measured_step_s) for run in runs]
    exercised = _exercised(terms)
    best: tuple[float, dict[str, float]] | None = None
    for exponent in OVERLAP_EXPONENTS:
        base = {**current, "overlap_exponent": exponent}
        free = [name for name in FITTED if exercised[name]]

        def loss(point: list[float], base=base, free=free) -> float:
            values = _with(base, free, point)
            if values["compute_efficiency"] >= 1:
                return float("inf")
            return sum((seconds_of(t, g, values) / measured - 1) ** 2 for t, g, measured in terms)

        point = [_coordinate(name, base[name]) for name in free]
        for _ in range(SEARCH_ROUNDS):
            point = _nelder_mead(loss, point, SEARCH_STEPS)
        error = loss(point)
        if best is None or error < best[0]:
            best = (error, _with(base, free, point))
    if best is None or best[0] == float("inf"):
        raise InvalidInput("the fitted compute efficiency is above 100 %: the runs are too few or too noisy")
    return _rounded(best[1])


def _exercised(terms: list[tuple[StepTerms, GPUProfile, float]]) -> dict[str, bool]:
    """Which constants some run's terms multiply (the others cannot be fitted)."""
    def any_of(field: str) -> bool:
        return any(getattr(t, field) for t, _, _ in terms)

    return {"compute_efficiency": True, "layer_gpu_s": any_of("eager_layer_passes"),
            "layer_overhead_s": any_of("eager_layer_passes"), "compiled_layer_overhead_s": any_of("compiled_layer_passes"),
            "recompute_layer_overhead_s": any_of("recomputed_layer_passes"),
            "step_tensor_overhead_s": any(t.tensor_visits > t.hook_tensor_visits for t, _, _ in terms),
            "stage3_module_overhead_s": any_of("module_passes"), "grad_hook_overhead_s": any_of("hook_tensor_visits")}


def _coordinate(name: str, value: float) -> float:
    """The search coordinate of a constant: 1/efficiency for the compute efficiency (what the time
    is linear in), the value itself for the per-item costs."""
    return 1 / value if name == "compute_efficiency" else value


def _with(base: dict[str, float], free: list[str], point: list[float]) -> dict[str, float]:
    """The constants at a search point; a coordinate below zero counts as its absolute value, which
    keeps every cost non-negative without bounds in the search."""
    values = dict(base)
    for name, x in zip(free, point):
        values[name] = 1 / abs(x) if name == "compute_efficiency" else abs(x)
    return values


def _nelder_mead(loss, start: list[float], steps: int) -> list[float]:
    """Nelder-Mead simplex search (reflection 1, expansion 2, contraction and shrink 1/2) from
    `start`, its first simplex 30 % along each coordinate (1e-4 for a zero one)."""
    n = len(start)
    simplex = [list(start)] + [[x * 1.3 if j == i and x else (1e-4 if j == i else x) for j, x in enumerate(start)]
                               for i in range(n)]
    values = [loss(p) for p in simplex]
    for _ in range(steps):
        order = sorted(range(n + 1), key=lambda i: values[i])
        simplex, values = [simplex[i] for i in order], [values[i] for i in order]
        centre = [sum(p[j] for p in simplex[:-1]) / n for j in range(n)]
        reflected = [c + (c - w) for c, w in zip(centre, simplex[-1])]
        fr = loss(reflected)
        if fr < values[0]:
            expanded = [c + 2 * (c - w) for c, w in zip(centre, simplex[-1])]
            fe = loss(expanded)
            simplex[-1], values[-1] = (expanded, fe) if fe < fr else (reflected, fr)
        elif fr < values[-2]:
            simplex[-1], values[-1] = reflected, fr
        else:
            contracted = [c + 0.5 * (w - c) for c, w in zip(centre, simplex[-1])]
            fc = loss(contracted)
            if fc < values[-1]:
                simplex[-1], values[-1] = contracted, fc
            else:
                simplex = [simplex[0]] + [[b + 0.5 * (x - b) for b, x in zip(simplex[0], p)] for p in simplex[1:]]
                values = [values[0]] + [loss(p) for p in simplex[1:]]
    return simplex[min(range(n + 1), key=lambda i: values[i])]


def _rounded(values: dict[str, float]) -> dict[str, float]:
    """Constants as the profile's [calibrated] table writes them."""
    return {name: round(value, 4) if name in ("compute_efficiency", "overlap_exponent") else
            (value if name == "misaligned_gemm_efficiency" else round(value, 7)) for name, value in values.items()}
