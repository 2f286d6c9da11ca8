"""The training stacks a plan can be for, what each can execute, and its arguments for a plan.

A stack is the program that runs the plan: InternVL's own fine-tune script (`internvl`, the
default: what InternVL users train with), a generic HF Trainer script on transformers' native
InternVL class (`hf`, bundled as zeroplan.runner.hf_trainer), or zeroplan's bundled runner with its
fast recipe (`zeroplan`). Each is data under zeroplan/profiles/trainers/ (its capabilities and,
for InternVL's script, every flag with the source line it comes from). The planner keeps only
the candidates a stack can execute (`checkpoint_options`, `allows`), and `trainer_args` writes
the plan as that stack's command-line arguments. Pure: filling "auto" and checking the arguments
against the config is transformers' job (zeroplan.adapters.hf_trainer).
"""

from __future__ import annotations

import shlex
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zeroplan.core.errors import InvalidInput
from zeroplan.core.launch import deepspeed_line, srun_line, srun_torchrun_line, torchrun_line
from zeroplan.core.plan import Plan, TrainShape
from zeroplan.core.profiles import ModelProfile
from zeroplan.core.run import RunSpec

STACKS = ("internvl", "hf", "zeroplan")
DEFAULT_STACK = "internvl"
TRAINERS_DIR = Path(__file__).resolve().parent.parent / "profiles" / "trainers"
OUTPUT_DIR = "${OUTPUT_DIR:-work_dirs/zeroplan}"
META_PATH = "${META_PATH:-shell/data/internvl_1_2_finetune_custom.json}"
MAX_STEPS = "${MAX_STEPS:-1000}"
WEIGHT_DECAY = 0.05  # InternVL's scripts and dsconfig.render's default
IMAGE_SIZE = 448
# InternVL's conversation template for the 2.5 and 3.0 chat models (its shell scripts); older
# families keep the script's default.
CONV_STYLE = {"InternVL2.5": "internvl2_5", "InternVL3": "internvl2_5"}


@dataclass(frozen=True)
class TrainerStack:
    """One training program and what it can execute (read from profiles/trainers/NAME.toml)."""

    name: str
    title: str
    entry: tuple[str, ...]
    cwd: str
    environment: str
    model_path: str
    config_flavour: str
    launcher_variable: bool
    compiled_layers: bool
    fused_loss: bool
    partial_checkpointing: bool
    optimizer_groups: bool
    vision_always_checkpointed: bool
    packing: bool
    lora_rank_flag: str
    data: dict[str, Any]

    def checkpoint_options(self, num_layers: int, partial: tuple[int, ...] = ()) -> tuple[tuple[bool, int | None], ...]:
        """(grad_ckpt, ckpt_layers) pairs the stack can run: off and all, and the partial
        counts where it can checkpoint only some decoder layers. Where the vision tower is always
        checkpointed (InternVL's script), "off" means its LLM layers only: grad_ckpt on, 0 layers."""
        off = (True, 0) if self.vision_always_checkpointed else (False, None)
        middle = tuple((True, count) for count in partial) if self.partial_checkpointing else ()
        return (off, *middle, (True, None))

    def allows(self, shape: TrainShape, plan: Plan) -> str:
        """Why the stack cannot run this shape and plan ("" when it can)."""
        if shape.compiled and not self.compiled_layers:
            return f"the {self.name} stack does not compile layers"
        if shape.kernels != "eager" and not self.fused_loss:
            return f"the {self.name} stack has no fused loss"
        if shape.packed and not self.packing:
            return f"the {self.name} stack does not pack samples"
        if plan.optimizer_group_elems and not self.optimizer_groups:
            return f"the {self.name} stack cannot group the optimizer's parameters"
        if shape.grad_ckpt and shape.ckpt_layers not in (None, 0) and not self.partial_checkpointing:
            return f"the {self.name} stack checkpoints every decoder layer or none"
        if not shape.grad_ckpt and self.vision_always_checkpointed:
            return f"the {self.name} stack always checkpoints the vision tower"
        return ""

    @property
    def script_flags(self) -> frozenset[str]:
        """The flags the program's own argument dataclasses take (besides TrainingArguments')."""
        return frozenset(self.data["stack"].get("script_flags", ()))


def load_stack(name: str) -> TrainerStack:
    """The stack by name; an unknown name raises InvalidInput naming the accepted ones."""
    if name not in STACKS:
        raise InvalidInput(f"--trainer must be one of {', '.join(STACKS)}, got {name!r}")
    data = tomllib.loads((TRAINERS_DIR / f"{name}.toml").read_text(encoding="utf-8"))
    stack = data["stack"]
    return TrainerStack(
        name=stack["name"], title=stack["title"], entry=tuple(stack["entry"]), cwd=stack["cwd"],
        environment=stack["environment"], model_path=stack["model_path"], config_flavour=stack["config_flavour"],
        launcher_variable=stack["launcher_variable"], compiled_layers=stack["compiled_layers"],
        fused_loss=stack["fused_loss"], partial_checkpointing=stack["partial_checkpointing"],
        optimizer_groups=stack["optimizer_groups"], vision_always_checkpointed=stack["vision_always_checkpointed"],
        packing=stack["packing"], lora_rank_flag=stack["lora_rank_flag"], data=data)


def _flag(value: Any) -> str:
    """A value as HfArgumentParser reads it (bools as True/False)."""
    if isinstance(value, bool):
        return "True" if value else "False"
    return str(value)


def _pairs(items: list[tuple[str, Any]]) -> list[str]:
    out: list[str] = []
    for name, value in items:
        out += [f"--{name}", _flag(value)]
    return out


def _training_args(micro_batch: int, accumulation: int, lr: float, config_path: str) -> list[tuple[str, Any]]:
    """TrainingArguments every HF stack gets: the plan's batch, precision and optimizer values
    (the config holds them as "auto"), and InternVL's scripts' schedule and saving."""
    return [("per_device_train_batch_size", micro_batch), ("gradient_accumulation_steps", accumulation),
            ("learning_rate", lr), ("weight_decay", WEIGHT_DECAY), ("bf16", True),
            ("lr_scheduler_type", "cosine"), ("logging_steps", 1), ("save_strategy", "steps"),
            ("save_steps", 200), ("save_total_limit", 1), ("do_train", True), ("output_dir", OUTPUT_DIR),
            ("deepspeed", config_path)]


def _internvl_args(stack: TrainerStack, profile: ModelProfile, shape: TrainShape) -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = [("model_name_or_path", stack.model_path.format(name=profile.name))]
    if profile.family in CONV_STYLE:
        items.append(("conv_style", CONV_STYLE[profile.family]))
    items += [("meta_path", META_PATH), ("force_image_size", IMAGE_SIZE),
              ("down_sample_ratio", profile.downsample_ratio),
              ("freeze_llm", not shape.trains("llm") or shape.lora_rank > 0),
              ("freeze_backbone", not shape.trains("vision")), ("freeze_mlp", not shape.trains("projector")),
              ("grad_checkpoint", shape.llm_ckpt_layers(profile.llm.num_layers) > 0),
              ("max_seq_length", shape.seq_len), ("dynamic_image_size", shape.tiles > 1),
              ("use_thumbnail", shape.tiles > 1), ("max_dynamic_patch", max(1, shape.tiles - 1))]
    if shape.lora_rank:
        items.append(("use_llm_lora", shape.lora_rank))
    if shape.packed:
        items += [("use_packed_ds", True), ("max_packed_tokens", shape.seq_len), ("max_steps", MAX_STEPS)]
    else:
        items.append(("num_train_epochs", 1))
    items += [("dataloader_num_workers", 4), ("report_to", "tensorboard")]
    return items


def _hf_args(stack: TrainerStack, profile: ModelProfile, shape: TrainShape) -> list[tuple[str, Any]]:
    frozen = ",".join(tower for tower in ("vision", "projector", "llm") if not shape.trains(tower))
    items: list[tuple[str, Any]] = [("model_name_or_path", stack.model_path.format(name=profile.name)),
                                    ("seq_len", shape.seq_len), ("tiles", shape.tiles)]
    if frozen:
        items.append(("freeze", frozen))
    if shape.lora_rank:
        items.append(("lora_rank", shape.lora_rank))
    items += [("gradient_checkpointing", shape.grad_ckpt), ("max_steps", MAX_STEPS), ("warmup_steps", 0.03),
              ("report_to", "none")]
    return items


def trainer_args(stack: TrainerStack, profile: ModelProfile, shape: TrainShape, plan: Plan, accumulation: int,
                 config_path: str, lr: float = 2e-5) -> list[str]:
    """The plan as the stack's command-line arguments: per-device batch, accumulation,
    checkpointing, freezes, LoRA, bf16, learning rate and --deepspeed. Values of the form
    ${NAME:-default} are for the user's shell (data, output folder, step count). The zeroplan
    stack reads a RunSpec instead and has none. Raises InvalidInput when the stack cannot run it."""
    why = stack.allows(shape, plan)
    if why:
        raise InvalidInput(why)
    if stack.name == "zeroplan":
        return []
    specific = _internvl_args(stack, profile, shape) if stack.name == "internvl" else _hf_args(stack, profile, shape)
    return _pairs(specific + _training_args(shape.micro_batch, accumulation, lr, config_path))


def launcher_env(stack: TrainerStack, launcher: str) -> str:
    """The environment the stack's script needs under a launcher: InternVL's init_dist takes the
    slurm path unless LAUNCHER says otherwise (pytorch reads the RANK torchrun and the deepspeed
    launcher set)."""
    if not stack.launcher_variable:
        return ""
    return "LAUNCHER=slurm" if launcher == "srun" else "LAUNCHER=pytorch"


def shell_defaults(argv: list[str]) -> list[str]:
    """The arguments as the shell would pass them with none of the ${NAME:-default} variables set
    (for checking a line without running it)."""
    out = []
    for part in argv:
        if part.startswith("${") and part.endswith("}") and ":-" in part:
            part = part[2:-1].split(":-", 1)[1]
        out.append(part)
    return out


def stack_launch_lines(stack: TrainerStack, plan: Plan, args: list[str], config_path: str,
                       spec_path: str = "run.json") -> dict[str, str]:
    """deepspeed, torchrun and srun lines that start the stack's program with `args`: InternVL's
    script with its LAUNCHER (pytorch under the first two, slurm under srun, one task per GPU);
    the other stacks under torchrun (one per node under srun). zeroplan's runner reads its
    RunSpec from `spec_path` and writes its measurements beside it."""
    if stack.name == "zeroplan":
        args, config_path = ["--spec", spec_path, "--result", "result.json"], ""
    return {
        "deepspeed": deepspeed_line(plan, stack.entry, config_path, args, launcher_env(stack, "deepspeed")),
        "torchrun": torchrun_line(plan, stack.entry, config_path, args, launcher_env(stack, "torchrun")),
        "srun": (srun_line(plan, stack.entry, config_path, args, launcher_env(stack, "srun"))
                 if stack.launcher_variable else srun_torchrun_line(plan, stack.entry, config_path, args)),
    }


def check_stack_options(stack: TrainerStack, *, packed: bool, pad_vocab: int) -> None:
    """Refuse planning options the stack cannot execute, naming the stack that can."""
    if packed and not stack.packing:
        raise InvalidInput(f"--packed: the {stack.name} stack does not pack samples (use --trainer internvl or zeroplan)")
    if pad_vocab != 1 and stack.name != "zeroplan":
        raise InvalidInput(f"--pad-vocab: the {stack.name} stack does not pad the vocabulary (use --trainer zeroplan)")


def run_spec(model: str, candidate, pad_vocab: int = 1) -> RunSpec:
    """The RunSpec zeroplan's runner executes for a planner candidate (the zeroplan stack)."""
    shape, plan = candidate.shape, candidate.plan
    return RunSpec(model=model, stage=plan.stage, micro_batch=shape.micro_batch, seq_len=shape.seq_len,
                   tiles=shape.tiles, grad_ckpt=shape.grad_ckpt, frozen=tuple(shape.frozen),
                   lora_rank=shape.lora_rank, offload_optimizer=plan.offload_optimizer,
                   offload_params=plan.offload_params, packed=shape.packed,
                   attn_implementation="varlen" if shape.packed else "sdpa", world_size=plan.world_size,
                   kernels=shape.kernels, compile=shape.compiled, gradient_accumulation=candidate.gradient_accumulation,
                   vocab_multiple=pad_vocab, ckpt_layers=shape.ckpt_layers,
                   optimizer_group_elems=plan.optimizer_group_elems)


def script_arguments(text: str) -> list[str]:
    """The training script's arguments from `text`: either the arguments alone or a whole launch
    line (environment, launcher and its options, then `script.py` or `-m module`), as the shell
    splits it. Raises InvalidInput when the text does not split (an unclosed quote)."""
    try:
        parts = shlex.split(text)
    except ValueError as error:
        raise InvalidInput(f"--trainer-args does not split as a shell line: {error}") from None
    for index, part in enumerate(parts):
        if part.endswith(".py"):
            return parts[index + 1:]
        if part in ("-m", "--module") and index + 1 < len(parts) and index > 0:
            return parts[index + 2:]
    return parts


def validate_command(stack: TrainerStack, model: str, gpu: str, shape: TrainShape, plan: Plan, config_path: str,
                     args: list[str], spec_path: str = "run.json") -> str:
    """The `zeroplan validate` line that checks the written config with the printed arguments
    through transformers' HfTrainerDeepSpeedConfig (what the Trainer runs at start-up) and
    predicts the plan's memory again from them (for the zeroplan stack, from the RunSpec its
    runner line names)."""
    parts = ["zeroplan", "validate", config_path, "--model", model, "--gpu", gpu,
             "--nodes", str(plan.nodes), "--gpus-per-node", str(plan.gpus_per_node),
             "--seq-len", str(shape.seq_len), "--tiles", str(shape.tiles)]
    for tower in sorted(shape.frozen):
        parts += ["--freeze", tower]
    if shape.lora_rank:
        parts += ["--lora-rank", str(shape.lora_rank)]
    parts += ["--trainer", stack.name, "--trainer-args", " ".join(args) if args else f"--spec {spec_path}"]
    return shlex.join(parts)
