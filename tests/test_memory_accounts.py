"""One account of a step's allocations: the memory model's closed form (the peak over the phases
of a step, zeroplan.core.memory._phases) and the allocator replay (every tensor of the step,
zeroplan.core.step_events) describe the same tensors, so their allocated peaks must agree; where
the replay holds more, the estimate reports the replay's peak."""

from __future__ import annotations

import itertools
import statistics
from dataclasses import replace

import pytest

from zeroplan.core import memory as M
from zeroplan.core.plan import Plan, TrainShape
from zeroplan.core.profiles import load_gpu, load_model
from zeroplan.core.tuning import tuned_plan

GPU = load_gpu("h200-141gb")


def accounts(model: str, stage: int, micro_batch: int, grad_ckpt: bool, accumulation: int, frozen: tuple,
             lora_rank: int, offload: str, gpus: int) -> tuple[int, int, int]:
    """(closed-form allocated peak, replay's training-step allocated peak, estimate's reported peak)."""
    profile = load_model(model)
    shape = TrainShape(micro_batch=micro_batch, seq_len=4096, tiles=7, grad_ckpt=grad_ckpt,
                       frozen=frozenset(frozen), lora_rank=lora_rank)
    plan = tuned_plan(profile, shape, Plan(stage=stage, gpus_per_node=gpus, offload_optimizer=offload))
    flat = replace(shape, micro_batch=1, grad_ckpt=False, ckpt_layers=None)
    states = M._most_loaded_rank_states(profile, flat, plan)
    acts = M.activation_bytes(profile, shape, False)
    buffers = M.communication_buffer_bytes(profile, plan, states.partition_elems * plan.world_size)
    step = M.step_transient_bytes(profile, flat, plan)
    phases = M._phases(plan, states, acts, buffers, step, M._full_grad_of_lm_head(profile, shape, plan),
                       M.layers_done_at_first_reduce(profile, shape, plan),
                       M.accumulated_gradient_bytes(profile, shape, plan, states, buffers, accumulation))
    _, _, replayed = M.reserved_bytes(profile, shape, plan, states, buffers, step, 1 << 50,
                                      accumulation=accumulation)
    reported = M.estimate(profile, shape, plan, GPU, gradient_accumulation=accumulation).peak_allocated
    return max(phases.values()), replayed, reported


GRID = [case for case in itertools.product(
    ["1b", "2b", "4b"], [0, 1, 2, 3], [1, 4], [True, False], [1, 4], [(), ("vision",)], [0, 16], ["none"], [1, 2, 8])
    if not (case[6] and case[5])]


@pytest.fixture(scope="module")
def differences() -> dict[int, list[float]]:
    """Replay minus closed form, in percent of the closed form, per ZeRO stage, over a broad grid
    (sampled: every eleventh case)."""
    out: dict[int, list[float]] = {stage: [] for stage in range(4)}
    for case in GRID[::11]:
        closed, replayed, _ = accounts(*case)
        out[case[1]].append((replayed - closed) / closed * 100)
    return out


@pytest.mark.parametrize("stage,bound", [(0, 5.0), (1, 5.0), (2, 5.0), (3, 8.0)])
def test_closed_form_and_replay_allocate_alike_without_offload(differences, stage, bound):
    """The two accounts agree within 5 % (ZeRO-3: 8 %, the replay leaves out the prefetched
    parameters the closed form counts), and within 1.5 % at the median: a term added to one and
    not the other fails here."""
    values = differences[stage]
    assert len(values) >= 10
    assert max(abs(v) for v in values) <= bound, values
    assert abs(statistics.median(values)) <= 1.5, values


@pytest.mark.parametrize("case", [
    ("2b", 1, 1, True, 1, (), 0, "cpu", 1),     # ZeRO-1 offload: the replay's fp64 norm buffers
    ("2b", 2, 1, True, 1, (), 0, "cpu", 2),
    ("1b", 1, 4, False, 4, (), 0, "none", 2),
    ("4b", 3, 1, True, 1, ("vision",), 0, "none", 8),
])
def test_the_estimate_reports_the_larger_account(case):
    closed, replayed, reported = accounts(*case)
    assert reported == max(closed, replayed)
