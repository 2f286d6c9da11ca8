"""A user's first minutes: the README's main command run again prints its plan again, replacing
the config zeroplan wrote the first time, while a file zeroplan did not write (or that was
changed since) is never replaced without --force, and the plan is printed even then; bad input
is reported before the output file is looked at, whatever the working folder holds."""

from __future__ import annotations

import json

import pytest

from zeroplan.adapters import written
from zeroplan.cli.main import main

PLAN = ["recommend", "--model", "tiny", "--gpus", "1"]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_main_command_twice_prints_the_plan_twice(in_tmp, capsys, skip_deepspeed_validation):
    for gpus in ("1", "1", "2"):
        assert main(["recommend", "--model", "tiny", "--gpus", gpus, "--json"]) == 0
        payload = json.loads(capsys.readouterr().out)
        assert payload["config_written"] and payload["recommended"]
        assert json.loads((in_tmp / "ds_config.json").read_text()) == payload["deepspeed_config"]


def test_a_hand_edited_config_is_kept_and_the_plan_still_printed(in_tmp, capsys, skip_deepspeed_validation):
    assert main(PLAN) == 0
    capsys.readouterr()
    edited = (in_tmp / "ds_config.json").read_text().replace('"steps_per_print"', '"steps_per_print" ', 1)
    (in_tmp / "ds_config.json").write_text(edited)
    assert main(PLAN) == 2
    out, err = capsys.readouterr()
    assert "ZeRO" in out and "not the unchanged file zeroplan wrote" in err and len(err.strip().splitlines()) == 1
    assert (in_tmp / "ds_config.json").read_text() == edited
    assert main([*PLAN, "--force"]) == 0


def test_a_forged_record_cannot_make_a_users_file_replaceable(in_tmp, capsys, skip_deepspeed_validation):
    (in_tmp / "ds_config.json").write_text('{"mine": true}')
    written.remember(in_tmp / "ds_config.json", '{"other": true}')  # a record for other bytes
    assert main(PLAN) == 2
    assert (in_tmp / "ds_config.json").read_text() == '{"mine": true}'


def test_no_record_where_others_can_write_the_state_folder(tmp_path, monkeypatch):
    folder = tmp_path / "state"
    folder.mkdir(mode=0o777)
    folder.chmod(0o777)
    monkeypatch.setenv(written.STATE_ENV, str(folder))
    target = tmp_path / "ds.json"
    target.write_text("{}")
    written.remember(target, "{}")
    assert not written.wrote_unchanged(target)


@pytest.mark.parametrize("argv,needle", [
    (["recommend", "--model", "8b", "--gpus", "24", "--global-batch", "128"], "split evenly"),
    (["recommend", "--model", "8b", "--gpus", "8", "--headroom", "nan"], "headroom"),
])
def test_bad_input_is_named_even_beside_a_users_config(in_tmp, capsys, argv, needle):
    (in_tmp / "ds_config.json").write_text('{"mine": true}')
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1
