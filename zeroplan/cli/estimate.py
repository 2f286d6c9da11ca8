"""Per-GPU memory of one plan: breakdown, peak, capacity and DeepSpeed's own estimate beside it."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from zeroplan.cli import options as o


def render_table(payload: dict) -> None:
    """The breakdown as a rich table, with DeepSpeed's estimator beside zeroplan's model states."""
    from rich.console import Console
    from rich.table import Table

    breakdown = payload["breakdown_bytes"]
    table = Table(title=f"{payload['model']}: ZeRO-{payload['stage']} on {payload['world_size']} × {payload['gpu']} "
                        f"(micro-batch {payload['micro_batch']}, {payload['seq_len']} tokens, {payload['tiles']} tiles, "
                        f"checkpointing {'on' if payload['grad_ckpt'] else 'off'})")
    table.add_column("per GPU")
    table.add_column("GiB", justify="right")
    rows = [("16-bit parameters", breakdown["params"]), ("gradients", breakdown["grads"]),
            ("fp32 master weights", breakdown["master_weights"]), ("Adam states", breakdown["optimizer_states"]),
            ("activations: vision tiles", breakdown["activations_vision"]),
            ("activations: LLM tokens", breakdown["activations_llm"]),
            ("logits and loss (transient)", breakdown["logits_and_loss"]),
            ("communication buffers", breakdown["buffers"]), ("optimizer-step temporaries", breakdown["step_transient"]),
            ("allocator + CUDA context", breakdown["overhead"])]
    for label, value in rows:
        table.add_row(label, o.gib(value))
    table.add_section()
    table.add_row(f"peak (at {breakdown['peak_phase']})", o.gib(breakdown["peak"]), style="bold")
    table.add_row("capacity", o.gib(payload["capacity_bytes"]))
    table.add_row(f"usable ({payload['headroom']:.0%} kept free)", o.gib(payload["usable_bytes"]))
    table.add_row(f"margin: {payload['verdict']}", o.gib(payload["margin_bytes"]),
                  style="green" if payload["fits"] else "red")
    table.add_section()
    accumulation = payload["gradient_accumulation"]
    table.add_row(f"step ({accumulation} micro-step{'s' if accumulation > 1 else ''}), seconds",
                  f"{payload['predicted_step_time_s']:.2f}")
    table.add_row("tokens/s, whole job", f"{payload['predicted_tokens_per_s']:,.0f}")
    table.add_row("MFU", f"{payload['predicted_mfu']:.0%}")
    if payload["cpu_bytes_per_node"]:
        table.add_row("host RAM per node (offload)", o.gib(payload["cpu_bytes_per_node"]))
    baseline = payload["deepspeed_estimator_bytes"]
    table.add_section()
    model_states = breakdown["params"] + breakdown["grads"] + breakdown["master_weights"] + breakdown["optimizer_states"]
    table.add_row("zeroplan model states", o.gib(model_states))
    if baseline and baseline.get("for_stage"):
        table.add_row(f"DeepSpeed estimator ({baseline['for_stage'].get('formula', 'model states')})",
                      o.gib(baseline["for_stage"]["gpu_bytes"]))
    else:
        table.add_row("DeepSpeed estimator", "n/a: " + str((baseline or {}).get("reason", "unavailable")))
    console = Console()
    console.print(table)
    console.print(f"[dim]{payload['gpu_origin']}[/dim]")


def command(
    model: o.Model,
    gpus: o.Gpus = None,
    nodes: o.Nodes = None,
    gpus_per_node: o.GpusPerNode = None,
    gpu: o.Gpu = None,
    stage: Annotated[int, typer.Option("--stage", help="ZeRO stage 0-3.")] = 3,
    micro_batch: Annotated[int, typer.Option("--micro-batch", help="Samples per GPU per micro-step.")] = 1,
    seq_len: o.SeqLen = 4096,
    tiles: o.Tiles = 7,
    grad_ckpt: Annotated[bool, typer.Option("--grad-ckpt/--no-grad-ckpt", help="Gradient checkpointing.")] = True,
    freeze: o.Freeze = None,
    lora_rank: o.LoraRank = 0,
    offload_optimizer: Annotated[str, typer.Option("--offload-optimizer", help="none, cpu or nvme.")] = "none",
    offload_params: Annotated[str, typer.Option("--offload-params", help="none, cpu or nvme (stage 3).")] = "none",
    reduce_bucket: Annotated[Optional[int], typer.Option("--reduce-bucket", help="reduce_bucket_size (elements); default: tuned to the model.")] = None,
    prefetch_bucket: Annotated[Optional[int], typer.Option("--prefetch-bucket", help="stage3_prefetch_bucket_size; default: tuned.")] = None,
    max_live: Annotated[Optional[int], typer.Option("--max-live", help="stage3_max_live_parameters; default: tuned.")] = None,
    persistence: Annotated[Optional[int], typer.Option("--persistence", help="stage3_param_persistence_threshold; default: tuned.")] = None,
    ckpt_layers: Annotated[Optional[int], typer.Option("--ckpt-layers", help="With --grad-ckpt: checkpoint only the first N LLM decoder layers (default: all).")] = None,
    optimizer_groups: Annotated[int, typer.Option("--optimizer-groups", help="ZeRO-1/2: the optimizer's parameters in groups of at most N elements (0: one group).")] = 0,
    grad_accum: Annotated[int, typer.Option("--grad-accum", help="Micro-steps per optimizer step (what DeepSpeed holds between them, and the step time).")] = 1,
    headroom: o.Headroom = 0.05,
    json_out: o.Json = False,
    cluster: o.Cluster = None,
    inter_node_gbps: o.InterNodeGbps = None,
    nics_per_node: o.NicsPerNode = None,
    nic_gbit: o.NicGbit = None,
):
    """Per-GPU memory of one plan: breakdown, peak, capacity and DeepSpeed's own estimate beside it."""
    from zeroplan.adapters.deepspeed_adapter import estimator_quietly
    from zeroplan.core.tuning import tuned_plan
    from zeroplan.adapters.gpus import choose_gpu
    from zeroplan.core.errors import InvalidInput
    from zeroplan.core.memory import estimate
    from zeroplan.core.profiles import load_model
    from zeroplan.core.steptime import step_time
    from zeroplan.core.commreport import communication
    from zeroplan.core.summary import plan_summary

    profile = load_model(model)
    shape = o.build_shape(micro_batch, seq_len, tiles, grad_ckpt, freeze, lora_rank, profile)
    if ckpt_layers is not None:
        from dataclasses import replace

        shape = replace(shape, ckpt_layers=ckpt_layers)
    plan = tuned_plan(profile, shape, o.build_plan(stage, gpus, nodes, gpus_per_node, offload_optimizer,
                                                   offload_params, optimizer_group_elems=optimizer_groups,
                                                   network=o.build_network(cluster, inter_node_gbps,
                                                                           nics_per_node, nic_gbit)))
    overrides = {"reduce_bucket_elems": reduce_bucket, "allgather_bucket_elems": reduce_bucket,
                 "prefetch_bucket_elems": prefetch_bucket, "max_live_params": max_live,
                 "param_persistence_threshold": persistence}
    plan = plan.with_(**{key: value for key, value in overrides.items() if value is not None})
    o.check_fraction("--headroom", headroom)
    if isinstance(grad_accum, bool) or not 1 <= grad_accum <= 65536:
        raise InvalidInput(f"--grad-accum must be a whole number from 1 to 65536, got {grad_accum}")
    chosen = choose_gpu(gpu)
    memory = estimate(profile, shape, plan, chosen.profile, gradient_accumulation=grad_accum)
    step = step_time(profile, shape, plan, chosen.profile, grad_accum)
    payload = plan_summary(profile, shape, plan, chosen.profile.name, chosen.origin, memory, step, grad_accum,
                           estimator_quietly(profile, shape, plan), headroom)
    payload["communication"] = communication(profile, shape, plan, chosen.profile, grad_accum)
    if json_out:
        o.print_json(payload)
    else:
        from zeroplan.cli.network_view import print_communication

        render_table(payload)
        print_communication(payload["communication"])
    return 0 if payload["fits"] else 3  # the statuses every planning verb uses: 0 fits, 3 does not, 2 bad input
