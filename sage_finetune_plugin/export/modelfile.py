"""The Ollama Modelfile written beside an export: the GGUF file (and the adapter GGUF, for an
adapter export), the prompt layout when the chat template renders ChatML, the system prompt,
the stop tokens."""

from __future__ import annotations

from typing import Any

from ..templates import stop_token_ids

#: Ollama's form of the ChatML prompt layout (SmolLM2 and Qwen2 templates render this way).
CHATML_TEMPLATE = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
    "<|im_start|>assistant\n"
)
_PROBE_SYSTEM, _PROBE_USER, _PROBE_ANSWER = "probe-system", "probe-user", "probe-answer"


def modelfile_text(
    tokenizer: Any, gguf_name: str, system: str | None, *, adapter: str | None = None
) -> str:
    """The Modelfile: the GGUF beside it (``FROM``; the LoRA adapter GGUF as ``ADAPTER`` when
    given), the prompt layout when it is ChatML, the system prompt (the task's, else the
    default the chat template writes), the stop tokens."""
    chatml, default_system = chatml_layout(tokenizer)
    stem = (adapter or gguf_name).removesuffix(".gguf")
    lines = [
        "# Ollama Modelfile written by sage-finetune-plugin. Use it with:",
        f"#   ollama create NAME -f {stem}.Modelfile",
        f"FROM ./{gguf_name}",
    ]
    if adapter:
        lines.append(f"ADAPTER ./{adapter}")
    if chatml:
        lines.append(f'TEMPLATE """{CHATML_TEMPLATE}"""')
    else:
        lines.append(
            "# Prompt layout: Ollama reads it from the chat template inside the GGUF file."
        )
    system = system or default_system
    if system:
        lines.append(f'SYSTEM """{system.replace(chr(34) * 3, chr(39) * 3)}"""')
    for token_id in stop_token_ids(tokenizer):
        token = tokenizer.convert_ids_to_tokens(token_id)
        escaped = token.replace("\\", "\\\\").replace('"', '\\"')
        lines.append(f'PARAMETER stop "{escaped}"')
    return "\n".join(lines) + "\n"


def chatml_layout(tokenizer: Any) -> tuple[bool, str | None]:
    """Whether the chat template renders ChatML, and the system prompt it writes when a
    conversation has none (SmolLM2 and Qwen2.5 templates add one)."""

    def render(messages: list[dict[str, str]]) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def turn(role: str, content: str) -> str:
        return f"<|im_start|>{role}\n{content}<|im_end|>\n"

    user = {"role": "user", "content": _PROBE_USER}
    try:
        with_system = render([{"role": "system", "content": _PROBE_SYSTEM}, user])
        two_turns = render([user, {"role": "assistant", "content": _PROBE_ANSWER}, user])
        alone = render([user])
    except Exception:  # a template that cannot render a plain exchange is not ChatML
        return False, None
    prompt = "<|im_start|>assistant\n"
    if with_system != turn("system", _PROBE_SYSTEM) + turn("user", _PROBE_USER) + prompt:
        return False, None
    exchange = turn("user", _PROBE_USER) + turn("assistant", _PROBE_ANSWER)
    suffix = turn("user", _PROBE_USER) + prompt
    if not (alone.endswith(suffix) and two_turns.endswith(exchange + suffix)):
        return False, None
    preamble = alone.removesuffix(suffix)
    if not preamble:
        return True, None
    if preamble.startswith("<|im_start|>system\n") and preamble.endswith("<|im_end|>\n"):
        return True, preamble.removeprefix("<|im_start|>system\n").removesuffix("<|im_end|>\n")
    return False, None
