"""Talk to a task's model: the merged model, base + adapter, or the base model alone.

``load_chat_model`` picks and loads the model; ``ChatSession`` keeps the conversation, renders
it through the model's chat template and generates (greedy unless a temperature is given),
stopping at EOS or the template's end-of-turn token. A task trained with a default system
prompt (``quickstart --system``) is talked to with it unless another one is given. Text is
streamed through a callback; the CLI does the printing.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .adapters import adapter_for
from .errors import ModelError, TaskError, UsageProblem, first_line
from .models import load_adapter_tokenizer, load_tokenizer, resolve_model
from .progress import Status
from .task import Task
from .templates import ensure_chat_template, stop_token_ids
from .training.runtime import Hardware, Runtime, inference_runtime

StreamCallback = Callable[[str], None]


# --- loading ------------------------------------------------------------------------------------


@dataclass
class ChatModel:
    """A loaded model ready to chat, a description of where it came from, and the task's
    default system prompt (None if it has none)."""

    model: Any
    tokenizer: Any
    description: str
    system: str | None = None


def load_chat_model(
    task: Task | str | os.PathLike[str],
    *,
    root: str | os.PathLike[str] | None = None,
    base: bool = False,
    status: Status | None = None,
    hardware: Hardware | None = None,
    checkpoint: str | int = "final",
) -> ChatModel:
    """The task's merged model if present, else base + final adapter; ``base=True``: the base;
    ``checkpoint`` ``latest`` or a step number: base + that checkpoint's adapter. It runs
    where the runtime policy says (GPU, Apple MPS, else CPU)."""
    report = status or (lambda _message: None)
    task = Task.of(task, root)
    device = inference_runtime(hardware)
    trust, base_name, system = task.trust_remote_code, task.base_model, task.system_prompt
    if base:
        chat = _load_base(base_name, trust, device, report)
        chat.system = system  # the same prompt as the fine-tune, for a fair comparison
        return chat
    final = str(checkpoint).strip().lower() == "final"
    if task.unit.standalone:  # full, freeze: the trained model (or a checkpoint) itself
        return _load_trained_model(task, checkpoint, device, report)
    merged, state = task.merged_dir, task.merged_state() if final else "none"
    if state == "current" and merged is not None:
        report(f"Loading the merged model {merged}")
        return ChatModel(*_load_folder(merged, trust, device), f"merged model {merged}", system)
    if state == "stale":
        report(f"The merged model {merged} is older than the adapter; using base + adapter.")
    elif state == "missing":
        report(f"The merged model {merged} is missing or incomplete; using base + adapter.")
    try:
        adapter, _ = task.find_adapter(checkpoint)
    except TaskError:
        if not final:
            raise
        raise TaskError(_not_trained_message(task)) from None
    chat = _load_base(base_name, trust, device, report)
    report(f"Applying the adapter {adapter}")
    return ChatModel(
        _with_adapter(task, chat.model, adapter),
        load_adapter_tokenizer(adapter, base_name, trust_remote_code=trust),
        f"{base_name} + adapter {adapter}",
        system,
    )


def _load_trained_model(
    task: Task, checkpoint: str | int, runtime: Runtime, report: Status
) -> ChatModel:
    """The model a full or freeze run saved (or one of its checkpoints)."""
    try:
        folder, label = task.find_adapter(checkpoint)
    except TaskError:
        if str(checkpoint).strip().lower() != "final":
            raise
        raise TaskError(_not_trained_message(task)) from None
    report(f"Loading the trained model {folder}")
    model, tokenizer = _load_folder(folder, task.trust_remote_code, runtime, task.base_model)
    description = f"{task.kind} fine-tuned model {folder} ({label})"
    return ChatModel(model, tokenizer, description, task.system_prompt)


def _not_trained_message(task: Task) -> str:
    return (
        f"Task {task.path} has no trained model (status {task.meta.status}; nothing at "
        f"{task.adapter_dir}): run `sage finetune run {task.path}` first, or talk to the base "
        "model with base=True."
    )


def _load_base(base_name: str, trust: bool, runtime: Runtime, report: Status) -> ChatModel:
    path = resolve_model(base_name, trust_remote_code=trust)
    report(f"Loading the base model {base_name}")
    return ChatModel(*_load_folder(path, trust, runtime), f"base model {base_name}")


def _load_folder(
    folder: Path, trust: bool, runtime: Runtime, base_name: str | None = None
) -> tuple[Any, Any]:
    """Model and tokenizer of a model folder, on the runtime's device and in its dtype
    (``base_name``: the base model's tokenizer where the folder has none, a checkpoint)."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=runtime.dtype, trust_remote_code=trust
        )
    except (OSError, ValueError) as exc:
        raise ModelError(f"Cannot load the model in {folder}: {first_line(exc)}") from None
    if base_name is not None:
        tokenizer = load_adapter_tokenizer(folder, base_name, trust_remote_code=trust)
    else:
        tokenizer = load_tokenizer(str(folder), trust_remote_code=trust)
        ensure_chat_template(tokenizer)
    return model.to(runtime.device).eval(), tokenizer


def _with_adapter(task: Task, model: Any, adapter: Path) -> Any:
    """Base model with the adapter merged in memory (generation runs at plain-model speed)."""
    unit = adapter_for(task.meta.training)
    try:
        return unit.merge(unit.apply(model, adapter), safe=False).eval()
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelError(f"Cannot apply the adapter in {adapter}: {first_line(exc)}") from None


# --- the conversation ---------------------------------------------------------------------------


class ChatSession:
    """A conversation with one model: history, template rendering, streamed generation."""

    def __init__(
        self,
        chat: ChatModel,
        *,
        system: str | None = None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
    ) -> None:
        if max_new_tokens < 1:
            raise UsageProblem(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
        if temperature < 0:
            raise UsageProblem(f"temperature must not be negative, got {temperature}.")
        self.model = chat.model
        self.tokenizer = chat.tokenizer
        self.description = chat.description
        #: None: the task's default system prompt; "" for none at all.
        self.system = system if system is not None else chat.system
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.stop_ids = stop_token_ids(self.tokenizer, self.model.generation_config)
        self.history: list[dict[str, str]] = []

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.history.clear()

    def generate(self, user_text: str, stream_callback: StreamCallback | None = None) -> str:
        """Answer ``user_text`` in the context of the history; stream pieces to the callback."""
        import torch

        turn = [{"role": "user", "content": user_text}]
        inputs = self._encode(turn).to(self.model.device)
        streamer = _streamer(self.tokenizer, stream_callback) if stream_callback else None
        with torch.inference_mode():
            output = self.model.generate(**inputs, **self._generation_kwargs(), streamer=streamer)
        new_tokens = output[0, inputs["input_ids"].shape[1] :]
        answer = self.tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
        self.history += [*turn, {"role": "assistant", "content": answer}]
        return answer

    def _encode(self, turn: list[dict[str, str]]) -> Any:
        """The prompt tokens; the oldest exchanges are dropped when the context is full."""
        limit = getattr(self.model.config, "max_position_embeddings", None)
        history = list(self.history)
        while True:
            inputs = self.tokenizer.apply_chat_template(
                self._system_turn() + history + turn,
                add_generation_prompt=True,
                return_tensors="pt",
            )
            length = inputs["input_ids"].shape[1]
            if limit is None or length + self.max_new_tokens <= limit or not history:
                break
            history = history[2:]
        if limit is not None and length + self.max_new_tokens > limit:
            raise ModelError(
                f"The message is too long: {length} tokens plus {self.max_new_tokens} new ones "
                f"exceed the model's context of {limit} tokens. Shorten it or lower "
                "max_new_tokens."
            )
        return inputs

    def _system_turn(self) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.system}] if self.system else []

    def _generation_kwargs(self) -> dict[str, Any]:
        sampling = self.temperature > 0
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": sampling,
            "eos_token_id": self.stop_ids,
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        if sampling:
            kwargs["temperature"] = self.temperature
        else:  # greedy: clear sampling settings a model's generation config may carry
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs


def _streamer(tokenizer: Any, callback: StreamCallback) -> Any:
    """A transformers streamer that hands decoded text to ``callback`` (leading whitespace of
    the answer dropped) instead of printing it."""
    from transformers import TextStreamer

    class CallbackStreamer(TextStreamer):
        started = False

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if not self.started:
                text = text.lstrip()
                self.started = bool(text)
            if text:
                callback(text)

    return CallbackStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
