"""Sweep definitions: a grid of run points (models × stages × micro-batch × checkpointing × offload ×
shape × frozen towers × LoRA) and the settings they share, from CLI flags or a sweep TOML file
under benchmarks/, expanded into the runner's RunSpecs. Pure: nothing here runs anything."""

from __future__ import annotations

import itertools
import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from zeroplan.core.bounded import read_text_bounded, require_file
from zeroplan.core.errors import InvalidInput
from zeroplan.core.profiles import load_model
from zeroplan.core.run import RunSpec

OFFLOADS = {"none": ("none", "none"), "optimizer": ("cpu", "none"), "optimizer+params": ("cpu", "cpu")}
LAUNCHERS = ("torchrun", "deepspeed")
MAX_SWEEP_BYTES = 1 << 20
# A sweep runs each point for minutes on a GPU: 10,000 points is months of GPU time already, and a
# few lines of TOML can describe 10^6 (every one built and hashed before anything runs).
MAX_SWEEP_POINTS = 10_000


@dataclass(frozen=True)
class Grid:
    """The axes of a sweep (every combination is a point) and the settings every point shares.

    The axes are lists of RunSpec values; `run` holds any other RunSpec field (steps,
    world_size, packed, ...). RunSpec declares them all, once: `run` is checked against it."""

    models: tuple[str, ...]
    stages: tuple[int, ...] = (0, 1, 2, 3)
    micro_batches: tuple[int, ...] = (1,)
    grad_ckpt: tuple[bool, ...] = (True,)
    offloads: tuple[str, ...] = ("none",)
    seq_lens: tuple[int, ...] = (4096,)
    tiles: tuple[int, ...] = (7,)
    frozen: tuple[tuple[str, ...], ...] = ((),)
    lora_ranks: tuple[int, ...] = (0,)
    run: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        for axis in ("models", "stages", "micro_batches", "grad_ckpt", "offloads", "seq_lens", "tiles",
                     "frozen", "lora_ranks"):
            if not getattr(self, axis):
                raise InvalidInput(f"sweep axis {axis!r} is empty")
        unknown = set(self.offloads) - set(OFFLOADS)
        if unknown:
            raise InvalidInput(f"offload must be one of {', '.join(OFFLOADS)}, got {', '.join(sorted(unknown))}")
        _reject_unknown(self.run, RUN_KEYS, "sweep [run]")
        object.__setattr__(self, "run", MappingProxyType(dict(self.run)))

    def size(self) -> int:
        """How many combinations the axes make (before offloads a stage cannot do are left out)."""
        return math.prod(len(getattr(self, axis)) for axis in ("models", "stages", "micro_batches", "grad_ckpt",
                                                                "offloads", "seq_lens", "tiles", "frozen",
                                                                "lora_ranks"))


@dataclass(frozen=True)
class Sweep:
    """A grid plus how its points are launched. `variants` (the TOML's [[variants]] tables) are
    sets of [run] settings and grid axes that replace the sweep's own; the grid is run once under each (e.g. the plain loop, then packing
    with varlen attention, then fused kernels), so before and after share one results file."""

    grid: Grid
    name: str = "sweep"
    launcher: str = "torchrun"
    timeout_s: float = 600.0
    variants: tuple[Grid, ...] = ()
    parallel: int = 1

    def grids(self) -> tuple[Grid, ...]:
        """The grid under each variant (the grid itself when there are none)."""
        return self.variants or (self.grid,)

    def expand(self) -> list[RunSpec]:
        """Every point of every variant, variant by variant, without repeats; more than
        MAX_SWEEP_POINTS combinations is refused before any is built."""
        combinations = sum(grid.size() for grid in self.grids())
        if combinations > MAX_SWEEP_POINTS:
            raise InvalidInput(f"the sweep has {combinations} grid combinations; at most {MAX_SWEEP_POINTS} "
                               "are accepted (split it into several sweeps)")
        specs, seen = [], set()
        for grid in self.grids():
            for spec in expand(grid):
                if spec.point_id() not in seen:
                    seen.add(spec.point_id())
                    specs.append(spec)
        return specs

    def __post_init__(self):
        if self.launcher not in LAUNCHERS:
            raise InvalidInput(f"launcher must be one of {', '.join(LAUNCHERS)}, got {self.launcher!r}")
        if (isinstance(self.timeout_s, bool) or not isinstance(self.timeout_s, (int, float))
                or not math.isfinite(self.timeout_s) or self.timeout_s <= 0):
            raise InvalidInput(f"timeout must be a positive number of seconds, got {self.timeout_s!r}")
        if isinstance(self.parallel, bool) or not isinstance(self.parallel, int) or not 1 <= self.parallel <= 16:
            raise InvalidInput(f"parallel must be a whole number from 1 to 16, got {self.parallel!r}")

    def check_parallel(self, specs: list[RunSpec]) -> None:
        """Points run side by side only when every one is a rehearsed rank (one process each):
        real runs need their GPUs to themselves."""
        if self.parallel > 1 and not all(spec.simulated for spec in specs):
            raise InvalidInput("parallel > 1 runs rehearsed points (simulate_world) side by side on one GPU; "
                               "this sweep has real runs, which need their GPUs to themselves")


def resolve_model(name: str) -> str:
    """The profile's canonical name for a bundled model, else the path as given (UnknownModel if
    it resolves to nothing), so `1b` and `InternVL2_5-1B` are the same point."""
    profile = load_model(name)
    if Path(name).suffix in (".toml", ".json"):
        return name
    return profile.name


def expand(grid: Grid) -> list[RunSpec]:
    """Every valid combination of the grid's axes, in grid order, as RunSpecs.

    Offloads a stage cannot do (optimizer offload at stage 0, parameter offload below stage 3)
    are left out rather than failed: a grid crossing stages with offloads means "where possible"."""
    if grid.size() > MAX_SWEEP_POINTS:
        raise InvalidInput(f"the sweep grid has {grid.size()} combinations; at most {MAX_SWEEP_POINTS} are accepted")
    models = tuple(dict.fromkeys(resolve_model(m) for m in grid.models))
    specs: list[RunSpec] = []
    seen: set[str] = set()
    for model, stage, micro_batch, grad_ckpt, offload, seq_len, tiles, frozen, lora_rank in itertools.product(
            models, grid.stages, grid.micro_batches, grid.grad_ckpt, grid.offloads, grid.seq_lens,
            grid.tiles, grid.frozen, grid.lora_ranks):
        offload_optimizer, offload_params = OFFLOADS[offload]
        if (offload_optimizer != "none" and stage == 0) or (offload_params != "none" and stage != 3):
            continue
        run = dict(grid.run)
        # where possible, as with offloads: layer counts need checkpointing, groups ZeRO-1/2
        if not grad_ckpt:
            run["ckpt_layers"] = None
        if stage not in (1, 2):
            run["optimizer_group_elems"] = 0
        spec = RunSpec(model=model, stage=stage, micro_batch=micro_batch, seq_len=seq_len, tiles=tiles,
                       grad_ckpt=grad_ckpt, frozen=tuple(frozen), lora_rank=lora_rank,
                       offload_optimizer=offload_optimizer, offload_params=offload_params, **run)
        if spec.point_id() not in seen:
            seen.add(spec.point_id())
            specs.append(spec)
    return specs


# [grid] key -> Grid axis -> the RunSpec field(s) it sets ("offload" sets both offload fields).
GRID_KEYS = {"models": "models", "stages": "stages", "micro_batch": "micro_batches", "grad_ckpt": "grad_ckpt",
             "offload": "offloads", "seq_len": "seq_lens", "tiles": "tiles", "frozen": "frozen",
             "lora_rank": "lora_ranks"}
AXIS_FIELDS = ("model", "stage", "micro_batch", "grad_ckpt", "offload_optimizer", "offload_params", "seq_len",
               "tiles", "frozen", "lora_rank")
# Every other RunSpec field is a [run] setting every point shares.
RUN_KEYS = tuple(f.name for f in fields(RunSpec) if f.name not in AXIS_FIELDS)
SWEEP_KEYS = ("name", "description", "launcher", "timeout_s", "grid", "run", "variants", "parallel")


def load_sweep(path: str | Path) -> Sweep:
    """Read a sweep TOML file (see benchmarks/): top-level name/launcher/timeout_s, a [grid] table
    of lists (the axes) and a [run] table of settings every point shares. Unknown keys are errors."""
    path = Path(path)
    require_file(path, "sweep file")
    text = read_text_bounded(path, MAX_SWEEP_BYTES, "sweep file")
    try:
        data = tomllib.loads(text)
    except (ValueError, RecursionError) as error:  # TOMLDecodeError, bad UTF-8, huge ints, deep nesting
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise InvalidInput(f"sweep file {path} is not valid TOML: {reason}") from None
    _reject_unknown(data, SWEEP_KEYS, str(path))
    grid_data, run_data = data.get("grid", {}), data.get("run", {})
    if not isinstance(grid_data, dict) or not isinstance(run_data, dict):
        raise InvalidInput(f"{path}: [grid] and [run] must be tables")
    _reject_unknown(grid_data, tuple(GRID_KEYS), f"{path} [grid]")
    _reject_unknown(run_data, RUN_KEYS, f"{path} [run]")
    if "models" not in grid_data:
        raise InvalidInput(f"{path} [grid]: 'models' is required")
    axes = {GRID_KEYS[key]: _axis(value, key, str(path)) for key, value in grid_data.items()}
    variants_data = data.get("variants", [])
    if not isinstance(variants_data, list) or not all(isinstance(v, dict) for v in variants_data):
        raise InvalidInput(f"{path}: variants must be [[variants]] tables of [run] settings")
    variants_axes, variants_run = [], []
    for index, variant in enumerate(variants_data):
        where = f"{path} [[variants]] #{index + 1}"
        _reject_unknown(variant, RUN_KEYS + tuple(GRID_KEYS), where)
        variants_axes.append({**axes, **{GRID_KEYS[key]: _axis(value, key, where)
                                         for key, value in variant.items() if key in GRID_KEYS}})
        variants_run.append({**run_data, **{key: value for key, value in variant.items() if key in RUN_KEYS}})
    try:
        grid = Grid(**axes, run=run_data)
        variants = tuple(Grid(**a, run=r) for a, r in zip(variants_axes, variants_run))
        return Sweep(grid=grid, name=str(data.get("name", path.stem)), launcher=data.get("launcher", "torchrun"),
                     timeout_s=data.get("timeout_s", 600.0), variants=variants, parallel=data.get("parallel", 1))
    except TypeError as error:
        raise InvalidInput(f"{path}: {error}") from None


def _reject_unknown(data: dict, known: tuple[str, ...], where: str) -> None:
    unknown = set(data) - set(known)
    if unknown:
        raise InvalidInput(f"{where}: unknown keys {', '.join(sorted(unknown))} (known: {', '.join(known)})")


def _axis(value: Any, key: str, where: str) -> tuple:
    """A grid axis: a non-empty list whose items have the type the axis takes."""
    if not isinstance(value, list) or not value:
        raise InvalidInput(f"{where} [grid]: {key!r} must be a non-empty list")
    kinds = {"models": str, "offload": str, "grad_ckpt": bool, "frozen": list}
    kind = kinds.get(key, int)
    for item in value:
        wrong_int = kind is int and isinstance(item, bool)
        if not isinstance(item, kind) or wrong_int:
            raise InvalidInput(f"{where} [grid]: {key!r} holds {item!r}, expected {kind.__name__} items")
    if key == "frozen":
        return tuple(tuple(sorted(towers)) for towers in value)
    return tuple(value)


def parse_list(text: str, kind: type, what: str) -> tuple:
    """A comma-separated CLI list (`1b,2b`, `0,1,2,3`, `on,off`) as a tuple of `kind`."""
    items = [item.strip() for item in text.split(",")]
    if not text.strip() or any(not item for item in items):
        raise InvalidInput(f"{what}: expected a comma-separated list, got {text!r}")
    if kind is str:
        return tuple(items)
    if kind is bool:
        words = {"on": True, "true": True, "yes": True, "1": True, "off": False, "false": False, "no": False, "0": False}
        if any(item.lower() not in words for item in items):
            raise InvalidInput(f"{what}: expected on/off values, got {text!r}")
        return tuple(words[item.lower()] for item in items)
    try:
        return tuple(int(item) for item in items)
    except ValueError:
        raise InvalidInput(f"{what}: expected whole numbers, got {text!r}") from None
