"""``export_task``: the recipe of an export.

The task's merged model (the adapter is merged first when there is none, or when it is older
than the adapter) -> its family and tokenizer checked -> the GGUF written by the gguf package
(f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0), or an f16 file quantized by llama.cpp for the
K-quants -> the file read back and compared with the merged model (check.py), all under a
temporary name renamed into place when complete -> an Ollama Modelfile beside it -> the figures
recorded in the task's meta (``exports``).

With ``adapter=True`` the LoRA adapter alone becomes a GGUF adapter file, beside the base
model's GGUF (written too when it is not there yet), and the Modelfile names both.
Nothing here prints: progress goes through callables, problems raise ExportError.
"""

from __future__ import annotations

import math
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ExportError, FinetuneError, UsageProblem
from ..paths import EXPORT_DIR, atomic_file, atomic_write_text
from ..progress import ProgressSink, Status
from ..task import Task
from .adapter import lora_settings, write_adapter_gguf
from .check import CheckReport, compare_logits, read_back, why_not_compared
from .families import check_architecture
from .llamacpp import quantize
from .modelfile import modelfile_text
from .quants import QUANT_TYPES, Quant, require_quant
from .source import Source
from .writer import PlannedTensor, write_model_gguf

FORMATS = ("gguf",)


@dataclass
class ExportResult:
    """What an export wrote, how it was checked, and how to run it."""

    path: Path
    modelfile: Path
    quant: str
    architecture: str
    size_bytes: int
    tensors: int
    model_dir: Path
    ollama_name: str
    check: CheckReport
    #: Who wrote the weights: ``gguf``, ``llama-cpp-python`` or the llama-quantize binary.
    quantizer: str = "gguf"
    #: For an adapter export: the base model's GGUF the adapter applies to, and its alpha.
    base: Path | None = None
    alpha: float | None = None

    @property
    def commands(self) -> list[str]:
        """The commands that run the exported model in Ollama and in llama.cpp."""
        run = f"llama-cli -m {shlex.quote(str(self.base or self.path))}"
        if self.base is not None:
            run += f" --lora {shlex.quote(str(self.path))}"
        return [
            f"ollama create {self.ollama_name} -f {shlex.quote(str(self.modelfile))}"
            f" && ollama run {self.ollama_name}",
            run,
        ]

    def to_meta(self) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "path": str(self.path),
            "quant": self.quant,
            "architecture": self.architecture,
            "size_bytes": self.size_bytes,
            "quantizer": self.quantizer,
            "check": self.check.to_meta(),
        }
        if self.base is not None:
            meta.update(kind="lora-adapter", base=str(self.base), alpha=self.alpha)
        return meta


def export_task(
    task: Task | str | os.PathLike[str],
    *,
    root: str | os.PathLike[str] | None = None,
    format: str = "gguf",
    quant: str = "f16",
    output: str | os.PathLike[str] | None = None,
    force: bool = False,
    adapter: bool = False,
    check: bool = True,
    status: Status | None = None,
    progress: ProgressSink | None = None,
) -> ExportResult:
    """Write ``<output>/<task>-<quant>.gguf`` (default output: ``<task>/export``) and its
    Ollama Modelfile ``<task>-<quant>.Modelfile`` from the task's merged model; with
    ``adapter=True``, ``<task>-lora.gguf`` (the LoRA adapter alone) beside the base model's
    GGUF ``<base>-<quant>.gguf`` (written when missing) and ``<task>-lora.Modelfile``.

    Every file is read back before it is reported; ``check=False`` skips only the logit
    comparison with the merged model. ``status`` receives a line per stage, ``progress`` an
    event per tensor written. Raises UsageProblem for an unknown format or type,
    DependencyError for a K-quant without llama.cpp's quantizer, TaskError for a task without
    a trained model, ExportError for an architecture or tokenizer this export does not know,
    a failed check, or an existing export without ``force``. An interrupted export leaves no
    file behind and an existing one untouched.
    """
    if format not in FORMATS:
        raise UsageProblem(f"Unknown export format {format!r}: use {', '.join(FORMATS)}.")
    spec = require_quant(quant)
    report = status or (lambda _message: None)
    task = Task.of(task, root)
    folder = Path(output).expanduser() if output else task.path / EXPORT_DIR
    if adapter:
        return _export_adapter(task, spec, folder, force, check, report, progress)
    stem = f"{task.name}-{quant}"
    target, modelfile = folder / f"{stem}.gguf", folder / f"{stem}.Modelfile"
    _check_targets([target, modelfile], force)
    _check_base_model(task)

    from ..merge import merged_model

    model_dir = merged_model(task, status=report)
    source = Source.read(model_dir)
    tensors, checked, quantizer = write_checked(
        source, target, spec, task.name, force, check, report, progress
    )
    atomic_write_text(modelfile, modelfile_text(source.tokenizer, target.name, task.system_prompt))
    result = ExportResult(
        path=target.resolve(),
        modelfile=modelfile.resolve(),
        quant=quant,
        architecture=source.model_type,
        size_bytes=target.stat().st_size,
        tensors=len(tensors),
        model_dir=model_dir,
        ollama_name=_ollama_name(task.name),
        check=checked,
        quantizer=quantizer,
    )
    _record(task, result)
    return result


def write_checked(
    source: Source,
    target: Path,
    quant: Quant,
    name: str,
    replace: bool,
    check: bool,
    report: Status,
    progress: ProgressSink | None,
) -> tuple[list[PlannedTensor], CheckReport, str]:
    """Write the model GGUF of ``source`` into ``target`` (atomically), read it back and
    compare it with the source model before it takes its name. Returns the tensors, the
    check and who wrote the weights."""
    report(f"Writing {target} ({source.model_type}, {quant.name})")
    with atomic_file(target, replace=replace) as tmp:
        if quant.writer == "gguf":
            tensors = write_model_gguf(source, tmp, quant, name, progress)
            expected = [(t.name, t.shape, t.kind.name) for t in tensors]
            quantizer = "gguf"
        else:
            f16 = tmp.with_name(f"{tmp.name}.f16")
            try:
                tensors = write_model_gguf(source, f16, QUANT_TYPES["f16"], name, progress)
                report(f"Quantizing to {quant.name} with llama.cpp's quantizer")
                quantizer = quantize(f16, tmp, quant)
            finally:
                f16.unlink(missing_ok=True)
            # llama.cpp picks each matrix's type in the mix; 1-D tensors stay f32.
            expected = [(t.name, t.shape, "F32" if t.kind.name == "F32" else None) for t in tensors]
        report("Checking the file: reading it back")
        checked = read_back(tmp, expected, file_type=quant.file_type)
        parameters = sum(math.prod(t.shape) for t in tensors)
        reason = (
            why_not_compared(source.family, source.config, parameters)
            if check
            else "skipped (check=False)"
        )
        if reason:
            checked.reason = reason
        else:
            report("Comparing the file's logits with the model it was written from")
            compare_logits(tmp, source.folder, checked)
    return tensors, checked, quantizer


def _export_adapter(
    task: Task,
    quant: Quant,
    folder: Path,
    force: bool,
    check: bool,
    report: Status,
    progress: ProgressSink | None,
) -> ExportResult:
    adapter_dir, label = task.find_adapter("final")
    lora_settings(adapter_dir)  # an adapter llama.cpp cannot load is refused before any work
    stem = f"{task.name}-lora"
    target, modelfile = folder / f"{stem}.gguf", folder / f"{stem}.Modelfile"
    _check_targets([target, modelfile], force)
    _check_base_model(task)

    from ..models import resolve_model

    base_dir = resolve_model(task.base_model, trust_remote_code=task.trust_remote_code)
    source = Source.read(base_dir)
    base = folder / f"{_ollama_name(base_dir.name)}-{quant.name}.gguf"
    if base.is_file() and not force:
        report(f"Base model GGUF {base} is there already: kept")
    else:
        write_checked(source, base, quant, base_dir.name, True, check, report, progress)
    report(f"Writing {target} (LoRA adapter {adapter_dir}, {label})")
    with atomic_file(target, replace=force) as tmp:
        tensors, alpha = write_adapter_gguf(
            adapter_dir, source.family, source.config, tmp, task.name, progress
        )
        checked = read_back(tmp, [(t.name, t.shape, "F32") for t in tensors])
        checked.reason = "transformers does not apply GGUF adapters; llama.cpp does (--lora)"
    text = modelfile_text(source.tokenizer, base.name, task.system_prompt, adapter=target.name)
    atomic_write_text(modelfile, text)
    result = ExportResult(
        path=target.resolve(),
        modelfile=modelfile.resolve(),
        quant=quant.name,
        architecture=source.model_type,
        size_bytes=target.stat().st_size,
        tensors=len(tensors),
        model_dir=adapter_dir,
        ollama_name=_ollama_name(task.name),
        check=checked,
        base=base.resolve(),
        alpha=alpha,
    )
    _record(task, result)
    return result


def _record(task: Task, result: ExportResult) -> None:
    exports = {**task.reload().exports, result.path.name: result.to_meta()}
    task.update(exports=exports)


def _check_targets(paths: list[Path], force: bool) -> None:
    for path in paths:
        if path.is_dir():
            raise ExportError(f"{path} is a folder: choose another output folder with -o.")
        if path.exists() and not force:
            raise ExportError(f"{path} already exists: pass force=True to replace it.")


def _check_base_model(task: Task) -> None:
    """Refuse an architecture this export does not know before a merge is spent on it."""
    from ..models import model_config

    try:
        config = model_config(task.base_model, trust_remote_code=task.trust_remote_code)
    except FinetuneError:
        return  # the merge, if one is needed, says what is missing
    check_architecture(config, task.base_model)


def _ollama_name(name: str) -> str:
    """An Ollama model name (lower case letters, digits, '.', '-', '_') for a task name."""
    cleaned = "".join(ch if ch.isalnum() or ch in "._-" else "-" for ch in name.lower())
    return cleaned.strip("-._") or "model"
