"""Item 12 of issue 16: the profiles are package data, so a non-editable install can plan."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_carries_every_profile(tmp_path):
    pytest.importorskip("setuptools")
    # Build from a copy: setuptools writes build/ and *.egg-info into the source folder.
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "reports",
                                                                "__pycache__", ".pytest_cache"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                            "--wheel-dir", str(tmp_path), str(source)],
                           capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next(tmp_path.glob("zeroplan-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    profiles = sorted(str(path.relative_to(ROOT)) for path in (ROOT / "zeroplan" / "profiles").glob("*/*.toml"))
    assert len(profiles) > 20
    assert [name for name in profiles if name not in names] == []
    assert "zeroplan/cli/main.py" in names


def test_the_base_install_does_not_pull_the_heavy_stack():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = " ".join(project["dependencies"]).lower()
    for heavy in ("torch", "deepspeed", "transformers", "matplotlib"):
        assert heavy not in base
