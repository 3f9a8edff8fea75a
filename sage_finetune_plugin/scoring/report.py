"""An evaluation's report: per-answer scores, per-model metrics, the table and the Markdown.

``score_answers`` scores each answer against its reference, ``model_metrics`` sums one
model's losses and scores up, ``EvalReport`` holds what an evaluation measured (base, tuned,
change, every example), ``metric_rows`` formats the table and ``markdown`` writes
``report.md`` with the worst and best examples side by side.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..meta import now_iso
from ..paths import EVAL_DIR
from .inference import Answer
from .metrics import answer_scores, mean

#: Metric -> label, in the order tables show them.
METRICS = {
    "loss": "loss (answer tokens)",
    "perplexity": "perplexity",
    "exact_match": "exact match",
    "token_f1": "token F1",
    "rouge_l": "ROUGE-L",
    "answer_tokens": "answer length (tokens)",
    "hit_limit": "hit the token limit",
}
#: The metric ``list`` shows (tuned, and its change from the base): it stays meaningful for
#: long answers, where exact match is 0. Without rouge-score, token F1 stands in.
HEADLINE = "rouge_l"
FALLBACK_HEADLINE = "token_f1"
#: The headline of prompts scored by reward functions (a GRPO task): their weighted mean;
#: each reward's mean is ``reward/NAME``.
REWARD = "reward"
#: Worst and best examples shown in report.md.
EXAMPLES = 5
SCORES = ("exact_match", "token_f1", "rouge_l")


def score_answers(answers: Sequence[Answer], references: Sequence[str]) -> list[dict[str, Any]]:
    """Each answer with its length, whether it hit the token limit, and its scores."""
    scored = []
    for answer, reference in zip(answers, references, strict=True):
        scores = answer_scores(answer.text, reference)
        scored.append(
            {
                "answer": answer.text,
                "tokens": answer.tokens,
                "hit_limit": answer.hit_limit,
                **{key: _round(scores[key]) for key in SCORES},
            }
        )
    return scored


def model_metrics(
    losses: Sequence[tuple[float, int]], scored: Sequence[dict[str, Any]]
) -> dict[str, float | None]:
    """One model's metrics: the token-weighted answer loss over every sample (summed negative
    log-likelihood and token count per sample), its perplexity, and the mean answer scores."""
    count = sum(tokens for _, tokens in losses)
    loss = sum(total for total, _ in losses) / count if count else None
    metrics = {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700)) if loss is not None else None,
        **{key: mean([s[key] for s in scored]) for key in SCORES},
        "answer_tokens": mean([float(s["tokens"]) for s in scored]),
        "hit_limit": mean([float(s["hit_limit"]) for s in scored]),
    }
    return {key: _round(value) for key, value in metrics.items()}


@dataclass
class EvalReport:
    """What an evaluation measured. ``base`` / ``tuned`` map METRICS keys to values (None:
    that model was not evaluated); ``examples`` holds one entry per generated answer: location,
    prompt, reference and each model's scored answer."""

    task: str
    folder: Path
    data: str
    samples: int
    generated: int
    max_new_tokens: int
    models: dict[str, str]
    base: dict[str, float | None] | None
    tuned: dict[str, float | None] | None
    base_cached: bool = False
    checkpoint: str | None = None
    examples: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    created_at: str = field(default_factory=now_iso)
    #: What the report leaves out and why (ROUGE-L without rouge-score).
    notes: list[str] = field(default_factory=list)

    @property
    def metrics(self) -> dict[str, str]:
        """The metrics measured -> their labels: METRICS, or for prompts scored by rewards
        the mean reward, each reward's mean and the answers' length."""
        sides = [side for side in (self.tuned, self.base) if side]
        if not any(REWARD in side for side in sides):
            return METRICS
        names = dict.fromkeys(k for side in sides for k in side if k.startswith(f"{REWARD}/"))
        return {
            REWARD: "mean reward (weighted)",
            **{key: key.replace("/", " ", 1) for key in names},
            "answer_tokens": METRICS["answer_tokens"],
            "hit_limit": METRICS["hit_limit"],
        }

    @property
    def measured(self) -> str:
        """What was measured on the samples: ``loss on 40 samples`` (prompts: their rewards)."""
        if self.headline == REWARD:
            return f"rewards of the answers to {self.samples} prompts"
        return f"loss on {self.samples} samples"

    @property
    def headline(self) -> str:
        """The metric that sums the report up: ROUGE-L, or token F1 when it was not computed
        (the mean reward for prompts scored by rewards)."""
        sides = [side for side in (self.tuned, self.base) if side]
        if any(REWARD in side for side in sides):
            return REWARD
        if any(side.get(HEADLINE) is not None for side in sides):
            return HEADLINE
        return FALLBACK_HEADLINE

    @property
    def change(self) -> dict[str, float | None]:
        """Tuned minus base, per metric (empty unless both were evaluated)."""
        if self.base is None or self.tuned is None:
            return {}
        change: dict[str, float | None] = {}
        for key in self.metrics:
            base, tuned = self.base.get(key), self.tuned.get(key)
            change[key] = None if base is None or tuned is None else _round(tuned - base)
        return change

    @property
    def report_md(self) -> Path:
        return self.folder / "report.md"

    @property
    def report_json(self) -> Path:
        return self.folder / "report.json"

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "created_at": self.created_at,
            "data": self.data,
            "samples": self.samples,
            "generated": self.generated,
            "max_new_tokens": self.max_new_tokens,
            "checkpoint": self.checkpoint,
            "models": self.models,
            "base": self.base,
            "tuned": self.tuned,
            "change": self.change or None,
            "base_cached": self.base_cached,
            "settings": self.settings,
            "notes": self.notes,
            "examples": self.examples,
        }

    def to_meta(self) -> dict[str, Any]:
        """The summary kept in the meta (``eval``): no examples, no settings."""
        summary = {k: v for k, v in self.to_dict().items() if k not in ("examples", "settings")}
        return {**summary, "metric": self.headline, "report": f"{EVAL_DIR}/report.md"}


def metric_rows(report: EvalReport) -> list[tuple[str, str, str, str]]:
    """(label, base, tuned, change) per metric, formatted, for tables."""
    change = report.change
    rows = []
    for key, label in report.metrics.items():
        base, tuned = (
            _format(key, side.get(key) if side else None) for side in (report.base, report.tuned)
        )
        rows.append((label, base, tuned, _format(key, change.get(key), signed=True)))
    return rows


def ranked_examples(report: EvalReport) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The worst and the best examples by the tuned model's headline metric (the base's when
    only the base was evaluated), then by token F1; at most EXAMPLES each, never the same
    twice."""
    side = "tuned" if report.tuned is not None else "base"
    metric = report.headline
    ranked = sorted(
        (e for e in report.examples if side in e),
        key=lambda e: (e[side][metric], e[side].get("token_f1", 0.0)),
    )
    count = min(EXAMPLES, (len(ranked) + 1) // 2)
    return ranked[:count], ranked[count:][::-1][:EXAMPLES]


def markdown(report: EvalReport) -> str:
    """The Markdown report: what was evaluated, the metrics, the worst and best examples."""
    lines = [
        f"# Evaluation of `{report.task}`",
        "",
        f"- Data: {report.data}; {report.measured}, answers to {report.generated} (greedy, "
        f"at most {report.max_new_tokens} new tokens).",
    ]
    for name in ("tuned", "base"):
        if name in report.models:
            cached = " (numbers from the cache)" if name == "base" and report.base_cached else ""
            lines.append(f"- {name.capitalize()} model: `{report.models[name]}`{cached}.")
    lines += [f"- Evaluated: {report.created_at}.", "", "| metric | base | tuned | change |"]
    lines.append("|---|---:|---:|---:|")
    lines += [f"| {' | '.join(row)} |" for row in metric_rows(report)]
    lines += [f"\n{note}" for note in report.notes]
    worst, best = ranked_examples(report)
    for title, examples in (("Worst examples", worst), ("Best examples", best)):
        if examples:
            lines += ["", f"## {title}", ""]
            for example in examples:
                lines += _example_block(example, report.headline, report.metrics[report.headline])
    return "\n".join(lines) + "\n"


def _example_block(example: dict[str, Any], metric: str, label: str) -> list[str]:
    sides = [name for name in ("base", "tuned") if name in example]
    scores = ", ".join(f"{name} {example[name][metric]:.2f}" for name in sides)
    lines = [f"### {example['location']} ({label} {scores})", "", "**Prompt**", ""]
    lines += [f"> {line}" if line else ">" for line in example["prompt"].splitlines()]
    lines += ["", "| reference | " + " | ".join(f"{name} answer" for name in sides) + " |"]
    lines.append("|---" * (len(sides) + 1) + "|")
    cells = [example["reference"] or ""]
    for name in sides:
        answer = example[name]
        cells.append(answer["answer"] + (" *(hit the token limit)*" if answer["hit_limit"] else ""))
    lines += ["| " + " | ".join(_cell(text) for text in cells) + " |", ""]
    return lines


def _cell(text: str) -> str:
    """Text inside a Markdown table cell: pipes escaped, lines joined with <br>."""
    return text.replace("|", "\\|").replace("\r", "").replace("\n", "<br>") or " "


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 4)


def _format(key: str, value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    sign = "+" if signed else ""
    if key == "hit_limit":
        return f"{value * 100:{sign}.0f}%"
    decimals = {"loss": 4, "perplexity": 2, "answer_tokens": 1}.get(key, 3)
    return f"{value:{sign}.{decimals}f}"
