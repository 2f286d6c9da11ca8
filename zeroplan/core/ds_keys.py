"""The top-level keys of a DeepSpeed config that DeepSpeed reads, so `validate` can name the others.

DeepSpeed's config classes ignore a top-level key they do not read (a misspelt
`gradient_acumulation_steps` is dropped without a word, and the run trains with the default), and
DeepSpeed exposes no list of the keys it reads: `DeepSpeedConfig._initialize_params` and the
readers it calls take them one by one. The list below is those keys as DeepSpeed 0.19.8 reads them
(deepspeed/runtime/config.py, deepspeed/runtime/constants.py and the sub-config modules each key
opens: zero/config.py, activation_checkpointing/config.py, profiling/config.py,
monitor/config.py, comm/config.py, elasticity/constants.py, autotuning/constants.py,
compression/constants.py, runtime/data_pipeline/constants.py, ...); tests/test_validate_keys.py
checks every key still occurs in the installed DeepSpeed's source."""

from __future__ import annotations

import difflib

DEEPSPEED_VERSION = "0.19.8"
TOP_LEVEL_KEYS = frozenset("""
train_batch_size train_micro_batch_size_per_gpu gradient_accumulation_steps steps_per_print dump_state
optimizer scheduler zero_optimization zero_allow_untested_optimizer zero_force_ds_cpu_optimizer
fp16 bf16 bfloat16 amp torch_autocast data_types communication_data_type seq_parallel_communication_data_type
gradient_clipping gradient_predivide_factor prescale_gradients sparse_gradients disable_allgather
gradient_allreduce_op graph_harvesting activation_checkpointing flops_profiler tensorboard wandb csv_monitor
comet comms_logger wall_clock_breakdown memory_breakdown timers aio nebula checkpoint elasticity autotuning
pipeline sparse_attention quantize_training eigenvalue progressive_layer_drop curriculum_learning
data_efficiency compression_training hybrid_engine weight_quantization dataloader_drop_last
use_data_before_expert_parallelism use_node_local_storage compile vocabulary_size zenflow tensor_parallel
expert_parallel disable_python_gc legacy_fusion log_level lower_precision_safe_modules
managed_gradient_accumulation
""".split())


def unknown_top_level_keys(config: dict) -> list[str]:
    """The config's top-level keys DeepSpeed does not read, each with the nearest known key when
    one is close ('gradient_acumulation_steps (did you mean gradient_accumulation_steps?)')."""
    found = []
    for key in config:
        if key in TOP_LEVEL_KEYS:
            continue
        near = difflib.get_close_matches(str(key), TOP_LEVEL_KEYS, n=1, cutoff=0.8)
        found.append(f"{key} (did you mean {near[0]}?)" if near else str(key))
    return found
