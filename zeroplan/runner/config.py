"""The DeepSpeed config a run trains under: zeroplan.core.dsconfig.render's concrete flavour, or, while
that module is not importable, a minimal local config (FALLBACK_NOTE says which was used)."""

from __future__ import annotations

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
