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

import math
import statistics
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path

from zeroplan.core.bounded import read_text_bounded
from zeroplan.core.errors import InvalidInput, ZeroplanError
from zeroplan.core.plan import Plan, TrainShape
from zeroplan.core.profiles import (MAX_PROFILE_BYTES, PROFILES_DIR, GPUProfile, check_calibrated, gpu_from_data,
                                    load_model, match_gpu_name)
from zeroplan.core.run import MAX_STEPS, RunSpec
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


def _whole(value, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _finite(value, low: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= low


# The numbers calibration reads off a finished record: (what each must be, its test).
RECORD_FIELDS = {
    "step_time_s": ("a positive number of seconds", lambda v: _finite(v, 0) and v > 0),
    "measured_peak_allocated_bytes": ("a positive whole number", lambda v: _whole(v, 1)),
    "measured_peak_reserved_bytes": ("a positive whole number", lambda v: _whole(v, 1)),
    "nvml_peak_used_bytes": ("a whole number >= 0", lambda v: _whole(v, 0)),
    "tiles_per_sample": ("a number >= 0", lambda v: _finite(v, 0)),
}


def check_record(record: dict) -> None:
    """Refuse, with one line naming the point and the field, a finished (status ok) record that
    calibration would read and that is not what `zeroplan bench` writes: a spec that is not a
    valid RunSpec, numbers that are missing, null, strings, zero or not finite, step tiles that
    are not a list of whole numbers. Records that did not finish are not read, so not checked."""
    if not isinstance(record, dict) or record.get("status") != "ok":
        return
    where = f"result {str(record.get('point_id'))[:40]}"
    spec = record.get("spec")
    if spec is None:
        return
    if not isinstance(spec, dict):
        raise InvalidInput(f"{where}: 'spec' must be an object (a RunSpec), got {type(spec).__name__}")
    try:
        RunSpec.from_dict(spec)
    except (InvalidInput, TypeError, ValueError) as error:
        raise InvalidInput(f"{where}: its spec is not a valid run: {' '.join(str(error).split())[:200]}") from None
    if not isinstance(record.get("model"), str):
        raise InvalidInput(f"{where}: 'model' must be a profile name, got {record.get('model')!r:.60}")
    for key, (what, test) in RECORD_FIELDS.items():
        value = record.get(key)
        measured = record.get("measured_peak_allocated_bytes") is not None  # a GPU run: it has all three
        rehearsed = bool(spec.get("simulate_world"))  # a rehearsed rank has no real step time
        optional = key in ("nvml_peak_used_bytes", "tiles_per_sample") or (
            key in ("measured_peak_reserved_bytes", "step_time_s") and not measured) or (
            key == "step_time_s" and rehearsed)
        if value is None and (optional or key == "measured_peak_allocated_bytes"):
            continue
        if not test(value):
            raise InvalidInput(f"{where}: '{key}' must be {what}, got {value!r:.60}")
    tiles = record.get("step_tiles")
    if tiles is not None and (not isinstance(tiles, list) or len(tiles) > MAX_STEPS
                              or not all(_whole(t, 0) for t in tiles)):
        raise InvalidInput(f"{where}: 'step_tiles' must be a list of whole numbers >= 0")


# The allocator replay walks every step it is given; zeroplan's runs measure 10 steps or fewer.
# A longer run is replayed over its first steps and its largest one (where the peak follows),
# so a run of 10^5 steps costs what one of 16 does.
MAX_REPLAYED_STEPS = 16


def replayed_steps(tiles: tuple[int, ...] | None) -> tuple[int, ...] | None:
    """A run's step tiles bounded for the replay: all of them up to MAX_REPLAYED_STEPS, else the
    first ones with the largest step last."""
    if tiles is None or len(tiles) <= MAX_REPLAYED_STEPS:
        return tiles
    head = tiles[:MAX_REPLAYED_STEPS - 1]
    return head + (max(tiles),)


def points_from_records(records: list[dict]) -> list[RunPoint]:
    """The usable lines of a results file (status ok, measured on a GPU)."""
    from zeroplan.core.tuning import tuned_plan

    points = []
    for record in records:
        check_record(record)
        spec = record.get("spec") or {}
        if record.get("status") != "ok" or not record.get("measured_peak_allocated_bytes") or not spec:
            continue
        if spec.get("simulate_world"):  # rehearsed: no communication in its step, never fitted
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
                               spec_shape(record), replayed_steps(step_tiles(record)), gradient_accumulation(record),
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
    # NVML's 'used' below torch's reserved is a broken reading (another process, a counter
    # reset), not a negative context: such runs are left out.
    contexts = [p.nvml_used_bytes - p.peak_reserved_bytes for p in points
                if p.nvml_used_bytes and p.nvml_used_bytes > p.peak_reserved_bytes]
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
    device than `gpu` are refused, naming both (a fit across devices would be meaningless); constants
    outside the range a GPU profile accepts (core.profiles.CALIBRATED_RANGES) are refused, so what
    calibrate writes always loads."""
    check_devices(records, gpu)
    points = points_from_records(records)
    constants = fit_memory(points, gpu)
    constants.update(fit_step_constants(records, gpu))
    constants["runs"] = len(points)
    try:
        check_calibrated(constants, gpu.memory_bytes, "the measured constants")
    except ZeroplanError as error:
        raise InvalidInput(f"{error}; the runs do not determine usable constants") from None
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


def toml_string(text: str) -> str:
    """`text` as a TOML basic string: quotes, backslashes and control characters escaped."""
    escapes = {"\\": "\\\\", '"': '\\"', "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}
    out = []
    for char in text:
        if char in escapes:
            out.append(escapes[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F or 0xD800 <= ord(char) <= 0xDFFF:
            out.append(f"\\u{ord(char):04X}" if ord(char) < 0xD800 else "\\uFFFD")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    return repr(value)


def calibrated_table(constants: dict, source: str) -> str:
    """The TOML text of a [calibrated] table (finite numbers and one source string)."""
    lines = ["[calibrated]", f"source = {toml_string(source)}"]
    for key in sorted(constants):
        value = constants[key]
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            lines.append(f"{key} = {value!r}")
    return "\n".join(lines) + "\n"


GPU_FIELDS = ("name", "aliases", "memory_bytes", "bf16_dense_tflops", "hbm_bandwidth_gbps", "intra_node_link",
              "intra_node_bandwidth_gbps", "inter_node_bandwidth_gbps", "pcie_bandwidth_gbps", "cuda_context_bytes",
              "source")


def _base_text(gpu: GPUProfile) -> str | None:
    """The TOML file the profile was loaded from (its comments cite sources), without its
    [calibrated] table; None when it cannot be found or is JSON. A bundled profile's path is
    relative to the package's parent, not to the folder calibrate runs in."""
    path = Path(gpu.path) if gpu.path else None
    if path is None or path.suffix != ".toml":
        return None
    for candidate in (path, PROFILES_DIR.parent.parent / path):
        try:
            if candidate.is_file():
                text = read_text_bounded(candidate, MAX_PROFILE_BYTES, "GPU profile")
                break
        except (OSError, ValueError, ZeroplanError):
            return None
    else:
        return None
    kept, inside = [], False
    for line in text.splitlines():
        header = line.strip()
        if header.startswith("["):
            inside = header.replace(" ", "") == "[calibrated]"
        if not inside:
            kept.append(line)
    return "\n".join(kept).rstrip("\n")


def _loads_as_gpu(text: str, where: str) -> bool:
    try:
        gpu_from_data(tomllib.loads(text), where)
    except (ValueError, RecursionError, ZeroplanError):
        return False
    return True


def profile_text(gpu: GPUProfile, constants: dict, source: str) -> str:
    """A whole GPU profile (TOML) with the calibrated constants: the file it came from (comments
    kept) with its [calibrated] table replaced, or, where that file cannot be used, the profile's
    fields written out. Either way the text is checked to load as a GPU profile."""
    table = calibrated_table(constants, source)
    base = _base_text(gpu)
    if base is not None and _loads_as_gpu(base + "\n\n" + table, gpu.name):
        return base + "\n\n" + table
    fields = "\n".join(f"{key} = {_toml_value(getattr(gpu, key))}" for key in GPU_FIELDS)
    text = fields + "\n\n" + table
    if not _loads_as_gpu(text, gpu.name):
        raise InvalidInput(f"the calibrated profile of {gpu.name} does not load back; nothing written")
    return text
