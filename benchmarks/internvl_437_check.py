"""Cross-check the `internvl` stack's printed torchrun lines against InternVL's own runtime,
transformers 4.37.2 (its pin), before anyone queues a job with them.

For a spread of models, GPU counts, freezes and LoRA it plans as `zeroplan recommend` does (the
pure core), takes the printed torchrun line and the written "hf" config, and then does what
InternVL's internvl_chat_finetune.py does with them under the installed transformers:

  1. HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))
     .parse_args_into_dataclasses(argv) -- strict, as the script parses: an unknown flag raises;
  2. HfTrainerDeepSpeedConfig.trainer_config_process at the plan's world size (what
     TrainingArguments.__post_init__ runs), then trainer_config_finalize with a model config that
     has no hidden_size (InternVLChatConfig has none), as Trainer.train() runs it.

It passes when every line parses, nothing is left "auto", no mismatch is raised, and the parsed
arguments are the plan (micro-batch, accumulation, LLM checkpointing, freezes, LoRA, tiles).
InternVL's two argument dataclasses are reproduced from the recorded flag data: the names are the
stack's script_flags (zeroplan/profiles/trainers/internvl.toml), the types and defaults those of
internvl_chat_finetune.py at the commit recorded there.

    PYTHONPATH=$PWD /path/to/internvl-env/bin/python benchmarks/internvl_437_check.py

Exit status 0 when every case passes, 1 otherwise.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import tomllib
from types import SimpleNamespace
from typing import Optional

import transformers
from transformers import HfArgumentParser, TrainingArguments
from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig, unset_hf_deepspeed_config

from zeroplan.core.dsconfig import auto_fields, render
from zeroplan.core.plan import Plan, TrainShape
from zeroplan.core.planner import recommend
from zeroplan.core.profiles import load_gpu, load_model
from zeroplan.core.trainers import TRAINERS_DIR, load_stack, script_arguments, shell_defaults, stack_launch_lines, \
    trainer_args

# (type, default) of each field of internvl_chat_finetune.py's ModelArguments (L88-159) and
# DataTrainingArguments (L163-266) at the commit internvl.toml records.
MODEL_FIELDS = {
    "model_name_or_path": (Optional[str], None), "vision_path": (Optional[str], None),
    "llm_path": (Optional[str], None), "mlp_path": (Optional[str], None), "freeze_llm": (bool, False),
    "freeze_backbone": (bool, False), "freeze_mlp": (bool, False), "unfreeze_vit_layers": (int, 0),
    "vision_select_layer": (int, -1), "use_backbone_lora": (int, 0), "use_llm_lora": (int, 0),
    "unfreeze_lm_head": (bool, False), "grad_checkpoint": (bool, True), "drop_path_rate": (float, 0.0),
    "ps_version": (str, "v2"), "use_fast_tokenizer": (bool, False), "use_liger": (bool, False),
}
DATA_FIELDS = {
    "max_seq_length": (int, 8192), "force_image_size": (int, 448), "down_sample_ratio": (float, 0.5),
    "pad2square": (bool, False), "conv_style": (str, "internlm2-chat"), "meta_path": (Optional[str], None),
    "use_data_resampling": (bool, False), "dynamic_image_size": (bool, False), "use_thumbnail": (bool, False),
    "min_dynamic_patch": (int, 1), "max_dynamic_patch": (int, 12), "min_num_frame": (int, 8),
    "max_num_frame": (int, 32), "normalize_type": (str, "imagenet"), "use_packed_ds": (bool, False),
    "num_images_expected": (int, 40), "max_packed_tokens": (int, 8192), "max_buffer_size": (int, 20),
    "log_freq": (int, 1000), "strict_mode": (bool, True), "replacement": (bool, False),
    "allow_overflow": (bool, False), "loss_reduction": (str, "token"), "loss_reduction_all_gather": (bool, False),
}
CASES = [  # model, GPUs, frozen towers, LoRA rank, packed
    ("1b", 8, (), 0, False), ("2b", 16, ("vision",), 0, False), ("4b", 8, ("vision",), 0, False),
    ("8b", 8, (), 0, False), ("8b", 2, ("vision", "projector", "llm"), 16, False),
    ("26b", 32, ("vision",), 0, False), ("40b", 16, (), 0, False), ("8b", 16, ("vision",), 0, True),
]
CONFIG_PATH = "ds_config.json"


def _dataclass(name: str, fields: dict) -> type:
    return dataclasses.make_dataclass(name, [(key, kind, dataclasses.field(default=default))
                                             for key, (kind, default) in fields.items()])


ModelArguments = _dataclass("ModelArguments", MODEL_FIELDS)
DataTrainingArguments = _dataclass("DataTrainingArguments", DATA_FIELDS)


class _WorldSize:
    """TrainingArguments as parsed, at the plan's world size (one process here sees 1)."""

    def __init__(self, args, world_size: int):
        self._args, self.world_size = args, world_size

    def __getattr__(self, name):
        return getattr(self._args, name)


def check_case(model: str, gpus: int, frozen: tuple, lora: int, packed: bool) -> list[str]:
    """What is wrong with the case's printed line under the installed transformers (empty: nothing)."""
    stack, profile = load_stack("internvl"), load_model(model)
    shape = TrainShape(micro_batch=1, seq_len=8192, tiles=7, frozen=frozenset(frozen), lora_rank=lora, packed=packed)
    best = recommend(profile, shape, Plan(gpus_per_node=min(gpus, 8), nodes=max(1, gpus // 8)),
                     load_gpu("h100-80gb"), 128, stack=stack).best
    args = trainer_args(stack, profile, best.shape, best.plan, best.gradient_accumulation, CONFIG_PATH)
    line = stack_launch_lines(stack, best.plan, args, CONFIG_PATH)["torchrun"]
    argv = shell_defaults(script_arguments(line))
    at = argv.index("--deepspeed")
    del argv[at:at + 2]  # replayed below at the plan's world size
    try:  # --use_cpu only gets a GPU-less machine past the bf16 device check
        model_args, data_args, training = HfArgumentParser(
            (ModelArguments, DataTrainingArguments, TrainingArguments)).parse_args_into_dataclasses(
            argv + ["--use_cpu", "True"])
    except (ValueError, SystemExit) as error:
        return [f"does not parse: {error}"]
    config = render(profile, best.shape, best.plan, best.shape.micro_batch, best.gradient_accumulation, flavour="hf")
    unset_hf_deepspeed_config()
    hf = HfTrainerDeepSpeedConfig(copy.deepcopy(config))
    proxy = _WorldSize(training, best.plan.world_size)
    problems = []
    try:
        hf.trainer_config_process(proxy)
        hf.trainer_config_finalize(proxy, SimpleNamespace(config=SimpleNamespace()), 1000)
    except ValueError as error:
        problems.append(" ".join(str(error).split()))
    finally:
        unset_hf_deepspeed_config()
    layers = profile.llm.num_layers
    expected = {
        "auto left": (auto_fields(hf.config), []),
        "train_batch_size": (hf.config.get("train_batch_size"), 128),
        "per_device_train_batch_size": (training.per_device_train_batch_size, best.shape.micro_batch),
        "gradient_accumulation_steps": (training.gradient_accumulation_steps, best.gradient_accumulation),
        "grad_checkpoint": (model_args.grad_checkpoint, best.shape.llm_ckpt_layers(layers) == layers),
        "freeze_backbone": (model_args.freeze_backbone, "vision" in frozen),
        "freeze_mlp": (model_args.freeze_mlp, "projector" in frozen),
        "freeze_llm": (model_args.freeze_llm, "llm" in frozen or lora > 0),
        "use_llm_lora": (model_args.use_llm_lora, lora),
        "max_dynamic_patch": (data_args.max_dynamic_patch, best.shape.tiles - 1),
        "use_packed_ds": (data_args.use_packed_ds, packed),
        "bf16": (training.bf16, True),
    }
    problems += [f"{key}: got {got!r}, the plan has {want!r}" for key, (got, want) in expected.items() if got != want]
    return problems


def main() -> int:
    """Check every case; print one line each and a verdict."""
    recorded = tomllib.loads((TRAINERS_DIR / "internvl.toml").read_text(encoding="utf-8"))["stack"]["script_flags"]
    reproduced = [*MODEL_FIELDS, *DATA_FIELDS]
    if sorted(recorded) != sorted(reproduced):
        print(f"the reproduced dataclasses differ from internvl.toml's script_flags: "
              f"{sorted(set(recorded) ^ set(reproduced))}")
        return 1
    print(f"transformers {transformers.__version__}")
    failed = 0
    for case in CASES:
        problems = check_case(*case)
        model, gpus, frozen, lora, packed = case
        label = f"{model} on {gpus} GPUs, frozen {'+'.join(frozen) or 'none'}, LoRA {lora}{', packed' if packed else ''}"
        print(f"{'ok  ' if not problems else 'FAIL'} {label}" + "".join(f"\n     {p}" for p in problems))
        failed += bool(problems)
    print(f"{len(CASES) - failed} of {len(CASES)} cases pass")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
