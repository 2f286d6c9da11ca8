"""Rehearse ranks of an N-GPU plan on this machine's GPU: measured memory beside the prediction, judged against the target GPU.

Each rank trains alone as rank R of N (torch's fake process group: every ZeRO partition, bucket and
padding sized for N; the collectives move no data), a few steps, with the bundled runner. Give the
plan as a config (`--config ds_config.json`, what `recommend` wrote) or as a stage and offloads.
"""

from __future__ import annotations

import importlib.util
import shlex
import signal
import tempfile
from pathlib import Path
from typing import Annotated, Optional

import typer

from zeroplan.cli import options as o
from zeroplan.core.errors import Interrupted, InvalidInput

STAGES = (0, 1, 2, 3)


def _require_gpu_stack() -> str:
    """This machine's GPU name, or one line saying why rehearsal cannot run here."""
    from zeroplan.adapters.nvml import probe

    found = probe()
    if not found.found:
        raise InvalidInput(f"rehearse trains on this machine's GPU and found none ({found.reason}); run it on a "
                           "GPU node (zeroplan estimate predicts without one)")
    missing = [name for name in ("torch", "deepspeed", "transformers") if importlib.util.find_spec(name) is None]
    if missing:
        raise InvalidInput(f"rehearse needs {', '.join(missing)} installed (pip install -e '.[train]' in the clone)")
    return found.gpus[0].name


def _print(rehearsal, outcomes, local_gpu: str, line: str, capped: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, emoji=False, markup=False)
    table = Table(title=f"rehearsed on {local_gpu} as ranks of {rehearsal.world_size} GPUs; target "
                        f"{rehearsal.target.name} ({rehearsal.target.memory_bytes / 2**30:.1f} GiB)")
    for column in ("rank", "status", "allocated GiB (pred / meas)", "reserved GiB (pred / meas)",
                   "device GiB (pred / meas)", "outside allocator GiB", "compute step s"):
        table.add_column(column, justify="right")

    def pair(predicted, measured) -> str:
        def one(value):
            return "-" if value is None else o.gib(value)
        return f"{one(predicted)} / {one(measured)}"

    for item in outcomes:
        table.add_row(str(item.rank), item.status, pair(item.predicted_allocated, item.measured_allocated),
                      pair(item.predicted_reserved, item.measured_reserved),
                      pair(item.predicted_device, item.measured_device),
                      "-" if item.outside_allocator is None else o.gib(item.outside_allocator),
                      "-" if item.compute_step_s is None else f"{item.compute_step_s:.2f}")
    console.print(table)
    if capped:
        console.print(f"This GPU has more memory than the target: PyTorch's allocator was capped at what a "
                      f"{rehearsal.target.name} leaves beside its CUDA context, so the verdict is the target's.")
    console.print("Not measured here: the collectives' time, and NCCL's own buffers on a real job (outside "
                  "PyTorch's allocator).")
    console.print(line)


def command(
    model: o.Model,
    gpus: Annotated[int, typer.Option("--gpus", help="GPUs of the job the ranks belong to (its world size).")],
    config: Annotated[Optional[str], typer.Option("--config", help="The DeepSpeed config the job runs (e.g. what recommend wrote); its stage, offloads and buckets are used.")] = None,
    stage: Annotated[Optional[int], typer.Option("--stage", help="ZeRO stage 0-3, when no --config is given.")] = None,
    offload_optimizer: Annotated[str, typer.Option("--offload-optimizer", help="none or cpu (no --config).")] = "none",
    offload_params: Annotated[str, typer.Option("--offload-params", help="none or cpu, stage 3 (no --config).")] = "none",
    micro_batch: Annotated[Optional[int], typer.Option("--micro-batch", help="Samples per GPU per micro-step (default: the config's, else 1).")] = None,
    grad_accum: Annotated[Optional[int], typer.Option("--grad-accum", help="Micro-steps per optimizer step (default: the config's, else 1).")] = None,
    seq_len: o.SeqLen = 4096,
    tiles: o.Tiles = 7,
    grad_ckpt: Annotated[bool, typer.Option("--grad-ckpt/--no-grad-ckpt", help="Gradient checkpointing.")] = True,
    freeze: o.Freeze = None,
    lora_rank: o.LoraRank = 0,
    gpu: Annotated[Optional[str], typer.Option("--gpu", help="The GPU the job runs on (a100-40gb, h100-80gb, ...); default: this one.")] = None,
    ranks: Annotated[Optional[str], typer.Option("--ranks", help="Ranks to rehearse, comma-separated (default: the first and the last).")] = None,
    steps: Annotated[int, typer.Option("--steps", help="Training steps per rank.")] = 4,
    results: Annotated[Optional[Path], typer.Option("--results", help="Keep each rank's record in this JSONL file (a rerun resumes).")] = None,
    timeout_s: Annotated[float, typer.Option("--timeout-s", help="Time limit of each rank in seconds.")] = 1200.0,
    json_out: o.Json = False,
):
    """Rehearse ranks of an N-GPU plan on this machine's GPU: measured memory beside the prediction, judged against the target GPU."""
    from zeroplan.adapters.gpus import choose_gpu
    from zeroplan.core.profiles import load_model
    from zeroplan.lab import bench, rehearse

    profile = load_model(model)
    shape = o.build_shape(1, seq_len, tiles, grad_ckpt, freeze, lora_rank, profile)
    if config is None and stage not in STAGES:
        raise InvalidInput("give --config FILE (the job's DeepSpeed config) or --stage 0-3")
    if config is not None and stage is not None:
        raise InvalidInput("give either --config (its stage is used) or --stage, not both")
    if not 2 <= steps <= 100:
        raise InvalidInput(f"--steps must be from 2 to 100 (the first is left out of the timing), got {steps}")
    if results is not None:
        bench.check_results_path(results)
    target = choose_gpu(gpu).profile
    plan = rehearse.build(model, profile, shape, gpus, target, ranks, config, stage if stage is not None else 0,
                          offload_optimizer.lower(), offload_params.lower(), micro_batch, grad_accum, steps=steps)
    local_gpu = _require_gpu_stack()
    records = _run(plan, results, timeout_s)
    outcomes = [rehearse.outcome(record, target) for record in records]
    line, code = rehearse.verdict(outcomes)
    capped = any(record.get("memory_cap_bytes") for record in records)
    if json_out:
        o.print_json({"world_size": plan.world_size, "target_gpu": target.name, "local_gpu": local_gpu,
                      "capped_to_target": capped, "verdict": line,
                      "ranks": [outcome.__dict__ for outcome in outcomes]})
    else:
        _print(plan, outcomes, local_gpu, line, capped)
    return code


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _run(plan, results: Path | None, timeout_s: float) -> list[dict]:
    """Each rank as a point of a sweep (a temporary one unless --results), under a progress line;
    an interrupt stops the running rank's processes and removes the temporary folder."""
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from zeroplan.lab import bench, jsonl

    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    console = Console(stderr=True, highlight=False, emoji=False)
    try:
        with tempfile.TemporaryDirectory(prefix="zeroplan-rehearse-") as folder, \
                Progress(SpinnerColumn(), TextColumn("{task.description}", markup=False), TimeElapsedColumn(),
                         console=console, transient=True) as progress:
            path = results if results is not None else Path(folder) / "rehearsal.jsonl"
            task = progress.add_task("starting", total=None)

            def on_start(spec, index, total):
                progress.update(task, description=f"rank {spec.simulate_rank} of {spec.simulate_world}: training "
                                                  f"({index + 1} of {total})")

            bench.run_sweep(list(plan.specs), path, bench.default_command_for("torchrun"), timeout_s,
                            on_start=on_start)
            by_point = jsonl.read(path).by_point
            return [by_point[spec.point_id()] for spec in plan.specs]
    except KeyboardInterrupt:
        kept = f"; ranks finished so far are in {shlex.quote(str(results))}" if results is not None else ""
        raise Interrupted(f"the rehearsal was stopped and its processes killed{kept}") from None
    finally:
        signal.signal(signal.SIGTERM, previous)
