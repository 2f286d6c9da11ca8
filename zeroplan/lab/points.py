"""A results file's records as report points: what each run was (model, stage, shape), what it
measured, and what zeroplan and DeepSpeed predicted for it. Shared by the markdown report and its
plots."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zeroplan.lab import jsonl
from zeroplan.core.bounded import require_file
from zeroplan.core.errors import InvalidInput

GIB = 1 << 30
BREAKDOWN_TERMS = ("params", "grads", "optimizer_states", "activations", "buffers", "overhead")
SHAPE_FIELDS = ("micro_batch", "seq_len", "tiles", "grad_ckpt", "offload_optimizer", "offload_params", "frozen",
                "lora_rank", "world_size")
SHAPE_DEFAULTS = {"offload_optimizer": "none", "offload_params": "none", "frozen": (), "lora_rank": 0, "world_size": 1}


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
    require_file(results_path, "results file")
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
    holding them, or from the runner's `predicted_breakdown` (zeroplan.core.memory's as_dict), where the
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


def relative_error(predicted: float | None, measured: float | None) -> float | None:
    """The one error definition of every report (zeroplan report, benchmarks/accuracy_report.py):
    (predicted - measured) / measured, signed (negative: an under-estimate), as a fraction; None
    when either side is missing or the measurement is zero."""
    if predicted is None or not measured:
        return None
    return (predicted - measured) / measured


def measured_value(point: Point, key: str) -> float | None:
    """A measured number of the point, None when the run did not get that far."""
    return point.number(key) if point.status == "ok" else None
