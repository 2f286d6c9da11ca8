"""Rehearsed points predicted by today's memory model, beside what they measured (issue 22's score).

Reads every reports/rehearsal_*/results.jsonl, re-predicts each finished or out-of-memory point with
the code as it is (the rank it played, the plan its config carried), and splits the points by a
rule: a point is held out when the first hex digit of sha256(point id) is 0-4 (about a third). The rule
was stated after the residuals of every point had been seen (the report's notes say so); later
campaigns keep it, so their new points are scored out of sample.
Writes reports/rehearsal/README.md and summary.json:

    PYTHONPATH=$PWD .venv/bin/python benchmarks/rehearsal_report.py --out reports/rehearsal
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import statistics
from pathlib import Path

from zeroplan.core.memory import estimate
from zeroplan.core.profiles import load_gpu, load_model, pad_vocab
from zeroplan.core.run import RunSpec
from zeroplan.lab.bench import describe
from zeroplan.lab.parallel import point_plan

GIB = 2**30
HELD_OUT_DIGITS = "01234"


def held_out(point_id: str) -> bool:
    """The hold-out rule (stated before the model was changed): sha256 of the point id starts with 0-4."""
    return hashlib.sha256(point_id.encode()).hexdigest()[0] in HELD_OUT_DIGITS


def predict(spec: RunSpec):
    profile = pad_vocab(load_model(spec.model), spec.vocab_multiple)
    shape = spec.shape()
    rank = spec.simulate_rank if spec.simulated else None
    return estimate(profile, shape, point_plan(spec, profile, shape), load_gpu(spec.gpu or "h100"),
                    gradient_accumulation=spec.gradient_accumulation, compiled=spec.compile, rank=rank)


def rows(pattern: str) -> list[dict]:
    out = []
    for path in sorted(glob.glob(pattern)):
        for line in open(path, encoding="utf-8"):
            record = json.loads(line)
            if record.get("status") not in ("ok", "oom"):
                continue
            spec = RunSpec.from_dict(record["spec"])
            breakdown = predict(spec)
            row = {"point": describe(spec), "point_id": record["point_id"], "sweep": Path(path).parent.name,
                   "held_out": held_out(record["point_id"]), "status": record["status"],
                   "predicted_fits": breakdown.peak <= breakdown.capacity, "device": record.get("device"),
                   "date": record.get("date"), "predicted_allocated": breakdown.peak_allocated,
                   "predicted_reserved": breakdown.peak_reserved, "predicted_device": breakdown.peak}
            if record["status"] == "ok":
                row.update(measured_allocated=record["measured_peak_allocated_bytes"],
                           measured_reserved=record["measured_peak_reserved_bytes"],
                           measured_device=record.get("nvml_process_peak_used_bytes"),
                           outside_allocator=record.get("outside_allocator_bytes"),
                           points_beside=record.get("points_beside", 0))
                for key in ("allocated", "reserved", "device"):
                    measured = row[f"measured_{key}"]
                    row[f"error_{key}"] = (row[f"predicted_{key}"] - measured) / measured if measured else None
            out.append(row)
    return out


def summary(selected: list[dict]) -> dict:
    result = {"points": len(selected)}
    for key in ("allocated", "reserved", "device"):
        errors = [r[f"error_{key}"] for r in selected if r.get(f"error_{key}") is not None]
        if errors:
            result[key] = {"median_abs": statistics.median(abs(e) for e in errors), "max_abs": max(map(abs, errors)),
                           "worst_under": min(errors), "n": len(errors)}
    result["oom_predicted_not_to_fit"] = sum(1 for r in selected if r["status"] == "oom" and not r["predicted_fits"])
    result["oom"] = sum(1 for r in selected if r["status"] == "oom")
    result["ran_but_predicted_not_to_fit"] = sum(1 for r in selected if r["status"] == "ok" and not r["predicted_fits"])
    return result


def percent(value) -> str:
    return "—" if value is None else f"{value:+.1%}"


def markdown(table: list[dict], scores: dict) -> str:
    lines = ["# Rehearsed ranks: predicted beside measured", "",
             "Made by `PYTHONPATH=$PWD .venv/bin/python benchmarks/rehearsal_report.py --out reports/rehearsal` from",
             "reports/rehearsal_small, rehearsal_big and rehearsal_check (one NVIDIA H100 80GB HBM3, driver 580.159.04,",
             "torch 2.11.0+cu130, DeepSpeed 0.19.8, transformers 5.17.0; 2026-12-07). Predictions are today's code's.",
             "Held out: points whose sha256(point id) starts with 0-4 (see the first note on what that is worth).", ""]
    for name in ("held_out", "fitted", "all"):
        score = scores[name]
        parts = [f"{score['points']} points"]
        for key in ("allocated", "reserved", "device"):
            if key in score:
                s = score[key]
                parts.append(f"{key}: median |error| {s['median_abs']:.1%}, max {s['max_abs']:.1%}, "
                             f"worst under-estimate {s['worst_under']:+.1%} (n={s['n']})")
        parts.append(f"out of memory {score['oom']} (predicted not to fit: {score['oom_predicted_not_to_fit']}); "
                     f"ran but predicted not to fit: {score['ran_but_predicted_not_to_fit']}")
        lines += [f"- **{name.replace('_', ' ')}**: " + "; ".join(parts)]
    lines += ["", "Notes:",
              "- The hold-out rule was written down after the first call's residuals had been looked at, every point",
              "  included. The one model change made from them (frozen vision under checkpointing is still recorded by",
              "  autograd: core.activations.vision_graph_recorded) has no fitted constant: it is read off transformers",
              "  5.17's gradient_checkpointing_enable. The held-out figures are therefore not a clean out-of-sample",
              "  score: the 26B points of the second call were looked at too, and confirmed the mechanism.",
              "- Device memory is predicted as reserved plus the GPU profile's calibrated CUDA context (2.31 GB on the",
              "  H100, measured on real nccl runs); a rehearsal has no NCCL communicator and holds 0.81 GiB outside the",
              "  allocator, so its device error is an over-estimate by construction.",
              "- Not measured: 38B, 40B, 78B; micro-batch > 1, accumulation, no checkpointing and most offload points of",
              "  1B-8B (the sweeps in benchmarks/rehearsal/ hold them: the device time of the session ran out).",
              "", "| point | held out | status | allocated GiB pred / meas | error | reserved GiB pred / meas | error |"
              " device GiB pred / meas (NVML, process) | error |", "|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        def pair(key):
            measured = r.get(f"measured_{key}")
            return f"{r[f'predicted_{key}'] / GIB:.2f} / {'—' if measured is None else f'{measured / GIB:.2f}'}"
        lines.append(f"| {r['point']} | {'yes' if r['held_out'] else ''} | {r['status']} | {pair('allocated')} | "
                     f"{percent(r.get('error_allocated'))} | {pair('reserved')} | {percent(r.get('error_reserved'))} | "
                     f"{pair('device')} | {percent(r.get('error_device'))} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="reports/rehearsal")
    parser.add_argument("--results", default="reports/rehearsal_*/results.jsonl")
    args = parser.parse_args()
    table = rows(args.results)
    scores = {"held_out": summary([r for r in table if r["held_out"]]),
              "fitted": summary([r for r in table if not r["held_out"]]), "all": summary(table)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps({"scores": scores, "points": table}, indent=1) + "\n")
    (out / "README.md").write_text(markdown(table, scores))
    print(json.dumps(scores, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
