"""DeepSpeed JSON configs from a plan, and plans back from a config.

`tuned_plan` derives bucket sizes and the ZeRO-3 knobs from the model's tensor shapes;
`render` writes a Plan as a DeepSpeed config, either with every number filled in ("concrete") or
with "auto" where the HF Trainer fills the value from its own arguments ("hf", the way InternVL's
zero_stage*_config.json files are written). `fill_auto` mirrors what transformers'
HfTrainerDeepSpeedConfig does to those "auto" values, and `plan_from_config` reads a config back
into the Plan the memory model takes. Pure Python: no DeepSpeed import here (see
zeroplan.adapters.deepspeed_adapter for DeepSpeed's own validation).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from zeroplan.errors import InvalidConfig, InvalidInput
from zeroplan.params import lora_tensors, model_tensors
from zeroplan.plan import Plan, TrainShape
from zeroplan.profiles import ModelProfile, load_model

FLAVOURS = ("concrete", "hf")
OPTIMIZERS = ("adamw", "client")
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
STEPS_PER_PRINT = 2000
NVME_PATH_PLACEHOLDER = "/local_nvme"

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

# InternVL's config files, the size class each serves (a model profile's `internvl_ds_config`),
# its stage, and the representative model and GPU count (InternVL2.5's fine-tune scripts).
CONFIG_SET = (
    ("zero_stage1_config.json", "stage1", 1, "8b", 8),
    ("zero_stage2_config.json", "stage2", 2, "8b", 8),
    ("zero_stage3_config.json", "stage3", 3, "26b", 8),
    ("zero_stage3_config_34b.json", "stage3_34b", 3, "40b", 16),
    ("zero_stage3_config_100b.json", "stage3_100b", 3, "78b", 32),
)
SET_SHAPE = TrainShape(micro_batch=1, seq_len=8192, tiles=7, frozen=frozenset({"vision"}))

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
    """Sizes from zeroplan.params' tensor list. A "block" is one transformer layer (every tensor
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


def _offload_block(device: str) -> dict[str, Any]:
    block: dict[str, Any] = {"device": device, "pin_memory": True}
    if device == "nvme":
        block["nvme_path"] = NVME_PATH_PLACEHOLDER
    return block


def _zero_block(profile: ModelProfile, plan: Plan) -> dict[str, Any]:
    zero: dict[str, Any] = {
        "stage": plan.stage, "overlap_comm": plan.overlap_comm, "contiguous_gradients": plan.contiguous_gradients,
        "reduce_scatter": True, "reduce_bucket_size": plan.reduce_bucket_elems,
    }
    if plan.stage in (1, 2):
        zero["allgather_partitions"] = True
        zero["allgather_bucket_size"] = plan.allgather_bucket_elems
    if plan.offload_optimizer != "none":
        zero["offload_optimizer"] = _offload_block(plan.offload_optimizer)
    if plan.stage == 3:
        zero.update({
            "sub_group_size": plan.sub_group_elems,
            "stage3_prefetch_bucket_size": plan.prefetch_bucket_elems,
            "stage3_param_persistence_threshold": plan.param_persistence_threshold,
            "stage3_max_live_parameters": plan.max_live_params,
            "stage3_max_reuse_distance": max_reuse_distance(profile),
            "stage3_gather_16bit_weights_on_model_save": True,
        })
        if plan.offload_params != "none":
            zero["offload_param"] = _offload_block(plan.offload_params)
    return zero


def render(profile: ModelProfile, shape: TrainShape, plan: Plan, micro_batch: int, gradient_accumulation: int,
           flavour: str = "concrete", gradient_clipping: float = 1.0, lr: float = 2e-5,
           weight_decay: float = 0.05, optimizer: str = "adamw", tune: bool = False) -> dict[str, Any]:
    """A DeepSpeed config for the plan (bf16, AdamW, ZeRO stage and offload as planned).

    By default the plan's own bucket numbers are written, so the config is exactly the plan whose
    memory was predicted (the runner and the planner rely on that); with `tune` they are first
    derived from the model's shapes by `tuned_plan` (what `config_set` and `generate` do).

    `optimizer="adamw"` puts DeepSpeed's AdamW block in the config (InternVL's choice, and the only
    one that works with optimizer offload, where DeepSpeed swaps in its CPU Adam); `"client"`
    leaves it out for a client torch AdamW(fused=True), as zeroplan's runner passes without
    offload, and sets zero_allow_untested_optimizer. The "hf" flavour writes "auto" where the HF
    Trainer fills the value: precision, batch sizes, accumulation, clipping, learning rate and
    weight decay."""
    if flavour not in FLAVOURS:
        raise InvalidInput(f"flavour must be one of {', '.join(FLAVOURS)}, got {flavour!r}")
    if optimizer not in OPTIMIZERS:
        raise InvalidInput(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    if optimizer == "client" and plan.offload_optimizer != "none":
        raise InvalidInput("optimizer offload needs DeepSpeed's optimizer block (optimizer='adamw'): "
                           "DeepSpeed refuses a client optimizer with ZeRO-Offload")
    for name, value in (("micro-batch", micro_batch), ("gradient accumulation", gradient_accumulation)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidInput(f"{name} must be a positive whole number, got {value!r}")
    if tune:
        plan = tuned_plan(profile, shape, plan)
    hf = flavour == "hf"
    config: dict[str, Any] = {
        "bf16": {"enabled": "auto" if hf else True},
        "gradient_accumulation_steps": "auto" if hf else gradient_accumulation,
        "gradient_clipping": "auto" if hf else float(gradient_clipping),
        "steps_per_print": STEPS_PER_PRINT,
        "train_batch_size": "auto" if hf else micro_batch * gradient_accumulation * plan.world_size,
        "train_micro_batch_size_per_gpu": "auto" if hf else micro_batch,
        "wall_clock_breakdown": False,
        "zero_optimization": _zero_block(profile, plan),
    }
    if hf:
        config["fp16"] = {"enabled": "auto"}
    if optimizer == "adamw":
        config["optimizer"] = {"type": "AdamW", "params": {
            "lr": "auto" if hf else lr, "betas": list(ADAM_BETAS), "eps": ADAM_EPS,
            "weight_decay": "auto" if hf else weight_decay}}
    else:
        config["zero_allow_untested_optimizer"] = True
    return config


def config_set(flavour: str = "hf") -> dict[str, dict[str, Any]]:
    """Counterparts of InternVL's zero_stage{1,2,3}_config.json, _34b and _100b, each tuned on a
    representative model of its size class (checked against the profile's `internvl_ds_config`)
    on the GPU count InternVL's scripts use for it."""
    out: dict[str, dict[str, Any]] = {}
    for filename, size_class, stage, model, gpus in CONFIG_SET:
        profile = load_model(model)
        if stage == 3 and profile.internvl_ds_config != size_class:
            raise InvalidInput(f"{profile.name} is of class {profile.internvl_ds_config}, not {size_class}")
        plan = Plan(stage=stage, gpus_per_node=min(gpus, 8), nodes=max(1, gpus // 8))
        out[filename] = render(profile, SET_SHAPE, plan, micro_batch=1, gradient_accumulation=1, flavour=flavour,
                               tune=True)
    return out


def to_json(config: dict[str, Any]) -> str:
    """The file text: indent 2, sorted keys, trailing newline (stable, so `generate --check` diffs)."""
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


def auto_fields(config: Any, prefix: str = "") -> list[str]:
    """Dotted paths of every value that is the string "auto", in file order."""
    found: list[str] = []
    if isinstance(config, dict):
        for key, value in config.items():
            path = f"{prefix}{key}"
            if value == "auto":
                found.append(path)
            else:
                found += auto_fields(value, f"{path}.")
    return found


def hf_auto_values(*, micro_batch: int, gradient_accumulation: int, world_size: int, hidden_size: int,
                   gradient_clipping: float = 1.0, lr: float = 2e-5, weight_decay: float = 0.05,
                   bf16: bool = True, stage3: bool = True, num_training_steps: int = 1,
                   warmup_steps: int = 0) -> dict[str, Any]:
    """The value transformers' HfTrainerDeepSpeedConfig puts at each "auto" path it knows
    (trainer_config_process and trainer_config_finalize): batch arithmetic, clipping, optimizer
    and scheduler arguments, precision, and the hidden-size rules for the buckets."""
    values: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": gradient_accumulation,
        "train_batch_size": micro_batch * gradient_accumulation * world_size,
        "gradient_clipping": gradient_clipping, "optimizer.params.lr": lr,
        "optimizer.params.betas": list(ADAM_BETAS), "optimizer.params.eps": ADAM_EPS,
        "optimizer.params.weight_decay": weight_decay, "scheduler.params.warmup_min_lr": 0,
        "scheduler.params.warmup_max_lr": lr, "scheduler.params.total_num_steps": num_training_steps,
        "scheduler.params.warmup_num_steps": warmup_steps, "fp16.enabled": False, "bf16.enabled": bf16,
        "zero_optimization.reduce_bucket_size": hidden_size * hidden_size,
    }
    if stage3:
        values["zero_optimization.stage3_prefetch_bucket_size"] = int(0.9 * hidden_size * hidden_size)
        values["zero_optimization.stage3_param_persistence_threshold"] = 10 * hidden_size
    return values


def fill_auto(config: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A copy of the config with each "auto" replaced from `values` (see hf_auto_values); an
    "auto" the HF Trainer would not fill raises InvalidConfig, as the Trainer's DeepSpeed would
    fail on it."""
    filled = json.loads(json.dumps(config))
    for path in auto_fields(filled):
        if path not in values:
            raise InvalidConfig(f"'{path}' is \"auto\" but the HF Trainer does not fill it; give a value")
        *parents, leaf = path.split(".")
        node = filled
        for key in parents:
            node = node[key]
        node[leaf] = values[path]
    return filled


def _whole(value: Any, where: str) -> int:
    """An element count or batch number; JSON writes 1e9 as a float, which is fine when whole."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value != int(value):
        raise InvalidConfig(f"'{where}' must be a whole number, got {value!r}")
    return int(value)


def _zero_value(zero: dict[str, Any], key: str, default: Any, auto: Any) -> Any:
    value = zero.get(key, zero.get(key.removeprefix("stage3_"), default))
    return auto if value == "auto" else value


def _batch_field(config: dict[str, Any], key: str, given: int | None) -> int | None:
    """One batch number: the config's own, `given` (or 1) for "auto", None when absent."""
    value = config.get(key)
    if value is None:
        return None
    if value == "auto":
        return given or 1
    number = _whole(value, key)
    if number < 1:
        raise InvalidConfig(f"'{key}' must be at least 1, got {number}")
    if given is not None and given != number:
        raise InvalidInput(f"the config sets {key} to {number}, not {given}")
    return number


def _batch(config: dict[str, Any], world_size: int, micro_batch: int | None,
           gradient_accumulation: int | None) -> tuple[int, int]:
    """Micro-batch and accumulation, resolved the way DeepSpeed's DeepSpeedConfig does
    (_set_batch_related_parameters), and checked like its _batch_assertion but on this world size."""
    micro = _batch_field(config, "train_micro_batch_size_per_gpu", micro_batch)
    accum = _batch_field(config, "gradient_accumulation_steps", gradient_accumulation)
    total = None if config.get("train_batch_size") == "auto" else _batch_field(config, "train_batch_size", None)
    if micro is None and total is None:
        raise InvalidConfig("the config gives neither train_batch_size nor train_micro_batch_size_per_gpu")
    if micro is None:
        accum = accum or 1
        micro = total // (world_size * accum)
    elif accum is None:
        accum = total // (micro * world_size) if total is not None else 1
    if total is not None and total != micro * accum * world_size:
        raise InvalidInput(f"train_batch_size {total} is not micro-batch × accumulation × GPUs "
                           f"({micro} × {accum} × {world_size} = {micro * accum * world_size})")
    return micro, accum


def plan_from_config(config: dict[str, Any], gpus_per_node: int, nodes: int, *, hidden_size: int = 4096,
                     micro_batch: int | None = None,
                     gradient_accumulation: int | None = None) -> tuple[Plan, int, int]:
    """The Plan a config describes on this cluster, with its micro-batch and accumulation.

    Missing ZeRO fields take DeepSpeed's defaults; "auto" bucket sizes take the HF Trainer's
    hidden-size rules (`hidden_size` is the LLM's); an "auto" batch size takes `micro_batch` /
    `gradient_accumulation` (1 when not given)."""
    if not isinstance(config, dict):
        raise InvalidConfig("a DeepSpeed config must be a JSON object")
    zero = config.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise InvalidConfig("'zero_optimization' must be an object")
    stage = _whole(zero.get("stage", 0), "zero_optimization.stage")
    if not 0 <= stage <= 3:
        raise InvalidConfig(f"ZeRO stage must be 0, 1, 2 or 3, got {stage}")
    auto = hf_auto_values(micro_batch=1, gradient_accumulation=1, world_size=1, hidden_size=hidden_size)

    def elems(key: str) -> int:
        value = _zero_value(zero, key, DEEPSPEED_ZERO_DEFAULTS[key], auto.get(f"zero_optimization.{key}"))
        return _whole(value, f"zero_optimization.{key}")

    def device(key: str) -> str:
        block = zero.get(key) or {}
        if not isinstance(block, dict):
            raise InvalidConfig(f"'zero_optimization.{key}' must be an object")
        return str(block.get("device", "none")).lower()

    overlap = zero.get("overlap_comm", "auto")
    plan_fields = dict(
        stage=stage, gpus_per_node=gpus_per_node, nodes=nodes,
        offload_optimizer=device("offload_optimizer") if stage else "none",
        offload_params=device("offload_param") if stage == 3 else "none",
        reduce_bucket_elems=elems("reduce_bucket_size"), allgather_bucket_elems=elems("allgather_bucket_size"),
        overlap_comm=stage == 3 if overlap in ("auto", None) else bool(overlap),
        contiguous_gradients=bool(_zero_value(zero, "contiguous_gradients", True, True)),
        prefetch_bucket_elems=elems("stage3_prefetch_bucket_size"),
        max_live_params=elems("stage3_max_live_parameters"),
        param_persistence_threshold=elems("stage3_param_persistence_threshold"),
        sub_group_elems=elems("sub_group_size"),
    )
    plan = Plan(**plan_fields)
    micro, accum = _batch(config, plan.world_size, micro_batch, gradient_accumulation)
    return plan, micro, accum
