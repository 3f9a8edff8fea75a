"""The layout rules of the package, checked on its source: no import circles, top-level
modules free of heavy imports, services free of click."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import env_without

PACKAGE = Path(__file__).resolve().parent.parent / "sage_finetune_plugin"
HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "datasets", "accelerate", "trl", "gguf")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str) -> set[str]:
    """Package modules that ``name`` imports anywhere in its source (inside functions too)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            stem = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
            targets = [f"{stem}.{alias.name}" for alias in node.names] + [stem or ""]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def test_no_import_circles():
    """Every import counts, those inside functions and into package __init__ modules too."""
    graph = {name: imports_of(name) for name in MODULES}
    # A package importing its own submodules (to re-export them) is not a circle.
    for name in graph:
        if MODULES[name].name == "__init__.py":
            graph[name] = {t for t in graph[name] if not t.startswith(f"{name}.")}
    state: dict[str, int] = {}
    circles = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                circles.append(" -> ".join([*trail[trail.index(target) :], target]))
            elif target not in state:
                visit(target, [*trail, target])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not circles, circles


def test_services_never_import_click():
    """Only the command layer (cli/, the host adapter, the trainer's entry point) uses click."""
    allowed = (
        "sage_finetune_plugin.cli",
        "sage_finetune_plugin.host",
        "sage_finetune_plugin.trainer",
    )
    offenders = []
    for name, path in MODULES.items():
        if name.startswith(allowed):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and not node.level
                else []
            )
            if any(n.split(".")[0] == "click" for n in names):
                offenders.append(name)
    assert not offenders


def test_services_and_engines_never_print():
    offenders = []
    for name, path in MODULES.items():
        if name.startswith(
            ("sage_finetune_plugin.cli", "sage_finetune_plugin.host")
        ) or name.endswith(".trainer"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                offenders.append(f"{name}:{node.lineno}")
    assert not offenders


TOP_LEVEL = [
    *sorted(name for name, path in MODULES.items() if path.parent == PACKAGE),
    "sage_finetune_plugin.cli",
    "sage_finetune_plugin.training.runtime",
    # The export package: the command line reads its quantization table.
    *sorted(name for name in MODULES if name.startswith("sage_finetune_plugin.export")),
]


def test_top_level_modules_import_nothing_heavy(tmp_path: Path):
    """Each top-level module (and the command layer) imports with torch, transformers, peft,
    bitsandbytes, datasets and accelerate made unimportable."""
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    proc = subprocess.run(
        [sys.executable, "-c", code, *TOP_LEVEL],
        capture_output=True,
        text=True,
        timeout=120,
        env=env_without(tmp_path, *HEAVY),
    )
    assert proc.returncode == 0, proc.stderr
    assert len(TOP_LEVEL) > 15


@pytest.mark.parametrize("name", ["data", "training", "scoring"])
def test_engines_live_in_sub_packages(name: str):
    assert (PACKAGE / name / "__init__.py").is_file()
