"""The evaluation engine: a model's answer-token loss and batched greedy answers on evaluation
samples (``inference``), the metrics that compare an answer with its reference (``metrics``:
exact match, token F1, ROUGE-L), and the report built from them (``report``: per-model
metrics, the table, report.md). torch and rouge-score are imported inside the functions that
use them. The evaluation service (``evaluation.py``) puts them together.
"""

from __future__ import annotations

from .inference import Answer, answer_losses, generate_answers
from .metrics import answer_scores, exact_match, normalize, rouge_l, token_f1, words

__all__ = [
    "Answer",
    "answer_losses",
    "answer_scores",
    "exact_match",
    "generate_answers",
    "normalize",
    "rouge_l",
    "token_f1",
    "words",
]
