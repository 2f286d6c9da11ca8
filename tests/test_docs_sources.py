"""Item 21 of issue 16: the README speaks to a user on their own GPUs, sweeps name no device,
profiles cite public sources, and every declared heavy dependency has a user."""

import re
import tomllib
from pathlib import Path

from zeroplan.core.profiles import PROFILES_DIR
from zeroplan.lab.bench import pending
from zeroplan.lab.sweep import load_sweep

ROOT = Path(__file__).resolve().parents[1]


def _section(text: str, title: str) -> str:
    start = text.index(title)
    end = text.find("\n## ", start + len(title))
    return text[start:end if end > 0 else None]


def test_the_readme_shows_a_user_benchmarking_their_own_node():
    readme = (ROOT / "README.md").read_text()
    section = _section(readme, "## Measuring on your own GPUs")
    for step in ("pip install \"zeroplan[train]\"", "zeroplan bench --sweep", "zeroplan report", "zeroplan calibrate"):
        assert step in section
    for internal in ("device_run.sh", ".whl", "device tool", "lent", "KINDS.md"):
        assert internal not in readme


def test_no_sweep_hard_codes_the_device_and_committed_reports_still_resume():
    for sweep in ROOT.glob("benchmarks/*.toml"):
        data = tomllib.loads(sweep.read_text())
        assert "gpu" not in data.get("run", {}), sweep.name
    for name in ("h100_stages", "h100_stages_4b"):  # measured with gpu = "h100-80gb" in [run]
        specs = load_sweep(ROOT / "benchmarks" / f"{name}.toml").expand()
        assert specs and pending(specs, ROOT / "reports" / name / "results.jsonl") == []


def test_profiles_cite_public_sources_not_files_outside_the_repository():
    for path in sorted(PROFILES_DIR.glob("*/*.toml")):
        text = path.read_text()
        assert "shared/" not in text and "internvl-facts" not in text and "KINDS.md" not in text, path.name
        data = tomllib.loads(text)
        if path.parent.name in ("models", "vision") and not path.stem.startswith("tiny") and "108b" not in path.stem:
            assert re.search(r"https://huggingface\.co/OpenGVLab/[\w.-]+", data["source"]), path.name
            assert data["source"].count("config.json") >= 1, path.name


def test_accelerate_is_declared_only_with_its_reason():
    # Nothing in zeroplan imports accelerate; transformers' Trainer (the HF Trainer path) needs it.
    pyproject = (ROOT / "pyproject.toml").read_text().splitlines()
    index = next(i for i, line in enumerate(pyproject) if line.strip().startswith('"accelerate'))
    assert "Trainer" in " ".join(pyproject[index - 2:index])
    pinned = next(line for line in (ROOT / "requirements/cpu.txt").read_text().splitlines()
                  if line.startswith("accelerate=="))
    assert "Trainer" in pinned
