"""The records of preference tuning: answer pairs (DPO, ORPO) and labelled answers (KTO).

The shapes people have, all accepted:

- paired (``preference``): ``prompt`` / ``chosen`` / ``rejected`` as strings or as message
  lists (TRL's conversational format, where ``chosen`` may also be the whole conversation);
  ``chosen`` / ``rejected`` alone as whole conversations that differ only in their last
  message (TRL's implicit prompt); ``conversations`` or ``messages`` (ShareGPT ``from/value``
  or ``role/content``) with the final assistant turn given as ``chosen`` / ``rejected``
  messages or strings (LLaMA-Factory's ranking files; ``chosen_messages`` /
  ``rejected_messages`` likewise), or as a last turn holding both; ``instruction`` (+
  ``input``) or ``question`` (+ ``context``) with ``chosen`` / ``rejected`` strings;
  ``chosen`` / ``rejected`` as Human/Assistant transcripts (Anthropic's hh-rlhf: the prompt is
  their shared start); OpenAI's preference files (``input.messages``, ``preferred_output``,
  ``non_preferred_output``). An optional ``system`` string leads.
- unpaired (``kto``): a prompt in any of those forms with a ``completion`` and a boolean
  ``label`` (``kto_tag`` in LLaMA-Factory's files), or a conversation ending with the answer
  plus ``label``.

A normalized row has ``kind`` "pair" (``chosen``, ``rejected``) or "labelled" (``completion``,
``label``), and the prompt as ``messages``, ending with a user turn.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Mapping
from typing import Any

from ..config import parse_bool
from .messages import Invalid, json_type, message, normalize_message, tools_field

PAIR_KEYS = ("chosen", "rejected", "chosen_messages", "rejected_messages")
#: OpenAI's preference fine-tuning files: ``input.messages``, the preferred and the
#: non-preferred output.
OPENAI_PAIR_KEYS = ("preferred_output", "non_preferred_output")
#: A turn of a Human/Assistant transcript (Anthropic's hh-rlhf).
_TRANSCRIPT_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?")
LABEL_KEYS = ("label", "kto_tag")
CONVERSATION_KEYS = ("messages", "conversations")
#: Fields that hold an answer: with a boolean ``label`` beside one, a record is KTO data.
ANSWER_KEYS = ("completion", "messages", "conversations", "output", "answer", "response")


def pair_evidence(record: Mapping[str, Any]) -> str | None:
    """What makes ``record`` a preference pair, or None."""
    present = [key for key in (*PAIR_KEYS, *OPENAI_PAIR_KEYS) if key in record]
    if present:
        return " and ".join(repr(key) for key in present) + (" answers" if len(present) > 1 else "")
    last = _split_last_turn(record)
    return f"the last turn of {last[0]!r} split into chosen and rejected" if last else None


def labelled_evidence(record: Mapping[str, Any]) -> str | None:
    """What makes ``record`` a KTO record (an answer marked good or bad), or None."""
    if "kto_tag" in record:
        return "answers marked good or bad by 'kto_tag'"
    if parse_bool(record.get("label")) is not None and any(k in record for k in ANSWER_KEYS):
        return "answers marked good or bad by a boolean 'label'"
    return None


def labelled_claim(record: Mapping[str, Any]) -> str | None:
    """For a method that trains on labels: any ``label`` beside an answer makes a KTO record
    (one that is not a boolean is then a bad label, not another format)."""
    if "label" in record and any(k in record for k in ANSWER_KEYS):
        return "an answer with a 'label'"
    return labelled_evidence(record)


def normalize_pair(record: Mapping[str, Any], columns: Mapping[str, str]) -> dict[str, Any]:
    """A pair in any of the shapes of the module docstring. Without a prompt of their own,
    chosen and rejected conversations (message lists, or Human/Assistant transcripts) share
    their prompt: their longest common start, after which each must be one assistant turn
    (TRL's implicit prompt)."""
    if any(key in record for key in OPENAI_PAIR_KEYS):
        return _openai_pair(record)
    last = _split_last_turn(record)
    if last is not None and not any(key in record for key in PAIR_KEYS):
        key, turns = last
        prompt = _messages(turns[:-1], key) if len(turns) > 1 else None
        answers = {side: _text_answer(turns[-1][side], side) for side in ("chosen", "rejected")}
        chosen, rejected = answers["chosen"], answers["rejected"]
        return _pair(_check_prompt(_with_system(record, prompt)), chosen, rejected)
    chosen_key = "chosen_messages" if "chosen_messages" in record else "chosen"
    rejected_key = "rejected_messages" if "rejected_messages" in record else "rejected"
    sides = {key: _side(record, key) for key in (chosen_key, rejected_key)}
    if all(isinstance(side, list) for side in sides.values()):
        history, chosen, rejected = _implicit_prompt(sides[chosen_key], sides[rejected_key])
        if history is None and _prompt(record) is None:
            raise Invalid(
                "no shared prompt",
                f"{chosen_key!r} and {rejected_key!r} share no turn and there is no prompt: "
                "give 'prompt' (or a conversation), or whole conversations that start with it",
            )
    else:
        chosen_history, chosen = _answer(record, chosen_key, sides[chosen_key])
        rejected_history, rejected = _answer(record, rejected_key, sides[rejected_key])
        history = chosen_history or rejected_history
    prompt = _with_system(record, history or _prompt(record))
    return {**_pair(_check_prompt(prompt), chosen, rejected), "tools": tools_field(record)}


def _implicit_prompt(
    chosen: list[dict[str, str]], rejected: list[dict[str, str]]
) -> tuple[list[dict[str, str]] | None, str, str]:
    """(the shared start, the chosen answer, the rejected answer) of two conversations."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    rests = chosen[shared:], rejected[shared:]
    if not rests[0] and not rests[1]:
        raise Invalid("identical answers", "chosen and rejected are the same conversation")
    if any(len(rest) != 1 or rest[0]["role"] != "assistant" for rest in rests):
        raise Invalid(
            "mismatched conversations",
            "'chosen' and 'rejected' differ before their last assistant turn (they must share "
            "the prompt, then give one answer each)",
        )
    answers = [
        _answer_text(rest[0], key) for rest, key in zip(rests, ("chosen", "rejected"), strict=True)
    ]
    return chosen[:shared] or None, answers[0], answers[1]


def _openai_pair(record: Mapping[str, Any]) -> dict[str, Any]:
    """OpenAI's preference file: ``input`` (``messages``, optional ``tools``), and the
    preferred and non-preferred output, each a list with the assistant's message."""
    source = json_messages(record.get("input"))
    if not isinstance(source, Mapping) or "messages" not in source:
        raise Invalid(
            "missing field",
            "'input' must be an object with 'messages' (OpenAI's preference format)",
        )
    prompt = _check_prompt(_messages(source["messages"], "input.messages"))
    chosen = _text_answer(record.get("preferred_output"), "preferred_output")
    rejected = _text_answer(record.get("non_preferred_output"), "non_preferred_output")
    return {**_pair(prompt, chosen, rejected), "tools": tools_field(source)}


def _side(record: Mapping[str, Any], key: str) -> Any:
    """An answer field as given: a string, or a conversation (a message list, one message, or
    a Human/Assistant transcript) as turns."""
    value = json_messages(record.get(key))
    if value is None:
        raise Invalid("missing field", f"missing field {key!r}")
    if isinstance(value, str):
        turns = transcript(value)
        return turns if turns is not None else value
    return _messages(value, key)


def transcript(text: str) -> list[dict[str, str]] | None:
    """A Human/Assistant transcript (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``, as in
    Anthropic's hh-rlhf) as user and assistant turns; None for any other text."""
    parts = _TRANSCRIPT_TURN.split(text)
    if len(parts) < 5 or parts[0].strip():
        return None
    roles = parts[1::2]
    if "Human" not in roles or "Assistant" not in roles:
        return None
    return [
        message("user" if role == "Human" else "assistant", content.strip())
        for role, content in zip(roles, parts[2::2], strict=True)
    ]


def _pair(prompt: list[dict[str, str]], chosen: str, rejected: str) -> dict[str, Any]:
    if chosen.strip() == rejected.strip():
        raise Invalid("identical answers", "chosen and rejected are the same answer")
    return {"kind": "pair", "messages": prompt, "chosen": chosen, "rejected": rejected}


def normalize_labelled(record: Mapping[str, Any], columns: Mapping[str, str]) -> dict[str, Any]:
    label = _label(record)
    if "completion" in record:
        history, completion = _answer(record, "completion")
        prompt = history or _prompt(record)
    else:
        key = next((k for k in CONVERSATION_KEYS if k in record), None)
        if key is None:
            raise Invalid(
                "missing field",
                "missing field 'completion' (or a conversation ending with the answer)",
            )
        prompt, completion = _answer(record, key)
    prompt = _check_prompt(_with_system(record, prompt))
    return {"kind": "labelled", "messages": prompt, "completion": completion, "label": label}


def _split_last_turn(record: Mapping[str, Any]) -> tuple[str, list[Any]] | None:
    """A conversation whose last turn holds both answers: (its key, its turns)."""
    for key in CONVERSATION_KEYS:
        turns = record.get(key)
        if not isinstance(turns, list) or not turns:
            continue
        last = turns[-1]
        if isinstance(last, Mapping) and "chosen" in last and "rejected" in last:
            return key, turns
    return None


def _prompt(record: Mapping[str, Any]) -> list[dict[str, str]] | None:
    """The prompt turns from ``prompt``, a conversation, ``instruction`` or ``question``."""
    if "prompt" in record:
        value = json_messages(record["prompt"])
        if isinstance(value, str):
            return [message("user", _nonempty(value, "prompt"))]
        return _messages(value, "prompt")
    key = next((k for k in CONVERSATION_KEYS if k in record), None)
    if key is not None:
        return _messages(record[key], key)
    for question, extra in (("instruction", "input"), ("question", "context")):
        if question in record:
            text = _nonempty(record[question], question)
            more = record.get(extra) or ""
            if not isinstance(more, str):
                raise Invalid("non-string value", f"field {extra!r} must be a string")
            return [message("user", f"{text}\n\n{more}" if more.strip() else text)]
    return None


def _with_system(
    record: Mapping[str, Any], prompt: list[dict[str, str]] | None
) -> list[dict[str, str]] | None:
    system = record.get("system")
    if system is None or prompt is None or prompt[0]["role"] == "system":
        return prompt
    if not isinstance(system, str):
        raise Invalid("non-string value", "field 'system' must be a string")
    return [message("system", system), *prompt] if system.strip() else prompt


def _check_prompt(prompt: list[dict[str, str]] | None) -> list[dict[str, str]]:
    if not prompt:
        raise Invalid(
            "missing prompt",
            "no prompt: give 'prompt', a conversation ('messages' or 'conversations'), "
            "'instruction' or 'question', or whole conversations as chosen and rejected",
        )
    if prompt[-1]["role"] != "user":
        raise Invalid(
            "prompt not ending with a user turn",
            f"the prompt must end with a user message, not {prompt[-1]['role']}",
        )
    return prompt


def _answer(
    record: Mapping[str, Any], key: str, side: Any = None
) -> tuple[list[dict[str, str]] | None, str]:
    """(the turns before the answer, if given, and the answer) of an answer field: a string,
    an assistant message, or a conversation ending with one (``side``: the field already read
    by ``_side``)."""
    value = side if side is not None else _side(record, key)
    if isinstance(value, str):
        return None, _nonempty(value, key)
    return value[:-1] or None, _answer_text(value[-1], key)


def _answer_text(turn: Mapping[str, str], key: str) -> str:
    """The text of an answer turn: an assistant message without tool calls."""
    if turn["role"] != "assistant":
        raise Invalid("no assistant turn", f"{key!r} must end with an assistant (or gpt) message")
    if turn["extra"]:
        raise Invalid("tool calls", f"{key!r}: an answer with tool calls is not a text answer")
    return _nonempty(turn["content"], key)


def _text_answer(value: Any, key: str) -> str:
    """An answer given as a string or as one assistant message (alone)."""
    history, answer = _answer({key: value}, key)
    if history:
        raise Invalid("malformed message", f"{key!r} must hold the answer alone")
    return answer


def _messages(value: Any, key: str) -> list[dict[str, str]]:
    """A message or a list of messages (role/content or ShareGPT from/value) as turns."""
    value = json_messages(value)
    if isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, list):
        raise Invalid(
            "malformed message",
            f"field {key!r} must be a string, a message or a list of messages, "
            f"got {json_type(value)}",
        )
    if not value:
        raise Invalid("empty field", f"field {key!r} is empty")
    try:
        return [normalize_message(turn, number) for number, turn in enumerate(value, 1)]
    except Invalid as exc:
        raise Invalid(exc.reason, f"{key!r}: {exc}") from None


def json_messages(value: Any) -> Any:
    """Message lists kept as JSON text (CSV cells); any other string (an answer that merely
    looks like JSON) stays as it is."""
    if isinstance(value, str) and value.lstrip()[:1] in ("[", "{"):
        with contextlib.suppress(json.JSONDecodeError):
            parsed = json.loads(value)
            if isinstance(parsed, Mapping) or (
                isinstance(parsed, list) and all(isinstance(m, Mapping) for m in parsed)
            ):
                return parsed
    return value


def _nonempty(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise Invalid(
            "non-string value", f"field {key!r} must be a string, got {type(value).__name__}"
        )
    if not value.strip():
        raise Invalid("empty field", f"field {key!r} is empty")
    return value


def _label(record: Mapping[str, Any]) -> bool:
    key = next((k for k in LABEL_KEYS if k in record), "label")
    value = parse_bool(record.get(key))
    if value is None:
        shown = "missing" if record.get(key) is None else repr(record.get(key))
        raise Invalid("bad label", f"field {key!r} must be true or false, got {shown}")
    return value


def canonical_preference(row: Mapping[str, Any]) -> dict[str, Any]:
    """A normalized row in its canonical keys (what quickstart writes; reads back the same)."""
    prompt = [
        {"role": m["role"], "content": m["content"], **json.loads(m.get("extra") or "{}")}
        for m in row["messages"]
    ]
    if row["kind"] == "labelled":
        record = {"prompt": prompt, "completion": row["completion"], "label": bool(row["label"])}
    else:
        record = {"prompt": prompt, "chosen": row["chosen"], "rejected": row["rejected"]}
    tools = row.get("tools")
    return {**record, "tools": json.loads(tools)} if tools else record
