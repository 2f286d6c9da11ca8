"""Device constants measured from a user's own benchmark runs (`zeroplan bench` results).

Four numbers depend on the GPU, driver and PyTorch build rather than on the model, and no
datasheet gives them. Each is read off the runs by one rule:

- cuda_context_bytes: NVML's peak 'used' minus torch's peak reserved (the CUDA context, NCCL and
  cuBLAS workspaces that torch's allocator does not see), the median over runs;
- compute_efficiency, layer_overhead_s, stage3_module_overhead_s: a least-squares fit of the
  measured step times to  step = FLOPs / (peak · efficiency) + layers · layer_overhead
  + partitioned modules · stage3_module_overhead  (zeroplan.steptime's terms).

The reserved memory above the allocated one is not a constant: zeroplan.memory replays the
caching allocator's rules (zeroplan.allocator) over the run's allocations. Calibration checks that
replay on the user's runs and records its median and worst relative error
(allocator_replay_median_error, allocator_replay_worst_error): large values mean this PyTorch
build allocates differently (e.g. `expandable_segments`), not a factor to multiply by; estimates
do not read them.

Only single-GPU runs that finished (status ok) without offload are used for the step-time fit.
Pure Python: the 3×3 normal equations are solved by hand.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, replace

from zeroplan.errors import InvalidInput
from zeroplan.flops import backward_factors, shape_flops
from zeroplan.plan import Plan, TrainShape
from zeroplan.profiles import GPUProfile, load_model
from zeroplan.records import gradient_accumulation, record_profile, record_shape, spec_shape, step_tiles

@dataclass(frozen=True)
class RunPoint:
    """What calibration needs from one result line: the shape it really ran (tiles of its largest
    micro-batch; zeroplan.records), the spec's shape for the step-time fit, each step's tiles and
    the micro-steps per step for the memory replay."""

    shape: TrainShape
    plan: Plan
    model: str
    step_time_s: float
    peak_allocated_bytes: int
    peak_reserved_bytes: int
    nvml_used_bytes: int | None
    spec_shape: TrainShape | None = None
    step_tiles: tuple[int, ...] | None = None
    gradient_accumulation: int = 1
    vocab_multiple: int = 1
    compiled: bool = False


def points_from_records(records: list[dict]) -> list[RunPoint]:
    """The usable lines of a results file (status ok, measured on a GPU)."""
    from zeroplan.dsconfig import tuned_plan

    points = []
    for record in records:
        spec = record.get("spec") or {}
        if record.get("status") != "ok" or not record.get("measured_peak_allocated_bytes") or not spec:
            continue
        profile = record_profile(record)
        shape = record_shape(record)
        plan = tuned_plan(profile, shape, Plan(stage=spec["stage"], gpus_per_node=spec.get("world_size", 1),
                                               offload_optimizer=spec.get("offload_optimizer", "none"),
                                               offload_params=spec.get("offload_params", "none")))
        points.append(RunPoint(shape, plan, record["model"], float(record["step_time_s"]),
                               int(record["measured_peak_allocated_bytes"]),
                               int(record["measured_peak_reserved_bytes"]), record.get("nvml_peak_used_bytes"),
                               spec_shape(record), step_tiles(record), gradient_accumulation(record),
                               int(spec.get("vocab_multiple", 1)), bool(spec.get("compile", False))))
    return points


def _solve3(matrix: list[list[float]], vector: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting for a 3×3 system."""
    rows = [row[:] + [value] for row, value in zip(matrix, vector)]
    size = len(rows)
    for column in range(size):
        pivot = max(range(column, size), key=lambda r: abs(rows[r][column]))
        if abs(rows[pivot][column]) < 1e-300:
            raise InvalidInput("the runs cannot separate the step-time terms: add runs of other models/stages")
        rows[column], rows[pivot] = rows[pivot], rows[column]
        for other in range(size):
            if other != column:
                factor = rows[other][column] / rows[column][column]
                rows[other] = [a - factor * b for a, b in zip(rows[other], rows[column])]
    return [rows[i][size] / rows[i][i] for i in range(size)]


def step_features(point: RunPoint, gpu: GPUProfile) -> list[float]:
    """(compute seconds at 100 % of peak, layer count, partitioned modules) of one micro-step."""
    from zeroplan.steptime import partitioned_module_count

    profile = load_model(point.model)
    shape = point.spec_shape or point.shape
    flops = shape_flops(profile, shape)
    factors = backward_factors(shape)
    recompute = 0
    if shape.grad_ckpt:
        recompute = (flops.llm_forward if factors["llm"] else 0) + (flops.vision_forward if factors["vision"] == 2 else 0)
    modules = partitioned_module_count(profile, point.plan) if point.plan.stage == 3 else 0
    return [(flops.total + recompute) / (gpu.bf16_dense_tflops * 1e12),
            float(profile.vision.num_layers + profile.llm.num_layers), float(modules)]


def fit_step_time(points: list[RunPoint], gpu: GPUProfile) -> dict[str, float]:
    """Least-squares step-time constants over single-GPU runs without offload."""
    usable = [p for p in points if p.plan.world_size == 1 and p.plan.offload_optimizer == "none"]
    if len(usable) < 4 or not any(p.plan.stage == 3 for p in usable) or not any(p.plan.stage < 3 for p in usable):
        raise InvalidInput("calibration needs at least 4 finished single-GPU runs, some under ZeRO-3 and some "
                           "under ZeRO-0/1/2 (benchmarks/calibrate.toml is such a sweep)")
    rows = [step_features(p, gpu) for p in usable]
    times = [p.step_time_s for p in usable]
    normal = [[sum(r[i] * r[j] for r in rows) for j in range(3)] for i in range(3)]
    rhs = [sum(r[i] * t for r, t in zip(rows, times)) for i in range(3)]
    inverse_efficiency, layer_overhead, module_overhead = _solve3(normal, rhs)
    if inverse_efficiency <= 1:
        raise InvalidInput("the fitted compute efficiency is above 100 %: the runs are too few or too noisy")
    return {"compute_efficiency": round(1 / inverse_efficiency, 4),
            "layer_overhead_s": round(max(layer_overhead, 0.0), 6),
            "stage3_module_overhead_s": round(max(module_overhead, 0.0), 7)}


def fit_memory(points: list[RunPoint], gpu: GPUProfile) -> dict[str, float | int]:
    """The CUDA context (median over the runs), and the allocator replay's error on the runs'
    reserved peaks as a check (see the module docstring)."""
    from zeroplan.memory import estimate
    from zeroplan.runner.fast import padded_profile

    if not points:
        raise InvalidInput("no finished GPU run in the results: nothing to calibrate from")
    out: dict[str, float | int] = {}
    contexts = [p.nvml_used_bytes - p.peak_reserved_bytes for p in points if p.nvml_used_bytes]
    if contexts:
        out["cuda_context_bytes"] = int(statistics.median(contexts))
    errors = []
    for point in points:
        profile = padded_profile(load_model(point.model), point.vocab_multiple)
        predicted = estimate(profile, point.shape, point.plan, gpu, point.step_tiles,
                             point.gradient_accumulation, point.compiled).peak_reserved
        errors.append(abs(predicted - point.peak_reserved_bytes) / point.peak_reserved_bytes)
    out["allocator_replay_median_error"] = round(statistics.median(errors), 4)
    out["allocator_replay_worst_error"] = round(max(errors), 4)
    return out


def calibrate(records: list[dict], gpu: GPUProfile) -> dict[str, float | int]:
    """Every constant the runs determine, plus how many runs each came from."""
    points = points_from_records(records)
    constants = fit_memory(points, gpu)
    constants.update(fit_step_time(points, gpu))
    constants["runs"] = len(points)
    return constants


def with_constants(gpu: GPUProfile, constants: dict) -> GPUProfile:
    """The profile with its [calibrated] table replaced."""
    return replace(gpu, calibrated=dict(constants))


def calibrated_table(constants: dict, source: str) -> str:
    """The TOML text of a [calibrated] table (numbers and one source string)."""
    lines = ["[calibrated]", f"source = {source!r}".replace("'", '"')]
    for key in sorted(constants):
        value = constants[key]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            lines.append(f"{key} = {value}")
    return "\n".join(lines) + "\n"
