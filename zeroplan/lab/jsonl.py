"""An append-only JSON Lines store of finished benchmark points, safe against SIGKILL.

Each finished point is one line, written with a single write, then flush and fsync, so a killed
writer leaves at most a torn last line. Readers skip lines that are not a JSON object (and say how
many); `repair` cuts a torn tail before the next append so it cannot glue itself to a new record.
A point may appear more than once (a rerun); readers keep the last line for each point id.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zeroplan.core.bounded import MAX_RESULTS_BYTES, read_bounded
from zeroplan.core.errors import InvalidInput

POINT_ID_KEY = "point_id"


@dataclass(frozen=True)
class Records:
    """What a JSONL file holds: the last record per point id, in first-seen order, and the lines
    that could not be read (torn or not a JSON object)."""

    by_point: dict[str, dict[str, Any]]
    skipped_lines: int

    @property
    def records(self) -> list[dict[str, Any]]:
        """The records, one per point id."""
        return list(self.by_point.values())


def encode(record: dict[str, Any]) -> bytes:
    """One record as one line of UTF-8 JSON; refuses records without a point id or with NaN."""
    if not isinstance(record.get(POINT_ID_KEY), str) or not record[POINT_ID_KEY]:
        raise InvalidInput(f"a result record needs a non-empty string {POINT_ID_KEY!r}")
    try:
        text = json.dumps(record, sort_keys=True, allow_nan=False, separators=(",", ":"))
    except ValueError as error:
        raise InvalidInput(f"result record for {record[POINT_ID_KEY]} is not valid JSON: {error}") from error
    return (text + "\n").encode("utf-8")


def repair(path: str | Path) -> int:
    """Before appending: cut a torn last line (no trailing newline) left by a killed writer, and
    return the bytes removed. A last line that is a whole record without its newline is kept (a
    newline is added). Only a results file is ever changed: a file none of whose lines is a record
    (a JSON config, a text file) raises InvalidInput and is left as it was."""
    path = Path(path)
    if not path.exists():
        return 0
    check_results_file(path)
    with open(path, "r+b") as handle:
        size = handle.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        handle.seek(size - 1)
        if handle.read(1) == b"\n":
            return 0
        keep = _last_newline_end(handle, size)
        handle.seek(keep)
        if _decode(handle.read(size - keep) + b"\n") is not None:
            handle.seek(size)
            handle.write(b"\n")
            removed = 0
        else:
            handle.truncate(keep)
            removed = size - keep
        handle.flush()
        os.fsync(handle.fileno())
        return removed


def check_results_file(path: str | Path) -> None:
    """Refuse (InvalidInput, one line) a file that exists, is not empty and holds no record: a
    sweep must never append to, or cut, a file that is not a results file."""
    path = Path(path)
    if not path.exists() or path.is_dir():
        return
    data = read_bounded(path, MAX_RESULTS_BYTES, "results file")
    if not data.strip():
        return
    if not any(_decode(line if line.endswith(b"\n") else line + b"\n") is not None for line in _lines(data)):
        raise InvalidInput(f"{path} is not a zeroplan results file (no line is a JSON record with a "
                           f"{POINT_ID_KEY!r}); refusing to append to it or change it: give a new --results path")


def _last_newline_end(handle, size: int) -> int:
    """Offset just past the last newline before `size` (0 when there is none)."""
    block = 1 << 16
    end = size
    while end > 0:
        start = max(0, end - block)
        handle.seek(start)
        chunk = handle.read(end - start)
        index = chunk.rfind(b"\n")
        if index >= 0:
            return start + index + 1
        end = start
    return 0


def append(path: str | Path, record: dict[str, Any]) -> None:
    """Append one record durably: one write of the whole line, flush, fsync.

    If the file ends in a torn line, a newline goes first so the new record stays a line of its
    own (the torn one stays unreadable and is skipped)."""
    line = encode(record)
    path = Path(path)
    with open(path, "ab+") as handle:
        size = handle.seek(0, os.SEEK_END)
        if size:
            handle.seek(size - 1)
            if handle.read(1) != b"\n":
                line = b"\n" + line
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())
    if size == 0:
        _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    """Make a newly created file's directory entry durable too."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def read(path: str | Path) -> Records:
    """Every readable record of a JSONL file, the last one per point id; missing file -> empty."""
    path = Path(path)
    by_point: dict[str, dict[str, Any]] = {}
    skipped = 0
    if not path.exists():
        return Records(by_point, 0)
    if path.is_dir():
        raise InvalidInput(f"{path} is a directory, not a results file")
    for raw in _lines(read_bounded(path, MAX_RESULTS_BYTES, "results file")):
        if not raw.strip():
            continue
        record = _decode(raw)
        if record is None:
            skipped += 1
            continue
        by_point[record[POINT_ID_KEY]] = record
    return Records(by_point, skipped)


def _lines(data: bytes) -> list[bytes]:
    """The lines of `data`, each with its newline (the last one without, when it has none)."""
    lines = [line + b"\n" for line in data.split(b"\n")]
    lines[-1] = lines[-1][:-1]
    return [line for line in lines if line]


def _decode(raw: bytes) -> dict[str, Any] | None:
    """A line as a record, or None when it is torn, not JSON, or lacks a point id."""
    if not raw.endswith(b"\n"):
        return None
    try:
        record = json.loads(raw)
    except (ValueError, RecursionError):  # bad UTF-8 or JSON, an integer past int()'s digit limit, deep nesting
        return None
    if not isinstance(record, dict) or not isinstance(record.get(POINT_ID_KEY), str):
        return None
    return record
