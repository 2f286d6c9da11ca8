"""PNG plots for benchmark reports (matplotlib, imported inside the functions): predicted beside
measured memory per point, like with like (allocated with allocated, reserved with reserved), and
throughput per stage."""

from __future__ import annotations

import io

from zeroplan.core.profiles import match_gpu_name
from zeroplan.lab.points import GIB, Point, measured_value, predicted_allocated, short_shape

# (predicted key, measured key, label, colour): each pair is drawn side by side. The predicted
# total (reserved + CUDA context) is not drawn against either: torch's counters do not see the context.
MEMORY_PAIRS = (
    ("predicted_peak_allocated_bytes", "measured_peak_allocated_bytes", "allocated", "#4e79a7"),
    ("predicted_peak_reserved_bytes", "measured_peak_reserved_bytes", "reserved", "#f28e2b"),
)


def available() -> bool:
    """Whether matplotlib can be imported (it is optional: without it a report has no plots)."""
    import importlib.util

    try:
        return importlib.util.find_spec("matplotlib") is not None
    except (ImportError, ValueError):
        return False


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _label_once(labelled: set[str], label: str) -> str | None:
    """The legend label the first time it is drawn, None after, so each appears once."""
    if label in labelled:
        return None
    labelled.add(label)
    return label


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def memory_bars(point: Point) -> list[tuple[str, float | None, float | None]]:
    """(label, predicted bytes, measured bytes) for each MEMORY_PAIRS entry of one point; measured
    is None when the run did not finish."""
    bars = []
    for predicted_key, measured_key, label, _ in MEMORY_PAIRS:
        predicted = predicted_allocated(point) if label == "allocated" else point.number(predicted_key)
        bars.append((label, predicted, measured_value(point, measured_key)))
    return bars


def memory_title(model: str, points: list[Point]) -> str:
    """Model, device(s) and sequence length(s) of the plotted runs."""
    devices = sorted({str(p.record.get("device")) for p in points if p.record.get("device")}) or ["device unknown"]
    lengths = sorted({int(p.record["seq_len"]) for p in points if isinstance(p.record.get("seq_len"), int)})
    tokens = ", ".join(str(length) for length in lengths) or "?"
    return f"{model} on {' / '.join(devices)}, {tokens} tokens: predicted vs measured peak per GPU"


def capacity_bytes(points: list[Point]) -> int | None:
    """The GPU's memory, from the bundled profile of the device the runs recorded (None: unknown)."""
    for point in points:
        device = point.record.get("device")
        profile = match_gpu_name(device) if isinstance(device, str) and device.strip() else None
        if profile is not None:
            return profile.memory_bytes
    return None


def plot_memory(model: str, points: list[Point]) -> bytes:
    """PNG: per point (shape, stage), predicted and measured peak allocated side by side, then
    predicted and measured peak reserved (measured hatched; the status instead when the run did not
    finish), with the GPU's capacity as a line."""
    points = sorted(points, key=lambda p: (p.shape, p.stage))
    figure = _figure(max(6.0, 1.2 * len(points) + 2), 4.5)
    axes = figure.add_subplot()
    width = 0.2
    labelled: set[str] = set()
    for index, point in enumerate(points):
        for pair, (label, predicted, measured) in enumerate(memory_bars(point)):
            color = MEMORY_PAIRS[pair][3]
            left = index - 1.5 * width + 2 * pair * width
            if predicted is not None:
                axes.bar(left, predicted / GIB, width, color=color, label=_label_once(labelled, f"predicted {label}"))
            if measured is not None:
                axes.bar(left + width, measured / GIB, width, color=color, hatch="//", edgecolor="white",
                         label=_label_once(labelled, f"measured {label}"))
            elif pair == 0:
                axes.text(left + width, 0, point.status.upper(), rotation=90, ha="center", va="bottom", fontsize=8)
    capacity = capacity_bytes(points)
    if capacity:
        axes.axhline(capacity / GIB, color="#222222", linestyle="--", linewidth=1,
                     label=_label_once(labelled, f"GPU capacity ({capacity / GIB:.0f} GiB)"))
    axes.set_xticks(range(len(points)), [f"ZeRO-{p.stage}\n{short_shape(p.shape)}" for p in points], fontsize=7)
    axes.set_ylabel("GiB per GPU")
    axes.set_title(memory_title(model, points), fontsize=9)
    if labelled:
        axes.legend(fontsize=7, loc="upper left")
    return _png(figure)


def plot_throughput(model: str, points: list[Point]) -> bytes:
    """PNG: tokens/s per ZeRO stage, one bar per shape; a point that did not finish shows its status."""
    stages = sorted({point.stage for point in points})
    shapes = list(dict.fromkeys(point.shape for point in sorted(points, key=lambda p: p.shape)))
    figure = _figure(max(6.0, 1.2 * len(stages) * max(1, len(shapes)) / 2 + 2), 4.5)
    axes = figure.add_subplot()
    width = 0.8 / max(1, len(shapes))
    by_key = {(point.shape, point.stage): point for point in points}
    labelled: set[str] = set()
    for shape_index, shape in enumerate(shapes):
        offset = (shape_index - (len(shapes) - 1) / 2) * width
        for stage_index, stage in enumerate(stages):
            point = by_key.get((shape, stage))
            if point is None:
                continue
            tokens = measured_value(point, "tokens_per_s")
            if tokens is not None:
                axes.bar(stage_index + offset, tokens, width, color=f"C{shape_index % 10}",
                         label=_label_once(labelled, short_shape(shape)))
            else:
                axes.text(stage_index + offset, 0, point.status.upper(), rotation=90, ha="center", va="bottom",
                          fontsize=8)
    axes.set_xticks(range(len(stages)), [f"ZeRO-{stage}" for stage in stages])
    axes.set_ylabel("tokens/s")
    axes.set_title(f"{model}: training throughput by ZeRO stage")
    if labelled:
        axes.legend(fontsize=7)
    return _png(figure)
