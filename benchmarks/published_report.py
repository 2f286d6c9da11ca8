"""Predict published multi-node ZeRO / FSDP runs with zeroplan and write reports/published/.

Rebuild:  PYTHONPATH=. python benchmarks/published_report.py [--out reports/published]

Inputs (benchmarks/published/): runs.json (what each source measured, with title, URL, table and
assumptions; built by build_runs.py), predictions.toml (how zeroplan models each run: scope,
profile, GPU, cluster file, fit/holdout split), profiles/ (text-only LLMs as zeroplan profiles) and
clusters/ (each source's interconnect as a cluster file).

Outputs: README.md (predicted vs published, held-out scores, rankings), predictions.jsonl (one
object per run and model variant), published.png (predicted against published tokens/s/GPU).

Variants, each scored on the held-out half:
- ring: zeroplan's communication model (zeroplan.core.cluster), compute efficiency fitted per GPU
  chip on the fit half (the only fitted constant; the published runs' software stacks are not
  the one zeroplan calibrate measured);
- shipped: the same with the GPU profiles' constants as shipped (nothing fitted);
- per-gpu-share: collectives over NICs × rate / GPUs per node per GPU (every GPU's bytes crossing
  the network), efficiency fitted the same way: the divisor the old model used;
- no-comm: communication free, efficiency fitted: how much the network matters at all.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tomllib
from dataclasses import replace
from pathlib import Path

from zeroplan.core.atomic import write_atomic
from zeroplan.core.cluster import Network, load_cluster
from zeroplan.core.collectives import collectives, links_of
from zeroplan.core.plan import Plan, TrainShape
from zeroplan.core.profiles import load_gpu, load_model
from zeroplan.core.steptime import step_time
from zeroplan.core.tuning import tuned_plan

HERE = Path(__file__).resolve().parent / "published"
ROOT = HERE.parent.parent
COMMAND = "PYTHONPATH=. .venv/bin/python benchmarks/published_report.py --out reports/published"
TARGET_MEDIAN, TARGET_MAX = 0.15, 0.35
VARIANTS = ("ring", "shipped", "per-gpu-share", "no-comm")


def chip(gpu_name: str) -> str:
    """The GPU chip a compute efficiency belongs to (A100-40GB and -80GB share one)."""
    return "A100" if "A100" in gpu_name else "H100" if "H100" in gpu_name else gpu_name


def _network(variant: str, cluster: Network, gpus_per_node: int) -> Network:
    if variant == "no-comm":
        return replace(cluster, busbw_gbps=tuple((k, 1e6) for k in ("all_gather", "reduce_scatter", "all_reduce", "reduce")),
                       hop_latency_us=1e-6)
    if variant == "per-gpu-share":
        node = cluster.nics_per_node * cluster.nic_gbit / 8 if cluster.nics_per_node else cluster.inter_node_gbps * gpus_per_node
        share = node / gpus_per_node
        return replace(cluster, busbw_gbps=tuple((k, share) for k in ("all_gather", "reduce_scatter", "all_reduce", "reduce")))
    return cluster


def setup(run: dict, how: dict, variant: str = "ring", stage: int | None = None, dp: int | None = None):
    """(profile, shape, plan, gpu, accumulation) of one published run as zeroplan sees it."""
    profile = load_model(str(HERE / "profiles" / f"{how['profile']}.toml"))
    gpu = load_gpu(how["gpu"])
    # Relative to the repository root, so the report names the file the same on every machine.
    cluster = load_cluster((HERE / "clusters" / f"{how['cluster']}.toml").relative_to(ROOT))
    if dp is not None:  # the surrogate's data-parallel group: one rank per node
        per_node, nodes = 1, dp
    else:
        per_node, nodes = run["gpus_per_node"], run["nodes"]
    network = _network(variant, cluster, per_node)
    ckpt = bool(run["grad_ckpt"]) if isinstance(run["grad_ckpt"], bool) else True
    shape = TrainShape(micro_batch=run["micro_batch"], seq_len=run["seq_len"], tiles=0, grad_ckpt=ckpt,
                       ckpt_layers=how.get("ckpt_layers"), frozen=frozenset({"vision", "projector"}))
    base = Plan(stage=run["zero_stage"] if stage is None else stage, gpus_per_node=per_node, nodes=nodes,
                network=network)
    plan = tuned_plan(profile, shape, base).with_(network=network)
    return profile, shape, plan, gpu, run["grad_accum"]


def with_efficiency(gpu, efficiency: float | None):
    """The GPU profile with its compute efficiency replaced (None: as shipped)."""
    if efficiency is None:
        return gpu
    return replace(gpu, calibrated={**gpu.calibrated, "compute_efficiency": efficiency})


def predict(run: dict, how: dict, variant: str, efficiency: float | None) -> dict:
    """zeroplan's prediction of one run under a variant and compute efficiency."""
    profile, shape, plan, gpu, accumulation = setup(run, how, variant)
    gpu = with_efficiency(gpu, efficiency)
    time = step_time(profile, shape, plan, gpu, accumulation)
    items = collectives(profile, shape, plan, gpu)
    return {"tokens_per_s_per_gpu": time.tokens_per_s_per_gpu, "step_s": time.step_s,
            "compute_s": time.compute_s, "exposed_comm_s": time.exposed_comm_s,
            "comm_s": sum(c.per_step_s(accumulation) for c in items),
            "bus_gbps": links_of(plan, gpu).bus_bandwidth("all_gather") / 1e9,
            "network": links_of(plan, gpu).assumption}


def matching_efficiency(run: dict, how: dict, variant: str) -> float:
    """The compute efficiency at which zeroplan predicts the run's published throughput."""
    low, high = 0.05, 1.0
    target = run["measured"]["tokens_per_s_per_gpu"]
    for _ in range(50):
        middle = (low + high) / 2
        if predict(run, how, variant, middle)["tokens_per_s_per_gpu"] < target:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def fitted_efficiencies(runs: dict, table: dict, variant: str) -> dict[str, float]:
    """Per GPU chip, the median matching efficiency over the fit half."""
    by_chip: dict[str, list[float]] = {}
    for run_id, how in table.items():
        if how.get("scope") == "throughput" and how["split"] == "fit":
            by_chip.setdefault(chip(runs[run_id]["gpu"]), []).append(matching_efficiency(runs[run_id], how, variant))
    return {name: statistics.median(values) for name, values in by_chip.items()}


def score(rows: list[dict], variant: str, split: str | None) -> dict:
    """Median and max |predicted / published - 1| of a variant over a split (None: every run)."""
    errors = [abs(r["error"]) for r in rows if r["variant"] == variant and (split is None or r["split"] == split)]
    if not errors:
        return {"runs": 0}
    return {"runs": len(errors), "median": statistics.median(errors), "max": max(errors)}


def rankings(runs: dict, table: dict, efficiency: dict[str, float]) -> list[dict]:
    """The rankings the sources report, predicted: BigScience ZeRO-1 vs ZeRO-0 and 1 vs 2 replicas
    (surrogates), MPT per-GPU throughput 16 -> 128 GPUs, MPT 70B on A100-40GB MBS 2 -> 4."""
    out = []

    def tps(run_id: str, **kwargs) -> float:
        run, how = runs[run_id], table[run_id]
        profile, shape, plan, gpu, accumulation = setup(run, how, dp=how.get("dp"), **kwargs)
        gpu = with_efficiency(gpu, efficiency.get(chip(run["gpu"])))
        return step_time(profile, shape, plan, gpu, accumulation).tokens_per_s_per_gpu

    def measured(run_id: str) -> float:
        return runs[run_id]["measured"]["tokens_per_s_per_gpu"]

    pairs = [
        ("BigScience 181B, 48 nodes: ZeRO-1 vs ZeRO-0 (tokens/s/GPU ratio)", "bigscience181b-384a100-zs1",
         "bigscience181b-384a100-zs0", "ZeRO-1 not slower than ZeRO-0"),
        ("BigScience 200B: 2 replicas (20 nodes) vs 1 (10 nodes)", "bigscience200b-160a100-dp2",
         "bigscience200b-80a100-dp1", "a second replica costs a few % per GPU, not more"),
        ("MPT-13B A100-40GB: 128 vs 16 GPUs", "mpt13b-128a100-40", "mpt13b-16a100-40", "per-GPU rate flat (within 5 %)"),
        ("MPT-7B A100-40GB: 128 vs 16 GPUs", "mpt7b-128a100-40", "mpt7b-16a100-40", "per-GPU rate flat (within 5 %)"),
        ("MPT-13B H100: 64 vs 16 GPUs", "mpt13b-64h100", "mpt13b-16h100", "per-GPU rate flat (within 5 %)"),
        ("MPT-70B A100-40GB: 128 GPUs MBS 4 vs 64 GPUs MBS 2", "mpt70b-128a100-40", "mpt70b-64a100-40",
         "per-GPU rate rises with the per-GPU batch"),
    ]
    for label, first, second, claim in pairs:
        published = measured(first) / measured(second)
        predicted = tps(first) / tps(second)
        if "not slower" in claim:
            held = predicted >= 1.0
        elif "few %" in claim:
            held = 0.9 <= predicted <= 1.0
        elif "flat" in claim:
            held = abs(predicted - 1) <= 0.05
        else:
            held = predicted > 1.0
        out.append({"check": label, "claim": claim, "published_ratio": round(published, 4),
                    "predicted_ratio": round(predicted, 4), "reproduced": held})
    return out


def plot(rows: list[dict], path_png: Path) -> None:
    """Predicted against published tokens/s/GPU (ring variant), fit and held-out marked."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 6), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    for variant, marker, color in (("ring", "o", "#4e79a7"), ("per-gpu-share", "x", "#e15759")):
        for split, fill in (("fit", "none"), ("holdout", color)):
            points = [r for r in rows if r["variant"] == variant and r["split"] == split]
            style = {"facecolors": fill, "edgecolors": color} if marker == "o" else {"color": color}
            axes.scatter([r["published"] for r in points], [r["predicted"] for r in points], marker=marker,
                         label=f"{variant}, {split}", **style)
    values = [r["published"] for r in rows]
    low, high = min(values) * 0.5, max(values) * 2
    for factor, style in ((1.0, "-"), (1.15, ":"), (1 / 1.15, ":"), (1.35, "--"), (1 / 1.35, "--")):
        axes.plot([low, high], [low * factor, high * factor], style, color="grey", linewidth=0.8)
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("published tokens/s per GPU")
    axes.set_ylabel("zeroplan predicted tokens/s per GPU")
    axes.set_title("Published multi-node FSDP/ZeRO-3 runs (lines: ±15 %, ±35 %)")
    axes.legend(fontsize=8)
    figure.savefig(path_png, format="png")


def _fmt_score(value: dict) -> str:
    if not value.get("runs"):
        return "n/a"
    return f"median {value['median']:.1%}, max {value['max']:.1%} ({value['runs']} runs)"


def readme(rows, scores, efficiency, ranks, runs, table) -> str:
    """The report's README.md."""
    ring = {r["id"]: r for r in rows if r["variant"] == "ring"}
    share = {r["id"]: r for r in rows if r["variant"] == "per-gpu-share"}
    shipped = {r["id"]: r for r in rows if r["variant"] == "shipped"}
    held = scores["ring"]["holdout"]
    met = held.get("runs") and held["median"] <= TARGET_MEDIAN and held["max"] <= TARGET_MAX
    lines = [
        "# Published multi-node runs predicted by zeroplan",
        "",
        f"Rebuild: `{COMMAND}`",
        "",
        "Sources, numbers and assumptions: `benchmarks/published/runs.json` (title, URL, table or figure, "
        "assumptions per run); how each run is modelled: `benchmarks/published/predictions.toml`; text-only "
        "LLMs as zeroplan profiles: `benchmarks/published/profiles/`; each source's network: "
        "`benchmarks/published/clusters/`.",
        "",
        "## Result",
        "",
        f"Held-out half, communication model of `zeroplan/core/cluster.py` (ring bus bandwidth across nodes = "
        f"min(NVLink, 0.9 × the node's NICs)): **{_fmt_score(held)}** — target median ≤ 15 %, max ≤ 35 %: "
        f"**{'met' if met else 'not met'}**.",
        "",
        "| variant | fit half | held-out half | all in scope |",
        "|---|---|---|---|",
    ]
    for variant in VARIANTS:
        lines.append(f"| {variant} | {_fmt_score(scores[variant]['fit'])} | {_fmt_score(scores[variant]['holdout'])} "
                     f"| {_fmt_score(scores[variant]['all'])} |")
    lines += [
        "",
        "- **ring**: zeroplan as shipped after this change, one fitted constant: the compute efficiency per GPU "
        "chip, the median over the fit half of the efficiency at which each fit run is matched "
        f"({', '.join(f'{k} {v:.3f}' for k, v in sorted(efficiency['ring'].items()))}). The published runs use "
        "MosaicML's and torchtitan's FSDP stacks, not the DeepSpeed/transformers stack `zeroplan calibrate` measured, "
        "and zeroplan has no A100 calibration (its default is 0.45).",
        "- **shipped**: nothing fitted, the GPU profiles' constants (A100: default 0.45; H100: calibrated on "
        "zeroplan's own InternVL runs, 0.651).",
        "- **per-gpu-share**: each GPU's collective bytes over NICs × rate ÷ GPUs per node (as if every GPU's "
        "bytes crossed the network; the divisor the previous model used), efficiency fitted the same way "
        f"({', '.join(f'{k} {v:.3f}' for k, v in sorted(efficiency['per-gpu-share'].items()))}).",
        "- **no-comm**: collectives free, efficiency fitted "
        f"({', '.join(f'{k} {v:.3f}' for k, v in sorted(efficiency['no-comm'].items()))}).",
        "",
        "Split: in every pair from one source table the smaller job is in the fit half and the larger one "
        "held out (torchtitan: 8B fits, 70B held out), so the held-out half tests scaling to more nodes.",
        "",
        "## Per run",
        "",
        "| run | GPUs | ZeRO | split | published tok/s/GPU | ring | err | shipped | per-gpu-share | err | "
        "comm s/step (ring) | exposed s | step s | bus GB/s ring / share |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run_id, row in ring.items():
        run = runs[run_id]
        other = share[run_id]
        lines.append(
            f"| {run_id} | {run['nodes']}×{run['gpus_per_node']} {run['gpu']} | {run['zero_stage']} | {row['split']} | "
            f"{row['published']:,.0f} | {row['predicted']:,.0f} | {row['error']:+.1%} | "
            f"{shipped[run_id]['predicted']:,.0f} | {other['predicted']:,.0f} | {other['error']:+.1%} | "
            f"{row['comm_s']:.2f} | {row['exposed_comm_s']:.2f} | {row['step_s']:.2f} | "
            f"{row['bus_gbps']:.0f} / {other['bus_gbps']:.0f} |")
    lines += ["", "## Rankings the sources report", "",
              "| check | source's claim | published ratio | predicted ratio | reproduced |", "|---|---|---|---|---|"]
    for rank in ranks:
        lines.append(f"| {rank['check']} | {rank['claim']} | {rank['published_ratio']:.3f} | "
                     f"{rank['predicted_ratio']:.3f} | {'yes' if rank['reproduced'] else 'no'} |")
    lines += ["", "BigScience checks use one-GPU-shard surrogates (`profiles/bigscience-*-shard.toml`): the source ran "
              "tensor and pipeline parallelism, which zeroplan does not model, so only the direction of the data-parallel "
              "collectives' effect is checked, over the DP group's ring at 6.25 GB/s per rank "
              "(`clusters/jean-zay-dp-ring.toml`). The source itself warns its ZeRO-0/ZeRO-1 rows ran on different "
              "code branches.", "",
              "## Out of scope", "", "| run | why |", "|---|---|"]
    for run_id, how in table.items():
        if how.get("scope") == "out":
            lines.append(f"| {run_id} | {how['reason']} |")
    lines += ["", "## Network per run (ring variant)", ""]
    for run_id, row in ring.items():
        lines.append(f"- {run_id}: {row['network']}")
    lines += ["", "![predicted vs published](published.png)", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Predict every in-scope run under each variant and write the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "reports" / "published"))
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    os.chdir(ROOT)
    runs = {r["id"]: r for r in json.loads((HERE / "runs.json").read_text())}
    table = tomllib.loads((HERE / "predictions.toml").read_text())
    efficiency = {variant: fitted_efficiencies(runs, table, variant) for variant in VARIANTS if variant != "shipped"}
    efficiency["shipped"] = {}
    rows = []
    for variant in VARIANTS:
        for run_id, how in table.items():
            if how.get("scope") != "throughput":
                continue
            run = runs[run_id]
            predicted = predict(run, how, variant, efficiency[variant].get(chip(run["gpu"])))
            published = run["measured"]["tokens_per_s_per_gpu"]
            rows.append({"id": run_id, "variant": variant, "split": how["split"], "published": published,
                         "predicted": predicted["tokens_per_s_per_gpu"],
                         "error": predicted["tokens_per_s_per_gpu"] / published - 1,
                         "efficiency": efficiency[variant].get(chip(run["gpu"])),
                         **{k: v for k, v in predicted.items() if k != "tokens_per_s_per_gpu"}})
    scores = {variant: {split or "all": score(rows, variant, split) for split in ("fit", "holdout", None)}
              for variant in VARIANTS}
    ranks = rankings(runs, table, efficiency["ring"])
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "predictions.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    write_atomic(out / "rankings.json", json.dumps(ranks, indent=1) + "\n")
    write_atomic(out / "README.md", readme(rows, scores, efficiency, ranks, runs, table) + "\n")
    plot(rows, out / "published.png")
    held = scores["ring"]["holdout"]
    print(f"held-out (ring): median {held['median']:.1%}, max {held['max']:.1%} over {held['runs']} runs; "
          f"rankings reproduced {sum(r['reproduced'] for r in ranks)}/{len(ranks)}; wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
