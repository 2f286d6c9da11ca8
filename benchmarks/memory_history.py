"""The CUDA caching allocator's recorded trace of a run beside zeroplan's replay of it: every
segment each one creates (cudaMalloc), in order, with the request that made it, and the peaks.
Where zeroplan's reserved peak misses, the first segment the two disagree on says which allocation
the model has wrong. Pure zeroplan core (the trace is a gzip-pickled list of plain dicts):

    .venv/bin/python benchmarks/memory_history.py reports/h100_memhist        # writes README.md there

The traces come from `bash benchmarks/profile/memory_history.sh` on the GPU (the runner's
ZEROPLAN_MEMORY_HISTORY: torch.cuda.memory._record_memory_history, context off).
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

from zeroplan.core import memory as M
from zeroplan.core.allocator import CachingAllocator
from zeroplan.core.atomic import write_files_atomic
from zeroplan.core.tuning import tuned_plan
from zeroplan.lab.jsonl import read
from zeroplan.core.profiles import load_gpu
from zeroplan.lab.records import record_profile, record_shape, step_tiles
from zeroplan.core.run import RunSpec

GB = 1e9
LARGE = 20 * 2**20  # segments above the 20 MiB default are made for one request


def recorded(path: Path) -> dict:
    """Segments (size, stream, the request that made it) and peaks from the recorded trace."""
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        data = json.load(handle)
    events = [dict(zip(data["fields"] + ["frames"], event)) for event in data["events"]]
    allocated = reserved = peak_allocated = peak_reserved = 0
    segments, pending = [], None
    for event in events:
        action, size = event["action"], event.get("size") or 0
        if action == "segment_alloc":
            reserved += size
            pending = {"size": size, "stream": event.get("stream"), "allocated_before": allocated,
                       "reserved_after": reserved}
            segments.append(pending)
        elif action == "segment_free":
            reserved -= size
        elif action == "alloc":
            if pending is not None:
                pending["request"] = size
                pending = None
            allocated += size
        elif action == "free_completed":
            allocated -= size
        peak_allocated, peak_reserved = max(peak_allocated, allocated), max(peak_reserved, reserved)
    return {"segments": segments, "peak_allocated": peak_allocated, "peak_reserved": peak_reserved,
            "events": len(events)}


class _Recording(CachingAllocator):
    """zeroplan's allocator replay, noting each segment it creates and the request behind it."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.made: list[dict] = []
        self._request = None

    def malloc(self, key, size, stream=0):
        self._request = (key, size, stream)
        super().malloc(key, size, stream)

    def _new_segment(self, *args):
        before = self.reserved
        block = super()._new_segment(*args)
        key, request, stream = self._request
        self.made.append({"size": self.reserved - before, "stream": stream, "request": request,
                          "key": str(key).split("#")[0], "allocated_before": self.allocated,
                          "reserved_after": self.reserved})
        return block


def replayed(record: dict) -> dict:
    """The same run through zeroplan.core.memory's replay (the events `estimate` replays)."""
    spec = RunSpec.from_dict(record["spec"])
    gpu = load_gpu("h100")
    profile, shape = record_profile(record), record_shape(record)
    events = M.replayed_events(profile, shape, tuned_plan(profile, shape, spec.plan()), step_tiles(record),
                               spec.compile, spec.gradient_accumulation)
    allocator = _Recording(capacity=gpu.memory_bytes - int(gpu.calibrated["cuda_context_bytes"]))
    for event in events:
        if event[0] == "malloc":
            allocator.malloc(event[1], event[2], event[3])
        else:
            allocator.free(event[1])
    return {"segments": allocator.made, "peak_allocated": allocator.peak_allocated,
            "peak_reserved": allocator.peak_reserved}


def _large(segments: list[dict]) -> list[dict]:
    return [s for s in segments if s["size"] > LARGE]


def render(name: str, record: dict, real: dict, model: dict) -> list[str]:
    lines = [f"## {name}: {record['model']}, ZeRO-{record['spec']['stage']}, "
             f"{record['spec']['micro_batch']} rows × {record['spec'].get('gradient_accumulation', 1)}", "",
             f"- recorded: {real['events']:,} allocator events; peak allocated {real['peak_allocated'] / GB:.2f} GB, "
             f"peak reserved {real['peak_reserved'] / GB:.2f} GB (torch's counters: "
             f"{record['measured_peak_allocated_bytes'] / GB:.2f} / {record['measured_peak_reserved_bytes'] / GB:.2f} GB)",
             f"- zeroplan's replay: peak allocated {model['peak_allocated'] / GB:.2f} GB, peak reserved "
             f"{model['peak_reserved'] / GB:.2f} GB",
             f"- segments over 20 MiB: recorded {len(_large(real['segments']))} "
             f"({sum(s['size'] for s in _large(real['segments'])) / GB:.2f} GB), replayed "
             f"{len(_large(model['segments']))} ({sum(s['size'] for s in _large(model['segments'])) / GB:.2f} GB); "
             f"small ones: recorded {len(real['segments']) - len(_large(real['segments']))}, replayed "
             f"{len(model['segments']) - len(_large(model['segments']))}", "",
             "| # | recorded segment GB | stream | request GB | allocated before GB | replayed segment GB | "
             "stream | request GB | tensor | allocated before GB |",
             "|---:|---:|---|---:|---:|---:|---|---:|---|---:|"]
    ours, theirs = _large(model["segments"]), _large(real["segments"])
    for index in range(max(len(ours), len(theirs))):
        r = theirs[index] if index < len(theirs) else None
        m = ours[index] if index < len(ours) else None
        left = (f"{r['size'] / GB:.3f} | {r['stream']} | {(r.get('request') or 0) / GB:.3f} | "
                f"{r['allocated_before'] / GB:.2f}" if r else " | | | ")
        right = (f"{m['size'] / GB:.3f} | {m['stream']} | {m['request'] / GB:.3f} | {m['key']} | "
                 f"{m['allocated_before'] / GB:.2f}" if m else " | | | | ")
        lines.append(f"| {index + 1} | {left} | {right} |")
    return lines + [""]


FINDINGS = """What the traces showed (2026-11-25, NVIDIA H100 80GB HBM3), and what changed in zeroplan:

- ZeRO-2 with gradient accumulation (the run zeroplan under-estimated by 7.7 %): the trace makes a
  second 4.4 GB gradient-partition segment on DeepSpeed's reduction stream, straight after the
  first. Each `.grad` is a view of that micro-step's grads_in_partition, so the next micro-step,
  which adds into it and copies the sum into a new grads_in_partition, holds two of them until its
  backward ends. zeroplan.core.zero_events now replays that; the two replays below then create the same
  82 large segments (56.14 GB) as the run, and every ZeRO-2 run with accumulation is predicted
  within 1.5 %.
- ZeRO-3 set-up: per optimizer sub-group DeepSpeed converts the bf16 shard to fp32 and then clones
  that (two fp32 blocks, the first freed), not a bf16 clone then an fp32 conversion. Replayed so
  now; the 1B ZeRO-3 run under-estimated by 7.1 % is within 0.1 %.
- 1B ZeRO-0 (under-estimated by 5.7 %): a persistent 32 MiB block lands inside a freed 2.5 GB
  loss block during the first backward and splits it for good, so a later step's loss needs a new
  2.5 GB segment. It is cuBLAS's workspace (CUBLAS_WORKSPACE_CONFIG's default 8 × 4 MiB), which
  the caching allocator hands out at a thread's first matrix product and never gets back: one for
  the forward's Python thread, one for autograd's backward thread (allocated between the LM head's
  weight and input gradients). Replayed so now: the 1B ZeRO-0 and ZeRO-1 traces (z0, z1) are
  reproduced within 0.3 %.
- ZeRO-3 at 8 rows per micro-step (over-estimated by 6.8 % after those changes): the replay makes
  segments for the decoder layers' mid-size temporaries (RMSNorm's fp32 copies, 0.13-0.54 GB) that
  the run serves from cached blocks; not resolved."""


def main(argv: list[str]) -> int:
    folder = Path(argv[0] if argv else "reports/h100_memhist")
    notes = folder / "findings.md"  # what a folder's own traces showed, where it says so
    findings = notes.read_text(encoding="utf-8").strip() if notes.is_file() else FINDINGS
    out = ["# The caching allocator's trace against zeroplan's replay", "", findings, "",
           "Produced by `.venv/bin/python benchmarks/memory_history.py " + str(folder) + "` from the traces "
           "`bash benchmarks/profile/memory_history.sh` recorded on the GPU (device.txt). Streams: the "
           "recorded ones are CUDA stream handles (0 = the default stream); the replay's are zeroplan's "
           "(0 main, 1 DeepSpeed's reduction stream).", ""]
    for trace in sorted(folder.glob("*.events.json.gz")):
        name = trace.name.removesuffix(".events.json.gz")
        records = [r for r in read(folder / f"{name}.jsonl").records if r["status"] == "ok"]
        if not records:
            continue
        out += render(name, records[0], recorded(trace), replayed(records[0]))
    write_files_atomic({folder / "README.md": "\n".join(out) + "\n"})
    print(f"-> {folder}/README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
