"""What a plan's communication costs and how the choice moves with the inter-node bandwidth.

Used by recommend and estimate to print which collectives dominate a step, under which stated
(or default) network, and which of the fitting plans would win on a thinner or fatter network.
Memory does not depend on the network, so the plans that fit stay the ones that fit; only their
step times are predicted again.
"""

from __future__ import annotations

from dataclasses import replace

from zeroplan.core.cluster import Network
from zeroplan.core.collectives import collectives, dominant, links_of
from zeroplan.core.plan import Plan, TrainShape
from zeroplan.core.profiles import GPUProfile, ModelProfile
from zeroplan.core.steptime import step_time

# Node NIC totals (Gb/s) to compare against: one 100 Gb/s NIC up to eight 400 Gb/s NICs.
NODE_GBIT_STEPS = (100, 200, 400, 800, 1600, 3200)


def communication(profile: ModelProfile, shape: TrainShape, plan: Plan, gpu: GPUProfile, accumulation: int) -> dict:
    """The plan's links (with the assumption in words) and its collectives, largest first."""
    links = links_of(plan, gpu)
    items = collectives(profile, shape, plan, gpu)
    time = step_time(profile, shape, plan, gpu, accumulation)
    return {
        "assumption": links.assumption,
        "node_nic_gbit": round(links.node_line_bytes_per_s * 8 / 1e9, 1),
        "inter_node_gbps_per_gpu": round(links.node_line_bytes_per_s / plan.gpus_per_node / 1e9, 3),
        "collectives": dominant(items, accumulation),
        "comm_s_per_step": round(sum(c.per_step_s(accumulation) for c in items), 5),
        "exposed_comm_s": round(time.exposed_comm_s, 5),
        "step_s": round(time.step_s, 5),
    }


def with_node_gbit(plan: Plan, node_gbit: float) -> Plan:
    """The plan on a network whose NICs give `node_gbit` Gb/s per node (other figures kept)."""
    stated = plan.network or Network(origin="default")
    per_gpu = node_gbit / 8 / plan.gpus_per_node
    network = replace(stated, nics_per_node=None, nic_gbit=None, inter_node_gbps=per_gpu, busbw_gbps=(),
                      origin=f"what-if {node_gbit:g} Gb/s per node")
    return plan.with_(network=network)


def bandwidth_sensitivity(profile: ModelProfile, gpu: GPUProfile, candidates, stated_gbit: float) -> list[dict]:
    """For each node bandwidth, the fastest of the fitting candidates ((plan, shape, accumulation)
    triples) and its predicted step. Only plans already known to fit are re-ranked; the planner's
    own choice at the stated bandwidth is one of them."""
    rows = []
    for gbit in sorted({*NODE_GBIT_STEPS, round(stated_gbit, 1)}):
        timed = []
        for plan, shape, accumulation in candidates:
            what_if = with_node_gbit(plan, gbit)
            time = step_time(profile, shape, what_if, gpu, accumulation)
            timed.append((time.step_s, plan.stage, plan, shape, accumulation, time))
        if not timed:
            continue
        step_s, stage, plan, shape, accumulation, time = min(timed, key=lambda item: item[0])
        best_by_stage = {}
        for item in timed:
            if item[1] not in best_by_stage or item[0] < best_by_stage[item[1]]:
                best_by_stage[item[1]] = item[0]
        rows.append({"node_gbit": gbit, "inter_node_gbps_per_gpu": round(gbit / 8 / plan.gpus_per_node, 3),
                     "stated": abs(gbit - stated_gbit) < 0.05, "stage": stage, "micro_batch": shape.micro_batch,
                     "gradient_accumulation": accumulation, "step_s": round(step_s, 4),
                     "exposed_comm_s": round(time.exposed_comm_s, 4),
                     "best_step_s_by_stage": {str(k): round(v, 4) for k, v in sorted(best_by_stage.items())}})
    return rows
