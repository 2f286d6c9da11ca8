"""Bounded reads: every input file zeroplan reads (profiles, sweeps, specs, configs, results,
datasets' record files) goes through `read_bounded`, which reads at most `limit + 1` bytes.

A size check on `st_size` is not enough: /dev/zero, /dev/urandom, a FIFO or a file under /proc
report 0 bytes and then never end, so a reader that trusts st_size reads until MemoryError.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from zeroplan.core.errors import InvalidInput, ZeroplanError

MAX_INPUT_BYTES = 1 << 20
MAX_RESULTS_BYTES = 1 << 28


def _size_words(limit: int) -> str:
    if limit % (1 << 20) == 0:
        return f"{limit >> 20} MiB"
    return f"{limit} bytes"


def read_bounded(path: str | os.PathLike, limit: int = MAX_INPUT_BYTES, what: str = "input file",
                 error: type[ZeroplanError] = InvalidInput) -> bytes:
    """The bytes of `path`, reading at most `limit + 1` of them: more than `limit` raises `error`
    with one line naming the file and the limit. A folder, a missing file or one that cannot be
    read raises `error` too. Opened non-blocking so a FIFO without a writer reads as empty
    instead of hanging."""
    path = Path(path)
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    except OSError as problem:
        raise error(f"cannot read {what} {path}: {problem.strerror or problem}") from None
    try:
        if stat.S_ISDIR(os.fstat(descriptor).st_mode):
            raise error(f"{what} {path} is a folder, not a file")
        chunks, remaining = [], limit + 1
        while remaining > 0:
            try:
                chunk = os.read(descriptor, min(remaining, 1 << 20))
            except BlockingIOError:
                break
            except OSError as problem:
                raise error(f"cannot read {what} {path}: {problem.strerror or problem}") from None
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
    finally:
        os.close(descriptor)
    data = b"".join(chunks)
    if len(data) > limit:
        raise error(f"{what} {path} is larger than {_size_words(limit)}, more than zeroplan reads")
    return data


def read_text_bounded(path: str | os.PathLike, limit: int = MAX_INPUT_BYTES, what: str = "input file",
                      error: type[ZeroplanError] = InvalidInput) -> str:
    """`read_bounded` decoded as UTF-8; bytes that are not UTF-8 raise `error` with one line."""
    data = read_bounded(path, limit, what, error)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as problem:
        raise error(f"{what} {path} is not UTF-8 text (byte {problem.start})") from None


def require_file(path: str | os.PathLike, what: str = "input file", error: type[ZeroplanError] = InvalidInput) -> None:
    """Raise `error` unless `path` is a regular file (saying whether it is missing or something
    else: a folder, a device, a FIFO)."""
    path = Path(path)
    try:
        if path.is_file():
            return
        exists = path.exists()
    except (OSError, ValueError):
        exists = False
    raise error(f"{what} {path} {'is not a regular file' if exists else 'does not exist'}")
