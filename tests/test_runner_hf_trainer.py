"""The runner's HF Trainer path (RunSpec.trainer == "hf"): transformers.Trainer with the arguments
`recommend --trainer hf` prints, on the tiny InternVL, 2 CPU ranks with gloo (slow), and its parts
(argument building, dataset and collator) without training (fast)."""

from __future__ import annotations

import math

import pytest

from zeroplan.core.dsconfig import auto_fields
from zeroplan.core.profiles import load_model
from zeroplan.core.run import RunSpec
from zeroplan.runner.launch import run_spec
from zeroplan.runner.record import STABLE_KEYS

SPEC = dict(model="tiny", stage=3, micro_batch=2, seq_len=64, tiles=3, steps=4, warmup_steps=1, world_size=2,
            lr=5e-3, grad_ckpt=True, frozen=("vision",), gradient_accumulation=2, trainer="hf")
CPU_ENV = {"OMP_NUM_THREADS": "1"}


def test_the_printed_arguments_parse_into_the_plan():
    pytest.importorskip("transformers")
    from zeroplan.core.tuning import tuned_plan
    from zeroplan.runner.hf_trainer import parse, spec_arguments

    spec = RunSpec(**SPEC)
    profile = load_model("tiny")
    plan = tuned_plan(profile, spec.shape(), spec.plan())
    argv = spec_arguments(spec, profile, plan, "ds.json", "out", cuda=False)
    assert not any(part.startswith("${") for part in argv)
    script, training = parse([part for part in argv if part not in ("--deepspeed", "ds.json")])
    assert (training.per_device_train_batch_size, training.gradient_accumulation_steps) == (2, 2)
    assert training.gradient_checkpointing is True and training.max_steps == 4 and training.bf16
    assert math.isclose(training.learning_rate, 5e-3)
    assert (script.model_name_or_path, script.seq_len, script.tiles, script.freeze) == ("tiny", 64, 3, "vision")


def test_collator_gives_model_inputs_and_counts_for_the_meter():
    torch = pytest.importorskip("torch")
    from zeroplan.adapters.hf_model import image_token_id
    from zeroplan.runner.hf_trainer import COUNTS, Collator, SampleRows

    spec = RunSpec(**SPEC)
    profile = load_model("tiny")
    rows = SampleRows(profile, image_token_id(profile), spec, 8)
    batch = Collator(spec, image_token_id(profile))([rows[0], rows[1]])
    counts = batch.pop(COUNTS)
    assert batch["input_ids"].shape == (2, 64) and batch["pixel_values"].dtype == torch.bfloat16
    assert counts.samples == 2 and counts.tiles == batch["pixel_values"].shape[0] and counts.inputs == {}
    assert len(rows) == 8 and rows[3] is not rows[4]


@pytest.mark.slow
def test_hf_trainer_path_trains_on_two_cpu_ranks(tmp_path):
    pytest.importorskip("deepspeed")
    result = run_spec(RunSpec(**SPEC), tmp_path, timeout_s=300, env=CPU_ENV)
    missing = [key for key in STABLE_KEYS if key not in result]
    assert not missing, missing
    assert result["status"] == "ok" and result["exit_code"] == 0, result.get("reason")
    assert result["trainer"] == "hf" and result["stage"] == 3 and result["world_size"] == 2
    assert len(result["losses"]) == SPEC["steps"] and all(math.isfinite(loss) for loss in result["losses"])
    assert math.isfinite(result["final_loss"]) and result["step_time_s"] > 0 and result["tokens_per_s"] > 0
    assert len(result["per_rank_host_peak_rss_bytes"]) == 2 and len(result["per_rank_peak_allocated_bytes"]) == 2
    assert len(result["step_times_s"]) == SPEC["steps"]
    # The config the Trainer trained with: the emitted one with every "auto" filled from the arguments.
    used, emitted = result["ds_config"], result["ds_config_emitted"]
    assert auto_fields(emitted) and auto_fields(used) == []
    assert (used["train_micro_batch_size_per_gpu"], used["gradient_accumulation_steps"],
            used["train_batch_size"]) == (2, 2, 8)
    assert used["zero_optimization"]["stage"] == 3 and used["bf16"]["enabled"] is True
    assert "--gradient_checkpointing" in result["trainer_args"] and result["gradient_checkpointing"] is True
    # DeepSpeed built the optimizer from the config's block, over one group of every trainable
    # parameter, as on the user's cluster (not the Trainer's decay / no-decay groups).
    assert used["optimizer"]["type"] == "AdamW" and used["optimizer"]["params"]["torch_adam"] is True
    assert result["optimizer"].endswith("AdamW") and result["optimizer_param_groups"] == 1
