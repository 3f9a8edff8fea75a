"""`merge`: adapter merged into a full-precision base, saved atomically, checked by logits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from sage_finetune_plugin import merge
from sage_finetune_plugin.checkpoints import complete_checkpoints
from sage_finetune_plugin.cli import finetune
from sage_finetune_plugin.errors import LockError, MergeError, TaskError
from sage_finetune_plugin.locks import RunLock
from sage_finetune_plugin.merge import merge_task
from sage_finetune_plugin.meta import load_meta
from sage_finetune_plugin.task import Task

from conftest import build_trained_task, fact_batch, train_adapter


@pytest.fixture
def task(trained_task: Path) -> Path:
    return trained_task


def logits(model, tokenizer) -> torch.Tensor:
    with torch.inference_mode():
        return model(**fact_batch(tokenizer)).logits


def weight_dtypes(folder: Path) -> set[str]:
    dtypes = set()
    for shard in folder.glob("*.safetensors"):
        with safe_open(shard, framework="pt") as handle:
            dtypes |= {str(handle.get_tensor(key).dtype) for key in handle.keys()}  # noqa: SIM118
    return dtypes


def test_merged_model_reproduces_base_plus_adapter(task: Path, tiny_model_dir: Path) -> None:
    result = merge_task(task.name, root=task.parent)

    out = task / "merged"
    assert result.output == out.resolve()
    assert result.checkpoint == "final" and result.dtype == "fp32"
    assert result.max_logit_diff <= result.tolerance
    tokenizer = AutoTokenizer.from_pretrained(out)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    base_logits = logits(base, tokenizer)
    adapted = PeftModel.from_pretrained(base, task / "adapter")
    expected = logits(adapted, tokenizer)
    # The adapter changes the model, and the merged weights carry exactly that change.
    assert (expected - base_logits).abs().max() > 1.0
    torch.testing.assert_close(logits(merged, tokenizer), expected, atol=1e-4, rtol=1e-4)


def test_merged_folder_is_self_contained(task: Path) -> None:
    merge_task(task.name, root=task.parent)

    out = task / "merged"
    assert not (out / "adapter_config.json").exists()
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    generation = json.loads((out / "generation_config.json").read_text())
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in _as_list(generation["eos_token_id"])
    assert generation["pad_token_id"] == tokenizer.pad_token_id
    assert weight_dtypes(out) == {"torch.float32"}
    # Plain transformers loads it, with peft made unimportable.
    code = (
        "import sys; sys.modules['peft'] = None\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}); "
        f"AutoTokenizer.from_pretrained({str(out)!r})\n"
        "print(type(m).__name__, 'peft' in sys.modules and sys.modules['peft'] is not None)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-2:] == ["Qwen2ForCausalLM", "False"]


def test_meta_records_the_merge(task: Path) -> None:
    result = merge_task(task.name, root=task.parent)

    meta = load_meta(task)
    assert meta.status == "merged"
    assert meta.merged_path == "merged"
    assert meta.merge["dtype"] == "fp32"
    assert meta.merge["checkpoint"] == "final"
    assert meta.merge["output"] == str(result.output)
    assert meta.merge["max_logit_diff"] == result.max_logit_diff
    files = sum(p.stat().st_size for p in (task / "merged").iterdir())
    assert meta.merge["size_bytes"] == files == result.size_bytes


def test_bf16_merge_halves_the_weights(task: Path) -> None:
    fp32 = merge_task(task.name, root=task.parent, output=task / "fp32")
    bf16 = merge_task(task.name, root=task.parent, output=task / "bf16", dtype="bf16")

    assert weight_dtypes(task / "bf16") == {"torch.bfloat16"}
    assert json.loads((task / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    assert bf16.size_bytes < 0.6 * fp32.size_bytes
    assert 0 < bf16.max_logit_diff <= bf16.tolerance
    assert load_meta(task).merge["dtype"] == "bf16"


def test_adapter_trained_in_4bit_merges_into_full_precision(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    task = build_trained_task(tmp_path, tiny_model_dir, "qlora", load_in_4bit=True)
    assert load_meta(task).training["load_in_4bit"] is True

    result = merge_task(task.name, root=tmp_path)

    out = task / "merged"
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert weight_dtypes(out) == {"torch.float32"}
    assert result.max_logit_diff <= result.tolerance
    # The merged weights equal the fp32 base plus the adapter, not a rounded 4-bit copy.
    tokenizer = AutoTokenizer.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    expected = logits(PeftModel.from_pretrained(base, task / "adapter"), tokenizer)
    merged = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(logits(merged, tokenizer), expected, atol=1e-4, rtol=1e-4)


def test_checkpoints_are_chosen_by_number(task: Path, tiny_model_dir: Path) -> None:
    checkpoints = task / "checkpoints"
    for step in (9, 10, 20):
        folder = checkpoints / f"checkpoint-{step}"
        train_adapter(tiny_model_dir, folder, steps=2)
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    # checkpoint-20 was cut off while saving: the Trainer writes its state last.
    (checkpoints / "checkpoint-20" / "trainer_state.json").unlink()
    handle = Task(task)

    assert [step for step, _ in complete_checkpoints(checkpoints)] == [9, 10]
    assert handle.find_adapter("latest") == (checkpoints / "checkpoint-10", "checkpoint-10")
    assert handle.find_adapter("9") == (checkpoints / "checkpoint-9", "checkpoint-9")
    assert handle.find_adapter(10)[1] == "checkpoint-10"
    assert handle.find_adapter("final") == (task / "adapter", "final")
    with pytest.raises(TaskError, match=r"no checkpoint-7; available: 9, 10"):
        handle.find_adapter("7")
    with pytest.raises(TaskError, match="final, latest or a step number"):
        handle.find_adapter("newest")

    result = merge_task(task.name, root=task.parent, checkpoint="latest")
    assert result.checkpoint == "checkpoint-10"
    assert load_meta(task).merge["checkpoint"] == "checkpoint-10"


def test_task_without_adapter_says_run_training_first(task: Path) -> None:
    import shutil

    shutil.rmtree(task / "adapter")
    with pytest.raises(TaskError, match=f"run training first: sage finetune run {task}"):
        merge_task(task.name, root=task.parent)
    with pytest.raises(TaskError, match="no complete checkpoint"):
        merge_task(task.name, root=task.parent, checkpoint="latest")
    assert not (task / "merged").exists()


def test_task_in_training_is_not_merged(task: Path) -> None:
    with RunLock(task), pytest.raises(LockError, match="is being trained by process"):
        merge_task(task.name, root=task.parent)
    assert not (task / "merged").exists()


def test_interrupted_merge_leaves_no_folder(task: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write = merge._write_model

    def write_then_interrupt(model, tokenizer, folder, max_shard_size):
        write(model, tokenizer, folder, max_shard_size)  # a real, complete write...
        raise KeyboardInterrupt  # ...interrupted before the rename

    monkeypatch.setattr(merge, "_write_model", write_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        merge_task(task.name, root=task.parent)

    assert sorted(p.name for p in task.iterdir()) == ["adapter", "finetune_meta.json"]
    assert load_meta(task).status == "trained"


def test_existing_output_is_replaced_only_with_force(
    task: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    merge_task(task.name, root=task.parent, dtype="bf16")
    out = task / "merged"
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    with pytest.raises(MergeError, match="already exists: pass force=True"):
        merge_task(task.name, root=task.parent)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before

    # A forced merge that fails keeps the old model untouched.
    monkeypatch.setattr(merge, "_write_model", _failing_write)
    with pytest.raises(OSError, match="disk full"):
        merge_task(task.name, root=task.parent, force=True)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert weight_dtypes(out) == {"torch.bfloat16"}
    monkeypatch.undo()

    merge_task(task.name, root=task.parent, force=True)
    assert weight_dtypes(out) == {"torch.float32"}
    assert [p.name for p in task.iterdir() if p.name.startswith(".")] == []


def _failing_write(model, tokenizer, folder: Path, max_shard_size) -> None:
    (folder / "config.json").write_text("{}")
    raise OSError("disk full")


def test_force_never_replaces_a_folder_that_is_not_a_model(task: Path) -> None:
    target = task.parent / "documents"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(MergeError, match="not a model folder"):
        merge_task(task.name, root=task.parent, output=target, force=True)
    with pytest.raises(MergeError, match="choose another output"):
        merge_task(task.name, root=task.parent, output=task, force=True)
    assert (target / "notes.txt").read_text() == "keep me"


def test_logit_mismatch_is_an_error_not_a_warning(
    task: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(merge.TOLERANCE, "fp32", 0.0)  # any rounding at all now counts
    with pytest.raises(MergeError, match="does not reproduce base \\+ adapter"):
        merge_task(task.name, root=task.parent)
    assert not (task / "merged").exists()
    assert load_meta(task).status == "trained"


def test_output_outside_the_task_is_recorded_absolute(task: Path, tmp_path: Path) -> None:
    result = merge_task(task.name, root=task.parent, output=tmp_path / "export" / "model")
    assert result.output == (tmp_path / "export" / "model").resolve()
    assert load_meta(task).merged_path == str(result.output)
    assert (result.output / "config.json").is_file()


def test_cli_merge(task: Path) -> None:
    runner = CliRunner()
    args = ["merge", task.name, "--root", str(task.parent)]

    result = runner.invoke(finetune, args)
    assert result.exit_code == 0, result.output
    assert "Merged the final adapter" in result.stdout and str(task / "merged") in result.stdout
    assert "Checking the saved model" in result.stderr

    again = runner.invoke(finetune, args)
    assert again.exit_code == 1
    assert again.stderr.strip().splitlines() == [
        f"Error: {task / 'merged'} already exists: pass --force to replace it."
    ]
    forced = runner.invoke(finetune, [*args, "--force", "--dtype", "fp16"])
    assert forced.exit_code == 0, forced.output
    assert "(fp16," in forced.stdout

    missing = runner.invoke(finetune, ["merge", "nope", "--root", str(task.parent)])
    assert missing.exit_code == 1 and "Task 'nope' not found" in missing.stderr


def _as_list(value: int | list[int]) -> list[int]:
    return value if isinstance(value, list) else [value]
