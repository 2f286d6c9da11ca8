"""Hardening (issue 16, items 1-11): crashes, hangs and data safety, one test or more per item.

Hostile files that every verb may meet also run through the fuzz harness (benchmarks/fuzz_cli.py,
tests/test_fuzz_cli.py); here are the cases each fix was made for, reproduced exactly.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
import tomllib
from pathlib import Path

import pytest

from zeroplan.cli.main import main
from zeroplan.core.bounded import read_bounded
from zeroplan.core.errors import InvalidInput
from zeroplan.core.profiles import load_gpu
from zeroplan.lab import bench, jsonl, sweep

ROOT = Path(__file__).resolve().parents[1]
H100 = ROOT / "zeroplan/profiles/gpus/h100-80gb.toml"
CALIBRATION_RESULTS = ROOT / "reports/h100_microbatch/results.jsonl"
VALID_DS_CONFIG = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": 1,
                   "bf16": {"enabled": True}, "zero_optimization": {"stage": 2}}


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("zeroplan: error: "), captured.err
    assert "Traceback" not in captured.out + captured.err
    return lines[0]


def _tree(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ------------------------------------------------------------------ 1. DeepSpeedConfigError


@pytest.mark.parametrize("extra, words", [
    ({"elasticity": {"enabled": True, "max_train_batch_size": 8, "micro_batch_sizes": [1]}}, "elastic"),
    ({"curriculum_learning": {"enabled": True}}, "curriculum"),
    ({"sparse_attention": {"mode": "fixed"}}, "sparse"),
    ({"progressive_layer_drop": {"enabled": True}}, "progressive"),
    ({"zero_optimization": {"stage": 3, "mics_shard_size": 2}}, "mics"),
    ({"checkpoint": {"tag_validation": "maybe"}}, "tag_validation"),
    ({"data_types": {"keep_in_fp32_modules": 5}}, "keep_in_fp32_modules"),
])
def test_validate_turns_deepspeed_config_errors_into_one_line(in_tmp, capsys, extra, words):
    (in_tmp / "ds.json").write_text(json.dumps({**VALID_DS_CONFIG, **extra}))
    assert main(["validate", "ds.json", "--model", "tiny", "--gpus", "1"]) == 2
    line = _one_error_line(capsys)
    assert "DeepSpeed rejects the config" in line and words.lower() in line.lower()


# ------------------------------------------------------------------ 2. calibrate on damaged results


def _damaged(change) -> str:
    records = [json.loads(line) for line in CALIBRATION_RESULTS.read_text().splitlines() if line.strip()]
    records = [dict(record, spec=dict(record["spec"])) for record in records]
    change(records[1])
    return "\n".join(json.dumps(record) for record in records) + "\n"


def _set(key, value, in_spec=False):
    def change(record):
        (record["spec"] if in_spec else record)[key] = value
    return change


DAMAGE = {
    "spec a string": _set("spec", "stage=2"),
    "spec a list": _set("spec", [1, 2]),
    "reserved 0": _set("measured_peak_reserved_bytes", 0),
    "reserved null": _set("measured_peak_reserved_bytes", None),
    "reserved a string": _set("measured_peak_reserved_bytes", "1000"),
    "allocated a string": _set("measured_peak_allocated_bytes", "x"),
    "step time null": _set("step_time_s", None),
    "step time a string": _set("step_time_s", "1.5"),
    "step time negative": _set("step_time_s", -1.0),
    "nvml a string": _set("nvml_peak_used_bytes", "x"),
    "step tiles a string": _set("step_tiles", "x"),
    "step tiles true": _set("step_tiles", True),
    "tiles per sample a string": _set("tiles_per_sample", "7"),
    "model null": _set("model", None),
    "spec steps 1e12": _set("steps", 10**12, in_spec=True),
    "spec steps 1e12 float": _set("steps", 1e12, in_spec=True),
    "spec world 1e9": _set("world_size", 10**9, in_spec=True),
    "spec tiles a string": _set("tiles", "7", in_spec=True),
    "spec stage null": _set("stage", None, in_spec=True),
    "spec unknown key": _set("colour", "red", in_spec=True),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_calibrate_refuses_a_damaged_record_in_one_line(in_tmp, capsys, damage):
    (in_tmp / "r.jsonl").write_text(_damaged(DAMAGE[damage]))
    assert main(["calibrate", "r.jsonl", "--gpu", "h100", "--out", "cal.toml"]) == 2
    assert "result " in _one_error_line(capsys)
    assert not (in_tmp / "cal.toml").exists()


def test_calibrate_leaves_out_a_negative_context_reading(in_tmp, capsys):
    """NVML's used below torch's reserved is a broken reading, not a negative CUDA context."""
    (in_tmp / "r.jsonl").write_text(_damaged(_set("nvml_peak_used_bytes", 1)))
    assert main(["calibrate", "r.jsonl", "--gpu", "h100", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["calibrated"]["cuda_context_bytes"] > 0


# ------------------------------------------------------------------ 3. the [calibrated] table


def _gpu_with(tmp_path: Path, calibrated: str, context: str | None = None) -> str:
    text = H100.read_text().split("\n[calibrated]")[0]
    if context is not None:
        text = "\n".join(f"cuda_context_bytes = {context}" if line.startswith("cuda_context_bytes") else line
                         for line in text.splitlines())
    path = tmp_path / "gpu.toml"
    path.write_text(text + "\n\n[calibrated]\n" + calibrated + "\n")
    return str(path)


BAD_TABLES = {
    "efficiency 0": ("compute_efficiency = 0", None),
    "efficiency a string": ('compute_efficiency = "fast"', None),
    "efficiency nan": ("compute_efficiency = nan", None),
    "overhead inf": ("layer_overhead_s = inf", None),
    "overhead negative": ("layer_overhead_s = -0.5", None),
    "context negative": ("cuda_context_bytes = -1000000000000", None),
    "context a float": ("cuda_context_bytes = 1.5e9", None),
    "context above the GPU": ("cuda_context_bytes = 100000000000000", None),
    "unknown key": ("compute_eficiency = 0.5", None),
    "base context negative": ("", "-947912704000"),
}


@pytest.mark.parametrize("verb", ["estimate", "recommend", "generate"])
@pytest.mark.parametrize("case", sorted(BAD_TABLES))
def test_a_bad_calibrated_table_is_refused_by_every_verb(in_tmp, capsys, verb, case):
    gpu = _gpu_with(in_tmp, *BAD_TABLES[case])
    argv = {"estimate": ["estimate", "--model", "78b", "--gpus", "1", "--gpu", gpu],
            "recommend": ["recommend", "--model", "78b", "--gpus", "1", "--gpu", gpu, "--out", "ds.json"],
            "generate": ["generate", "--spec", "spec.toml", "--out", "configs"]}[verb]
    (in_tmp / "spec.toml").write_text(f'[[config]]\nmodel = "tiny"\ngpus = 2\nglobal_batch = 8\ngpu = "{gpu}"\n')
    before = _tree(in_tmp)
    assert main(argv) == 2
    assert "gpu.toml" in _one_error_line(capsys)
    assert _tree(in_tmp) == before


# ------------------------------------------------------------------ 4. unbounded work


def test_a_profile_with_100000_layers_is_refused(in_tmp, capsys):
    text = (ROOT / "zeroplan/profiles/models/tiny-internvl.toml").read_text()
    lines = text.splitlines()
    llm = lines.index("[llm]")
    lines = lines[:llm] + [line if not line.startswith("num_layers") else "num_layers = 100000"
                           for line in lines[llm:]]
    (in_tmp / "big.toml").write_text("\n".join(lines) + "\n")
    assert main(["estimate", "--model", "big.toml", "--gpus", "1"]) == 2
    assert "num_layers" in _one_error_line(capsys)


def test_a_sweep_grid_of_a_million_points_is_refused_before_expanding(in_tmp, capsys):
    values = ", ".join(str(64 * (i + 1)) for i in range(100))
    (in_tmp / "s.toml").write_text(f'[grid]\nmodels = ["tiny"]\nstages = [0, 1, 2, 3]\nseq_len = [{values}]\n'
                                   f'micro_batch = [{values}]\ntiles = [{values}]\n')
    assert (in_tmp / "s.toml").stat().st_size < 2048
    assert main(["bench", "--sweep", "s.toml", "--results", "r.jsonl", "--dry-run"]) == 2
    assert "4000000 grid combinations" in _one_error_line(capsys)
    with pytest.raises(InvalidInput):
        sweep.expand(sweep.Grid(models=("tiny",), seq_lens=tuple(range(1, 101)), tiles=tuple(range(1, 101)),
                                micro_batches=(1, 2)))


def test_bounded_read_stops_on_an_endless_file():
    with pytest.raises(InvalidInput, match="larger than 1024 bytes"):
        read_bounded("/dev/zero", 1024)
    assert read_bounded("/dev/null", 1024) == b""


@pytest.mark.parametrize("argv", [
    ["validate", "{zero}", "--model", "tiny", "--gpus", "1"],
    ["generate", "--spec", "{zero}", "--out", "configs"],
    ["bench", "--model", "tiny", "--results", "{zero}", "--dry-run"],
    ["bench", "--sweep", "{zero_toml}", "--results", "r.jsonl", "--dry-run"],
    ["report", "{zero}", "--out", "rep"],
    ["calibrate", "{zero}", "--gpu", "h100"],
    ["estimate", "--model", "{zero_toml}", "--gpus", "1"],
    ["estimate", "--model", "tiny", "--gpus", "1", "--gpu", "{zero_toml}"],
])
def test_endless_inputs_are_one_line_not_a_memory_error(in_tmp, capsys, argv):
    os.symlink("/dev/zero", in_tmp / "zero.toml")
    words = [word.format(zero="/dev/zero", zero_toml=str(in_tmp / "zero.toml")) for word in argv]
    assert main(words) == 2
    _one_error_line(capsys)


# ------------------------------------------------------------------ 5. generate's numbers, report without matplotlib


@pytest.mark.parametrize("line, key", [
    ("lr = nan", "lr"), ("lr = inf", "lr"), ("lr = -1e-5", "lr"), ("lr = 0", "lr"),
    ("gradient_clipping = -1.0", "gradient_clipping"), ("gradient_clipping = inf", "gradient_clipping"),
    ("weight_decay = nan", "weight_decay"), ('name = "a\\u0000b.json"', "name"), ('name = "a\\nb.json"', "name"),
])
def test_generate_refuses_numbers_json_cannot_hold_and_bad_names(in_tmp, capsys, line, key):
    (in_tmp / "spec.toml").write_text(f'[[config]]\nmodel = "tiny"\ngpus = 2\nstage = 2\n{line}\n')
    assert main(["generate", "--spec", "spec.toml", "--out", "configs"]) == 2
    assert f"'{key}'" in _one_error_line(capsys)
    assert not (in_tmp / "configs").exists()


def test_generated_configs_are_strict_json(in_tmp, capsys):
    (in_tmp / "spec.toml").write_text('[[config]]\nmodel = "tiny"\ngpus = 2\nstage = 2\nlr = 1e-5\n'
                                      'gradient_clipping = 0\n')
    assert main(["generate", "--spec", "spec.toml", "--out", "configs"]) == 0
    for path in (in_tmp / "configs").glob("*.json"):
        json.loads(path.read_text(), parse_constant=lambda name: pytest.fail(f"{name} in {path}"))


def test_report_without_matplotlib_writes_the_readme_and_says_so(in_tmp, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an environment without it looks like
    (in_tmp / "r.jsonl").write_bytes(CALIBRATION_RESULTS.read_bytes())
    assert main(["report", "r.jsonl", "--out", "rep"]) == 0
    out = capsys.readouterr().out
    assert "matplotlib is not installed" in out and "Traceback" not in out
    assert sorted(p.name for p in (in_tmp / "rep").iterdir()) == ["README.md"]


# ------------------------------------------------------------------ 6. bench never cuts a file that is not a results file


@pytest.fixture
def never_launch(monkeypatch):
    def fake(command, log_path, timeout_s, grace_s=0.0):
        Path(log_path).write_text("not launched\n")
        return bench.PointOutcome(exit_code=1, timed_out=False, wall_s=0.0, log_tail="not launched")

    monkeypatch.setattr(bench, "run_process", fake)


@pytest.mark.parametrize("dry_run", [True, False])
@pytest.mark.parametrize("content", [json.dumps(VALID_DS_CONFIG), json.dumps(VALID_DS_CONFIG, indent=1),
                                     "plain text\nwithout a final newline", "[1, 2, 3]\n"])
def test_bench_refuses_a_file_that_is_not_a_results_file_and_leaves_it(in_tmp, capsys, never_launch, content,
                                                                       dry_run):
    (in_tmp / "ds.json").write_text(content)
    argv = ["bench", "--model", "tiny", "--stages", "2", "--seq-len", "64", "--tiles", "2", "--results", "ds.json"]
    assert main(argv + (["--dry-run"] if dry_run else [])) == 2
    assert "not a zeroplan results file" in _one_error_line(capsys)
    assert (in_tmp / "ds.json").read_text() == content
    assert sorted(os.listdir(in_tmp)) == ["ds.json"]


def test_a_valid_last_record_without_a_newline_is_kept_not_rerun(tmp_path, never_launch):
    results = tmp_path / "r.jsonl"
    specs = sweep.expand(sweep.Grid(models=("tiny",), stages=(1, 2), seq_lens=(64,), tiles=(2,),
                                    run=dict(steps=2, warmup_steps=1)))
    done = {"point_id": specs[0].point_id(), "status": "ok", "marker": "measured before"}
    results.write_text(json.dumps(done))
    summary = bench.run_sweep(specs, results, bench.default_command_for("torchrun"), timeout_s=5)
    assert (summary.skipped, summary.ran) == (1, 1)
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    assert lines[0] == done and lines[1]["point_id"] == specs[1].point_id()


def test_repair_cuts_only_a_torn_tail_of_a_results_file(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_bytes(b'{"point_id": "a"}\n{"point_id": "to')
    assert jsonl.repair(path) == len(b'{"point_id": "to')
    assert path.read_bytes() == b'{"point_id": "a"}\n'
    path.write_bytes(b'{"point_id": "a"}\n{"point_id": "b"}')
    assert jsonl.repair(path) == 0 and path.read_bytes() == b'{"point_id": "a"}\n{"point_id": "b"}\n'
    config = tmp_path / "ds.json"
    config.write_bytes(b'{\n  "train_batch_size": 8\n}')
    with pytest.raises(InvalidInput, match="not a zeroplan results file"):
        jsonl.repair(config)
    assert config.read_bytes() == b'{\n  "train_batch_size": 8\n}'


# ------------------------------------------------------------------ 7. Ctrl-C / SIGTERM during a multi-rank point

FAKE_RANKS = textwrap.dedent("""
    import subprocess, sys, time
    # like torchrun: each rank in a session of its own, so the launcher's process group misses them
    ranks = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
             for _ in range(2)]
    open(sys.argv[1], "w").write(" ".join(str(rank.pid) for rank in ranks))
    for rank in ranks:
        rank.wait()
""")
DRIVER = textwrap.dedent("""
    import sys
    from zeroplan.lab import bench
    from zeroplan.cli.main import main
    ranks, pids = sys.argv.pop(1), sys.argv.pop(1)
    bench.default_command_for = lambda launcher: (
        lambda spec, spec_path, result_path, port: [sys.executable, ranks, pids])
    sys.exit(main(sys.argv[1:]))
""")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_sweep_kills_every_rank_and_says_how_to_resume(tmp_path, sig):
    (tmp_path / "ranks.py").write_text(FAKE_RANKS)
    (tmp_path / "driver.py").write_text(DRIVER)
    pids = tmp_path / "pids.txt"
    argv = [sys.executable, str(tmp_path / "driver.py"), str(tmp_path / "ranks.py"), str(pids), "bench", "--model",
            "tiny", "--stages", "2", "--seq-len", "64", "--tiles", "2", "--gpus", "2", "--results",
            str(tmp_path / "r.jsonl")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ranks: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while not (pids.exists() and len(pids.read_text().split()) == 2) and time.monotonic() < deadline:
            time.sleep(0.05)
        ranks = [int(pid) for pid in pids.read_text().split()]
        time.sleep(0.6)  # let the sweep see the ranks once (it looks at the tree every 0.5 s)
        process.send_signal(sig)
        _, err = process.communicate(timeout=60)
        assert process.returncode == 130
        assert "zeroplan: interrupted:" in err and "run the same command again" in err and "--results" in err
        assert [pid for pid in ranks if _alive(pid)] == []  # gone before the sweep exited
        assert not (tmp_path / "r.jsonl").read_text().strip()  # the stopped point is not recorded
    finally:
        for pid in ranks:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if process.poll() is None:
            process.kill()


def test_run_process_kills_ranks_in_their_own_sessions_on_timeout(tmp_path):
    (tmp_path / "ranks.py").write_text(FAKE_RANKS)
    pids = tmp_path / "pids.txt"
    outcome = bench.run_process([sys.executable, str(tmp_path / "ranks.py"), str(pids)], tmp_path / "log.txt",
                                timeout_s=3, grace_s=1)
    ranks = [int(pid) for pid in pids.read_text().split()]
    try:
        assert outcome.timed_out and len(ranks) == 2
        assert [pid for pid in ranks if _alive(pid)] == []
    finally:
        for pid in ranks:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


# ------------------------------------------------------------------ 8. two sweeps in one folder

MARKING_RUNNER = textwrap.dedent("""
    import json, os, sys, time
    spec_path, result_path, marker = sys.argv[1:4]
    spec = json.load(open(spec_path))
    print("log of", marker, flush=True)
    time.sleep(0.3)
    with open(result_path + ".tmp", "w") as handle:
        json.dump({"status": "ok", "marker": marker, "stage": spec["stage"]}, handle)
    os.replace(result_path + ".tmp", result_path)
""")


def test_two_sweeps_in_one_folder_keep_their_points_apart(tmp_path):
    runner = tmp_path / "runner.py"
    runner.write_text(MARKING_RUNNER)
    specs = sweep.expand(sweep.Grid(models=("tiny",), stages=(1, 2, 3), seq_lens=(64,), tiles=(2,),
                                    run=dict(steps=2, warmup_steps=1)))

    def command_for(marker):
        return lambda spec, spec_path, result_path, port: [sys.executable, str(runner), str(spec_path),
                                                           str(result_path), marker]

    errors = []

    def sweep_into(name):
        try:
            bench.run_sweep(specs, tmp_path / f"{name}.jsonl", command_for(name), timeout_s=60)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=sweep_into, args=(name,)) for name in ("first", "second")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    for name in ("first", "second"):
        records = [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
        assert len(records) == 3 and {record["marker"] for record in records} == {name}
        for record in records:
            assert Path(record["log"]).read_text() == f"log of {name}\n"
            assert Path(record["log"]).parent.parent == tmp_path / "points" / name


# ------------------------------------------------------------------ 9. calibrate --out writes a whole profile


def test_calibrate_out_outside_the_project_writes_a_loadable_profile(in_tmp, capsys):
    results = in_tmp / 'runs "q" \\ \'s.jsonl'
    results.write_bytes(CALIBRATION_RESULTS.read_bytes())
    assert main(["calibrate", str(results), "--gpu", "h100", "--out", "cal.toml", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    profile = load_gpu("cal.toml")
    reference = load_gpu("h100")
    assert profile.name == reference.name and profile.memory_bytes == reference.memory_bytes
    assert profile.calibrated["source"] == printed["source"] and str(results) in profile.calibrated["source"]
    assert {k: v for k, v in profile.calibrated.items() if k != "source"} == printed["calibrated"]
    assert main(["estimate", "--model", "tiny", "--gpus", "1", "--gpu", "cal.toml"]) == 0
    written = (in_tmp / "cal.toml").read_text()
    assert "# " in written and written.count("[calibrated]") == 1  # the bundled file's comments (sources) kept


def test_calibrate_out_from_a_json_profile_writes_toml_that_loads(in_tmp, capsys):
    data = tomllib.loads(H100.read_text())
    data.pop("calibrated")
    (in_tmp / "mine.json").write_text(json.dumps(data))
    (in_tmp / "r.jsonl").write_bytes(CALIBRATION_RESULTS.read_bytes())
    assert main(["calibrate", "r.jsonl", "--gpu", "mine.json", "--out", "cal.toml"]) == 0
    assert load_gpu("cal.toml").calibrated["runs"] == 4
    assert main(["calibrate", "r.jsonl", "--gpu", "h100", "--out", "cal.json"]) == 2
    assert "must end in .toml" in _one_error_line(capsys)


# ------------------------------------------------------------------ 10. recommend does not replace a file by surprise


@pytest.mark.parametrize("extra", [[], ["--json"], ["--out", "ds_config.json"]])
def test_recommend_refuses_to_replace_an_existing_config(in_tmp, capsys, skip_deepspeed_validation, extra):
    (in_tmp / "ds_config.json").write_text('{"mine": true}')
    assert main(["recommend", "--model", "tiny", "--gpus", "1", *extra]) == 2
    assert "--force" in _one_error_line(capsys)
    assert (in_tmp / "ds_config.json").read_text() == '{"mine": true}' and os.listdir(in_tmp) == ["ds_config.json"]
    assert main(["recommend", "--model", "tiny", "--gpus", "1", "--force", *extra]) == 0
    assert "zero_optimization" in json.loads((in_tmp / "ds_config.json").read_text())


def test_recommend_never_replaces_a_read_only_config(in_tmp, capsys, skip_deepspeed_validation):
    target = in_tmp / "ds.json"
    target.write_text('{"mine": true}')
    target.chmod(stat.S_IRUSR | stat.S_IRGRP)
    assert main(["recommend", "--model", "tiny", "--gpus", "1", "--out", "ds.json", "--force"]) == 2
    assert "read-only" in _one_error_line(capsys)
    assert target.read_text() == '{"mine": true}'


# ------------------------------------------------------------------ 11. dataset images stay in the dataset's folder


def test_dataset_images_outside_the_dataset_folder_are_refused(tmp_path):
    from zeroplan.runner.data import JsonlData, image_path

    data = tmp_path / "data"
    (data / "img").mkdir(parents=True)
    (data / "img" / "a.png").write_bytes(b"png")
    (tmp_path / "secret.png").write_bytes(b"png")
    os.symlink(tmp_path / "secret.png", data / "img" / "link.png")
    assert image_path(data, "img/a.png") == (data / "img" / "a.png").resolve()
    for name in ("../secret.png", "img/../../secret.png", str(tmp_path / "secret.png"), "img/link.png", "/etc/passwd"):
        with pytest.raises(InvalidInput, match="outside the dataset's folder"):
            image_path(data, name)
    dataset = data / "train.jsonl"
    dataset.write_text(json.dumps({"image": "img/a.png", "conversations": []}) + "\n"
                       + json.dumps({"image": "../../x.png", "conversations": []}) + "\n")
    with pytest.raises(InvalidInput, match="outside the dataset's folder"):
        JsonlData(str(dataset), None, 0, None, rank=0, world_size=1)


def test_long_runs_are_replayed_over_a_bounded_number_of_steps():
    from zeroplan.core.run import MAX_STEPS, RunSpec
    from zeroplan.lab.calibrate import MAX_REPLAYED_STEPS, replayed_steps
    from zeroplan.lab.records import drawn_tiles

    tiles = tuple(range(100_000, 0, -1))
    bounded = replayed_steps(tiles)
    assert len(bounded) == MAX_REPLAYED_STEPS and bounded[-1] == max(tiles) and bounded[:3] == tiles[:3]
    assert replayed_steps((3, 1, 2)) == (3, 1, 2)
    with pytest.raises(InvalidInput, match="steps must be at most"):
        RunSpec(steps=MAX_STEPS + 1)
    spec = RunSpec(steps=MAX_STEPS, warmup_steps=1, world_size=8, micro_batch=4).to_dict()
    assert drawn_tiles({"spec": spec, "model": "tiny"}) == (spec["tiles"], "spec (too many draws to replay)")


@pytest.mark.parametrize("key, value", [("grad_ckpt", []), ("packed", {"x": 1}), ("compile", [1]),
                                        ("fixed_tiles", "yes"), ("model", None), ("gpu", 3), ("frozen", 5),
                                        ("frozen", [1])])
def test_a_run_spec_of_the_wrong_kinds_is_one_error(key, value):
    """Found by the calibrate fuzzing: a list for grad_ckpt made an unhashable TrainShape."""
    from zeroplan.core.run import RunSpec

    with pytest.raises(InvalidInput, match=key):
        RunSpec.from_dict({**RunSpec().to_dict(), key: value})
