"""Every verb under hostile arguments and files: no traceback, an allowed exit status, one-line
errors, nothing written on failure; and on success each verb writes only where it was told.

The strategies and the checker live in benchmarks/fuzz_cli.py (which runs them for 10,000+
invocations); here each verb gets ~150 generated invocations (calibrate 60) plus fixed regression cases.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
from pathlib import Path

import pytest

from zeroplan.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("fuzz_cli", ROOT / "benchmarks" / "fuzz_cli.py")
fuzz_cli = importlib.util.module_from_spec(_spec)
sys.modules["fuzz_cli"] = fuzz_cli
_spec.loader.exec_module(fuzz_cli)

EXAMPLES_PER_VERB = 150
# calibrate's well-formed invocations fit the step-time model (two seconds each): fewer of them keep
# its share of the suite near the other verbs' (benchmarks/fuzz_cli.py explores it at full count).
EXAMPLES = {"calibrate": 60}
# The suite replays the same examples on every run, so a red CI is a change in the code, not a new draw;
# ZP_FUZZ_RANDOM=1 explores fresh ones (as benchmarks/fuzz_cli.py does), and what it finds becomes a fixed case.
SEED = None if os.environ.get("ZP_FUZZ_RANDOM") == "1" else 0


@pytest.fixture(scope="module")
def arena(tmp_path_factory):
    base = tmp_path_factory.mktemp("fuzz")
    fixtures = fuzz_cli.make_fixtures(base / "fixtures")
    scratch = base / "scratch"
    scratch.mkdir()
    with fuzz_cli.contained():
        yield fixtures, base / "fixtures", scratch


def _explain(bad) -> str:
    return "\n".join(f"{o.argv!r} -> {o.exit_code}: {o.problems}\n{o.escaped[-800:]}" for o in bad[:5])


@pytest.mark.parametrize("verb", fuzz_cli.VERBS)
def test_generated_invocations_keep_the_cli_contract(verb, arena):
    fixtures, fixtures_dir, scratch = arena
    outcomes: list = []
    examples = EXAMPLES.get(verb, EXAMPLES_PER_VERB)
    fuzz_cli.run_verb(verb, examples, fixtures, fixtures_dir, scratch, outcomes, SEED)
    assert len(outcomes) >= examples // 2
    bad = [o for o in outcomes if o.problems]
    assert not bad, _explain(bad)


HOSTILE_FILES = ("empty.json", "deep.json", "deep_object.json", "deep.toml", "deep_table.toml", "huge_int.json",
                 "huge_int.toml", "huge_int.jsonl", "huge_float.json", "nan.json", "wrong_types.json",
                 "wrong_types.toml", "array.json", "duplicate.json", "not_utf8.json", "binary.toml", "binary.jsonl",
                 "plain.txt", "ten_mb.json", "a_folder", "loop_a.json", "loop_a.toml", "fifo.jsonl",
                 "config_no_newline.json")
FILE_TAKERS = {
    "validate": lambda p: ["validate", p, "--model", "tiny", "--gpus", "1"],
    "report": lambda p: ["report", p, "--out", "rep"],
    "bench --sweep": lambda p: ["bench", "--sweep", p, "--results", "r.jsonl", "--dry-run"],
    "bench --results": lambda p: ["bench", "--model", "tiny", "--results", p, "--dry-run"],
    "generate --spec": lambda p: ["generate", "--spec", p, "--out", "configs"],
    "estimate --model": lambda p: ["estimate", "--model", p, "--gpus", "1"],
    "estimate --gpu": lambda p: ["estimate", "--model", "tiny", "--gpus", "1", "--gpu", p],
    "calibrate": lambda p: ["calibrate", p, "--gpu", "h100"],
    "calibrate --gpu": lambda p: ["calibrate", "{calib}", "--gpu", p],
}


@pytest.mark.parametrize("taker", sorted(FILE_TAKERS))
def test_every_hostile_file_is_one_line_and_writes_nothing(taker, arena):
    fixtures, fixtures_dir, scratch = arena
    bad = []
    for name in HOSTILE_FILES:
        argv = [word.format(calib=fixtures["calib.jsonl"]) for word in FILE_TAKERS[taker](str(fixtures[name]))]
        outcome = fuzz_cli.invoke(argv, scratch, fixtures_dir)
        if outcome.problems or (outcome.exit_code != 2 and taker != "bench --results"):
            bad.append(outcome)
    assert not bad, _explain(bad) + "\n" + "\n".join(f"{o.argv[1:3]} -> {o.exit_code} {o.stderr!r}" for o in bad)


UNWRITABLE = ("{plain}/x.json", "{plain}/sub/x.json", "{folder}", "x" * 300 + ".json", "new/" + "x" * 300 + ".json")
WRITERS = {
    "recommend": lambda p: ["recommend", "--model", "tiny", "--gpus", "1", "--out", p],
    "generate": lambda p: ["generate", "--spec", "{spec}", "--out", p],
    "report": lambda p: ["report", "{results}", "--out", p],
    "bench": lambda p: ["bench", "--model", "tiny", "--stages", "2", "--results", p],
    "calibrate": lambda p: ["calibrate", "{results}", "--gpu", "h100", "--out", p],
}


@pytest.mark.parametrize("argv", [
    ["recommend", "--model", "tiny", "--gpus", "1", "--out="],  # found by the fuzzer: `--out=` arrives as '.'
    ["recommend", "--model", "tiny", "--gpus", "1", "--out", "{folder}"],
    ["calibrate", "{results}", "--gpu", "h100", "--out="],
    ["calibrate", "{results}", "--gpu", "h100", "--out", "{folder}"],
])
def test_an_output_that_names_no_file_is_one_line_and_leaves_nothing(argv, arena):
    fixtures, fixtures_dir, scratch = arena
    names = {"folder": fixtures["a_folder"], "results": fixtures["calib.jsonl"]}
    outcome = fuzz_cli.invoke([word.format(**names) for word in argv], scratch, fixtures_dir)
    assert outcome.exit_code == 2 and not outcome.problems, (outcome.problems, outcome.stderr)
    assert "--out" in outcome.stderr and not outcome.written_on_failure


@pytest.mark.parametrize("writer", sorted(WRITERS))
@pytest.mark.parametrize("target", UNWRITABLE)
def test_an_unwritable_output_is_one_line_and_leaves_nothing(writer, target, arena):
    fixtures, fixtures_dir, scratch = arena
    names = {"plain": fixtures["plain.txt"], "folder": fixtures["a_folder"], "spec": fixtures["spec.toml"],
             "results": fixtures["calib.jsonl"] if writer == "calibrate" else fixtures["results.jsonl"]}
    argv = [word.format(**names) for word in WRITERS[writer](target.format(**names))]
    if writer in ("generate", "report") and target == "{folder}":
        pytest.skip("a folder is a valid output folder for generate and report")
    outcome = fuzz_cli.invoke(argv, scratch, fixtures_dir)
    assert outcome.exit_code == 2 and not outcome.problems, (outcome.problems, outcome.stderr)


def test_an_exception_escaping_main_is_caught_by_the_checker(arena, monkeypatch):
    """The checker itself can fail: a bug turned into a traceback is reported, not swallowed."""
    fixtures, fixtures_dir, scratch = arena
    import zeroplan.cli.probe as probe_cli

    monkeypatch.setattr(probe_cli, "probe_payload", lambda result: 1 / 0)
    outcome = fuzz_cli.invoke(["probe"], scratch, fixtures_dir)
    assert outcome.exit_code is None and any("ZeroDivisionError" in p for p in outcome.problems)


def test_the_harness_drives_every_verb(arena):
    from zeroplan.cli.main import VERBS

    fixtures, _, _ = arena
    assert set(fuzz_cli.VERBS) == set(VERBS) == set(fuzz_cli._options(fixtures))


def test_help_and_no_arguments_exit_0():
    assert main(["--help"]) == 0
    assert main([]) == 0
    assert main(["estimate", "--help"]) == 0


# ------------------------------------------------------------ where a successful command writes


def _tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("zeroplan.adapters.validator_process.BackgroundValidator", fuzz_cli.InProcessValidator)
    monkeypatch.setattr("zeroplan.lab.bench.run_process", fuzz_cli.never_launch)
    return tmp_path


def test_recommend_writes_only_its_out_file(in_tmp, capsys):
    assert main(["recommend", "--model", "tiny", "--gpus", "2", "--out", "cfg/ds.json", "--json"]) == 0
    assert _tree(in_tmp) == {"cfg", "cfg/ds.json"}
    assert json.loads((in_tmp / "cfg/ds.json").read_text())["zero_optimization"]["stage"] in (0, 1, 2, 3)


@pytest.mark.parametrize("argv", [
    ["estimate", "--model", "tiny", "--gpus", "2"],
    ["estimate", "--model", "tiny", "--gpus", "2", "--json"],
    ["probe"],
    ["probe", "--json"],
    ["bench", "--model", "tiny", "--results", "r/results.jsonl", "--dry-run"],
])
def test_read_only_verbs_write_nothing(in_tmp, argv, capsys):
    assert main(argv) == 0
    assert _tree(in_tmp) == set()


def test_validate_writes_nothing(in_tmp, capsys):
    (in_tmp / "ds.json").write_text(json.dumps(fuzz_cli.VALID_DS_CONFIG))
    assert main(["validate", "ds.json", "--model", "tiny", "--gpus", "8"]) in (0, 3)
    assert _tree(in_tmp) == {"ds.json"}


def test_generate_writes_only_json_files_in_its_out_folder(in_tmp, capsys):
    (in_tmp / "spec.toml").write_text(fuzz_cli.VALID_SPEC)
    assert main(["generate", "--spec", "spec.toml", "--out", "configs"]) == 0
    written = _tree(in_tmp) - {"spec.toml"}
    assert written and all(re.fullmatch(r"configs(/[^/]+\.json)?", path) for path in written), written
    assert main(["generate", "--spec", "spec.toml", "--out", "configs", "--check"]) == 0
    assert _tree(in_tmp) - {"spec.toml"} == written


def test_report_writes_only_inside_its_out_folder(in_tmp, capsys):
    (in_tmp / "results.jsonl").write_text(json.dumps(fuzz_cli.VALID_RECORD) + "\n")
    assert main(["report", "results.jsonl", "--out", "rep"]) == 0
    written = _tree(in_tmp) - {"results.jsonl"}
    assert "rep/README.md" in written and all(path == "rep" or path.startswith("rep/") for path in written)
    assert not [p for p in written if Path(p).name.startswith(".")], "temporary files left behind"


def test_bench_writes_only_its_results_file_and_the_points_folder(in_tmp, capsys):
    assert main(["bench", "--model", "tiny", "--stages", "2,3", "--seq-len", "64", "--tiles", "2",
                 "--results", "runs/results.jsonl"]) == 0
    written = _tree(in_tmp)
    assert {"runs", "runs/results.jsonl", "runs/points"} <= written
    assert all(p in ("runs", "runs/results.jsonl") or p.startswith("runs/points") for p in written), written
    lines = (in_tmp / "runs/results.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(line)["status"] == "error" for line in lines)


def test_nothing_in_zeroplan_executes_what_a_user_passes():
    """Profiles, specs, sweeps and configs are parsed as data: no eval/exec/pickle/yaml.load,
    no shell, no remote code."""
    pattern = re.compile(r"\beval\(|\bexec\(|\bpickle\b|yaml\.load|trust_remote_code|shell\s*=\s*True|os\.system"
                         r"|\bmarshal\b|os\.popen")
    hits = [f"{path}:{number}" for path in (ROOT / "zeroplan").rglob("*.py")
            for number, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert hits == []
    assert os.path.isfile(ROOT / "zeroplan" / "core" / "profiles.py")
