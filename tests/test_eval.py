"""`sage finetune eval`: the tuned model against its base on held-out data, on the tiny model.

The task is trained for real (the package's trainer, 20 steps) with a quarter of its data held
out; the tests evaluate copies of it.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from sage_finetune_plugin.cli import finetune
from sage_finetune_plugin.data import load_training_data, make_collator, prepare_dataset
from sage_finetune_plugin.data.evalset import eval_samples, select
from sage_finetune_plugin.data.preparation import eval_split
from sage_finetune_plugin.errors import EvaluationInterrupted, LockError, TaskError
from sage_finetune_plugin.evaluation import EvalProgress, evaluate_task
from sage_finetune_plugin.locks import RunLock
from sage_finetune_plugin.meta import load_meta
from sage_finetune_plugin.scoring import (
    answer_losses,
    exact_match,
    generate_answers,
    normalize,
    rouge_l,
    token_f1,
)
from sage_finetune_plugin.task import Task

from conftest import build_prepared_task


@pytest.fixture(scope="session")
def evaluated_template(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A task trained with a quarter of its 48 records held out (12 eval samples), with
    checkpoints at steps 10 and 20."""
    from sage_finetune_plugin.runs import train_from_meta

    root = tmp_path_factory.mktemp("eval-root")
    task = build_prepared_task(root, tiny_model_dir, "demo", eval_ratio=0.25)
    train_from_meta(task)
    return task


@pytest.fixture
def task(evaluated_template: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(evaluated_template, tmp_path / "root" / "demo"))


def invoke(task: Path, *args: str):
    return CliRunner().invoke(finetune, ["eval", task.name, "--root", str(task.parent), *args])


# --- the command ---------------------------------------------------------------------------------


def test_eval_prints_the_table_and_writes_reports_and_meta(task: Path) -> None:
    result = invoke(task)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "12 samples" in out and "held out: eval_ratio 0.25, seed 42" in out
    for label in ("loss (answer tokens)", "perplexity", "exact match", "token F1", "ROUGE-L"):
        assert label in out
    header = next(line for line in out.splitlines() if line.startswith("metric"))
    assert header.split() == ["metric", "base", "tuned", "change"]
    assert "tuned answers" in result.stderr and "samples/s" in result.stderr  # the progress bar

    report = json.loads((task / "eval" / "report.json").read_text())
    assert report["samples"] == report["generated"] == 12
    for side in ("base", "tuned"):
        metrics = report[side]
        assert metrics["loss"] > 0
        assert math.isclose(metrics["perplexity"], math.exp(metrics["loss"]), rel_tol=1e-3)
        for key in ("exact_match", "token_f1", "rouge_l", "hit_limit"):
            assert 0 <= metrics[key] <= 1
        assert 0 < metrics["answer_tokens"] <= report["max_new_tokens"]
    # 20 steps on the tiny model: the answer loss falls and the answers move towards the data.
    assert report["tuned"]["loss"] < report["base"]["loss"] - 1
    assert report["tuned"]["rouge_l"] > report["base"]["rouge_l"]
    assert report["change"]["loss"] == pytest.approx(
        report["tuned"]["loss"] - report["base"]["loss"], abs=1e-3
    )
    assert len(report["examples"]) == 12
    example = report["examples"][0]
    assert example["prompt"].startswith("Write the number") and "base" in example
    assert example["reference"].startswith("The number")

    markdown = (task / "eval" / "report.md").read_text()
    assert "| metric | base | tuned | change |" in markdown
    assert "## Worst examples" in markdown and "## Best examples" in markdown
    assert "| reference | base answer | tuned answer |" in markdown

    meta = load_meta(task).eval
    assert meta["tuned"] == report["tuned"] and meta["metric"] == "rouge_l"
    assert meta["report"] == "eval/report.md" and "examples" not in meta
    listing = CliRunner().invoke(finetune, ["list", "--root", str(task.parent)])
    tuned, base = report["tuned"]["rouge_l"], report["base"]["rouge_l"]
    assert "EVAL" in listing.output.splitlines()[0]
    assert f"{tuned:.2f} ({tuned - base:+.2f})" in listing.output


def test_json_output(task: Path) -> None:
    result = invoke(task, "--json", "--max-samples", "3", "--max-new-tokens", "8")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["samples"] == 12 and report["generated"] == 3
    assert report["max_new_tokens"] == 8 and len(report["examples"]) == 3
    assert all(e["tuned"]["tokens"] <= 8 for e in report["examples"])


def test_second_run_takes_the_base_numbers_from_the_cache(task: Path) -> None:
    first = evaluate_task(task)
    assert not first.base_cached
    events: list[EvalProgress] = []
    second = evaluate_task(task, progress=events.append)
    assert second.base_cached and second.base == first.base
    assert {e.model for e in events} == {"tuned"}  # the base model did not run
    assert len(list((task / "eval").glob("base-*.json"))) == 1
    # Other settings are another cache entry.
    third = evaluate_task(task, max_new_tokens=5)
    assert not third.base_cached
    assert len(list((task / "eval").glob("base-*.json"))) == 2


def test_no_base_and_base_only(task: Path) -> None:
    tuned_only = evaluate_task(task, base=False)
    assert tuned_only.base is None and tuned_only.change == {}
    base_only = evaluate_task(task, tuned=False)
    assert base_only.tuned is None and "tuned" not in base_only.models
    assert load_meta(task).eval["tuned"] is None
    listing = CliRunner().invoke(finetune, ["list", "--root", str(task.parent)])
    assert f"base {base_only.base['rouge_l']:.2f}" in listing.output
    # Cached base numbers are shown even with --no-base.
    assert evaluate_task(task, base=False).base == base_only.base
    both = invoke(task, "--base-only", "--no-base")
    assert both.exit_code == 2 and "cannot be combined" in both.output


def test_checkpoints_and_the_train_split(task: Path) -> None:
    at_10 = evaluate_task(task, checkpoint="10", split="train", max_samples=4)
    assert at_10.checkpoint == "checkpoint-10" and at_10.samples == 36
    assert "training part" in at_10.data
    final = evaluate_task(task, max_samples=4)
    assert final.checkpoint == "final" and final.tuned["loss"] != at_10.tuned["loss"]
    missing = invoke(task, "--checkpoint", "7")
    assert missing.exit_code == 1 and "no checkpoint-7" in missing.output


def test_other_data_and_its_errors(task: Path, tmp_path: Path) -> None:
    data = tmp_path / "questions.jsonl"
    question, answer = "Write the number 4 as a word.", "The number 4 is written four."
    rows = [{"question": question, "answer": answer}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows * 3))
    result = invoke(task, "--data", str(data))
    assert result.exit_code == 0, result.output
    assert f"3 samples of {data}" in result.stdout

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"question": "no answer"}) + "\n")
    result = invoke(task, "--data", str(bad))
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        f"Error: {bad}: line 2: missing field 'answer' (or pass --skip-invalid to drop bad "
        "records)."
    ]
    assert invoke(task, "--data", str(bad), "--skip-invalid").exit_code == 0

    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps({"text": "The number 4 is written four."}) + "\n")
    plain = evaluate_task(task, data=text)  # nothing to answer: the loss only
    assert plain.generated == 0 and plain.tuned["loss"] > 0 and plain.tuned["rouge_l"] is None

    missing = invoke(task, "--data", str(tmp_path / "nope.jsonl"))
    assert missing.exit_code == 1 and len(missing.stderr.splitlines()) == 1
    both = invoke(task, "--data", str(data), "--split", "train")
    assert both.exit_code == 2


def test_without_held_out_data_it_says_how_to_get_some(make_prepared_task) -> None:
    task = make_prepared_task("plain")  # eval_ratio 0, no eval data
    result = invoke(task, "--base-only")
    assert result.exit_code == 1
    assert "no held-out data" in result.output and "--data" in result.output
    assert "eval_ratio" in result.output and len(result.stderr.splitlines()) == 1


def test_untrained_task_is_refused_unless_base_only(make_prepared_task) -> None:
    task = make_prepared_task("fresh", eval_ratio=0.25)
    result = invoke(task)
    assert result.exit_code == 1 and "--base-only" in result.output
    assert not (task / "eval").exists()
    report = evaluate_task(task, tuned=False, max_samples=2)
    assert report.tuned is None and report.base["loss"] > 0


def test_refused_while_a_run_holds_the_task(task: Path) -> None:
    with RunLock(task), pytest.raises(LockError):
        evaluate_task(task)
    assert not (task / "eval").exists()


def test_ctrl_c_writes_nothing(task: Path) -> None:
    evaluate_task(task, max_samples=2)
    before = {p.name: p.read_bytes() for p in (task / "eval").iterdir()}
    meta_before = (task / "finetune_meta.json").read_text()

    def interrupt(progress: EvalProgress) -> None:
        if progress.model == "tuned" and progress.stage == "answers" and progress.done:
            raise KeyboardInterrupt

    with pytest.raises(EvaluationInterrupted) as caught:
        evaluate_task(task, max_new_tokens=7, progress=interrupt)
    assert caught.value.exit_code == 130 and "nothing was written" in str(caught.value)
    assert {p.name: p.read_bytes() for p in (task / "eval").iterdir()} == before
    assert (task / "finetune_meta.json").read_text() == meta_before
    assert not [p for p in task.iterdir() if p.name.startswith(".eval")]


# --- the engine: data, loss, generation, metrics ------------------------------------------------


def test_held_out_samples_are_the_ones_training_held_out(task: Path, tiny_model_dir: Path) -> None:
    config = Task.open(task).recorded_config(resume=True)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prepared = prepare_dataset(config.data_path, tokenizer, config)
    samples = eval_samples(
        load_training_data(config.data_path), tokenizer, max_length=config.max_length
    )
    train, held_out = eval_split(len(samples), config.eval_ratio, config.seed)
    assert [s.input_ids for s in select(samples, held_out)] == prepared.eval["input_ids"]
    assert [s.labels for s in select(samples, held_out)] == prepared.eval["labels"]
    assert [s.input_ids for s in select(samples, train)] == prepared.train["input_ids"]
    for sample in samples:
        # The prompt is the sample's own prefix: exactly what training put before the answer.
        assert sample.input_ids[: len(sample.prompt_ids)] == sample.prompt_ids
        answer = tokenizer.decode(sample.input_ids[len(sample.prompt_ids) :])
        assert answer.startswith(sample.reference)


def test_answer_loss_is_the_models_own_loss(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    samples = eval_samples(load_training_data(_records(5)), tokenizer, max_length=64)
    rows = [{"input_ids": s.input_ids, "labels": s.labels} for s in samples]
    collate = make_collator(tokenizer, packing=False)
    losses = answer_losses(model, rows, collate, batch_size=3)
    for row, (nll, count) in zip(rows, losses, strict=True):
        batch = collate([row])
        with torch.inference_mode():
            expected = model(**batch).loss.item()
        assert count == sum(1 for label in row["labels"][1:] if label != -100)
        assert nll / count == pytest.approx(expected, rel=1e-4)


def test_batched_generation_equals_one_at_a_time(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
        )["input_ids"]
        for text in ("Hi", "Write the number 3 as a word, please.", "What is a cat?", "x")
    ]
    options = {"stop_ids": [tokenizer.eos_token_id], "max_new_tokens": 12}
    batched = generate_answers(model, tokenizer, prompts, batch_size=4, **options)
    single = generate_answers(model, tokenizer, prompts, batch_size=1, **options)
    assert [a.text for a in batched] == [a.text for a in single]
    assert all(a.tokens <= 12 and a.hit_limit == (a.tokens == 12) for a in batched)


def test_answer_metrics() -> None:
    assert normalize("  The Brell!  ") == "the brell"
    assert exact_match("morvik", "Morvik.") == 1.0
    assert exact_match("Morvik is the capital", "Morvik.") == 0.0
    assert token_f1("the silver wren", "The Silver Wren.") == 1.0
    assert token_f1("a silver boat", "the silver wren") == pytest.approx(1 / 3)
    assert token_f1("", "x") == 0.0
    assert rouge_l("The capital is Morvik", "Morvik.") == pytest.approx(0.4)
    assert rouge_l("北京是首都", "北京是首都。") == 1.0  # one word per character
    assert rouge_l("nothing alike", "Morvik") == 0.0


def _records(count: int) -> list[dict[str, str]]:
    return [
        {"instruction": f"Say {n} twice.", "input": "", "output": f"{n} {n}"} for n in range(count)
    ]


def test_the_api_exports_it() -> None:
    import sage_finetune_plugin as api

    assert api.evaluate_task is evaluate_task and "EvalReport" in dir(api)


def test_a_missing_task_is_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(finetune, ["eval", "ghost", "--root", str(tmp_path)])
    assert result.exit_code == 1 and "not found" in result.output
    with pytest.raises(TaskError):
        evaluate_task("ghost", root=tmp_path)
