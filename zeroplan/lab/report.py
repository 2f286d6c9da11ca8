"""Benchmark reports: a results JSONL rendered as a GitHub-readable README.md and PNG plots.

The README has a header (devices, dates, the command that produced the results), one table per
model and shape with the ZeRO stages side by side, a predicted-vs-measured table (zeroplan's
prediction and DeepSpeed's estimator against the measured peak allocated bytes), the same for
peak reserved (where the records hold both figures), a summary of the errors (points.relative_error, the definition benchmarks/accuracy_report.py uses too), and the
failed points with their reasons. Plots: `memory_<model>.png` (predicted beside measured peak
allocated, and predicted beside measured peak reserved, per point, with the GPU's capacity) and
`throughput_<model>.png` (tokens/s per stage). Every file is written atomically. matplotlib is imported only when plotting.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zeroplan.lab import plots as plotting
from zeroplan.lab.points import (GIB, Point, deepspeed_estimate, load_points, measured_value, predicted_allocated,
                                  relative_error, shape_label, short_shape)
from zeroplan.core.atomic import write_files_atomic
from zeroplan.core.errors import InvalidInput

NO_VALUE = "—"


@dataclass(frozen=True)
class ErrorSummary:
    """How far one predictor is from the measured peaks: signed errors in percent, per point."""

    name: str
    errors_pct: tuple[float, ...]

    @property
    def under_estimates(self) -> int:
        """Points where the prediction was below the measured peak (the dangerous direction)."""
        return sum(1 for error in self.errors_pct if error < 0)

    def line(self) -> str:
        """One markdown summary line."""
        if not self.errors_pct:
            return f"- **{self.name}**: no point with both a prediction and a measured peak."
        absolute = [abs(error) for error in self.errors_pct]
        return (f"- **{self.name}**: median absolute error {statistics.median(absolute):.1f}%, worst "
                f"{max(absolute):.1f}%, {self.under_estimates} under-estimate(s) of {len(absolute)} measured points.")


def _gib(value: float | None) -> str:
    return NO_VALUE if value is None else f"{value / GIB:.2f}"


def _mfu(fraction: float) -> str:
    """MFU in percent: one decimal, or two significant digits below 0.1% (CPU runs)."""
    percent = fraction * 100
    return f"{percent:.1f}%" if percent >= 0.1 or percent == 0 else f"{percent:.2g}%"


def _error_pct(predicted: float | None, measured: float | None) -> float | None:
    """points.relative_error in percent, for the tables."""
    error = relative_error(predicted, measured)
    return None if error is None else error * 100


def _pct(value: float | None) -> str:
    return NO_VALUE if value is None else f"{value:+.1f}%"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _models(points: list[Point]) -> list[str]:
    return list(dict.fromkeys(point.model for point in points))


def _groups(points: list[Point]) -> dict[tuple[str, tuple], dict[int, Point]]:
    """Points by (model, shape), then by stage: models in the order first measured, shapes sorted."""
    models = _models(points)
    groups: dict[tuple[str, tuple], dict[int, Point]] = {}
    for point in sorted(points, key=lambda p: (models.index(p.model), p.shape, p.stage)):
        groups.setdefault((point.model, point.shape), {})[point.stage] = point
    return groups


def stages_table(by_stage: dict[int, Point]) -> list[str]:
    """Markdown rows: one column per ZeRO stage, one row per measure."""
    stages = sorted(by_stage)
    rows = [
        ("status", lambda p: f"**{p.status}**" if p.status != "ok" else "ok"),
        ("peak allocated (GiB)", lambda p: _gib(measured_value(p, "measured_peak_allocated_bytes"))),
        ("peak reserved (GiB)", lambda p: _gib(measured_value(p, "measured_peak_reserved_bytes"))),
        ("tokens/s", lambda p: NO_VALUE if measured_value(p, "tokens_per_s") is None else f"{p.number('tokens_per_s'):,.0f}"),
        ("MFU", lambda p: NO_VALUE if measured_value(p, "mfu") is None else _mfu(p.number("mfu"))),
        ("step time (s)", lambda p: NO_VALUE if measured_value(p, "step_time_s") is None else f"{p.number('step_time_s'):.3f}"),
    ]
    lines = ["| | " + " | ".join(f"ZeRO-{stage}" for stage in stages) + " |",
             "|---|" + "---:|" * len(stages)]
    for label, render in rows:
        lines.append(f"| {label} | " + " | ".join(_cell(render(by_stage[stage])) for stage in stages) + " |")
    return lines


def prediction_rows(points: list[Point]) -> tuple[list[str], ErrorSummary, ErrorSummary]:
    """The predicted-vs-measured table and the error summaries of zeroplan and DeepSpeed."""
    lines = ["| model | shape | stage | status | zeroplan predicted (GiB) | measured peak (GiB) | zeroplan error "
             "| DeepSpeed estimator (GiB) | DeepSpeed error |", "|---|---|---:|---|---:|---:|---:|---:|---:|"]
    ours: list[float] = []
    theirs: list[float] = []
    for point in sorted(points, key=lambda p: (_models(points).index(p.model), p.shape, p.stage)):
        predicted, estimator = predicted_allocated(point), deepspeed_estimate(point)
        measured = measured_value(point, "measured_peak_allocated_bytes")
        error, estimator_error = _error_pct(predicted, measured), _error_pct(estimator, measured)
        ours += [error] if error is not None else []
        theirs += [estimator_error] if estimator_error is not None else []
        lines.append(f"| {_cell(point.model)} | {_cell(short_shape(point.shape))} | {point.stage} | {point.status} | "
                     f"{_gib(predicted)} | {_gib(measured)} | {_pct(error)} | {_gib(estimator)} | {_pct(estimator_error)} |")
    return lines, ErrorSummary("zeroplan", tuple(ours)), ErrorSummary("DeepSpeed estimator", tuple(theirs))


def reserved_rows(points: list[Point]) -> tuple[list[str], ErrorSummary]:
    """The predicted-vs-measured table of peak reserved bytes (what the caching allocator holds:
    the figure that decides an out-of-memory error) and zeroplan's error summary; empty when no
    point has both figures."""
    lines = ["| model | shape | stage | status | zeroplan predicted (GiB) | measured peak reserved (GiB) | error |",
             "|---|---|---:|---|---:|---:|---:|"]
    errors: list[float] = []
    for point in sorted(points, key=lambda p: (_models(points).index(p.model), p.shape, p.stage)):
        predicted = point.number("predicted_peak_reserved_bytes")
        measured = measured_value(point, "measured_peak_reserved_bytes")
        error = _error_pct(predicted, measured)
        if error is None:
            continue
        errors.append(error)
        lines.append(f"| {_cell(point.model)} | {_cell(short_shape(point.shape))} | {point.stage} | {point.status} | "
                     f"{_gib(predicted)} | {_gib(measured)} | {_pct(error)} |")
    return (lines if errors else []), ErrorSummary("zeroplan, peak reserved", tuple(errors))


def _distinct(points: list[Point], key: str) -> list[str]:
    values = [point.record.get(key) for point in points]
    return list(dict.fromkeys(str(value) for value in values if value not in (None, "")))


def header(points: list[Point], source: str, report_command: str) -> list[str]:
    """Title, devices, dates, versions and the commands behind the report."""
    dates = sorted(_distinct(points, "date"))
    sweeps = _distinct(points, "sweep")
    lines = [f"# Benchmark report{': ' + ', '.join(sweeps) if sweeps else ''}", "",
             f"- **device(s)**: {', '.join(_distinct(points, 'device')) or 'unknown'}",
             f"- **dates**: {dates[0] + ' to ' + dates[-1] if len(dates) > 1 else (dates[0] if dates else 'unknown')}",
             f"- **points**: {len(points)} ({_status_counts(points)}), from `{source}`"]
    versions = _versions(points)
    if versions:
        lines.append(f"- **versions**: {versions}")
    for command in _distinct(points, "bench_command"):
        lines.append(f"- **produced by**: `{command}`")
    lines.append(f"- **rendered by**: `{report_command}`")
    return lines


def _status_counts(points: list[Point]) -> str:
    counts: dict[str, int] = {}
    for point in points:
        counts[point.status] = counts.get(point.status, 0) + 1
    return ", ".join(f"{count} {status}" for status, count in sorted(counts.items()))


def _versions(points: list[Point]) -> str:
    seen: dict[str, list[str]] = {}
    for point in points:
        versions = point.record.get("versions")
        if isinstance(versions, dict):
            for name, version in versions.items():
                if version is not None and str(version) not in seen.setdefault(str(name), []):
                    seen[str(name)].append(str(version))
    return ", ".join(f"{name} {' / '.join(values)}" for name, values in sorted(seen.items()))


def render_markdown(points: list[Point], source: str, report_command: str,
                    plot_names: list[str]) -> tuple[str, tuple[ErrorSummary, ...]]:
    """The whole README.md text, and the error summaries it prints."""
    lines = header(points, source, report_command)
    lines += ["", "## ZeRO stages side by side", ""]
    for (model, shape), by_stage in _groups(points).items():
        lines += [f"### {model}: {shape_label(shape)}", "", *stages_table(by_stage), ""]
    table, ours, theirs = prediction_rows(points)
    lines += ["## Predicted vs measured peak", "",
              "Measured: peak allocated bytes (torch.cuda.max_memory_allocated) of the busiest rank; "
              "zeroplan's figure is its predicted peak allocated bytes (its whole-GPU peak where a record "
              "has no allocated figure). Error = (predicted − measured) / measured; negative is an "
              "under-estimate.", "",
              *table, "", "### Summary", "", ours.line(), theirs.line(), ""]
    reserved, reserved_summary = reserved_rows(points)
    if reserved:
        lines += ["## Predicted vs measured peak reserved", "",
                  "Measured: peak reserved bytes (torch.cuda.max_memory_reserved) of the busiest rank, what the "
                  "caching allocator holds and what runs out first; zeroplan's figure is its allocator replay's "
                  "peak (zeroplan.core.allocator over the steps' allocations) as the runner recorded it beside "
                  "the measurement, from the code of the run's date (benchmarks/accuracy_report.py predicts "
                  "every run again with today's code).", "",
                  *reserved, "", reserved_summary.line(), ""]
    failures = [point for point in points if point.status != "ok"]
    if failures:
        lines += ["## Points that did not finish", ""]
        for point in failures:
            reason = point.record.get("reason") or "no reason recorded"
            lines.append(f"- {point.model}, ZeRO-{point.stage}, {shape_label(point.shape)}: "
                         f"**{point.status}**, {_cell(reason)}")
        lines.append("")
    if plot_names:
        lines += ["## Plots", ""] + [f"![{name}]({name})" for name in plot_names] + [""]
    return "\n".join(lines), (ours, theirs, reserved_summary) if reserved else (ours, theirs)


def slug(name: str) -> str:
    """A file-name-safe form of a model name: `InternVL2_5-1B` -> `internvl2_5-1b`."""
    return re.sub(r"[^a-z0-9_.-]+", "-", name.lower()).strip("-.") or "model"


@dataclass(frozen=True)
class ReportFiles:
    """What a report wrote, and the error summaries it printed."""

    readme: Path
    plots: tuple[Path, ...]
    summaries: tuple[ErrorSummary, ...]
    skipped: str = ""  # why no plots were drawn, when they were not


def write_report(results_path: str | Path, out_dir: str | Path, report_command: str) -> ReportFiles:
    """Render a results JSONL into out_dir: README.md and the memory/throughput PNGs per model."""
    points = load_points(results_path)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InvalidInput(f"report folder {out_dir} is a file")

    files: dict[Path, bytes] = {}  # everything is rendered before anything is written
    skipped = "" if plotting.available() else ("plots skipped: matplotlib is not installed "
                                               "(pip install matplotlib, then rerun this command)")
    for model in _models(points) if not skipped else ():
        of_model = [point for point in points if point.model == model]
        for kind, plot in (("memory", plotting.plot_memory), ("throughput", plotting.plot_throughput)):
            files[out_dir / f"{kind}_{slug(model)}.png"] = plot(model, of_model)
    plots = list(files)
    markdown, summaries = render_markdown(points, str(results_path), report_command, [path.name for path in plots])
    readme = out_dir / "README.md"
    files[readme] = markdown.encode("utf-8")
    write_files_atomic(files)
    return ReportFiles(readme, tuple(plots), summaries, skipped)
