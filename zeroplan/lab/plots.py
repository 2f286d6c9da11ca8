"""PNG plots for benchmark reports (matplotlib, imported inside the functions): the predicted
breakdown per stage beside the measured peak, and throughput per stage."""

from __future__ import annotations

import io

from zeroplan.lab.points import BREAKDOWN_TERMS, GIB, Point, measured_value, predicted_terms, short_shape


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


def plot_memory(model: str, points: list[Point]) -> bytes:
    """PNG: per point (shape, stage), zeroplan's predicted breakdown stacked, and beside it the
    measured peak allocated (absent, marked with the status, when the point did not finish)."""
    points = sorted(points, key=lambda p: (p.shape, p.stage))
    figure = _figure(max(6.0, 0.9 * len(points) + 2), 4.5)
    axes = figure.add_subplot()
    width = 0.38
    labelled: set[str] = set()
    colors = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948")
    for index, point in enumerate(points):
        breakdown = predicted_terms(point.record)
        bottom = 0.0
        for term, color in zip(BREAKDOWN_TERMS, colors):
            value = breakdown.get(term)
            if isinstance(value, (int, float)) and value > 0:
                axes.bar(index - width / 2, value / GIB, width, bottom=bottom, color=color,
                         label=_label_once(labelled, term.replace("_", " ")))
                bottom += value / GIB
        measured = measured_value(point, "measured_peak_allocated_bytes")
        if measured is not None:
            axes.bar(index + width / 2, measured / GIB, width, color="#555555", hatch="//", edgecolor="white",
                     label=_label_once(labelled, "measured peak"))
        else:
            axes.text(index + width / 2, 0, point.status.upper(), rotation=90, ha="center", va="bottom", fontsize=8)
    axes.set_xticks(range(len(points)), [f"ZeRO-{p.stage}\n{short_shape(p.shape)}" for p in points], fontsize=7)
    axes.set_ylabel("GiB per GPU")
    axes.set_title(f"{model}: predicted breakdown (left) vs measured peak allocated (right)")
    if labelled:
        axes.legend(fontsize=7, loc="upper right")
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
