"""Run a benchmark sweep: each point in its own process, results appended to a JSONL file (resumable).

Give a sweep file (`--sweep benchmarks/h100_stages.toml`) or the grid as flags
(`--model 1b,2b --stages 0,1,2,3 --micro-batch 1,2 --grad-ckpt on,off`). Points already in the
results file are skipped, so rerunning after an interruption finishes the sweep.
"""

from __future__ import annotations

import shlex
import signal
from dataclasses import replace
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from zeroplan.lab import bench
from zeroplan.lab import sweep as sweeps
from zeroplan.core.errors import InvalidInput, Interrupted

GRID_FLAGS = ("model", "stages", "micro_batch", "grad_ckpt", "offload", "seq_len", "tiles", "frozen", "lora_rank",
              "gpus", "steps", "warmup_steps", "gpu", "attn_implementation", "packed", "kernels", "compile",
              "grad_accum", "vocab_multiple", "ckpt_layers", "optimizer_groups")
FLAG_NAMES = {"attn_implementation": "--attn"}
PARAMETERS = {"compile": "compile_layers"}  # the function's parameter behind a flag, where the names differ
STATUS_STYLES = {"ok": "green", "oom": "yellow", "timeout": "magenta", "error": "red"}


def command(
    ctx: typer.Context,
    results: Path = typer.Option(..., "--results", help="Results JSONL file (appended to; resumed from)."),
    sweep: Optional[Path] = typer.Option(None, "--sweep", help="Sweep TOML file (see benchmarks/)."),
    launcher: Optional[str] = typer.Option(None, "--launcher", help="torchrun or deepspeed (default: the sweep's, else torchrun)."),
    timeout_s: Optional[float] = typer.Option(None, "--timeout-s", help="Time limit of each point in seconds (default 600)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the points and which would run; write nothing."),
    parallel: Optional[int] = typer.Option(None, "--parallel", help="Rehearsed points run side by side on one GPU, up to N at once, while their predicted memory fits (default: the sweep's, else 1)."),
    model: Optional[str] = typer.Option(None, "--model", help="Models, comma-separated (1b,2b or profile paths)."),
    stages: str = typer.Option("0,1,2,3", "--stages", help="ZeRO stages, comma-separated."),
    micro_batch: str = typer.Option("1", "--micro-batch", help="Micro-batch sizes, comma-separated."),
    grad_ckpt: str = typer.Option("on", "--grad-ckpt", help="Gradient checkpointing: on, off or on,off."),
    offload: str = typer.Option("none", "--offload", help="none, optimizer, optimizer+params (comma-separated)."),
    seq_len: str = typer.Option("4096", "--seq-len", help="Sequence lengths (image tokens included)."),
    tiles: str = typer.Option("7", "--tiles", help="Tiles per sample, comma-separated."),
    frozen: str = typer.Option("none", "--frozen", help="Frozen towers per point: none, vision, vision+projector..."),
    lora_rank: str = typer.Option("0", "--lora-rank", help="LoRA ranks (0: full fine-tune)."),
    gpus: int = typer.Option(1, "--gpus", help="Ranks per point (world size)."),
    steps: int = typer.Option(8, "--steps", help="Training steps per point."),
    warmup_steps: int = typer.Option(3, "--warmup-steps", help="Steps left out of the timings."),
    gpu: Optional[str] = typer.Option(None, "--gpu", help="GPU profile for MFU and predictions (default: detected)."),
    attn_implementation: str = typer.Option("sdpa", "--attn", help="sdpa, eager, flash_attention_2 or varlen (packed rows)."),
    packed: bool = typer.Option(False, "--packed", help="Pack several samples per row (no attention across them)."),
    kernels: str = typer.Option("eager", "--kernels", help="eager, liger (Liger-Kernel's fused kernels) or liger-loss (its fused loss only)."),
    compile_layers: bool = typer.Option(False, "--compile", help="torch.compile each decoder and vision layer."),
    grad_accum: int = typer.Option(1, "--grad-accum", help="Micro-batches per optimizer step."),
    vocab_multiple: int = typer.Option(1, "--vocab-multiple", help="Pad the vocabulary to a multiple of this (128 aligns the LM head)."),
    ckpt_layers: Optional[int] = typer.Option(None, "--ckpt-layers", help="With checkpointing on: checkpoint only the first N decoder layers (default: all)."),
    optimizer_groups: int = typer.Option(0, "--optimizer-groups", help="ZeRO-1/2: optimizer parameter groups of at most N elements (0: one group)."),
) -> int:
    """Run (or list, with --dry-run) the points of a sweep not yet in the results file."""
    flags = dict(model=model, stages=stages, micro_batch=micro_batch, grad_ckpt=grad_ckpt, offload=offload,
                 seq_len=seq_len, tiles=tiles, frozen=frozen, lora_rank=lora_rank, gpus=gpus, steps=steps,
                 warmup_steps=warmup_steps, gpu=gpu, attn_implementation=attn_implementation, packed=packed,
                 kernels=kernels, compile=compile_layers, grad_accum=grad_accum, vocab_multiple=vocab_multiple,
                 ckpt_layers=ckpt_layers, optimizer_groups=optimizer_groups)
    given = [name for name in GRID_FLAGS if _given(ctx, PARAMETERS.get(name, name))]
    if sweep is not None and given:
        raise InvalidInput(f"give either --sweep or grid flags, not both (got --{given[0].replace('_', '-')})")
    the_sweep = _sweep_from(sweep, flags, launcher, timeout_s, parallel)
    specs = the_sweep.expand()
    the_sweep.check_parallel(specs)
    bench.check_results_path(results)
    console = Console(stderr=True)
    if dry_run:
        _print_plan(specs, results)
        return 0
    extra = {"sweep": the_sweep.name, "launcher": the_sweep.launcher,
             "bench_command": _canonical_command(sweep, results, the_sweep, flags)}
    summary = _run_with_progress(specs, results, the_sweep, extra, console)
    counts = ", ".join(f"{status} {count}" for status, count in sorted(summary.statuses.items())) or "nothing to run"
    console.print(f"{summary.total} points: {summary.skipped} already done, ran {summary.ran} ({counts})")
    console.print(f"next: zeroplan report {shlex.quote(str(results))} --out {shlex.quote(str(results.parent))}")
    return 0


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether an option came from the command line (typer may ship its own click, so its
    ParameterSource enum is compared by name)."""
    return getattr(ctx.get_parameter_source(name), "name", "DEFAULT") not in ("DEFAULT", "DEFAULT_MAP")


def _sweep_from(sweep_path: Path | None, flags: dict, launcher: str | None, timeout_s: float | None,
                parallel: int | None = None) -> sweeps.Sweep:
    """The sweep a sweep file or the grid flags describe, with --launcher/--timeout-s/--parallel applied."""
    if sweep_path is not None:
        the_sweep = sweeps.load_sweep(sweep_path)
    else:
        if flags["model"] is None:
            raise InvalidInput("give --sweep FILE or --model (e.g. --model 1b,2b)")
        the_sweep = sweeps.Sweep(grid=_grid_from_flags(flags), name="flags")
    overrides = {key: value for key, value in (("launcher", launcher), ("timeout_s", timeout_s), ("parallel", parallel))
                 if value is not None}
    return replace(the_sweep, **overrides)


def _grid_from_flags(flags: dict) -> sweeps.Grid:
    frozen = tuple(() if item == "none" else tuple(sorted(item.split("+")))
                   for item in sweeps.parse_list(flags["frozen"], str, "--frozen"))
    return sweeps.Grid(
        models=sweeps.parse_list(flags["model"], str, "--model"),
        stages=sweeps.parse_list(flags["stages"], int, "--stages"),
        micro_batches=sweeps.parse_list(flags["micro_batch"], int, "--micro-batch"),
        grad_ckpt=sweeps.parse_list(flags["grad_ckpt"], bool, "--grad-ckpt"),
        offloads=sweeps.parse_list(flags["offload"], str, "--offload"),
        seq_lens=sweeps.parse_list(flags["seq_len"], int, "--seq-len"),
        tiles=sweeps.parse_list(flags["tiles"], int, "--tiles"),
        frozen=frozen,
        lora_ranks=sweeps.parse_list(flags["lora_rank"], int, "--lora-rank"),
        run=dict(steps=flags["steps"], warmup_steps=flags["warmup_steps"], world_size=flags["gpus"], gpu=flags["gpu"],
                 attn_implementation=flags["attn_implementation"], packed=flags["packed"], kernels=flags["kernels"],
                 compile=flags["compile"], gradient_accumulation=flags["grad_accum"],
                 vocab_multiple=flags["vocab_multiple"], ckpt_layers=flags["ckpt_layers"],
                 optimizer_group_elems=flags["optimizer_groups"]))


def _canonical_command(sweep_path: Path | None, results: Path, the_sweep: sweeps.Sweep, flags: dict) -> str:
    """The bench command line that reproduces this sweep, as recorded beside each result."""
    words = ["zeroplan", "bench"]
    if sweep_path is not None:
        words += ["--sweep", str(sweep_path)]
    else:
        for name in GRID_FLAGS:
            value = flags[name]
            option = FLAG_NAMES.get(name, "--" + name.replace("_", "-"))
            if isinstance(value, bool):
                words += [option] if value else []
            elif value is not None:
                words += [option, str(value)]
    words += ["--results", str(results), "--launcher", the_sweep.launcher, "--timeout-s", f"{the_sweep.timeout_s:g}"]
    return shlex.join(words)


def _print_plan(specs: list, results: Path) -> None:
    todo = {spec.point_id() for spec in bench.pending(specs, results)}
    table = Table(title=f"{len(specs)} points, {len(todo)} to run ({results})")
    for column in ("point id", "point", "state"):
        table.add_column(column)
    for spec in specs:
        table.add_row(spec.point_id(), bench.describe(spec), "to run" if spec.point_id() in todo else "done")
    Console().print(table)


def _side_by_side(parallel: int):
    """The side-by-side runner for --parallel N > 1 (None: one point at a time): the GPU's memory
    from NVML, or the host's where there is no GPU (rehearsals on the CPU)."""
    if parallel <= 1:
        return None
    from zeroplan.adapters.hostmem import probe_host_bytes
    from zeroplan.adapters.nvml import probe
    from zeroplan.lab.parallel import SideBySide, predicted_device_bytes

    found = probe()
    capacity = found.gpus[0].total_bytes if found.found else probe_host_bytes()
    if not capacity:
        raise InvalidInput("--parallel needs to know the GPU's memory (NVML) or the host's (/proc/meminfo); neither answered")
    return SideBySide(parallel, capacity, predicted_device_bytes)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _run_with_progress(specs, results: Path, the_sweep: sweeps.Sweep, extra: dict, console: Console):
    """run_sweep under a rich progress bar: the running point, done/total, the last status.
    SIGTERM is turned into an interrupt so the running point's process group is killed too."""
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("last: {task.fields[last]}"), TimeElapsedColumn())
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    finished: list[str] = []
    try:
        with Progress(*columns, console=console, transient=False) as progress:
            task = progress.add_task("starting", total=None, last="-")

            def on_start(spec, index, total):
                progress.update(task, total=total, description=bench.describe(spec))

            def on_end(record, index, total):
                finished.append(record["point_id"])
                status = record["status"]
                style = STATUS_STYLES.get(status, "white")
                progress.update(task, advance=1, last=f"[{style}]{status}[/]")
                reason = f" — {escape(record['reason'])}" if record.get("reason") else ""
                label = escape(bench.describe(bench.RunSpec.from_dict(record["spec"])))
                progress.console.print(f"[{style}]{status}[/] {label}"
                                       f" ({record['wall_s']:.1f} s){reason}", markup=True, highlight=False)

            return bench.run_sweep(specs, results, bench.default_command_for(the_sweep.launcher), the_sweep.timeout_s,
                                   extra=extra, on_start=on_start, on_end=on_end,
                                   side_by_side=_side_by_side(the_sweep.parallel))
    except KeyboardInterrupt:  # typer would turn it into a silent exit 130
        raise Interrupted(f"the running point was stopped (all its processes killed) and not recorded; "
                          f"{len(finished)} point(s) of this run are in {results}; to resume, run the same "
                          f"command again: {extra['bench_command']}") from None
    finally:
        signal.signal(signal.SIGTERM, previous)
