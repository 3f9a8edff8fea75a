"""The model folder an export reads: its config (a supported family), its tokenizer, and the
tokenizer metadata llama.cpp needs (vocabulary with token types, merges or scores, special
tokens, chat template, end of turn).

Two kinds of tokenizer, as llama.cpp names them: ``gpt2`` (byte-level BPE: Llama 3, SmolLM,
Qwen) with its merges and pre-tokenizer; ``llama`` (SentencePiece-style BPE with byte fallback:
Gemma, Phi-3, Mistral 7B, Llama 2) with a score per token. llama.cpp's SentencePiece tokenizer
merges the adjacent pair whose joined piece scores highest; each piece's score here is minus
the rank of the merge that makes it in ``tokenizer.json``, so it merges in the order the Hugging
Face tokenizer does (llama.cpp's converter reads the same ranks from ``tokenizer.model``).
"""

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
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


@dataclass
class Source:
    """A model folder, checked for what the export supports."""

    folder: Path
    config: Any
    family: Family
    tokenizer: Any
    tokenizer_json: dict[str, Any]
    #: llama.cpp's tokenizer model: ``gpt2`` (byte-level BPE) or ``llama`` (SentencePiece).
    vocab_kind: str = "gpt2"

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
        vocab_kind = tokenizer_kind(tokenizer_json, folder)
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError) as exc:
            raise ExportError(f"Cannot load the tokenizer in {folder}: {first_line(exc)}") from None
        ensure_chat_template(tokenizer)
        return cls(folder, config, family, tokenizer, tokenizer_json, vocab_kind)

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


def tokenizer_kind(tokenizer_json: dict[str, Any], folder: Path) -> str:
    """``gpt2`` for a byte-level BPE whose pre-tokenizer llama.cpp knows, ``llama`` for a
    SentencePiece-style BPE (byte fallback, pieces joined by a decoder sequence); ExportError
    in one line for anything else."""
    model = tokenizer_json.get("model") or {}
    decoder = tokenizer_json.get("decoder") or {}
    if (
        model.get("type") == "BPE"
        and model.get("byte_fallback")
        and decoder.get("type") == "Sequence"
    ):
        return "llama"
    if (
        model.get("type") != "BPE"
        or model.get("byte_fallback")
        or decoder.get("type") != "ByteLevel"
    ):
        raise ExportError(
            f"The tokenizer in {folder} is neither a byte-level BPE nor a SentencePiece BPE "
            f"(model {model.get('type')!r}, decoder {decoder.get('type')!r}): GGUF export "
            "does not know how llama.cpp would tokenize with it."
        )
    pre_tokenizer_name(tokenizer_json, folder)
    return "gpt2"


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
    if source.vocab_kind == "llama":
        tokens, scores, types = sentencepiece_vocabulary(
            tokenizer, source.tokenizer_json, source.config.vocab_size
        )
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_add_space_prefix(adds_space_prefix(source.tokenizer_json))
    else:
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


def sentencepiece_vocabulary(
    tokenizer: Any, tokenizer_json: dict[str, Any], vocab_size: int
) -> tuple[list[str], list[float], list[int]]:
    """Pieces, scores and types of a SentencePiece-style vocabulary as llama.cpp stores it:
    a piece made by merge number r scores -r (single characters and bytes 0); types byte
    (``<0x41>``), unknown, control (special), user-defined (other added), unused (padding)."""
    tokens, types = vocabulary(tokenizer, vocab_size)
    merges = tokenizer_json["model"].get("merges") or []
    rank: dict[str, int] = {}
    for index, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(left + right, index)
    scores = [-float(rank[token]) if token in rank else 0.0 for token in tokens]
    unk = tokenizer.unk_token_id
    for index, token in enumerate(tokens):
        if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            types[index] = BYTE
        elif index == unk:
            types[index] = UNKNOWN
    return tokens, scores, types


def adds_space_prefix(tokenizer_json: dict[str, Any]) -> bool:
    """Whether the tokenizer puts a ``▁`` before the text (Llama, Mistral, Phi-3; not Gemma):
    a ``Prepend`` normalizer or a ``Metaspace`` pre-tokenizer that prepends."""
    normalizer = tokenizer_json.get("normalizer") or {}
    steps = normalizer.get("normalizers", [normalizer])
    if any(step.get("type") == "Prepend" for step in steps):
        return True
    pre = tokenizer_json.get("pre_tokenizer") or {}
    pre_steps = pre.get("pretokenizers", [pre])
    return any(
        step.get("type") == "Metaspace" and step.get("prepend_scheme", "always") != "never"
        for step in pre_steps
    )
