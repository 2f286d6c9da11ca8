"""Rehearsal: one process plays rank R of N on torch's fake process group (zeroplan.runner.rehearsal).

Fast: the fills leave no collective's output untouched and allocate nothing; RunSpec's rules for a
rehearsed run; the side-by-side runner admits points by their predicted memory and measures again,
alone, a point that ran beside others and was disturbed; `zeroplan rehearse` says in one line where
there is no GPU. Slow: the bundled runner rehearses ranks of the tiny InternVL on the CPU, and what
each rank holds is what zeroplan.core.partition says that rank of a real N-rank job holds (checked
against real gloo engines in tests/test_partition_deepspeed.py); world 1 rehearsed is a real world-1
run; a user's DeepSpeed config with "auto" values trains as the HF Trainer would fill it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from zeroplan.cli.main import main
from zeroplan.core.errors import InvalidInput
from zeroplan.core.partition import model_state_bytes
from zeroplan.core.profiles import load_model
from zeroplan.core.run import RunSpec
from zeroplan.lab import bench, jsonl, parallel, sweep
from zeroplan.runner.launch import run_spec

CPU_ENV = {"OMP_NUM_THREADS": "1"}
TINY = dict(model="tiny", micro_batch=1, seq_len=64, tiles=2, steps=3, warmup_steps=1, lr=5e-3)
RUN_TIMEOUT_S = 240
FILL_CHECK = textwrap.dedent("""
    import torch, torch.distributed as dist
    from zeroplan.runner import rehearsal
    rehearsal.start(2, 4)
    out = torch.full((4 * 3,), float("nan"))
    dist.all_gather_into_tensor(out, torch.tensor([1.0, 2.0, 3.0]))
    gathered = out.tolist()
    parts = [torch.full((2,), float("nan")) for _ in range(4)]
    dist.all_gather(parts, torch.tensor([5.0, 6.0]))
    scattered = torch.full((2,), float("nan"))
    dist.reduce_scatter_tensor(scattered, torch.arange(8.0))
    objects = [None] * 4
    dist.all_gather_object(objects, {"rank": dist.get_rank()})
    print(__import__("json").dumps({"gathered": gathered, "parts": [p.tolist() for p in parts],
                                    "scattered": scattered.tolist(), "objects": objects,
                                    "world": [dist.get_rank(), dist.get_world_size()]}))
""")


def test_fake_collectives_fill_their_outputs_as_if_the_other_ranks_sent_zeros():
    out = subprocess.run([sys.executable, "-c", FILL_CHECK], capture_output=True, text=True, timeout=120,
                         env={**os.environ, **CPU_ENV})
    assert out.returncode == 0, out.stderr[-2000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["world"] == [2, 4]
    assert seen["gathered"] == [0, 0, 0, 0, 0, 0, 1, 2, 3, 0, 0, 0]
    assert seen["parts"] == [[0, 0], [0, 0], [5, 6], [0, 0]]
    assert seen["scattered"] == [4, 5]
    assert seen["objects"] == [{"rank": 2}] * 4


def test_a_rehearsed_spec_is_one_process_sized_for_its_world():
    spec = RunSpec(stage=3, simulate_world=64, simulate_rank=63)
    assert spec.simulated and spec.job_world_size == 64 and spec.world_size == 1
    assert (spec.plan().world_size, spec.plan().gpus_per_node, spec.plan().nodes) == (64, 8, 8)
    assert spec.point_id() != RunSpec(stage=3, simulate_world=64, simulate_rank=0).point_id()
    assert RunSpec(stage=3).point_id() == RunSpec(stage=3, simulate_world=0).point_id()  # old ids kept
    for bad in ({"simulate_world": 4, "simulate_rank": 4}, {"simulate_rank": 1},
                {"simulate_world": 4, "world_size": 2}, {"simulate_world": 4, "trainer": "hf"}):
        with pytest.raises(InvalidInput):
            RunSpec(**bad)


FAKE_RANK = textwrap.dedent("""
    import json, os, sys, time
    spec = json.load(open(sys.argv[1]))
    time.sleep(float(os.environ.get("FAKE_DELAY_S", "0.5")))
    retry = os.path.exists(sys.argv[1] + ".alone") is False and spec["stage"] == 2
    open(sys.argv[1] + ".alone", "w").write("")
    result = {"status": "ok", "measured_peak_allocated_bytes": 1, "alloc_retries": 1 if retry else 0}
    open(sys.argv[2], "w").write(json.dumps(result))
""")


def _fake_points(tmp_path):
    script = tmp_path / "fake_rank.py"
    script.write_text(FAKE_RANK)
    specs = sweep.expand(sweep.Grid(models=("tiny",), stages=(1, 2, 3), micro_batches=(1, 2), seq_lens=(64,),
                                    tiles=(2,), run=dict(steps=2, warmup_steps=1, simulate_world=4, simulate_rank=3)))
    return specs, lambda spec, spec_path, result_path, port: [sys.executable, str(script), str(spec_path),
                                                              str(result_path)]


def test_side_by_side_admits_points_while_their_memory_fits_and_remeasures_disturbed_ones_alone(tmp_path):
    specs, command_for = _fake_points(tmp_path)
    gib = 1 << 30
    # 4 GiB per point with the margin: two fit in 85 % of 10 GiB, a third does not.
    runner = parallel.SideBySide(parallel=4, capacity_bytes=10 * gib, need_for=lambda spec: 2 * gib, poll_s=0.05)
    summary = bench.run_sweep(specs, tmp_path / "r.jsonl", command_for, 60, side_by_side=runner)
    records = jsonl.read(tmp_path / "r.jsonl").by_point
    assert summary.ran == len(specs) == len(records)
    assert max(r["points_beside"] for r in records.values()) == 1
    for record in records.values():
        if record["spec"]["stage"] == 2:  # retried beside another point: only the lone rerun is kept
            assert record["points_beside"] == 0 and record["alloc_retries"] == 0
    alone = parallel.SideBySide(parallel=4, capacity_bytes=10 * gib, need_for=lambda spec: 20 * gib, poll_s=0.05)
    bench.run_sweep(specs, tmp_path / "alone.jsonl", command_for, 60, side_by_side=alone)
    assert all(r["points_beside"] == 0 for r in jsonl.read(tmp_path / "alone.jsonl").by_point.values())


def test_parallel_is_refused_for_real_runs(tmp_path, capsys):
    code = main(["bench", "--model", "tiny", "--stages", "1", "--seq-len", "64", "--tiles", "2", "--parallel", "2",
                 "--results", str(tmp_path / "r.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and "rehearsed points" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r.jsonl").exists()


@pytest.mark.parametrize("argv,words", [
    (["--model", "1b", "--gpus", "8", "--stage", "3"], "found none"),
    (["--model", "1b", "--gpus", "8"], "--config FILE"),
    (["--model", "1b", "--gpus", "8", "--stage", "3", "--ranks", "8"], "outside a world of 8"),
    (["--model", "1b", "--gpus", "8", "--config", "missing.json"], "missing.json"),
    (["--model", "1b", "--gpus", "8", "--stage", "2", "--config", "configs/zero_stage2_config.json"], "not both"),
])
def test_rehearse_bad_input_and_no_gpu_are_one_line_exit_2(argv, words, capsys, monkeypatch):
    monkeypatch.setattr("zeroplan.adapters.nvml.probe", lambda: __import__("zeroplan.adapters.nvml").adapters.nvml
                        .ProbeResult(reason="NVML unavailable: no driver"))
    code = main(["rehearse", *argv])
    err = capsys.readouterr().err
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err


def _states_of(spec: RunSpec) -> dict:
    profile = load_model(spec.model)
    from zeroplan.core.tuning import tuned_plan

    plan = tuned_plan(profile, spec.shape(), spec.plan())
    states = model_state_bytes(profile, spec.shape(), plan, spec.simulate_rank)
    return {"params": states.params, "master_weights": states.master_weights,
            "optimizer_states": states.optimizer_states, "partition_elems": states.partition_elems,
            "padding_elems": states.padding_elems}


@pytest.fixture(scope="module")
def rehearsed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rehearsed")
    specs = {"z3-rank3-of-4": RunSpec(stage=3, simulate_world=4, simulate_rank=3, **TINY),
             "z2-rank2-of-3": RunSpec(stage=2, simulate_world=3, simulate_rank=2, frozen=("vision",), **TINY),
             "z1-world1-rehearsed": RunSpec(stage=1, simulate_world=1, **TINY),
             "z1-world1-real": RunSpec(stage=1, **TINY)}
    return {name: run_spec(spec, folder / name, timeout_s=RUN_TIMEOUT_S, env=CPU_ENV) | {"_spec": spec}
            for name, spec in specs.items()}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["z3-rank3-of-4", "z2-rank2-of-3", "z1-world1-rehearsed"])
def test_a_rehearsed_rank_holds_its_partition_and_says_it_was_rehearsed(rehearsed, name):
    result, spec = rehearsed[name], rehearsed[name]["_spec"]
    assert result["status"] == "ok", result.get("reason")
    assert result["simulated"] == {"world_size": spec.simulate_world, "rank": spec.simulate_rank,
                                   "process_group": "fake", "communication": "none (collectives move no data)"}
    assert result["step_time_s"] is None and result["tokens_per_s"] is None and result["mfu"] is None
    assert result["compute"]["step_time_s"] > 0
    assert all(isinstance(loss, float) and loss == loss for loss in result["losses"])
    measured = {key: result["model_states"][key] for key in _states_of(spec)}
    assert measured == _states_of(spec)
    assert result["model_states"]["optimizer_states"] > 0, "Adam's states must have been made"


@pytest.mark.slow
def test_world_one_rehearsed_trains_like_a_real_world_one_run(rehearsed):
    real, fake = rehearsed["z1-world1-real"], rehearsed["z1-world1-rehearsed"]
    assert real["status"] == fake["status"] == "ok"
    assert real["model_states"] == fake["model_states"]
    assert real["losses"] == fake["losses"]


@pytest.mark.slow
def test_a_users_config_with_auto_values_is_filled_as_the_hf_trainer_does(tmp_path):
    config = {"bf16": {"enabled": "auto"}, "train_micro_batch_size_per_gpu": "auto",
              "gradient_accumulation_steps": "auto", "train_batch_size": "auto", "gradient_clipping": "auto",
              "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto"}},
              "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                                    "stage3_param_persistence_threshold": "auto", "overlap_comm": True}}
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(config))
    spec = RunSpec(stage=3, simulate_world=8, simulate_rank=7, ds_config=str(path), gradient_accumulation=2, **TINY)
    result = run_spec(spec, tmp_path / "run", timeout_s=RUN_TIMEOUT_S, env=CPU_ENV)
    assert result["status"] == "ok", result.get("reason")
    hidden = load_model("tiny").llm.hidden_size
    zero = result["ds_config"]["zero_optimization"]
    assert zero["reduce_bucket_size"] == hidden * hidden and zero["stage3_param_persistence_threshold"] == 10 * hidden
    assert result["ds_config"]["train_batch_size"] == 1 * 2 * 8
    assert str(path) in result["ds_config_source"]
    from zeroplan.runner.config import user_config

    with pytest.raises(InvalidInput, match="stage"):
        user_config(RunSpec(stage=2, simulate_world=8, ds_config=str(path), **TINY), load_model("tiny"))


@pytest.mark.slow
def test_rehearse_runs_each_rank_with_the_bundled_runner(tmp_path, capsys, monkeypatch):
    """The verb's whole path on the CPU: ranks 0 and N-1 trained, their records kept, the verdict
    says no GPU memory was measured (a GPU node measures it)."""
    monkeypatch.setattr("zeroplan.cli.rehearse._require_gpu_stack", lambda: "cpu")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    results = tmp_path / "rehearsal.jsonl"
    code = main(["rehearse", "--model", "tiny", "--gpus", "16", "--stage", "3", "--seq-len", "64", "--tiles", "2",
                 "--freeze", "vision", "--steps", "2", "--results", str(results), "--json"])
    payload = json.loads(capsys.readouterr().out)
    assert code == 1 and "measured no GPU memory" in payload["verdict"]
    assert [rank["rank"] for rank in payload["ranks"]] == [0, 15]
    records = list(jsonl.read(results).by_point.values())
    assert {r["simulated"]["rank"] for r in records} == {0, 15} and all(r["status"] == "ok" for r in records)
