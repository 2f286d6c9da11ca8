"""Measure device constants (CUDA context, step-time constants) from your own runs; check the allocator replay."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from zeroplan.cli import options as o


def command(
    results: Annotated[list[Path], typer.Argument(help="Results JSONL files of `zeroplan bench` on one GPU type.")],
    gpu: Annotated[str, typer.Option("--gpu", help="The GPU profile the runs were made on.")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Write the profile with a [calibrated] table here.")] = None,
    json_out: o.Json = False,
):
    """Measure device constants (CUDA context, step-time constants) from your own runs; check the allocator replay."""
    from datetime import datetime, timezone

    from zeroplan.core.atomic import write_atomic
    from zeroplan.lab.calibrate import calibrate, calibrated_table
    from zeroplan.core.errors import InvalidInput
    from zeroplan.lab.jsonl import read as read_results
    from zeroplan.core.profiles import load_gpu

    profile = load_gpu(gpu)
    records = []
    for path in results:
        if not path.is_file():
            raise InvalidInput(f"results file {path} does not exist")
        records.extend(read_results(path).records)
    constants = calibrate(records, profile)
    source = (f"zeroplan calibrate {' '.join(str(p) for p in results)} --gpu {gpu} "
              f"({constants['runs']} runs, {datetime.now(timezone.utc).date().isoformat()})")
    if out is not None:
        base = Path(profile.path) if profile.path else None
        text = base.read_text(encoding="utf-8") if base is not None and base.is_file() else ""
        kept = text.split("\n[calibrated]")[0].rstrip("\n")
        write_atomic(out, kept + "\n\n" + calibrated_table(constants, source))
    if json_out:
        o.print_json({"gpu": profile.name, "calibrated": constants, "source": source,
                      "written": str(out) if out else None})
    else:
        for key, value in constants.items():
            typer.echo(f"{key:28s} {value}")
        if out is not None:
            typer.echo(f"wrote {out}")
    return 0
