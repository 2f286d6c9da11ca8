"""The package's layers and the one-way arrows between them, read from the source (every import,
those inside functions too): core < adapters < runner < lab < cli, each importing only its own
layer and those below. The core imports nothing but itself and the standard library."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "zeroplan"
LAYERS = ("core", "adapters", "runner", "lab", "cli")
# The heavy or third-party libraries that must never reach the core.
NEVER_IN_CORE = ("torch", "deepspeed", "transformers", "numpy", "typer", "rich", "click", "pynvml",
                 "matplotlib", "peft", "accelerate", "liger_kernel")


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def layer_of(module: str) -> str | None:
    """'zeroplan.core.memory' -> 'core'; the package's own top files have no layer."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def module_name(path: Path) -> str:
    if not path.is_relative_to(PACKAGE.parent):
        return path.stem
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """Every module a file imports, at any depth, as absolute names."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path).rsplit(".", 0 if path.name == "__init__.py" else 1)[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name == "zeroplan" or (node.level and not node.module):
                found += [(node.lineno, f"{name}.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, name))
    return found


def test_every_module_has_a_layer():
    stray = [module_name(p) for p in modules()
             if layer_of(module_name(p)) is None and module_name(p) not in ("zeroplan", "zeroplan.__main__")]
    assert stray == [], f"modules outside the layers: {stray}"


@pytest.mark.parametrize("path", modules(), ids=lambda p: module_name(p))
def test_arrows_point_down(path):
    here = layer_of(module_name(path))
    if here is None:
        return
    rank = LAYERS.index(here)
    wrong = [f"line {line}: {name}" for line, name in imports(path)
             if name.startswith("zeroplan.") and layer_of(name) is not None and LAYERS.index(layer_of(name)) > rank]
    assert wrong == [], f"{module_name(path)} ({here}) imports a higher layer: {wrong}"


@pytest.mark.parametrize("path", sorted((PACKAGE / "core").rglob("*.py")), ids=lambda p: module_name(p))
def test_core_is_pure(path):
    foreign = []
    for line, name in imports(path):
        top = name.split(".")[0]
        if name.startswith("zeroplan.core") or name == "zeroplan.core":
            continue
        if top in sys.stdlib_module_names and top not in NEVER_IN_CORE:
            continue
        foreign.append(f"line {line}: {name}")
    assert foreign == [], f"{module_name(path)} imports outside the core and the standard library: {foreign}"


def test_the_contract_catches_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    import torch\n    from zeroplan.cli import main\n")
    names = [name for _, name in imports(bad)]
    assert "torch" in names and "zeroplan.cli" in names
