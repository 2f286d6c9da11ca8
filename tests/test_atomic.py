"""zeroplan.core.atomic and the commands that use it: a failure half-way leaves the old file intact and
no temporary file or new folder behind."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

import zeroplan.core.atomic as atomic
from zeroplan.core.atomic import write_atomic, write_files_atomic
from zeroplan.cli.main import main
from zeroplan.core.errors import InvalidInput


def _entries(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def test_write_replaces_the_content_and_keeps_the_mode(tmp_path):
    target = tmp_path / "ds.json"
    target.write_text("old")
    target.chmod(0o640)
    write_atomic(target, "new ü")
    assert target.read_text(encoding="utf-8") == "new ü"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert _entries(tmp_path) == {"ds.json"}


def test_a_new_file_is_readable_by_others_not_mkstemps_0600(tmp_path):
    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "new.json", b"{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "new.json").stat().st_mode) == 0o644


def test_a_failing_rename_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "ds.json"
    target.write_text("old")

    def refuse(src, dst):
        raise OSError(28, "No space left on device", str(dst))

    monkeypatch.setattr(atomic.os, "replace", refuse)
    with pytest.raises(InvalidInput, match="No space left"):
        write_atomic(target, "new")
    assert target.read_text() == "old"
    assert _entries(tmp_path) == {"ds.json"}


def test_a_write_failing_half_way_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "ds.json"
    target.write_text("old")

    def fail_fsync(descriptor):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(atomic.os, "fsync", fail_fsync)
    with pytest.raises(InvalidInput, match="Input/output error"):
        write_atomic(target, "x" * 100_000)
    assert target.read_text() == "old"
    assert _entries(tmp_path) == {"ds.json"}


def test_an_interrupt_half_way_leaves_no_temp_either(tmp_path, monkeypatch):
    target = tmp_path / "ds.json"
    target.write_text("old")

    def interrupted(descriptor):
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, "new")
    assert target.read_text() == "old" and _entries(tmp_path) == {"ds.json"}


def test_several_files_are_all_written_or_none(tmp_path):
    (tmp_path / "a.json").write_text("old a")
    (tmp_path / "b.json").mkdir()  # the second target cannot be written
    with pytest.raises(InvalidInput, match="folder"):
        write_files_atomic({tmp_path / "a.json": "new a", tmp_path / "b.json": "new b"})
    assert (tmp_path / "a.json").read_text() == "old a"
    assert _entries(tmp_path) == {"a.json", "b.json"}


def test_folders_made_for_a_write_that_fails_are_removed(tmp_path):
    target = tmp_path / "new" / "deeper" / ("x" * 300 + ".json")  # the name is past NAME_MAX
    with pytest.raises(InvalidInput):
        write_atomic(target, "{}")
    assert _entries(tmp_path) == set()


def test_a_path_under_a_regular_file_is_one_error(tmp_path):
    (tmp_path / "plain").write_text("x")
    with pytest.raises(InvalidInput, match="cannot write"):
        write_atomic(tmp_path / "plain" / "x.json", "{}")
    assert _entries(tmp_path) == {"plain"}


def test_a_device_or_pipe_is_never_replaced(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(InvalidInput, match="not a regular file"):
        write_atomic(fifo, "{}")
    assert stat.S_ISFIFO(fifo.lstat().st_mode) and _entries(tmp_path) == {"pipe"}


def test_recommend_failing_to_serialize_leaves_the_old_config(tmp_path, monkeypatch, skip_deepspeed_validation, capsys):
    target = tmp_path / "ds.json"
    target.write_text('{"old": true}')

    def broken(config):
        return json.dumps({"bad": object()})

    monkeypatch.setattr("zeroplan.core.dsconfig.to_json", broken)
    with pytest.raises(TypeError):
        main(["recommend", "--model", "tiny", "--gpus", "1", "--out", str(target), "--force"])
    assert target.read_text() == '{"old": true}' and _entries(tmp_path) == {"ds.json"}


def test_recommend_failing_to_rename_leaves_the_old_config(tmp_path, monkeypatch, skip_deepspeed_validation, capsys):
    target = tmp_path / "ds.json"
    target.write_text('{"old": true}')
    monkeypatch.setattr(atomic.os, "replace", lambda src, dst: (_ for _ in ()).throw(OSError(28, "No space", dst)))
    assert main(["recommend", "--model", "tiny", "--gpus", "1", "--out", str(target), "--force"]) == 2
    assert "No space" in capsys.readouterr().err
    assert target.read_text() == '{"old": true}' and _entries(tmp_path) == {"ds.json"}


def test_generate_failing_half_way_writes_no_config(tmp_path, monkeypatch, capsys):
    spec = tmp_path / "spec.toml"
    spec.write_text('[[config]]\nmodel = "tiny"\ngpus = 2\nstage = 2\nseq_len = 512\n'
                    '[[config]]\nmodel = "tiny"\ngpus = 4\nstage = 3\nseq_len = 512\n')
    calls = []

    def fsync_fails_second(descriptor):
        calls.append(descriptor)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", fsync_fails_second)
    assert main(["generate", "--spec", str(spec), "--out", str(tmp_path / "configs")]) == 2
    assert len(calls) == 2 and _entries(tmp_path) == {"spec.toml"}


def _results(tmp_path: Path) -> Path:
    record = {"point_id": "p0", "model": "tiny", "stage": 2, "status": "ok", "micro_batch": 1, "seq_len": 64,
              "tiles": 2, "grad_ckpt": True, "world_size": 1, "measured_peak_allocated_bytes": 1 << 30,
              "predicted_peak_bytes": 1 << 30, "tokens_per_s": 100.0}
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps(record) + "\n")
    return path


def test_report_failing_half_way_keeps_the_old_report(tmp_path, monkeypatch, capsys):
    results = _results(tmp_path)
    out = tmp_path / "rep"
    assert main(["report", str(results), "--out", str(out)]) == 0
    before = {p: p.read_bytes() for p in out.iterdir()}

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device", str(out / "README.md"))

    monkeypatch.setattr(atomic, "_write_temp", broken)
    assert main(["report", str(results), "--out", str(out)]) == 2
    assert {p: p.read_bytes() for p in out.iterdir()} == before


def test_report_into_a_new_folder_that_fails_leaves_no_folder(tmp_path, monkeypatch, capsys):
    results = _results(tmp_path)
    monkeypatch.setattr(atomic.os, "replace", lambda src, dst: (_ for _ in ()).throw(OSError(28, "No space", dst)))
    assert main(["report", str(results), "--out", str(tmp_path / "new" / "rep")]) == 2
    assert _entries(tmp_path) == {"results.jsonl"}


def test_a_results_record_that_cannot_be_json_leaves_the_file_as_it_was(tmp_path):
    from zeroplan.lab import jsonl

    path = _results(tmp_path)
    before = path.read_bytes()
    with pytest.raises(InvalidInput):
        jsonl.append(path, {"point_id": "p1", "loss": float("nan")})
    assert path.read_bytes() == before
