"""Chat templates and stop tokens: how a conversation becomes a prompt, and where an answer ends.

Shared by the data layer (training text), chat, merge and every later consumer of a model, so
that training and generation agree. Works on any tokenizer object; imports nothing heavy.
"""

from __future__ import annotations

from typing import Any

from .errors import ModelError

#: Section headers of the layout used when a tokenizer has no chat template (the data layer
#: trains with it, ``FALLBACK_TEMPLATE`` renders it for generation).
FALLBACK_HEADERS = {
    "system": "### System:\n",
    "user": "### Instruction:\n",
    "context": "### Input:\n",
    "assistant": "### Response:\n",
}

#: The fallback layout as a Jinja chat template: one turn after the other.
FALLBACK_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}### System:\n{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}### Instruction:\n{{ message['content'] }}\n\n"
    "{% else %}### Response:\n{{ message['content'] }}{{ eos_token }}\n\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}### Response:\n{% endif %}"
)
_PROBE = "sage-finetune-probe"


def has_chat_template(tokenizer: Any) -> bool:
    return bool(tokenizer is not None and getattr(tokenizer, "chat_template", None))


def ensure_chat_template(tokenizer: Any) -> None:
    """Give a tokenizer without a chat template the fallback one."""
    if not has_chat_template(tokenizer):
        tokenizer.chat_template = FALLBACK_TEMPLATE


def supports_tools(tokenizer: Any) -> bool:
    """Whether the chat template renders a ``tools`` list, an assistant's ``tool_calls`` and a
    ``tool`` message (checked by rendering a probe conversation)."""
    if not has_chat_template(tokenizer):
        return False
    tool, call, result = (f"{_PROBE}-{part}".replace("-", "_") for part in ("tool", "call", "out"))
    tools = [
        {
            "type": "function",
            "function": {
                "name": tool,
                "description": "probe",
                "parameters": {"type": "object", "properties": {}},
            },
        }
    ]
    conversation = [
        {"role": "user", "content": "hi"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": call, "arguments": {}}}],
        },
        {"role": "tool", "content": result},
        {"role": "assistant", "content": "done"},
    ]
    try:
        text = tokenizer.apply_chat_template(conversation, tools=tools, tokenize=False)
    except Exception:  # a template that refuses tool messages has no tool support
        return False
    return all(name in text for name in (tool, call, result))


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


def set_generation_stops(model: Any, tokenizer: Any) -> None:
    """The model's generation config stops at its end-of-turn tokens and pads with the
    tokenizer's pad token (what a saved model folder needs for chat, serve and export)."""
    generation = model.generation_config
    stops = stop_token_ids(tokenizer, generation)
    generation.eos_token_id = stops[0] if len(stops) == 1 else stops
    if tokenizer.pad_token_id is not None:
        generation.pad_token_id = tokenizer.pad_token_id


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
