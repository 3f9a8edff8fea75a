"""Every export is checked before it is reported: the file read back with the ``gguf``
package's reader (tensor count, names, shapes, types as asked), then, where transformers'
GGUF loader rebuilds the architecture, the model it reads from the file against the model
the file came from, on a short sample text: the largest logit difference and the share of
positions where both pick the same next token."""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ExportError
from .families import Family, rope

#: Prose and code, the text the two models are compared on.
CHECK_TEXT = (
    "The quick brown fox jumps over the lazy dog. Gravity is the force that pulls two bodies "
    "towards each other. In Python, a list comprehension builds a list from an iterable:\n"
    "    squares = [n * n for n in range(10)]\n"
    "What is the capital of France? The capital of France is Paris."
)
#: Compare logits only when two float32 copies of the model fit in this share of free memory.
MEMORY_SHARE = 0.5


@dataclass
class CheckReport:
    """What the check found: the reader's view, and the logit comparison (or why not)."""

    tensors: int
    types: dict[str, int]
    compared: bool = False
    reason: str = ""
    tokens: int = 0
    max_logit_diff: float = 0.0
    logit_scale: float = 0.0
    agreement: float = 0.0

    def to_meta(self) -> dict[str, Any]:
        meta: dict[str, Any] = {"tensors": self.tensors, "types": self.types}
        if self.compared:
            meta.update(
                tokens=self.tokens,
                max_logit_diff=round(self.max_logit_diff, 6),
                logit_scale=round(self.logit_scale, 4),
                greedy_agreement=round(self.agreement, 4),
            )
        else:
            meta["logits"] = self.reason
        return meta

    def line(self) -> str:
        """The check in one line, for the command's output."""
        head = f"Checked: {self.tensors} tensors read back ({_types_text(self.types)})"
        if not self.compared:
            return f"{head}; logits not compared: {self.reason}"
        same = round(self.agreement * self.tokens)
        return (
            f"{head}; against the merged model on {self.tokens} tokens: same next token at "
            f"{same} of {self.tokens}, largest logit difference {self.max_logit_diff:.3g} "
            f"(largest logit {self.logit_scale:.3g})"
        )


def _types_text(types: dict[str, int]) -> str:
    return ", ".join(f"{count} {kind}" for kind, count in types.items())


def read_back(
    path: Path,
    expected: list[tuple[str, tuple[int, ...], str | None]],
    *,
    file_type: str | None = None,
) -> CheckReport:
    """Read ``path`` with gguf's reader and hold it to ``expected`` (name, shape, type name or
    None for any) and, when given, to its ``general.file_type`` (a ``gguf.LlamaFileType``
    member name). ExportError naming the first difference."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except (OSError, ValueError) as exc:
        raise ExportError(f"The written file {path} does not read back: {exc}") from None
    if file_type is not None:
        stated = reader.get_field("general.file_type")
        found_type = gguf.LlamaFileType(stated.contents()) if stated is not None else None
        if found_type != getattr(gguf.LlamaFileType, file_type):
            name = found_type.name if found_type is not None else "none"
            raise ExportError(f"{path} says it holds {name}, {file_type} was asked for.")
    found = {t.name: t for t in reader.tensors}
    if len(reader.tensors) != len(expected):
        raise ExportError(
            f"{path} holds {len(reader.tensors)} tensors, {len(expected)} were written."
        )
    types: dict[str, int] = {}
    for name, shape, kind in expected:
        tensor = found.get(name)
        if tensor is None:
            raise ExportError(f"{path} lacks tensor {name} that was written.")
        got_shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
        got_kind = tensor.tensor_type.name
        if got_shape != tuple(shape) or (kind is not None and got_kind != kind):
            raise ExportError(
                f"{path}: tensor {name} reads back as {got_kind} {got_shape}, "
                f"written as {kind} {tuple(shape)}."
            )
        types[got_kind] = types.get(got_kind, 0) + 1
    return CheckReport(tensors=len(expected), types=dict(sorted(types.items())))


def why_not_compared(family: Family, config: Any, parameters: int) -> str:
    """Why the logits cannot be compared here ('' when they can)."""
    if not family.transformers_reads:
        return f"transformers does not read {family.arch.lower()} GGUF files"
    _, kind, _ = rope(config)
    if kind != "default":
        return f"transformers' GGUF reader does not apply {kind} rope scaling"
    import psutil

    need = 2 * 4 * parameters
    free = psutil.virtual_memory().available
    if need > MEMORY_SHARE * free:
        return (
            f"two float32 copies need {need / 2**30:.1f} GiB, "
            f"{free / 2**30:.1f} GiB of memory is free"
        )
    return ""


def compare_logits(path: Path, model_dir: Path, report: CheckReport) -> None:
    """Fill ``report`` with the comparison of the GGUF model (as transformers reads it) with
    the model in ``model_dir`` on CHECK_TEXT."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(CHECK_TEXT, return_tensors="pt")["input_ids"]
    # transformers draws its own loading bars on stderr; the export's progress is the command's.
    with torch.inference_mode(), contextlib.redirect_stderr(io.StringIO()):
        reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        expected = reference(ids).logits[0].float()
        del reference
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name, dtype=torch.float32
            ).eval()
        except Exception as exc:  # its loader's limits are not the file's faults
            first = (str(exc).splitlines() or [type(exc).__name__])[0][:120]
            report.reason = f"transformers cannot load it ({first})"
            return
        got = model(ids).logits[0].float()
    report.compared = True
    report.tokens = int(ids.shape[1])
    report.max_logit_diff = float((got - expected).abs().max())
    report.logit_scale = float(expected.abs().max())
    report.agreement = float((got.argmax(-1) == expected.argmax(-1)).float().mean())
