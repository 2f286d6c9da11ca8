"""The DeepSpeed config a run trains under: the spec's own config file with "auto" filled as the HF
Trainer fills it (user_config), else zeroplan.core.dsconfig.render's concrete flavour, or, while
that module is not importable, a minimal local config (FALLBACK_NOTE says which was used)."""

from __future__ import annotations

import json

from zeroplan.core.bounded import MAX_INPUT_BYTES, read_text_bounded
from zeroplan.core.errors import InvalidInput

FALLBACK_NOTE = "zeroplan.runner.config.fallback_config (zeroplan.core.dsconfig.render not importable)"


def fallback_config(plan, micro_batch: int, gradient_clipping: float = 1.0) -> dict:
    """A minimal concrete DeepSpeed config for the plan: bf16, ZeRO stage with the plan's buckets
    and offloads, no optimizer section (the runner passes a client optimizer)."""
    zero: dict = {"stage": plan.stage}
    if plan.stage >= 1:
        zero.update(reduce_bucket_size=plan.reduce_bucket_elems, allgather_bucket_size=plan.allgather_bucket_elems,
                    overlap_comm=plan.overlap_comm, contiguous_gradients=plan.contiguous_gradients,
                    reduce_scatter=True)
    if plan.stage == 3:
        zero.update(stage3_prefetch_bucket_size=plan.prefetch_bucket_elems,
                    stage3_max_live_parameters=plan.max_live_params,
                    stage3_param_persistence_threshold=plan.param_persistence_threshold,
                    sub_group_size=plan.sub_group_elems)
        zero.pop("allgather_bucket_size")
    if plan.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": plan.offload_optimizer, "pin_memory": True}
    if plan.offload_params != "none":
        zero["offload_param"] = {"device": plan.offload_params, "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro_batch * plan.world_size,
        "gradient_clipping": gradient_clipping,
        "bf16": {"enabled": True},
        "zero_optimization": zero,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def deepspeed_config(profile, shape, plan, micro_batch: int, lr: float, client_optimizer: bool,
                     gradient_accumulation: int = 1) -> tuple[dict, str]:
    """(config, where it came from). With a client optimizer the config has no optimizer section
    and allows it through ZeRO's untested-optimizer check; otherwise DeepSpeed builds AdamW
    (DeepSpeedCPUAdam under optimizer offload)."""
    try:
        from zeroplan.core.dsconfig import render
    except ImportError:
        render = None
    if render is not None:
        config = render(profile, shape, plan, micro_batch, gradient_accumulation, flavour="concrete", lr=lr,
                        optimizer="client" if client_optimizer else "adamw")
        source = "zeroplan.core.dsconfig.render"
    else:
        config = fallback_config(plan, micro_batch)
        config["gradient_accumulation_steps"] = gradient_accumulation
        config["train_batch_size"] = micro_batch * gradient_accumulation * plan.world_size
        if not client_optimizer:
            config["optimizer"] = {"type": "AdamW", "params": {"lr": lr, "betas": [0.9, 0.999], "eps": 1e-8,
                                                               "weight_decay": 0.05}}
        source = FALLBACK_NOTE
    if client_optimizer:
        config.pop("optimizer", None)
        config["zero_allow_untested_optimizer"] = True
    config.pop("scheduler", None)
    config["steps_per_print"] = 1 << 30
    return config, source


def _read_config(path: str) -> dict:
    text = read_text_bounded(path, MAX_INPUT_BYTES, "DeepSpeed config")
    try:
        config = json.loads(text)
    except (ValueError, RecursionError) as error:
        raise InvalidInput(f"DeepSpeed config {path} is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise InvalidInput(f"DeepSpeed config {path} must be a JSON object")
    return config


def user_config(spec, profile) -> tuple[dict, object]:
    """(the spec's `ds_config` with every "auto" filled, the Plan it describes). The "auto" values
    are filled by transformers' HfTrainerDeepSpeedConfig from the run's own arguments (micro-batch,
    accumulation, learning rate, bf16, clipping 1.0, weight decay 0.05) and the LLM's hidden size,
    as the HF Trainer fills them; the Plan is the config read back (its buckets as written). The
    config's stage and offloads must be the spec's, so the record never says one thing and runs
    another."""
    from zeroplan.adapters.hf_trainer import check
    from zeroplan.core.config_reader import plan_from_config

    raw = _read_config(spec.ds_config)
    base = spec.plan()
    hidden = profile.llm.hidden_size
    plan, _, _ = plan_from_config(raw, base.gpus_per_node, base.nodes, hidden_size=hidden,
                                  micro_batch=spec.micro_batch, gradient_accumulation=spec.gradient_accumulation)
    for name in ("stage", "offload_optimizer", "offload_params"):
        if getattr(plan, name) != getattr(spec, name):
            raise InvalidInput(f"{spec.ds_config} sets {name.replace('_', ' ')} {getattr(plan, name)}, the run "
                               f"{getattr(spec, name)}")
    argv = ["--output_dir", "zeroplan-run", "--per_device_train_batch_size", str(spec.micro_batch),
            "--gradient_accumulation_steps", str(spec.gradient_accumulation), "--learning_rate", repr(spec.lr),
            "--weight_decay", "0.05", "--max_grad_norm", "1.0", "--bf16", "True"]
    checked = check(raw, argv, plan.world_size, hidden_size=hidden)
    if checked.mismatches:
        raise InvalidInput(f"{spec.ds_config}: the HF Trainer would refuse it: {checked.mismatches[0]}")
    if checked.auto_left:
        raise InvalidInput(f"{spec.ds_config}: '{checked.auto_left[0]}' is \"auto\" but the HF Trainer does not fill it")
    return checked.config, plan


def run_config(spec, profile, shape, plan, client_optimizer: bool) -> tuple[dict, str]:
    """(config, where it came from) for the run: the spec's own config file when it names one,
    else zeroplan's rendering of `plan` (deepspeed_config). With a client optimizer the optimizer
    block goes, as in deepspeed_config: torch's fused AdamW keeps the same states as DeepSpeed's."""
    if not spec.ds_config:
        return deepspeed_config(profile, shape, plan, spec.micro_batch, spec.lr, client_optimizer,
                                spec.gradient_accumulation)
    config = user_config(spec, profile)[0]
    if client_optimizer:
        config.pop("optimizer", None)
        config["zero_allow_untested_optimizer"] = True
    config.pop("scheduler", None)
    config["steps_per_print"] = 1 << 30
    return config, f"{spec.ds_config} (\"auto\" filled by transformers' HfTrainerDeepSpeedConfig)"
