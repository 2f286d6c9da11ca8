"""zeroplan.core.dsconfig (configs from plans and back), the DeepSpeed adapter (DeepSpeed's own
validation and estimators), zeroplan.core.launch and zeroplan.core.atomic."""

from __future__ import annotations

import json
import os
import shlex
import sys
from types import SimpleNamespace

import pytest

from zeroplan.core import config_reader, dsconfig, tuning
from zeroplan.adapters.deepspeed_adapter import estimator_bytes, validate_config
from zeroplan.core.atomic import write_atomic, write_files_atomic
from zeroplan.core.errors import InvalidConfig, InvalidInput
from zeroplan.core.launch import launch_lines
from zeroplan.core.params import model_tensors
from zeroplan.core.plan import Plan, TrainShape
from zeroplan.core.profiles import load_model

HF_AUTOS = {"bf16.enabled", "fp16.enabled", "gradient_accumulation_steps", "gradient_clipping",
            "train_batch_size", "train_micro_batch_size_per_gpu", "optimizer.params.lr",
            "optimizer.params.weight_decay"}
SHAPE = TrainShape(seq_len=8192, frozen=frozenset({"vision"}))


def _plans():
    for stage in range(4):
        for offload in ("none", "cpu", "nvme"):
            if stage == 0 and offload != "none":
                continue
            yield Plan(stage=stage, gpus_per_node=8, nodes=2, offload_optimizer=offload,
                       offload_params=offload if stage == 3 else "none")
    yield Plan(stage=3, offload_optimizer="cpu", offload_params="none")


def _cases():
    for plan in _plans():
        for flavour in dsconfig.FLAVOURS:
            for optimizer in dsconfig.OPTIMIZERS:
                if optimizer == "client" and plan.offload_optimizer != "none":
                    continue
                yield pytest.param(plan, flavour, optimizer,
                                   id=f"z{plan.stage}-{plan.offload_optimizer}-{plan.offload_params}-{flavour}-{optimizer}")


@pytest.mark.parametrize("plan,flavour,optimizer", list(_cases()))
def test_every_rendered_config_passes_deepspeed(plan, flavour, optimizer):
    profile = load_model("26b")
    config = dsconfig.render(profile, SHAPE, plan, micro_batch=2, gradient_accumulation=4, flavour=flavour,
                             optimizer=optimizer, tune=True)
    autos = validate_config(config, plan.world_size)
    expected = HF_AUTOS if flavour == "hf" else set()
    if optimizer == "client":
        expected = expected - {"optimizer.params.lr", "optimizer.params.weight_decay"}
        assert config["zero_allow_untested_optimizer"] is True and "optimizer" not in config
    else:
        assert config["optimizer"]["type"] == "AdamW" and config["optimizer"]["params"]["betas"] == [0.9, 0.999]
    assert set(autos) == expected
    zero = config["zero_optimization"]
    assert zero["stage"] == plan.stage
    assert ("offload_optimizer" in zero) == (plan.offload_optimizer != "none")
    assert ("offload_param" in zero) == (plan.offload_params != "none")
    if "nvme" in (plan.offload_optimizer, plan.offload_params):
        assert dsconfig.NVME_PATH_PLACEHOLDER in json.dumps(config)
    if flavour == "concrete":
        assert config["train_batch_size"] == 2 * 4 * plan.world_size
        assert config["bf16"] == {"enabled": True} and "fp16" not in config
    assert config["steps_per_print"] == 2000 and config["wall_clock_breakdown"] is False


@pytest.mark.parametrize("plan", list(_plans()), ids=lambda p: f"z{p.stage}-{p.offload_optimizer}-{p.offload_params}")
def test_concrete_config_reads_back_as_the_same_plan(plan):
    profile = load_model("8b")
    tuned = tuning.tuned_plan(profile, SHAPE, plan)
    config = dsconfig.render(profile, SHAPE, tuned, micro_batch=3, gradient_accumulation=5)
    back, micro, accum = config_reader.plan_from_config(config, plan.gpus_per_node, plan.nodes)
    assert (micro, accum) == (3, 5)
    fields = ["stage", "offload_optimizer", "offload_params", "reduce_bucket_elems", "overlap_comm",
              "contiguous_gradients", "gpus_per_node", "nodes"]
    fields += ["allgather_bucket_elems"] if plan.stage in (1, 2) else []
    fields += ["prefetch_bucket_elems", "max_live_params", "param_persistence_threshold",
               "sub_group_elems"] if plan.stage == 3 else []
    assert {f: getattr(back, f) for f in fields} == {f: getattr(tuned, f) for f in fields}


def test_render_writes_the_plans_numbers_unless_asked_to_tune():
    profile, plan = load_model("8b"), Plan(stage=3, reduce_bucket_elems=123_456, prefetch_bucket_elems=7_000)
    zero = dsconfig.render(profile, SHAPE, plan, 1, 1)["zero_optimization"]
    assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"]) == (123_456, 7_000)
    tuned = dsconfig.render(profile, SHAPE, plan, 1, 1, tune=True)["zero_optimization"]
    assert tuned["reduce_bucket_size"] != 123_456


@pytest.mark.parametrize("model", ["tiny", "1b", "8b", "26b", "40b", "78b"])
def test_tuning_rules_follow_the_model_shapes(model):
    profile = load_model(model)
    tuned = tuning.tuned_plan(profile, SHAPE, Plan(stage=3))
    tensors = model_tensors(profile)
    sizes = tuning.shape_sizes(profile, SHAPE)
    persistent = [t for t in tensors if t.numel <= tuned.param_persistence_threshold]
    assert persistent and all(t.name.endswith((".bias", "norm.weight", "_before.weight", "_after.weight", "lambda_1", "lambda_2", "cls_token"))
                              for t in persistent)
    assert all(t.numel <= tuned.param_persistence_threshold for t in tensors if t.name.endswith(".bias"))
    assert all(t.numel > tuned.param_persistence_threshold
               for t in tensors if t.name.endswith(("q_proj.weight", "down_proj.weight", "fc1.weight")))
    assert sizes.llm_layer_elems <= tuned.prefetch_bucket_elems < 1.1 * sizes.llm_layer_elems
    assert tuned.max_live_params >= max(3 * sizes.llm_layer_elems, sizes.largest_tensor_elems)
    assert tuning.MIN_BUCKET_ELEMS <= tuned.reduce_bucket_elems <= tuning.MAX_BUCKET_ELEMS[3]
    assert tuned.sub_group_elems == 1_000_000_000
    nvme = tuning.tuned_plan(profile, SHAPE, Plan(stage=3, offload_optimizer="nvme"))
    assert nvme.sub_group_elems < 3 * sizes.llm_layer_elems


def test_reduce_bucket_spans_two_trainable_blocks_within_the_stage_caps():
    profile = load_model("1b")
    sizes = tuning.shape_sizes(profile, SHAPE)
    stage1 = tuning.tuned_plan(profile, SHAPE, Plan(stage=1))
    assert 2 * sizes.largest_trainable_block_elems <= stage1.reduce_bucket_elems < 2.1 * sizes.largest_trainable_block_elems
    big = load_model("78b")
    assert tuning.tuned_plan(big, SHAPE, Plan(stage=1)).reduce_bucket_elems == 1_000_000_000
    assert tuning.tuned_plan(big, SHAPE, Plan(stage=2)).reduce_bucket_elems == 500_000_000
    lora = TrainShape(lora_rank=16, frozen=frozenset({"vision", "projector"}))
    assert tuning.tuned_plan(profile, lora, Plan(stage=2)).reduce_bucket_elems == tuning.MIN_BUCKET_ELEMS


def test_config_set_matches_internvl_files_and_classes():
    configs = dsconfig.config_set("hf")
    assert list(configs) == ["zero_stage1_config.json", "zero_stage2_config.json", "zero_stage3_config.json",
                             "zero_stage3_config_34b.json", "zero_stage3_config_100b.json"]
    stages = [c["zero_optimization"]["stage"] for c in configs.values()]
    assert stages == [1, 2, 3, 3, 3]
    for config in configs.values():
        assert set(validate_config(config, 8)) == HF_AUTOS
        assert config["zero_optimization"].get("stage3_gather_16bit_weights_on_model_save", True) is True
    prefetch = [configs[n]["zero_optimization"]["stage3_prefetch_bucket_size"] for n in list(configs)[2:]]
    assert prefetch == sorted(prefetch) and prefetch[0] < prefetch[-1]
    concrete = dsconfig.config_set("concrete")
    assert [c["train_batch_size"] for c in concrete.values()] == [8, 8, 8, 16, 32]
    assert all(validate_config(c, c["train_batch_size"]) == [] for c in concrete.values())


def test_to_json_is_stable_and_sorted():
    config = dsconfig.config_set("hf")["zero_stage3_config.json"]
    text = dsconfig.to_json(config)
    assert text.endswith("}\n") and text == dsconfig.to_json(json.loads(text))
    assert list(json.loads(text)) == sorted(config)


def test_render_refuses_what_deepspeed_would():
    profile = load_model("8b")
    with pytest.raises(InvalidInput, match="client optimizer"):
        dsconfig.render(profile, SHAPE, Plan(stage=2, offload_optimizer="cpu"), 1, 1, optimizer="client")
    with pytest.raises(InvalidInput, match="flavour"):
        dsconfig.render(profile, SHAPE, Plan(), 1, 1, flavour="yaml")
    with pytest.raises(InvalidInput, match="micro-batch"):
        dsconfig.render(profile, SHAPE, Plan(), 0, 1)


def _base_config(**zero):
    return {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4, "train_batch_size": 64,
            "bf16": {"enabled": True}, "zero_optimization": {"stage": 2, **zero}}


@pytest.mark.parametrize("config,world,message", [
    (_base_config(bogus_key=1), 8, "bogus_key"),
    (_base_config(stage=7), 8, "stage"),
    ({**_base_config(), "bf16": {"enabled": "yes please"}}, 8, "enabled"),
    (_base_config(), 16, "train_batch_size 64 is not"),
    ({**_base_config(), "train_batch_size": 63}, None, "train_batch_size 63"),
    ({**_base_config(), "steps_per_print": "auto"}, 8, "steps_per_print"),
    ([1, 2], 8, "JSON object"),
])
def test_deepspeed_rejections_are_one_line(config, world, message):
    with pytest.raises(InvalidConfig, match=message) as caught:
        validate_config(config, world)
    assert "\n" not in str(caught.value)


def test_validation_uses_the_world_size():
    assert validate_config(_base_config(), 8) == []
    assert validate_config(_base_config(), None) == []
    partial = {k: v for k, v in _base_config().items() if k != "gradient_accumulation_steps"}
    validate_config({**partial, "train_batch_size": 16}, 8)
    with pytest.raises(InvalidConfig):
        validate_config({**partial, "train_batch_size": 12}, 8)


@pytest.mark.parametrize("hidden_size", [8, 64, 896, 2048, 3584, 4096, 5120, 6144, 7168, 8192])
@pytest.mark.parametrize("stage", [2, 3])
def test_the_readers_bucket_rule_is_transformers(hidden_size, stage):
    """config_reader's one kept rule (the hidden-size buckets) gives what transformers'
    HfTrainerDeepSpeedConfig fills, at every hidden size of the bundled models and a few more."""
    deepspeed_integration = pytest.importorskip("transformers.integrations.deepspeed")
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {
        "stage": stage, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto"}}
    args = SimpleNamespace(world_size=1, per_device_train_batch_size=1, gradient_accumulation_steps=1,
                           max_grad_norm=1.0, learning_rate=2e-5, adam_beta1=0.9, adam_beta2=0.999,
                           adam_epsilon=1e-8, weight_decay=0.0, save_on_each_node=False, fp16=False,
                           fp16_full_eval=False, bf16=True, bf16_full_eval=False, get_warmup_steps=lambda n: 0)
    hf = deepspeed_integration.HfTrainerDeepSpeedConfig(json.loads(json.dumps(config)))
    try:
        hf.trainer_config_process(args)
        hf.trainer_config_finalize(args, SimpleNamespace(config=SimpleNamespace(hidden_size=hidden_size)), 10)
    finally:
        deepspeed_integration.unset_hf_deepspeed_config()
    zero = hf.config["zero_optimization"]
    rule = config_reader.hf_bucket_autos(hidden_size)
    filled = {f"zero_optimization.{key}": value for key, value in zero.items() if key != "stage"}
    if stage == 3:
        assert filled == rule
    else:  # transformers fills the stage-3 keys only under ZeRO-3
        assert filled["zero_optimization.reduce_bucket_size"] == rule["zero_optimization.reduce_bucket_size"]
    plan, _, _ = config_reader.plan_from_config(config, 1, 1, hidden_size=hidden_size)
    assert plan.reduce_bucket_elems == zero["reduce_bucket_size"]


def test_the_adapter_fills_auto_with_transformers_and_refuses_what_it_does_not_fill():
    pytest.importorskip("transformers")
    from zeroplan.adapters.deepspeed_adapter import fill_auto_as_trainer

    config = dsconfig.config_set("hf")["zero_stage3_config.json"]
    assert dsconfig.auto_fields(config)
    filled = fill_auto_as_trainer(config, 16)
    assert dsconfig.auto_fields(filled) == []
    assert filled["train_batch_size"] == 16 * filled["train_micro_batch_size_per_gpu"] * \
        filled["gradient_accumulation_steps"]
    with pytest.raises(InvalidConfig, match="steps_per_print"):
        fill_auto_as_trainer({"steps_per_print": "auto"})


def test_plan_from_config_defaults_autos_and_batch_checks():
    plan, micro, accum = config_reader.plan_from_config({"train_micro_batch_size_per_gpu": 4,
                                                   "zero_optimization": {"stage": 3}}, 8, 1)
    assert (micro, accum) == (4, 1)
    assert (plan.reduce_bucket_elems, plan.prefetch_bucket_elems, plan.param_persistence_threshold) == \
        (500_000_000, 50_000_000, 100_000)
    assert plan.overlap_comm is True
    assert config_reader.plan_from_config({"train_batch_size": 64, "zero_optimization": {"stage": 1}}, 8, 1)[0].overlap_comm \
        is False
    hf = dsconfig.config_set("hf")["zero_stage3_config.json"]
    hf["zero_optimization"]["stage3_prefetch_bucket_size"] = "auto"
    plan, micro, accum = config_reader.plan_from_config(hf, 8, 2, hidden_size=100, micro_batch=2, gradient_accumulation=8)
    assert (micro, accum, plan.prefetch_bucket_elems, plan.world_size) == (2, 8, 9000, 16)
    assert config_reader.plan_from_config({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 2}, 8, 1)[2] == 4
    with pytest.raises(InvalidInput, match="train_batch_size 64"):
        config_reader.plan_from_config({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 2,
                                   "gradient_accumulation_steps": 2}, 8, 1)
    with pytest.raises(InvalidConfig, match="whole number"):
        config_reader.plan_from_config({"train_micro_batch_size_per_gpu": 1,
                                   "zero_optimization": {"stage": 3, "reduce_bucket_size": 1.5}}, 8, 1)
    with pytest.raises(InvalidInput, match="not 3"):
        config_reader.plan_from_config({"train_micro_batch_size_per_gpu": 1}, 8, 1, micro_batch=3)


def test_estimators_are_deepspeeds_own():
    stage3 = pytest.importorskip("deepspeed.runtime.zero.stage3")
    profile = load_model("26b")
    plan = Plan(stage=3, gpus_per_node=8, nodes=2, offload_optimizer="cpu")
    result = estimator_bytes(profile, SHAPE, plan)
    trainable = result["total_params"]
    from zeroplan.core.params import count_parameters

    counts = count_parameters(profile)
    assert trainable == counts.total - counts.vision
    cpu, gpu, _ = stage3.estimate_zero3_model_states_mem_needs(trainable, counts.largest_layer, 8, 2, True, False)
    assert result["zero3"] == {"gpu_bytes": gpu, "cpu_bytes": cpu}
    assert result["for_stage"]["gpu_bytes"] == gpu and "note" not in result["for_stage"]
    stage1 = estimator_bytes(profile, SHAPE, plan.with_(stage=1))
    assert stage1["for_stage"]["gpu_bytes"] == stage1["zero2"]["gpu_bytes"] and "ZeRO-2" in stage1["for_stage"]["note"]


def test_estimators_report_a_reason_without_deepspeed(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed.runtime.zero.stage3", None)
    result = estimator_bytes(load_model("8b"), SHAPE, Plan())
    assert result["for_stage"] is None and "not importable" in result["reason"]


def test_launch_lines_quote_and_count():
    plan = Plan(stage=3, gpus_per_node=8, nodes=4)
    lines = launch_lines(plan, "internvl/train/internvl_chat_finetune.py", "my configs/z3.json",
                         ["--model_name_or_path", "a b"])
    for line in lines.values():
        words = shlex.split(line)
        assert words[-2:] == ["--deepspeed", "my configs/z3.json"] and "a b" in words
    assert "--num_nodes 4 --num_gpus 8" in lines["deepspeed"] and "--hostfile" in lines["deepspeed"]
    assert "--nnodes 4 --nproc_per_node 8" in lines["torchrun"] and "--rdzv_endpoint" in lines["torchrun"]
    srun = shlex.split(lines["srun"])
    assert "GPUS=32" in srun and "--ntasks=32" in srun and "--ntasks-per-node=8" in srun and "--gres=gpu:8" in srun
    assert "LAUNCHER=slurm" in srun and srun[srun.index("python"):][:2] == ["python", "-u"]
    assert "--hostfile" not in launch_lines(Plan(nodes=1), "train.py", "c.json")["deepspeed"]


def test_atomic_writes_leave_nothing_half_done(tmp_path):
    target = tmp_path / "a.json"
    write_atomic(target, "old\n")
    assert target.read_text() == "old\n" and oct(target.stat().st_mode & 0o777) != oct(0o600)
    (tmp_path / "folder.json").mkdir()
    with pytest.raises(InvalidInput, match="folder"):
        write_files_atomic({target: "new\n", tmp_path / "folder.json": "x"})
    assert target.read_text() == "old\n"
    assert sorted(os.listdir(tmp_path)) == ["a.json", "folder.json"]
    write_files_atomic({target: b"new\n", tmp_path / "sub" / "b.json": "b"})
    assert target.read_text() == "new\n" and (tmp_path / "sub" / "b.json").read_text() == "b"
