"""DeepSpeed 0.19.8's allocations on one rank, for zeroplan.core.step_events: the model states the
engine makes at set-up (and what it leaves cached), where each weight gradient goes, and the
optimizer step's temporaries. The byte counts are zeroplan.core.partition's; this module only adds when
each tensor is made and freed, and on which CUDA stream.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from zeroplan.core.activations import BF16, FP32
from zeroplan.core.allocator import MAIN_STREAM, REDUCTION_STREAM, Trace
from zeroplan.core.partition import (ModelStateBytes, frozen_numels, optimizer_groups, stage3_sub_group_elems, stage12_group_slices,
                                trainable_numels)
from zeroplan.core.plan import Plan, TrainShape
from zeroplan.core.profiles import ModelProfile

ALLREDUCE_BUCKET_ELEMS = 500_000_000  # deepspeed/runtime/engine.py MEMORY_OPT_ALLREDUCE_SIZE


@dataclass
class ZeroEvents:
    """DeepSpeed 0.19.8's model states and gradient path on one rank, as allocations."""

    trace: Trace
    profile: ModelProfile
    shape: TrainShape
    plan: Plan
    states: ModelStateBytes
    buffer_bytes: int
    grads: list = field(default_factory=list)
    buckets: list = field(default_factory=list)
    partition: str | None = None
    filled: int = 0
    adam_ready: bool = False
    bucket_params: list = field(default_factory=list)
    # Gradient accumulation: whether this micro-step ends the optimizer step, whether it is the
    # step's first, and the bf16 `.grad`s held between micro-steps (ZeRO-0, and ZeRO-1 before its
    # boundary), in the order backward makes them.
    boundary: bool = True
    first_micro: bool = True
    held: list = field(default_factory=list)
    produced: int = 0
    previous_partition: str | None = None

    def init(self) -> None:
        """What the engine holds and caches before the first step (checked against the runs'
        recorded init_peak_allocated_bytes).

        Stage 0 (FP16_UnfusedOptimizer): every parameter as built and an fp32 master per trainable
        one (`p.clone().float()`, the bf16 clone freed); initialize_optimizer_states then gives
        every bf16 and every fp32 parameter a zero `.grad`, steps once (Adam's states appear) and
        drops the zero gradients. Stages 1/2 (DeepSpeedZeroOptimizer.__init__): the parameters as
        built; the trainable ones flattened on the GPU (flatten_on_accelerator, when it has room)
        into the flat bf16 buffer and made views of it, so their own blocks are freed but stay
        cached (no empty_cache follows); the fp32 master slice (`.clone().float()` of the bf16
        slice) and, in initialize_optimizer_states, a zero fp32 gradient freed again. Stage 3:
        the flat bf16 shards (defragment empties the cache first), fp32 master per sub-group
        (an fp32 conversion, then its clone), a zero fp32 buffer of the largest sub-group (initialize_optimizer_
        states, freed), then the bf16 gradient partition and the reduce bucket. Under stages 1-3
        torch AdamW makes its states at the first real step."""
        trace, states, plan = self.trace, self.states, self.plan
        trainable = trainable_numels(self.profile, self.shape)
        frozen = frozen_numels(self.profile, self.shape)
        offload = plan.offload_optimizer != "none"
        if plan.stage == 0:
            for numel in frozen + trainable:
                trace.malloc("param", BF16 * numel)
            if offload:
                return
            for numel in trainable:
                clone = trace.malloc("param.clone", BF16 * numel)
                trace.malloc("master", FP32 * numel)
                trace.free(clone)
            zero_grads = [trace.malloc("init_grad", BF16 * numel) for numel in trainable]
            zero_grads += [trace.malloc("init_grad", FP32 * numel) for numel in trainable]
            for numel in trainable:
                trace.malloc("exp_avg", FP32 * numel)
                trace.malloc("exp_avg_sq", FP32 * numel)
            trace.free(*zero_grads)
            self.adam_ready = True
            return
        if plan.stage in (1, 2):
            for numel in frozen:
                trace.malloc("param", BF16 * numel)
            groups = optimizer_groups(trainable, plan.optimizer_group_elems)
            built = [[trace.malloc("param", BF16 * numel) for numel in group] for group in groups]
            flat_total = states.params - BF16 * sum(frozen)
            for group, blocks in zip(groups, built):  # each group flattened, then its params made views
                trace.malloc("bit16_flat", flat_total * sum(group) // max(sum(trainable), 1))
                trace.free(*blocks)
            if offload:
                trace.malloc("offload_grad_buffer", states.grads)
                return
            slices = stage12_group_slices(self.profile, self.shape, plan)
            for elems in slices:
                clone = trace.malloc("partition.clone", BF16 * elems)
                trace.malloc("master", states.master_weights * elems // max(sum(slices), 1))
                trace.free(clone)
            trace.free(*[trace.malloc("init_grad", FP32 * elems) for elems in slices])
            return
        trace.malloc("bit16_shards", states.params)
        sub_groups = stage3_sub_group_elems(self.profile, self.shape, plan)
        for elems in () if offload else sub_groups:
            # _create_fp32_partitions: `.to(device, dtype=fp32)` then `.clone()` of that, the
            # converted copy freed (the allocator's trace: reports/h100_memhist)
            converted = trace.malloc("partition.fp32", FP32 * elems)
            trace.malloc("master", FP32 * elems)
            trace.free(converted)
        if not offload:
            trace.free(trace.malloc("init_grad", FP32 * max(sub_groups, default=0)))
        trace.malloc("grad_partitions", states.grads)
        trace.malloc("reduce_bucket", BF16 * plan.reduce_bucket_elems if plan.contiguous_gradients else 0)

    def begin_micro_step(self, first: bool, boundary: bool) -> None:
        """A micro-step starts: the first of an optimizer step and/or the one that ends it."""
        self.first_micro, self.boundary, self.produced = first, boundary, 0

    def weight_grad(self, name: str, elems: int) -> None:
        """A weight gradient autograd has just made (see adopt_grad)."""
        self.adopt_grad(name, elems, self.trace.malloc(f"grad.{name}", BF16 * elems))

    def _accumulated(self, grad: str) -> str:
        """AccumulateGrad after the step's first micro-step: the new gradient is added into the
        `.grad` held since then and freed; the held one is what the hooks see."""
        held = self.held[self.produced]
        self.produced += 1
        self.trace.free(grad)
        return held

    def adopt_grad(self, name: str, elems: int, grad: str) -> None:
        """ZeRO-0 keeps the bf16 gradient until the step; ZeRO-1/2 copy it into a bucket (made at
        the first hook) and allocate the reduced partition when the first bucket is full; ZeRO-3
        reduces it into its preallocated partition. Either way the gradient itself is released.
        With accumulation, ZeRO-0 and ZeRO-1 keep the `.grad` between micro-steps (ZeRO-1 reduces
        only at the boundary: reduce_ready_partitions_and_remove_grads). ZeRO-2 reduces every
        micro-step: each `.grad` is a view of that micro-step's grads_in_partition, so the next
        micro-step, which adds into it and copies the sum into a new grads_in_partition, holds
        two of them on the reduction stream until its backward ends (the allocator's own trace:
        reports/h100_memhist)."""
        if self.plan.stage == 0:
            if self.first_micro:
                self.grads.append((grad, elems))
            else:
                self.trace.free(grad)
            return
        if self.plan.stage == 1:
            if not self.first_micro:
                grad = self._accumulated(grad)
            if not self.boundary:
                self._setup_buckets()
                if self.first_micro:
                    self.held.append(grad)
                return
        if self.plan.stage in (1, 2) and self.plan.contiguous_gradients:
            self._setup_buckets()
            overflow = self.filled + elems > self.plan.reduce_bucket_elems
            if overflow and self.partition is None and self.plan.offload_optimizer == "none":
                # reduce_ipg_grads copies into the partition under `stream(self.reduction_stream)`
                # when overlap_comm is on, so its block belongs to that stream.
                stream = REDUCTION_STREAM if self.plan.overlap_comm else MAIN_STREAM
                self.partition = self.trace.malloc("grads_in_partition", self.states.grads, stream)
            if overflow:
                self._offload_bucket()
            self.filled = elems if overflow else self.filled + elems
            self.bucket_params.append(elems)
        if self.plan.stage == 3 and self.plan.offload_optimizer == "none":
            if self.filled + elems > self.plan.reduce_bucket_elems:
                self._reduce_scatter()
            self.filled += elems
        self.trace.free(grad)

    def _setup_buckets(self) -> None:
        """setup_buckets at the first gradient hook: the bf16 bucket (two with overlap_comm)."""
        if not self.buckets:
            copies = 2 if self.plan.overlap_comm else 1
            self.buckets = [self.trace.malloc("ipg_bucket", self.buffer_bytes // copies) for _ in range(copies)]

    def _offload_bucket(self) -> None:
        """ZeRO-1/2 with the optimizer offloaded, when a bucket is reduced (copy_grads_in_partition,
        under the reduction stream with overlap_comm): per gradient, its fp64 copy for the norm
        (set_norm_for_param_grad_in_gpu: `.to(get_norm_dtype())`, fp64 on CUDA) and its fp32 copy
        for the host (async_inplace_copy_grad_to_fp32_buffer_from_gpu), one after the other."""
        if self.plan.offload_optimizer != "none" and self.boundary:
            # Before the boundary ZeRO-2 adds each gradient into its host copy through a buffer
            # made at set-up (async_accumulate_grad_in_cpu_via_gpu): nothing is allocated then.
            stream = REDUCTION_STREAM if self.plan.overlap_comm else MAIN_STREAM
            for elems in self.bucket_params:
                self.trace.free(self.trace.malloc("norm_fp64", 8 * elems, stream))
                self.trace.free(self.trace.malloc("offload_fp32", FP32 * elems, stream))
        self.bucket_params = []

    def _reduce_scatter(self) -> None:
        """ZeRO-3 flushing its bucket (__reduce_and_partition_ipg_grads, on the
        reduce_and_partition_stream): reduce_scatter_coalesced torch.cat's the bucket's gradients
        into one flat buffer, even on one rank, then partition_grads copies out of it."""
        if self.filled:
            self.trace.free(self.trace.malloc("reduce_scatter_flat", BF16 * self.filled, REDUCTION_STREAM))
        self.filled = 0

    def allreduce(self) -> None:
        """The end of backward. ZeRO-0: DeepSpeedEngine.allreduce_gradients runs
        buffered_allreduce_fallback even on one rank, flattening the gradients into bf16 buckets of
        just over MEMORY_OPT_ALLREDUCE_SIZE (5e8) elements one at a time (allreduce_no_retain).
        ZeRO-3: the last bucket is reduced."""
        if self.plan.stage == 3:
            self._reduce_scatter()
        if self.plan.stage in (1, 2):
            self._offload_bucket()
            if self.plan.stage == 2:
                # The previous micro-step's partition goes once every .grad viewing it has been
                # reduced into this one's; _release_ipg_buffers at every epilogue drops the
                # buckets and forgets the partition, which the .grads (views of it) keep alive.
                self.trace.free(*([self.previous_partition] if self.previous_partition else []))
                self.previous_partition = None
                if not self.boundary:
                    self.trace.free(*self.buckets)
                    self.buckets, self.filled = [], 0
                    self.previous_partition, self.partition = self.partition, None
        if self.plan.stage != 0 or not self.boundary:
            return
        bucket = 0
        for _, elems in reversed(self.grads):
            bucket += elems
            if bucket > ALLREDUCE_BUCKET_ELEMS:
                self.trace.free(self.trace.malloc("allreduce_flat", BF16 * bucket))
                bucket = 0
        if bucket:
            self.trace.free(self.trace.malloc("allreduce_flat", BF16 * bucket))

    def step(self) -> None:
        """The optimizer step. Stage 0: an fp32 `.grad` per master, then every gradient freed.
        Stages 1/2: the buckets released; per optimizer group, the bf16 flat copy of its slice and
        its fp32 conversion, Adam's states (first step), the fp32 gradient freed; the reduced
        partition released with the last group.
        Stage 3 (_prepare_fp32_grad_for_sub_group): one sub-group at a time,
        `flatten(averaged_gradients).to(fp32)`, a bf16 flat copy and its fp32 conversion, Adam's
        states for it (first step)."""
        trace, plan, states = self.trace, self.plan, self.states
        offload = plan.offload_optimizer != "none"
        if plan.stage == 0:
            # FP16_UnfusedOptimizer.step: get_weight_norm's fp32 copy of each gradient, an fp32
            # .grad per master in parameter order, each dropped after the step; zero_grad drops the
            # bf16 ones (Adam's states exist since initialize_optimizer_states).
            trainable = () if offload else trainable_numels(self.profile, self.shape)
            for numel in trainable:  # get_weight_norm: `p.data.float().norm()` of each gradient
                trace.free(trace.malloc("norm_fp32", FP32 * numel))
            fp32 = [trace.malloc("fp32_grad", FP32 * numel) for numel in trainable]
            trace.free(*fp32, *(grad for grad, _ in self.grads))
        elif plan.stage in (1, 2):
            trace.free(*self.buckets)
            if offload:
                trace.free(*([self.partition] if self.partition else []))
            else:
                if self.partition is None:
                    self.partition = trace.malloc("grads_in_partition", states.grads)
                # One optimizer group at a time; the gradients in partition are one buffer whose
                # views every group's averaged_gradients hold, so it goes with the last group.
                groups = stage12_group_slices(self.profile, self.shape, plan)
                for index, elems in enumerate(groups):
                    flat = trace.malloc("flat_copy", BF16 * elems)
                    fp32 = trace.malloc("fp32_grads", FP32 * elems)
                    trace.free(flat, *([self.partition] if index == len(groups) - 1 else []))
                    if not self.adam_ready:
                        share = states.optimizer_states * elems // max(sum(groups), 1)
                        trace.malloc("exp_avg", share // 2)
                        trace.malloc("exp_avg_sq", share - share // 2)
                    trace.free(fp32)
        elif not offload:
            for elems in stage3_sub_group_elems(self.profile, self.shape, plan):
                flat = trace.malloc("flat_copy", BF16 * elems)
                fp32 = trace.malloc("fp32_grads", FP32 * elems)
                trace.free(flat)
                if not self.adam_ready:
                    trace.malloc("exp_avg", FP32 * elems)
                    trace.malloc("exp_avg_sq", FP32 * elems)
                trace.free(fp32)
        self.adam_ready = True
        self.grads, self.buckets, self.partition, self.filled, self.held = [], [], None, 0, []


def gathered(trace: Trace, plan: Plan, elems: int) -> str | None:
    """ZeRO-3 all-gathers a module's bf16 parameters around its forward and backward."""
    return trace.malloc("zero3_gather", BF16 * elems) if plan.stage == 3 else None
