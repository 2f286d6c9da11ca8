"""DeepSpeed JSON configs from a plan.

`render` writes a Plan as a DeepSpeed config, either with every number filled in ("concrete") or
with "auto" where the HF Trainer fills the value from its own arguments ("hf", the way InternVL's
zero_stage*_config.json files are written); transformers' HfTrainerDeepSpeedConfig fills those
(zeroplan.adapters.hf_trainer, zeroplan.adapters.deepspeed_adapter). Buckets come from zeroplan.core.tuning; a
config is read back by zeroplan.core.config_reader. Pure Python: no DeepSpeed import here (see
zeroplan.adapters.deepspeed_adapter for DeepSpeed's own validation).
"""

from __future__ import annotations

import json
from typing import Any

from zeroplan.core.errors import InvalidInput
from zeroplan.core.plan import Plan, TrainShape
from zeroplan.core.profiles import ModelProfile, load_model
from zeroplan.core.tuning import max_reuse_distance, tuned_plan

FLAVOURS = ("concrete", "hf")
OPTIMIZERS = ("adamw", "client")
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
STEPS_PER_PRINT = 2000
NVME_PATH_PLACEHOLDER = "/local_nvme"


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


