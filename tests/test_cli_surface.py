"""Items 18-19 of issue 16: what the CLI says about itself and about inputs it cannot use."""

import json
from pathlib import Path

import pytest

from zeroplan.cli.main import main
from zeroplan.core.errors import InvalidInput
from zeroplan.core.plan import cluster
from zeroplan.core.profiles import load_gpu, load_model
from zeroplan.lab.calibrate import calibrate

ROOT = Path(__file__).resolve().parents[1]


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_calibrating_h100_runs_as_an_a100_names_the_device_mismatch():
    records = [json.loads(line) for line in (ROOT / "reports/h100_stages/results.jsonl").read_text().splitlines()
               if line.strip()]
    with pytest.raises(InvalidInput) as error:
        calibrate(records, load_gpu("a100-80gb"))
    message = str(error.value)
    assert "H100" in message and "--gpu h100-80gb" in message and "noisy" not in message


def test_version_and_short_help(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.startswith("zeroplan ")
    code, out, _ = run(capsys, "-h")
    assert code == 0 and "recommend" in out and "--version" in out
    code, out, _ = run(capsys, "calibrate", "-h")
    assert code == 0 and "[calibrated]" in out


def test_boolean_flags_show_as_flags(capsys):
    code, out, _ = run(capsys, "recommend", "--help")
    assert code == 0 and "--plain" in out and "--json" in out
    assert "<bool>" not in out and "BOOLEAN" not in out


def test_hugging_face_ids_resolve_to_the_bundled_profiles():
    assert load_model("OpenGVLab/InternVL2_5-8B").name == load_model("8b").name
    assert load_model("opengvlab/internvl2_5-8b").name == load_model("8b").name
    with pytest.raises(Exception):
        load_model("someone/InternVL2_5-8B")


def test_a_gpu_count_that_does_not_fill_nodes_of_8_says_what_is_accepted():
    with pytest.raises(InvalidInput) as error:
        cluster(12, None, None)
    message = str(error.value)
    assert "(2 × 8)" not in message and "--gpus-per-node 6" in message and "--gpus 16" in message
    assert cluster(12, None, 6) == (6, 2)
