"""Result lines read back as what they really ran: the largest micro-batch's tiles, recorded or
replayed from the runner's deterministic draw and checked against the recorded mean."""

import json
from pathlib import Path

import pytest

from zeroplan.lab.records import drawn_tiles, record_profile, step_tiles

REPORTS = Path(__file__).resolve().parent.parent / "reports"


def _records(sweep: str) -> list[dict]:
    return [json.loads(line) for line in (REPORTS / sweep / "results.jsonl").read_text().splitlines() if line.strip()]


def test_old_runs_are_replayed_with_the_first_draw_rule():
    record = next(r for r in _records("h100_stages") if r["spec"]["micro_batch"] == 1 and r["status"] == "ok")
    tiles, source = drawn_tiles(record)
    assert source.startswith("replayed first draw rule")
    assert tiles == 10  # the spec says 7: the first rule drew 4-10
    steps = step_tiles(record)
    measured = steps[record["spec"]["warmup_steps"]:]
    assert sum(measured) / len(measured) == pytest.approx(record["tiles_per_sample"])


def test_micro_batch_two_takes_the_largest_pair():
    record = next(r for r in _records("h100_stages") if r["spec"]["micro_batch"] == 2 and r["status"] == "ok")
    tiles, _ = drawn_tiles(record)
    assert tiles * 2 == max(step_tiles(record))


def test_recorded_step_tiles_win_and_accumulation_divides_them():
    record = next(r for r in _records("h100_fast_2b") if r["spec"].get("gradient_accumulation", 1) == 4)
    assert drawn_tiles(record) == (8, "recorded step_tiles")
    assert set(step_tiles(record)) == {8}


def test_a_draw_that_does_not_reproduce_keeps_the_spec():
    record = next(r for r in _records("h100_stages") if r["spec"]["micro_batch"] == 1 and r["status"] == "ok")
    altered = dict(record, tiles_per_sample=6.123)
    assert drawn_tiles(altered) == (7, "spec (draw not reproduced)")


def test_padded_vocabulary_is_the_runners():
    record = next(r for r in _records("h100_fast_2b") if r["spec"].get("vocab_multiple", 1) == 128)
    assert record_profile(record).llm.vocab_size % 128 == 0
