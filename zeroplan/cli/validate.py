"""Check a DeepSpeed config with DeepSpeed's own schema and predict whether it fits a model and cluster.

Prints DeepSpeed's verdict on the config, the "auto" fields the HF Trainer will fill, and the
predicted per-GPU peak for the plan the config describes (stage, offload, buckets, micro-batch)
with the margin left on the GPU. Exit status 0 when it fits, 3 when it does not, 2 on bad input
(missing or malformed file, a config DeepSpeed rejects, batch sizes that disagree with --gpus).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from zeroplan.cli import options as o
from zeroplan.core.bounded import read_text_bounded
from zeroplan.core.ds_keys import DEEPSPEED_VERSION, unknown_top_level_keys
from zeroplan.core.errors import DoesNotFit, InvalidConfig, InvalidInput, ZeroplanError

MAX_CONFIG_BYTES = 1 << 20
AutoMicroBatch = Annotated[Optional[int], typer.Option(
    "--micro-batch", help="Micro-batch where the config says \"auto\" (default 1).")]
AutoAccumulation = Annotated[Optional[int], typer.Option(
    "--grad-accum", help="Accumulation where the config says \"auto\" (default 1).")]


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise InvalidConfig(f"duplicate key '{key}'")
        seen[key] = value
    return seen


def read_config(path: Path) -> dict[str, Any]:
    """The config file as a dict; a missing, unreadable, malformed or non-object file raises
    InvalidConfig with one line (duplicate keys too, as DeepSpeed's own loader refuses them)."""
    text = read_text_bounded(path, MAX_CONFIG_BYTES, "config file", InvalidConfig)
    try:
        config = json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as error:
        raise InvalidConfig(f"{path} is not valid JSON: {error.msg} at line {error.lineno} "
                            f"column {error.colno}") from None
    except InvalidConfig as error:
        raise InvalidConfig(f"{path}: {error}") from None
    except RecursionError:
        raise InvalidConfig(f"{path} is nested too deeply to be a DeepSpeed config") from None
    except ValueError as error:  # an integer too long for int(), past Python's digit limit
        raise InvalidConfig(f"{path} is not a usable JSON config: {str(error).splitlines()[0]}") from None
    if not isinstance(config, dict):
        raise InvalidConfig(f"{path} holds a JSON {type(config).__name__}, not an object; "
                            "a DeepSpeed config is an object")
    return config


def _print_report(path: Path, autos: list[str], payload: dict[str, Any]) -> None:
    typer.echo(f"{path}: DeepSpeed accepts it (ZeRO stage {payload['stage']}, micro-batch {payload['micro_batch']}, "
               f"accumulation {payload['gradient_accumulation']}, {payload['world_size']} GPUs)")
    typer.echo(f"\"auto\" fields (filled by the HF Trainer): {', '.join(autos) if autos else 'none'}")
    gib = o.gib
    typer.echo(f"predicted per-GPU peak on {payload['gpu']}: {gib(payload['per_gpu_bytes']['peak'])} GiB "
               f"of {gib(payload['usable_bytes'])} GiB usable ({gib(payload['capacity_bytes'])} GiB less "
               f"{payload['headroom']:.0%} kept free)")
    for key in payload["unknown_keys"]:
        typer.echo(f"unknown top-level key (DeepSpeed {DEEPSPEED_VERSION} ignores it silently): {key}")
    sign = "left" if payload["fits"] else "short"
    typer.echo(f"verdict: {payload['verdict']} ({gib(abs(payload['margin_bytes']))} GiB {sign}, "
               f"{abs(payload['margin_percent'])} % of the GPU)")


def _check_trainer(config: dict, text: str, trainer: str, world_size: int):
    """HfTrainerDeepSpeedConfig on the config and the arguments; each mismatch the Trainer would
    refuse is one line on stderr, then InvalidConfig (exit 2)."""
    from zeroplan.adapters.hf_trainer import check
    from zeroplan.core.trainers import load_stack, script_arguments

    stack = load_stack(trainer)
    checked = check(config, script_arguments(text), world_size, stack.script_flags)
    for line in checked.mismatches:
        typer.echo(f"zeroplan: HF Trainer mismatch: {line}", err=True)
    if checked.mismatches:
        raise InvalidConfig(f"the HF Trainer would refuse to train with this config and these arguments "
                            f"({len(checked.mismatches)} mismatch(es) above); set those values to \"auto\" or make "
                            f"them agree")
    return checked


def _checkpointing(checked, text: str, trainer: str) -> tuple[bool, int | None]:
    """(grad_ckpt, ckpt_layers) the arguments set: InternVL's --grad_checkpoint (default True)
    checkpoints the LLM's layers, its vision encoder always (0 LLM layers when off); elsewhere
    TrainingArguments' gradient_checkpointing, every layer or none."""
    from zeroplan.core.trainers import script_arguments

    argv = script_arguments(text)
    if trainer == "internvl":
        at = argv.index("--grad_checkpoint") if "--grad_checkpoint" in argv else -1
        llm = at < 0 or at + 1 >= len(argv) or argv[at + 1].lower() not in ("false", "0", "no")
        return True, None if llm else 0
    return checked.gradient_checkpointing, None


def _zeroplan_spec(text: str):
    """The RunSpec that zeroplan's runner line names (--spec FILE): the zeroplan stack's plan
    (kernels, compiled layers, checkpointed layers) is there, not in trainer arguments."""
    from zeroplan.core.run import RunSpec
    from zeroplan.core.trainers import script_arguments

    argv = script_arguments(text)
    if "--spec" not in argv or argv.index("--spec") + 1 >= len(argv):
        raise InvalidInput("--trainer zeroplan: --trainer-args must name the run's spec (--spec RUN.json), "
                           "as recommend's zeroplan launch lines do")
    path = Path(argv[argv.index("--spec") + 1])
    try:
        return RunSpec.from_json(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise InvalidInput(f"--trainer-args: cannot read the spec {path}: {error.strerror}") from None


def command(
    config_path: Annotated[Path, typer.Argument(metavar="CONFIG.json", help="The DeepSpeed config to check.")],
    model: o.Model,
    gpus: o.Gpus = None,
    nodes: o.Nodes = None,
    gpus_per_node: o.GpusPerNode = None,
    gpu: o.Gpu = None,
    seq_len: o.SeqLen = 4096,
    tiles: o.Tiles = 7,
    grad_ckpt: Annotated[bool, typer.Option("--grad-ckpt/--no-grad-ckpt", help="Gradient checkpointing.")] = True,
    freeze: o.Freeze = None,
    lora_rank: o.LoraRank = 0,
    micro_batch: AutoMicroBatch = None,
    grad_accum: AutoAccumulation = None,
    headroom: o.Headroom = 0.05,
    trainer_args: Annotated[Optional[str], typer.Option(
        "--trainer-args", help="The training script's arguments, or a whole launch line: checked with the config "
                               "by transformers' HfTrainerDeepSpeedConfig, as the HF Trainer will.")] = None,
    trainer: o.Trainer = "internvl",
    json_out: o.Json = False,
):
    """Check a DeepSpeed config with DeepSpeed's own schema and predict whether it fits a model and cluster."""
    from zeroplan.adapters.deepspeed_adapter import validate_config
    from zeroplan.adapters.deepspeed_adapter import estimator_quietly
    from zeroplan.core.steptime import step_time
    from zeroplan.core.summary import plan_summary
    from zeroplan.core.config_reader import plan_from_config
    from zeroplan.adapters.gpus import choose_gpu
    from zeroplan.core.memory import estimate
    from zeroplan.core.plan import cluster
    from zeroplan.core.profiles import load_gpu, load_model, pad_vocab

    per_node, node_count = cluster(gpus, nodes, gpus_per_node)
    profile = load_model(model)
    if gpu is not None:
        load_gpu(gpu)
    o.check_fraction("--headroom", headroom)
    ckpt_layers = None
    config = read_config(config_path)
    unknown = unknown_top_level_keys(config)
    try:
        autos = validate_config(config, per_node * node_count)
        spec = None
        if trainer_args is not None and trainer == "zeroplan":
            spec = _zeroplan_spec(trainer_args)
            micro_batch, grad_accum = spec.micro_batch, spec.gradient_accumulation
        elif trainer_args is not None:
            checked = _check_trainer(config, trainer_args, trainer, per_node * node_count)
            micro_batch, grad_accum = checked.micro_batch, checked.gradient_accumulation
            grad_ckpt, ckpt_layers = _checkpointing(checked, trainer_args, trainer)
        plan, micro, accum = plan_from_config(config, per_node, node_count, hidden_size=profile.llm.hidden_size,
                                              micro_batch=micro_batch, gradient_accumulation=grad_accum)
    except ZeroplanError as error:
        if not unknown:
            raise
        raise type(error)(f"{error}; the config also has top-level keys DeepSpeed ignores: "
                          f"{', '.join(unknown)}") from None
    shape = o.build_shape(micro, seq_len, tiles, grad_ckpt, freeze, lora_rank, profile)
    if spec is not None:  # the runner's recipe: fused loss, compiled layers, checkpointed layers, packing
        shape = spec.shape()
        plan = replace(plan, optimizer_group_elems=spec.optimizer_group_elems)
        profile = pad_vocab(profile, spec.vocab_multiple)
    elif trainer_args is not None:
        shape = replace(shape, ckpt_layers=ckpt_layers)
    chosen = choose_gpu(gpu)
    memory = estimate(profile, shape, plan, chosen.profile, gradient_accumulation=accum)
    step = step_time(profile, shape, plan, chosen.profile, accum)
    payload = plan_summary(profile, shape, plan, chosen.profile.name, chosen.origin, memory, step, accum,
                           estimator_quietly(profile, shape, plan), headroom)
    payload.update(config=str(config_path), deepspeed_valid=True, auto_fields=autos, unknown_keys=unknown)
    if json_out:
        o.print_json(payload)
    else:
        _print_report(config_path, autos, payload)
    return 0 if payload["fits"] else DoesNotFit.exit_code
