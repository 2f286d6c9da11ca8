"""Device constants measured from a user's own benchmark runs (`zeroplan bench` results).

Four numbers depend on the GPU, driver and PyTorch build rather than on the model, and no
datasheet gives them. Each is read off the runs by one rule:

- cuda_context_bytes: NVML's peak 'used' minus torch's peak reserved (the CUDA context, NCCL and
  cuBLAS workspaces that torch's allocator does not see), the median over runs;
- the step-time constants (compute_efficiency, layer_overhead_s, compiled_layer_overhead_s,
  recompute_layer_overhead_s, step_tensor_overhead_s, stage3_module_overhead_s): a non-negative
  least-squares fit of the measured step times to zeroplan.core.steptime's terms (zeroplan.lab.stepfit).

The reserved memory above the allocated one is not a constant: zeroplan.core.memory replays the
caching allocator's rules (zeroplan.core.allocator) over the run's allocations. Calibration checks that
replay on the user's runs and records its median and worst relative error
(allocator_replay_median_error, allocator_replay_worst_error): large values mean this PyTorch
build allocates differently (e.g. `expandable_segments`), not a factor to multiply by; estimates
do not read them.

Only single-GPU runs that finished (status ok) without offload are used for the step-time fit.
Pure Python.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, replace

from zeroplan.core.errors import InvalidInput
from zeroplan.core.plan import Plan, TrainShape
from zeroplan.core.profiles import GPUProfile, load_model, match_gpu_name
from zeroplan.lab.records import gradient_accumulation, record_profile, record_shape, spec_shape, step_tiles

@dataclass(frozen=True)
class RunPoint:
    """What calibration needs from one result line: the shape it really ran (tiles of its largest
    micro-batch; zeroplan.lab.records), the spec's shape for the step-time fit, each step's tiles and
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
    from zeroplan.core.tuning import tuned_plan

    points = []
    for record in records:
        spec = record.get("spec") or {}
        if record.get("status") != "ok" or not record.get("measured_peak_allocated_bytes") or not spec:
            continue
        profile = record_profile(record)
        shape = record_shape(record)
        plan = tuned_plan(profile, shape, Plan(stage=spec["stage"], gpus_per_node=spec.get("world_size", 1),
                                               offload_optimizer=spec.get("offload_optimizer", "none"),
                                               offload_params=spec.get("offload_params", "none"),
                                               optimizer_group_elems=spec.get("optimizer_group_elems", 0)))
        points.append(RunPoint(shape, plan, record["model"], float(record["step_time_s"]),
                               int(record["measured_peak_allocated_bytes"]),
                               int(record["measured_peak_reserved_bytes"]), record.get("nvml_peak_used_bytes"),
                               spec_shape(record), step_tiles(record), gradient_accumulation(record),
                               int(spec.get("vocab_multiple", 1)), bool(spec.get("compile", False))))
    return points


def fit_memory(points: list[RunPoint], gpu: GPUProfile) -> dict[str, float | int]:
    """The CUDA context (median over the runs), and the allocator replay's error on the runs'
    reserved peaks as a check (see the module docstring)."""
    from zeroplan.core.memory import estimate
    from zeroplan.core.profiles import pad_vocab

    if not points:
        raise InvalidInput("no finished GPU run in the results: nothing to calibrate from")
    out: dict[str, float | int] = {}
    contexts = [p.nvml_used_bytes - p.peak_reserved_bytes for p in points if p.nvml_used_bytes]
    if contexts:
        out["cuda_context_bytes"] = int(statistics.median(contexts))
    errors = []
    for point in points:
        profile = pad_vocab(load_model(point.model), point.vocab_multiple)
        predicted = estimate(profile, point.shape, point.plan, gpu, point.step_tiles,
                             point.gradient_accumulation, point.compiled).peak_reserved
        errors.append(abs(predicted - point.peak_reserved_bytes) / point.peak_reserved_bytes)
    out["allocator_replay_median_error"] = round(statistics.median(errors), 4)
    out["allocator_replay_worst_error"] = round(max(errors), 4)
    return out


def calibrate(records: list[dict], gpu: GPUProfile) -> dict[str, float | int]:
    """Every constant the runs determine, plus how many runs each came from. Runs made on another
    device than `gpu` are refused, naming both (a fit across devices would be meaningless)."""
    check_devices(records, gpu)
    points = points_from_records(records)
    constants = fit_memory(points, gpu)
    constants.update(fit_step_constants(records, gpu))
    constants["runs"] = len(points)
    return constants


def check_devices(records: list[dict], gpu: GPUProfile) -> None:
    """Raise InvalidInput when a finished run's recorded device is a different GPU model than `gpu`
    (e.g. H100 runs calibrated with --gpu a100-80gb)."""
    others = set()
    for record in records:
        device = record.get("device")
        if record.get("status") != "ok" or not isinstance(device, str) or not device.strip():
            continue
        matched = match_gpu_name(device)
        if matched is not None and matched.name != gpu.name:
            others.add((device.strip()[:80], matched.path.rsplit("/", 1)[-1].removesuffix(".toml")))
    if others:
        device, stem = sorted(others)[0]
        raise InvalidInput(f"the runs were made on {device}, not on {gpu.name} (--gpu): calibrate them with "
                           f"--gpu {stem}, or give the results of runs on a {gpu.name}")


def fit_step_constants(records: list[dict], gpu: GPUProfile) -> dict[str, float]:
    """The step-time constants fitted to the finished single-GPU runs without offload (ZeRO-3 with
    compiled layers left out: zeroplan never plans it, its hooks split the compiled graphs; ZeRO-3
    runs timed before they were steady left out too: zeroplan.lab.stepfit.steady)."""
    from zeroplan.lab.stepfit import fit, steady, timed_run

    runs = []
    for record in records:
        run = timed_run(record, gpu) if steady(record) else None
        if (run is not None and run.plan.world_size == 1 and run.plan.offload_optimizer == "none"
                and not (run.plan.stage == 3 and run.shape.compiled)):
            runs.append(run)
    return fit(runs, gpu)


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
