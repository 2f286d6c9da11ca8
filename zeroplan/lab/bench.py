"""Benchmark sweeps: a grid of RunSpecs, each run in its own process group, results appended to
a JSONL file one line per finished point, so a killed sweep resumes where it stopped.

A point's process gets a time limit; on timeout its whole process group is killed. A point that
ends without a result file is recorded as "oom" or "error" with the reason read from its exit
status and log, and the sweep goes on. Points already in the results file are skipped.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from zeroplan.lab import jsonl
from zeroplan.core.bounded import MAX_INPUT_BYTES, read_bounded
from zeroplan.core.errors import InvalidInput, ZeroplanError
from zeroplan.runner.launch import free_port, launch_command
from zeroplan.core.run import RunSpec

STATUSES = ("ok", "oom", "timeout", "error")
OOM_MARKERS = ("out of memory", "outofmemoryerror", "signal 9 (sigkill)", "cannot allocate memory")
RUNNER_OOM_EXIT_CODE = 3  # zeroplan.runner.train: 0 ok, 3 out of GPU memory, 1 any other error
KILL_GRACE_S = 10.0
KILL_WAIT_S = 10.0  # how long a stop waits for SIGKILLed processes to be gone
TREE_POLL_S = 0.5  # how often a running point's process tree is looked at
LOG_TAIL_BYTES = 64 * 1024

CommandFor = Callable[[RunSpec, Path, Path, int], list[str]]


@dataclass(frozen=True)
class PointOutcome:
    """How a point's process ended, before its result is read."""

    exit_code: int | None
    timed_out: bool
    wall_s: float
    log_tail: str


def default_command_for(launcher: str) -> CommandFor:
    """The runner's launch command for each point (zeroplan.runner.launch.launch_command)."""

    def command_for(spec: RunSpec, spec_path: Path, result_path: Path, master_port: int) -> list[str]:
        return launch_command(spec, str(spec_path), str(result_path), launcher=launcher, master_port=master_port)

    return command_for


def _die_with_parent() -> None:
    """In the child: ask Linux to send SIGTERM if the sweep dies (even by SIGKILL), so a killed
    sweep does not leave a point training on the GPU while its rerun starts."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _kill_group(pgid: int, sig: int) -> None:
    if pgid == os.getpgrp():  # never signal the sweep's own group (a rank that did not setsid)
        return
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _proc_stat(pid: int) -> tuple[int, int, int, str] | None:
    """(parent pid, process group, start time, state) from /proc/<pid>/stat, or None when gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), int(fields[2]), int(fields[19]), fields[0].decode()


class ProcessTree:
    """Every process a point started, remembered by (pid, start time) while the point runs.

    torchrun starts each rank in a session of its own, so killing the launcher's process group
    misses the ranks, and once the launcher is dead they are re-parented and no longer look like
    its children. Watching the tree while it lives is what lets a stop reach all of them (a pid is
    only signalled while its start time matches, so a reused pid is never hit)."""

    def __init__(self, root: int):
        self.root = root
        self.seen: dict[int, int] = {}
        self.refresh()

    def refresh(self) -> None:
        """Add the root's current descendants (a /proc walk: Linux only; elsewhere the root alone)."""
        parents: dict[int, list[int]] = {}
        try:
            entries = [int(name) for name in os.listdir("/proc") if name.isdigit()]
        except OSError:
            entries = []
        stats = {}
        for pid in entries:
            stat = _proc_stat(pid)
            if stat is not None:
                stats[pid] = stat
                parents.setdefault(stat[0], []).append(pid)
        todo = [self.root]
        while todo:
            pid = todo.pop()
            if pid in stats and pid not in self.seen:
                self.seen[pid] = stats[pid][2]
            todo.extend(child for child in parents.get(pid, ()) if child not in self.seen)

    def alive(self) -> list[int]:
        """The remembered processes still running (zombies count as gone)."""
        living = []
        for pid, started in self.seen.items():
            stat = _proc_stat(pid)
            if stat is not None and stat[2] == started and stat[3] != "Z":
                living.append(pid)
        return living

    def signal(self, sig: int) -> None:
        """Send `sig` to the root's group and to every living remembered process and its group."""
        _kill_group(self.root, sig)
        for pid in self.alive():
            stat = _proc_stat(pid)
            if stat is not None:
                _kill_group(stat[1], sig)
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass


def stop_tree(process: subprocess.Popen, tree: ProcessTree, grace_s: float) -> None:
    """SIGTERM the point's processes (torchrun passes it on to its ranks), SIGKILL what is left
    after `grace_s`, and wait until every one of them is gone, so no rank outlives the point and
    keeps holding GPU memory. A second Ctrl-C meanwhile skips the grace period but not the
    killing; it is raised once every process is gone."""
    interrupted = False
    while True:
        try:
            _stop(process, tree, 0.0 if interrupted else grace_s)
            break
        except KeyboardInterrupt:
            interrupted = True
    if interrupted:
        raise KeyboardInterrupt


def _stop(process: subprocess.Popen, tree: ProcessTree, grace_s: float) -> None:
    tree.refresh()
    tree.signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        process.poll()
        tree.refresh()
        if process.returncode is not None and not tree.alive():
            break
        time.sleep(0.05)
    tree.signal(signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + KILL_WAIT_S
    while tree.alive() and time.monotonic() < deadline:
        tree.signal(signal.SIGKILL)
        time.sleep(0.05)


def run_process(command: list[str], log_path: Path, timeout_s: float, grace_s: float = KILL_GRACE_S) -> PointOutcome:
    """Run one point's command in a new session (its own process group) with its output in
    `log_path`; past `timeout_s`, or on an interrupt (Ctrl-C, SIGTERM turned into
    KeyboardInterrupt), every process of the point gets SIGTERM, then SIGKILL after `grace_s`, and
    is waited for before this returns or re-raises. Whatever the point left running when its
    launcher exited is killed too (stray ranks)."""
    started = time.monotonic()
    timed_out = False
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True, preexec_fn=_die_with_parent)
        tree = ProcessTree(process.pid)
        try:
            while True:
                try:
                    process.wait(timeout=min(TREE_POLL_S, max(0.0, started + timeout_s - time.monotonic())))
                    break
                except subprocess.TimeoutExpired:
                    tree.refresh()
                    if time.monotonic() >= started + timeout_s:
                        timed_out = True
                        stop_tree(process, tree, grace_s)
                        break
        finally:
            stop_tree(process, tree, 0.0 if process.returncode is not None else grace_s)
    return PointOutcome(process.returncode, timed_out, time.monotonic() - started, _tail(log_path))


def _tail(path: Path) -> str:
    with open(path, "rb") as handle:
        size = handle.seek(0, os.SEEK_END)
        handle.seek(max(0, size - LOG_TAIL_BYTES))
        return handle.read().decode("utf-8", errors="replace")


def classify(outcome: PointOutcome, result: dict[str, Any] | None, timeout_s: float) -> tuple[str, str]:
    """(status, reason) of a finished point: the runner's own status when it wrote a result, else
    read from how the process ended (timeout, an out-of-memory message, a signal, an exit code)."""
    if result is not None and result.get("status") in STATUSES:
        reason = str(result.get("reason") or result.get("error") or "")
        if outcome.exit_code not in (0, None) and not reason:
            reason = f"result written, then the process exited with {_describe_exit(outcome.exit_code)}"
        return result["status"], reason
    if outcome.timed_out:
        return "timeout", f"no result within {timeout_s:g} s; process group killed"
    last_line = _last_line(outcome.log_tail)
    lowered = outcome.log_tail.lower()
    for marker in OOM_MARKERS:
        if marker in lowered:
            return "oom", _line_with(outcome.log_tail, marker) or last_line
    if outcome.exit_code == RUNNER_OOM_EXIT_CODE:
        return "oom", f"exited with code {RUNNER_OOM_EXIT_CODE} (the runner's out-of-memory status): {last_line}"
    if outcome.exit_code == -signal.SIGKILL:
        return "oom", "killed by SIGKILL with no result (most likely the kernel's OOM killer)"
    if result is not None:
        return "error", f"result has no valid status ({result.get('status')!r}); {last_line}".strip("; ")
    ended = _describe_exit(outcome.exit_code)
    return "error", f"no result; exited with {ended}" + (f": {last_line}" if last_line else "")


def _describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def _line_with(text: str, marker: str) -> str:
    for line in reversed(text.splitlines()):
        if marker in line.lower():
            return line.strip()[:300]
    return ""


def read_result(path: Path) -> dict[str, Any] | None:
    """The runner's result object, or None when it is missing or not a JSON object."""
    try:
        data = json.loads(read_bounded(path, MAX_INPUT_BYTES * 16, "result file"))
    except (ZeroplanError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _write_atomic(path: Path, text: str) -> None:
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temp.write_text(text, encoding="utf-8")
    os.replace(temp, path)


def run_point(spec: RunSpec, point_dir: Path, command_for: CommandFor, timeout_s: float,
              grace_s: float = KILL_GRACE_S) -> dict[str, Any]:
    """Run one point in its own process group and return its record for the results file: the
    runner's result (if any) plus point_id, spec, status, reason, exit code, wall time and log."""
    spec_path, result_path, log_path = prepare_point(spec, point_dir)
    command = command_for(spec, spec_path, result_path, free_port())
    started_at = _now()
    outcome = run_process(command, log_path, timeout_s, grace_s)
    return point_record(spec, outcome, read_result(result_path), command, started_at, log_path, timeout_s)


def prepare_point(spec: RunSpec, point_dir: Path) -> tuple[Path, Path, Path]:
    """The point's folder with its spec written and no stale result: (spec, result, log) paths."""
    point_dir.mkdir(parents=True, exist_ok=True)
    spec_path, result_path, log_path = point_dir / "spec.json", point_dir / "result.json", point_dir / "log.txt"
    _write_atomic(spec_path, spec.to_json())
    result_path.unlink(missing_ok=True)
    return spec_path, result_path, log_path


def point_record(spec: RunSpec, outcome: PointOutcome, result: dict[str, Any] | None, command: list[str],
                 started_at: str, log_path: Path, timeout_s: float) -> dict[str, Any]:
    """A finished point's line of the results file."""
    status, reason = classify(outcome, result, timeout_s)
    spec_fields = spec.to_dict()
    record = {key: spec_fields[key] for key in ("model", "stage", "micro_batch", "seq_len", "tiles", "grad_ckpt",
                                                 "world_size")}
    record.update(result or {})
    record.update({"point_id": spec.point_id(), "spec": spec_fields, "status": status, "reason": reason,
                   "exit_code": outcome.exit_code, "wall_s": round(outcome.wall_s, 3), "log": str(log_path),
                   "command": command, "started_at": started_at, "finished_at": _now()})
    record.setdefault("date", record["finished_at"])
    return json_safe(record)


def json_safe(value: Any) -> Any:
    """The value with NaN and infinities (a diverged loss) as None: strict JSON, so every reader
    can parse the line."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [json_safe(item) for item in value]
    return value


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class SweepSummary:
    """What a sweep did: points in the grid, skipped as already done, run, and the status counts."""

    total: int
    skipped: int
    ran: int = 0
    statuses: dict[str, int] = field(default_factory=dict)


def pending(specs: list[RunSpec], results_path: Path) -> list[RunSpec]:
    """The specs whose point id is not yet in the results file (what a resumed sweep still runs)."""
    jsonl.check_results_file(results_path)
    done = done_ids(jsonl.read(results_path).by_point)
    return [spec for spec in specs if spec.point_id() not in done]


def done_ids(by_point: dict[str, dict]) -> set[str]:
    """The point ids a results file has measured. A point measured with a named GPU profile
    (`gpu = "h100-80gb"` in older sweep files) is also done for the same spec without one: the
    runner then matches the profile from the device, and the run is the same."""
    ids = set(by_point)
    for record in by_point.values():
        spec = record.get("spec")
        if isinstance(spec, dict) and spec.get("gpu"):
            try:
                ids.add(RunSpec.from_dict({**spec, "gpu": None}).point_id())
            except ZeroplanError:  # a record from an older RunSpec: it keeps its own id only
                continue
    return ids


def check_results_path(results_path: Path) -> None:
    """Fail before anything is written if the results file cannot be created or appended to."""
    if any(len(os.fsencode(part)) > 255 for part in results_path.parts):  # NAME_MAX: mkdir would half-succeed
        raise InvalidInput(f"results path {str(results_path)[:200]}: a name in it is longer than 255 bytes")
    if results_path.is_dir():
        raise InvalidInput(f"results path {results_path} is a directory")
    if results_path.exists():
        if not results_path.is_file():  # a FIFO would block the lock's open; /dev/null would swallow results
            raise InvalidInput(f"results path {results_path} is not a regular file")
        if not os.access(results_path, os.W_OK):
            raise InvalidInput(f"results file {results_path} is not writable")
        jsonl.check_results_file(results_path)
        return
    ancestor = results_path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise InvalidInput(f"cannot create results file {results_path}: {ancestor} is not a writable directory")


def points_folder(results_path: Path) -> Path:
    """Where a results file's points keep their spec, result and log:
    `<results dir>/points/<results file stem>/` (the whole name when it does not end in .jsonl).
    One folder per results file, so two sweeps writing different results files in one folder
    never share (and overwrite) a point's files; two sweeps on one results file are refused by
    the results file's lock."""
    name = results_path.stem if results_path.suffix == ".jsonl" else results_path.name + ".points"
    return results_path.parent / "points" / name


class _SweepLock:
    """An exclusive flock on the results file, so two sweeps never append the same points."""

    def __init__(self, results_path: Path):
        self.path = results_path
        self.handle = None

    def __enter__(self):
        import fcntl

        self.handle = open(self.path, "ab")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.close()
            raise InvalidInput(f"another sweep is writing {self.path}") from None
        return self

    def __exit__(self, *exc):
        self.handle.close()


def run_sweep(specs: list[RunSpec], results_path: str | Path, command_for: CommandFor, timeout_s: float,
              grace_s: float = KILL_GRACE_S, extra: dict[str, Any] | None = None,
              on_start: Callable[[RunSpec, int, int], None] | None = None,
              on_end: Callable[[dict[str, Any], int, int], None] | None = None,
              side_by_side=None) -> SweepSummary:
    """Run every spec not already in `results_path`, appending each record as its point ends.

    A torn last line from a killed sweep is cut first; points are skipped by point id, so a
    rerun after SIGKILL runs each missing point once. `extra` keys (the sweep name, the command)
    are added to every record. Per-point files go under `points_folder(results_path)/<point id>/`.
    `side_by_side` (zeroplan.lab.parallel.SideBySide) runs rehearsed points several at a time on
    one GPU; None runs them one after another."""
    results_path = Path(results_path)
    check_results_path(results_path)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    with _SweepLock(results_path):
        jsonl.repair(results_path)
        todo = pending(specs, results_path)
        summary = SweepSummary(total=len(specs), skipped=len(specs) - len(todo))
        if side_by_side is not None:
            side_by_side.run(todo, results_path, command_for, timeout_s, grace_s, extra, summary, on_start, on_end)
            return summary
        for index, spec in enumerate(todo):
            if on_start:
                on_start(spec, index, len(todo))
            record = run_point(spec, points_folder(results_path) / spec.point_id(), command_for, timeout_s, grace_s)
            record.update(extra or {})
            jsonl.append(results_path, record)
            summary.ran += 1
            summary.statuses[record["status"]] = summary.statuses.get(record["status"], 0) + 1
            if on_end:
                on_end(record, index, len(todo))
    return summary


def describe(spec: RunSpec) -> str:
    """A short human label of a point: `InternVL2_5-1B z2 mb1 ckpt s4096 t7`."""
    parts = [spec.model, f"z{spec.stage}", f"mb{spec.micro_batch}", "ckpt" if spec.grad_ckpt else "no-ckpt",
             f"s{spec.seq_len}", f"t{spec.tiles}"]
    if spec.offload_optimizer != "none":
        parts.append("off-opt" + ("+params" if spec.offload_params != "none" else ""))
    if spec.frozen:
        parts.append("frozen=" + "+".join(spec.frozen))
    if spec.lora_rank:
        parts.append(f"lora{spec.lora_rank}")
    if spec.world_size > 1:
        parts.append(f"x{spec.world_size}")
    if spec.simulated:
        parts.append(f"rank {spec.simulate_rank} of {spec.simulate_world}")
    if spec.ds_config:
        parts.append(f"config {Path(spec.ds_config).name}")
    if spec.timing != "sync":
        parts.append(f"timed-{spec.timing}")
    return " ".join(parts + speed_labels(spec))


def speed_labels(spec: RunSpec) -> list[str]:
    """The speed options of a point, in a few words (none for the plain loop)."""
    labels = []
    if spec.packed:
        labels.append("packed" + ("-varlen" if spec.attn_implementation == "varlen" else ""))
    if spec.vocab_multiple > 1:
        labels.append(f"vocab/{spec.vocab_multiple}")
    if spec.kernels != "eager":
        labels.append(spec.kernels)
    if spec.compile:
        labels.append("compiled")
    if spec.gradient_accumulation > 1:
        labels.append(f"gas{spec.gradient_accumulation}")
    if spec.grad_ckpt and spec.ckpt_layers is not None:
        labels.append(f"ckpt{spec.ckpt_layers}")
    if spec.optimizer_group_elems:
        labels.append(f"groups<={spec.optimizer_group_elems / 1e6:g}M")
    return labels
