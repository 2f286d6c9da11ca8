"""Options shared by the verbs that plan (estimate, recommend, validate), and the conversion of
their values into TrainShape / Plan. Parsing only; the library validates."""

from __future__ import annotations

import json
import math
from typing import Annotated, Optional

import typer

from zeroplan.core.cluster import Network, load_cluster, network_from_values
from zeroplan.core.errors import InvalidInput
from zeroplan.core.plan import Plan, cluster
from zeroplan.core.plan import parse_freeze, shape_from_values as build_shape  # noqa: F401 - the verbs' names

Model = Annotated[str, typer.Option("--model", "-m", help="Short name (8b, 40b), full name or profile file.")]
Gpus = Annotated[Optional[int], typer.Option("--gpus", help="Total GPUs (nodes of 8 unless said otherwise).")]
Nodes = Annotated[Optional[int], typer.Option("--nodes", help="Number of nodes.")]
GpusPerNode = Annotated[Optional[int], typer.Option("--gpus-per-node", help="GPUs in each node.")]
Gpu = Annotated[Optional[str], typer.Option("--gpu", help="GPU profile (a100-80gb, h100-80gb, ...); default: probed.")]
SeqLen = Annotated[int, typer.Option("--seq-len", help="LLM tokens per sample, image tokens included.")]
Tiles = Annotated[int, typer.Option("--tiles", help="448px image tiles per sample (thumbnail included).")]
Freeze = Annotated[Optional[list[str]], typer.Option("--freeze", help="Freeze a tower: vision, projector, llm (repeatable).")]
LoraRank = Annotated[int, typer.Option("--lora-rank", help="Train LoRA adapters of this rank on the LLM (0: off).")]
HostMemoryGib = Annotated[Optional[float], typer.Option(
    "--host-memory-gib", help="Host RAM per node in GiB (default: probed with the GPU, else the GPU profile's "
                              "typical node).")]
Headroom = Annotated[float, typer.Option(
    "--headroom", help="Fraction of GPU memory kept free; a plan fits when its peak leaves it (default 0.05).")]
Trainer = Annotated[str, typer.Option(
    "--trainer", help="The training stack the plan is for: internvl (InternVL's internvl_chat_finetune.py), "
                      "hf (an HF Trainer script on transformers' InternVL class) or zeroplan (the bundled runner).")]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")]
Cluster = Annotated[Optional[str], typer.Option("--cluster", help="Cluster TOML file: NICs per node × Gb/s, NVLink, measured NCCL bus bandwidth.")]
InterNodeGbps = Annotated[Optional[float], typer.Option("--inter-node-gbps", help="Inter-node bandwidth per GPU, GB/s per direction (node NICs ÷ GPUs per node); default: the GPU profile's.")]
NicsPerNode = Annotated[Optional[int], typer.Option("--nics-per-node", help="NICs per node across nodes (with --nic-gbit).")]
NicGbit = Annotated[Optional[float], typer.Option("--nic-gbit", help="Line rate of one NIC, Gb/s (with --nics-per-node).")]


def build_network(cluster_file: str | None, inter_node_gbps: float | None, nics_per_node: int | None,
                  nic_gbit: float | None) -> Network | None:
    """The stated interconnect: a cluster file, or the command-line figures (not both); None keeps
    the GPU profile's default."""
    stated = network_from_values(nics_per_node, nic_gbit, inter_node_gbps)
    if cluster_file is None:
        return stated
    if stated is not None:
        raise InvalidInput("give the network either in --cluster FILE or with --inter-node-gbps / --nics-per-node, not both")
    return load_cluster(cluster_file)


def build_plan(stage: int, gpus: int | None, nodes: int | None, gpus_per_node: int | None,
               offload_optimizer: str = "none", offload_params: str = "none", network: Network | None = None,
               **extra) -> Plan:
    """Plan from CLI values (cluster arithmetic included); a cluster file's gpus_per_node is the
    default for --gpus-per-node."""
    if gpus_per_node is None and network is not None and network.gpus_per_node is not None:
        gpus_per_node = network.gpus_per_node
    per_node, node_count = cluster(gpus, nodes, gpus_per_node)
    return Plan(stage=stage, gpus_per_node=per_node, nodes=node_count, offload_optimizer=offload_optimizer.lower(),
                offload_params=offload_params.lower(), network=network, **extra)


def check_fraction(name: str, value: float) -> float:
    """Reject NaN / infinite / out-of-range fractions with one line."""
    if not math.isfinite(value) or not 0 <= value < 0.9:
        raise InvalidInput(f"{name} must be a fraction from 0 to 0.9, got {value}")
    return value


def gib(value: int) -> str:
    """Bytes as GiB with two decimals, for tables."""
    return f"{value / 2**30:,.2f}"


def print_json(data) -> None:
    """One JSON object on stdout."""
    typer.echo(json.dumps(data, indent=2, sort_keys=False))
