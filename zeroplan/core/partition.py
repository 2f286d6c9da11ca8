"""The bytes of model state (16-bit params, gradients, fp32 master weights, Adam states) one rank
holds under DeepSpeed ZeRO, element for element as DeepSpeed 0.19.8 lays them out.

The engine is assumed configured the way zeroplan's runner does it: bf16 on, no `grad_accum_dtype`
(so gradients accumulate in bf16), one optimizer param group holding the trainable parameters in
`named_parameters()` order, Adam/AdamW (torch's or DeepSpeed's: both keep fp32 `exp_avg` and
`exp_avg_sq` shaped like the fp32 master partition; torch's extra 4-byte `step` scalar per
optimized tensor is not counted), `parameter_alignment` and `round_robin_gradients` off.

Which optimizer wrapper DeepSpeed picks (runtime/engine.py `_do_optimizer_sanity_check`):
stage 0 + bf16 → `FP16_UnfusedOptimizer` for a client torch optimizer (`FP16_Optimizer` for
DeepSpeed's FusedAdam), neither partitions anything; stages 1-2 → `DeepSpeedZeroOptimizer`
(`BF16_Optimizer` only with `grad_accum_dtype: fp32` at stage 1); stage 3 →
`DeepSpeedZeroOptimizer_Stage3`. Stage 0 + bf16 needs no extra config key.

Pure Python: no torch or deepspeed import.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from zeroplan.core.errors import InvalidInput
from zeroplan.core.params import TOWERS, lora_tensors, model_tensors
from zeroplan.core.plan import Plan, TrainShape
from zeroplan.core.profiles import ModelProfile
from zeroplan.core.dtypes import BF16_BYTES, FP32_BYTES

ADAM_STATES_PER_ELEM = 2  # exp_avg, exp_avg_sq
NCCL_START_ALIGNMENT_FACTOR = 2  # stage_1_and_2.py: 4-byte alignment / sizeof(fp16)


@dataclass(frozen=True)
class ModelStateBytes:
    """Model-state bytes of one rank in the steady state of a training step (see each term)."""

    params: int
    grads: int
    master_weights: int
    optimizer_states: int
    cpu_bytes: int
    partition_elems: int
    padding_elems: int

    @property
    def gpu_bytes(self) -> int:
        """Everything above that sits on the GPU."""
        return self.params + self.grads + self.master_weights + self.optimizer_states


def trainable_numels(profile: ModelProfile, shape: TrainShape) -> tuple[int, ...]:
    """Element counts of the optimized tensors in named_parameters() order: the trained towers'
    tensors, then (with LoRA) PEFT's adapters, which live inside the LLM and so come after the
    vision tower and projector."""
    return _numels(profile, _trained_towers(shape), shape.lora_rank)[0]


def frozen_numels(profile: ModelProfile, shape: TrainShape) -> tuple[int, ...]:
    """Element counts of the model tensors that get no gradient (frozen towers, LoRA's base LLM)."""
    return _numels(profile, _trained_towers(shape), shape.lora_rank)[1]


def _trained_towers(shape: TrainShape) -> frozenset[str]:
    return frozenset(tower for tower in TOWERS if shape.trains(tower))


@lru_cache(maxsize=64)
def _numels(profile: ModelProfile, trained: frozenset[str], lora_rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(trainable, frozen) element counts; the planner asks for the same model and towers under
    every plan, so they are listed once."""
    tensors = model_tensors(profile)
    numels = [t.numel for t in tensors if t.tower in trained]
    if lora_rank:
        numels += [t.numel for t in lora_tensors(profile, lora_rank)]
    return tuple(n for n in numels if n > 0), tuple(t.numel for t in tensors if t.tower not in trained)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class FlatPartition:
    """Stage 1/2 layout of the one flat bf16 buffer and this rank's slice of it."""

    aligned_elems: int          # flat buffer length, padded to a multiple of 2 × world
    partition_elems: int        # every rank's slice: aligned_elems / world
    padding_elems: int          # of which padding (only the last ranks have any)
    grad_source_elems: int      # full numel of the params that overlap this rank's slice


def flat_partition(numels: tuple[int, ...], world_size: int, rank: int) -> FlatPartition:
    """DeepSpeedZeroOptimizer.__init__ (runtime/zero/stage_1_and_2.py): the trainable tensors are
    flattened into one buffer padded by `align_dense_tensors` to a multiple of
    `nccl_start_alignment_factor × world`, `get_data_parallel_partitions` cuts it into equal slices,
    the padding recorded in `groups_padding`, and `get_partition_info` lists the params that
    overlap a slice (`params_in_partition`, whole params, even ones cut by a slice boundary)."""
    total = sum(numels)
    alignment = NCCL_START_ALIGNMENT_FACTOR * world_size
    aligned = _ceil_div(total, alignment) * alignment
    size = aligned // world_size
    start, end = size * rank, size * (rank + 1)
    if total <= start:
        padding = size
    elif total < end:
        padding = end - total
    else:
        padding = 0
    overlapping, offset = 0, 0
    for numel in numels:
        if start <= offset < end or offset < start < offset + numel:
            overlapping += numel
        offset += numel
    return FlatPartition(aligned, size, padding, overlapping)


@dataclass(frozen=True)
class ShardedParams:
    """Stage 3 per-parameter shards of this rank."""

    partition_elems: int
    padding_elems: int


def stage3_shards(numels: tuple[int, ...], world_size: int, rank: int) -> ShardedParams:
    """partition_parameters.py `_partition_param`: every parameter gets a `ds_tensor` of
    `_aligned_size / world` = ceil(numel / world) elements on every rank; rank r holds elements
    [r·p, (r+1)·p) of the flattened parameter, the part past numel being padding (`_padding_size`)."""
    elems = padding = 0
    for numel in numels:
        shard = _ceil_div(numel, world_size)
        elems += shard
        padding += max(0, shard * (rank + 1) - max(numel, shard * rank))
    return ShardedParams(elems, padding)


def _all_numels_named(profile: ModelProfile) -> tuple[int, ...]:
    return tuple(t.numel for t in model_tensors(profile))


def _model_numels(profile: ModelProfile, shape: TrainShape) -> tuple[int, ...]:
    numels = _all_numels_named(profile)
    if shape.lora_rank:
        numels += tuple(t.numel for t in lora_tensors(profile, shape.lora_rank))
    return numels


def param_bytes(profile: ModelProfile, shape: TrainShape, plan: Plan, rank: int = 0) -> int:
    """16-bit parameter bytes on this rank's GPU after a step.

    Stage 0: every parameter in bf16 (engine casts the module with `bf16.enabled`).
    Stages 1/2: the trainable params become views of the flat buffer `bit16_groups_flat`
    (stage_1_and_2.py `flatten_dense_tensors_aligned`, so its alignment padding counts), frozen
    params stay as they are.
    Stage 3: every parameter's `ds_tensor` shard (`_partition_param`), plus the full tensor of
    each persistent parameter (`mark_persistent_parameters`; re-gathered after each step by
    stage3.py `_post_step`) in the padded all-gather buffer it is a view of (world × shard,
    `_allgather_params_coalesced`), except on a single rank, where `all_gather_coalesced` hands out
    `NoGatherHandle`s that make param.data a view of the shard. With parameter offload the non-persistent shards go to the host
    (see offload_cpu_bytes)."""
    frozen = sum(frozen_numels(profile, shape))
    trainable = trainable_numels(profile, shape)
    if plan.stage == 0:
        return BF16_BYTES * (frozen + sum(trainable))
    if plan.stage in (1, 2):
        return BF16_BYTES * (frozen + flat_partition(trainable, plan.world_size, rank).aligned_elems)
    persistent = tuple(n for n in _model_numels(profile, shape) if n <= plan.param_persistence_threshold)
    if plan.offload_params == "none" and plan.world_size == 1:
        persistent = ()  # one rank: a gathered param is a view of its ds_tensor (NoGatherHandle)
    if plan.offload_params != "none":
        return BF16_BYTES * sum(_ceil_div(n, plan.world_size) * (1 + plan.world_size) for n in persistent)
    world = plan.world_size
    shards = stage3_shards(_model_numels(profile, shape), world, rank).partition_elems
    return BF16_BYTES * (shards + sum(_ceil_div(n, world) * world for n in persistent))


def partition(profile: ModelProfile, shape: TrainShape, plan: Plan, rank: int = 0) -> tuple[int, int]:
    """(trainable elements this rank's optimizer owns, of which padding): all of them at stage 0
    (`FP16_UnfusedOptimizer` keeps a whole fp32 copy per param), the flat slice at stages 1/2,
    the per-parameter shards at stage 3."""
    trainable = trainable_numels(profile, shape)
    if plan.stage == 0:
        return sum(trainable), 0
    if plan.stage in (1, 2):
        layout = flat_partition(trainable, plan.world_size, rank)
        return layout.partition_elems, layout.padding_elems
    shards = stage3_shards(trainable, plan.world_size, rank)
    return shards.partition_elems, shards.padding_elems


def grad_bytes(profile: ModelProfile, shape: TrainShape, plan: Plan, rank: int = 0) -> int:
    """Gradient bytes on this rank's GPU between the end of backward and the optimizer step.

    Stage 0: a bf16 `.grad` per trainable param (FP16_UnfusedOptimizer).
    Stages 1/2 alike (in 0.19.8 stage 1 also reduces in the backward hooks when overlap_comm is
    on, and otherwise right after backward in `reduce_gradients`): the reduced bf16 grads of the
    params that overlap this rank's slice, whole params (`copy_grads_in_partition` allocates
    `grads_in_partition` of that size; without contiguous_gradients the same `.grad` tensors are
    kept by `averaged_gradients`), plus a zero bf16 tensor for the slice's padding
    (`_get_flat_partition_unpadded` appends it to `averaged_gradients`). The rest is released in `independent_gradient_partition_epilogue`.
    With optimizer offload only `temp_grad_buffer_for_gpu_offload` (largest trainable param, bf16)
    stays on the GPU.
    Stage 3: `grad_partitions_flat_buffer`, one bf16 (the gradient-accumulation dtype) shard per
    trainable param, allocated in `DeepSpeedZeroOptimizer_Stage3.__init__`; on the host with
    optimizer offload."""
    trainable = trainable_numels(profile, shape)
    if plan.stage == 0:
        return BF16_BYTES * sum(trainable)
    if plan.stage in (1, 2):
        if plan.offload_optimizer != "none":
            return BF16_BYTES * max(trainable, default=0)
        layout = flat_partition(trainable, plan.world_size, rank)
        return BF16_BYTES * (layout.grad_source_elems + layout.padding_elems)
    if plan.offload_optimizer != "none":
        return 0
    return BF16_BYTES * stage3_shards(trainable, plan.world_size, rank).partition_elems


def master_weight_bytes(profile: ModelProfile, shape: TrainShape, plan: Plan, rank: int = 0) -> int:
    """fp32 master copy of the rank's partition on the GPU: `fp32_groups` (stage 0),
    `single_partition_of_fp32_groups` (stages 1/2), `fp32_partitioned_groups_flat` (stage 3);
    0 when the optimizer is offloaded (they are built on the host then)."""
    if plan.offload_optimizer != "none":
        return 0
    return FP32_BYTES * partition(profile, shape, plan, rank)[0]


def optimizer_state_bytes(profile: ModelProfile, shape: TrainShape, plan: Plan, rank: int = 0) -> int:
    """Adam's fp32 exp_avg and exp_avg_sq, shaped like the master partition (torch AdamW and
    DeepSpeed FusedAdam/CPUAdam alike: `torch.zeros_like(p)` of the fp32 master); 0 when offloaded."""
    if plan.offload_optimizer != "none":
        return 0
    return ADAM_STATES_PER_ELEM * FP32_BYTES * partition(profile, shape, plan, rank)[0]


def offload_cpu_bytes(profile: ModelProfile, shape: TrainShape, plan: Plan, rank: int = 0) -> int:
    """Host bytes of optimizer (and parameter) offload.

    Stages 1/2 (stage_1_and_2.py `__init__` and `initialize_optimizer_states` with cpu_offload):
    fp32 master slice, its fp32 `.grad` (kept for the step), the bf16
    `param_buffer_of_bit16_for_cpu_offload_groups` slice, the bf16
    `temp_grad_buffer_for_cpu_offload` (largest trainable param), and Adam's two fp32 states.
    Stage 3 (stage3.py `_create_fp32_partitions`, `initialize_optimizer_states`, `__init__`):
    fp32 master shards, their fp32 gradient buffer, Adam's two states and the bf16
    `grad_partitions_flat_buffer`; with parameter offload also the non-persistent bf16 shards
    and the trainable shards' flat host copy (`_create_param_groups_fp16_flat_cpu_memory`)."""
    if plan.offload_optimizer == "none" and plan.offload_params == "none":
        return 0
    trainable = trainable_numels(profile, shape)
    elems = partition(profile, shape, plan, rank)[0]
    total = 0
    if plan.offload_optimizer != "none":
        total += (FP32_BYTES + FP32_BYTES + ADAM_STATES_PER_ELEM * FP32_BYTES) * elems
        if plan.stage in (1, 2):
            total += BF16_BYTES * elems + BF16_BYTES * max(trainable, default=0)
        else:
            total += BF16_BYTES * elems
    if plan.stage == 3 and plan.offload_params != "none":
        world = plan.world_size
        non_persistent = tuple(n for n in _model_numels(profile, shape) if n > plan.param_persistence_threshold)
        total += BF16_BYTES * sum(_ceil_div(n, world) for n in non_persistent)
        total += BF16_BYTES * elems
    return total


def optimizer_groups(numels: tuple[int, ...], group_elems: int) -> tuple[tuple[int, ...], ...]:
    """The optimizer's parameter groups as zeroplan's runner builds them (and a training script
    following the plan should): consecutive tensors, a new group started when the next tensor
    would take the group past `group_elems` (a tensor larger than that is a group of its own);
    0 means one group."""
    if not group_elems:
        return (tuple(numels),) if numels else ()
    groups, current, filled = [], [], 0
    for numel in numels:
        if current and filled + numel > group_elems:
            groups.append(tuple(current))
            current, filled = [], 0
        current.append(numel)
        filled += numel
    if current:
        groups.append(tuple(current))
    return tuple(groups)


def stage12_group_slices(profile: ModelProfile, shape: TrainShape, plan: Plan, rank: int = 0) -> tuple[int, ...]:
    """ZeRO-1/2: this rank's slice of each optimizer group (each group is flattened, padded and
    partitioned on its own, stage_1_and_2.py `bit16_groups_flat`), in elements."""
    groups = optimizer_groups(trainable_numels(profile, shape), plan.optimizer_group_elems)
    return tuple(flat_partition(group, plan.world_size, rank).partition_elems for group in groups)


def optimizer_step_grad_bytes(profile: ModelProfile, shape: TrainShape, plan: Plan, rank: int = 0) -> int:
    """fp32 gradient bytes that exist on the GPU only while the optimizer steps, on top of
    `grad_bytes`: stage 0 converts every bf16 grad to an fp32 `.grad` of its master copy
    (FP16_UnfusedOptimizer.step); stages 1/2 convert the rank's slice
    (stage_1_and_2.py `step`: `flat_grad_partition.to(fp32)`) one optimizer group at a time;
    stage 3 converts one sub-group at a
    time (stage3.py `_prepare_fp32_grad_for_sub_group`, freed in `_release_sub_group`), so the
    largest sub-group counts. 0 with optimizer offload (the fp32 grads live on the host)."""
    if plan.offload_optimizer != "none":
        return 0
    if plan.stage == 0:
        return FP32_BYTES * partition(profile, shape, plan, rank)[0]
    if plan.stage in (1, 2):
        return FP32_BYTES * max(stage12_group_slices(profile, shape, plan, rank), default=0)
    return FP32_BYTES * max(stage3_sub_group_elems(profile, shape, plan), default=0)


def stage3_sub_group_elems(profile: ModelProfile, shape: TrainShape, plan: Plan) -> tuple[int, ...]:
    """stage3.py `_create_fp16_sub_groups`: trainable params are cut into sub-groups once their
    shards add up to sub_group_size; the element count of each sub-group's shard."""
    shards = [_ceil_div(n, plan.world_size) for n in trainable_numels(profile, shape)]
    if plan.sub_group_elems >= sum(shards):
        return (sum(shards),) if shards else ()
    groups, current = [], 0
    for index, shard in enumerate(shards):
        current += shard
        if current >= plan.sub_group_elems or index == len(shards) - 1:
            groups.append(current)
            current = 0
    return tuple(groups)


def model_state_bytes(profile: ModelProfile, shape: TrainShape, plan: Plan, rank: int = 0) -> ModelStateBytes:
    """All model-state terms of one rank (each documented in its function above)."""
    if not 0 <= rank < plan.world_size:
        raise InvalidInput(f"rank {rank} is outside a world of {plan.world_size}")
    elems, padding = partition(profile, shape, plan, rank)
    return ModelStateBytes(
        params=param_bytes(profile, shape, plan, rank),
        grads=grad_bytes(profile, shape, plan, rank),
        master_weights=master_weight_bytes(profile, shape, plan, rank),
        optimizer_states=optimizer_state_bytes(profile, shape, plan, rank),
        cpu_bytes=offload_cpu_bytes(profile, shape, plan, rank),
        partition_elems=elems,
        padding_elems=padding,
    )
