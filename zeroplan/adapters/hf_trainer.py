"""transformers' own HF Trainer rules, run on a DeepSpeed config and a training script's arguments.

HfTrainerDeepSpeedConfig is what the HF Trainer runs on a `--deepspeed` config: it fills each
"auto" from TrainingArguments (trainer_config_process, at argument parsing) and the model and
step count (trainer_config_finalize, at the start of train()), and refuses to train when a
concrete value disagrees with an argument. `check` replays both offline, at the plan's world size
(a one-process TrainingArguments would see world size 1), so a mismatch is found before a job is
queued rather than after the model has loaded on every GPU.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from zeroplan.core.dsconfig import auto_fields
from zeroplan.core.errors import InvalidInput, MissingDependency
from zeroplan.core.trainers import shell_defaults

# The step count trainer_config_finalize fills scheduler totals from; zeroplan's configs have no
# scheduler block (the Trainer builds the schedule from its arguments), so its value is not used.
NUM_TRAINING_STEPS = 1000


@dataclass(frozen=True)
class TrainerCheck:
    """What the HF Trainer makes of a config and arguments: the config with "auto" filled, the
    mismatches it would refuse to train with (one line each), the "auto" fields left, and the
    parsed per-device batch, accumulation and checkpointing."""

    config: dict
    mismatches: tuple[str, ...]
    auto_left: tuple[str, ...]
    micro_batch: int
    gradient_accumulation: int
    learning_rate: float
    gradient_checkpointing: bool


class _WorldSize:
    """TrainingArguments as they are, except world_size: what torchrun or srun would give."""

    def __init__(self, args, world_size: int):
        self._args, self.world_size = args, world_size

    def __getattr__(self, name):
        return getattr(self._args, name)


def _transformers():
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        from transformers import HfArgumentParser, TrainingArguments
        from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig, unset_hf_deepspeed_config
    except ImportError as error:
        raise MissingDependency(f"transformers is needed to check trainer arguments ({error})") from None
    return HfArgumentParser, TrainingArguments, HfTrainerDeepSpeedConfig, unset_hf_deepspeed_config


def parse_training_args(argv: list[str], script_flags: frozenset[str] = frozenset()):
    """TrainingArguments from a command line's arguments, as HfArgumentParser reads them (shell
    variables at their defaults, --deepspeed left out: `check` replays it at the plan's world
    size). Flags the script's own dataclasses take (`script_flags`) are set aside; any other
    flag the parser does not know raises InvalidInput, as the script's parser would refuse it."""
    HfArgumentParser, TrainingArguments, _, _ = _transformers()
    argv = shell_defaults(list(argv))
    if "--deepspeed" in argv:
        at = argv.index("--deepspeed")
        del argv[at:at + 2]
    training, script = [], []
    index = 0
    while index < len(argv):
        part = argv[index]
        value = [argv[index + 1]] if index + 1 < len(argv) and not argv[index + 1].startswith("--") else []
        (script if part.removeprefix("--") in script_flags else training).extend([part, *value])
        index += 1 + len(value)
    parser = HfArgumentParser((TrainingArguments,))
    try:
        args, unknown = parser.parse_args_into_dataclasses(training + ["--use_cpu", "True"],
                                                           return_remaining_strings=True)
    except (ValueError, SystemExit) as error:
        raise InvalidInput(f"the trainer arguments do not parse: {str(error).splitlines()[0] if str(error) else error}"
                           ) from None
    if unknown:
        raise InvalidInput(f"the trainer would refuse unknown arguments: {' '.join(unknown)}")
    return args


def check(config: dict, argv: list[str], world_size: int, script_flags: frozenset[str] = frozenset(),
          num_training_steps: int = NUM_TRAINING_STEPS, hidden_size: int | None = None) -> TrainerCheck:
    """Run HfTrainerDeepSpeedConfig's trainer_config_process and trainer_config_finalize on the
    config with the arguments of `argv`, at `world_size`. By default the model is one whose config
    has no hidden size, like InternVL's InternVLChatConfig, so an "auto" bucket size is reported as
    the Trainer would refuse it there; `hidden_size` gives the model one (the Trainer then derives
    the "auto" buckets from it)."""
    _, _, HfTrainerDeepSpeedConfig, unset_hf_deepspeed_config = _transformers()
    args = parse_training_args(argv, script_flags)
    proxy = _WorldSize(args, world_size)
    hf = HfTrainerDeepSpeedConfig(copy.deepcopy(config))
    mismatches: list[str] = []
    try:
        hf.trainer_config_process(proxy)
        recorded = list(hf.mismatches)
        hf.mismatches = []
        model = SimpleNamespace(config=SimpleNamespace(**({} if hidden_size is None else {"hidden_size": hidden_size})))
        try:
            hf.trainer_config_finalize(proxy, model, num_training_steps)
        except ValueError as error:
            if not recorded:
                mismatches.append(" ".join(str(error).split()))
        mismatches = [line.removeprefix("- ").strip() for line in recorded] + mismatches
    finally:
        unset_hf_deepspeed_config()
    filled: dict[str, Any] = hf.config
    return TrainerCheck(config=filled, mismatches=tuple(mismatches), auto_left=tuple(auto_fields(filled)),
                        micro_batch=args.per_device_train_batch_size,
                        gradient_accumulation=args.gradient_accumulation_steps,
                        learning_rate=args.learning_rate, gradient_checkpointing=args.gradient_checkpointing)
