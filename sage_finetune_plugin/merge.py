"""Merge a task's LoRA adapter into a full-precision copy of its base model.

The recipe: resolve the base model named in the meta -> load it unquantized (never the 4/8-bit
copy training may have used) -> apply the adapter -> record reference logits -> merge and
unload -> save weights (safetensors, sharded when large), config, generation config with the
model's end-of-turn tokens, tokenizer and chat template into a temporary folder -> reload that
folder with plain transformers and compare its logits with the reference -> rename it into
place -> record the merge in the meta.

An interrupted or failed merge removes its temporary folder; an existing output is replaced
only with ``force=True``, and only once the new one is complete.
"""

from __future__ import annotations

import contextlib
import gc
import os
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import MergeError, ModelError
from .locks import RunLock
from .meta import TaskMeta, load_meta, update_meta
from .paths import ADAPTER_DIR, CHECKPOINTS_DIR, MERGED_DIR, resolve_task
from .training_utils import is_complete_checkpoint, list_checkpoints

#: ``--dtype`` names -> torch dtype names.
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
#: Largest accepted logit difference, relative to the largest reference logit (at least 1):
#: fp32 only sees summation-order noise; half precisions round every merged weight.
TOLERANCE = {"fp32": 1e-3, "bf16": 5e-2, "fp16": 2e-2}
#: Prompts the merged model is checked on (rendered through the chat template).
VERIFY_PROMPTS = (
    "Hello! Who are you?",
    "Write a Python function that returns the sum of a list of numbers.",
    "What is the capital of France?",
)
DEFAULT_SHARD_SIZE = "2GB"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")

Progress = Callable[[str], None]


@dataclass
class MergeResult:
    """What a merge produced, as recorded in the task's meta."""

    output: Path
    dtype: str
    size_bytes: int
    checkpoint: str
    max_logit_diff: float
    tolerance: float
    base_model: str

    def to_meta(self) -> dict[str, Any]:
        return {
            "dtype": self.dtype,
            "size_bytes": self.size_bytes,
            "checkpoint": self.checkpoint,
            "max_logit_diff": self.max_logit_diff,
            "output": str(self.output),
            "base_model": self.base_model,
            "tolerance": self.tolerance,
        }


# --- which adapter, which base ------------------------------------------------------------------


def is_complete_adapter(path: Path) -> bool:
    """A folder peft can load an adapter from."""
    return (path / "adapter_config.json").is_file() and any(
        (path / name).is_file() for name in ADAPTER_FILES
    )


def complete_checkpoints(task_dir: Path) -> list[tuple[int, Path]]:
    """Checkpoints training finished writing, as ``(step, path)`` in numeric step order."""
    return [
        (step, path)
        for step, path in list_checkpoints(Path(task_dir) / CHECKPOINTS_DIR)
        if is_complete_checkpoint(path)
    ]


def find_adapter(
    task_dir: Path, meta: TaskMeta, checkpoint: str | int = "final"
) -> tuple[Path, str]:
    """The adapter folder to merge and its label: ``final``, or ``checkpoint-N``."""
    choice = str(checkpoint).strip().lower()
    if choice == "final":
        adapter = meta.path(task_dir, meta.adapter_path) or task_dir / ADAPTER_DIR
        if is_complete_adapter(adapter):
            return adapter, "final"
        hint = (
            " (or merge a checkpoint with --checkpoint latest)"
            if complete_checkpoints(task_dir)
            else ""
        )
        raise MergeError(
            f"Task {task_dir} has no trained adapter at {adapter}: "
            f"run training first: sage finetune run {task_dir}{hint}."
        )
    checkpoints = complete_checkpoints(task_dir)
    if not checkpoints:
        raise MergeError(
            f"Task {task_dir} has no complete checkpoint under {task_dir / 'checkpoints'}: "
            f"run training first: sage finetune run {task_dir}."
        )
    if choice == "latest":
        step, path = checkpoints[-1]
        return path, f"checkpoint-{step}"
    if not choice.isdigit():
        raise MergeError(
            f"--checkpoint must be final, latest or a step number, got {checkpoint!r}."
        )
    by_step = dict(checkpoints)
    if int(choice) not in by_step:
        steps = ", ".join(str(step) for step, _ in checkpoints)
        raise MergeError(f"Task {task_dir} has no checkpoint-{int(choice)}; available: {steps}.")
    return by_step[int(choice)], f"checkpoint-{int(choice)}"


def base_model_name(meta: TaskMeta) -> str:
    """The base model the adapter was trained on: the training config's, else the meta's."""
    name = meta.training.get("model_name") or meta.model
    if not name:
        raise MergeError("The task's meta names no base model (keys training.model_name, model).")
    return name


# --- the merge ----------------------------------------------------------------------------------


def merge_task(
    task: str | os.PathLike[str],
    *,
    root: str | os.PathLike[str] | None = None,
    output: str | os.PathLike[str] | None = None,
    checkpoint: str | int = "final",
    dtype: str | None = None,
    force: bool = False,
    max_shard_size: str | int = DEFAULT_SHARD_SIZE,
    progress: Progress | None = None,
) -> MergeResult:
    """Merge a task's adapter into its base model and save a self-contained model folder.

    ``dtype`` is ``fp32``, ``bf16`` or ``fp16``; ``None`` keeps the base model's own dtype.
    Raises MergeError (nothing written) when the adapter, the base model or the output folder
    is unusable, or when the saved model's logits do not match base + adapter.
    """
    report = progress or (lambda _message: None)
    task_dir = resolve_task(os.fspath(task), root)
    RunLock(task_dir).check()  # a run in progress rewrites the adapter and the meta
    meta = load_meta(task_dir)
    adapter_dir, label = find_adapter(task_dir, meta, checkpoint)
    target = Path(output).expanduser() if output else task_dir / MERGED_DIR
    _check_target(target, task_dir, adapter_dir, force)

    from .chat import adapter_tokenizer
    from .models import resolve_model

    trust = bool(meta.training.get("trust_remote_code", False))
    base_name = base_model_name(meta)
    report(f"Resolving base model {base_name}")
    base_path = resolve_model(base_name, trust_remote_code=trust)
    report(f"Loading {base_path} in full precision")
    model = _load_full_precision(base_path, dtype, trust)
    dtype = dtype or _dtype_name(model.dtype)
    tokenizer = adapter_tokenizer(adapter_dir, base_name, trust_remote_code=trust)
    report(f"Applying adapter {adapter_dir} ({label})")
    model = _apply_adapter(model, adapter_dir, base_name)
    inputs = _verify_inputs(tokenizer)
    reference = _logits(model, inputs)
    report("Merging the adapter into the base weights")
    merged = _merge(model, tokenizer)
    del model

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _sibling(target, "tmp")
    try:
        report(f"Saving the merged model ({dtype})")
        _write_model(merged, tokenizer, staging, max_shard_size)
        del merged
        gc.collect()
        report("Checking the saved model against base + adapter")
        max_diff, tolerance = _verify(staging, inputs, reference, dtype, trust)
        _install(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

    result = MergeResult(
        output=target.resolve(),
        dtype=dtype,
        size_bytes=_folder_size(target),
        checkpoint=label,
        max_logit_diff=max_diff,
        tolerance=tolerance,
        base_model=base_name,
    )
    update_meta(
        task_dir,
        status="merged",
        merged_path=_meta_path(target, task_dir),
        merge=result.to_meta(),
    )
    return result


def _check_target(target: Path, task_dir: Path, adapter_dir: Path, force: bool) -> None:
    resolved = target.resolve()
    for keep in (task_dir.resolve(), adapter_dir.resolve()):
        if resolved == keep or resolved in keep.parents:
            raise MergeError(
                f"Refusing to write the merged model over {target}: choose another --output."
            )
    if not target.exists():
        return
    if not target.is_dir():
        raise MergeError(f"{target} exists and is not a folder: choose another --output.")
    if not force:
        raise MergeError(f"{target} already exists: pass --force to replace it.")
    if any(target.iterdir()) and not (target / "config.json").is_file():
        raise MergeError(
            f"Refusing to replace {target} with --force: it is not a model folder "
            "(no config.json). Choose another --output."
        )


def _dtype_name(torch_dtype: Any) -> str:
    names = {value: key for key, value in DTYPES.items()}
    return names.get(str(torch_dtype).removeprefix("torch."), "fp32")


def _load_full_precision(base_path: Path, dtype: str | None, trust: bool) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    if dtype is not None and dtype not in DTYPES:
        raise MergeError(f"Unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}.")
    torch_dtype = getattr(torch, DTYPES[dtype]) if dtype else "auto"
    try:
        model = AutoModelForCausalLM.from_pretrained(
            base_path, dtype=torch_dtype, trust_remote_code=trust
        )
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"Cannot load the base model from {base_path}: {first_line(exc)}"
        ) from None
    if getattr(model.config, "quantization_config", None) is not None:
        raise MergeError(
            f"The base model at {base_path} is stored quantized; merging needs its "
            "full-precision weights: train from the unquantized original model."
        )
    model.eval()
    return model


def _apply_adapter(model: Any, adapter_dir: Path, base_name: str) -> Any:
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, adapter_dir).eval()
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise MergeError(
            f"The adapter at {adapter_dir} does not load onto {base_name}: {first_line(exc)}"
        ) from None


def _merge(model: Any, tokenizer: Any) -> Any:
    from .chat import stop_token_ids

    try:
        merged = model.merge_and_unload(safe_merge=True)
    except ValueError as exc:  # safe_merge found NaNs: the adapter is broken
        raise MergeError(f"Merging failed: {first_line(exc)}") from None
    # The merged weights are full precision whatever the training copy was.
    if hasattr(merged.config, "quantization_config"):
        del merged.config.quantization_config
    generation = merged.generation_config
    stops = stop_token_ids(tokenizer, generation)
    generation.eos_token_id = stops[0] if len(stops) == 1 else stops
    if tokenizer.pad_token_id is not None:
        generation.pad_token_id = tokenizer.pad_token_id
    return merged


def _write_model(model: Any, tokenizer: Any, folder: Path, max_shard_size: str | int) -> None:
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(folder)


def _verify_inputs(tokenizer: Any) -> list[dict[str, Any]]:
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt"
        )
        for prompt in VERIFY_PROMPTS
    ]


def _logits(model: Any, inputs: list[dict[str, Any]]) -> list[Any]:
    import torch

    with torch.inference_mode():
        return [model(**batch).logits.float() for batch in inputs]


def _verify(
    folder: Path, inputs: list[dict[str, Any]], reference: list[Any], dtype: str, trust: bool
) -> tuple[float, float]:
    """Reload the saved folder with plain transformers and compare its logits to the reference."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=getattr(torch, DTYPES[dtype]), trust_remote_code=trust
    ).eval()
    merged = _logits(model, inputs)
    del model
    max_diff = max(float((m - r).abs().max()) for m, r in zip(merged, reference, strict=True))
    scale = max(1.0, *(float(r.abs().max()) for r in reference))
    tolerance = TOLERANCE[dtype] * scale
    if not max_diff <= tolerance:  # also catches NaN
        raise MergeError(
            f"The merged model does not reproduce base + adapter: max logit difference "
            f"{max_diff:.3g} > tolerance {tolerance:.3g} ({dtype}). Nothing was written; "
            "try --dtype fp32, or report the model and adapter."
        )
    return max_diff, tolerance


def _install(staging: Path, target: Path) -> None:
    """Rename the finished folder into place; an old one is kept until the new one is there."""
    if not target.exists():
        os.replace(staging, target)
        return
    old = _sibling(target, "old")
    os.replace(target, old / target.name)
    try:
        os.replace(staging, target)
    except BaseException:
        os.replace(old / target.name, target)  # if this fails too, the old model stays in `old`
        old.rmdir()
        raise
    shutil.rmtree(old, ignore_errors=True)


def _sibling(target: Path, kind: str) -> Path:
    """A new hidden folder next to ``target`` (same file system, so renames are atomic)."""
    folder = target.parent / f".{target.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"
    folder.mkdir()
    return folder


def _folder_size(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def _meta_path(target: Path, task_dir: Path) -> str:
    with contextlib.suppress(ValueError):
        return str(target.resolve().relative_to(task_dir.resolve()))
    return str(target.resolve())


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
