"""Unit tests of zeroplan.core.partition alone (no DeepSpeed): the ZeRO paper's split, layouts, offload."""

from __future__ import annotations

import pytest

from zeroplan.core.errors import InvalidInput
from zeroplan.core.params import model_tensors
from zeroplan.core.partition import (flat_partition, model_state_bytes, optimizer_step_grad_bytes, stage3_shards,
                                stage3_sub_group_elems, trainable_numels)
from zeroplan.core.plan import Plan, TrainShape
from zeroplan.core.profiles import load_model

FULL = TrainShape()


@pytest.fixture(scope="module")
def big():
    """A large real profile, so padding is negligible against the totals."""
    return load_model("internvl2.5-8b")


def test_stage3_splits_16_bytes_per_param_n_ways_within_padding(big):
    """ZeRO paper: 2 (bf16 params) + 2 (grads) + 12 (fp32 master + Adam) bytes per param, / N."""
    plan = Plan(stage=3, gpus_per_node=8, param_persistence_threshold=0)
    total = sum(t.numel for t in model_tensors(big))
    for rank in (0, 7):
        state = model_state_bytes(big, FULL, plan, rank)
        gpu = state.params + state.grads + state.master_weights + state.optimizer_states
        assert 16 * total / 8 <= gpu <= 16 * (total / 8 + len(model_tensors(big)))
        assert state.master_weights == 4 * state.partition_elems
        assert state.optimizer_states == 8 * state.partition_elems


def test_stage1_keeps_whole_params_overlapping_the_slice_not_full_grads():
    """In 0.19.8 stage 1 frees the other ranks' grads after reduction; the rank keeps the whole
    params that touch its slice (more than the slice, less than the model)."""
    profile = load_model("tiny")
    total = sum(trainable_numels(profile, FULL))
    state = model_state_bytes(profile, FULL, Plan(stage=1, gpus_per_node=4), 1)
    assert 2 * state.partition_elems <= state.grads < 2 * total
    assert state.params == 2 * sum(t.numel for t in model_tensors(profile))


def test_stage0_holds_everything():
    profile = load_model("tiny")
    shape = TrainShape(frozen=frozenset({"vision"}))
    trainable = sum(trainable_numels(profile, shape))
    state = model_state_bytes(profile, shape, Plan(stage=0, gpus_per_node=1))
    assert (state.grads, state.master_weights, state.optimizer_states) == (2 * trainable, 4 * trainable, 8 * trainable)


def test_offload_moves_master_and_states_to_host():
    profile = load_model("tiny")
    for stage in (1, 2, 3):
        plan = Plan(stage=stage, gpus_per_node=2)
        on_gpu = model_state_bytes(profile, FULL, plan, 0)
        offloaded = model_state_bytes(profile, FULL, plan.with_(offload_optimizer="cpu"), 0)
        assert offloaded.master_weights == offloaded.optimizer_states == 0
        assert offloaded.cpu_bytes >= on_gpu.master_weights + on_gpu.optimizer_states + 4 * on_gpu.partition_elems
        assert offloaded.grads < on_gpu.grads
        assert optimizer_step_grad_bytes(profile, FULL, plan.with_(offload_optimizer="cpu"), 0) == 0
        assert on_gpu.cpu_bytes == 0


def test_flat_partition_pads_to_twice_world_and_puts_padding_last():
    layout = [flat_partition((5, 6), 3, rank) for rank in range(3)]  # 11 -> 12 (multiple of 6)
    assert [p.partition_elems for p in layout] == [4, 4, 4]
    assert [p.padding_elems for p in layout] == [0, 0, 1]
    assert [p.grad_source_elems for p in layout] == [5, 11, 6]  # rank 1's slice cuts both params
    assert flat_partition((1,), 4, 3).padding_elems == 2  # 1 -> 8, slices of 2: rank 3 all padding


def test_stage3_shards_are_ceil_and_padding_follows_the_rank():
    assert [stage3_shards((5,), 4, rank) for rank in range(4)] == [
        stage3_shards((5,), 4, 0).__class__(2, padding) for padding in (0, 0, 1, 2)]


def test_stage3_persistent_params_cost_a_full_padded_copy_except_on_one_rank():
    profile = load_model("tiny")
    no_persist = model_state_bytes(profile, FULL, Plan(stage=3, gpus_per_node=3, param_persistence_threshold=0))
    persist = model_state_bytes(profile, FULL, Plan(stage=3, gpus_per_node=3, param_persistence_threshold=1000))
    small = [t.numel for t in model_tensors(profile) if t.numel <= 1000]
    assert persist.params - no_persist.params == 2 * sum(-(-n // 3) * 3 for n in small)
    single = [model_state_bytes(profile, FULL, Plan(stage=3, gpus_per_node=1, param_persistence_threshold=t)).params
              for t in (0, 1000)]
    assert single[0] == single[1]


def test_sub_groups_bound_the_step_fp32_grads():
    profile = load_model("tiny")
    plan = Plan(stage=3, gpus_per_node=2, sub_group_elems=20_000)
    groups = stage3_sub_group_elems(profile, FULL, plan)
    assert len(groups) > 1
    assert sum(groups) == model_state_bytes(profile, FULL, plan).partition_elems
    assert optimizer_step_grad_bytes(profile, FULL, plan) == 4 * max(groups)


def test_lora_trains_only_adapters():
    profile = load_model("tiny")
    shape = TrainShape(frozen=frozenset({"vision", "projector"}), lora_rank=4)
    state = model_state_bytes(profile, shape, Plan(stage=2, gpus_per_node=1))
    assert state.partition_elems == sum(trainable_numels(profile, shape)) < sum(t.numel for t in model_tensors(profile))


def test_rank_outside_world_is_rejected():
    with pytest.raises(InvalidInput):
        model_state_bytes(load_model("tiny"), FULL, Plan(stage=2, gpus_per_node=2), 2)
