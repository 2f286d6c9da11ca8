"""Atomic file writes: a reader sees the old file or the new one, never half of either.

Each file is written to a temporary file in its own folder (so os.replace stays on one file
system and is atomic), flushed to disk, then renamed over the target. On any failure the
temporary files are removed and the targets are left as they were.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from zeroplan.core.errors import InvalidInput


def _to_bytes(content: str | bytes) -> bytes:
    return content.encode("utf-8") if isinstance(content, str) else bytes(content)


def _file_mode(path: Path) -> int:
    """The target's current mode, or what a plain open() would give a new file (mkstemp's 0600
    would make generated configs unreadable to the rest of a team)."""
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _write_temp(path: Path, data: bytes) -> Path:
    """Write data to a new temporary file beside path and return the temporary file's path."""
    descriptor, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(temp_name, _file_mode(path))
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    return Path(temp_name)


def write_atomic(path: str | os.PathLike, content: str | bytes) -> None:
    """Replace `path` with `content` (str is written as UTF-8) in one atomic rename."""
    write_files_atomic({path: content})


def _make_parents(folder: Path, created: list[Path]) -> None:
    """Create `folder` and its missing parents, adding each one made to `created` as it is made."""
    missing = []
    current = folder
    while not current.exists() and current != current.parent:
        missing.append(current)
        current = current.parent
    for path in reversed(missing):
        path.mkdir(exist_ok=True)
        created.append(path)


def write_files_atomic(files: dict[str | os.PathLike, str | bytes]) -> None:
    """Write several files: every temporary file is written first and only then are they renamed
    into place, so a failure while writing (disk full, permissions) leaves no target touched and
    no temporary file behind. Parent folders are created (and removed again on failure). The
    renames themselves are atomic one by one, not as a group."""
    targets = {Path(path): _to_bytes(content) for path, content in files.items()}
    temps: dict[Path, Path] = {}
    created: list[Path] = []
    done = False
    try:
        for target, data in targets.items():
            if target.is_dir():
                raise InvalidInput(f"cannot write {target}: it is a folder")
            if target.exists() and not target.is_file():  # replacing /dev/null or a pipe would be a disaster
                raise InvalidInput(f"cannot write {target}: it is not a regular file")
            _make_parents(target.parent, created)
            temps[target] = _write_temp(target, data)
        for target, temp in temps.items():
            os.replace(temp, target)
        done = True
    except OSError as error:
        raise InvalidInput(f"cannot write {error.filename or 'output'}: {error.strerror or error}") from None
    finally:
        for temp in temps.values():
            temp.unlink(missing_ok=True)
        for folder in sorted(created, key=lambda p: len(p.parts), reverse=True) if not done else ():
            try:
                folder.rmdir()
            except OSError:
                pass


def check_file_target(path: str | os.PathLike, option: str = "--out") -> Path:
    """Refuse, before any work, an output path that cannot name a file: empty (`--out=` arrives
    as '.'), ending in a separator, or an existing folder."""
    text = os.fspath(path)
    path = Path(text)
    if not text or text.endswith(os.sep) or path.name in ("", ".", ".."):
        raise InvalidInput(f"{option} must name a file, got {text[:200]!r}")
    try:
        is_dir = path.is_dir()
    except (OSError, ValueError):
        return path  # a path the file system refuses: the write reports it
    if is_dir:
        raise InvalidInput(f"{option} {text[:200]} is a folder; give a file name")
    return path


def check_replaceable(path: str | os.PathLike, force: bool, flag: str = "--force") -> None:
    """Refuse, before any work, to write over an existing file unless `force`: a command that
    writes a default path (./ds_config.json) must not silently replace a user's file. A read-only
    file is refused even with `force` (its mode says it is not to be replaced). A path that names
    no file is refused first (check_file_target)."""
    path = check_file_target(path)
    try:
        exists = path.exists() or path.is_symlink()
    except (OSError, ValueError):
        return  # a path the file system refuses: the write reports it
    if not exists or path.is_dir():
        return
    if not force:
        raise InvalidInput(f"{str(path)[:200]} already exists; give {flag} to replace it, or another --out")
    if not os.access(path, os.W_OK) or not path.stat().st_mode & 0o222:  # root passes access(); the mode still says
        raise InvalidInput(f"{str(path)[:200]} is read-only; make it writable or give another --out")
