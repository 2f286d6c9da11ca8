"""What a `zeroplan bench` result line really ran, read back for calibration and the accuracy
report: its model profile (vocabulary padded as the runner padded it), its shape with the tiles of
its largest micro-batch, and the tiles of every step.

The memory peak follows the largest micro-batch a run drew, not the spec's `tiles`: the runner's
first synthetic draw (commit 6c22da7, until 7f0861d) spread tiles around the spec's value, up to
tiles + 3. Newer records list every step's tiles (`step_tiles`); for older ones the deterministic
draw is replayed and accepted only where it reproduces the recorded `tiles_per_sample`.
"""

from __future__ import annotations

import dataclasses
import random

from zeroplan.core.plan import TrainShape
from zeroplan.core.run import RunSpec
from zeroplan.core.profiles import ModelProfile, load_model

# Commit 7f0861d (runner: tiles is the most a sample holds) replaced the first draw rule.
FIRST_DRAW_RULE_UNTIL = "2026-11-25T13:19:21+00:00"
# Replaying a run's draws costs one Random per sample of every step on every rank; a record claiming
# 10^12 steps or 10^9 ranks would loop for ever, so past this many draws the spec's tiles are used.
MAX_REPLAYED_DRAWS = 1_000_000


def _replayable(spec: dict) -> bool:
    draws = spec["steps"] * spec.get("world_size", 1) * spec["micro_batch"]
    return draws <= MAX_REPLAYED_DRAWS


def _first_draw_tiles(rng: random.Random, tiles: int, fixed: bool) -> int:
    """The runner's first synthetic draw (commit 6c22da7, used until 7f0861d): uniform on
    tiles ± min(tiles - 1, 3), so `tiles` was a mean and a sample could hold up to tiles + 3."""
    if fixed or tiles <= 1:
        return tiles
    spread = min(tiles - 1, 3)
    return rng.randint(tiles - spread, tiles + spread)


def _replayed_step_tiles(spec: dict, tokens_per_tile: int, draw) -> list[int]:
    """Tiles of every micro-batch of every step, summed over ranks as the runner's step records
    are (zeroplan.runner.data.SyntheticData: one Random per sample keyed on seed, rank and index)."""
    from zeroplan.runner.data import SYNTHETIC_POOL

    fit = max(0, (spec["seq_len"] - 4) // tokens_per_tile)
    world, rows = spec.get("world_size", 1), spec["micro_batch"]
    per_step = []
    for step in range(spec["steps"]):
        total = 0
        for rank in range(world):
            for row in range(rows):
                key = (spec.get("seed", 0) * 1_000_003 + rank) * 1_000_003 + (step * rows + row) % SYNTHETIC_POOL
                total += min(draw(random.Random(key), spec["tiles"], spec.get("fixed_tiles", False)), fit)
        per_step.append(total)
    return per_step


def step_tiles(record: dict) -> tuple[int, ...] | None:
    """Tiles of each step's micro-batch on one rank, as recorded or replayed (None when unknown)."""
    spec = record["spec"]
    if spec.get("world_size", 1) != 1:
        return None
    if record.get("step_tiles"):
        accumulation = spec.get("gradient_accumulation", 1)
        return tuple(tiles // accumulation for tiles in record["step_tiles"])
    source = drawn_tiles(record)[1]
    if source.startswith("spec") and spec["steps"] > MAX_REPLAYED_DRAWS:
        return None
    if source.startswith("spec"):
        return (spec["tiles"] * spec["micro_batch"],) * spec["steps"]
    draw = _first_draw_tiles if "first" in source else None
    if draw is None:
        from zeroplan.runner.data import draw_tiles as draw
    return tuple(_replayed_step_tiles(spec, load_model(record["model"]).tokens_per_tile, draw))


def drawn_tiles(record: dict) -> tuple[int, str]:
    """(tiles per sample of the run's largest micro-batch, where that number comes from).

    The memory peak follows the largest micro-batch the run drew, not the spec's `tiles`. Newer
    records list every step's tiles (`step_tiles`); for older synthetic runs the draw is replayed
    with each rule the runner has used and accepted only where it reproduces the recorded
    `tiles_per_sample` over the measured steps (a replay that matches nothing keeps the spec's value
    and says so)."""
    from zeroplan.runner.data import draw_tiles

    spec = record["spec"]
    rows = spec["micro_batch"] * spec.get("world_size", 1) * spec.get("gradient_accumulation", 1)
    if record.get("step_tiles"):
        return -(-max(record["step_tiles"]) // rows), "recorded step_tiles"
    if spec.get("dataset") or spec.get("packed") or spec.get("fixed_tiles") or spec["tiles"] <= 1:
        return spec["tiles"], "spec (fixed tiles)"
    if not _replayable(spec):
        return spec["tiles"], "spec (too many draws to replay)"
    tokens_per_tile = load_model(record["model"]).tokens_per_tile
    warmup, recorded = spec.get("warmup_steps", 0), record.get("tiles_per_sample")
    rules = (("replayed first draw rule (tiles ± 3)", _first_draw_tiles), ("replayed current draw rule", draw_tiles))
    if recorded is None:  # a run that failed records no tiles: the rule in force on its date
        first = str(record.get("date", "")) < FIRST_DRAW_RULE_UNTIL
        name, draw = rules[0] if first else rules[1]
        return -(-max(_replayed_step_tiles(spec, tokens_per_tile, draw)) // rows), name + " (by date)"
    for name, draw in rules:
        steps = _replayed_step_tiles(spec, tokens_per_tile, draw)
        measured = steps[warmup:] or steps
        if abs(sum(measured) / (len(measured) * rows) - recorded) < 1e-9:
            return -(-max(steps) // rows), name
    return spec["tiles"], "spec (draw not reproduced)"


def record_shape(record: dict) -> TrainShape:
    """The shape a result line really ran: its spec with tiles = the largest micro-batch's."""
    return _shape(record["spec"], drawn_tiles(record)[0])


def _shape(spec: dict, tiles: int) -> TrainShape:
    """The spec's TrainShape (as RunSpec builds it) with `tiles`."""
    known = {field.name for field in dataclasses.fields(RunSpec)}
    run = RunSpec.from_dict({key: value for key, value in spec.items() if key in known})
    return dataclasses.replace(run.shape(), tiles=tiles)


def record_profile(record: dict) -> ModelProfile:
    """The model profile a result line trained: its vocabulary padded as the runner did
    (`vocab_multiple`, zeroplan.core.profiles.pad_vocab)."""
    from zeroplan.core.profiles import pad_vocab

    return pad_vocab(load_model(record["model"]), int(record["spec"].get("vocab_multiple", 1)))




def spec_shape(record: dict) -> TrainShape:
    """The shape as the spec states it (tiles = the spec's value): what the step-time model was
    fitted on, since a step's time follows the mean tiles rather than the largest."""
    return _shape(record["spec"], record["spec"]["tiles"])


def gradient_accumulation(record: dict) -> int:
    """Micro-steps per optimizer step of the run."""
    return int(record["spec"].get("gradient_accumulation", 1))
