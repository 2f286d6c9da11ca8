"""Bucket sizes and ZeRO-3 knobs derived from the model's tensor shapes: the plan a DeepSpeed
config will carry, tuned before its memory is predicted (the planner, `estimate` and the runner all
start from `tuned_plan`)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from zeroplan.core.params import lora_tensors, model_tensors
from zeroplan.core.plan import Plan, TrainShape
from zeroplan.core.profiles import ModelProfile

# DeepSpeed's defaults (deepspeed/runtime/zero/config.py, DeepSpeedZeroConfig) for fields a config
# may leave out; overlap_comm defaults to True only under stage 3 (its `overlap_comm_valid`).
DEEPSPEED_ZERO_DEFAULTS = {
    "reduce_bucket_size": 500_000_000, "allgather_bucket_size": 500_000_000, "contiguous_gradients": True,
    "stage3_prefetch_bucket_size": 50_000_000, "stage3_param_persistence_threshold": 100_000,
    "stage3_max_live_parameters": 1_000_000_000, "sub_group_size": 1_000_000_000,
}

# Below ~10M elements a collective is dominated by latency rather than bandwidth.
MIN_BUCKET_ELEMS = 10_000_000

# InternVL's stage-1 bucket; DeepSpeed's default 5e8 for stages that partition gradients.
MAX_BUCKET_ELEMS = {0: 1_000_000_000, 1: 1_000_000_000, 2: 500_000_000, 3: 500_000_000}

_LAYER = re.compile(r"^(.*\.layers?\.\d+)\.")

def _round_up(value: int, digits: int) -> int:
    """`value` rounded up to `digits` significant digits, so configs read 440000000, not 436207616."""
    if value <= 0:
        return 0
    step = 10 ** max(0, len(str(int(value))) - digits)
    return math.ceil(value / step) * step


@dataclass(frozen=True)
class ShapeSizes:
    """The tensor sizes the tuning rules start from, in elements."""

    llm_layer_elems: int
    largest_trainable_block_elems: int
    largest_tensor_elems: int
    largest_vector_elems: int
    smallest_matrix_elems: int


def shape_sizes(profile: ModelProfile, shape: TrainShape) -> ShapeSizes:
    """Sizes from zeroplan.core.params' tensor list. A "block" is one transformer layer (every tensor
    under `...layers.N.` / `...layer.N.`) or, outside the layer stacks, one module. A "vector" is a
    tensor no longer than the model's widest dimension (norm weights, biases, layer scales)."""
    tensors = list(model_tensors(profile))
    trainable = [t for t in tensors if shape.trains(t.tower)] + list(lora_tensors(profile, shape.lora_rank))
    blocks: dict[str, int] = {}
    for tensor in trainable:
        match = _LAYER.match(tensor.name)
        key = match.group(1) if match else tensor.module
        blocks[key] = blocks.get(key, 0) + tensor.numel
    layer = sum(t.numel for t in tensors if t.name.startswith("model.language_model.layers.0."))
    vision, llm = profile.vision, profile.llm
    widest = max(vision.hidden_size, vision.intermediate_size, profile.projector_in_features, llm.hidden_size,
                 llm.intermediate_size, llm.num_heads * llm.head_dim)
    vectors = [t.numel for t in tensors if t.numel <= widest]
    matrices = [t.numel for t in tensors if t.numel > widest]
    return ShapeSizes(llm_layer_elems=layer, largest_trainable_block_elems=max(blocks.values(), default=0),
                      largest_tensor_elems=max(t.numel for t in tensors),
                      largest_vector_elems=max(vectors, default=0),
                      smallest_matrix_elems=min(matrices, default=widest + 1))


def tuned_plan(profile: ModelProfile, shape: TrainShape, plan: Plan) -> Plan:
    """The plan with its buckets and ZeRO-3 knobs set from the model's shapes (stage, cluster,
    offload and overlap are kept). The rules, each in elements:

    - reduce bucket = two of the largest trainable blocks: gradients become ready block by block
      in backward, and a bucket spanning two lets one reduce overlap the next block's backward.
      At least 1e7 (smaller collectives are latency-bound); at most 1e9 under stages 0/1
      (InternVL's stage-1 value) and 5e8 under stages 2/3, where gradients are partitioned and the
      bucket is an unpartitioned bf16 buffer on top (two of them with overlap_comm).
    - allgather bucket (stages 1/2: the updated bf16 partitions gathered after the step) = the
      reduce bucket, for the same latency/memory trade.
    - stage-3 prefetch = one LLM decoder layer: the next layer is gathered while this one computes.
    - stage-3 max live parameters = three decoder layers (the one computing, the one prefetched
      and the one being released), but never less than the largest single tensor (the embedding or
      lm_head is gathered whole).
    - stage-3 reuse distance = one decoder layer: with activation checkpointing a layer's
      parameters are used by its recomputed forward and then at once by its backward, so they
      stay gathered instead of being fetched twice.
    - persistence threshold (DeepSpeed keeps tensors of at most this many elements whole) = the
      largest vector (norms, biases, layer scales) rounded up, kept below the smallest matrix: the
      small tensors stay resident on every GPU (partitioning them costs a collective each and
      saves almost nothing) while every weight matrix is partitioned.
    - sub-group = two decoder layers with NVMe offload (each sub-group's optimizer state is swapped
      in and out as one unit, so it bounds the pinned buffers); otherwise DeepSpeed's 1e9, one step
      over the whole partition.
    """
    sizes = shape_sizes(profile, shape)
    layer = max(sizes.llm_layer_elems, 1)
    bucket = min(max(_round_up(2 * sizes.largest_trainable_block_elems, 2), MIN_BUCKET_ELEMS),
                 MAX_BUCKET_ELEMS[plan.stage])
    threshold = min(_round_up(sizes.largest_vector_elems, 1), sizes.smallest_matrix_elems - 1)
    nvme = "nvme" in (plan.offload_optimizer, plan.offload_params)
    return plan.with_(
        reduce_bucket_elems=bucket, allgather_bucket_elems=bucket,
        prefetch_bucket_elems=_round_up(layer, 2),
        max_live_params=_round_up(max(3 * layer, sizes.largest_tensor_elems), 2),
        param_persistence_threshold=threshold,
        sub_group_elems=_round_up(2 * layer, 2) if nvme else DEEPSPEED_ZERO_DEFAULTS["sub_group_size"],
    )


def max_reuse_distance(profile: ModelProfile) -> int:
    """One LLM decoder layer, rounded (see tuned_plan)."""
    return _round_up(max(shape_sizes(profile, TrainShape()).llm_layer_elems, 1), 2)
