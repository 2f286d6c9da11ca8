"""Measurement beside the training loop: step timing, throughput, FLOPs/MFU, memory peaks, NVML,
versions, and the prediction to compare against. The loop only calls `StepMeter.step(batch)`
around each step; everything else happens before or after it."""

from __future__ import annotations

import contextlib
import platform
import statistics
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

from zeroplan.core.flops import step_flops


@dataclass
class StepRecord:
    """One step as measured on this rank: wall time, what it processed, its model FLOPs."""

    seconds: float
    samples: int
    tiles: int
    text_tokens: int
    image_tokens: int
    flops: int


@dataclass
class StepMeter:
    """Times steps and samples NVML after each.

    Synchronised (the default): each step runs between two CUDA synchronisations, so its time is
    the GPU's. Unsynchronised (`synchronize=False`, an ordinary training loop's conditions): the host
    queues the next step's kernels while the GPU runs this one; steps are timed boundary to boundary
    on the host and `finish()` adds the final synchronisation's wait to the last step, so their sum
    is the wall time of the loop."""

    profile: object
    shape: object
    cuda: bool
    nvml: object = None
    synchronize: bool = True
    records: list[StepRecord] = field(default_factory=list)
    nvml_used_bytes: list[int] = field(default_factory=list)
    # NVML's memory of this process and the allocator's reserved bytes, read together after each
    # step: their difference is what lives outside PyTorch's allocator (CUDA context, NCCL).
    nvml_process_samples: list[tuple[int, int]] = field(default_factory=list)
    # The allocator's reserved bytes after each step (they only grow unless the cache is emptied):
    # which step the reserved peak was reached by.
    reserved_after_step: list[int] = field(default_factory=list)
    steps_peak_allocated_bytes: int | None = None
    _boundary: float | None = None

    @contextlib.contextmanager
    def step(self, batch):
        """Context around one whole step (forward, backward, optimizer step)."""
        if self.synchronize or self._boundary is None:
            self._synchronize()
            self._boundary = time.perf_counter()
        yield
        if self.synchronize:
            self._synchronize()
        now = time.perf_counter()
        seconds, self._boundary = now - self._boundary, now
        flops = step_flops(self.profile, self.shape, batch.tiles, batch.segment_lengths).total
        self.records.append(StepRecord(seconds, batch.samples, batch.tiles, batch.text_tokens, batch.image_tokens, flops))
        if self.cuda:
            import torch

            self.reserved_after_step.append(int(torch.cuda.max_memory_reserved()))
        if self.nvml is not None:
            self.nvml_used_bytes.append(self.nvml.used_bytes())
            own = self.nvml.process_used_bytes()
            if own is not None:
                import torch

                self.nvml_process_samples.append((own, int(torch.cuda.memory_reserved())))

    def finish(self) -> None:
        """After the last step: wait for the GPU and count the wait in the last step's time."""
        if self.synchronize or not self.records:
            return
        self._synchronize()
        self.records[-1].seconds += time.perf_counter() - self._boundary

    def _synchronize(self):
        if self.cuda:
            import torch

            torch.cuda.synchronize()


@dataclass
class PhasePeaks:
    """Peak allocated / reserved bytes of each phase of a step (forward, backward, step), the
    maximum over steps. The allocator's peak counters are reset when a phase starts; they count
    allocations as the host issues them, so no synchronisation is needed. The step's overall peak
    is the largest phase peak, which tells which moment of the step the memory model must get right."""

    cuda: bool
    allocated: dict = field(default_factory=dict)
    reserved: dict = field(default_factory=dict)
    at_start: dict = field(default_factory=dict)
    enabled: bool = True

    @contextlib.contextmanager
    def phase(self, name: str):
        """Context around one phase of a step (nothing is read when disabled)."""
        if not (self.cuda and self.enabled):
            yield
            return
        import torch

        start = int(torch.cuda.memory_allocated())
        torch.cuda.reset_peak_memory_stats()
        yield
        self.allocated[name] = max(self.allocated.get(name, 0), int(torch.cuda.max_memory_allocated()))
        self.reserved[name] = max(self.reserved.get(name, 0), int(torch.cuda.max_memory_reserved()))
        self.at_start[name] = max(self.at_start.get(name, 0), start)

    def as_dict(self) -> dict:
        """Per-phase peaks, for the result JSON."""
        return {"allocated": dict(self.allocated), "reserved": dict(self.reserved),
                "allocated_at_start": dict(self.at_start)}


@dataclass
class StepProfiler:
    """torch.profiler around the last step when ZEROPLAN_PROFILE names a file (rank 0 only):
    the 40 costliest operations by device time and by host time, as text. Off by default."""

    path: str | None = None

    @classmethod
    def from_environment(cls, cuda: bool, rank: int) -> "StepProfiler":
        import os

        target = os.environ.get("ZEROPLAN_PROFILE")
        return cls(target if target and rank == 0 else None)

    @contextlib.contextmanager
    def around(self, active: bool):
        """Profile the block when active and a target file is set."""
        if not (active and self.path):
            yield
            return
        import torch

        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as profile:
            yield
        averages = profile.key_averages()
        device_key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        text = (averages.table(sort_by=device_key, row_limit=40) + "\n\n"
                + averages.table(sort_by="cpu_time_total", row_limit=25))
        with open(self.path, "w", encoding="utf-8") as handle:
            handle.write(text)


EVENT_FIELDS = ("action", "addr", "size", "stream")


def _frames(event: dict, keep: int = 12) -> list[str]:
    """The innermost Python frames of an allocator event, outside torch's own files."""
    frames = [f"{frame.get('filename', '')}:{frame.get('line', '')} {frame.get('name', '')}"
              for frame in event.get("frames") or [] if "/torch/" not in frame.get("filename", "")
              and frame.get("filename", "").endswith(".py")]
    return frames[:keep]


@dataclass
class MemoryHistory:
    """The CUDA caching allocator's own event trace, when ZEROPLAN_MEMORY_HISTORY names a file
    (rank 0 only): torch.cuda.memory._record_memory_history from before the model is built to the
    end of the run, then every allocator event (alloc, free, segment_alloc, segment_free...) with
    its size, address and stream, as gzipped JSON. What zeroplan's allocator replay
    (zeroplan.core.allocator) can be checked against event by event. Off by default (it slows the run)."""

    path: str | None = None

    @classmethod
    def from_environment(cls, cuda: bool, rank: int) -> "MemoryHistory":
        import os

        target = os.environ.get("ZEROPLAN_MEMORY_HISTORY")
        return cls(target if target and cuda and rank == 0 else None)

    def start(self) -> None:
        if self.path:
            import os

            import torch

            stacks = bool(os.environ.get("ZEROPLAN_MEMORY_HISTORY_STACKS"))
            torch.cuda.memory._record_memory_history(enabled="all", context="alloc" if stacks else None,
                                                     stacks="python", max_entries=4_000_000)

    def dump(self) -> None:
        if not self.path:
            return
        import gzip
        import json

        import torch

        snapshot = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        # With ZEROPLAN_MEMORY_HISTORY_STACKS set, allocations of 1 MiB and more keep the innermost
        # Python frames that made them ("file:line function"), to name what the sizes cannot.
        events = [[event.get(key) for key in EVENT_FIELDS]
                  + ([_frames(event)] if event.get("frames") and (event.get("size") or 0) >= 1 << 20 else [])
                  for trace in snapshot.get("device_traces", []) for event in trace]
        with gzip.open(self.path, "wt", encoding="utf-8") as handle:
            json.dump({"fields": list(EVENT_FIELDS), "events": events}, handle)


class Nvml:
    """NVML's view of this rank's GPU (device memory used, driver), when nvidia-ml-py works."""

    def __init__(self, local_rank: int):
        import pynvml

        pynvml.nvmlInit()
        self.pynvml = pynvml
        self.handle = self._handle(local_rank)

    def _handle(self, local_rank: int):
        import torch

        props = torch.cuda.get_device_properties(local_rank)
        if all(hasattr(props, key) for key in ("pci_domain_id", "pci_bus_id", "pci_device_id")):
            bus_id = f"{props.pci_domain_id:08X}:{props.pci_bus_id:02X}:{props.pci_device_id:02X}.0"
            with contextlib.suppress(self.pynvml.NVMLError):
                return self.pynvml.nvmlDeviceGetHandleByPciBusId(bus_id)
        import os

        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        indices = [v for v in visible.split(",") if v.strip().isdigit()]
        index = int(indices[local_rank]) if local_rank < len(indices) else local_rank
        return self.pynvml.nvmlDeviceGetHandleByIndex(index)

    def used_bytes(self) -> int:
        """Memory used on the device right now, every process and the CUDA context included."""
        return int(self.pynvml.nvmlDeviceGetMemoryInfo(self.handle).used)

    def process_used_bytes(self) -> int | None:
        """Device memory this process uses right now (its CUDA context, the allocator's segments and
        anything allocated outside the allocator), or None where the driver does not say: the
        number that stays this run's own when other processes share the GPU."""
        import os

        try:
            running = self.pynvml.nvmlDeviceGetComputeRunningProcesses(self.handle)
        except self.pynvml.NVMLError:
            return None
        for process in running:
            if process.pid == os.getpid():
                used = getattr(process, "usedGpuMemory", None)
                return int(used) if isinstance(used, int) and used >= 0 else None
        return None

    def driver(self) -> str:
        value = self.pynvml.nvmlSystemGetDriverVersion()
        return value.decode() if isinstance(value, bytes) else str(value)


def open_nvml(cuda: bool, local_rank: int) -> Nvml | None:
    """NVML for this rank's GPU, or None on the CPU or without a working nvidia-ml-py."""
    if not cuda:
        return None
    try:
        return Nvml(local_rank)
    except Exception:  # noqa: BLE001 - NVML is optional; any failure just means no NVML numbers
        return None


def combine_ranks(per_rank: list[list[StepRecord]]) -> list[StepRecord]:
    """One record per step for the whole job: counts and FLOPs summed over ranks (their samples
    differ in tiles), time the slowest rank's (the step ends when every rank has finished)."""
    steps = min(len(records) for records in per_rank)
    combined = []
    for index in range(steps):
        row = [records[index] for records in per_rank]
        combined.append(StepRecord(seconds=max(r.seconds for r in row), samples=sum(r.samples for r in row),
                                   tiles=sum(r.tiles for r in row), text_tokens=sum(r.text_tokens for r in row),
                                   image_tokens=sum(r.image_tokens for r in row), flops=sum(r.flops for r in row)))
    return combined


def throughput(records: list[StepRecord], warmup_steps: int, world_size: int, peak_flops_per_gpu: float | None) -> dict:
    """Median step time and job-wide rates over the steps after warmup, from combined records
    (combine_ranks); rates are totals over the measured time."""
    measured = records[warmup_steps:] or records
    seconds = sum(r.seconds for r in measured)
    total = {key: sum(getattr(r, key) for r in measured)
             for key in ("samples", "tiles", "text_tokens", "image_tokens", "flops")}

    def rate(value: float) -> float:
        return value / seconds if seconds else 0.0

    flops_per_s = rate(total["flops"])
    return {
        "step_time_s": statistics.median(r.seconds for r in measured),
        "step_times_s": [r.seconds for r in records],
        "step_tiles": [r.tiles for r in records],
        "measured_steps": len(measured),
        "tokens_per_s": rate(total["text_tokens"] + total["image_tokens"]),
        "text_tokens_per_s": rate(total["text_tokens"]),
        "image_tokens_per_s": rate(total["image_tokens"]),
        "samples_per_s": rate(total["samples"]),
        "tiles_per_s": rate(total["tiles"]),
        "tiles_per_sample": total["tiles"] / total["samples"] if total["samples"] else 0.0,
        "model_flops_per_step": total["flops"] / len(measured),
        "achieved_tflops": flops_per_s / 1e12,
        "achieved_tflops_per_gpu": flops_per_s / 1e12 / world_size,
        "mfu": flops_per_s / (peak_flops_per_gpu * world_size) if peak_flops_per_gpu else None,
    }


def patch_tokens_per_s(tiles_per_s: float, profile) -> float:
    """Vision tokens through InternViT per second: each tile is its patches plus the class token."""
    return tiles_per_s * (profile.vision.patches_per_tile + 1)


def memory_peaks(cuda: bool) -> dict:
    """This rank's allocator peaks (CUDA) or the process's peak resident set (CPU)."""
    import resource

    out = {"peak_allocated_bytes": None, "peak_reserved_bytes": None,
           "host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if cuda:
        import torch

        out["peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
        out["peak_reserved_bytes"] = int(torch.cuda.max_memory_reserved())
        stats = torch.cuda.memory_stats()
        # A retry means cudaMalloc failed and the allocator emptied its cache to try again: the
        # reserved peak is then not what the run alone would have reached.
        out["alloc_retries"] = int(stats.get("num_alloc_retries", 0))
        out["ooms"] = int(stats.get("num_ooms", 0))
    return out


def gather_to_all(value):
    """Every rank's `value`, in rank order (all_gather_object; works on gloo and nccl); a
    rehearsed rank's alone."""
    import torch.distributed as dist

    from zeroplan.runner import rehearsal

    if not (dist.is_available() and dist.is_initialized()) or rehearsal.active():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def prediction(profile, shape, plan, gpu, gradient_accumulation: int = 1, rank: int | None = None) -> dict:
    """zeroplan's memory estimate for the run, its accumulation included, on `rank` (None: the most
    loaded one); None fields when the estimator is unavailable."""
    try:
        from zeroplan.core.memory import estimate

        breakdown = estimate(profile, shape, plan, gpu, gradient_accumulation=gradient_accumulation,
                             compiled=shape.compiled, rank=rank)
        return {"predicted_peak_bytes": int(breakdown.peak_bytes),
                "predicted_peak_allocated_bytes": int(getattr(breakdown, "peak_allocated", 0)) or None,
                "predicted_peak_reserved_bytes": int(getattr(breakdown, "peak_reserved", 0)) or None,
                "predicted_breakdown": breakdown.as_dict(), "prediction_unavailable": None}
    except (ImportError, AttributeError) as error:
        return {"predicted_peak_bytes": None, "predicted_peak_allocated_bytes": None,
                "predicted_peak_reserved_bytes": None, "predicted_breakdown": None,
                "prediction_unavailable": f"{type(error).__name__}: {error}"}


def cap_memory(spec, gpu, cuda: bool) -> int | None:
    """A rehearsed rank is judged against the GPU its plan is for (the spec's GPU profile): where
    that GPU has less memory than this one, PyTorch's allocator is capped at what the target leaves
    beside its CUDA context, so a plan that would not fit the target runs out of memory here too.
    Returns the cap in bytes, or None when nothing was capped."""
    if not (cuda and spec.simulated and spec.gpu):
        return None
    import torch

    total = int(torch.cuda.get_device_properties(0).total_memory)
    context = int(gpu.calibrated.get("cuda_context_bytes", gpu.cuda_context_bytes))
    cap = gpu.memory_bytes - context
    if cap >= total:
        return None
    torch.cuda.set_per_process_memory_fraction(cap / total, 0)
    return cap


def relative_error(predicted: int | None, measured: int | None) -> float | None:
    """(predicted − measured) / measured; positive means the estimate was too high."""
    if not predicted or not measured:
        return None
    return (predicted - measured) / measured


def prediction_errors(result: dict) -> dict:
    """The estimate against what was measured: allocated vs allocated, reserved vs reserved, and
    the whole-GPU peak (reserved + CUDA context) vs NVML's peak 'used' when NVML is there."""
    errors = {
        "allocated": relative_error(result.get("predicted_peak_allocated_bytes"), result.get("measured_peak_allocated_bytes")),
        "reserved": relative_error(result.get("predicted_peak_reserved_bytes"), result.get("measured_peak_reserved_bytes")),
        "nvml_used": relative_error(result.get("predicted_peak_bytes"), result.get("nvml_peak_used_bytes")),
        "nvml_process_used": relative_error(result.get("predicted_peak_bytes"),
                                            result.get("nvml_process_peak_used_bytes")),
    }
    main = errors["nvml_used"] if errors["nvml_used"] is not None else errors["allocated"]
    return {"prediction_relative_error": main, "prediction_relative_errors": errors}


def environment(cuda: bool, nvml: Nvml | None) -> dict:
    """Device, driver, library versions and the date (UTC, ISO 8601)."""
    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("deepspeed", "transformers", "peft"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    device = torch.cuda.get_device_name() if cuda else f"cpu ({platform.processor() or platform.machine()})"
    driver = None
    if nvml is not None:
        with contextlib.suppress(Exception):
            driver = nvml.driver()
    return {"device": device, "driver": driver, "cuda": torch.version.cuda if cuda else None,
            "versions": versions, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node()}
