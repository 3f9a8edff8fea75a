"""Export a task's model to GGUF, the file llama.cpp, Ollama and LM Studio run.

The recipe: the task's merged model (the adapter is merged first when there is none) -> check
that its architecture (Llama, Qwen2) and tokenizer (byte-level BPE) are ones this export
knows -> GGUF metadata: hyperparameters, vocabulary with token types and merges, special
tokens, chat template, end-of-turn token -> tensors renamed to llama.cpp's names, converted
one by one (f16, or q8_0 with 1-D tensors kept in f32) and streamed into a temporary file that
is renamed into place when complete -> an Ollama Modelfile beside it.

Built on the ``gguf`` package (llama.cpp's Python side): its writer, tensor-name maps, Q8_0
quantizer and the merges reader of its vocab helpers. What this module adds is the glue.
Nothing here prints: progress goes through callables, problems raise ExportError.
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ExportError, FinetuneError, UsageProblem, first_line
from .paths import EXPORT_DIR, atomic_file, atomic_write_text
from .progress import Progress, ProgressSink, Status
from .task import Task
from .templates import end_of_turn_id, ensure_chat_template, stop_token_ids

FORMATS = ("gguf",)
#: ``--quant`` names -> llama.cpp file types: f16 halves the weights, q8_0 stores 8-bit blocks
#: of 32 weights with one f16 scale (about 8.5 bits a weight).
QUANTS = ("f16", "q8_0")
#: Hugging Face ``model_type`` -> llama.cpp architecture (a ``gguf.MODEL_ARCH`` member).
ARCHITECTURES = {"llama": "LLAMA", "qwen2": "QWEN2"}
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

#: Called after each tensor is written: (tensors done, tensors in all, GGUF name).


@dataclass
class TensorProgress(Progress):
    """A tensor written (``done`` of ``total``), and its name."""

    label: str = "export"
    unit: str = "tensor"
    tensor: str = ""

    def postfix(self) -> dict[str, str]:
        return {"tensor": self.tensor}


@dataclass
class ExportResult:
    """What an export wrote, and how to run it."""

    path: Path
    modelfile: Path
    quant: str
    architecture: str
    size_bytes: int
    tensors: int
    model_dir: Path
    ollama_name: str

    @property
    def commands(self) -> list[str]:
        """The commands that run the exported model in Ollama and in llama.cpp."""
        return [
            f"ollama create {self.ollama_name} -f {shlex.quote(str(self.modelfile))}"
            f" && ollama run {self.ollama_name}",
            f"llama-cli -m {shlex.quote(str(self.path))}",
        ]


def export_task(
    task: Task | str | os.PathLike[str],
    *,
    root: str | os.PathLike[str] | None = None,
    format: str = "gguf",
    quant: str = "f16",
    output: str | os.PathLike[str] | None = None,
    force: bool = False,
    status: Status | None = None,
    progress: ProgressSink | None = None,
) -> ExportResult:
    """Write ``<output>/<task>-<quant>.gguf`` (default output: ``<task>/export``) and its
    Ollama Modelfile ``<task>-<quant>.Modelfile`` from the task's merged model.

    ``status`` receives a line per stage, ``progress`` an event per tensor written. Raises
    TaskError for a task without a trained model, ExportError for an architecture or tokenizer
    this export does not know, or an existing export without ``force``. An interrupted export
    leaves no file behind and an existing one untouched.
    """
    if format not in FORMATS:
        raise UsageProblem(f"Unknown export format {format!r}: use {', '.join(FORMATS)}.")
    if quant not in QUANTS:
        raise UsageProblem(f"Unknown quantization {quant!r}: use one of {', '.join(QUANTS)}.")
    report = status or (lambda _message: None)
    task = Task.of(task, root)
    folder = Path(output).expanduser() if output else task.path / EXPORT_DIR
    stem = f"{task.name}-{quant}"
    target, modelfile = folder / f"{stem}.gguf", folder / f"{stem}.Modelfile"
    _check_targets([target, modelfile], force)
    _check_base_model(task)

    from .merge import merged_model

    model_dir = merged_model(task, status=report)
    source = _Source.read(model_dir)
    report(f"Writing {target} ({source.model_type}, {quant})")
    with atomic_file(target, replace=force) as tmp:
        count = _write_gguf(source, tmp, quant, task.name, progress)
    atomic_write_text(modelfile, modelfile_text(source, target.name, task.system_prompt))
    return ExportResult(
        path=target.resolve(),
        modelfile=modelfile.resolve(),
        quant=quant,
        architecture=source.model_type,
        size_bytes=target.stat().st_size,
        tensors=count,
        model_dir=model_dir,
        ollama_name=_ollama_name(task.name),
    )


def _check_targets(paths: list[Path], force: bool) -> None:
    for path in paths:
        if path.is_dir():
            raise ExportError(f"{path} is a folder: choose another output folder with -o.")
        if path.exists() and not force:
            raise ExportError(f"{path} already exists: pass force=True to replace it.")


def _check_base_model(task: Task) -> None:
    """Refuse an architecture this export does not know before a merge is spent on it."""
    from .models import model_config

    try:
        config = model_config(task.base_model, trust_remote_code=task.trust_remote_code)
    except FinetuneError:
        return  # the merge, if one is needed, says what is missing
    check_architecture(config, task.base_model)


def check_architecture(config: Any, where: str | Path) -> None:
    """ExportError naming the model type, unless it is Llama or Qwen2 with plain rope."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        names = ", ".join(getattr(config, "architectures", None) or []) or "unknown class"
        raise ExportError(
            f"GGUF export supports Llama and Qwen2 models; {where} holds a {model_type!r} "
            f"model ({names}), which is not exported."
        )
    _, kind = _rope(config)
    if kind != "default":
        raise ExportError(
            f"The model in {where} uses rope scaling {kind!r}, which this GGUF export does not "
            "write: only models with plain rope (SmolLM2, Qwen2 / Qwen2.5) are exported."
        )


def _ollama_name(name: str) -> str:
    """An Ollama model name (lower case letters, digits, '.', '-', '_') for a task name."""
    cleaned = "".join(ch if ch.isalnum() or ch in "._-" else "-" for ch in name.lower())
    return cleaned.strip("-._") or "model"


# --- the source model --------------------------------------------------------------------------


@dataclass
class _Source:
    """A merged model folder, checked for what the export supports."""

    folder: Path
    config: Any
    tokenizer: Any
    tokenizer_json: dict[str, Any]

    @classmethod
    def read(cls, folder: Path) -> _Source:
        from transformers import AutoConfig, AutoTokenizer

        try:
            config = AutoConfig.from_pretrained(folder)
        except (OSError, ValueError) as exc:
            raise ExportError(
                f"Cannot read the model config in {folder}: {first_line(exc)}"
            ) from None
        check_architecture(config, folder)
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
        return cls(folder, config, tokenizer, tokenizer_json)

    @property
    def model_type(self) -> str:
        return self.config.model_type

    @property
    def head_dim(self) -> int:
        config = self.config
        return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    @property
    def kv_heads(self) -> int:
        return getattr(self.config, "num_key_value_heads", None) or self.config.num_attention_heads


def _rope(config: Any) -> tuple[float, str]:
    """Rope base frequency and scaling type (transformers 5 ``rope_parameters`` or the older
    ``rope_theta`` / ``rope_scaling``)."""
    params = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    return float(theta), kind


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
            "Llama 3, SmolLM2 and Qwen2 models."
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


# --- writing -----------------------------------------------------------------------------------


@dataclass
class _Tensor:
    name: str  # GGUF name
    source: str  # name in the safetensors file
    file: Path
    shape: tuple[int, ...]
    kind: Any  # gguf.GGMLQuantizationType
    permute_heads: int | None  # Llama q/k: the head count to undo rotary's half-split layout by


def _write_gguf(
    source: _Source, path: Path, quant: str, name: str, progress: ProgressSink | None
) -> int:
    """Metadata first, then each tensor converted and written in turn (one in memory at a
    time). Returns the number of tensors."""
    import gguf

    arch = getattr(gguf.MODEL_ARCH, ARCHITECTURES[source.model_type])
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    _add_metadata(writer, source, quant, name)
    tensors = list(_plan_tensors(source, arch, quant))
    for tensor in tensors:
        shape, dtype, nbytes = _stored_layout(tensor)
        writer.add_tensor_info(tensor.name, shape, dtype, nbytes, raw_dtype=tensor.kind)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for index, tensor in enumerate(tensors, start=1):
            writer.write_tensor_data(_converted(tensor))
            if progress is not None:
                progress(TensorProgress("step", index, len(tensors), tensor=tensor.name))
    finally:
        writer.close()
    return len(tensors)


def _add_metadata(writer: Any, source: _Source, quant: str, name: str) -> None:
    import gguf

    config = source.config
    writer.add_type("model")
    writer.add_name(name)
    writer.add_description(f"Fine-tuned with sage-finetune-plugin from {source.folder.name}")
    writer.add_file_type(
        gguf.LlamaFileType.MOSTLY_F16 if quant == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0
    )
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(source.kv_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(_rope(config)[0])
    writer.add_rope_dimension_count(source.head_dim)
    if source.head_dim * config.num_attention_heads != config.hidden_size:
        writer.add_key_length(source.head_dim)
        writer.add_value_length(source.head_dim)
    writer.add_vocab_size(config.vocab_size)
    _add_tokenizer(writer, source)


def _add_tokenizer(writer: Any, source: _Source) -> None:
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


def _plan_tensors(source: _Source, arch: Any, quant: str) -> Iterator[_Tensor]:
    """The model's tensors under their GGUF names, with the type each is stored in."""
    import gguf
    from safetensors import safe_open

    config = source.config
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    files = sorted(source.folder.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{source.folder} has no safetensors weights to export.")
    for file in files:
        with safe_open(file, framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                if key.endswith("rotary_emb.inv_freq") or (tied and key == "lm_head.weight"):
                    continue
                name = names.get_name(key, try_suffixes=(".weight", ".bias"))
                if name is None:
                    raise ExportError(
                        f"Tensor {key} of {source.folder} has no GGUF name for "
                        f"{source.model_type}: this model variant is not exported."
                    )
                shape = tuple(handle.get_slice(key).get_shape())
                yield _Tensor(
                    name, key, file, shape, _stored_type(shape, quant), _permutation(source, key)
                )


def _stored_type(shape: tuple[int, ...], quant: str) -> Any:
    """Norms and biases stay f32 (they are tiny and sensitive); matrices are f16 or q8_0
    (f16 for the rare one whose rows do not split into 32-weight blocks)."""
    import gguf

    types = gguf.GGMLQuantizationType
    if len(shape) < 2:
        return types.F32
    block = gguf.GGML_QUANT_SIZES[types.Q8_0][0]
    return types.Q8_0 if quant == "q8_0" and shape[-1] % block == 0 else types.F16


def _permutation(source: _Source, key: str) -> int | None:
    """llama.cpp's Llama graph applies rotary to interleaved pairs; Hugging Face stores q and k
    with the two halves of each head apart. Qwen2's graph reads the Hugging Face layout."""
    if source.model_type != "llama":
        return None
    if ".self_attn.q_proj." in key:
        return source.config.num_attention_heads
    if ".self_attn.k_proj." in key:
        return source.kv_heads
    return None


def _stored_layout(tensor: _Tensor) -> tuple[tuple[int, ...], Any, int]:
    """Shape, numpy dtype and byte size of a tensor as written (before its data exists)."""
    import gguf
    import numpy as np

    count = int(np.prod(tensor.shape))
    if tensor.kind == gguf.GGMLQuantizationType.F32:
        return tensor.shape, np.float32, count * 4
    if tensor.kind == gguf.GGMLQuantizationType.F16:
        return tensor.shape, np.float16, count * 2
    shape = gguf.quants.quant_shape_to_byte_shape(tensor.shape, tensor.kind)
    return shape, np.uint8, int(np.prod(shape))


def _converted(tensor: _Tensor) -> Any:
    """The tensor's data as stored: read, permuted for Llama's rotary layout, converted."""
    import gguf
    import numpy as np
    from safetensors import safe_open

    with safe_open(tensor.file, framework="pt") as handle:
        data = handle.get_tensor(tensor.source).float().numpy()
    if tensor.permute_heads is not None:
        data = interleave_rotary_halves(data, tensor.permute_heads)
    if tensor.kind == gguf.GGMLQuantizationType.F32:
        return np.ascontiguousarray(data, dtype=np.float32)
    if tensor.kind == gguf.GGMLQuantizationType.F16:
        return np.ascontiguousarray(data, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), tensor.kind)


def interleave_rotary_halves(data: Any, heads: int) -> Any:
    """Reorder the rows of each head of a q or k projection (weight or bias) from
    [first halves..., second halves...] to [pairs...]: row i of the first half and row i of
    the second become rows 2i and 2i+1."""
    rows = data.shape[0]
    half = rows // heads // 2
    return data.reshape(heads, 2, half, *data.shape[1:]).swapaxes(1, 2).reshape(data.shape)


# --- the Ollama Modelfile ----------------------------------------------------------------------

#: Ollama's form of the ChatML prompt layout (SmolLM2 and Qwen2 templates render this way).
CHATML_TEMPLATE = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
    "<|im_start|>assistant\n"
)
_PROBE_SYSTEM, _PROBE_USER, _PROBE_ANSWER = "probe-system", "probe-user", "probe-answer"


def modelfile_text(source: _Source, gguf_name: str, system: str | None) -> str:
    """The Modelfile: the GGUF beside it, the prompt layout when it is ChatML, the system
    prompt (the task's, else the default the chat template writes), the stop tokens."""
    tokenizer = source.tokenizer
    chatml, default_system = chatml_layout(tokenizer)
    lines = [
        "# Ollama Modelfile written by sage-finetune-plugin. Use it with:",
        f"#   ollama create NAME -f {gguf_name.removesuffix('.gguf')}.Modelfile",
        f"FROM ./{gguf_name}",
    ]
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
