"""Rehearsed points side by side on one GPU.

A rehearsed rank (RunSpec.simulate_world) is one process, and most of its minute goes to starting
Python, importing torch and DeepSpeed and building the model, not to the GPU. Several can share a
GPU: each process has its own caching allocator, so its allocated and reserved peaks are its own,
as long as no cudaMalloc fails for want of memory another process holds (the allocator would then
empty its cache and retry, and its reserved peak would be lower than alone). So a point is started
only while the predicted device memory of every running point plus its own stays under
`fill` of the GPU; a point predicted not to fit, or whose prediction fails, runs alone; and a point
that ran beside others and ended out of memory, or whose allocator retried (the runner records
`alloc_retries`), is run again alone and only that run is recorded. Each record says how many other
points ran beside it (`points_beside`); their step times mean nothing, and rehearsed step times
are never fitted anyway.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


from zeroplan.core.bounded import MAX_INPUT_BYTES, read_text_bounded
from zeroplan.core.config_reader import plan_from_config
from zeroplan.core.errors import InvalidInput
from zeroplan.core.memory import estimate
from zeroplan.core.profiles import DEFAULT_GPU, load_gpu, load_model, pad_vocab
from zeroplan.core.run import RunSpec
from zeroplan.core.tuning import tuned_plan
from zeroplan.lab import jsonl
from zeroplan.lab.bench import (KILL_GRACE_S, TREE_POLL_S, PointOutcome, ProcessTree, _die_with_parent, _now, _tail,
                                free_port, point_record, points_folder, prepare_point, read_result, stop_tree)

DEFAULT_FILL = 0.85  # of the GPU's memory the running points' predictions may add up to
MARGIN_BYTES = 2 << 30  # per point, beside its prediction: its CUDA context and the prediction's error
MAX_PARALLEL = 16


@dataclass
class RunningPoint:
    """One point's process, started in its own session and watched until it ends."""

    spec: RunSpec
    need_bytes: int | None
    alone: bool
    point_dir: Path
    process: subprocess.Popen | None = None
    tree: ProcessTree | None = None
    command: list[str] = field(default_factory=list)
    started: float = 0.0
    started_at: str = ""
    timed_out: bool = False
    beside: int = 0
    log: Any = None

    def start(self, command_for) -> None:
        spec_path, self.result_path, self.log_path = prepare_point(self.spec, self.point_dir)
        self.command = command_for(self.spec, spec_path, self.result_path, free_port())
        self.log = open(self.log_path, "wb")
        self.started, self.started_at = time.monotonic(), _now()
        self.process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=self.log,
                                        stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent)
        self.tree = ProcessTree(self.process.pid)

    def ended(self, timeout_s: float, grace_s: float) -> bool:
        """Whether the point has ended (past its time limit it is stopped here)."""
        if self.process.poll() is not None:
            return True
        self.tree.refresh()
        if time.monotonic() >= self.started + timeout_s:
            self.timed_out = True
            stop_tree(self.process, self.tree, grace_s)
            return True
        return False

    def stop(self, grace_s: float) -> None:
        """Every process of the point stopped and waited for (an interrupt, or strays at the end)."""
        if self.process is not None:
            stop_tree(self.process, self.tree, 0.0 if self.process.returncode is not None else grace_s)
        if self.log is not None:
            self.log.close()
            self.log = None

    def record(self, timeout_s: float, grace_s: float) -> dict[str, Any]:
        self.stop(grace_s)
        outcome = PointOutcome(self.process.returncode, self.timed_out, time.monotonic() - self.started,
                               _tail(self.log_path))
        record = point_record(self.spec, outcome, read_result(self.result_path), self.command, self.started_at,
                              self.log_path, timeout_s)
        record["points_beside"] = self.beside
        return record


def disturbed(record: dict[str, Any]) -> bool:
    """A point that ran beside others and may have been pushed by them: out of memory, or its
    allocator had to empty its cache and retry."""
    return record.get("points_beside", 0) > 0 and (record.get("status") == "oom" or bool(record.get("alloc_retries")))


@dataclass
class SideBySide:
    """Runs up to `parallel` rehearsed points at once on a GPU of `capacity_bytes`, admitting a point
    while the running points' `need_for(spec)` (predicted device bytes) plus its own stay under
    `fill` of the GPU."""

    parallel: int
    capacity_bytes: int
    need_for: Callable[[RunSpec], int | None]
    fill: float = DEFAULT_FILL
    poll_s: float = TREE_POLL_S

    def __post_init__(self):
        if not 1 <= self.parallel <= MAX_PARALLEL:
            raise InvalidInput(f"--parallel must be from 1 to {MAX_PARALLEL}, got {self.parallel}")

    def _need(self, spec: RunSpec) -> int | None:
        try:
            need = self.need_for(spec)
        except Exception:  # noqa: BLE001 - a point whose prediction fails runs alone
            return None
        return None if need is None else need + MARGIN_BYTES

    def _admissible(self, queue: list[RunningPoint], running: list[RunningPoint]) -> RunningPoint | None:
        """The first queued point that may start now: a lone point only on an idle GPU (and then
        nothing passes it), others while they fit beside the running ones."""
        if any(point.alone for point in running) or len(running) >= self.parallel:
            return None
        budget = self.fill * self.capacity_bytes - sum(point.need_bytes or 0 for point in running)
        for point in queue:
            if point.alone:
                return point if not running else None
            if point.need_bytes <= budget:
                return point
        return None

    def run(self, todo: list[RunSpec], results_path: Path, command_for, timeout_s: float,
            grace_s: float = KILL_GRACE_S, extra: dict | None = None, summary=None, on_start=None,
            on_end=None) -> None:
        """Run the points, appending each record to `results_path` as it ends (see the module)."""
        folder = points_folder(results_path)
        queue = []
        for spec in todo:
            need = self._need(spec)
            alone = need is None or need > self.fill * self.capacity_bytes or self.parallel == 1
            queue.append(RunningPoint(spec, need, alone, folder / spec.point_id()))
        running: list[RunningPoint] = []
        done = 0
        try:
            while queue or running:
                point = self._admissible(queue, running)
                while point is not None:
                    queue.remove(point)
                    if on_start:
                        on_start(point.spec, done, len(todo))
                    point.start(command_for)
                    running.append(point)
                    point = self._admissible(queue, running)
                for point in running:
                    point.beside = max(point.beside, len(running) - 1)
                for point in [p for p in running if p.ended(timeout_s, grace_s)]:
                    running.remove(point)
                    record = point.record(timeout_s, grace_s)
                    if disturbed(record):  # measured again, alone; this record is not kept
                        queue.insert(0, RunningPoint(point.spec, point.need_bytes, True, point.point_dir))
                        continue
                    record.update(extra or {})
                    jsonl.append(results_path, record)
                    done += 1
                    if summary is not None:
                        summary.ran += 1
                        summary.statuses[record["status"]] = summary.statuses.get(record["status"], 0) + 1
                    if on_end:
                        on_end(record, done - 1, len(todo))
                time.sleep(self.poll_s)
        finally:
            for point in running:
                point.stop(grace_s)


def predicted_device_bytes(spec: RunSpec) -> int:
    """What a point's rank is predicted to take on the GPU (zeroplan.core.memory's peak: reserved
    plus CUDA context), with the plan its config carries."""
    profile = pad_vocab(load_model(spec.model), spec.vocab_multiple)
    shape = spec.shape()
    gpu = load_gpu(spec.gpu or DEFAULT_GPU)
    rank = spec.simulate_rank if spec.simulated else None
    return estimate(profile, shape, point_plan(spec, profile, shape), gpu, gradient_accumulation=spec.gradient_accumulation,
                    compiled=spec.compile, rank=rank).peak


def point_plan(spec: RunSpec, profile, shape):
    """The plan a point's DeepSpeed config will carry: its own config file read back (without the
    HF Trainer's check, which needs transformers), else the spec's plan tuned to the model."""
    if not spec.ds_config:
        return tuned_plan(profile, shape, spec.plan())
    config = json.loads(read_text_bounded(spec.ds_config, MAX_INPUT_BYTES, "DeepSpeed config"))
    base = spec.plan()
    return plan_from_config(config, base.gpus_per_node, base.nodes, hidden_size=profile.llm.hidden_size,
                            micro_batch=spec.micro_batch, gradient_accumulation=spec.gradient_accumulation)[0]
