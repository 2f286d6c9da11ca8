"""Item 17 of issue 16: validate names top-level keys DeepSpeed ignores; one headroom rule and one
set of exit statuses (0 fits, 3 does not fit, 2 bad input) for recommend, estimate and validate."""

import json
import re
from pathlib import Path

import pytest

from zeroplan.cli.main import main
from zeroplan.core.ds_keys import TOP_LEVEL_KEYS, unknown_top_level_keys
from zeroplan.core.fit import fit_verdict, usable_bytes


def test_a_misspelt_key_is_named_with_the_nearest_known_one():
    found = unknown_top_level_keys({"gradient_acumulation_steps": 4, "bf16": {"enabled": True}, "zzz": 1})
    assert found == ["gradient_acumulation_steps (did you mean gradient_accumulation_steps?)", "zzz"]


def test_every_listed_key_is_read_by_the_installed_deepspeed():
    deepspeed = pytest.importorskip("deepspeed")
    root = Path(deepspeed.__file__).parent
    text = "\n".join(path.read_text(errors="replace") for path in root.rglob("*.py"))
    missing = [key for key in sorted(TOP_LEVEL_KEYS) if not re.search(rf"[\"']{key}[\"']", text)]
    assert missing == []


def test_the_configs_zeroplan_writes_have_no_unknown_keys(tmp_path, capsys):
    for flavour in ("concrete", "hf"):
        out = tmp_path / f"{flavour}.json"
        assert main(["recommend", "--model", "8b", "--gpus", "8", "--gpu", "a100-80gb", "--flavour", flavour,
                     "--out", str(out), "--json"]) == 0
        capsys.readouterr()
        assert unknown_top_level_keys(json.loads(out.read_text())) == []


def test_one_headroom_rule():
    assert usable_bytes(100 * 2**30, 0.05) == int(95 * 2**30)
    verdict = fit_verdict(96 * 2**30, 100 * 2**30, 0.05)
    assert verdict["fits"] is False and verdict["margin_bytes"] < 0
    assert fit_verdict(96 * 2**30, 100 * 2**30, 0.0)["fits"] is True


def test_validate_reports_a_typo_and_judges_with_headroom(tmp_path, capsys):
    config = tmp_path / "ds.json"
    assert main(["recommend", "--model", "8b", "--gpus", "8", "--gpu", "a100-80gb", "--out", str(config),
                 "--json", "--trainer", "zeroplan"]) == 0  # a concrete config: its batch fields are numbers
    capsys.readouterr()
    data = json.loads(config.read_text())
    data["gradient_acumulation_steps"] = data.pop("gradient_accumulation_steps")
    config.write_text(json.dumps(data))
    args = ["validate", str(config), "--model", "8b", "--gpus", "8", "--gpu", "a100-80gb"]
    assert main(args) == 2  # the batch no longer adds up; the error names the typo
    assert "gradient_acumulation_steps (did you mean gradient_accumulation_steps?)" in capsys.readouterr().err
    data["gradient_accumulation_steps"] = data["gradient_acumulation_steps"]
    data["steps_per_prnt"] = data.pop("gradient_acumulation_steps")
    config.write_text(json.dumps(data))
    assert main(args) == 0  # consistent otherwise: it fits, and the typo is reported
    assert "steps_per_prnt (did you mean steps_per_print?)" in capsys.readouterr().out
    main(args + ["--json", "--headroom", "0.2"])
    payload = json.loads(capsys.readouterr().out)
    assert payload["headroom"] == 0.2 and payload["usable_bytes"] == int(payload["capacity_bytes"] * 0.8)
    assert payload["unknown_keys"] and payload["margin_bytes"] == payload["usable_bytes"] - payload["per_gpu_bytes"]["peak"]


def test_estimate_exits_3_when_the_plan_does_not_fit(capsys):
    fits = ["estimate", "--model", "8b", "--gpus", "8", "--stage", "1", "--gpu", "a100-80gb", "--json"]
    assert main(fits) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["fits"] is True and payload["verdict"] == "fits"
    # The same plan with all but a sliver kept free: same rule, now short.
    assert main(fits + ["--headroom", "0.89"]) == 3
    assert json.loads(capsys.readouterr().out)["fits"] is False
    assert main(fits[:-1] + ["--headroom", "2"]) == 2


def test_the_ci_workflow_installs_the_pinned_deepspeed():
    root = Path(__file__).resolve().parents[1]
    workflow = (root / ".github/workflows/zeroplan-configs.yml").read_text()
    pins = (root / "requirements/cpu.txt").read_text()
    assert "deepspeed==" in pins and "grep '^deepspeed==' requirements/cpu.txt" in workflow
    assert "install deepspeed -e" not in workflow and "install deepspeed " not in workflow
