"""Render a benchmark results JSONL as README.md (tables) and PNG plots in a folder.

`zeroplan report reports/NAME/results.jsonl --out reports/NAME/` writes README.md (stages side by
side per model and shape, predicted vs measured peaks, error summary) and memory_/throughput_
plots per model.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from zeroplan.lab import report


def command(
    results: Path = typer.Argument(..., help="Results JSONL file written by `zeroplan bench`."),
    out: Optional[Path] = typer.Option(None, "--out", help="Report folder (default: the results file's folder)."),
) -> int:
    """Write README.md and the plots of a results file."""
    out_dir = out if out is not None else results.parent
    report_command = shlex.join(["zeroplan", "report", str(results), "--out", str(out_dir)])
    files = report.write_report(results, out_dir, report_command)
    console = Console()
    console.print(f"wrote {files.readme}")
    for path in files.plots:
        console.print(f"wrote {path}")
    if files.skipped:
        console.print(files.skipped, highlight=False)
    for summary in files.summaries:
        console.print(summary.line().removeprefix("- ").replace("**", ""), highlight=False)
    return 0
