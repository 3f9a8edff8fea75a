"""Answer metrics: exact match, token F1 and ROUGE-L of a generated answer against a reference.

Both texts are normalised the same way first: lower case, punctuation and symbols removed,
runs of white space collapsed; characters of scripts written without spaces (Chinese,
Japanese) count as one word each. ROUGE-L is computed by ``rouge-score`` (Google Research's
implementation) on those words, so it also works beyond English (its own tokenizer keeps only
a-z and 0-9).
"""

from __future__ import annotations

import functools
import unicodedata
from collections import Counter
from collections.abc import Sequence
from typing import Any


def words(text: str) -> list[str]:
    """The normalised words of ``text``."""
    out: list[str] = []
    current: list[str] = []
    for char in unicodedata.normalize("NFKC", text).lower():
        category = unicodedata.category(char)
        if char.isspace() or category[0] in "PSC":
            _flush(current, out)
        elif unicodedata.east_asian_width(char) in ("W", "F"):
            _flush(current, out)
            out.append(char)
        else:
            current.append(char)
    _flush(current, out)
    return out


def _flush(current: list[str], out: list[str]) -> None:
    if current:
        out.append("".join(current))
        current.clear()


def normalize(text: str) -> str:
    return " ".join(words(text))


def exact_match(answer: str, reference: str) -> float:
    return float(words(answer) == words(reference))


def token_f1(answer: str, reference: str) -> float:
    """Harmonic mean of word precision and recall (SQuAD's F1, without its English-only
    article removal)."""
    predicted, expected = words(answer), words(reference)
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if not common:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


class _Words:
    """The tokenizer interface rouge-score expects."""

    def tokenize(self, text: str) -> list[str]:
        return words(text)


@functools.cache
def _scorer() -> Any:
    from rouge_score.rouge_scorer import RougeScorer

    return RougeScorer(["rougeL"], tokenizer=_Words())


def rouge_available() -> bool:
    """Whether ROUGE-L can be computed (rouge-score, the ``eval`` extra, is installed)."""
    from ..deps import installed

    return installed("rouge_score")


def rouge_l(answer: str, reference: str) -> float | None:
    """ROUGE-L F-measure (longest common subsequence of words); None without rouge-score."""
    if not rouge_available():
        return None
    return float(_scorer().score(reference, answer)["rougeL"].fmeasure)


def answer_scores(answer: str, reference: str) -> dict[str, float | None]:
    return {
        "exact_match": exact_match(answer, reference),
        "token_f1": token_f1(answer, reference),
        "rouge_l": rouge_l(answer, reference),
    }


def mean(values: Sequence[float | None]) -> float | None:
    """The mean of the values that are there (None when none is)."""
    present = [value for value in values if value is not None]
    return sum(present) / len(present) if present else None
