"""Write tuned DeepSpeed configs (InternVL's set, or those a TOML spec lists), validated by DeepSpeed.

Without --spec: counterparts of InternVL's zero_stage1/2/3 configs (and _34b, _100b), each tuned
for its size class. With --spec FILE.toml: one config per [[config]] table, e.g.

    [[config]]
    model = "8b"
    gpus = 8
    stage = 1            # leave out to let the planner choose (then global_batch, gpu)
    micro_batch = 4
    gradient_accumulation = 4

Every config passes DeepSpeed's own validation before anything is written, and all files are
written atomically. --check writes nothing: it regenerates in memory and exits 1 with a unified
diff per file that differs, is missing or is extra (0 when the folder is up to date).
"""

from __future__ import annotations

import difflib
import math
import tomllib
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from zeroplan.core.bounded import read_bounded, read_text_bounded
from zeroplan.core.errors import InvalidInput

SPEC_KEYS = {
    "name", "model", "gpus", "gpus_per_node", "stage", "micro_batch", "gradient_accumulation", "global_batch",
    "gpu", "flavour", "optimizer", "offload_optimizer", "offload_params", "seq_len", "tiles", "freeze",
    "lora_rank", "gradient_clipping", "lr", "weight_decay",
}
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


def _planned(profile, shape, base, entry: dict[str, Any]):
    """Stage, micro-batch and accumulation from the planner. Its candidates carry tuned buckets
    (tuning.tuned_plan), and the config is rendered from the chosen plan as it is, so it holds
    exactly the buckets whose memory the planner predicted."""
    from zeroplan.core.planner import recommend
    from zeroplan.core.profiles import DEFAULT_GPU, load_gpu

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
    from zeroplan.cli.options import build_shape
    from zeroplan.core.dsconfig import render
    from zeroplan.core.plan import Plan, cluster
    from zeroplan.core.profiles import load_model

    out: dict[str, tuple[dict[str, Any], int]] = {}
    for entry in entries:
        _check_entry_types(entry)
        profile = load_model(str(entry["model"]))
        shape = build_shape(entry.get("micro_batch", 1), entry.get("seq_len", 8192), entry.get("tiles", 7), True,
                            list(entry.get("freeze", [])), entry.get("lora_rank", 0), profile)
        per_node, nodes = cluster(entry["gpus"], None, entry.get("gpus_per_node"))
        base = Plan(stage=entry.get("stage", 3), gpus_per_node=per_node, nodes=nodes,
                    offload_optimizer=entry.get("offload_optimizer", "none"),
                    offload_params=entry.get("offload_params", "none"))
        if "stage" in entry:
            plan, micro, accum, tune = base, shape.micro_batch, entry.get("gradient_accumulation", 1), True
        else:
            (plan, micro, accum), tune = _planned(profile, shape, base, entry), False
        name = str(entry.get("name") or f"{profile.name.lower()}_{plan.world_size}gpus_zero{plan.stage}.json")
        if Path(name).name != name or not name.endswith(".json"):
            raise InvalidInput(f"config name '{name}' must be a plain file name ending in .json")
        if name in out:
            raise InvalidInput(f"two spec entries write {name}; give one of them a 'name'")
        extra = {k: entry[k] for k in ("gradient_clipping", "lr", "weight_decay", "optimizer") if k in entry}
        out[name] = (render(profile, shape, plan, micro, accum, flavour=str(entry.get("flavour", flavour)),
                            tune=tune, **extra), plan.world_size)
    return out


def validated(configs: dict[str, tuple[dict[str, Any], int | None]]) -> dict[str, str]:
    """Each config through DeepSpeed's validation on its world size (an error names the file),
    as file text."""
    from zeroplan.adapters.deepspeed_adapter import validate_config
    from zeroplan.core.dsconfig import to_json
    from zeroplan.core.errors import InvalidConfig

    texts: dict[str, str] = {}
    for name, (config, world_size) in configs.items():
        try:
            validate_config(config, world_size)
        except InvalidConfig as error:
            raise InvalidConfig(f"{name}: {error}") from None
        texts[name] = to_json(config)
    return texts


def unmanaged_files(out: Path, texts: dict[str, str]) -> list[str]:
    """JSON files in the folder that this set does not generate: not drift (generate never writes
    or removes them, so counting them would fail --check for ever), only named."""
    return sorted(p.name for p in out.glob("*.json") if p.name not in texts) if out.is_dir() else []


def diff_folder(out: Path, texts: dict[str, str]) -> list[str]:
    """Unified diffs between the generated files and the folder's copies of them (a missing file
    diffs against nothing); other files in the folder are not compared (unmanaged_files)."""
    existing = {name for name in texts if (out / name).is_file()}
    diffs: list[str] = []
    for name in sorted(texts):
        path = out / name
        old = read_bounded(path, MAX_SPEC_BYTES, "config").decode("utf-8", errors="replace") if name in existing else ""
        new = texts.get(name, "")
        if old != new:
            diffs.append("".join(difflib.unified_diff(
                old.splitlines(keepends=True), new.splitlines(keepends=True),
                fromfile=str(path) if name in existing else "/dev/null",
                tofile=f"generated/{name}" if name in texts else "/dev/null")))
    return diffs


Out = Annotated[Path, typer.Option("--out", help="Folder to write the configs into.")]
Flavour = Annotated[Optional[str], typer.Option(
    "--flavour", help="hf (\"auto\" where the HF Trainer fills; default without --spec) or concrete.")]
Spec = Annotated[Optional[Path], typer.Option(
    "--spec", help="TOML spec: one config table per file to write (see benchmarks/configsets/).")]
Check = Annotated[bool, typer.Option("--check", help="Write nothing; exit 1 with a diff if the folder is out of date.")]


def command(out: Out, flavour: Flavour = None, spec: Spec = None, check: Check = False):
    """Write tuned DeepSpeed configs (InternVL's set, or those a TOML spec lists), validated by DeepSpeed."""
    from zeroplan.core.atomic import write_files_atomic
    from zeroplan.core.dsconfig import FLAVOURS, config_set

    if out.exists() and not out.is_dir():
        raise InvalidInput(f"--out {out} is a file, not a folder")
    if spec is not None:
        spec_flavour, entries = read_spec(spec)
        chosen = flavour or spec_flavour or "concrete"
    else:
        chosen = flavour or "hf"
    if chosen not in FLAVOURS:
        raise InvalidInput(f"--flavour must be one of {', '.join(FLAVOURS)}, got {chosen!r}")
    if spec is not None:
        configs = spec_configs(entries, chosen)
    else:
        configs = {name: (config, None) for name, config in config_set(chosen).items()}
    texts = validated(configs)
    if check:
        diffs = diff_folder(out, texts)
        others = unmanaged_files(out, texts)
        if others:
            typer.echo(f"{out}: not generated by this set, not compared: {', '.join(others)}")
        for diff in diffs:
            typer.echo(diff, nl=False)
        if diffs:
            typer.echo(f"zeroplan: {len(diffs)} config file(s) in {out} differ from what zeroplan generates; "
                       f"run `zeroplan generate --out {out}` and commit the result", err=True)
            return 1
        typer.echo(f"{out}: {len(texts)} config file(s) up to date")
        return 0
    write_files_atomic({out / name: text for name, text in texts.items()})
    for name in texts:
        typer.echo(str(out / name))
    return 0
