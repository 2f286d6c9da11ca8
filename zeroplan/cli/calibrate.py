"""Measure device constants (CUDA context, step-time constants) from your own runs; check the allocator replay."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Optional

import typer

from zeroplan.cli import options as o
from zeroplan.core.atomic import check_replaceable, write_atomic
from zeroplan.core.bounded import require_file
from zeroplan.core.errors import InvalidInput
from zeroplan.core.profiles import load_gpu
from zeroplan.lab.calibrate import calibrate, profile_text
from zeroplan.lab.jsonl import read as read_results


def command(
    results: Annotated[list[Path], typer.Argument(help="Results JSONL files of `zeroplan bench` on one GPU type.")],
    gpu: Annotated[str, typer.Option("--gpu", help="The GPU profile the runs were made on.")],
    out: Annotated[Optional[Path], typer.Option(
        "--out", help="Write the whole GPU profile, with a [calibrated] table, to this .toml file.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out file.")] = False,
    json_out: o.Json = False,
):
    """Measure device constants (CUDA context, step-time constants) from your own runs; check the allocator replay."""
    if out is not None:
        check_replaceable(out, force)
    if out is not None and out.suffix != ".toml":
        raise InvalidInput(f"--out {str(out)[:200]} must end in .toml (a GPU profile that --gpu then loads)")
    profile = load_gpu(gpu)
    records = []
    for path in results:
        require_file(path, "results file")
        records.extend(read_results(path).records)
    constants = calibrate(records, profile)
    source = (f"zeroplan calibrate {' '.join(str(p) for p in results)} --gpu {gpu} "
              f"({constants['runs']} runs, {datetime.now(timezone.utc).date().isoformat()})")
    if out is not None:
        write_atomic(out, profile_text(profile, constants, source))
    if json_out:
        o.print_json({"gpu": profile.name, "calibrated": constants, "source": source,
                      "written": str(out) if out else None})
    else:
        for key, value in constants.items():
            typer.echo(f"{key:28s} {value}")
        if out is not None:
            typer.echo(f"wrote {out}")
    return 0
