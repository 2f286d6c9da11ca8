"""The files zeroplan itself wrote, remembered by path and content hash, so that asking again
(`recommend` with another `--gpus`) may replace the config it wrote a minute ago, while a file that
zeroplan did not write, or that was changed since, is never replaced without `--force`.

Where: `$ZEROPLAN_STATE_DIR`, else the user's state folder (platformdirs: `~/.local/state/zeroplan`
on Linux), file `written.json`: {absolute path: sha256 of the bytes written}, the newest
MAX_ENTRIES kept. The record only ever allows replacing a file whose bytes still hash to what
zeroplan wrote there, so a forged record can at most let zeroplan replace its own unchanged output;
a folder others may write to, or a record that cannot be read, counts as no record.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

from zeroplan.core.atomic import write_atomic
from zeroplan.core.bounded import read_bounded
from zeroplan.core.errors import ZeroplanError

STATE_ENV = "ZEROPLAN_STATE_DIR"
MAX_ENTRIES = 256
MAX_RECORD_BYTES = 1 << 20
MAX_CHECKED_BYTES = 16 << 20  # a config zeroplan writes is a few KiB


def state_file() -> Path:
    """Where the record lives."""
    folder = os.environ.get(STATE_ENV)
    if not folder:
        import platformdirs

        folder = platformdirs.user_state_dir("zeroplan")
    return Path(folder) / "written.json"


def _safe_folder(folder: Path) -> bool:
    try:
        mode = folder.stat().st_mode
    except OSError:
        return False
    return stat.S_ISDIR(mode) and not mode & (stat.S_IWGRP | stat.S_IWOTH)


def _record() -> dict[str, str]:
    path = state_file()
    if not _safe_folder(path.parent) or path.is_symlink() or not path.is_file():
        return {}
    try:
        data = json.loads(read_bounded(path, MAX_RECORD_BYTES, "record of written files"))
    except (ZeroplanError, OSError, ValueError, RecursionError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str) and len(v) == 64}


def _key(path: str | os.PathLike) -> str:
    return str(Path(path).resolve())


def _digest(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def wrote_unchanged(path: str | os.PathLike) -> bool:
    """Whether zeroplan wrote `path` and its bytes are still exactly what it wrote."""
    target = Path(path)
    try:
        if target.is_symlink() or not target.is_file():
            return False
        expected = _record().get(_key(target))
        return expected is not None and _digest(read_bounded(target, MAX_CHECKED_BYTES, "config")) == expected
    except (ZeroplanError, OSError):
        return False


def remember(path: str | os.PathLike, content: str | bytes) -> None:
    """Record that zeroplan wrote `content` to `path` (silently skipped when the state folder
    cannot be written: the next run then refuses to replace the file without --force)."""
    data = content.encode() if isinstance(content, str) else content
    record = _record()
    record.pop(_key(path), None)
    record[_key(path)] = _digest(data)
    kept = dict(list(record.items())[-MAX_ENTRIES:])
    target = state_file()
    try:
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if _safe_folder(target.parent):
            write_atomic(target, json.dumps(kept, indent=0, sort_keys=False) + "\n")
    except (OSError, ZeroplanError):
        pass
