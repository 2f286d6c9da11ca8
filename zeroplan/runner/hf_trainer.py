"""The `hf` stack: transformers.Trainer on the native InternVL class, as `recommend --trainer hf` prints it.

    torchrun --nproc_per_node N -m zeroplan.runner.hf_trainer --model_name_or_path tiny ... --deepspeed ds.json

It is also the bundled runner's path for RunSpec.trainer == "hf" (zeroplan.runner.train calls
`train`): TrainingArguments come from the arguments `recommend --trainer hf` prints for the spec's
plan, parsed by HfArgumentParser exactly as the script parses them, and the DeepSpeed config is the
one it emits (the "hf" flavour, "auto" where the Trainer fills a value); transformers'
HfTrainerDeepSpeedConfig fills it. The model is the one the runner builds (runner/model.py), the
data the runner's (runner/data.py) as a torch Dataset and collator, and the measurements the
runner's (runner/measure.py) taken from a TrainerCallback, into the same result keys.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

from zeroplan.core.errors import InvalidInput
from zeroplan.core.run import RunSpec

# The key under which the collator hands a micro-batch's counts (no tensors) to the training step.
COUNTS = "zeroplan_counts"
CONFIG_SOURCE = "zeroplan.core.dsconfig.render (hf flavour), \"auto\" filled by transformers' HfTrainerDeepSpeedConfig"


@dataclass
class ScriptArguments:
    """The script's own arguments, beside transformers' TrainingArguments (the names are the hf
    stack's script_flags in zeroplan/profiles/trainers/hf.toml)."""

    model_name_or_path: str = field(default="tiny", metadata={"help": "a zeroplan profile name or a local checkpoint"})
    seq_len: int = field(default=4096, metadata={"help": "tokens per sample"})
    tiles: int = field(default=8, metadata={"help": "448px tiles per sample at most (thumbnail included)"})
    freeze: str = field(default="", metadata={"help": "comma-separated towers to freeze: vision, projector, llm"})
    lora_rank: int = field(default=0, metadata={"help": "LoRA rank on the LLM (0: off)"})
    dataset: str = field(default="", metadata={"help": "InternVL-style JSONL (empty: synthetic samples)"})
    result: str = field(default="", metadata={"help": "where rank 0 writes the measurements (JSON)"})


def _parser():
    from transformers import HfArgumentParser, TrainingArguments

    return HfArgumentParser((ScriptArguments, TrainingArguments))


def parse(argv: list[str]):
    """(ScriptArguments, TrainingArguments) as the script reads its command line; an argument
    neither knows raises InvalidInput."""
    try:
        script, training, unknown = _parser().parse_args_into_dataclasses(argv, return_remaining_strings=True)
    except (ValueError, SystemExit) as error:
        raise InvalidInput(f"the hf trainer's arguments do not parse: {error}") from None
    if unknown:
        raise InvalidInput(f"the hf trainer does not take: {' '.join(unknown)}")
    return script, training


def _set(argv: list[str], name: str, value) -> list[str]:
    """`argv` with --name's value replaced (or the pair appended)."""
    argv = list(argv)
    flag = f"--{name}"
    if flag in argv:
        argv[argv.index(flag) + 1] = str(value)
    else:
        argv += [flag, str(value)]
    return argv


def spec_arguments(spec: RunSpec, profile, plan, config_path: str, output_dir: str, cuda: bool) -> list[str]:
    """The arguments `recommend --trainer hf` prints for the spec's plan, with the shell's
    defaults taken, then what a measured run sets: the spec's model, step count and seed, a
    scratch output folder, no checkpoint saving, no data-loading workers, and --use_cpu off CUDA."""
    from zeroplan.core.trainers import load_stack, shell_defaults, trainer_args

    argv = shell_defaults(trainer_args(load_stack("hf"), profile, spec.shape(), plan, spec.gradient_accumulation,
                                       config_path, lr=spec.lr))
    for name, value in (("model_name_or_path", spec.model), ("max_steps", spec.steps), ("output_dir", output_dir),
                        ("seed", spec.seed), ("save_strategy", "no"), ("dataloader_num_workers", 0),
                        ("disable_tqdm", True), ("use_cpu", not cuda)):
        argv = _set(argv, name, value)
    if spec.dataset:
        argv = _set(argv, "dataset", spec.dataset)
    return argv


class SampleRows:
    """The runner's samples as a map-style torch Dataset: row `index` is one sample (the runner's
    synthetic sequence `index`, or the JSONL's record), so the Trainer's sampler spreads rows over
    ranks as it does for any dataset."""

    def __init__(self, profile, image_token_id: int, spec: RunSpec, rows: int):
        from zeroplan.runner import data

        self.rows = rows
        if spec.dataset:
            self._source = data.JsonlData(spec.dataset, profile, image_token_id, spec, 0, 1)
            self._row = lambda index: [self._source._sample(index)]
        else:
            self._source = data.SyntheticData(profile, image_token_id, spec, 0)
            self._row = self._source._sequence

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, index: int):
        return self._row(index)


class Collator:
    """Rows into the runner's padded tensors (runner.data.collate), bf16 pixels, no KV cache, and
    the micro-batch's counts under COUNTS for the measuring callback (the training step removes
    them before the model sees the inputs)."""

    def __init__(self, spec: RunSpec, image_token_id: int):
        self.spec, self.image_token_id = spec, image_token_id

    def __call__(self, rows: list) -> dict:
        import torch

        from zeroplan.runner import data

        batch = data.collate(rows, self.spec.seq_len, self.image_token_id, self.spec.packed)
        inputs = dict(batch.inputs)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
        inputs["use_cache"] = False
        inputs[COUNTS] = replace(batch, inputs={})
        return inputs


class _StepCounts:
    """What the step's micro-batches count, read when the step ends (StepMeter reads its batch
    after the step), since the Trainer starts a step before its training steps have run."""

    def __init__(self):
        self.micro: list = []

    def __getattr__(self, name):
        from zeroplan.runner import data

        if name == "micro":
            raise AttributeError(name)
        return getattr(data.merged(self.micro), name)


def _trainer_class():
    """transformers.Trainer whose training step first sets the micro-batch's counts aside."""
    from transformers import Trainer

    class MeasuredTrainer(Trainer):
        """transformers.Trainer; each training step hands its micro-batch's counts to `counts`."""

        counts: _StepCounts | None = None

        def training_step(self, model, inputs, num_items_in_batch=None):
            counted = inputs.pop(COUNTS, None)
            if self.counts is not None and counted is not None:
                self.counts.micro.append(counted)
            return super().training_step(model, inputs, num_items_in_batch)

    return MeasuredTrainer


def _callback_class():
    from transformers import TrainerCallback

    class Measure(TrainerCallback):
        """runner.measure around the Trainer's steps: the memory peaks after DeepSpeed's set-up
        (train begin) and over the steps, each whole step timed by StepMeter (which synchronises
        CUDA at its start and end, as the runner's loop does; nothing else is added inside a step),
        and the loss the Trainer logs each step (its mean over ranks)."""

        def __init__(self, meter, cuda: bool, counts: _StepCounts):
            self.meter, self.cuda, self.counts = meter, cuda, counts
            self.init_peaks: dict = {}
            self.step_peaks: dict = {}
            self.losses: list[float] = []
            self._step = None

        def on_train_begin(self, args, state, control, **kwargs):
            from zeroplan.runner import measure

            self.init_peaks = measure.memory_peaks(self.cuda)
            if self.cuda:
                import torch

                torch.cuda.reset_peak_memory_stats()

        def on_step_begin(self, args, state, control, **kwargs):
            self.counts.micro = self.counts.micro[-args.gradient_accumulation_steps:]
            self._step = self.meter.step(self.counts)
            self._step.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            self._step.__exit__(None, None, None)
            self._step = None
            self.counts.micro = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

        def on_train_end(self, args, state, control, **kwargs):
            from zeroplan.runner import measure

            self.step_peaks = measure.memory_peaks(self.cuda)

    return Measure


def with_torch_adam(config: dict, cuda: bool) -> dict:
    """The emitted config with its optimizer block kept, as the user's trainer receives it: HF
    Trainer then hands DeepSpeed every trainable parameter in one group (accelerate's DummyOptim)
    and DeepSpeed builds AdamW from the block, as it does on the user's cluster. Only the kernel
    differs: `torch_adam` (with `fused` on CUDA) makes it torch's fused AdamW, which keeps the same
    two fp32 states made at the first step and no temporaries, like DeepSpeed's FusedAdam, but needs
    no JIT-compiled DeepSpeed op on the machine running it. (Without the block the Trainer would
    build its own AdamW with decay and no-decay groups, a second flattened group per rank and a
    cache flush between them: not what the user runs.)"""
    out = copy.deepcopy(config)
    optimizer = out.get("optimizer")
    if optimizer is not None:
        optimizer.setdefault("params", {}).update({"torch_adam": True, **({"fused": True} if cuda else {})})
    return out


def _plain(config: dict) -> dict:
    """A JSON copy of a config (DeepSpeed may leave non-JSON values in the one it holds)."""
    return json.loads(json.dumps(config, default=str))


def train(spec: RunSpec, cuda: bool, rank: int, world_size: int, local_rank: int, result: dict) -> None:
    """The runner's HF Trainer path: train `spec.steps` steps through transformers.Trainer and fill
    `result` with the same keys as zeroplan.runner.train.train, plus trainer_args (the arguments
    it parsed) and ds_config_emitted (the config before the Trainer filled its "auto")."""
    import torch

    from zeroplan.core.dsconfig import render
    from zeroplan.runner import measure, model as model_setup
    from zeroplan.runner.record import collect, set_up

    profile, image_token_id, shape, plan, gpu = set_up(spec, cuda, world_size, result)

    emitted = render(profile, shape, plan, spec.micro_batch, spec.gradient_accumulation, flavour="hf", lr=spec.lr)
    used = with_torch_adam(emitted, cuda)
    scratch = tempfile.mkdtemp(prefix=f"zeroplan-hf-{rank}-")
    config_path = os.path.join(scratch, "ds_config.json")
    Path(config_path).write_text(json.dumps(used), encoding="utf-8")  # private scratch file, read once
    argv = spec_arguments(spec, profile, plan, config_path, os.path.join(scratch, "out"), cuda)
    result.update(trainer_args=argv, ds_config_emitted=emitted)
    _, training = parse(argv)  # fills "auto" from the arguments (trainer_config_process)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")

    history = measure.MemoryHistory.from_environment(cuda, rank)
    history.start()
    # Stage 3 partitions the model as it is built, under the config the arguments filled.
    model = model_setup.build(spec, profile, copy.deepcopy(training.hf_deepspeed_config.config), device)
    # Freezes and LoRA as the runner sets them; checkpointing is the Trainer's (--gradient_checkpointing).
    model = model_setup.prepare_for_training(model, replace(spec, grad_ckpt=False), shape)
    trainable = model_setup.trainable_parameters(model)
    result["trainable_params"] = int(sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in trainable))
    result["speed_options"] = {}

    nvml = measure.open_nvml(cuda, local_rank)
    meter = measure.StepMeter(model_setup.flops_profile(spec, profile), shape, cuda, nvml)
    counts = _StepCounts()
    callback = _callback_class()(meter, cuda, counts)
    rows = spec.steps * spec.gradient_accumulation * spec.micro_batch * world_size
    trainer = _trainer_class()(model=model, args=training, train_dataset=SampleRows(profile, image_token_id, spec, rows),
                               data_collator=Collator(spec, image_token_id), callbacks=[callback])
    trainer.counts = counts
    trainer.train()

    result.update(ds_config=_plain(training.hf_deepspeed_config.config), ds_config_source=CONFIG_SOURCE,
                  gradient_checkpointing=bool(training.gradient_checkpointing))
    built = getattr(trainer.model_wrapped, "basic_optimizer", None)  # the optimizer DeepSpeed built from the config
    if built is not None:
        result.update(optimizer=f"{type(built).__module__}.{type(built).__qualname__}",
                      optimizer_param_groups=len(built.param_groups))
    result["losses"] = callback.losses
    result.update(collect(spec, profile, gpu, meter, callback.init_peaks, callback.step_peaks, world_size))
    result["per_rank_phase_peaks"] = measure.gather_to_all({"allocated": {}, "reserved": {}, "allocated_at_start": {}})
    history.dump()
    result.update(measure.environment(cuda, nvml))


def spec_from_arguments(script: ScriptArguments, training, world_size: int) -> RunSpec:
    """The RunSpec a command line describes (for the result record): the ZeRO stage from its
    DeepSpeed config, the batch, accumulation, checkpointing, freezes and LoRA from its arguments."""
    config = json.loads(Path(training.deepspeed).read_text(encoding="utf-8")) if isinstance(training.deepspeed, str) \
        else dict(training.deepspeed or {})
    frozen = tuple(part.strip() for part in script.freeze.split(",") if part.strip())
    return RunSpec(model=script.model_name_or_path, stage=int(config.get("zero_optimization", {}).get("stage", 0)),
                   micro_batch=training.per_device_train_batch_size, seq_len=script.seq_len, tiles=script.tiles,
                   grad_ckpt=bool(training.gradient_checkpointing), frozen=frozen, lora_rank=script.lora_rank,
                   steps=max(2, training.max_steps), warmup_steps=1, world_size=world_size, lr=training.learning_rate,
                   gradient_accumulation=training.gradient_accumulation_steps, seed=training.seed,
                   dataset=script.dataset, trainer="hf")


def main(argv: list[str] | None = None) -> int:
    """Run the printed command line: build the runner's spec from it, then train through
    transformers.Trainer with exactly those arguments and that config."""
    import sys

    from zeroplan.runner import record as runner

    argv = list(sys.argv[1:] if argv is None else argv)
    # The process group first (TrainingArguments reads the world size when it is parsed).
    cuda, rank, world_size, local_rank = runner.init_distributed()
    script, training = parse(argv)
    spec = spec_from_arguments(script, training, world_size)
    result = runner.base_result(spec)
    code = runner.EXIT_ERROR
    try:
        train_printed(spec, script, training, cuda, rank, local_rank, result)
        result.update(status="ok", reason=None)
        code = runner.EXIT_OK
    except Exception as error:  # noqa: BLE001 - a failure is reported in the result, as the runner does
        result.update(status="error", reason=runner.one_line(error), failed_rank=rank)
        import traceback

        traceback.print_exc()
    finally:
        runner.finish(result)
        if script.result and rank == 0:
            runner.write_result(script.result, result)
    return code


def train_printed(spec: RunSpec, script: ScriptArguments, training, cuda: bool, rank: int, local_rank: int,
                  result: dict) -> None:
    """Train with the arguments as given (no measurement beyond the Trainer's own logging)."""
    import torch

    from zeroplan.runner import model as model_setup

    profile, image_token_id = model_setup.resolve(spec)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    model = model_setup.build(spec, profile, copy.deepcopy(training.hf_deepspeed_config.config), device)
    model = model_setup.prepare_for_training(model, replace(spec, grad_ckpt=False), spec.shape())
    rows = max(1, training.max_steps) * training.gradient_accumulation_steps * spec.micro_batch * spec.world_size
    trainer = _trainer_class()(model=model, args=training, train_dataset=SampleRows(profile, image_token_id, spec, rows),
                               data_collator=Collator(spec, image_token_id))
    output = trainer.train()
    result.update(final_loss=output.training_loss, ds_config=_plain(training.hf_deepspeed_config.config))


if __name__ == "__main__":
    from zeroplan.runner.record import exit_now

    exit_now(main())
