"""DeepSpeed adapter: DeepSpeed's own config validation and its model-state memory estimators.

DeepSpeed is imported inside the functions, so importing this module costs nothing and the
planner still answers where DeepSpeed is not installed.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
import os
import sys
from types import SimpleNamespace
from typing import Any

from zeroplan.core.dsconfig import ADAM_BETAS, ADAM_EPS, auto_fields
from zeroplan.core.errors import InvalidConfig, MissingDependency
from zeroplan.core.params import count_parameters, lora_tensors
from zeroplan.core.plan import Plan, TrainShape
from zeroplan.core.profiles import ModelProfile

# Placeholder hidden size for the HF Trainer's bucket rules while validating: any positive size
# gives values DeepSpeed accepts, and the real one depends on the model, not the config.
_PLACEHOLDER_HIDDEN_SIZE = 4096


def _import_deepspeed(module_name: str):
    """Import a DeepSpeed module without its import-time log lines ("Setting accelerator to
    CPU") reaching stdout, where they would corrupt `--json` output. DeepSpeed's log handler
    binds sys.stdout when it is created, so the first import runs with stdout captured and the
    handler is then pointed back at the real stdout: later DeepSpeed logging is untouched."""
    if "deepspeed" in sys.modules:
        return importlib.import_module(module_name)
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        module = importlib.import_module(module_name)
    for handler in logging.getLogger("DeepSpeed").handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is captured:
            handler.setStream(sys.stdout)
    return module


def _deepspeed_config_class():
    try:
        return _import_deepspeed("deepspeed.runtime.config").DeepSpeedConfig
    except ImportError as error:
        raise MissingDependency(f"deepspeed is not importable ({error}); install zeroplan[train]") from None


def _deepspeed_config_error() -> type[Exception]:
    """DeepSpeed's own config error class (ValueError where this DeepSpeed has none)."""
    return getattr(_import_deepspeed("deepspeed.runtime.config"), "DeepSpeedConfigError", ValueError)


def _run_quietly(function, *args):
    """Call DeepSpeed with its logger raised to ERROR (it logs every config it parses at INFO),
    restoring the level afterwards so a training run's logging is untouched."""
    logger = logging.getLogger("DeepSpeed")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return function(*args)
    finally:
        logger.setLevel(level)


def _one_line_reason(error: Exception) -> str:
    """A pydantic ValidationError as 'section.field: message'; anything else as its first line."""
    errors = getattr(error, "errors", None)
    if callable(errors):
        try:
            first = errors()[0]
            where = ".".join(str(part) for part in first.get("loc", ()))
            model = getattr(error, "title", "")
            return f"{model} {where}: {first.get('msg', '')}".strip()
        except (IndexError, TypeError, AttributeError):
            pass
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _per_rank_batch(config: dict[str, Any], world_size: int | None) -> dict[str, Any]:
    """DeepSpeedConfig without torch.distributed assumes one rank. Check DeepSpeed's batch rule
    `train_batch == micro × accumulation × world` here on the real world size (or, with no world
    size, that one exists), then hand DeepSpeed the one-rank equivalent so its own checks pass or
    fail on everything else."""
    total = config.get("train_batch_size")
    micro, accum = config.get("train_micro_batch_size_per_gpu"), config.get("gradient_accumulation_steps", 1)
    if not _positive_int(total):
        return config
    if _positive_int(micro) and _positive_int(accum):
        if world_size is None and total % (micro * accum) == 0:
            return {**config, "train_batch_size": micro * accum}
        if world_size is not None and total == micro * accum * world_size:
            return {**config, "train_batch_size": micro * accum}
        gpus = f"{world_size} GPUs" if world_size is not None else "any number of GPUs"
        raise InvalidConfig(f"train_batch_size {total} is not train_micro_batch_size_per_gpu × "
                            f"gradient_accumulation_steps × GPUs ({micro} × {accum} × {gpus})")
    if world_size is None:
        return config
    if total % world_size:
        raise InvalidConfig(f"train_batch_size {total} does not split over {world_size} GPUs")
    return {**config, "train_batch_size": total // world_size}


def _given_or_one(config: dict[str, Any], key: str) -> int:
    """The config's own batch number, so the placeholder for an "auto" beside it stays consistent."""
    value = config.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 1


def _trainer_arguments(config: dict[str, Any], world_size: int) -> SimpleNamespace:
    """The TrainingArguments fields HfTrainerDeepSpeedConfig reads, taken from the config's own
    concrete values where it has them (so nothing it states is contradicted) and transformers'
    defaults elsewhere: placeholders for DeepSpeed's schema check, not the user's arguments."""
    optimizer = (config.get("optimizer") or {}).get("params") or {}

    def number(value, default):
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else default

    betas = optimizer.get("betas")
    betas = betas if isinstance(betas, list) and len(betas) == 2 else list(ADAM_BETAS)
    bf16 = (config.get("bf16") or {}).get("enabled", "auto")
    return SimpleNamespace(
        world_size=world_size, per_device_train_batch_size=_given_or_one(config, "train_micro_batch_size_per_gpu"),
        gradient_accumulation_steps=_given_or_one(config, "gradient_accumulation_steps"),
        max_grad_norm=number(config.get("gradient_clipping"), 1.0), learning_rate=number(optimizer.get("lr"), 2e-5),
        adam_beta1=number(betas[0], ADAM_BETAS[0]), adam_beta2=number(betas[1], ADAM_BETAS[1]),
        adam_epsilon=number(optimizer.get("eps"), ADAM_EPS), weight_decay=number(optimizer.get("weight_decay"), 0.0),
        save_on_each_node=False, fp16=False, fp16_full_eval=False, bf16=bf16 is not False, bf16_full_eval=False,
        get_warmup_steps=lambda steps: 0)


def fill_auto_as_trainer(config: dict[str, Any], world_size: int = 1) -> dict[str, Any]:
    """A copy of the config with its "auto" values filled by transformers' own
    HfTrainerDeepSpeedConfig (trainer_config_process, then trainer_config_finalize with a
    placeholder hidden size), the way the HF Trainer fills them; an "auto" it does not fill raises
    InvalidConfig, as DeepSpeed would fail on it under the Trainer too."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig, unset_hf_deepspeed_config
    except ImportError as error:
        raise MissingDependency(f"transformers is needed to fill \"auto\" values ({error})") from None
    args = _trainer_arguments(config, world_size)
    hf = HfTrainerDeepSpeedConfig(json.loads(json.dumps(config)))
    try:
        hf.trainer_config_process(args)
        # Placeholders may disagree with a concrete value (train_batch_size at another world
        # size): DeepSpeed's own batch check below decides that, not the placeholder arguments.
        hf.mismatches = []
        model = SimpleNamespace(config=SimpleNamespace(hidden_size=_PLACEHOLDER_HIDDEN_SIZE))
        hf.trainer_config_finalize(args, model, num_training_steps=1)
    finally:
        unset_hf_deepspeed_config()
    filled = hf.config
    left = auto_fields(filled)
    if left:
        raise InvalidConfig(f"'{left[0]}' is \"auto\" but the HF Trainer does not fill it; give a value")
    return filled


def validate_config(config: dict, world_size: int | None = None) -> list[str]:
    """Run DeepSpeed's own DeepSpeedConfig (its pydantic sections and batch checks) on the config,
    without initializing torch.distributed, and return the "auto" field paths.

    "auto" values are filled by transformers' HfTrainerDeepSpeedConfig (fill_auto_as_trainer) from
    placeholder arguments before DeepSpeed sees them; an "auto" the Trainer does not fill is
    rejected. Raises InvalidConfig with one line when DeepSpeed rejects the config."""
    if not isinstance(config, dict):
        raise InvalidConfig("a DeepSpeed config must be a JSON object")
    if world_size is not None and (isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1):
        raise InvalidConfig(f"world size must be a positive whole number, got {world_size!r}")
    autos = auto_fields(config)
    # transformers is imported only for a config with "auto" values (a concrete one needs none).
    filled = _per_rank_batch(fill_auto_as_trainer(config, world_size or 1) if autos else config, world_size)
    deepspeed_config = _deepspeed_config_class()
    # DeepSpeedConfigError derives from Exception, not ValueError: sections DeepSpeed removed
    # (elasticity, sparse_attention, ...) and some field checks raise it.
    rejections = (ValueError, TypeError, KeyError, AssertionError, AttributeError, _deepspeed_config_error())
    try:
        _run_quietly(deepspeed_config, json.loads(json.dumps(filled)))
    except rejections as error:
        raise InvalidConfig(f"DeepSpeed rejects the config: {_one_line_reason(error)}") from None
    return autos


def _trainable_params(profile: ModelProfile, shape: TrainShape) -> int:
    counts = count_parameters(profile)
    trained = sum(getattr(counts, tower) for tower in ("vision", "projector", "llm") if shape.trains(tower))
    return trained + sum(t.numel for t in lora_tensors(profile, shape.lora_rank))


def estimator_bytes(profile: ModelProfile, shape: TrainShape, plan: Plan) -> dict[str, Any]:
    """DeepSpeed's own model-state estimates (estimate_zero2_model_states_mem_needs and
    estimate_zero3_model_states_mem_needs, called, not re-implemented) for this model and cluster.

    Where DeepSpeed is not importable, zero2 / zero3 / for_stage are None and `reason` says why
    (the planner still answers without them). The formulas assume
    every parameter they are given is trained, so they get the trainable count (frozen towers'
    weights are not in them); the ZeRO-3 one also gets the largest module, which is gathered
    whole. CPU bytes are per node. `for_stage` picks the one matching the plan; DeepSpeed has no
    stage 0/1 estimator, so those use the ZeRO-2 formula (an under-estimate for stage 0/1, where
    gradients are not partitioned), said in `note`."""
    trainable = _trainable_params(profile, shape)
    largest_layer = count_parameters(profile).largest_layer
    offload_optimizer, offload_params = plan.offload_optimizer != "none", plan.offload_params != "none"
    request = {"total_params": trainable, "largest_layer_params": largest_layer, "gpus_per_node": plan.gpus_per_node,
               "nodes": plan.nodes, "cpu_offload": offload_optimizer, "cpu_offload_params": offload_params}
    from zeroplan.adapters import cache

    estimates = cache.recall_estimates(request)  # the same numbers from this DeepSpeed before
    if estimates is None:
        try:
            estimates = _deepspeed_estimates(**request)
        except ImportError as error:
            return {"zero2": None, "zero3": None, "for_stage": None,
                    "reason": f"deepspeed is not importable ({error}); its estimators were skipped"}
        cache.remember_estimates(request, estimates)
    estimates = {"zero2": estimates["zero2"], "zero3": estimates["zero3"], "total_params": trainable,
                 "largest_layer_params": largest_layer}
    formula = "zero3" if plan.stage == 3 else "zero2"
    estimates["for_stage"] = {**estimates[formula], "formula": f"estimate_{formula}_model_states_mem_needs"}
    if plan.stage < 2:
        kept_whole = "16-bit gradients" if plan.stage == 1 else "gradients, fp32 weights and optimizer states"
        estimates["for_stage"]["note"] = (f"DeepSpeed has no ZeRO-{plan.stage} estimator; this is its ZeRO-2 "
                                          f"formula, which partitions the {kept_whole} that stage {plan.stage} "
                                          "keeps whole on every GPU (an under-estimate)")
    return estimates


def _deepspeed_estimates(total_params: int, largest_layer_params: int, gpus_per_node: int, nodes: int,
                         cpu_offload: bool, cpu_offload_params: bool) -> dict[str, dict[str, int]]:
    """DeepSpeed's estimate_zero2/3_model_states_mem_needs themselves (raises ImportError without DeepSpeed)."""
    estimate_zero3_model_states_mem_needs = _import_deepspeed(
        "deepspeed.runtime.zero.stage3").estimate_zero3_model_states_mem_needs
    estimate_zero2_model_states_mem_needs = _import_deepspeed(
        "deepspeed.runtime.zero.stage_1_and_2").estimate_zero2_model_states_mem_needs
    zero2_cpu, zero2_gpu = estimate_zero2_model_states_mem_needs(
        total_params=total_params, num_gpus_per_node=gpus_per_node, num_nodes=nodes, cpu_offload=cpu_offload)
    zero3_cpu, zero3_gpu, _ = estimate_zero3_model_states_mem_needs(
        total_params=total_params, largest_layer_params=largest_layer_params, num_gpus_per_node=gpus_per_node,
        num_nodes=nodes, cpu_offload=cpu_offload, cpu_offload_params=cpu_offload_params, zero_init=True)
    return {"zero2": {"gpu_bytes": int(zero2_gpu), "cpu_bytes": int(zero2_cpu)},
            "zero3": {"gpu_bytes": int(zero3_gpu), "cpu_bytes": int(zero3_cpu)}}


def estimator_quietly(profile: ModelProfile, shape: TrainShape, plan: Plan) -> dict[str, Any]:
    """estimator_bytes with DeepSpeed's import-time logging kept off stdout (a `--json` answer
    must be the only thing there)."""
    with contextlib.redirect_stdout(io.StringIO()):
        return estimator_bytes(profile, shape, plan)
