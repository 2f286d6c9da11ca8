"""The collectives one ZeRO stage issues, their volumes, counts and seconds on the plan's links.

Volumes (ZeRO paper §7; Ψ = the buffer's bytes, n ranks, ring algorithm): an all-gather or a
reduce-scatter sends (n-1)/n·Ψ from every rank, an all-reduce 2(n-1)/n·Ψ. Per stage:

- ZeRO-0: one all-reduce of the gradients after the last backward (DeepSpeed's engine, buffered
  in reduce_bucket_size pieces, not overlapped): 2Ψ per step.
- ZeRO-1: the gradients reduced to their owners during the last micro-step's backward (IPG buckets,
  overlap_comm) and the updated 16-bit parameters all-gathered after the step: Ψ + Ψ per step.
  DeepSpeed's average_tensor issues one dist.reduce per owning rank a bucket touches, so about
  n + buckets - 1 reduces per pass: each pays a ring's latency, which grows with n.
- ZeRO-2: the same reduces at every micro-step, the all-gather once per step.
- ZeRO-3: all-gather of the parameters in forward and again in backward (one per partitioned
  module and pass) and a reduce-scatter of the gradients at every micro-step: 3Ψ, 1.5× data
  parallelism's 2Ψ.

Overlap: what runs on the side stream hides behind the compute it overlaps (steptime._exposed);
under ZeRO-3 the first layer's all-gather (nothing to compute before it) and the last layer's
reduce-scatter (nothing after it) are exposed whatever the slack, and under ZeRO-1/2 the last
gradient bucket's reduce is.
"""

from __future__ import annotations

from dataclasses import dataclass

from zeroplan.core.cluster import Links, resolve
from zeroplan.core.params import count_parameters, lora_tensors, model_tensors
from zeroplan.core.plan import Plan, TrainShape
from zeroplan.core.profiles import GPUProfile, ModelProfile
from zeroplan.core.dtypes import BF16_BYTES

WHEN = ("micro", "once", "serial")


@dataclass(frozen=True)
class Collective:
    """One kind of collective in a step: what it moves, how often, and its seconds.

    `when`: "micro" (every micro-step, overlappable), "once" (once per step, overlappable) or
    "serial" (once per step, nothing to hide behind). `seconds` is one occurrence (bandwidth +
    latency); `exposed_floor_s` is the part of one occurrence no overlap can hide."""

    name: str
    kind: str
    when: str
    buffer_bytes: float
    bytes_per_gpu: float
    calls: int
    bus_bytes_per_s: float
    seconds: float
    exposed_floor_s: float

    def per_step_s(self, accumulation: int) -> float:
        """Seconds of this collective in one optimizer step."""
        return self.seconds * (accumulation if self.when == "micro" else 1)

    def as_dict(self, accumulation: int) -> dict:
        """Plain dict for JSON output."""
        return {"name": self.name, "collective": self.kind, "when": self.when,
                "bytes_per_gpu": round(self.bytes_per_gpu), "calls": self.calls,
                "bus_gbps": round(self.bus_bytes_per_s / 1e9, 2), "seconds": round(self.seconds, 5),
                "seconds_per_step": round(self.per_step_s(accumulation), 5)}


def trainable_elems(profile: ModelProfile, shape: TrainShape) -> int:
    """Elements that get gradients (and optimizer state)."""
    trained = sum(t.numel for t in model_tensors(profile) if shape.trains(t.tower))
    return trained + sum(t.numel for t in lora_tensors(profile, shape.lora_rank)) if shape.lora_rank else trained


def links_of(plan: Plan, gpu: GPUProfile) -> Links:
    """The links the plan's collectives run over: its stated network, else the GPU's default."""
    return resolve(plan.network, gpu.intra_node_bandwidth_gbps, gpu.inter_node_bandwidth_gbps,
                   plan.gpus_per_node, plan.nodes, gpu.name)


def _buckets(elems: int, bucket_elems: int) -> int:
    return max(1, -(-elems // bucket_elems)) if bucket_elems else 1


def _one(name, kind, when, buffer, factor, calls, hops_per_call, links, ranks, floor_bytes=0.0) -> Collective:
    bus = links.bus_bandwidth(kind)
    latency = calls * hops_per_call * links.hop_latency_s
    moved = factor * buffer
    floor = factor * floor_bytes / bus + (hops_per_call * links.hop_latency_s if floor_bytes else 0.0)
    return Collective(name, kind, when, buffer, moved, calls, bus, moved / bus + latency, floor)


def collectives(profile: ModelProfile, shape: TrainShape, plan: Plan, gpu: GPUProfile) -> list[Collective]:
    """Every collective of one step of the plan (empty on one GPU)."""
    n = plan.world_size
    if n == 1:
        return []
    links = links_of(plan, gpu)
    share = (n - 1) / n
    grad_elems = trainable_elems(profile, shape)
    grads = BF16_BYTES * grad_elems
    params = BF16_BYTES * count_parameters(profile).total
    hops = n - 1
    grad_buckets = _buckets(grad_elems, plan.reduce_bucket_elems)
    if plan.stage == 0:
        return [_one("gradient all-reduce", "all_reduce", "serial", grads, 2 * share, grad_buckets, 2 * hops, links, n)]
    if plan.stage in (1, 2):
        last_bucket = min(grads, BF16_BYTES * plan.reduce_bucket_elems) if plan.overlap_comm else 0.0
        reduces = n + grad_buckets - 1
        gather_buckets = _buckets(grad_elems, plan.allgather_bucket_elems)
        return [_one("gradient reduce to owners", "reduce", "once" if plan.stage == 1 else "micro", grads, share,
                     reduces, hops, links, n, last_bucket),
                _one("updated-parameter all-gather", "all_gather", "serial", grads, share, gather_buckets, hops, links, n)]
    layers = max(profile.vision.num_layers + profile.llm.num_layers, 1)
    modules = max(_partitioned_modules(profile, plan), 1)
    return [_one("parameter all-gather (forward)", "all_gather", "micro", params, share, modules, hops, links, n,
                 params / layers),
            _one("parameter all-gather (backward)", "all_gather", "micro", params, share, modules, hops, links, n),
            _one("gradient reduce-scatter", "reduce_scatter", "micro", grads, share, grad_buckets, hops, links, n,
                 grads / layers)]


def _partitioned_modules(profile: ModelProfile, plan: Plan) -> int:
    return len({t.module for t in model_tensors(profile) if t.numel > plan.param_persistence_threshold})


def split_by_when(items: list[Collective]) -> tuple[float, float, float, float, float]:
    """(every micro-step, once overlappable, serial) seconds, then the exposed floors (per
    micro-step, per step) that no overlap hides."""
    micro = sum(c.seconds for c in items if c.when == "micro")
    once = sum(c.seconds for c in items if c.when == "once")
    serial = sum(c.seconds for c in items if c.when == "serial")
    floor_micro = sum(c.exposed_floor_s for c in items if c.when == "micro")
    floor_once = sum(c.exposed_floor_s for c in items if c.when == "once")
    return micro, once, serial, floor_micro, floor_once


def dominant(items: list[Collective], accumulation: int) -> list[dict]:
    """The step's collectives, largest time per step first, as plain dicts."""
    return [c.as_dict(accumulation) for c in sorted(items, key=lambda c: -c.per_step_s(accumulation))]
