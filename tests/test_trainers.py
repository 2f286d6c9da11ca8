"""Plans for a training stack: only what the stack executes, and launch lines whose arguments,
parsed as the trainer parses them, pass transformers' HfTrainerDeepSpeedConfig with the written
config at the plan's world size and equal the plan."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Literal, Optional

import pytest

from zeroplan.core.dsconfig import auto_fields, render
from zeroplan.core.errors import InvalidInput
from zeroplan.core.plan import Plan, TrainShape
from zeroplan.core.planner import recommend
from zeroplan.core.profiles import load_gpu, load_model
from zeroplan.core.trainers import load_stack, script_arguments, shell_defaults, stack_launch_lines, trainer_args

transformers = pytest.importorskip("transformers")
from transformers import HfArgumentParser, TrainingArguments  # noqa: E402
from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig, unset_hf_deepspeed_config  # noqa: E402


# InternVL's ModelArguments / DataTrainingArguments (internvl_chat_finetune.py @1831ceb9, L88-266), re-declared.
@dataclass
class ModelArguments:
    model_name_or_path: Optional[str] = None
    vision_path: Optional[str] = None
    llm_path: Optional[str] = None
    mlp_path: Optional[str] = None
    freeze_llm: bool = False
    freeze_backbone: bool = False
    freeze_mlp: bool = False
    unfreeze_vit_layers: int = 0
    vision_select_layer: int = -1
    use_backbone_lora: int = 0
    use_llm_lora: int = 0
    unfreeze_lm_head: bool = False
    grad_checkpoint: bool = True
    drop_path_rate: float = 0.0
    ps_version: Literal["v1", "v2"] = "v2"
    use_fast_tokenizer: bool = False
    use_liger: bool = False


@dataclass
class DataTrainingArguments:
    max_seq_length: int = 8192
    force_image_size: int = 448
    down_sample_ratio: float = 0.5
    pad2square: bool = False
    conv_style: str = "internlm2-chat"
    meta_path: str = None
    use_data_resampling: bool = False
    dynamic_image_size: bool = False
    use_thumbnail: bool = False
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 12
    min_num_frame: int = 8
    max_num_frame: int = 32
    normalize_type: Literal["imagenet", "clip", "siglip"] = "imagenet"
    use_packed_ds: bool = False
    num_images_expected: int = 40
    max_packed_tokens: int = 8192
    max_buffer_size: int = 20
    log_freq: int = 1000
    strict_mode: bool = True
    replacement: bool = False
    allow_overflow: bool = False
    loss_reduction: str = "token"
    loss_reduction_all_gather: bool = False


@dataclass
class HfScriptArguments:  # zeroplan.runner.hf_trainer's own flags (profiles/trainers/hf.toml script_flags)
    model_name_or_path: Optional[str] = None
    seq_len: int = 4096
    tiles: int = 7
    freeze: str = ""
    lora_rank: int = 0
    dataset: Optional[str] = None


class _WorldSize:
    def __init__(self, args, world_size):
        self._args, self.world_size = args, world_size

    def __getattr__(self, name):
        return getattr(self._args, name)


CASES = [  # model, gpus, freeze, lora, trainer
    ("1b", 8, (), 0, "internvl"), ("2b", 16, ("vision",), 0, "internvl"), ("8b", 8, (), 0, "internvl"),
    ("8b", 2, ("vision", "projector", "llm"), 16, "internvl"), ("26b", 32, ("vision",), 0, "internvl"),
    ("4b", 8, ("vision",), 8, "hf"), ("2b", 8, (), 0, "hf"), ("40b", 16, ("vision",), 0, "hf"),
]


def _plan(model, gpus, freeze, lora, trainer):
    stack = load_stack(trainer)
    profile = load_model(model)
    shape = TrainShape(micro_batch=1, seq_len=8192, tiles=7, frozen=frozenset(freeze), lora_rank=lora)
    best = recommend(profile, shape, Plan(gpus_per_node=min(gpus, 8), nodes=max(1, gpus // 8)),
                     load_gpu("h100-80gb"), 128, stack=stack).best
    return stack, profile, best


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[4]}-{c[0]}-{c[1]}gpu-{'+'.join(c[2]) or 'full'}-lora{c[3]}")
def test_printed_line_parses_and_passes_the_hf_trainer_check(case, tmp_path):
    stack, profile, best = _plan(*case)
    config_path = str(tmp_path / "ds config.json")
    args = trainer_args(stack, profile, best.shape, best.plan, best.gradient_accumulation, config_path)
    line = stack_launch_lines(stack, best.plan, args, config_path)["torchrun"]
    assert line.startswith("LAUNCHER=pytorch torchrun") == (stack.name == "internvl")
    argv = shell_defaults(script_arguments(line))
    assert argv[argv.index("--deepspeed") + 1] == config_path
    del argv[argv.index("--deepspeed"):argv.index("--deepspeed") + 2]
    types = (ModelArguments, DataTrainingArguments) if stack.name == "internvl" else (HfScriptArguments,)
    *script, training = HfArgumentParser((*types, TrainingArguments)).parse_args_into_dataclasses(
        argv + ["--use_cpu", "True"])  # strict, as InternVL's script parses: an unknown flag raises
    config = render(profile, best.shape, best.plan, best.shape.micro_batch, best.gradient_accumulation, flavour="hf")
    unset_hf_deepspeed_config()
    hf = HfTrainerDeepSpeedConfig(copy.deepcopy(config))
    proxy = _WorldSize(training, best.plan.world_size)
    hf.trainer_config_process(proxy)
    hf.trainer_config_finalize(proxy, SimpleNamespace(config=SimpleNamespace()), 100)  # no hidden_size, as InternVL
    unset_hf_deepspeed_config()
    assert auto_fields(hf.config) == []
    assert hf.config["train_micro_batch_size_per_gpu"] == best.shape.micro_batch
    assert hf.config["gradient_accumulation_steps"] == best.gradient_accumulation
    assert hf.config["train_batch_size"] == 128
    assert training.per_device_train_batch_size == best.shape.micro_batch
    assert training.gradient_accumulation_steps == best.gradient_accumulation
    layers = profile.llm.num_layers
    if stack.name == "internvl":
        model_args = script[0]
        assert model_args.grad_checkpoint == (best.shape.llm_ckpt_layers(layers) == layers)
        assert model_args.freeze_backbone == ("vision" in case[2])
        assert model_args.use_llm_lora == case[3]
        assert model_args.freeze_llm == ("llm" in case[2] or case[3] > 0)
        assert not training.gradient_checkpointing
    else:
        assert training.gradient_checkpointing == best.shape.grad_ckpt
        assert script[0].lora_rank == case[3]


@pytest.mark.parametrize("trainer", ["internvl", "hf"])
def test_a_stack_plans_only_what_it_executes(trainer):
    stack, profile, best = _plan("8b", 8, (), 0, trainer)
    assert not best.shape.compiled and best.shape.kernels == "eager" and not best.plan.optimizer_group_elems
    assert best.shape.ckpt_layers in (None, 0)
    if trainer == "internvl":
        assert best.shape.grad_ckpt  # InternVL's script checkpoints the vision encoder whatever its flags say
    zeroplan_best = _plan("8b", 8, (), 0, "zeroplan")[2]
    assert zeroplan_best.time.step_s <= best.time.step_s


def test_internvl_lines_set_launcher_for_each_launcher_and_unknown_stack_is_refused():
    stack, profile, best = _plan("2b", 16, ("vision",), 0, "internvl")
    args = trainer_args(stack, profile, best.shape, best.plan, best.gradient_accumulation, "ds.json")
    lines = stack_launch_lines(stack, best.plan, args, "ds.json")
    assert lines["deepspeed"].startswith("LAUNCHER=pytorch deepspeed --hostfile hostfile --num_nodes 2")
    assert "LAUNCHER=slurm srun" in lines["srun"] and "--ntasks=16" in lines["srun"]
    for line in lines.values():
        assert f"--gradient_accumulation_steps {best.gradient_accumulation}" in line
        assert '--output_dir "${OUTPUT_DIR:-work_dirs/zeroplan}"' in line
    with pytest.raises(InvalidInput):
        load_stack("megatron")


def _zeroplan(*argv):
    return subprocess.run([sys.executable, "-m", "zeroplan", *argv], capture_output=True, text=True, timeout=300)


def test_recommend_names_the_stack_first_and_validate_reports_each_mismatch(tmp_path):
    out = tmp_path / "ds.json"
    done = _zeroplan("recommend", "--force", "--model", "2b", "--gpus", "8", "--gpu", "h100-80gb", "--out", str(out), "--json")
    assert done.returncode == 0, done.stderr
    payload = json.loads(done.stdout)
    assert payload["trainer"]["name"] == "internvl"
    # By default transformers is not imported: the output names the validate line instead.
    assert "HfTrainerDeepSpeedConfig" not in payload["validation"]
    assert payload["trainer"]["check"].startswith(f"zeroplan validate {out} --model 2b")
    checked = _zeroplan("recommend", "--force", "--model", "2b", "--gpus", "8", "--gpu", "h100-80gb", "--out", str(out),
                        "--json", "--check-trainer")
    assert checked.returncode == 0, checked.stderr
    assert "HfTrainerDeepSpeedConfig" in json.loads(checked.stdout)["validation"]
    line = payload["launch"]["torchrun"]
    ok = _zeroplan("validate", str(out), "--model", "2b", "--gpus", "8", "--trainer-args", line)
    assert ok.returncode == 0, ok.stderr
    bad = _zeroplan("validate", str(out), "--model", "2b", "--gpus", "16", "--trainer-args", line)
    assert bad.returncode == 0  # "auto" follows the arguments: nothing to mismatch
    concrete = tmp_path / "c.json"
    assert _zeroplan("recommend", "--force", "--model", "2b", "--gpus", "8", "--gpu", "h100-80gb", "--out", str(concrete),
                     "--flavour", "concrete").returncode == 0
    refused = _zeroplan("validate", str(concrete), "--model", "2b", "--gpus", "8", "--trainer-args",
                        "--per_device_train_batch_size 64 --gradient_accumulation_steps 1 --bf16 True --output_dir o")
    assert refused.returncode == 2
    mismatch_lines = [x for x in refused.stderr.splitlines() if x.startswith("zeroplan: HF Trainer mismatch:")]
    assert any("train_micro_batch_size_per_gpu" in x for x in mismatch_lines)
    assert "Traceback" not in refused.stderr
    text = _zeroplan("recommend", "--force", "--model", "2b", "--gpus", "8", "--gpu", "h100-80gb", "--out", str(out))
    assert text.stdout.splitlines()[0].startswith("trainer: internvl")


@pytest.mark.parametrize("argv", [
    ["--model", "8b", "--gpus", "8"],  # InternVL's script: vision-only checkpointing (--grad_checkpoint False)
    ["--model", "2b", "--gpus", "8", "--freeze", "vision", "--trainer", "hf"],
    ["--model", "26b", "--gpus", "16", "--lora-rank", "16", "--freeze", "vision", "--freeze", "projector",
     "--freeze", "llm"],
    ["--model", "8b", "--gpus", "8", "--trainer", "zeroplan"],  # fused loss and compiled layers, from its RunSpec
    ["--model", "2b", "--gpus", "4", "--trainer", "zeroplan", "--pad-vocab", "128"],
])
def test_validate_of_what_recommend_wrote_predicts_recommends_peak(argv, tmp_path, capsys):
    """recommend's `trainer.check` line (the config it wrote, the arguments it printed) makes
    validate predict the same peak: batch, accumulation and checkpointing come from the arguments
    (or the zeroplan stack's RunSpec), not validate's defaults."""
    import shlex

    from zeroplan.cli.main import main

    out = tmp_path / "ds.json"
    assert main(["recommend", *argv, "--out", str(out), "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    check = shlex.split(payload["trainer"]["check"])
    assert check[:3] == ["zeroplan", "validate", str(out)] and "--trainer-args" in check
    assert main([*check[1:], "--json"]) == 0
    validated = json.loads(capsys.readouterr().out)
    recommended = payload["recommended"]
    assert validated["breakdown_bytes"]["peak"] == recommended["predicted_peak_bytes"]
    assert (validated["micro_batch"], validated["gradient_accumulation"], validated["stage"]) == (
        recommended["micro_batch"], recommended["gradient_accumulation"], recommended["stage"])
