"""Benchmark reports: a results JSONL rendered as a GitHub-readable README.md and PNG plots.

The README has a header (devices, dates, the command that produced the results), one table per
model and shape with the ZeRO stages side by side, a predicted-vs-measured table (zeroplan's
prediction and DeepSpeed's estimator against the measured peak allocated bytes), a summary of the
errors, and the failed points with their reasons. Plots: `memory_<model>.png` (zeroplan's predicted
breakdown stacked per stage beside the measured peak) and `throughput_<model>.png` (tokens/s per
stage). Every file is written atomically. matplotlib is imported only when plotting.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zeroplan import jsonl
from zeroplan.atomic import write_files_atomic
from zeroplan.errors import InvalidInput

GIB = 1 << 30
BREAKDOWN_TERMS = ("params", "grads", "optimizer_states", "activations", "buffers", "overhead")
SHAPE_FIELDS = ("micro_batch", "seq_len", "tiles", "grad_ckpt", "offload_optimizer", "offload_params", "frozen",
                "lora_rank", "world_size")
SHAPE_DEFAULTS = {"offload_optimizer": "none", "offload_params": "none", "frozen": (), "lora_rank": 0, "world_size": 1}
NO_VALUE = "—"


@dataclass(frozen=True)
class Point:
    """One result record, with the fields a report groups and compares by."""

    model: str
    stage: int
    shape: tuple
    status: str
    record: dict[str, Any]

    def number(self, key: str) -> float | None:
        """A numeric field of the record, None when absent or not a number."""
        value = self.record.get(key)
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def deepspeed_estimate(point) -> float | None:
    """DeepSpeed's estimator for the point's stage: the runner stores DeepSpeed's figures as
    {"for_stage": {"gpu_bytes": ...}, "zero2": ..., "zero3": ...}; older records held a number."""
    value = point.record.get("deepspeed_estimator_bytes")
    if isinstance(value, dict):
        value = (value.get("for_stage") or {}).get("gpu_bytes")
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


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


def _field(record: dict[str, Any], key: str) -> Any:
    """A record's top-level field, else the same field of its embedded spec."""
    if key in record:
        return record[key]
    spec = record.get("spec")
    return spec.get(key) if isinstance(spec, dict) else None


def to_point(record: dict[str, Any]) -> Point | None:
    """The Point of a record, or None when it lacks a model, stage or status."""
    model, stage, status = _field(record, "model"), _field(record, "stage"), record.get("status")
    if not isinstance(model, str) or not isinstance(stage, int) or not isinstance(status, str):
        return None
    shape = []
    for name in SHAPE_FIELDS:
        value = _field(record, name)
        value = SHAPE_DEFAULTS.get(name) if value is None else value
        shape.append(tuple(value) if isinstance(value, list) else value)
    return Point(model, stage, tuple(shape), status, record)


def load_points(results_path: str | Path) -> list[Point]:
    """Every usable point of a results JSONL file; InvalidInput when there is none."""
    results_path = Path(results_path)
    if not results_path.is_file():
        raise InvalidInput(f"results file {results_path} does not exist")
    read = jsonl.read(results_path)
    points = [point for point in map(to_point, read.records) if point is not None]
    if not points:
        raise InvalidInput(f"{results_path} holds no usable result lines ({read.skipped_lines} unreadable)")
    return points


def shape_label(shape: tuple) -> str:
    """A shape in words: `micro-batch 1, 4096 tokens, 7 tiles, checkpointing on, 1 GPU`."""
    values = dict(zip(SHAPE_FIELDS, shape))
    parts = [f"micro-batch {values['micro_batch']}", f"{values['seq_len']} tokens", f"{values['tiles']} tiles",
             f"checkpointing {'on' if values['grad_ckpt'] else 'off'}",
             f"{values['world_size']} rank" + ("s" if values["world_size"] != 1 else "")]
    if values["offload_optimizer"] != "none":
        parts.append(f"optimizer offload to {values['offload_optimizer']}")
    if values["offload_params"] != "none":
        parts.append(f"parameter offload to {values['offload_params']}")
    if values["frozen"]:
        parts.append("frozen " + "+".join(values["frozen"]))
    if values["lora_rank"]:
        parts.append(f"LoRA rank {values['lora_rank']}")
    return ", ".join(parts)


def short_shape(shape: tuple) -> str:
    """A shape in a few characters for plot labels: `mb1 ckpt`."""
    values = dict(zip(SHAPE_FIELDS, shape))
    text = f"mb{values['micro_batch']} {'ckpt' if values['grad_ckpt'] else 'no-ckpt'}"
    if values["offload_optimizer"] != "none":
        text += " off"
    if values["lora_rank"]:
        text += f" lora{values['lora_rank']}"
    return text


def predicted_allocated(point: Point) -> float | None:
    """zeroplan's predicted peak allocated bytes (what torch.cuda.max_memory_allocated measures);
    records without that figure fall back to their predicted_peak_bytes."""
    value = point.number("predicted_peak_allocated_bytes")
    return value if value is not None else point.number("predicted_peak_bytes")


def predicted_terms(record: dict[str, Any]) -> dict[str, int]:
    """The predicted breakdown as the six summary terms (BREAKDOWN_TERMS): from a `predicted` dict
    holding them, or from the runner's `predicted_breakdown` (zeroplan.memory's as_dict), where the
    optimizer states are master weights plus moments and activations include the logits and loss."""
    summary = record.get("predicted")
    if isinstance(summary, dict):
        return {term: summary[term] for term in BREAKDOWN_TERMS if isinstance(summary.get(term), (int, float))}
    full = record.get("predicted_breakdown")
    if not isinstance(full, dict):
        return {}

    def get(*keys: str) -> int:
        return sum(full[key] for key in keys if isinstance(full.get(key), (int, float)))

    return {"params": get("params"), "grads": get("grads"),
            "optimizer_states": get("master_weights", "optimizer_states"),
            "activations": get("activations_vision", "activations_llm", "logits_and_loss"),
            "buffers": get("buffers"), "overhead": get("overhead")}


def _gib(value: float | None) -> str:
    return NO_VALUE if value is None else f"{value / GIB:.2f}"


def _mfu(fraction: float) -> str:
    """MFU in percent: one decimal, or two significant digits below 0.1% (CPU runs)."""
    percent = fraction * 100
    return f"{percent:.1f}%" if percent >= 0.1 or percent == 0 else f"{percent:.2g}%"


def _error_pct(predicted: float | None, measured: float | None) -> float | None:
    """Signed error of a prediction in percent of the measured value (negative: under-estimate)."""
    if predicted is None or not measured:
        return None
    return (predicted - measured) / measured * 100


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


def measured_value(point: Point, key: str) -> float | None:
    """A measured number of the point, None when the run did not get that far."""
    return point.number(key) if point.status == "ok" else None


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


def render_markdown(points: list[Point], source: str, report_command: str, plot_names: list[str]) -> str:
    """The whole README.md text."""
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
    return "\n".join(lines)


def slug(name: str) -> str:
    """A file-name-safe form of a model name: `InternVL2_5-1B` -> `internvl2_5-1b`."""
    return re.sub(r"[^a-z0-9_.-]+", "-", name.lower()).strip("-.") or "model"


@dataclass(frozen=True)
class ReportFiles:
    """What a report wrote, and the error summaries it printed."""

    readme: Path
    plots: tuple[Path, ...]
    summaries: tuple[ErrorSummary, ...]


def write_report(results_path: str | Path, out_dir: str | Path, report_command: str) -> ReportFiles:
    """Render a results JSONL into out_dir: README.md and the memory/throughput PNGs per model."""
    points = load_points(results_path)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InvalidInput(f"report folder {out_dir} is a file")
    from zeroplan import plots as plotting  # matplotlib only when a report is written

    files: dict[Path, bytes] = {}  # everything is rendered before anything is written
    for model in _models(points):
        of_model = [point for point in points if point.model == model]
        for kind, plot in (("memory", plotting.plot_memory), ("throughput", plotting.plot_throughput)):
            files[out_dir / f"{kind}_{slug(model)}.png"] = plot(model, of_model)
    plots = list(files)
    markdown = render_markdown(points, str(results_path), report_command, [path.name for path in plots])
    readme = out_dir / "README.md"
    files[readme] = markdown.encode("utf-8")
    write_files_atomic(files)
    _, ours, theirs = prediction_rows(points)
    return ReportFiles(readme, tuple(plots), (ours, theirs))
