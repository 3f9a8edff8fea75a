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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .adapters import adapter_for
from .errors import MergeError, ModelError, first_line
from .meta import TaskStatus
from .paths import MERGED_DIR, atomic_directory
from .progress import Status
from .task import Task
from .templates import set_generation_stops

if TYPE_CHECKING:
    from .adapters.base import Adapter

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


# --- the merge ----------------------------------------------------------------------------------


def merge_task(
    task: Task | str | os.PathLike[str],
    *,
    root: str | os.PathLike[str] | None = None,
    output: str | os.PathLike[str] | None = None,
    checkpoint: str | int = "final",
    dtype: str | None = None,
    force: bool = False,
    max_shard_size: str | int = DEFAULT_SHARD_SIZE,
    status: Status | None = None,
) -> MergeResult:
    """Merge a task's adapter into its base model and save a self-contained model folder.

    ``dtype`` is ``fp32``, ``bf16`` or ``fp16``; ``None`` keeps the base model's own dtype.
    Raises TaskError when the task has no such adapter, MergeError (nothing written) when the
    base model, the adapter or the output folder is unusable, or when the saved model's
    logits do not match base + adapter. The merge runs on the CPU in full precision.
    """
    report = status or (lambda _message: None)
    task = Task.of(task, root)
    _check_has_adapter(task)
    task.lock().check()  # a run in progress rewrites the adapter and the meta
    adapter_dir, label = task.find_adapter(checkpoint)
    target = Path(output).expanduser() if output else task.path / MERGED_DIR
    _check_target(target, task.path, adapter_dir, force)

    from .models import load_adapter_tokenizer, resolve_model

    trust = task.trust_remote_code
    base_name = task.base_model
    report(f"Resolving base model {base_name}")
    base_path = resolve_model(base_name, trust_remote_code=trust)
    report(f"Loading {base_path} in full precision")
    model = _load_full_precision(base_path, dtype, trust)
    dtype = dtype or _dtype_name(model.dtype)
    tokenizer = load_adapter_tokenizer(adapter_dir, base_name, trust_remote_code=trust)
    report(f"Applying adapter {adapter_dir} ({label})")
    unit = adapter_for(task.meta.training)
    model = _apply_adapter(unit, model, adapter_dir, base_name)
    inputs = _verify_inputs(tokenizer)
    reference = _logits(model, inputs)
    report("Merging the adapter into the base weights")
    merged = _merge(unit, model, tokenizer)
    del model

    with atomic_directory(target, replace=True) as staging:
        report(f"Saving the merged model ({dtype})")
        _write_model(merged, tokenizer, staging, max_shard_size)
        del merged
        gc.collect()
        report("Checking the saved model against base + adapter")
        max_diff, tolerance = _verify(staging, inputs, reference, dtype, trust)

    result = MergeResult(
        output=target.resolve(),
        dtype=dtype,
        size_bytes=_folder_size(target),
        checkpoint=label,
        max_logit_diff=max_diff,
        tolerance=tolerance,
        base_model=base_name,
    )
    task.update(
        status=TaskStatus.MERGED, merged_path=_meta_path(target, task.path), merge=result.to_meta()
    )
    return result


def merged_model(
    task: Task | str | os.PathLike[str],
    *,
    root: str | os.PathLike[str] | None = None,
    status: Status | None = None,
) -> Path:
    """The folder of the task's merged model, for the commands that use the model outside this
    plugin (export, serve). The final adapter is merged first when the task has no merged model
    yet, or when the one it has is older than the adapter (trained again since); ``status``
    says so. Raises TaskError when the task has neither."""
    report = status or (lambda _message: None)
    task = Task.of(task, root)
    if task.unit.standalone:  # full, freeze: the trained model itself
        return task.find_adapter("final")[0]
    state = task.merged_state()
    if state == "current":
        assert task.merged_dir is not None
        return task.merged_dir
    if state == "stale":
        why = f"The merged model {task.merged_dir} is older than the adapter: merging again."
    else:
        task.find_adapter("final")  # TaskError when there is nothing to merge
        why = f"Task {task.name!r} has no merged model yet: merging the adapter first."
    report(why)
    return merge_task(task, output=task.merged_dir, force=True, status=report).output


def _check_has_adapter(task: Task) -> None:
    """Full and freeze tasks train the model itself: nothing to merge."""
    if task.unit.standalone:
        raise MergeError(
            f"Task {task.name!r} is a {task.kind} fine-tune: it has no adapter to merge; its "
            f"model folder {task.adapter_dir} is what chat, eval, export and serve use."
        )


def _check_target(target: Path, task_dir: Path, adapter_dir: Path, force: bool) -> None:
    resolved = target.resolve()
    for keep in (task_dir.resolve(), adapter_dir.resolve()):
        if resolved == keep or resolved in keep.parents:
            raise MergeError(
                f"Refusing to write the merged model over {target}: choose another output."
            )
    if not target.exists():
        return
    if not target.is_dir():
        raise MergeError(f"{target} exists and is not a folder: choose another output.")
    if not force:
        raise MergeError(f"{target} already exists: pass force=True to replace it.")
    if any(target.iterdir()) and not (target / "config.json").is_file():
        raise MergeError(
            f"Refusing to replace {target} with force=True: it is not a model folder "
            "(no config.json). Choose another output."
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


def _apply_adapter(unit: Adapter, model: Any, adapter_dir: Path, base_name: str) -> Any:
    try:
        return unit.apply(model, adapter_dir)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise MergeError(
            f"The adapter at {adapter_dir} does not load onto {base_name}: {first_line(exc)}"
        ) from None


def _merge(unit: Adapter, model: Any, tokenizer: Any) -> Any:
    try:
        merged = unit.merge(model, safe=True)
    except ValueError as exc:  # safe_merge found NaNs: the adapter is broken
        raise MergeError(f"Merging failed: {first_line(exc)}") from None
    # The merged weights are full precision whatever the training copy was.
    if hasattr(merged.config, "quantization_config"):
        del merged.config.quantization_config
    set_generation_stops(merged, tokenizer)
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
            "try dtype=fp32, or report the model and adapter."
        )
    return max_diff, tolerance


def _folder_size(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def _meta_path(target: Path, task_dir: Path) -> str:
    with contextlib.suppress(ValueError):
        return str(target.resolve().relative_to(task_dir.resolve()))
    return str(target.resolve())
