"""Training methods and adapters as units: the built-in ones declare themselves, a method from
another package registers through the entry-point group and trains a task, a broken plugin is
listed as broken while the others work, and no code outside the method modules tests a
method's name."""

from __future__ import annotations

import ast
import json
import os
import re
import sys
from pathlib import Path

import pytest

from sage_finetune_plugin.data.formats import FORMATS
from sage_finetune_plugin.errors import ConfigError, PluginError
from sage_finetune_plugin.meta import load_meta
from sage_finetune_plugin.methods import REGISTRY, get_method, method_entries, method_names
from sage_finetune_plugin.quickstart import quickstart
from sage_finetune_plugin.runs import train_from_meta

from conftest import ASSETS, WORDS, run_cli

PLUGINS = ASSETS / "method_plugins"
PACKAGE = Path(__file__).resolve().parent.parent / "sage_finetune_plugin"


@pytest.fixture
def plugins(monkeypatch: pytest.MonkeyPatch):
    """The test packages (a working method, a broken one) importable and registered."""
    monkeypatch.syspath_prepend(str(PLUGINS))
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(PLUGINS), os.environ.get("PYTHONPATH")]))
    )
    REGISTRY.refresh()
    yield
    REGISTRY.refresh()
    for name in ("sage_qa_method", "sage_broken_method"):
        sys.modules.pop(name, None)


def test_the_built_in_methods_declare_what_they_train_on() -> None:
    assert method_names()[:4] == ["sft", "dpo", "orpo", "kto"]
    for name in ("sft", "dpo", "orpo", "kto"):
        unit = get_method(name)
        assert unit.name == name and unit.description and unit.reads
        assert unit.formats and set(unit.formats) <= set(FORMATS)
    assert get_method("dpo").memory.reference and not get_method("orpo").memory.reference
    with pytest.raises(ConfigError, match="Unknown method 'nope': choose one of sft, dpo"):
        get_method("nope")


def test_a_method_from_another_package_registers_and_trains(
    plugins, tiny_model_dir: Path, tmp_path: Path
) -> None:
    assert "qa-only" in method_names()
    records = [
        {
            "question": f"What is {i % 10} as a word?",
            "answer": f"It is {WORDS[i % 10]}.",
        }
        for i in range(24)
    ]
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))

    result = quickstart(
        "qa",
        data=data,
        method="qa-only",
        model=str(tiny_model_dir),
        root=tmp_path / "root",
        preset="cpu",
    )
    assert result.config.method == "qa-only"
    assert "qa-only: " in result.stats.summary()  # the method's own statistics line
    trained = train_from_meta(result.task_dir, max_steps=4, logging_steps=2, report_to="none")

    meta = load_meta(result.task_dir)
    assert meta.status == "trained" and meta.training["method"] == "qa-only"
    assert trained.metrics["qa_only_logged_steps"] == 3  # the method's own metric: 1, 2, 4
    assert [s["method"] for s in meta.stages] == ["qa-only"]
    assert (result.task_dir / "adapter" / "adapter_model.safetensors").is_file()
    # The method reads qa records only: an alpaca file is refused, naming what it reads.
    alpaca = tmp_path / "alpaca.jsonl"
    alpaca.write_text(json.dumps({"instruction": "x", "output": "y"}) + "\n")
    with pytest.raises(
        Exception, match="supervised fine-tuning on qa records trains on question/answer records"
    ):
        quickstart("custom", data=alpaca, method="qa-only", root=tmp_path / "root")


def test_a_broken_plugin_is_listed_as_broken_and_the_others_work(plugins) -> None:
    entries = {entry.name: entry for entry in method_entries()}
    assert entries["qa-only"].origin == "sage-qa-method" and not entries["qa-only"].broken
    assert entries["broken"].broken and "ImportError" in entries["broken"].error
    assert "broken" not in method_names() and get_method("sft").name == "sft"
    with pytest.raises(PluginError, match="The method 'broken' \\(from sage-broken-method"):
        get_method("broken")

    listing = run_cli("sage-finetune", "methods")
    assert listing.returncode == 0, listing.stderr
    assert "qa-only" in listing.stdout and "[sage-qa-method]" in listing.stdout
    assert re.search(r"^broken +broken \(sage-broken-method\)$", listing.stdout, re.MULTILINE)
    assert "sage_broken_method needs a package that is not installed" in listing.stderr
    rows = {
        row["name"]: row
        for row in json.loads(run_cli("sage-finetune", "methods", "--json").stdout)["methods"]
    }
    assert rows["broken"]["status"] == "broken" and rows["sft"]["status"] == "ok"
    help_text = run_cli("sage-finetune", "run", "--help").stdout
    assert "qa-only" in help_text  # a working plugin is a choice of --method
    host = run_cli("sage", "finetune", "list")
    assert host.returncode == 0  # the host and the other commands are not touched


def test_no_code_outside_the_method_modules_tests_a_method_by_name() -> None:
    """``method == "sft"`` or ``method in ("dpo", ...)`` belongs in methods/ only."""
    names = {"sft", "dpo", "orpo", "kto"}
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name == "methods":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Compare):
                continue
            operands = [node.left, *node.comparators]
            literals = {
                elt.value
                for operand in operands
                for elt in (
                    operand.elts
                    if isinstance(operand, ast.Tuple | ast.List | ast.Set)
                    else [operand]
                )
                if isinstance(elt, ast.Constant) and isinstance(elt.value, str)
            }
            mentions_method = any("method" in ast.unparse(operand) for operand in operands)
            if literals & names and mentions_method:
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not offenders
