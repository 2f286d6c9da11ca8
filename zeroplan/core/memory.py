"""Per-GPU memory of one training step: model states, activations, buffers and overhead, and the
peak over the phases of a step (not the sum: the loss's logits, the recomputed layer and the full
gradients are not all alive at once).

Model-state bytes come from zeroplan.core.partition (exact ZeRO partitions, checked against real
DeepSpeed engines), activations from zeroplan.core.activations; this module adds DeepSpeed's
communication buffers and takes the allocated peak over the phases. The reserved peak (what
decides an out-of-memory error) comes from replaying PyTorch's caching allocator over the steps'
allocations and frees (zeroplan.core.allocator, zeroplan.core.step_events); the CUDA context on top is the
device profile's, measured by `zeroplan calibrate`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from functools import lru_cache

from zeroplan.core.activations import ActivationBytes, activation_bytes
from zeroplan.core.allocator import replay
from zeroplan.core.params import count_parameters, model_tensors
from zeroplan.core.partition import ModelStateBytes, model_state_bytes, optimizer_step_grad_bytes, trainable_numels
from zeroplan.core.plan import Plan, TrainShape
from zeroplan.core.profiles import GPUProfile, ModelProfile
from zeroplan.core.step_events import setup_event_count, training_events
from zeroplan.core.dtypes import BF16_BYTES, FP32_BYTES

BF16, FP32 = BF16_BYTES, FP32_BYTES  # the short names the formulas here read
# Steps replayed when a run's own tiles per step are not given. Over the H100 matrix two steps
# come within 3.7 % of five (the runner's) and three match them (Adam's states appear in the
# first optimizer step, the second step meets the blocks they split); two keep `recommend` fast.
RUNNER_STEPS = 2


@dataclass(frozen=True)
class MemoryBreakdown:
    """Per-GPU bytes of one step on the most loaded rank, and host bytes per node for offload."""

    params: int
    grads: int
    master_weights: int
    optimizer_states: int
    activations_vision: int
    activations_llm: int
    logits_and_loss: int
    buffers: int
    step_transient: int
    overhead: int
    peak_allocated: int
    peak_reserved: int
    peak: int
    peak_phase: str
    cpu_bytes_per_node: int
    capacity: int

    @property
    def peak_bytes(self) -> int:
        """What must fit on the GPU: the reserved peak plus the CUDA context (NVML's 'used')."""
        return self.peak

    @property
    def optimizer_total(self) -> int:
        """fp32 master weights and Adam moments together (the ZeRO paper's 12 bytes/param)."""
        return self.master_weights + self.optimizer_states

    @property
    def activations(self) -> int:
        """Saved activations of vision and LLM (the logits' transient not included)."""
        return self.activations_vision + self.activations_llm

    def headroom(self) -> int:
        """Bytes left on the GPU at the peak (negative when it does not fit)."""
        return self.capacity - self.peak

    def as_dict(self) -> dict[str, int | str]:
        """The breakdown as a flat dict, with the keys `zeroplan estimate --json` documents."""
        out = asdict(self)
        out.update(optimizer_total=self.optimizer_total, activations=self.activations)
        return out

    def per_gpu_bytes(self) -> dict[str, int]:
        """The documented summary: params, grads, optimizer_states (master + moments), activations
        (saved + the loss's transient), buffers, overhead, peak."""
        return {
            "params": self.params, "grads": self.grads, "optimizer_states": self.optimizer_total,
            "activations": self.activations + self.logits_and_loss, "buffers": self.buffers,
            "overhead": self.overhead, "peak": self.peak,
        }


def communication_buffer_bytes(profile: ModelProfile, plan: Plan, trainable_elems: int) -> int:
    """DeepSpeed's gradient buckets and, under ZeRO-3, the gathered parameters.

    ZeRO-1/2 with contiguous_gradients allocate reduce_bucket_size elements in the gradient dtype at
    the first gradient hook of every backward (DeepSpeedZeroOptimizer.setup_buckets, from
    process_gradients), twice with overlap_comm, and free them when the step begins.
    ZeRO-3 allocates one reduce bucket (DeepSpeedZeroOptimizer_Stage3.__init__) and holds gathered
    16-bit parameters of the module in use plus those prefetched (up to prefetch_bucket_size and at
    most max_live_parameters). Stage 0 flattens each all-reduce bucket of gradients into a copy."""
    largest = count_parameters(profile).largest_layer
    if plan.stage == 0:
        return BF16 * min(plan.reduce_bucket_elems, trainable_elems) if plan.world_size > 1 else 0
    if plan.stage in (1, 2):
        if not plan.contiguous_gradients:
            return 0
        copies = 2 if plan.overlap_comm else 1
        return copies * BF16 * plan.reduce_bucket_elems
    gathered = largest + min(plan.prefetch_bucket_elems, plan.max_live_params)
    return BF16 * plan.reduce_bucket_elems * (1 if plan.contiguous_gradients else 0) + BF16 * gathered


def step_transient_bytes(profile: ModelProfile, shape: TrainShape, plan: Plan, rank: int | None = None) -> int:
    """Temporaries of the optimizer step: the fp32 copy of the rank's gradients Adam reads
    (zeroplan.core.partition.optimizer_step_grad_bytes: every gradient under ZeRO-0, the rank's slice
    under ZeRO-1/2, one sub-group under ZeRO-3; none with the optimizer offloaded), on `rank`
    (None: the most of any rank)."""
    return max(optimizer_step_grad_bytes(profile, shape, plan, r) for r in _ranks(plan, rank))


def _full_grad_of_lm_head(profile: ModelProfile, shape: TrainShape, plan: Plan) -> int:
    """The LM head's bf16 gradient, the first one backward produces: under ZeRO-0 it stays until
    the step; under ZeRO-1/2 it is alive when it is copied into the bucket; ZeRO-3 reduces it at once."""
    if plan.stage == 3 or not shape.trains("llm") or profile.llm.tie_word_embeddings:
        return 0
    return BF16 * profile.llm.vocab_size * profile.llm.hidden_size


def layers_done_at_first_reduce(profile: ModelProfile, shape: TrainShape, plan: Plan) -> int:
    """LLM layers whose backward has finished when ZeRO-1/2 reduce their first full bucket.

    Gradient hooks fire in backward order (lm_head, the final norm, then the layers from the last
    one down); DeepSpeedZeroOptimizer.reduce_independent_p_g_buckets_and_remove_grads reduces when
    the next gradient would overflow reduce_bucket_size, and only then allocates the reduced
    partition (copy_grads_in_partition). Every layer whose gradients are all in that bucket has
    released its saved activations by then."""
    if plan.stage not in (1, 2) or not shape.trains("llm"):
        return 0
    llm = [t for t in model_tensors(profile) if t.tower == "llm" and "embed_tokens" not in t.name]
    filled = 0
    pending: dict[str, int] = {}
    for tensor in reversed(llm):
        if filled + tensor.numel > plan.reduce_bucket_elems:
            break
        filled += tensor.numel
        layer = _layer_of(tensor.name)
        if layer is not None:
            pending[layer] = pending.get(layer, 0) + 1
    per_layer: dict[str, int] = {}
    for tensor in llm:
        layer = _layer_of(tensor.name)
        if layer is not None:
            per_layer[layer] = per_layer.get(layer, 0) + 1
    done = {layer for layer, count in pending.items() if count == per_layer[layer]}
    return len(done)


def _layer_of(name: str) -> str | None:
    """'12' for 'model.language_model.layers.12.mlp.up_proj.weight', None outside the layers."""
    marker = ".layers."
    if marker not in name:
        return None
    return name.split(marker, 1)[1].split(".", 1)[0]


def accumulated_gradient_bytes(profile: ModelProfile, shape: TrainShape, plan: Plan, states: ModelStateBytes,
                               buffers: int, gradient_accumulation: int) -> int:
    """What DeepSpeed holds from one micro-step to the next when gradients accumulate.

    ZeRO-0 keeps every bf16 `.grad` (AccumulateGrad adds into it). ZeRO-1 reduces only at the
    accumulation boundary (stage_1_and_2.py reduce_ready_partitions_and_remove_grads: stage 1
    reduces when `is_gradient_accumulation_boundary()`), so the full bf16 `.grad` of every trainable
    parameter stays, and the buckets setup_buckets made at the first hook stay until the step.
    ZeRO-2 reduces every micro-step into grads_in_partition, which stays (its buckets are released
    at the end of each backward). ZeRO-3's partition is resident anyway. Measured on the H100 at
    the start of later micro-steps' forward (reports/h100_fast_*): ZeRO-0 +4.1 GiB, ZeRO-1 +5.5,
    ZeRO-2 +4.1, ZeRO-3 +0 for InternVL2.5-2B (4.1 GiB of bf16 gradients, 1.4 GiB of buckets)."""
    if gradient_accumulation <= 1:
        return 0
    if plan.stage == 1:  # with the optimizer offloaded too: it reduces (and offloads) at the boundary
        return BF16 * sum(trainable_numels(profile, shape)) + buffers
    if plan.offload_optimizer != "none":
        return 0
    if plan.stage == 0:
        return states.grads
    if plan.stage == 2:
        return states.grads
    return 0


def _phases(plan: Plan, states: ModelStateBytes, acts: ActivationBytes, buffers: int, step: int,
            lm_head_grad: int, layers_done: int = 0, accumulated: int = 0) -> dict[str, int]:
    """Allocated bytes at the moments that can hold the peak, with what DeepSpeed 0.19.8 holds then.

    Always resident: 16-bit params, fp32 master weights and Adam states. ZeRO-3's gradient
    partitions and reduce bucket are allocated once at init (stage3.py __init__) and stay. ZeRO-1/2
    allocate their bucket buffers at the first gradient hook (setup_buckets, after the loss's
    backward) and the reduced slice (grads_in_partition) at the first reduce; both are released
    when the step begins (_release_ipg_buffers). ZeRO-0 keeps full bf16 gradients until the step.

    forward-loss: saved activations plus the loss's logits in bf16 and fp32.
    backward-start: saved activations and the loss's fp32 gradients (no ZeRO-1/2 bucket yet).
    backward-buckets: (ZeRO-1/2) at the first gradient hook: the buckets and the LM head's gradient
    being copied into one.
    backward-first-reduce: (ZeRO-1/2) the buckets and the reduced slice, allocated when the first
    bucket is full, by when `layers_done` LLM layers have released their saved activations.
    backward-recompute: the first checkpointed layer recomputed on top of what is saved.
    optimizer-step: activations freed; gradients, the fp32 copy Adam reads and (ZeRO-1/2) the bf16
    flat copy of the slice (get_flat_partition) it is made from, one optimizer group at a time."""
    resident = states.params + states.master_weights + states.optimizer_states
    if plan.stage == 3:
        resident += states.grads + buffers
    early_buffers = buffers if plan.stage == 0 else 0
    zero0_grad = lm_head_grad if plan.stage == 0 else 0
    if accumulated:  # later micro-steps hold the earlier ones' gradients (and buckets) throughout
        held = _phases(plan, replace(states, params=states.params + accumulated), acts, buffers, step,
                       lm_head_grad, layers_done)
        # ZeRO-1's held buckets are the ones these phases already count.
        counted = buffers if plan.stage == 1 else 0
        later = {f"{name} (accumulating)": value - (counted if name in ("backward-buckets", "backward-first-reduce")
                                                     else 0)
                 for name, value in held.items() if name != "optimizer-step"}
        return _phases(plan, states, acts, buffers, step, lm_head_grad, layers_done) | later
    phases = {
        "forward-loss": resident + acts.saved + acts.logits_forward_transient,
        "backward-start": resident + acts.saved + acts.logits_backward_transient + zero0_grad + early_buffers,
        "backward-recompute": resident + acts.saved + acts.recompute_transient + zero0_grad,
        "vision-forward": resident + acts.vision_forward_transient,
    }
    if plan.stage == 0:
        phases["optimizer-step"] = resident + states.grads + step
    elif plan.stage in (1, 2):
        flat_copy = step * BF16 // FP32  # the bf16 flat copy of the group whose fp32 copy `step` is
        phases["backward-buckets"] = resident + acts.saved + buffers + lm_head_grad
        phases["backward-first-reduce"] = (resident + acts.saved - acts.last_layers_saved(layers_done) + buffers
                                           + states.grads)
        phases["optimizer-step"] = resident + states.grads + step + flat_copy
    else:
        phases["optimizer-step"] = resident + step
    return phases


def reserved_bytes(profile: ModelProfile, shape: TrainShape, plan: Plan, states: ModelStateBytes, buffers: int,
                   step: int, capacity: int, step_tiles: tuple[int, ...] | None = None,
                   compiled: bool = False, accumulation: int = 1) -> tuple[int, int, int]:
    """(peak reserved, peak allocated, peak allocated of the training steps without the engine's
    set-up) of PyTorch's caching allocator over the runner's five steps,
    by replaying the steps' allocations and frees (zeroplan.core.step_events) through the allocator's
    rules (zeroplan.core.allocator). Reserved exceeds allocated because freed blocks stay cached in their
    segments, and a large request (the loss's vocabulary-wide blocks above all) that finds them
    split by smaller live tensors gets a new segment; nothing here is fitted to measurements."""
    # ZeRO-1 and ZeRO-2 allocate alike in DeepSpeed 0.19.8 (same partition, buckets and step), so
    # their replays are one.
    # Not with accumulation: ZeRO-1 holds every .grad to the boundary, ZeRO-2 reduces every
    # micro-step (two gradient partitions alive on the GPU, or the gradients sent to the host
    # with the optimizer offloaded).
    replayed_plan = replace(plan, stage=1) if plan.stage == 2 and accumulation == 1 else plan
    return _replayed(profile, shape, replayed_plan, states, buffers if plan.stage in (1, 2) else 0, capacity,
                     step_tiles, compiled, accumulation)


def replayed_events(profile: ModelProfile, shape: TrainShape, plan: Plan, step_tiles: tuple[int, ...] | None = None,
                    compiled: bool = False, accumulation: int = 1) -> list:
    """The allocations and frees `estimate` replays for a run (for tools that set them beside the
    CUDA allocator's own trace: benchmarks/memory_history.py)."""
    flat = replace(shape, micro_batch=1, grad_ckpt=False, ckpt_layers=None)
    states = _most_loaded_rank_states(profile, flat, plan)
    buffers = communication_buffer_bytes(profile, plan, states.partition_elems * plan.world_size)
    replayed_plan = replace(plan, stage=1) if plan.stage == 2 and accumulation == 1 else plan
    return _events(profile, shape, replayed_plan, states, buffers if plan.stage in (1, 2) else 0, step_tiles,
                   compiled, accumulation)


def _events(profile, shape, plan, states, buffers, step_tiles, compiled, accumulation) -> list:
    return training_events(profile, shape, plan, states, buffers, steps=RUNNER_STEPS, step_tiles=step_tiles,
                           compiled=compiled, accumulation=min(accumulation, 3))


# Replays kept across runs: the CLI plugs in a store (zeroplan.adapters.cache.ReplayStore) with
# get(inputs) / put(inputs, peaks); the core itself reads and writes no files.
_REPLAY_STORE: list = []


def use_replay_store(store) -> None:
    """Keep replays in `store` (None: in this process only)."""
    _REPLAY_STORE[:] = [] if store is None else [store]


@lru_cache(maxsize=512)
def _replayed(profile: ModelProfile, shape: TrainShape, plan: Plan, states: ModelStateBytes, buffers: int,
              capacity: int, step_tiles: tuple[int, ...] | None, compiled: bool,
              accumulation: int = 1) -> tuple[int, int, int]:
    """The replay itself, cached (the planner asks for the same shape under many plans): peak
    reserved, peak allocated, and peak allocated over the training steps (the set-up left out)."""
    inputs = None
    if _REPLAY_STORE:
        inputs = repr((profile, shape, plan, states, buffers, capacity, step_tiles, compiled, accumulation))
        found = _REPLAY_STORE[0].get(inputs)
        if found is not None:
            return found
    events = _events(profile, shape, plan, states, buffers, step_tiles, compiled, accumulation)
    allocator = replay(events, capacity, track_from=setup_event_count(profile, shape, plan, states, buffers))
    peaks = allocator.peak_reserved, allocator.peak_allocated, allocator.tracked_peak_allocated
    if inputs is not None:
        _REPLAY_STORE[0].put(inputs, peaks)
    return peaks


def estimate(profile: ModelProfile, shape: TrainShape, plan: Plan, gpu: GPUProfile,
             step_tiles: tuple[int, ...] | None = None, gradient_accumulation: int = 1,
             compiled: bool = False, rank: int | None = None) -> MemoryBreakdown:
    """Per-GPU memory of training `profile` on `shape` under `plan`, on the most loaded rank (or on
    `rank`, for a rehearsal of that rank).

    Rank 0 holds the most under ZeRO-1/2 when padding falls on the last rank, and the same as the
    others otherwise; the estimate takes the maximum over ranks of the model states. `step_tiles`
    (each step's tiles in the micro-batch, when a run's are known) only changes the reserved peak:
    the allocated one is that of the largest micro-batch, which `shape` describes.
    `gradient_accumulation` > 1 adds what DeepSpeed holds between micro-steps
    (accumulated_gradient_bytes); `compiled`: the decoder layers run under torch.compile
    (zeroplan.core.activations.llm_layer_bytes_per_token)."""
    flat = replace(shape, micro_batch=1, grad_ckpt=False, ckpt_layers=None)
    states = _most_loaded_rank_states(profile, flat, plan, rank)
    compiled = compiled or bool(getattr(shape, "compiled", False))
    acts = activation_bytes(profile, shape, compiled)
    buffers = communication_buffer_bytes(profile, plan, states.partition_elems * plan.world_size)
    step = step_transient_bytes(profile, flat, plan, rank)
    phases = _phases(plan, states, acts, buffers, step, _full_grad_of_lm_head(profile, shape, plan),
                     layers_done_at_first_reduce(profile, shape, plan),
                     accumulated_gradient_bytes(profile, shape, plan, states, buffers, gradient_accumulation))
    phase = max(phases, key=phases.__getitem__)
    peak_allocated = phases[phase]
    context = int(gpu.calibrated.get("cuda_context_bytes", gpu.cuda_context_bytes))
    if peak_allocated + context > gpu.memory_bytes:
        # Does not fit whatever the allocator does: reserved is at least allocated; skip the replay.
        peak_reserved = peak_allocated
    else:
        replay_reserved, replay_allocated, replay_steps = reserved_bytes(
            profile, shape, plan, states, buffers, step, gpu.memory_bytes - context, step_tiles, compiled,
            gradient_accumulation)
        # Phases the replay leaves out (ZeRO-3 prefetch, offload buffers) need segments of their own.
        peak_reserved = replay_reserved + max(0, peak_allocated - replay_allocated)
        # One account of the step's allocations: the replay's tensors, tensor by tensor, decide the
        # allocated peak where they hold more than the phases' closed form (temporaries the phases
        # do not list, e.g. ZeRO-1/2 offload's fp64 norm buffers); the closed form keeps what the
        # replay leaves out. tests/test_memory_accounts.py holds the two together.
        if replay_steps > peak_allocated:
            peak_allocated, phase = replay_steps, f"{phase} (replayed allocations)"
    return MemoryBreakdown(
        params=states.params, grads=states.grads, master_weights=states.master_weights,
        optimizer_states=states.optimizer_states, activations_vision=acts.vision,
        activations_llm=acts.llm_saved, logits_and_loss=acts.logits_backward_transient,
        buffers=buffers, step_transient=step, overhead=peak_reserved - peak_allocated + context,
        peak_allocated=peak_allocated, peak_reserved=peak_reserved, peak=peak_reserved + context,
        peak_phase=phase, cpu_bytes_per_node=states.cpu_bytes * plan.gpus_per_node,
        capacity=gpu.memory_bytes,
    )


@lru_cache(maxsize=256)
def _most_loaded_rank_states(profile: ModelProfile, shape: TrainShape, plan: Plan,
                             rank: int | None = None) -> ModelStateBytes:
    """Model states do not depend on the micro-batch or checkpointing: cached across candidates.
    The most loaded rank's, or `rank`'s."""
    return max((model_state_bytes(profile, shape, plan, r) for r in _ranks(plan, rank)),
               key=lambda s: s.params + s.grads + s.master_weights + s.optimizer_states)


def _ranks(plan: Plan, rank: int | None = None) -> tuple[int, ...]:
    """Ranks worth computing: `rank` when one is asked for; else the last (where padding lands)
    and the first (the reference)."""
    if rank is not None:
        return (rank,)
    return (0,) if plan.world_size == 1 else (0, plan.world_size - 1)
