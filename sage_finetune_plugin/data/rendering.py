"""Rendering: a normalized row as the text the model trains on, and its tokens with labels.

Through the tokenizer's chat template when it has one (each assistant turn's span found by
rendering the conversation up to that turn; tools and tool calls through the template's own tool
support, refused when it has none), else through the ``### Instruction:`` / ``### Input:`` /
``### Response:`` layout. For a batch, conversations are rendered once each in one call and
their turns found by the template's assistant header and end-of-turn text, learned once from a
probe; a conversation where that leaves anything in doubt takes the turn-by-turn way. A
default system prompt opens conversations that have none. Segments are tokenized separately,
so a label boundary never falls inside a token; labels are -100 (``IGNORE_INDEX``) on prompt
tokens, every sample ends with EOS, and samples are truncated to ``max_length``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import DataError
from ..templates import FALLBACK_HEADERS, has_chat_template, supports_tools
from .formats import Invalid, Unsupported, Validator, message_dicts, row_tools, with_context
from .messages import learned

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


#: Label value the loss ignores.
IGNORE_INDEX = -100


class _TemplateMismatch(Exception):
    pass


class RecordError(DataError):
    """A valid record that cannot be rendered as it means (tools the template cannot show,
    ...): ``reason`` is the category ``skip_invalid`` counts, ``detail`` the record's problem,
    ``remedy`` what to do."""

    def __init__(self, reason: str, detail: str, remedy: str) -> None:
        super().__init__(f"{detail}; {remedy}.")
        self.reason = reason
        self.detail = detail


def _for_template(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages as the chat template takes them: without the training-only ``weight``."""
    return [{k: v for k, v in m.items() if k != "weight"} for m in messages]


class Renderer:
    """Turns a normalized row into (text, trainable) segments and token ids with labels.

    With a chat template the conversation is rendered once; each assistant turn's span is
    found by rendering the conversation up to that turn (with and without the generation
    prompt), so whatever the template adds around a turn stays in the prompt. Without a
    template the ``### Instruction:`` style is used. Segments are tokenized separately, so a
    label boundary never falls inside a token. ``system_prompt`` opens every conversation that
    has no system message of its own.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase | None,
        *,
        max_length: int | None = None,
        train_on_prompt: bool = False,
        system_prompt: str | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.train_on_prompt = train_on_prompt
        self.system_prompt = system_prompt or None
        self.chat_template = has_chat_template(tokenizer)
        self.template = "chat_template" if self.chat_template else "fallback"
        self._tool_support: bool | None = None
        self._turn_markers: tuple[str, str] | bool | None = False  # False: not learned yet
        self.eos = ""
        self.bos_ids: list[int] = []
        if tokenizer is not None:
            if tokenizer.eos_token is None or tokenizer.eos_token_id is None:
                raise DataError(
                    f"Tokenizer {tokenizer.name_or_path!r} has no EOS token; set one "
                    "(tokenizer.eos_token) so the model can learn where an answer ends."
                )
            self.eos = tokenizer.eos_token
            bos = tokenizer.bos_token_id
            if bos is not None and tokenizer("a")["input_ids"][:1] == [bos]:
                self.bos_ids = [bos]

    # -- text --------------------------------------------------------------------------------

    def segments(self, row: Mapping[str, Any]) -> list[tuple[str, bool]]:
        """The sample as (text, trainable) pieces; joined, they are the training text."""
        messages = message_dicts(row)
        if row["kind"] == "text":
            return [(messages[0]["content"] + self.eos, True)]
        if row["kind"] == "completion":
            return [(messages[0]["content"], False), (messages[1]["content"] + self.eos, True)]
        messages, tools = self._conversation(row, messages)
        if self.chat_template:
            return self._template_segments(messages, row, tools)
        return self._fallback_segments(messages, row.get("context", ""))

    def prompt_and_answer(
        self, prompt: Sequence[Mapping[str, Any]], answer: str, location: str, tools: str = ""
    ) -> tuple[str, str]:
        """A prompt (its messages; ``tools``: the JSON list of tools offered) and one answer as
        TRL's "standard" text pair: the prompt as the model sees it up to where the answer
        starts (without the BOS, which TRL's tokenization adds itself), and the answer with its
        end of turn and EOS."""
        row = {
            "kind": "chat",
            "messages": [*prompt, {"role": "assistant", "content": answer, "extra": ""}],
            "context": "",
            "tools": tools,
            "location": location,
        }
        segments = self.segments(row)
        last = max(i for i, (_, trainable) in enumerate(segments) if trainable)
        prompt_text = "".join(text for text, _ in segments[:last])
        answer_text = segments[last][0]
        if not answer_text.endswith(self.eos):
            answer_text += self.eos
        bos = getattr(self.tokenizer, "bos_token", None)
        if self.bos_ids and bos and prompt_text.startswith(bos):
            prompt_text = prompt_text[len(bos) :]
        return prompt_text, answer_text

    def segments_batch(self, rows: Sequence[Mapping[str, Any]]) -> list[list[tuple[str, bool]]]:
        """``segments`` of each row, the same pieces, faster: conversations without tools are
        rendered through the chat template in one call, once each, and split at the assistant
        turns by the markers learned from a probe (``_split_turns``); rows it cannot split
        with certainty, and all rows without a chat template, go through ``segments``."""
        batch: list[tuple[int, list[dict[str, Any]]]] = []
        if self.chat_template and self._markers() is not None:
            for i, row in enumerate(rows):
                if row["kind"] in ("text", "completion") or row.get("tools"):
                    continue
                messages, _ = self._conversation(row, message_dicts(row))
                if messages[0]["role"] != "assistant" and not any(
                    m["role"] == "tool" or "tool_calls" in m for m in messages
                ):
                    batch.append((i, messages))
        rendered: list[str] = []
        if batch:
            try:
                rendered = self._apply_batch([messages for _, messages in batch])
            except Exception:  # the turn-by-turn way names the record the template rejected
                batch = []
        split = {
            i: self._split_turns(messages, full)
            for (i, messages), full in zip(batch, rendered, strict=True)
        }
        return [split.get(i) or self.segments(row) for i, row in enumerate(rows)]

    def _conversation(
        self, row: Mapping[str, Any], messages: list[dict[str, Any]]
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
        """A conversation row's messages as the template renders them (the default system
        prompt first where the row has none; with a chat template the context joins the last
        user turn) and its tools, refused when the template cannot show them."""
        if self.system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        tools = row_tools(row)
        if tools or any(m["role"] == "tool" or "tool_calls" in m for m in messages):
            self._check_tool_support(row)
        if self.chat_template:
            messages = with_context(messages, row.get("context", ""))
        return messages, tools

    def _check_tool_support(self, row: Mapping[str, Any]) -> None:
        if self._tool_support is None:
            self._tool_support = supports_tools(self.tokenizer)
        if not self._tool_support:
            name = getattr(self.tokenizer, "name_or_path", None) or "the tokenizer"
            template = "chat template" if self.chat_template else "tokenizer (no chat template)"
            raise RecordError(
                "tools the chat template cannot show",
                f"{row['location']}: this record offers or calls tools, but the {template} of "
                f"{name} has no tool support, so the tools could not be shown to the model as it "
                "will see them",
                "use a model whose chat template supports tools (e.g. Qwen2.5 Instruct), or "
                "leave the tool records out with skip_invalid=True",
            )

    def _fallback_segments(
        self, messages: list[dict[str, Any]], context: str
    ) -> list[tuple[str, bool]]:
        segments: list[tuple[str, bool]] = []
        prompt = ""
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        context_turn = users[-1] if users and context.strip() else -1
        for i, message in enumerate(messages):
            role, content = message["role"], message["content"]
            if role == "assistant":
                segments += [(prompt + FALLBACK_HEADERS["assistant"], False)]
                segments += [(content + self.eos, learned(message))]
                prompt = "\n\n"
                continue
            prompt += f"{FALLBACK_HEADERS[role]}{content}\n\n"
            if i == context_turn:
                prompt += f"{FALLBACK_HEADERS['context']}{context}\n\n"
        return segments

    def _template_segments(
        self,
        messages: list[dict[str, Any]],
        row: Mapping[str, Any],
        tools: list[dict[str, Any]] | None = None,
    ) -> list[tuple[str, bool]]:
        def render(upto: int, generation_prompt: bool = False) -> str:
            return self._apply(messages[:upto], generation_prompt, tools)

        try:
            full = render(len(messages))
            segments: list[tuple[str, bool]] = []
            cursor = 0
            last = len(messages) - 1
            for i, message in enumerate(messages):
                if message["role"] != "assistant":
                    continue
                start = self._answer_start(render, message, i, full, cursor)
                upto = full if i == last else render(i + 1)
                end = self._answer_end(message, full, start, upto)
                segments += [(full[cursor:start], False), (full[start:end], learned(message))]
                cursor = end
        except _TemplateMismatch:
            raise RecordError(
                "answers the chat template changes",
                f"{row['location']}: the tokenizer's chat template does not render assistant "
                "turns verbatim, so the prompt cannot be masked",
                "set train_on_prompt=True, use a tokenizer without this template, or leave such "
                "records out with skip_invalid=True",
            ) from None
        except Exception as exc:  # jinja2 errors raised by the template itself
            if isinstance(exc, DataError):
                raise
            raise RecordError(
                "conversations the chat template rejects",
                f"{row['location']}: the tokenizer's chat template rejected this conversation "
                f"({type(exc).__name__}: {exc})",
                "fix the record, or leave such records out with skip_invalid=True",
            ) from None
        tail = full[cursor:]
        if tail.strip():
            segments.append((tail, False))
        return [(text, trainable) for text, trainable in segments if text]

    def _markers(self) -> tuple[str, str] | None:
        """The template's assistant header (what the generation prompt adds, e.g.
        ``<|im_start|>assistant\\n``) and the text that ends an assistant turn (e.g.
        ``<|im_end|>``), learned by rendering a probe conversation; None when the template does
        not render an answer verbatim between the two, or either is empty."""
        if self._turn_markers is False:
            self._turn_markers = None
            question = {"role": "user", "content": "Probe question?"}
            answer = "Probe answer."
            head = [question]
            if self.system_prompt:
                head.insert(0, {"role": "system", "content": self.system_prompt})
            try:
                before = self._apply(head)
                prompt = self._apply(head, generation_prompt=True)
                turn = self._apply([*head, {"role": "assistant", "content": answer}])
            except Exception:
                return None
            header = prompt[len(before) :]
            rest = turn[len(prompt) :]
            end = rest[len(answer) :].rstrip()
            if (
                header
                and end
                and prompt.startswith(before)
                and turn.startswith(prompt)
                and rest.startswith(answer)
            ):
                self._turn_markers = (header, end)
        return self._turn_markers if isinstance(self._turn_markers, tuple) else None

    def _split_turns(
        self, messages: list[dict[str, Any]], full: str
    ) -> list[tuple[str, bool]] | None:
        """``_template_segments`` of a conversation from its one rendering ``full``: each
        assistant answer is where the header followed by the answer is, and its turn ends after
        the end-of-turn text (the last message's at the end of the text). None when anything
        is in doubt: a header count other than the number of answers, an empty answer, an
        answer not rendered verbatim after its header, a turn end that is not there."""
        header, end_of_turn = self._markers() or ("", "")
        answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if full.count(header) != len(answers):
            return None
        segments: list[tuple[str, bool]] = []
        cursor = 0
        for i in answers:
            content = messages[i]["content"]
            if not isinstance(content, str) or not content:
                return None
            found = full.find(header + content, cursor)
            if found < 0:
                return None
            start = found + len(header)
            if i == len(messages) - 1:
                end = len(full.rstrip())
            elif full.startswith(end_of_turn, start + len(content)):
                end = start + len(content) + len(end_of_turn)
            else:
                return None
            segments += [(full[cursor:start], False), (full[start:end], learned(messages[i]))]
            cursor = end
        tail = full[cursor:]
        if tail.strip():
            segments.append((tail, False))
        return [(text, trainable) for text, trainable in segments if text]

    def _apply_batch(self, conversations: list[list[dict[str, Any]]]) -> list[str]:
        assert self.tokenizer is not None
        shown = [_for_template(messages) for messages in conversations]
        return self.tokenizer.apply_chat_template(shown, tokenize=False)

    def _apply(
        self,
        messages: list[dict[str, Any]],
        generation_prompt: bool = False,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        assert self.tokenizer is not None
        return self.tokenizer.apply_chat_template(
            _for_template(messages),
            tools=tools,
            tokenize=False,
            add_generation_prompt=generation_prompt,
        )

    def _answer_start(
        self,
        render: Callable[..., str],
        message: Mapping[str, Any],
        i: int,
        full: str,
        cursor: int,
    ) -> int:
        if i:
            prefix = render(i, True)
        else:  # a conversation that opens with the assistant: what the template puts first
            try:
                prefix = render(0, True)
            except Exception:  # templates may refuse an empty conversation
                prefix = ""
        if full.startswith(prefix) and len(prefix) >= cursor:
            return len(prefix)
        position = full.find(message["content"], cursor)
        if position < 0 or not message["content"]:
            raise _TemplateMismatch
        return position

    def _answer_end(self, message: Mapping[str, Any], full: str, start: int, upto: str) -> int:
        if full.startswith(upto) and len(upto.rstrip()) > start:
            return len(upto.rstrip())
        end = start + len(message["content"])
        if full[end:].startswith(self.eos):
            end += len(self.eos)
        return end

    # -- tokens --------------------------------------------------------------------------------

    def encode(self, rows: Sequence[Mapping[str, Any]]) -> list[tuple[list[int], list[int], int]]:
        """(input_ids, labels, length before truncation) for each row, tokenized in one call."""
        assert self.tokenizer is not None
        per_row = self.segments_batch(rows)
        texts = [text for segments in per_row for text, _ in segments]
        if not texts:  # tokenizers refuse an empty batch
            return []
        token_lists = iter(self.token_ids(texts))
        results = []
        eos_id = self.tokenizer.eos_token_id
        for segments in per_row:
            ids, labels = list(self.bos_ids), [IGNORE_INDEX] * len(self.bos_ids)
            for _, trainable in segments:
                tokens = next(token_lists)
                ids += tokens
                labels += tokens if trainable else [IGNORE_INDEX] * len(tokens)
            if not ids or ids[-1] != eos_id:
                ids.append(eos_id)
                labels.append(eos_id)
            if self.train_on_prompt:
                labels = list(ids)
            full_length = len(ids)
            if self.max_length is not None and full_length > self.max_length:
                ids, labels = ids[: self.max_length], labels[: self.max_length]
            results.append((ids, labels, full_length))
        return results

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Each text's token ids, without special tokens added: through the Rust tokenizer's
        batch encoder without offsets where there is one (the same ids, a fifth faster), else
        through the tokenizer's own call."""
        assert self.tokenizer is not None
        backend: Any = getattr(self.tokenizer, "_tokenizer", None)
        if hasattr(backend, "encode_batch_fast") and getattr(self.tokenizer, "is_fast", False):
            encodings = backend.encode_batch_fast(texts, add_special_tokens=False)
            return [encoding.ids for encoding in encodings]
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def fingerprint(self) -> dict[str, Any]:
        """Everything about the tokenizer and template that changes the tokens produced."""
        tokenizer = self.tokenizer
        assert tokenizer is not None
        backend = getattr(tokenizer, "backend_tokenizer", None)
        vocab = (
            backend.to_str()
            if backend is not None
            else json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
        )
        return {
            "class": type(tokenizer).__name__,
            "vocab": hashlib.sha256(vocab.encode()).hexdigest(),
            "special_tokens": tokenizer.all_special_tokens,
            "eos": self.eos,
            "bos_ids": self.bos_ids,
            "template": getattr(tokenizer, "chat_template", None) if self.chat_template else None,
        }


def _format_sample(
    fmt: str, record: Mapping[str, Any], tokenizer: Any, system_prompt: str | None
) -> str:
    from ..methods import get_method

    try:
        row = Validator(get_method("sft").reader, fmt).normalize(record, "record")
    except Unsupported as exc:
        raise DataError(f"Record: {exc.message('FILE')}.") from None
    except Invalid as exc:
        raise DataError(f"Invalid {fmt} record: {exc}.") from None
    renderer = Renderer(tokenizer, system_prompt=system_prompt)
    return "".join(text for text, _ in renderer.segments(row))


def format_alpaca_sample(
    record: Mapping[str, Any],
    tokenizer: PreTrainedTokenizerBase | None = None,
    *,
    system_prompt: str | None = None,
) -> str:
    """The training text of an alpaca record (``instruction``, optional ``input``, ``output``,
    ``system``, ``history`` of earlier [instruction, answer] pairs, ``tools``).

    With a tokenizer that has a chat template: the conversation rendered through it (the
    input follows the instruction in the user turn; ``system_prompt`` opens a record without
    a ``system``). Otherwise the ``### Instruction:`` /
    ``### Input:`` / ``### Response:`` template. Ends with the tokenizer's EOS when a tokenizer
    is given. Raises DataError for a malformed record.
    """
    return _format_sample("alpaca", record, tokenizer, system_prompt)


def format_qa_sample(
    record: Mapping[str, Any],
    tokenizer: PreTrainedTokenizerBase | None = None,
    *,
    system_prompt: str | None = None,
) -> str:
    """The training text of a qa record (``question``, ``answer``, optional ``context``);
    rendered like an alpaca record with the question as instruction and context as input."""
    return _format_sample("qa", record, tokenizer, system_prompt)


def format_conversation_sample(
    record: Mapping[str, Any],
    tokenizer: PreTrainedTokenizerBase | None = None,
    *,
    system_prompt: str | None = None,
) -> str:
    """The training text of a conversation (``messages`` or ``conversations``, role/content or
    ShareGPT from/value turns, optional record-level ``system`` and ``tools``), through the chat
    template or the ``###`` fallback."""
    return _format_sample("conversation", record, tokenizer, system_prompt)


def format_text_sample(
    record: Mapping[str, Any],
    tokenizer: PreTrainedTokenizerBase | None = None,
    *,
    system_prompt: str | None = None,
) -> str:
    """The training text of a text record: ``text`` itself, plus EOS when a tokenizer is given."""
    return _format_sample("text", record, tokenizer, system_prompt)
