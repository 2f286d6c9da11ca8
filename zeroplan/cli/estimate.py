"""Per-GPU memory of one plan: breakdown, peak, capacity and DeepSpeed's own estimate beside it."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from zeroplan.cli import options as o


def estimate_payload(profile, shape, plan, chosen, memory, baseline) -> dict:
    """The JSON object `estimate --json` prints (also used by validate)."""
    return {
        "model": profile.name, "gpu": chosen.profile.name, "gpu_origin": chosen.origin,
        "world_size": plan.world_size, "gpus_per_node": plan.gpus_per_node, "nodes": plan.nodes,
        "stage": plan.stage, "micro_batch": shape.micro_batch, "seq_len": shape.seq_len, "tiles": shape.tiles,
        "grad_ckpt": shape.grad_ckpt, "ckpt_layers": shape.ckpt_layers,
        "optimizer_group_elems": plan.optimizer_group_elems, "frozen": sorted(shape.frozen), "lora_rank": shape.lora_rank,
        "offload_optimizer": plan.offload_optimizer, "offload_params": plan.offload_params,
        "per_gpu_bytes": memory.per_gpu_bytes(), "breakdown_bytes": memory.as_dict(),
        "capacity_bytes": memory.capacity, "headroom_bytes": memory.headroom(), "fits": memory.headroom() >= 0,
        "cpu_bytes_per_node": memory.cpu_bytes_per_node, "deepspeed_estimator_bytes": baseline,
    }


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
    headroom = payload["headroom_bytes"]
    table.add_row("headroom", o.gib(headroom), style="green" if headroom >= 0 else "red")
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


def deepspeed_baseline(profile, shape, plan):
    """DeepSpeed's estimators when importable; otherwise a dict naming why not."""
    try:
        from zeroplan.adapters.deepspeed_adapter import estimator_bytes
    except ImportError as error:
        return {"reason": f"zeroplan's DeepSpeed adapter is unavailable ({error})"}
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed logs to stdout on import
        result = estimator_bytes(profile, shape, plan)
    return result if isinstance(result, dict) else {"reason": str(result)}


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
    json_out: o.Json = False,
    cluster: o.Cluster = None,
    inter_node_gbps: o.InterNodeGbps = None,
    nics_per_node: o.NicsPerNode = None,
    nic_gbit: o.NicGbit = None,
):
    """Per-GPU memory of one plan: breakdown, peak, capacity and DeepSpeed's own estimate beside it."""
    from zeroplan.core.tuning import tuned_plan
    from zeroplan.adapters.gpus import choose_gpu
    from zeroplan.core.memory import estimate
    from zeroplan.core.profiles import load_model

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
    chosen = choose_gpu(gpu)
    memory = estimate(profile, shape, plan, chosen.profile)
    payload = estimate_payload(profile, shape, plan, chosen, memory, deepspeed_baseline(profile, shape, plan))
    from zeroplan.core.commreport import communication

    payload["communication"] = communication(profile, shape, plan, chosen.profile, 1)
    if json_out:
        o.print_json(payload)
    else:
        from zeroplan.cli.network_view import print_communication

        render_table(payload)
        print_communication(payload["communication"])
    return 0
