"""The bundled runner: RunSpec, data, FLOPs and launch commands (fast), and real DeepSpeed training
of the tiny InternVL on the CPU with gloo and 2 ranks through launch_command (slow)."""

from __future__ import annotations

import json
import random

import pytest

from zeroplan.core.errors import InvalidInput
from zeroplan.core.flops import shape_flops, step_flops
from zeroplan.core.plan import TrainShape
from zeroplan.core.profiles import load_model
from zeroplan.runner.launch import launch_command, run_spec
from zeroplan.core.run import RunSpec
from zeroplan.runner.record import STABLE_KEYS
from tests.fixtures.internvl_jsonl import make_dataset

TINY = dict(model="tiny", micro_batch=2, seq_len=64, tiles=3, steps=5, warmup_steps=2, world_size=2, lr=5e-3)
CPU_ENV = {"OMP_NUM_THREADS": "1"}
RUN_TIMEOUT_S = 240


def test_spec_round_trips_and_point_id_ignores_only_run_length():
    spec = RunSpec(model="tiny", stage=3, frozen=("vision", "projector"), lora_rank=8)
    assert RunSpec.from_json(spec.to_json()) == spec
    assert spec.point_id() == RunSpec(model="tiny", stage=3, frozen=("projector", "vision"), lora_rank=8,
                                      steps=20, warmup_steps=5).point_id()
    assert spec.point_id() != RunSpec(model="tiny", stage=2, frozen=("vision", "projector"), lora_rank=8).point_id()
    assert spec.shape().frozen == frozenset({"vision", "projector"})
    assert spec.plan().world_size == 1


@pytest.mark.parametrize("bad", [{"frozen": ("eyes",)}, {"steps": 3, "warmup_steps": 3}, {"offload_params": "disk"},
                                 {"attn_implementation": "magic"}, {"stage": 5}])
def test_spec_rejects_bad_fields(bad):
    with pytest.raises(InvalidInput):
        RunSpec(**bad)
    with pytest.raises(InvalidInput):
        RunSpec.from_json(json.dumps({"model": "tiny", "colour": "red"}))


def test_launch_commands_run_the_train_module_on_world_size_ranks():
    spec = RunSpec(world_size=4)
    torchrun = launch_command(spec, "s.json", "r.json", "torchrun", master_port=29511)
    assert torchrun[1:3] == ["-m", "torch.distributed.run"]
    assert torchrun[torchrun.index("--nproc_per_node") + 1] == "4"
    assert torchrun[torchrun.index("--master_port") + 1] == "29511"
    assert torchrun[-6:] == ["-m", "zeroplan.runner.train", "--spec", "s.json", "--result", "r.json"]
    deepspeed = launch_command(spec, "s.json", "r.json", "deepspeed", master_port=29512)
    assert deepspeed[deepspeed.index("--num_gpus") + 1] == "4"
    assert deepspeed[deepspeed.index("--module") + 1] == "zeroplan.runner.train"
    with pytest.raises(InvalidInput):
        launch_command(spec, "s.json", "r.json", "mpirun")


def test_synthetic_batches_hold_image_tokens_per_tile_and_train_only_the_answer():
    pytest.importorskip("torch")
    from zeroplan.adapters.hf_model import image_token_id
    from zeroplan.runner.data import IGNORE, batches

    profile = load_model("tiny")
    spec = RunSpec(model="tiny", micro_batch=3, seq_len=128, tiles=4, seed=7)
    first = [next(batches(profile, image_token_id(profile), spec, 0, 1)) for _ in range(2)]
    batch = first[0]
    ids, labels = batch.inputs["input_ids"], batch.inputs["labels"]
    assert ids.shape == (3, 128)
    assert batch.inputs["pixel_values"].shape == (batch.tiles, 3, 56, 56)
    assert int((ids == image_token_id(profile)).sum()) == batch.tiles * profile.tokens_per_tile == batch.image_tokens
    assert bool((labels[ids == image_token_id(profile)] == IGNORE).all())
    assert 0 < int((labels != IGNORE).sum()) < batch.text_tokens
    assert batch.text_tokens + batch.image_tokens == 3 * 128
    assert bool((first[1].inputs["input_ids"] == ids).all()), "same seed and rank must give the same batch"
    other_rank = next(batches(profile, image_token_id(profile), spec, 1, 2))
    assert not bool((other_rank.inputs["input_ids"] == ids).all())


def test_tiles_are_drawn_up_to_the_maximum_or_fixed():
    from zeroplan.runner.data import draw_tiles

    rng = random.Random(0)
    draws = [draw_tiles(rng, 7, False) for _ in range(4000)]
    assert min(draws) == 1 and max(draws) == 7 and abs(sum(draws) / len(draws) - 4) < 0.1
    assert {draw_tiles(rng, 7, True) for _ in range(50)} == {7}


def test_packed_rows_restart_positions_per_sample():
    pytest.importorskip("torch")
    from zeroplan.adapters.hf_model import image_token_id
    from zeroplan.runner.data import batches

    profile = load_model("tiny")
    spec = RunSpec(model="tiny", micro_batch=2, seq_len=96, tiles=2, packed=True)
    batch = next(batches(profile, image_token_id(profile), spec, 0, 1))
    positions = batch.inputs["position_ids"]
    assert "attention_mask" not in batch.inputs
    restarts = int((positions[:, 1:] == 0).sum())
    assert restarts == len(batch.segment_lengths) - 2 >= 2
    assert sum(batch.segment_lengths) == 2 * 96


def test_jsonl_reader_tiles_images_and_masks_the_question(tmp_path):
    pytest.importorskip("PIL")
    from zeroplan.adapters.hf_model import image_token_id
    from zeroplan.runner.data import IGNORE, JsonlData, tile_grid

    assert tile_grid(128, 64, 6) == (2, 1) and tile_grid(64, 128, 6) == (1, 2) and tile_grid(64, 64, 1) == (1, 1)
    profile = load_model("tiny")
    path = make_dataset(tmp_path, count=4)
    spec = RunSpec(model="tiny", micro_batch=4, seq_len=160, tiles=3, dataset=str(path))
    batch = next(iter(JsonlData(str(path), profile, image_token_id(profile), spec, 0, 1)))
    assert batch.samples == 4
    assert batch.tiles == 1 + 3 + 3 + 3  # square: 1 tile; 2:1 and 1:2: two tiles plus a thumbnail
    assert batch.image_tokens == batch.tiles * profile.tokens_per_tile
    trained = batch.inputs["labels"] != IGNORE
    assert int(trained.sum()) > 0 and not bool(trained[batch.inputs["input_ids"] == image_token_id(profile)].any())


def test_flops_count_backward_only_where_gradient_flows():
    profile = load_model("8b")
    full = shape_flops(profile, TrainShape(micro_batch=1, seq_len=8192, tiles=7))
    frozen_vision = shape_flops(profile, TrainShape(micro_batch=1, seq_len=8192, tiles=7, frozen=frozenset({"vision"})))
    assert full.vision_backward == 2 * full.vision_forward
    assert frozen_vision.vision_backward == 0 and frozen_vision.projector_backward == 2 * frozen_vision.projector_forward
    only_vision = shape_flops(profile, TrainShape(micro_batch=1, seq_len=8192, tiles=7, frozen=frozenset({"projector", "llm"})))
    assert only_vision.llm_backward == only_vision.llm_forward  # input gradient only, back to the vision tower
    lora = shape_flops(profile, TrainShape(micro_batch=1, seq_len=8192, tiles=7, lora_rank=16, frozen=frozenset({"vision", "projector"})))
    assert frozen_vision.llm_forward < lora.llm_forward < 1.01 * frozen_vision.llm_forward
    assert lora.llm_backward < frozen_vision.llm_backward
    packed = step_flops(profile, TrainShape(), 7, [2048] * 4)
    assert packed.llm_forward < full.llm_forward  # four short causal segments: less attention work


def _check_result(result: dict, stage: int) -> None:
    missing = [key for key in STABLE_KEYS if key not in result]
    assert not missing, missing
    assert result["status"] == "ok" and result["exit_code"] == 0, result.get("reason")
    assert (result["stage"], result["world_size"], result["model"]) == (stage, 2, "tiny")
    for key in ("tokens_per_s", "mfu", "step_time_s", "final_loss"):
        assert isinstance(result[key], float) and result[key] > 0, key
    assert isinstance(result["predicted_peak_bytes"], (int, type(None)))
    for key in ("measured_peak_allocated_bytes", "measured_peak_reserved_bytes"):
        assert result[key] is None  # no CUDA allocator on the CPU
    assert len(result["per_rank_host_peak_rss_bytes"]) == 2
    assert len(result["losses"]) == TINY["steps"] and len(result["step_times_s"]) == TINY["steps"]
    assert result["device"].startswith("cpu") and result["versions"]["deepspeed"]
    assert result["ds_config"]["zero_optimization"]["stage"] == stage


@pytest.fixture(scope="module")
def stage_results(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stages")
    # ZeRO-2 runs as an ordinary loop does (timing "wall"): the same checks hold for it.
    return {stage: run_spec(RunSpec(stage=stage, timing="wall" if stage == 2 else "sync", **TINY),
                            folder / f"stage{stage}", timeout_s=RUN_TIMEOUT_S, env=CPU_ENV)
            for stage in (0, 1, 2, 3)}


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_each_stage_trains_and_reports(stage_results, stage):
    result = stage_results[stage]
    _check_result(result, stage)
    assert result["losses"][-1] < result["losses"][0] - 0.01


def test_unsynchronised_steps_add_up_to_the_loop_s_wall_time():
    """Timed boundary to boundary, the steps' times include what the loop does between them, and
    their sum is the loop's wall time (the final wait counted in the last step)."""
    import time
    from types import SimpleNamespace

    from zeroplan.runner.measure import StepMeter

    batch = SimpleNamespace(samples=1, tiles=2, text_tokens=10, image_tokens=20, segment_lengths=[64])
    meter = StepMeter(load_model("tiny"), TrainShape(seq_len=64, tiles=2), cuda=False, synchronize=False)
    start = time.perf_counter()
    for _ in range(3):
        with meter.step(batch):
            time.sleep(0.01)
        time.sleep(0.02)  # outside the step: an ordinary loop's time between steps still counts
    meter.finish()
    wall = time.perf_counter() - start
    seconds = [record.seconds for record in meter.records]
    assert all(s >= 0.01 for s in seconds) and min(seconds[1:]) >= 0.03
    assert abs(sum(seconds) - wall) < 0.025  # only the tail sleep after the last step is outside


def test_timing_is_sync_or_wall_and_keeps_old_point_ids():
    assert RunSpec(timing="sync").point_id() == RunSpec().point_id() != RunSpec(timing="wall").point_id()
    with pytest.raises(InvalidInput, match="timing"):
        RunSpec(timing="fast")


@pytest.mark.slow
def test_first_step_loss_is_the_same_under_every_stage(stage_results):
    first = {stage: result["losses"][0] for stage, result in stage_results.items()}
    assert all(result["status"] == "ok" for result in stage_results.values())
    assert max(first.values()) - min(first.values()) < 1e-3, first


@pytest.mark.slow
def test_trains_on_the_jsonl_image_dataset(tmp_path):
    path = make_dataset(tmp_path / "data", count=8)
    spec = RunSpec(stage=2, dataset=str(path), frozen=("vision",), **{**TINY, "seq_len": 96})
    result = run_spec(spec, tmp_path / "run", launcher="deepspeed", timeout_s=RUN_TIMEOUT_S, env=CPU_ENV)
    _check_result(result, 2)
    assert result["tiles_per_s"] > 0 and result["image_tokens_per_s"] > 0
    assert result["losses"][-1] < result["losses"][0] - 0.05


@pytest.mark.slow
def test_a_failing_run_writes_an_error_result(tmp_path):
    spec = RunSpec(stage=1, **{**TINY, "seq_len": 8, "tiles": 4, "fixed_tiles": True, "steps": 2, "warmup_steps": 0})
    result = run_spec(spec, tmp_path, timeout_s=RUN_TIMEOUT_S, env=CPU_ENV)
    assert result["status"] == "error" and "InvalidInput" in result["reason"]
    assert result["exit_code"] != 0 and result["final_loss"] is None


def test_packed_samples_do_not_attend_across_their_boundary():
    torch = pytest.importorskip("torch")
    from zeroplan.adapters.hf_model import build_model

    profile = load_model("tiny")
    model = build_model(profile, "cpu", torch.float32, "sdpa").eval()
    first, second = torch.randint(3, 900, (1, 12)), torch.randint(3, 900, (1, 10))
    packed = torch.cat([first, second], dim=1)
    positions = torch.cat([torch.arange(12), torch.arange(10)]).unsqueeze(0)
    with torch.no_grad():  # use_cache=False as the runner trains: with a cache the packing is ignored
        together = model(input_ids=packed, position_ids=positions, use_cache=False).logits[:, 12:]
        alone = model(input_ids=second, use_cache=False).logits
        leaky = model(input_ids=packed, use_cache=False).logits[:, 12:]
    assert torch.allclose(together, alone, atol=1e-4)
    assert not torch.allclose(leaky, alone, atol=1e-4)


def test_lora_with_frozen_towers_and_checkpointing_gets_gradients_only_where_trained():
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from zeroplan.adapters.hf_model import build_model, image_token_id
    from zeroplan.runner.data import batches
    from zeroplan.runner.model import prepare_for_training, tower_of

    profile = load_model("tiny")
    spec = RunSpec(model="tiny", seq_len=64, tiles=2, frozen=("vision",), lora_rank=4, grad_ckpt=True)
    model = prepare_for_training(build_model(profile, "cpu", torch.bfloat16, "sdpa"), spec, spec.shape())
    batch = next(batches(profile, image_token_id(profile), spec, 0, 1))
    inputs = {**batch.inputs, "pixel_values": batch.inputs["pixel_values"].to(torch.bfloat16), "use_cache": False}
    model(**inputs).loss.backward()
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in name or tower_of(name) == "projector" for name in trained)
    assert any(tower_of(name) == "projector" for name in trained)
    assert not any(tower_of(name) == "vision" for name in trained)
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for name, p in model.named_parameters()
               if p.requires_grad and "lora_A" not in name)  # A's gradient is 0 while B starts at 0
