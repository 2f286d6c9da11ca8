"""Sweeps record every failure with its reason, go on, and resume after SIGKILL with each point once.

A fake point runner (a tiny script written into tmp_path) stands in for the real one: it reads the
spec, then succeeds, reports an OOM, hangs, or crashes, as FAKE_BEHAVIOR says for its stage.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from zeroplan.lab import bench
from zeroplan.lab import sweep
from zeroplan.lab import jsonl
from zeroplan.cli.main import main

FAKE_RUNNER = textwrap.dedent("""
    import json, os, signal, subprocess, sys, time
    spec_path, result_path = sys.argv[1], sys.argv[2]
    spec = json.load(open(spec_path))
    behavior = json.loads(os.environ.get("FAKE_BEHAVIOR", "{}")).get(str(spec["stage"]), "ok")
    time.sleep(float(os.environ.get("FAKE_DELAY_S", "0")))
    if behavior == "hang":
        time.sleep(3600)
    if behavior == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
        open(os.environ["FAKE_PID_FILE"], "w").write(str(child.pid))
        time.sleep(3600)
    if behavior == "crash":
        raise RuntimeError("simulated crash in the fake runner")
    if behavior == "oom-log":
        print("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", file=sys.stderr)
        sys.exit(1)
    status = "oom" if behavior == "oom" else "ok"
    loss = float("nan") if behavior == "nan" else 1.5
    result = {"model": spec["model"], "stage": spec["stage"], "micro_batch": spec["micro_batch"],
              "seq_len": spec["seq_len"], "tiles": spec["tiles"], "grad_ckpt": spec["grad_ckpt"],
              "world_size": spec["world_size"], "status": status, "device": "fake",
              "predicted_peak_bytes": 1000, "measured_peak_allocated_bytes": 900 if status == "ok" else None,
              "reason": "CUDA out of memory at step 1" if status == "oom" else "", "final_loss": loss}
    tmp = result_path + ".tmp"
    open(tmp, "w").write(json.dumps(result))
    os.replace(tmp, result_path)
""")


@pytest.fixture
def fake_runner(tmp_path):
    path = tmp_path / "fake_runner.py"
    path.write_text(FAKE_RUNNER)

    def command_for(spec, spec_path, result_path, master_port):
        return [sys.executable, str(path), str(spec_path), str(result_path)]

    return command_for


def tiny_specs(stages=(0, 1, 2, 3)):
    return sweep.expand(sweep.Grid(models=("tiny",), stages=stages, seq_lens=(64,), tiles=(2,),
                                   run=dict(steps=2, warmup_steps=1)))


def lines_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_oom_hang_and_crash_are_recorded_with_reasons_and_the_sweep_goes_on(tmp_path, fake_runner, monkeypatch):
    monkeypatch.setenv("FAKE_BEHAVIOR", json.dumps({"0": "oom", "1": "hang", "2": "crash", "3": "oom-log"}))
    results = tmp_path / "out" / "results.jsonl"
    summary = bench.run_sweep(tiny_specs(), results, fake_runner, timeout_s=1.5, grace_s=1)
    by_stage = {record["stage"]: record for record in lines_of(results)}
    assert summary.ran == 4 and sorted(by_stage) == [0, 1, 2, 3]
    assert by_stage[0]["status"] == "oom" and "out of memory" in by_stage[0]["reason"]
    assert by_stage[1]["status"] == "timeout" and "1.5 s" in by_stage[1]["reason"]
    assert by_stage[2]["status"] == "error" and "simulated crash" in by_stage[2]["reason"]
    assert by_stage[2]["exit_code"] == 1
    assert by_stage[3]["status"] == "oom" and "Tried to allocate" in by_stage[3]["reason"]
    assert all(Path(record["log"]).is_file() for record in by_stage.values())


def test_a_diverged_loss_is_stored_as_null_so_every_line_stays_strict_json(tmp_path, fake_runner, monkeypatch):
    monkeypatch.setenv("FAKE_BEHAVIOR", json.dumps({"1": "nan"}))
    results = tmp_path / "results.jsonl"
    bench.run_sweep(tiny_specs((0, 1)), results, fake_runner, timeout_s=30)
    losses = [json.loads(line, parse_constant=pytest.fail)["final_loss"] for line in results.read_text().splitlines()]
    assert losses == [1.5, None]


def test_a_timed_out_point_loses_its_whole_process_group_even_if_it_ignores_sigterm(tmp_path, fake_runner,
                                                                                    monkeypatch):
    pid_file = tmp_path / "grandchild.pid"
    monkeypatch.setenv("FAKE_BEHAVIOR", json.dumps({"0": "stubborn"}))
    monkeypatch.setenv("FAKE_PID_FILE", str(pid_file))
    results = tmp_path / "results.jsonl"
    bench.run_sweep(tiny_specs((0,)), results, fake_runner, timeout_s=1.5, grace_s=0.5)
    assert lines_of(results)[0]["status"] == "timeout"
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(grandchild)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_rerunning_a_complete_sweep_runs_nothing(tmp_path, fake_runner):
    results = tmp_path / "results.jsonl"
    first = bench.run_sweep(tiny_specs(), results, fake_runner, timeout_s=30)
    before = results.read_bytes()
    second = bench.run_sweep(tiny_specs(), results, fake_runner, timeout_s=30)
    assert (first.ran, second.ran, second.skipped) == (4, 0, 4)
    assert results.read_bytes() == before


DRIVER = textwrap.dedent("""
    import sys
    from zeroplan.lab import bench
    from zeroplan.cli.main import main
    runner = sys.argv.pop(1)
    bench.default_command_for = lambda launcher: (
        lambda spec, spec_path, result_path, port: [sys.executable, runner, str(spec_path), str(result_path)])
    sys.exit(main(sys.argv[1:]))
""")


def test_a_sweep_killed_by_sigkill_then_rerun_has_every_point_once(tmp_path, fake_runner):
    (tmp_path / "driver.py").write_text(DRIVER)
    results = tmp_path / "results.jsonl"
    argv = [sys.executable, str(tmp_path / "driver.py"), str(tmp_path / "fake_runner.py"), "bench", "--model", "tiny",
            "--stages", "0,1,2,3", "--micro-batch", "1,2", "--seq-len", "64", "--tiles", "2", "--steps", "2",
            "--warmup-steps", "1", "--results", str(results)]
    env = {**os.environ, "FAKE_DELAY_S": "0.3"}
    sweep = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (results.exists() and results.read_bytes().count(b"\n") >= 1):
        time.sleep(0.02)
    sweep.send_signal(signal.SIGKILL)
    sweep.wait()
    landed = results.read_bytes().count(b"\n")
    assert 1 <= landed < 8
    with open(results, "ab") as handle:
        handle.write(b'{"point_id": "torn by a kill mid-wri')
    rerun = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{landed} already done, ran {8 - landed} (ok {8 - landed})" in " ".join(rerun.stderr.split())
    records = lines_of(results)
    ids = [record["point_id"] for record in records]
    assert len(ids) == 8 and len(set(ids)) == 8
    assert {(r["stage"], r["micro_batch"]) for r in records} == {(s, m) for s in range(4) for m in (1, 2)}
    assert all(record["status"] == "ok" for record in records)


def test_jsonl_skips_torn_lines_and_keeps_the_last_record_per_point(tmp_path):
    path = tmp_path / "r.jsonl"
    jsonl.append(path, {"point_id": "a", "value": 1})
    jsonl.append(path, {"point_id": "b", "value": 2})
    with open(path, "ab") as handle:
        handle.write(b'{"point_id": "c", "val')
    jsonl.append(path, {"point_id": "a", "value": 3})
    read = jsonl.read(path)
    assert read.skipped_lines == 1
    assert [(r["point_id"], r["value"]) for r in read.records] == [("a", 3), ("b", 2)]
    with open(path, "ab") as handle:
        handle.write(b'{"point_id": "d"')
    assert jsonl.repair(path) == len(b'{"point_id": "d"')
    assert path.read_bytes().endswith(b"\n") and jsonl.read(path).skipped_lines == 1


def test_classify_reads_oom_from_a_log_and_sigkill_as_host_oom():
    log = "step 1\ntorch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1 GiB\n"
    assert bench.classify(bench.PointOutcome(1, False, 1.0, log), None, 10) == (
        "oom", "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1 GiB")
    status, reason = bench.classify(bench.PointOutcome(-9, False, 1.0, ""), None, 10)
    assert status == "oom" and "SIGKILL" in reason
    status, reason = bench.classify(bench.PointOutcome(1, False, 1.0, "ValueError: bad\n"), None, 10)
    assert (status, reason) == ("error", "no result; exited with code 1: ValueError: bad")
    status, reason = bench.classify(bench.PointOutcome(3, False, 1.0, "rank 1 failed\n"), None, 10)
    assert status == "oom" and "rank 1 failed" in reason
    ok = bench.classify(bench.PointOutcome(0, False, 1.0, ""), {"status": "ok"}, 10)
    assert ok == ("ok", "")


def test_expand_leaves_out_offloads_a_stage_cannot_do_and_resolves_aliases():
    grid = sweep.Grid(models=("1b", "InternVL2_5-1B"), stages=(0, 1, 2, 3),
                      offloads=("none", "optimizer", "optimizer+params"))
    specs = sweep.expand(grid)
    combos = {(s.stage, s.offload_optimizer, s.offload_params) for s in specs}
    assert len(specs) == 4 + 3 + 1
    assert (0, "cpu", "none") not in combos and (3, "cpu", "cpu") in combos and (2, "cpu", "cpu") not in combos
    assert {s.model for s in specs} == {"InternVL2_5-1B"}


def test_bundled_sweep_files_expand():
    stages = sweep.load_sweep(Path(__file__).parent.parent / "benchmarks" / "h100_stages.toml")
    specs = sweep.expand(stages.grid)
    assert len(specs) == 2 * 4 * 2 * 2 and {s.seq_len for s in specs} == {4096} and {s.tiles for s in specs} == {7}
    assert {s.model for s in specs} == {"InternVL2_5-1B", "InternVL2_5-2B"}  # 4B: h100_stages_4b.toml
    tiny = sweep.expand(sweep.load_sweep(Path(__file__).parent.parent / "benchmarks" / "cpu_tiny.toml").grid)
    assert [s.stage for s in tiny] == [0, 1, 2, 3] and {s.world_size for s in tiny} == {2}


@pytest.mark.parametrize("args,message", [
    (["--model", "no-such-model"], "no-such-model"),
    (["--model", "tiny", "--stages", "0,,1"], "--stages"),
    (["--model", "tiny", "--grad-ckpt", "maybe"], "--grad-ckpt"),
    (["--model", "tiny", "--stages", "5"], "stage"),
    (["--sweep", "missing.toml"], "does not exist"),
    (["--sweep", "{bad}"], "not valid TOML"),
    (["--sweep", "{unknown}"], "unknown keys"),
    (["--sweep", "{unknown}", "--stages", "1"], "not both (got --stages)"),
    (["--model", "tiny", "--results", "{file}/results.jsonl"], "cannot create"),
    (["--model", "tiny", "--results", "{dir}"], "is a directory"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, args, message):
    (tmp_path / "bad.toml").write_text("name = [\n")
    (tmp_path / "a_file").write_text("")
    (tmp_path / "a_dir").mkdir()
    (tmp_path / "unknown.toml").write_text('[grid]\nmodels = ["tiny"]\nstage = [1]\n')
    args = [arg.replace("{bad}", str(tmp_path / "bad.toml")).replace("{unknown}", str(tmp_path / "unknown.toml"))
            .replace("missing.toml", str(tmp_path / "missing.toml")).replace("{file}", str(tmp_path / "a_file"))
            .replace("{dir}", str(tmp_path / "a_dir")) for arg in args]
    if "--results" not in args:
        args += ["--results", str(tmp_path / "out" / "results.jsonl")]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert main(["bench", *args]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_dry_run_lists_points_and_writes_nothing(tmp_path, capsys):
    results = tmp_path / "out" / "results.jsonl"
    assert main(["bench", "--model", "tiny", "--stages", "1,3", "--seq-len", "64", "--tiles", "2", "--steps", "2",
                 "--warmup-steps", "1", "--results", str(results), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "2 points, 2 to run" in out and "z3" in out
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_real_runner_on_tiny_internvl_two_cpu_ranks(tmp_path):
    pytest.importorskip("deepspeed")
    pytest.importorskip("zeroplan.runner.launch")
    pytest.importorskip("zeroplan.runner.train")
    results = tmp_path / "results.jsonl"
    specs = sweep.expand(sweep.Grid(models=("tiny",), stages=(2,), seq_lens=(64,), tiles=(2,),
                                    run=dict(steps=2, warmup_steps=1, world_size=2)))
    summary = bench.run_sweep(specs, results, bench.default_command_for("torchrun"), timeout_s=300)
    record = lines_of(results)[0]
    assert summary.ran == 1 and record["status"] == "ok", record.get("reason")
    assert record["world_size"] == 2 and record["step_time_s"] > 0
