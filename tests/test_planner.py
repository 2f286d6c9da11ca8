"""The planner picks what InternVL's authors pick on A100-80GB, ranks by speed, and says why the
others lost."""

import pytest

from zeroplan.core.errors import DoesNotFit, InvalidInput
from zeroplan.core.plan import Plan, TrainShape, cluster
from zeroplan.core.planner import recommend
from zeroplan.core.profiles import load_gpu, load_model

A100 = load_gpu("a100-80gb")


def _best(model, gpus, global_batch=128, **shape):
    per_node, nodes = cluster(gpus, None, None)
    return recommend(load_model(model), TrainShape(**shape), Plan(gpus_per_node=per_node, nodes=nodes), A100,
                     global_batch)


@pytest.mark.parametrize("model,gpus", [("1b", 8), ("2b", 16), ("4b", 8), ("8b", 8), ("8b", 32)])
def test_small_models_get_stage_1_like_internvl(model, gpus):
    assert _best(model, gpus).best.plan.stage == 1


@pytest.mark.parametrize("model,gpus", [("26b", 32), ("38b", 64), ("40b", 32), ("78b", 128)])
def test_large_models_get_stage_3_like_internvl(model, gpus):
    assert _best(model, gpus).best.plan.stage == 3


def test_every_alternative_says_why_it_lost():
    result = _best("40b", 16)
    assert result.best.fits
    assert all(c.rejected_because for c in result.others)
    assert any(c.rejected_because.startswith("does not fit") for c in result.others)
    assert any(c.rejected_because.startswith("slower by") for c in result.others)
    for candidate in result.others:
        if candidate.fits:
            assert candidate.time.step_s >= result.best.time.step_s * 0.99


def test_accumulation_follows_from_the_global_batch():
    result = _best("8b", 16, global_batch=256)
    best = result.best
    assert best.shape.micro_batch * best.gradient_accumulation * 16 == 256


def test_nothing_fits_raises():
    with pytest.raises(DoesNotFit) as error:
        recommend(load_model("78b"), TrainShape(seq_len=16384), Plan(gpus_per_node=1, nodes=1),
                  load_gpu("l40s"), 1, speed=False)
    assert "no plan fits" in str(error.value)


def test_the_fused_loss_is_chosen_only_when_the_eager_loss_does_not_fit():
    # 78B on one L40S with everything offloaded: the eager loss's fp32 logits over 16k tokens do
    # not fit, Liger's fused loss does.
    result = recommend(load_model("78b"), TrainShape(seq_len=16384), Plan(gpus_per_node=1, nodes=1),
                       load_gpu("l40s"), 1)
    assert result.best.shape.kernels == "liger-loss" and result.best.fits
    assert all(not c.fits for c in result.others if c.shape.kernels == "eager")
    # 2B on 8 H100s: wherever a plan fits with either loss, the eager one is faster; the fused loss
    # wins only where its twin with the eager loss does not fit
    small = recommend(load_model("2b"), TrainShape(seq_len=4096), Plan(gpus_per_node=8, nodes=1),
                      load_gpu("h100"), 128)
    every = (small.best,) + small.others
    twins: dict = {}
    for c in every:
        key = (c.plan.stage, c.plan.offload_optimizer, c.plan.offload_params, c.shape.micro_batch,
               c.shape.grad_ckpt, c.shape.ckpt_layers, c.shape.compiled)
        twins.setdefault(key, {})[c.shape.kernels] = c
    both = [pair for pair in twins.values() if {"eager", "liger-loss"} <= set(pair)]
    assert both
    for pair in both:
        assert pair["eager"].time.step_s < pair["liger-loss"].time.step_s
    best_key = (small.best.plan.stage, small.best.plan.offload_optimizer, small.best.plan.offload_params,
                small.best.shape.micro_batch, small.best.shape.grad_ckpt, small.best.shape.ckpt_layers,
                small.best.shape.compiled)
    if small.best.shape.kernels == "liger-loss":
        eager = twins[best_key].get("eager")
        assert eager is None or not eager.fits


def test_speed_options_compile_only_below_stage_3():
    result = _best("2b", 8)
    assert result.best.shape.compiled == (result.best.plan.stage != 3)
    assert all(not c.shape.compiled for c in result.others if c.plan.stage == 3)
    assert any(c.shape.compiled for c in result.others if c.plan.stage < 3)


def test_uneven_global_batch_is_rejected():
    with pytest.raises(InvalidInput, match="split evenly"):
        _best("8b", 24, global_batch=128)
