"""Talk to a task's model: the merged model, base + adapter, or the base model alone.

``load_chat_model`` picks and loads the model; ``ChatSession`` keeps the conversation, renders
it through the model's chat template and generates (greedy unless a temperature is given),
stopping at EOS or the template's end-of-turn token. Text is streamed through a callback; the
CLI does the printing.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import TextStreamer

from .errors import ModelError, TaskError, UsageProblem
from .merge import base_model_name, first_line, is_complete_adapter
from .meta import TaskMeta, load_meta
from .models import _is_model_dir, load_tokenizer, resolve_model
from .paths import ADAPTER_DIR, resolve_task

#: Used when a tokenizer has no chat template: the ``### Instruction:`` / ``### Response:``
#: layout the data layer trains with when there is no template, one turn after the other.
FALLBACK_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}### System:\n{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}### Instruction:\n{{ message['content'] }}\n\n"
    "{% else %}### Response:\n{{ message['content'] }}{{ eos_token }}\n\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}### Response:\n{% endif %}"
)
_PROBE = "sage-finetune-probe"

StreamCallback = Callable[[str], None]
Progress = Callable[[str], None]


# --- template and stop tokens (merge.py uses these too) -----------------------------------------


def ensure_chat_template(tokenizer: Any) -> None:
    """Give a tokenizer without a chat template the fallback one."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = FALLBACK_TEMPLATE


def end_of_turn_id(tokenizer: Any) -> int | None:
    """The special token the chat template writes right after an assistant message, if any."""
    conversation = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": _PROBE},
    ]
    try:
        text = tokenizer.apply_chat_template(conversation, tokenize=False)
    except Exception:  # a template that cannot render a plain exchange marks no end of turn
        return None
    if _PROBE not in text:
        return None
    tail = text[text.rindex(_PROBE) + len(_PROBE) :].lstrip(" ")
    ids = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    return ids[0] if ids and ids[0] in special else None


def stop_token_ids(tokenizer: Any, generation_config: Any = None) -> list[int]:
    """Token ids that end an answer: the model's EOS ids, the tokenizer's EOS, end of turn."""
    configured = getattr(generation_config, "eos_token_id", None)
    candidates = [
        *(configured if isinstance(configured, list) else [configured]),
        tokenizer.eos_token_id,
        end_of_turn_id(tokenizer),
    ]
    stops: list[int] = []
    for token in candidates:
        if token is not None and token not in stops:
            stops.append(int(token))
    if not stops:
        raise ModelError(
            "The tokenizer defines no end-of-sequence token: generation could not stop."
        )
    return stops


# --- loading ------------------------------------------------------------------------------------


@dataclass
class ChatModel:
    """A loaded model ready to chat, and a description of where it came from."""

    model: Any
    tokenizer: Any
    description: str


def load_chat_model(
    task: str | os.PathLike[str],
    *,
    root: str | os.PathLike[str] | None = None,
    base: bool = False,
    progress: Progress | None = None,
) -> ChatModel:
    """The task's merged model if present, else base + final adapter; ``base=True``: the base."""
    report = progress or (lambda _message: None)
    task_dir = resolve_task(os.fspath(task), root)
    meta = load_meta(task_dir)
    trust = bool(meta.training.get("trust_remote_code", False))
    base_name = base_model_name(meta)
    if base:
        return _load_base(base_name, trust, report)
    merged = meta.path(task_dir, meta.merged_path)
    if merged is not None and _is_model_dir(merged):
        report(f"Loading the merged model {merged}")
        return ChatModel(*_load_folder(merged, trust), f"merged model {merged}")
    if merged is not None:
        report(f"The merged model {merged} is missing or incomplete; using base + adapter.")
    adapter = meta.path(task_dir, meta.adapter_path) or task_dir / ADAPTER_DIR
    if not is_complete_adapter(adapter):
        raise TaskError(_not_trained_message(task_dir, meta, adapter))
    chat = _load_base(base_name, trust, report)
    report(f"Applying the adapter {adapter}")
    return ChatModel(
        _with_adapter(chat.model, adapter),
        adapter_tokenizer(adapter, base_name, trust_remote_code=trust),
        f"{base_name} + adapter {adapter}",
    )


def _not_trained_message(task_dir: Path, meta: TaskMeta, adapter: Path) -> str:
    return (
        f"Task {task_dir} has no trained model (status {meta.status}; no adapter at {adapter}): "
        f"run `sage finetune run {task_dir}` first, or talk to the base model with --base."
    )


def _load_base(base_name: str, trust: bool, report: Progress) -> ChatModel:
    path = resolve_model(base_name, trust_remote_code=trust)
    report(f"Loading the base model {base_name}")
    return ChatModel(*_load_folder(path, trust), f"base model {base_name}")


def _load_folder(folder: Path, trust: bool) -> tuple[Any, Any]:
    """Model (on the GPU when there is one, fp32 on CPU) and tokenizer of a model folder."""
    import torch
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = "auto" if device == "cuda" else torch.float32
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=trust)
    except (OSError, ValueError) as exc:
        raise ModelError(f"Cannot load the model in {folder}: {first_line(exc)}") from None
    tokenizer = load_tokenizer(str(folder), trust_remote_code=trust)
    ensure_chat_template(tokenizer)
    return model.to(device).eval(), tokenizer


def _with_adapter(model: Any, adapter: Path) -> Any:
    """Base model with the adapter merged in memory (generation runs at plain-model speed)."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, adapter).merge_and_unload().eval()
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelError(f"Cannot apply the adapter in {adapter}: {first_line(exc)}") from None


def adapter_tokenizer(adapter: Path, base_name: str, *, trust_remote_code: bool = False) -> Any:
    """The tokenizer training saved beside the adapter (it may carry added tokens), else the
    base model's; with a chat template either way."""
    if (adapter / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(adapter, trust_remote_code=trust_remote_code)
    else:
        tokenizer = load_tokenizer(base_name, trust_remote_code=trust_remote_code)
    ensure_chat_template(tokenizer)
    return tokenizer


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
        self.system = system
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
        streamer = _CallbackStreamer(self.tokenizer, stream_callback) if stream_callback else None
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
                "--max-new-tokens."
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


class _CallbackStreamer(TextStreamer):
    """Hands decoded text to a callback instead of printing it; leading whitespace dropped."""

    def __init__(self, tokenizer: Any, callback: StreamCallback) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.callback = callback
        self.started = False

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        if text:
            self.callback(text)
