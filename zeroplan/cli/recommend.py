"""Recommend the fastest ZeRO plan that fits, explain the runners-up, write its DeepSpeed config."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from zeroplan.cli import options as o

def _render_config(profile, candidate, flavour: str, validator, stack, args: list[str],
                   check_trainer: bool) -> tuple[dict, str]:
    """The plan's config, validated by DeepSpeed and, with `check_trainer` for the HF stacks,
    checked against the launch lines' arguments by transformers' own HfTrainerDeepSpeedConfig (in
    the child process; importing transformers there roughly doubles recommend's time)."""
    from zeroplan.core.dsconfig import render

    config = render(profile, candidate.shape, candidate.plan, candidate.shape.micro_batch,
                    candidate.gradient_accumulation, flavour=flavour)
    trainer = None if stack.name == "zeroplan" or not check_trainer else {"argv": args, "script_flags": sorted(stack.script_flags)}
    if trainer is None:
        _, note = validator.validate(config, candidate.plan.world_size)
    else:
        _, note = validator.validate(config, candidate.plan.world_size, trainer=trainer)
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
        "budget_bytes": result.budget_bytes, "host_memory": result.host.as_dict() if result.host else None,
        "recommended": {**best.summary(), "per_gpu_bytes": best.memory.per_gpu_bytes(),
                        "step_time": best.time.as_dict()},
        "alternatives": alternatives, "deepspeed_config": config, "config_path": str(out_path),
        "launch": launches,
    }


def _recipe(given, profile, best, gpu, pad_hint: bool = True) -> list[str]:
    """How to train so the prediction holds: the speed settings the recommended plan assumes, and
    what padding a misaligned vocabulary would gain (predicted)."""
    from dataclasses import replace

    from zeroplan.core.profiles import pad_vocab
    from zeroplan.core.steptime import ALIGNED_VOCAB_MULTIPLE, step_time

    shape = best.shape
    lines = []
    layers = profile.llm.num_layers
    if shape.grad_ckpt and shape.llm_ckpt_layers(layers) == 0:
        lines.append("checkpoint the vision encoder's layers only (InternVL's script always does; "
                     "--grad_checkpoint False leaves the LLM's decoder layers whole)")
    elif shape.grad_ckpt and shape.llm_ckpt_layers(layers) < layers:
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
    elif pad_hint and profile.llm.vocab_size % ALIGNED_VOCAB_MULTIPLE:
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
    if summary.get("ckpt_layers") == 0:
        return "vision"
    return "on" if summary.get("ckpt_layers") is None else f"{summary['ckpt_layers']} lay."


def runners_table(alternatives: list[dict]):
    """The runners-up as a rich table narrow enough for 80 columns (a pipe, a CI log): short
    headers, no vertical rules, and the reason folded rather than cut."""
    from rich import box
    from rich.table import Table

    runners = Table(title="runners-up (best 12)", box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1),
                    caption="mb×acc: micro-batch×accumulation; opt, par: offloaded; peak: GiB/GPU")
    for column in ("ZeRO", "mb×acc", "ckpt", "loss", "offload", "peak", "tok/s"):
        runners.add_column(column, no_wrap=True, justify="right" if column in ("peak", "tok/s") else "left")
    runners.add_column("why not", ratio=1, min_width=20)
    for alt in alternatives[:12]:
        runners.add_row(str(alt["stage"]), f"{alt['micro_batch']}×{alt['gradient_accumulation']}", _ckpt(alt),
                        "fused" if alt["loss"] != "eager" else "eager", _offload(alt),
                        f"{alt['predicted_peak_bytes'] / 2**30:.1f}", f"{alt['predicted_tokens_per_s']:,.0f}",
                        alt["rejected_because"].removeprefix("does not fit: "))
    return runners


def _offload(summary: dict) -> str:
    """-, opt or opt+par: what a plan offloads to the CPU, short enough for a narrow column."""
    if summary["offload_params"] != "none":
        return "opt+par"
    return "opt" if summary["offload_optimizer"] != "none" else "-"


def _print(payload: dict, result, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    best = payload["recommended"]
    trainer = payload["trainer"]
    console.print(f"[bold]trainer: {trainer['name']}[/bold] — {trainer['title']}"
                  + (f" (run from {trainer['cwd']}/)" if trainer["cwd"] else ""))
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
    host = payload["host_memory"]
    used = best["cpu_bytes_per_node"]
    offloaded = f"{o.gib(used)} GiB per node offloaded" if used else "nothing offloaded"
    usable = f" of {o.gib(host['budget_bytes'])} usable" if host and host["bytes_per_node"] and used else ""
    console.print(f"  host RAM: {offloaded}{usable}; node RAM {host['origin'] if host else 'not checked'}")
    for line in payload["recipe"]:
        console.print(f"  [cyan]•[/cyan] {line}")
    table = Table(title="per-GPU memory of the recommended plan")
    table.add_column("term")
    table.add_column("GiB", justify="right")
    for key, value in best["per_gpu_bytes"].items():
        table.add_row(key, o.gib(value))
    console.print(table)
    console.print(runners_table(payload["alternatives"]))
    from zeroplan.cli.network_view import print_communication

    print_communication(payload["communication"], payload["communication"].get("by_inter_node_bandwidth"))
    console.print(f"DeepSpeed config written to [bold]{payload['config_path']}[/bold] ({payload['validation']})")
    for launcher, line in payload["launch"].items():
        console.print(f"[dim]{launcher}:[/dim] {line}", soft_wrap=True)
    if trainer["name"] != "zeroplan" and "HfTrainerDeepSpeedConfig" not in payload["validation"]:
        console.print("[dim]check the config with these arguments as the HF Trainer will (or add --check-trainer):"
                      f"[/dim] {payload['trainer']['check']}", soft_wrap=True)


def _nothing_fits(error, hints, host, json_out: bool) -> None:
    """Why nothing fits and the changes verified to fit: one JSON object on stdout with --json,
    else lines on stderr."""
    if json_out:
        o.print_json({"fits": False, "reason": str(error), "host_memory": host.as_dict() if host else None,
                      "would_fit_with": [hint.as_dict() for hint in hints]})
        return
    typer.echo(f"zeroplan: {error}", err=True)
    typer.echo(f"  node RAM: {host.origin}", err=True)
    for hint in hints:
        typer.echo(f"  would fit with: {hint.options} (ZeRO-{hint.stage}, {hint.predicted_tokens_per_s:,.0f} "
                   f"tokens/s predicted)", err=True)
    if not hints:
        typer.echo("  no single change tried (fewer tiles, shorter sequences, a frozen vision tower, more nodes, "
                   "more host RAM) makes a plan fit", err=True)


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
    headroom: o.Headroom = 0.05,
    no_offload: Annotated[bool, typer.Option("--no-offload", help="Never offload to the CPU.")] = False,
    flavour: Annotated[Optional[str], typer.Option("--flavour", help="concrete or hf (HF Trainer 'auto' fields); default: the trainer's.")] = None,
    trainer: o.Trainer = "internvl",
    check_trainer: Annotated[bool, typer.Option(
        "--check-trainer", help="Also check the config with the printed arguments through transformers' "
                                "HfTrainerDeepSpeedConfig now (slower; else the output names the validate line).")] = False,
    out: Annotated[Path, typer.Option("--out", help="Where to write the DeepSpeed config.")] = Path("ds_config.json"),
    plain: Annotated[bool, typer.Option("--plain", help="Plan the plain transformers loop: no torch.compile, no fused loss.")] = False,
    packed: Annotated[bool, typer.Option("--packed", help="Rows pack several samples (varlen attention, no attention across them).")] = False,
    pad_vocab: Annotated[int, typer.Option("--pad-vocab", help="Pad the vocabulary to a multiple of this (1: as is; 128 aligns the LM head).")] = 1,
    host_memory_gib: o.HostMemoryGib = None,
    json_out: o.Json = False,
    force: Annotated[bool, typer.Option("--force", help="Replace --out if it already exists.")] = False,
    cluster: o.Cluster = None,
    inter_node_gbps: o.InterNodeGbps = None,
    nics_per_node: o.NicsPerNode = None,
    nic_gbit: o.NicGbit = None,
):
    """Recommend the fastest ZeRO plan that fits, explain the runners-up, write its DeepSpeed config."""
    from zeroplan.adapters.validator_process import take
    from zeroplan.adapters.written import remember
    from zeroplan.core.atomic import check_file_target, write_atomic
    from zeroplan.core.dsconfig import to_json
    from zeroplan.core.errors import DoesNotFit, InvalidInput
    from zeroplan.adapters.gpus import choose_gpu
    from zeroplan.adapters.hostmem import node_host_memory
    from zeroplan.core.hints import Request, verified_hints
    from zeroplan.core.profiles import load_model
    from zeroplan.core.trainers import (check_stack_options, load_stack, run_spec, stack_launch_lines, trainer_args,
                                        validate_command)

    from dataclasses import replace

    from zeroplan.core.profiles import pad_vocab as padded

    check_file_target(out)
    if isinstance(pad_vocab, bool) or not 1 <= pad_vocab <= 4096:
        raise InvalidInput(f"--pad-vocab must be a whole number from 1 to 4096, got {pad_vocab}")
    given = load_model(model)
    profile = padded(given, pad_vocab)
    shape = replace(o.build_shape(1, seq_len, tiles, True, freeze, lora_rank, profile), packed=packed)
    base = o.build_plan(0, gpus, nodes, gpus_per_node,
                        network=o.build_network(cluster, inter_node_gbps, nics_per_node, nic_gbit))
    o.check_fraction("--headroom", headroom)
    stack = load_stack(trainer)
    check_stack_options(stack, packed=packed, pad_vocab=pad_vocab)
    flavour = flavour or stack.config_flavour
    if flavour not in ("concrete", "hf"):
        raise InvalidInput(f"--flavour must be concrete or hf, got {flavour!r}")
    validator = take()
    try:
        chosen = choose_gpu(gpu)
        request = Request(profile, shape, base, chosen.profile, global_batch, headroom, not no_offload, not plain,
                          node_host_memory(host_memory_gib, chosen), stack)
        try:
            result = request.plan()
        except DoesNotFit as error:
            _nothing_fits(error, verified_hints(request), request.host, json_out)
            return 3
        best = result.best
        args = trainer_args(stack, profile, best.shape, best.plan, best.gradient_accumulation, str(out))
        config, note = _render_config(profile, best, flavour, validator, stack, args, check_trainer)
    finally:
        validator.close()
    spec_path = out.with_name(out.stem + ".run.json")
    refusal = _refusal([out] + ([spec_path] if stack.name == "zeroplan" else []), force)
    if refusal is None:
        write_atomic(out, to_json(config))
        remember(out, to_json(config))
        if stack.name == "zeroplan":
            spec_text = run_spec(model, best, pad_vocab).to_json() + "\n"
            write_atomic(spec_path, spec_text)
            remember(spec_path, spec_text)
    payload = _payload(result, profile, chosen, config, out,
                       stack_launch_lines(stack, best.plan, args, str(out), str(spec_path)))
    payload["trainer"] = {"name": stack.name, "title": stack.title, "cwd": stack.cwd,
                          "environment": stack.environment, "args": args,
                          "check": validate_command(stack, model, chosen.profile.name, best.shape, best.plan,
                                                    str(out), args, str(spec_path))}
    payload["validation"] = note or "validated by DeepSpeed's config classes"
    payload["recipe"] = _recipe(given, profile, result.best, chosen.profile, pad_hint=stack.name == "zeroplan")
    payload["communication"] = _communication(profile, result, chosen.profile)
    payload["config_written"] = refusal is None
    if json_out:
        o.print_json(payload)
    else:
        _print(payload, result)
    if refusal is not None:  # the plan is printed; the file the user holds is left as it is
        raise InvalidInput(f"{refusal}; the plan above was not written (the lines name a file that holds something else)")
    return 0


def _refusal(paths: list, force: bool) -> str | None:
    """Why a file recommend would write must not be replaced, or None. A file zeroplan wrote and
    nobody changed since is replaced (asking again is the common case); any other existing file
    only with --force; a read-only one never (zeroplan.core.atomic.check_replaceable)."""
    from zeroplan.adapters.written import wrote_unchanged
    from zeroplan.core.atomic import check_replaceable
    from zeroplan.core.errors import InvalidInput

    for path in paths:
        try:
            check_replaceable(path, force or wrote_unchanged(path))
        except InvalidInput as error:
            reason = str(error)
            if "already exists" in reason:
                reason = (f"{str(path)[:200]} already exists and is not the unchanged file zeroplan wrote there; "
                          "give --force to replace it, or another --out")
            return reason
    return None
