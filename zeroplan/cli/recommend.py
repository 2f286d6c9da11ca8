"""Recommend the fastest ZeRO plan that fits, explain the runners-up, write its DeepSpeed config."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from zeroplan.cli import options as o

ENTRY = "internvl/train/internvl_chat_finetune.py"


def _launch_lines(plan, config_path: str) -> dict[str, str]:
    try:
        from zeroplan.core.launch import launch_lines
    except ImportError:
        return {}
    return launch_lines(plan, ENTRY, config_path)


def _render_config(profile, candidate, flavour: str, validator) -> tuple[dict, str]:
    from zeroplan.core.dsconfig import render

    config = render(profile, candidate.shape, candidate.plan, candidate.shape.micro_batch,
                    candidate.gradient_accumulation, flavour=flavour)
    _, note = validator.validate(config, candidate.plan.world_size)
    return config, note


def _payload(result, profile, chosen, config, out_path, launches) -> dict:
    best = result.best
    alternatives = []
    for candidate in result.others:
        entry = candidate.summary()
        entry["rejected_because"] = candidate.rejected_because
        alternatives.append(entry)
    return {
        "model": profile.name, "gpu": chosen.profile.name, "gpu_origin": chosen.origin,
        "world_size": best.plan.world_size, "gpus_per_node": best.plan.gpus_per_node, "nodes": best.plan.nodes,
        "global_batch": result.global_batch, "seq_len": best.shape.seq_len, "tiles": best.shape.tiles,
        "budget_bytes": result.budget_bytes,
        "recommended": {**best.summary(), "per_gpu_bytes": best.memory.per_gpu_bytes(),
                        "step_time": best.time.as_dict()},
        "alternatives": alternatives, "deepspeed_config": config, "config_path": str(out_path),
        "launch": launches,
    }


def _recipe(given, profile, best, gpu) -> list[str]:
    """How to train so the prediction holds: the speed settings the recommended plan assumes, and
    what padding a misaligned vocabulary would gain (predicted)."""
    from dataclasses import replace

    from zeroplan.core.profiles import pad_vocab
    from zeroplan.core.steptime import ALIGNED_VOCAB_MULTIPLE, step_time

    shape = best.shape
    lines = []
    layers = profile.llm.num_layers
    if shape.grad_ckpt and shape.llm_ckpt_layers(layers) < layers:
        lines.append(f"checkpoint every vision layer and only the first {shape.llm_ckpt_layers(layers)} of the "
                     f"{layers} LLM decoder layers (set gradient_checkpointing = False on layers "
                     f"{shape.llm_ckpt_layers(layers)}-{layers - 1} after gradient_checkpointing_enable)")
    if best.plan.optimizer_group_elems:
        lines.append(f"give the optimizer its parameters in consecutive groups of at most "
                     f"{best.plan.optimizer_group_elems:,} elements (same settings in each): DeepSpeed's "
                     f"ZeRO-{best.plan.stage} step then converts one group's gradients to fp32 at a time, "
                     f"which the plan needs to fit")
    if best.gradient_accumulation > 1:
        lines.append(f"gradient accumulation {best.gradient_accumulation} (one optimizer step per "
                     f"{best.gradient_accumulation} micro-batches: DeepSpeed's per-step work is spread over them)")
    if shape.compiled:
        lines.append("torch.compile each LLM decoder layer and vision encoder layer (regional compilation)")
    if shape.kernels == "liger-loss":
        lines.append("Liger-Kernel's fused linear cross-entropy for the loss (the tokens × vocabulary logits never exist)")
    if shape.packed:
        lines.append("packed rows with varlen attention (torch.nn.attention.varlen; samples do not attend across)")
    if profile.llm.vocab_size != given.llm.vocab_size:
        lines.append(f"vocabulary padded from {given.llm.vocab_size:,} to {profile.llm.vocab_size:,} rows")
    elif profile.llm.vocab_size % ALIGNED_VOCAB_MULTIPLE:
        faster = step_time(pad_vocab(profile, 128), replace(shape), best.plan, gpu, best.gradient_accumulation)
        gain = best.time.step_s / faster.step_s - 1
        lines.append(f"the vocabulary ({profile.llm.vocab_size:,}) is not a multiple of {ALIGNED_VOCAB_MULTIPLE}: "
                     f"--pad-vocab 128 is predicted {gain:.0%} faster (aligned LM head products)")
    return lines


def _communication(profile, result, gpu) -> dict:
    """The recommended plan's collectives and network assumption; on several nodes, the fitting
    plan that would win at other inter-node bandwidths."""
    from zeroplan.core.commreport import bandwidth_sensitivity, communication

    best = result.best
    comm = communication(profile, best.shape, best.plan, gpu, best.gradient_accumulation)
    if best.plan.nodes > 1:
        fitting = [(c.plan, c.shape, c.gradient_accumulation) for c in (best, *result.others) if c.fits]
        comm["by_inter_node_bandwidth"] = bandwidth_sensitivity(profile, gpu, fitting, comm["node_nic_gbit"])
    return comm


def _ckpt(summary: dict) -> str:
    """on, off, or the number of decoder layers checkpointed."""
    if not summary["grad_ckpt"]:
        return "off"
    return "on" if summary.get("ckpt_layers") is None else f"{summary['ckpt_layers']} layers"


def _print(payload: dict, result) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    best = payload["recommended"]
    console.print(f"[dim]{payload['gpu_origin']}[/dim]")
    console.print(
        f"[bold]{payload['model']} on {payload['world_size']} × {payload['gpu']}[/bold] "
        f"({payload['nodes']} node(s) × {payload['gpus_per_node']}), global batch {payload['global_batch']}, "
        f"{payload['seq_len']} tokens, {payload['tiles']} tiles per sample")
    console.print(
        f"[bold green]Recommended: ZeRO-{best['stage']}[/bold green], micro-batch {best['micro_batch']} × "
        f"accumulation {best['gradient_accumulation']}, checkpointing {_ckpt(best)}, "
        f"offload optimizer {best['offload_optimizer']} / params {best['offload_params']}")
    console.print(f"  predicted peak {o.gib(best['predicted_peak_bytes'])} GiB of {o.gib(payload['budget_bytes'])} "
                  f"usable; step {best['predicted_step_s']:.2f} s; {best['predicted_tokens_per_s']:,.0f} tokens/s "
                  f"({best['predicted_mfu']:.0%} MFU"
                  f"{', counting attention across whole packed rows: an upper bound' if best['packed'] else ''})")
    for line in payload["recipe"]:
        console.print(f"  [cyan]•[/cyan] {line}")
    table = Table(title="per-GPU memory of the recommended plan")
    table.add_column("term")
    table.add_column("GiB", justify="right")
    for key, value in best["per_gpu_bytes"].items():
        table.add_row(key, o.gib(value))
    console.print(table)
    runners = Table(title="runners-up (best 12)")
    for column in ("stage", "micro", "accum", "ckpt", "loss", "offload", "peak GiB", "tokens/s", "why not"):
        runners.add_column(column)
    for alt in payload["alternatives"][:12]:
        runners.add_row(str(alt["stage"]), str(alt["micro_batch"]), str(alt["gradient_accumulation"]),
                        _ckpt(alt), "fused" if alt["loss"] != "eager" else "eager",
                        f"{alt['offload_optimizer']}/{alt['offload_params']}",
                        o.gib(alt["predicted_peak_bytes"]), f"{alt['predicted_tokens_per_s']:,.0f}",
                        alt["rejected_because"])
    console.print(runners)
    from zeroplan.cli.network_view import print_communication

    print_communication(payload["communication"], payload["communication"].get("by_inter_node_bandwidth"))
    console.print(f"DeepSpeed config written to [bold]{payload['config_path']}[/bold] ({payload['validation']})")
    for launcher, line in payload["launch"].items():
        console.print(f"[dim]{launcher}:[/dim] {line}", soft_wrap=True)


def command(
    model: o.Model,
    gpus: o.Gpus = None,
    nodes: o.Nodes = None,
    gpus_per_node: o.GpusPerNode = None,
    gpu: o.Gpu = None,
    global_batch: Annotated[int, typer.Option("--global-batch", help="Samples per optimizer step (InternVL: 128).")] = 128,
    seq_len: o.SeqLen = 4096,
    tiles: o.Tiles = 7,
    freeze: o.Freeze = None,
    lora_rank: o.LoraRank = 0,
    headroom: Annotated[float, typer.Option("--headroom", help="Fraction of GPU memory kept free.")] = 0.05,
    no_offload: Annotated[bool, typer.Option("--no-offload", help="Never offload to the CPU.")] = False,
    flavour: Annotated[str, typer.Option("--flavour", help="concrete or hf (HF Trainer 'auto' fields).")] = "concrete",
    out: Annotated[Path, typer.Option("--out", help="Where to write the DeepSpeed config.")] = Path("ds_config.json"),
    plain: Annotated[bool, typer.Option("--plain", help="Plan the plain transformers loop: no torch.compile, no fused loss.")] = False,
    packed: Annotated[bool, typer.Option("--packed", help="Rows pack several samples (varlen attention, no attention across them).")] = False,
    pad_vocab: Annotated[int, typer.Option("--pad-vocab", help="Pad the vocabulary to a multiple of this (1: as is; 128 aligns the LM head).")] = 1,
    json_out: o.Json = False,
    cluster: o.Cluster = None,
    inter_node_gbps: o.InterNodeGbps = None,
    nics_per_node: o.NicsPerNode = None,
    nic_gbit: o.NicGbit = None,
):
    """Recommend the fastest ZeRO plan that fits, explain the runners-up, write its DeepSpeed config."""
    from zeroplan.adapters.validator_process import take
    from zeroplan.core.atomic import write_atomic
    from zeroplan.core.dsconfig import to_json
    from zeroplan.core.errors import DoesNotFit, InvalidInput
    from zeroplan.adapters.gpus import choose_gpu
    from zeroplan.core.planner import recommend
    from zeroplan.core.profiles import load_model

    from dataclasses import replace

    from zeroplan.core.profiles import pad_vocab as padded

    if isinstance(pad_vocab, bool) or not 1 <= pad_vocab <= 4096:
        raise InvalidInput(f"--pad-vocab must be a whole number from 1 to 4096, got {pad_vocab}")
    given = load_model(model)
    profile = padded(given, pad_vocab)
    shape = replace(o.build_shape(1, seq_len, tiles, True, freeze, lora_rank, profile), packed=packed)
    base = o.build_plan(0, gpus, nodes, gpus_per_node,
                        network=o.build_network(cluster, inter_node_gbps, nics_per_node, nic_gbit))
    o.check_fraction("--headroom", headroom)
    if flavour not in ("concrete", "hf"):
        raise InvalidInput(f"--flavour must be concrete or hf, got {flavour!r}")
    validator = take()
    try:
        chosen = choose_gpu(gpu)
        try:
            result = recommend(profile, shape, base, chosen.profile, global_batch, headroom,
                               allow_offload=not no_offload, speed=not plain)
        except DoesNotFit as error:
            typer.echo(f"zeroplan: {error}", err=True)
            for suggestion in error.suggestions:
                typer.echo(f"  would fit with: {suggestion}", err=True)
            return 3
        config, note = _render_config(profile, result.best, flavour, validator)
    finally:
        validator.close()
    write_atomic(out, to_json(config))
    payload = _payload(result, profile, chosen, config, out, _launch_lines(result.best.plan, str(out)))
    payload["validation"] = note or "validated by DeepSpeed's config classes"
    payload["recipe"] = _recipe(given, profile, result.best, chosen.profile)
    payload["communication"] = _communication(profile, result, chosen.profile)
    if json_out:
        o.print_json(payload)
    else:
        _print(payload, result)
    return 0
