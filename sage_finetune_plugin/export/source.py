"""The model folder an export reads: its config (a supported family), its byte-level BPE
tokenizer, and the tokenizer metadata llama.cpp needs (vocabulary with token types, merges,
special tokens, chat template, end of turn)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ExportError, first_line
from ..templates import end_of_turn_id, ensure_chat_template
from .families import Family, family_of, head_dim, kv_heads

#: Pre-tokenizers (how text is split before the merges apply) that llama.cpp knows by name.
#: Each is recognized by the ``pre_tokenizer`` section of ``tokenizer.json``.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# llama.cpp token types
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


@dataclass
class Source:
    """A model folder, checked for what the export supports."""

    folder: Path
    config: Any
    family: Family
    tokenizer: Any
    tokenizer_json: dict[str, Any]

    @classmethod
    def read(cls, folder: Path) -> Source:
        from transformers import AutoConfig, AutoTokenizer

        try:
            config = AutoConfig.from_pretrained(folder)
        except (OSError, ValueError) as exc:
            raise ExportError(
                f"Cannot read the model config in {folder}: {first_line(exc)}"
            ) from None
        family = family_of(config, folder)
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ExportError(
                f"{folder} has no tokenizer.json: GGUF export needs the model's fast tokenizer."
            )
        tokenizer_json = json.loads(tokenizer_file.read_text(encoding="utf-8"))
        _check_byte_level_bpe(tokenizer_json, folder)
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError) as exc:
            raise ExportError(f"Cannot load the tokenizer in {folder}: {first_line(exc)}") from None
        ensure_chat_template(tokenizer)
        return cls(folder, config, family, tokenizer, tokenizer_json)

    @property
    def model_type(self) -> str:
        return self.config.model_type

    @property
    def head_dim(self) -> int:
        return head_dim(self.config)

    @property
    def kv_heads(self) -> int:
        return kv_heads(self.config)

    @property
    def tied(self) -> bool:
        return bool(getattr(self.config, "tie_word_embeddings", False))


def _check_byte_level_bpe(tokenizer_json: dict[str, Any], folder: Path) -> None:
    model = tokenizer_json.get("model") or {}
    decoder = tokenizer_json.get("decoder") or {}
    if (
        model.get("type") != "BPE"
        or model.get("byte_fallback")
        or decoder.get("type") != "ByteLevel"
    ):
        raise ExportError(
            f"The tokenizer in {folder} is not a byte-level BPE (model {model.get('type')!r}, "
            f"decoder {decoder.get('type')!r}); GGUF export supports the GPT-2 style BPE of "
            "Llama 3, SmolLM, Qwen2 / Qwen3 models, not SentencePiece vocabularies."
        )
    pre_tokenizer_name(tokenizer_json, folder)


def pre_tokenizer_name(tokenizer_json: dict[str, Any], folder: Path | str = "the model") -> str:
    """llama.cpp's name for the way this tokenizer splits text before its merges apply."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"]:
        regex = (steps[0].get("pattern") or {}).get("Regex")
        names = {QWEN2_SPLIT: "qwen2", LLAMA3_SPLIT: "llama-bpe"}
        if regex in names:
            return names[regex]
    raise ExportError(
        f"The tokenizer in {folder} splits text in a way this GGUF export does not know "
        f"(pre-tokenizer {' + '.join(str(kind) for kind in kinds)}): llama.cpp would tokenize "
        "it differently, so it is not exported."
    )


def add_tokenizer(writer: Any, source: Source) -> None:
    """Vocabulary, token types, merges, special tokens, chat template, end of turn."""
    import gguf

    tokenizer = source.tokenizer
    tokens, types = vocabulary(tokenizer, source.config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(source.tokenizer_json, source.folder))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(gguf.SpecialVocab(source.folder, load_merges=True).merges)
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    eot = end_of_turn_id(tokenizer)
    if eot is not None:
        writer.add_eot_token_id(eot)
    probe = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(
        tokenizer.bos_token_id is not None and probe[0] == tokenizer.bos_token_id
    )
    writer.add_add_eos_token(
        tokenizer.eos_token_id is not None and probe[-1] == tokenizer.eos_token_id
    )
    template = tokenizer.chat_template  # one template, or named ones
    if isinstance(template, dict):
        template = [{"name": name, "template": text} for name, text in template.items()]
    elif isinstance(template, str) and source.family.model_type == "smollm3":
        template = template.replace("[:]", "")  # llama.cpp's template engine has no [:]
    writer.add_chat_template(template)


def vocabulary(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """Every token id up to the model's vocabulary size, as llama.cpp stores it: byte-level
    strings, added tokens as written, ``[PADn]`` for ids without a token; and their types
    (control for special tokens, user-defined for other added ones, unused for padding)."""
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    if by_id and max(by_id) >= vocab_size:
        raise ExportError(
            f"The tokenizer has token id {max(by_id)} but the model only {vocab_size} "
            "embeddings: the model and tokenizer do not belong together."
        )
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        token = by_id.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(UNUSED)
        elif index in added:
            looks_special = token.startswith("<|") and token.endswith("|>")
            tokens.append(token)
            types.append(CONTROL if added[index].special or looks_special else USER_DEFINED)
        else:
            tokens.append(token)
            types.append(NORMAL)
    return tokens, types
