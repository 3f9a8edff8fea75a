"""Task paths and finetune_meta.json: names, resolution, old metas, atomic writes, corruption."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sage_finetune_plugin import meta as meta_mod
from sage_finetune_plugin.errors import MetaError, TaskError
from sage_finetune_plugin.meta import TaskMeta, load_meta, save_meta, update_meta
from sage_finetune_plugin.paths import (
    META_FILENAME,
    cache_dir,
    new_task_dir,
    resolve_task,
    task_root,
    validate_task_name,
)
from sage_finetune_plugin.task import scan_tasks

# What the original SAGE tool wrote, and nothing else.
ORIGINAL_META = {
    "task_type": "code",
    "model": "Qwen/Qwen2.5-Coder-1.5B-Instruct",
    "framework": "peft",
    "format": "alpaca",
    "dataset": "/home/u/.sage/finetune_output/code/data.json",
    "config": "/home/u/.sage/finetune_output/code/config.json",
    "output_dir": "/home/u/.sage/finetune_output/code",
    "code_root": "/home/u/project",
}


def make_task(root: Path, name: str, data: dict | str) -> Path:
    task = root / name
    task.mkdir(parents=True)
    text = data if isinstance(data, str) else json.dumps(data)
    (task / META_FILENAME).write_text(text)
    return task


def test_task_root_precedence(monkeypatch, tmp_path):
    assert task_root() == Path("finetune_output")
    monkeypatch.setenv("SAGE_FINETUNE_HOME", str(tmp_path / "env"))
    assert task_root() == tmp_path / "env"
    assert task_root(tmp_path / "opt") == tmp_path / "opt"


def test_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "sage-finetune"
    monkeypatch.setenv("SAGE_FINETUNE_CACHE", str(tmp_path / "own"))
    assert cache_dir() == tmp_path / "own"


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("", "empty"),
        ("a/b", "path separator"),
        ("a\\b", "path separator"),
        ("..", "'..'"),
        ("x..y", "'..'"),
        (".hidden", "starts with a dot"),
        ("tab\there", "unprintable"),
        ("with space", "spaces"),
        ("x" * 65, "longer than 64"),
    ],
)
def test_bad_task_names(name, why):
    with pytest.raises(TaskError, match=why):
        validate_task_name(name)


@pytest.mark.parametrize("name", ["code", "my-task_2", "v1.2", "x" * 64, "données"])
def test_good_task_names(name):
    assert validate_task_name(name) == name
    assert new_task_dir(name).name == name


def test_resolve_by_name_and_by_path(tmp_path):
    root = tmp_path / "root"
    task = make_task(root, "code", ORIGINAL_META)
    assert resolve_task("code", root) == task
    assert resolve_task(str(task), None) == task
    with pytest.raises(TaskError, match="Task 'nope' not found under"):
        resolve_task("nope", root)
    with pytest.raises(TaskError, match="does not exist"):
        resolve_task(str(tmp_path / "missing"), root)
    (tmp_path / "plain").mkdir()
    with pytest.raises(TaskError, match="not a task directory"):
        resolve_task(str(tmp_path / "plain"), root)


def test_original_meta_loads_and_keeps_its_keys(tmp_path):
    task = make_task(tmp_path, "code", {**ORIGINAL_META, "future_key": {"x": 1}})
    meta = load_meta(task)
    assert meta.task_type == "code" and meta.code_root == "/home/u/project"
    assert meta.status == "prepared" and meta.metrics == {}
    save_meta(task, meta)
    written = json.loads((task / META_FILENAME).read_text())
    for key, value in ORIGINAL_META.items():
        assert written[key] == value
    assert written["future_key"] == {"x": 1}  # unknown keys survive a rewrite
    assert written["schema_version"] == meta_mod.SCHEMA_VERSION
    assert written["plugin_version"]


def test_update_meta_changes_fields(tmp_path):
    task = make_task(tmp_path, "t", ORIGINAL_META)
    before = load_meta(task).updated_at
    meta = update_meta(task, status="trained", metrics={"global_step": 7, "train_loss": 1.5})
    assert meta.status == "trained" and meta.steps == 7 and meta.last_train_loss == 1.5
    assert load_meta(task).status == "trained"
    assert load_meta(task).updated_at >= before
    with pytest.raises(MetaError, match="unknown status"):
        update_meta(task, status="done")
    with pytest.raises(MetaError, match="unknown meta key"):
        update_meta(task, nonsense=1)


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("{not json", "corrupt JSON at line 1, column 2"),
        ("[1, 2]", "expected a JSON object, found list"),
        ('{"status": "exploded"}', "unknown status 'exploded'"),
        ('{"metrics": [1]}', "key 'metrics' should be an object"),
        ('{"model": 3}', "key 'model' should be a string"),
    ],
)
def test_corrupt_meta_is_named_and_not_overwritten(tmp_path, content, fragment):
    task = make_task(tmp_path, "bad", content)
    with pytest.raises(MetaError, match=fragment) as info:
        load_meta(task)
    assert str(task / META_FILENAME) in str(info.value)
    with pytest.raises(MetaError):
        update_meta(task, status="trained")
    assert (task / META_FILENAME).read_text() == content


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    task = make_task(tmp_path, "t", ORIGINAL_META)
    original = (task / META_FILENAME).read_text()

    def exploding_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", exploding_replace)
    with pytest.raises(OSError, match="disk full"):
        update_meta(task, status="trained")
    assert (task / META_FILENAME).read_text() == original
    assert [p.name for p in task.iterdir()] == [META_FILENAME]  # no temp file left behind


def test_scan_tasks_lists_broken_ones_and_skips_others(tmp_path):
    root = tmp_path / "root"
    make_task(root, "b-good", ORIGINAL_META)
    make_task(root, "a-broken", "{oops")
    (root / "not-a-task").mkdir()
    make_task(root, ".hidden", ORIGINAL_META)
    entries = scan_tasks(root)
    assert [e.name for e in entries] == ["a-broken", "b-good"]
    assert entries[0].meta is None and "corrupt JSON" in entries[0].error
    assert entries[0].summary()["status"] == "broken"
    good = entries[1].summary()
    assert good["status"] == "prepared" and good["adapter"] is False and good["merged"] is False
    assert scan_tasks(tmp_path / "missing") == []


def test_summary_reports_adapter_and_merged_when_present(tmp_path):
    task = make_task(tmp_path, "t", ORIGINAL_META)
    (task / "adapter").mkdir()
    update_meta(task, adapter_path="adapter", merged_path="merged", num_samples=12)
    row = scan_tasks(tmp_path)[0].summary()
    assert row["adapter"] is True and row["merged"] is False and row["samples"] == 12


def test_meta_round_trip():
    meta = TaskMeta(task_type="qa", model="m", metrics={"loss_history": [{"step": 1, "loss": 2.0}]})
    again = TaskMeta.from_dict(meta.to_dict())
    assert again == meta and again.last_train_loss == 2.0


def test_written_files_get_the_usual_mode(tmp_path):
    old = os.umask(0o022)
    try:
        task = make_task(tmp_path, "t", ORIGINAL_META)
        update_meta(task, status="trained")
    finally:
        os.umask(old)
    assert (task / META_FILENAME).stat().st_mode & 0o777 == 0o644
