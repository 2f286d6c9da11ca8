"""A DeepSpeed config read back into the Plan, micro-batch and accumulation the memory model takes
(`zeroplan validate`), with DeepSpeed's own defaults for the fields a config leaves out."""

from __future__ import annotations

import math
from typing import Any

from zeroplan.core.errors import InvalidConfig, InvalidInput
from zeroplan.core.plan import Plan
from zeroplan.core.tuning import DEEPSPEED_ZERO_DEFAULTS


def hf_bucket_autos(hidden_size: int) -> dict[str, int]:
    """The one rule the reader keeps from transformers' HfTrainerDeepSpeedConfig: the ZeRO bucket
    sizes its trainer_config_finalize derives from the model's hidden size when the config says
    "auto" (reduce_bucket_size h², stage3_prefetch_bucket_size 0.9·h², stage3_param_persistence_
    threshold 10·h). The reader is in the pure core (validate must answer without importing
    torch or transformers), and these are the only "auto" values that change the memory plan;
    the batch numbers come from the trainer's arguments or --micro-batch / --grad-accum. A test
    (tests/test_dsconfig.py) holds this equal to transformers' own result."""
    return {"zero_optimization.reduce_bucket_size": hidden_size * hidden_size,
            "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
            "zero_optimization.stage3_param_persistence_threshold": 10 * hidden_size}


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
    auto = hf_bucket_autos(hidden_size)

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
