"""A team's config set as data: the TOML spec `zeroplan generate --spec` reads (one [[config]]
table per DeepSpeed config file), checked and rendered. Pure core: the verb parses its options,
calls spec_configs, has DeepSpeed validate the result and writes or diffs the files.

The keys a table shares with a run (RUN_KEYS) are RunSpec's own field names; the others
(CONFIG_KEYS) describe a config set only: file name, cluster, planner inputs, config flavour and
optimizer numbers.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

from zeroplan.core.bounded import read_text_bounded
from zeroplan.core.dsconfig import render
from zeroplan.core.errors import InvalidInput
from zeroplan.core.plan import Plan, cluster, shape_from_values
from zeroplan.core.planner import recommend
from zeroplan.core.profiles import DEFAULT_GPU, load_gpu, load_model
from zeroplan.core.run import RunSpec

# What a table shares with a run, under RunSpec's names (tests/test_generate_validate_cli.py holds
# them to RunSpec's fields); the defaults differ (a config set plans checkpointed 8192-token samples).
RUN_KEYS = frozenset({"model", "stage", "micro_batch", "gradient_accumulation", "gpu", "offload_optimizer",
                      "offload_params", "seq_len", "tiles", "lora_rank", "lr"}) & frozenset(f.name for f in fields(RunSpec))
CONFIG_KEYS = frozenset({"name", "gpus", "gpus_per_node", "global_batch", "flavour", "optimizer", "freeze",
                         "gradient_clipping", "weight_decay"})
SPEC_KEYS = RUN_KEYS | CONFIG_KEYS
MAX_SPEC_BYTES = 1 << 20


def read_spec(path: Path) -> tuple[str | None, list[dict[str, Any]]]:
    """The spec's default flavour and its [[config]] tables; nothing in it is executed."""
    text = read_text_bounded(path, MAX_SPEC_BYTES, "spec")
    try:
        data = tomllib.loads(text)
    except (ValueError, RecursionError) as error:  # TOMLDecodeError, bad UTF-8, huge ints are ValueErrors
        raise InvalidInput(f"cannot read spec {path}: {str(error).splitlines()[0] if str(error) else error}") from None
    entries = data.get("config")
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise InvalidInput(f"spec {path} needs at least one [[config]] table")
    unknown_top = set(data) - {"config", "flavour"}
    if unknown_top:
        raise InvalidInput(f"spec {path}: unknown key(s) {', '.join(sorted(unknown_top))}")
    for index, entry in enumerate(entries, 1):
        unknown = set(entry) - SPEC_KEYS
        if unknown:
            raise InvalidInput(f"spec {path}, config #{index}: unknown key(s) {', '.join(sorted(unknown))} "
                               f"(known: {', '.join(sorted(SPEC_KEYS))})")
        for key in ("model", "gpus"):
            if key not in entry:
                raise InvalidInput(f"spec {path}, config #{index}: '{key}' is required")
    flavour = data.get("flavour")
    return (str(flavour) if flavour is not None else None), entries


def planned(profile, shape, base, entry: dict[str, Any]):
    """Stage, micro-batch and accumulation from the planner. Its candidates carry tuned buckets
    (tuning.tuned_plan), and the config is rendered from the chosen plan as it is, so it holds
    exactly the buckets whose memory the planner predicted."""
    gpu = load_gpu(str(entry.get("gpu", DEFAULT_GPU)))
    global_batch = entry.get("global_batch")
    if global_batch is None:
        raise InvalidInput(f"{entry['model']}: without 'stage', give 'global_batch' for the planner")
    best = recommend(profile, shape, base, gpu, global_batch).best
    return best.plan, best.shape.micro_batch, best.gradient_accumulation


# The optimizer numbers a spec may set: the least and most each may be (lr > 0; a clipping of 0
# turns clipping off in DeepSpeed). NaN and infinities are refused: JSON has no such numbers.
NUMBER_RANGES = {"lr": (0.0, 1.0, False), "gradient_clipping": (0.0, 1e6, True), "weight_decay": (0.0, 1e6, True)}


def _check_entry_types(entry: dict[str, Any]) -> None:
    """Numbers must be finite numbers in range, freeze a list of names and a name plain text;
    the library checks the rest."""
    for key, (low, high, low_included) in NUMBER_RANGES.items():
        if key not in entry:
            continue
        value = entry[key]
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                or not (low <= value if low_included else low < value) or value > high):
            bound = f"{'from' if low_included else 'above'} {low:g} to {high:g}"
            raise InvalidInput(f"{entry['model']}: '{key}' must be a finite number {bound}, got {value!r}")
    name = entry.get("name")
    if name is not None and (not isinstance(name, str) or any(ord(c) < 0x20 or ord(c) == 0x7F for c in name)):
        raise InvalidInput(f"{entry['model']}: 'name' must be a file name without control characters, "
                           f"got {str(name)[:80]!r}")
    freeze = entry.get("freeze", [])
    if not isinstance(freeze, list) or not all(isinstance(t, str) for t in freeze):
        raise InvalidInput(f"{entry['model']}: 'freeze' must be a list of tower names, got {freeze!r}")


def spec_configs(entries: list[dict[str, Any]], flavour: str) -> dict[str, tuple[dict[str, Any], int]]:
    """Render every spec entry, with its world size; file names default to
    <model>_<gpus>gpus_zero<stage>.json."""
    out: dict[str, tuple[dict[str, Any], int]] = {}
    for entry in entries:
        _check_entry_types(entry)
        profile = load_model(str(entry["model"]))
        shape = shape_from_values(entry.get("micro_batch", 1), entry.get("seq_len", 8192), entry.get("tiles", 7), True,
                            list(entry.get("freeze", [])), entry.get("lora_rank", 0), profile)
        per_node, nodes = cluster(entry["gpus"], None, entry.get("gpus_per_node"))
        base = Plan(stage=entry.get("stage", 3), gpus_per_node=per_node, nodes=nodes,
                    offload_optimizer=entry.get("offload_optimizer", "none"),
                    offload_params=entry.get("offload_params", "none"))
        if "stage" in entry:
            plan, micro, accum, tune = base, shape.micro_batch, entry.get("gradient_accumulation", 1), True
        else:
            (plan, micro, accum), tune = planned(profile, shape, base, entry), False
        name = str(entry.get("name") or f"{profile.name.lower()}_{plan.world_size}gpus_zero{plan.stage}.json")
        if Path(name).name != name or not name.endswith(".json"):
            raise InvalidInput(f"config name '{name}' must be a plain file name ending in .json")
        if name in out:
            raise InvalidInput(f"two spec entries write {name}; give one of them a 'name'")
        extra = {k: entry[k] for k in ("gradient_clipping", "lr", "weight_decay", "optimizer") if k in entry}
        out[name] = (render(profile, shape, plan, micro, accum, flavour=str(entry.get("flavour", flavour)),
                            tune=tune, **extra), plan.world_size)
    return out
