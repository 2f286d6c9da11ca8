"""The cluster's interconnect: what the step-time model's collectives run over.

The network belongs to the cluster, not to the GPU: the same A100 sits in nodes with one 100 Gb/s
NIC for eight GPUs and in nodes with eight 200 Gb/s NICs. A GPU profile's
`inter_node_bandwidth_gbps` (GB/s per GPU, e.g. one 200 Gb/s HDR NIC per A100 = 25) is only the
default when the user states nothing; `--inter-node-gbps`, `--nics-per-node`/`--nic-gbit` or a
cluster file (`--cluster FILE`) replace it.

How a collective uses the network (first principles, NCCL's ring algorithm). In a ring over
n = nodes × G ranks every rank sends (n-1)/n of the buffer S for an all-gather or a
reduce-scatter (2(n-1)/n for an all-reduce), one chunk per step to its ring neighbour. Inside a
node the hops are NVLink; of the G hops a ring makes in one node only one leaves the node. NCCL runs
one ring (channel) per NIC, rail-aligned, each carrying a 1/NICs share of S, so a node's NICs
together carry (n-1)/n·S, the same bytes each GPU sends over NVLink. The time is therefore

    t = (n-1)/n · S / min(B_nvlink per GPU, efficiency · NICs × NIC rate)   (+ latency)

i.e. the ring's bus bandwidth across nodes is the node's aggregate NIC rate, not one GPU's
share of it. Dividing by NICs × rate / G instead (as if every GPU's bytes crossed the network)
predicts, for MosaicML's 70B runs on 1600 Gb/s RoCE nodes, more communication than their whole
measured step (reports/published). nccl-tests agree with the ring figure: 4 × 200 Gb/s HDR per
8-A100 node give 85-96 GB/s all-reduce bus bandwidth; one HDR NIC per node 24 GB/s.

`efficiency` (default 0.9) is the fraction of the line rate NCCL reaches at large messages on
InfiniBand/RoCE (the figures above: 24/25, 85-96/100, 46-48/50 per NDR NIC). Measured bus
bandwidths from nccl-tests at the job's size, where given, replace the formula per collective.

Latency: a ring collective takes n-1 lock-step hops, each at least one network latency when the
ring leaves a node; `hop_latency_us` (default 5 µs across nodes, 1 µs in a node: orders of
magnitude of NCCL's own latency model, not fitted to anything) is paid per hop and per collective.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from zeroplan.core.errors import InvalidInput

DEFAULT_EFFICIENCY = 0.9
DEFAULT_INTER_HOP_LATENCY_US = 5.0
DEFAULT_INTRA_HOP_LATENCY_US = 1.0
COLLECTIVES = ("all_gather", "reduce_scatter", "all_reduce", "reduce")
MAX_CLUSTER_BYTES = 1 << 16
NETWORK_KEYS = ("nics_per_node", "nic_gbit", "inter_node_gbps", "intra_node_gbps", "efficiency",
                "hop_latency_us", "busbw_gbps")
TOP_KEYS = ("name", "source", "gpus_per_node", "network")


@dataclass(frozen=True)
class Network:
    """What the user stated about the interconnect; None fields fall back to the GPU profile.

    `nics_per_node` × `nic_gbit` (Gb/s line rate of one NIC) or `inter_node_gbps` (GB/s per GPU,
    the GPU profile's unit) give the node's bandwidth across nodes; `intra_node_gbps` (GB/s per GPU
    per direction) replaces the profile's NVLink figure; `busbw_gbps` holds measured nccl-tests bus
    bandwidths (GB/s) per collective name (all_gather, reduce_scatter, all_reduce, reduce)."""

    nics_per_node: int | None = None
    nic_gbit: float | None = None
    inter_node_gbps: float | None = None
    intra_node_gbps: float | None = None
    efficiency: float = DEFAULT_EFFICIENCY
    hop_latency_us: float = DEFAULT_INTER_HOP_LATENCY_US
    busbw_gbps: tuple[tuple[str, float], ...] = ()
    origin: str = "command line"
    name: str = ""
    gpus_per_node: int | None = None

    def measured(self, collective: str) -> float | None:
        """Measured bus bandwidth (GB/s) of a collective, if the cluster file gives one."""
        return dict(self.busbw_gbps).get(collective)


@dataclass(frozen=True)
class Links:
    """The resolved links one plan's collectives use (bytes/s), and where each figure came from."""

    nodes: int
    gpus_per_node: int
    intra_bytes_per_s: float
    node_line_bytes_per_s: float
    efficiency: float
    hop_latency_s: float
    measured: dict[str, float] = field(default_factory=dict)
    assumption: str = ""

    def bus_bandwidth(self, collective: str) -> float:
        """Bytes/s of the ring's bottleneck link for one collective (its bus bandwidth)."""
        if collective in self.measured:
            return self.measured[collective]
        if self.nodes == 1:
            return self.intra_bytes_per_s
        return min(self.intra_bytes_per_s, self.efficiency * self.node_line_bytes_per_s)

    def ring_latency_s(self, ranks: int) -> float:
        """The lock-step hops of one ring collective over `ranks` ranks."""
        return max(ranks - 1, 0) * self.hop_latency_s


def _positive(value: Any, name: str, where: str, kind=float, upper: float = 1e7) -> Any:
    where = "" if where == "command line" else where
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise InvalidInput(f"{where}{': ' if where else ''}{name} must be a {'whole number' if kind is int else 'number'}, "
                           f"got {value!r}")
    if not math.isfinite(value) or not 0 < value <= upper:
        raise InvalidInput(f"{where}{': ' if where else ''}{name} must be above 0 and at most {upper:g}, got {value!r}")
    return value


CLI_NAMES = ("--nics-per-node", "--nic-gbit", "--inter-node-gbps")
FILE_NAMES = ("network.nics_per_node", "network.nic_gbit", "network.inter_node_gbps")


def network_from_values(nics_per_node: int | None = None, nic_gbit: float | None = None,
                        inter_node_gbps: float | None = None, where: str = "command line",
                        names: tuple[str, str, str] = CLI_NAMES) -> Network | None:
    """A Network from stated values (None when nothing is stated); `names` are what the user
    typed them as (options or file keys), for the error messages."""
    nics_name, rate_name, per_gpu_name = names
    if nics_per_node is None and nic_gbit is None and inter_node_gbps is None:
        return None
    prefix = "" if where == "command line" else f"{where}: "
    if inter_node_gbps is not None and (nics_per_node is not None or nic_gbit is not None):
        raise InvalidInput(f"{prefix}give either {per_gpu_name} (GB/s per GPU) or {nics_name} with {rate_name}, not both")
    if (nics_per_node is None) != (nic_gbit is None):
        raise InvalidInput(f"{prefix}{nics_name} and {rate_name} go together (e.g. 8 NICs of 400 Gb/s)")
    if inter_node_gbps is not None:
        _positive(inter_node_gbps, per_gpu_name, where)
    else:
        _positive(nics_per_node, nics_name, where, int, 1024)
        _positive(nic_gbit, rate_name, where)
    return Network(nics_per_node=nics_per_node, nic_gbit=None if nic_gbit is None else float(nic_gbit),
                   inter_node_gbps=None if inter_node_gbps is None else float(inter_node_gbps), origin=where)


def network_from_data(data: Any, where: str) -> Network:
    """Validate a parsed cluster file (see load_cluster) and build its Network."""
    if not isinstance(data, dict):
        raise InvalidInput(f"{where}: a cluster file holds a [network] table")
    unknown = sorted(set(data) - set(TOP_KEYS))
    if unknown:
        raise InvalidInput(f"{where}: unknown key '{unknown[0]}' (accepted: {', '.join(TOP_KEYS)})")
    net = data.get("network")
    if not isinstance(net, dict):
        raise InvalidInput(f"{where}: missing [network] table (nics_per_node + nic_gbit, or inter_node_gbps)")
    unknown = sorted(set(net) - set(NETWORK_KEYS))
    if unknown:
        raise InvalidInput(f"{where}: unknown key 'network.{unknown[0]}' (accepted: {', '.join(NETWORK_KEYS)})")
    base = network_from_values(net.get("nics_per_node"), net.get("nic_gbit"), net.get("inter_node_gbps"), where,
                               FILE_NAMES)
    if base is None:
        raise InvalidInput(f"{where}: [network] needs nics_per_node and nic_gbit, or inter_node_gbps")
    extra: dict[str, Any] = {}
    if "intra_node_gbps" in net:
        extra["intra_node_gbps"] = float(_positive(net["intra_node_gbps"], "network.intra_node_gbps", where))
    if "efficiency" in net:
        extra["efficiency"] = float(_positive(net["efficiency"], "network.efficiency", where, upper=1.0))
    if "hop_latency_us" in net:
        extra["hop_latency_us"] = float(_positive(net["hop_latency_us"], "network.hop_latency_us", where, upper=1e5))
    measured = net.get("busbw_gbps", {})
    if not isinstance(measured, dict):
        raise InvalidInput(f"{where}: network.busbw_gbps must be a table of {', '.join(COLLECTIVES)}")
    for key, value in measured.items():
        if key not in COLLECTIVES:
            raise InvalidInput(f"{where}: unknown collective 'network.busbw_gbps.{key}' (accepted: {', '.join(COLLECTIVES)})")
        _positive(value, f"network.busbw_gbps.{key}", where)
    extra["busbw_gbps"] = tuple(sorted((k, float(v)) for k, v in measured.items()))
    name = data.get("name", "")
    if not isinstance(name, str):
        raise InvalidInput(f"{where}: name must be a string")
    if "gpus_per_node" in data:
        extra["gpus_per_node"] = _positive(data["gpus_per_node"], "gpus_per_node", where, int, 1024)
    return replace(base, name=name, **extra)


def load_cluster(path: str | Path) -> Network:
    """Read a cluster TOML file:

        name = "my cluster"
        gpus_per_node = 8                 # optional: the default for --gpus-per-node
        [network]
        nics_per_node = 8                 # with nic_gbit; or inter_node_gbps = 25 (GB/s per GPU)
        nic_gbit = 400                    # line rate of one NIC, Gb/s
        intra_node_gbps = 450             # optional: NVLink GB/s per GPU per direction
        efficiency = 0.9                  # optional: share of the line rate NCCL reaches
        hop_latency_us = 5                # optional: latency of one ring hop across nodes
        [network.busbw_gbps]              # optional: measured nccl-tests bus bandwidth, GB/s
        all_gather = 170
        reduce_scatter = 170
    """
    where = str(path)
    file = Path(path)
    try:
        if file.stat().st_size > MAX_CLUSTER_BYTES:
            raise InvalidInput(f"cluster file {where} is larger than 64 KiB; it is a small TOML file")
        data = tomllib.loads(file.read_bytes().decode("utf-8"))
    except InvalidInput:
        raise
    except FileNotFoundError:
        raise InvalidInput(f"cluster file '{where}' does not exist") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise InvalidInput(f"cannot read cluster file {where}: {reason}") from None
    return network_from_data(data, where)


def resolve(network: Network | None, gpu_intra_gbps: float, gpu_inter_gbps: float, gpus_per_node: int,
            nodes: int, gpu_name: str = "") -> Links:
    """The links a plan uses: the stated network where given, else the GPU profile's default
    (`inter_node_bandwidth_gbps` per GPU, i.e. that × GPUs per node for the node's NICs)."""
    net = network or Network(origin="default")
    intra = (net.intra_node_gbps or gpu_intra_gbps) * 1e9
    if net.nics_per_node is not None and net.nic_gbit is not None:
        node_line = net.nics_per_node * net.nic_gbit / 8 * 1e9
        stated = f"{net.nics_per_node} NIC(s) × {net.nic_gbit:g} Gb/s per node"
    else:
        per_gpu = net.inter_node_gbps or gpu_inter_gbps
        node_line = per_gpu * gpus_per_node * 1e9
        stated = f"{per_gpu:g} GB/s per GPU across nodes"
    if network is None:
        stated += f" ({gpu_name or 'GPU'} profile default; state yours with --inter-node-gbps or --cluster)"
    else:
        stated += f" ({net.origin})"
    links = Links(nodes=nodes, gpus_per_node=gpus_per_node, intra_bytes_per_s=intra, node_line_bytes_per_s=node_line,
                  efficiency=net.efficiency,
                  hop_latency_s=(net.hop_latency_us if nodes > 1 else DEFAULT_INTRA_HOP_LATENCY_US) * 1e-6,
                  measured={k: v * 1e9 for k, v in net.busbw_gbps})
    ring = min(intra, net.efficiency * node_line) if nodes > 1 else intra
    text = (f"{nodes} node(s) × {gpus_per_node} GPU(s); NVLink {intra / 1e9:g} GB/s per GPU; {stated}; "
            f"ring bus bandwidth {ring / 1e9:.1f} GB/s"
            + (f" (= min(NVLink, {net.efficiency:g} × {node_line / 1e9:g} GB/s of the node's NICs))" if nodes > 1 else
               " (one node: NVLink only)")
            + (f"; measured busbw for {', '.join(k for k, _ in net.busbw_gbps)}" if net.busbw_gbps else ""))
    return replace(links, assumption=text)
