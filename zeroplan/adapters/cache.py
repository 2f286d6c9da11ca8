"""What zeroplan remembers between runs, so that asking again costs less than asking first: the
configs DeepSpeed has accepted, and the allocator replays of the memory model.

Validation. Importing DeepSpeed (torch under it) takes two to three seconds on a small machine,
more than planning takes, so `zeroplan recommend` run again on the same question (another `--out`,
`--json`, a rerun in CI) would spend most of its time re-proving what it proved before. The answer
depends only on the request (the config, the world size, the trainer's arguments), on the versions
of the libraries that decide it and on zeroplan's own validating code; its key is a hash of all
of them, so upgrading DeepSpeed, transformers or pydantic, or editing the adapters, asks DeepSpeed
again. Only acceptances are kept: a rejection is always DeepSpeed's own, fresh.

Replays. The reserved-memory peak replays PyTorch's caching allocator over two training steps
(zeroplan.core.memory), most of a plan's cost. The replay is a pure function of its inputs; the
store keys it by them and by a hash of the core's source, so any change to the memory model
starts an empty store.

Where: `$ZEROPLAN_CACHE_DIR`, else `$XDG_CACHE_HOME/zeroplan`, else `~/.cache/zeroplan`: one small
JSON file per accepted config under `validated/` and per model and cluster under `estimators/`
(DeepSpeed's own model-state estimates, which `estimate` prints beside zeroplan's), one file of
replays under `replays/`.
`ZEROPLAN_CACHE=off` turns both off. A cache that cannot be read or written is skipped silently:
it only ever saves time.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path

# The libraries whose code decides a config's fate (DeepSpeed's config classes are pydantic
# models; transformers' HfTrainerDeepSpeedConfig fills and checks the "auto" values).
DECIDING_PACKAGES = ("deepspeed", "pydantic", "transformers")
# zeroplan's own code on the path from request to answer.
_DECIDING_SOURCES = ("deepspeed_adapter.py", "hf_trainer.py", "validator_process.py")


def cache_root() -> Path | None:
    """The folder of what zeroplan remembers, or None when caching is off."""
    if os.environ.get("ZEROPLAN_CACHE", "").strip().lower() in ("off", "0", "no", "false"):
        return None
    root = os.environ.get("ZEROPLAN_CACHE_DIR")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "zeroplan"


def _folder(kind: str) -> Path | None:
    """The folder of one kind of remembered thing, or None when caching is off."""
    root = cache_root()
    return None if root is None else root / kind


def _write(path: Path, text: str) -> bool:
    """Write `path` atomically, its folder made if missing; False when it cannot be (a read-only
    home, a full disk: only time is lost)."""
    from zeroplan.core.atomic import write_atomic
    from zeroplan.core.errors import InvalidInput

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, text)
    except (OSError, InvalidInput):
        return False
    return True


@lru_cache(maxsize=1)
def _versions() -> dict[str, list[str | None]]:
    """Each deciding package's installed version and the file `import` would load it from (found,
    not imported: a package shadowed or removed on this path is another key)."""
    from importlib import metadata, util

    found: dict[str, list[str | None]] = {}
    for package in DECIDING_PACKAGES:
        try:
            version = metadata.version(package)
        except metadata.PackageNotFoundError:
            version = None
        try:
            spec = util.find_spec(package)
        except (ImportError, ValueError):
            spec = None
        found[package] = [version, spec.origin if spec is not None else None]
    return found


@lru_cache(maxsize=1)
def _sources_digest() -> str:
    here = Path(__file__).parent
    digest = hashlib.sha256()
    for name in _DECIDING_SOURCES:
        digest.update(name.encode())
        digest.update((here / name).read_bytes())
    return digest.hexdigest()


def request_key(request: dict) -> str:
    """The hash naming a request's answer: the request itself, the deciding libraries' versions and
    zeroplan's validating code."""
    material = {"request": request, "versions": _versions(), "code": _sources_digest()}
    return hashlib.sha256(json.dumps(material, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _read_entry(kind: str, request: dict):
    """The remembered JSON value of `request` under `kind`, or None."""
    folder = _folder(kind)
    if folder is None:
        return None
    try:
        return json.loads((folder / f"{request_key(request)}.json").read_text())
    except (OSError, ValueError):
        return None


def _write_entry(kind: str, request: dict, value) -> bool:
    """Keep `value` for `request` under `kind`; True when kept."""
    folder = _folder(kind)
    return folder is not None and _write(folder / f"{request_key(request)}.json", json.dumps(value))


def recall(request: dict) -> dict | None:
    """The remembered answer ({"auto": [...], "note": "..."}) to a validation `request`, or None."""
    answer = _read_entry("validated", request)
    if not isinstance(answer, dict) or not isinstance(answer.get("auto"), list) or not isinstance(
            answer.get("note"), str):
        return None
    return {"auto": answer["auto"], "note": answer["note"]}


def remember(request: dict, answer: dict) -> bool:
    """Keep an acceptance (an answer with no error); anything else is not kept. True when kept."""
    if answer.get("error") or answer.get("note", "").startswith("not validated"):
        return False
    return _write_entry("validated", request, {"auto": answer.get("auto", []), "note": answer.get("note", "")})


def recall_estimates(request: dict) -> dict | None:
    """DeepSpeed's model-state estimates remembered for `request` (the arguments its
    estimate_zero2/3_model_states_mem_needs were given), or None."""
    found = _read_entry("estimators", request)
    ok = isinstance(found, dict) and all(
        isinstance(found.get(formula), dict) and all(isinstance(found[formula].get(k), int) for k in
                                                     ("gpu_bytes", "cpu_bytes")) for formula in ("zero2", "zero3"))
    return found if ok else None


def remember_estimates(request: dict, estimates: dict) -> bool:
    """Keep DeepSpeed's estimates ({"zero2": {...}, "zero3": {...}}) for `request`."""
    return _write_entry("estimators", request, {formula: estimates[formula] for formula in ("zero2", "zero3")})


def command_hint(argv: list[str]) -> str:
    """A name for a command line (its words, hashed)."""
    return hashlib.sha256(json.dumps(argv).encode()).hexdigest()


def expects_answer(hint: str) -> bool:
    """Whether the command line named `hint` led last time to an answer the cache still holds (a
    guess about this run, used only to skip starting DeepSpeed's import early)."""
    folder = _folder("validated")
    if folder is None:
        return False
    try:
        key = (folder / "commands" / hint).read_text().strip()
    except OSError:
        return False
    return len(key) == 64 and (folder / f"{key}.json").is_file()


def link(hints: list[str], request: dict) -> None:
    """Note that the command line named in `hints` (none or one) led to `request`."""
    folder = _folder("validated")
    if folder is not None and hints:
        _write(folder / "commands" / hints[0], request_key(request) + "\n")


# ---------------------------------------------------------------- allocator replays

# At most this many replays are kept (the newest; a few hundred bytes each).
MAX_REPLAYS = 4096


def _core_digest() -> str:
    """A hash of the core's source: the memory model that computed a replay."""
    core = Path(__file__).parent.parent / "core"
    digest = hashlib.sha256()
    for path in sorted(core.glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:32]


class ReplayStore:
    """Replays kept across runs (zeroplan.core.memory.use_replay_store): `get`/`put` by the
    replay's inputs, `flush` writes what was added (atomically, merged with what another run
    wrote meanwhile, the newest MAX_REPLAYS kept)."""

    def __init__(self, folder: Path):
        self.path = folder / f"replays-{_core_digest()}.json"
        self._entries = self._read()
        self._added: dict[str, list[int]] = {}

    @classmethod
    def open(cls) -> "ReplayStore | None":
        """The user's store, or None when caching is off or the core's source cannot be read."""
        folder = _folder("replays")
        if folder is None:
            return None
        try:
            return cls(folder)
        except OSError:
            return None

    def _read(self) -> dict[str, list[int]]:
        try:
            entries = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(entries, dict):
            return {}
        return {key: value for key, value in entries.items()
                if isinstance(value, list) and len(value) == 3 and all(isinstance(v, int) for v in value)}

    @staticmethod
    def _key(inputs: str) -> str:
        return hashlib.sha256(inputs.encode()).hexdigest()[:40]

    def get(self, inputs: str) -> tuple[int, int, int] | None:
        """The replay's (peak reserved, peak allocated, tracked peak allocated) for `inputs` (the
        replay's arguments as text), or None."""
        found = self._entries.get(self._key(inputs))
        return None if found is None else (found[0], found[1], found[2])

    def put(self, inputs: str, peaks: tuple[int, int, int]) -> None:
        key = self._key(inputs)
        self._entries[key] = self._added[key] = [int(p) for p in peaks]

    def flush(self) -> None:
        """Write the replays this run added; replays of an older core's source are removed."""
        if not self._added:
            return
        merged = {**self._read(), **self._added}
        kept = dict(list(merged.items())[-MAX_REPLAYS:])
        if _write(self.path, json.dumps(kept, separators=(",", ":"))):
            for stale in self.path.parent.glob("replays-*.json"):
                if stale != self.path:
                    try:
                        stale.unlink(missing_ok=True)
                    except OSError:
                        pass
        self._added = {}
