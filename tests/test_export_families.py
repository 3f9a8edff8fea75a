"""`export` of every supported family, on tiny random models built here from transformers'
config classes (2 layers, hidden 64, the tiny chat model's tokenizer): the f16 file read back by
transformers gives the model's logits within f16 rounding, the 4- and 5-bit files pick the same
greedy next token at most positions, the tokenizer round-trips; families transformers cannot
read back are held to their tensors through gguf's reader. And the types each tensor is stored
in, as llama.cpp's quantizer chooses them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
import transformers
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from sage_finetune_plugin.cli import finetune
from sage_finetune_plugin.errors import DependencyError, ExportError, UsageProblem
from sage_finetune_plugin.export import (
    FAMILIES,
    GGUF_QUANTS,
    K_QUANTS,
    export_task,
    interleave_rotary_halves,
)
from sage_finetune_plugin.export.check import CHECK_TEXT
from sage_finetune_plugin.export.quants import llama_quantizer
from sage_finetune_plugin.meta import TaskMeta, load_meta, save_meta
from sage_finetune_plugin.paths import ADAPTER_DIR

from conftest import train_adapter

COMMON = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 4096,
    "max_position_embeddings": 2048,
    "pad_token_id": 0,
    "bos_token_id": None,
    "eos_token_id": 2,
}
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,  # small, so the scaling bends the tiny model's dims
}
#: Task name -> (config class, its settings): one tiny model per family.
MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", {"tie_word_embeddings": True}),
    "llama3": ("LlamaConfig", {"tie_word_embeddings": False, "rope_parameters": LLAMA3_ROPE}),
    "m7": ("MistralConfig", {"tie_word_embeddings": False, "sliding_window": None}),
    "qwen3": ("Qwen3Config", {"head_dim": 128, "tie_word_embeddings": True}),
    "gemma2": (
        "Gemma2Config",
        {"head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 32},
    ),
    "gemma3": (
        "Gemma3TextConfig",
        {"head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 32},
    ),
    "phi3": ("Phi3Config", {"tie_word_embeddings": False}),
    "smollm3": ("SmolLM3Config", {"tie_word_embeddings": True}),
    # Rows of 256 weights: what the K-quants' super-blocks need (narrower rows fall back).
    "qwen2-256": ("Qwen2Config", {"hidden_size": 256, "intermediate_size": 512}),
}
#: Families transformers' GGUF loader rebuilds (with plain rope): compared on logits.
READ_BACK = ("llama", "m7", "qwen3", "gemma2", "gemma3", "phi3")


def family_model(folder: Path, name: str, tiny_model_dir: Path, tokenizer: Any = None) -> Path:
    """A tiny random model of the family ``name`` saved in ``folder``, with the tiny chat
    model's tokenizer (or ``tokenizer``). The embeddings are drawn wider than the default
    initialization so that the next token is not a near tie among 4096 (random layers give
    near-uniform logits)."""
    class_name, settings = MODELS[name]
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(tiny_model_dir)
    special = {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    config = getattr(transformers, class_name)(**{**COMMON, **special, **settings})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0, 0.5)
        if not config.tie_word_embeddings:
            model.get_output_embeddings().weight.normal_(0, 0.5)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def sentencepiece_tokenizer(gemma: bool) -> Any:
    """A SentencePiece-style BPE (byte fallback, pieces with ``▁``) trained here on this
    package's source: Llama / Mistral / Phi-3's layout (a ``▁`` before the text), or Gemma's."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"] if gemma else ["<unk>", "<s>", "</s>"]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    steps = [normalizers.Replace(" ", "\u2581")]
    tokenizer.normalizer = normalizers.Sequence(
        steps if gemma else [normalizers.Prepend("\u2581"), *steps]
    )
    pieces = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tokenizer.decoder = decoders.Sequence(pieces if gemma else [*pieces, decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        special_tokens=specials + [f"<0x{i:02X}>" for i in range(256)],
        show_progress=False,
    )
    package = Path(__file__).resolve().parent.parent / "sage_finetune_plugin"
    tokenizer.train_from_iterator(sorted(p.read_text() for p in package.rglob("*.py")), trainer)
    names = ("<bos>", "<eos>", "<pad>") if gemma else ("<s>", "</s>", "<unk>")
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=names[0],
        eos_token=names[1],
        pad_token=names[2],
        unk_token="<unk>",
    )
    wrapped.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}"
    )
    return wrapped


def build_family_task(root: Path, name: str, tiny_model_dir: Path) -> Path:
    """A task whose merged model is a tiny random model of the family ``name``."""
    task = root / name
    merged = str(family_model(task / "merged", name, tiny_model_dir))
    meta = TaskMeta(
        model=merged, status="merged", merged_path="merged", training={"model_name": merged}
    )
    save_meta(task, meta)
    return task


@pytest.fixture(scope="module")
def family_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("families")


@pytest.fixture(scope="module")
def family_exports(family_root: Path, tiny_model_dir: Path):
    """Each family's task exported in f16, q5_0 and q4_0 (built once for the module)."""
    done: dict[str, dict[str, Any]] = {}

    def get(name: str) -> dict[str, Any]:
        if name not in done:
            task = build_family_task(family_root, name, tiny_model_dir)
            done[name] = {q: export_task(task, quant=q) for q in ("f16", "q5_0", "q4_0")}
        return done[name]

    return get


def transformers_reads(path: Path) -> tuple[Any, Any]:
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    return model.eval(), tokenizer


def reference(task: Path) -> tuple[Any, Any]:
    tokenizer = AutoTokenizer.from_pretrained(task / "merged")
    model = AutoModelForCausalLM.from_pretrained(task / "merged", dtype=torch.float32)
    return model.eval(), tokenizer


def logits(model: Any, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].float()


# --- families transformers reads back -------------------------------------------------------------


@pytest.mark.parametrize("name", READ_BACK)
def test_f16_reads_back_with_the_models_logits_and_tokenizer(family_exports, name: str) -> None:
    result = family_exports(name)["f16"]
    task = result.path.parent.parent
    model, tokenizer = transformers_reads(result.path)
    expected_model, expected_tokenizer = reference(task)
    ids = expected_tokenizer(CHECK_TEXT)["input_ids"]
    got, expected = logits(model, ids), logits(expected_model, ids)

    # The file is the model rounded to f16: the largest logit difference is f16 rounding.
    assert float((got - expected).abs().max()) <= 2e-3 * float(expected.abs().max())
    assert bool((got.argmax(-1) == expected.argmax(-1)).all())
    # The export's own check measured the same, and says so in the meta.
    check = result.check
    assert check.compared and check.agreement == 1.0 and check.tokens == len(ids)
    recorded = load_meta(task).exports[result.path.name]
    assert recorded["check"]["greedy_agreement"] == 1.0
    assert recorded["architecture"] == result.architecture
    # The tokenizer round-trips: same ids, same template, same end of turn.
    assert tokenizer(CHECK_TEXT)["input_ids"] == ids
    assert tokenizer.chat_template == expected_tokenizer.chat_template
    assert tokenizer.eos_token == expected_tokenizer.eos_token


@pytest.mark.parametrize("quant", ["q5_0", "q4_0"])
@pytest.mark.parametrize("name", READ_BACK)
def test_low_bit_files_pick_the_same_next_token_mostly(
    family_exports, name: str, quant: str
) -> None:
    check = family_exports(name)[quant].check
    print(f"{name} {quant}: {check.line()}")  # docs/export.md's agreement figures (-s)

    assert check.compared and check.tokens > 90
    assert check.agreement >= 0.8, check.line()  # measured 0.83 to 1.0 (docs/export.md)


@pytest.mark.parametrize("name", ["m7", "phi3", "gemma2"])
def test_sentencepiece_vocabulary_round_trips(tmp_path: Path, tiny_model_dir, name: str) -> None:
    """The released Mistral 7B, Phi-3 and Gemma models have SentencePiece vocabularies: stored
    with a score per piece (minus its merge rank), byte pieces typed as bytes, and the leading
    space as the tokenizer adds it; transformers rebuilds the same tokenizer from the file."""
    gemma = name == "gemma2"
    task = tmp_path / name
    merged = family_model(task / "merged", name, tiny_model_dir, sentencepiece_tokenizer(gemma))
    save_meta(
        task,
        TaskMeta(
            model=str(merged),
            status="merged",
            merged_path="merged",
            training={"model_name": str(merged)},
        ),
    )
    result = export_task(task)
    fields = {n: f.contents() for n, f in gguf.GGUFReader(result.path).fields.items()}
    model, tokenizer = transformers_reads(result.path)
    expected_model, expected_tokenizer = reference(task)
    ids = expected_tokenizer(CHECK_TEXT)["input_ids"]

    assert fields["tokenizer.ggml.model"] == "llama"
    assert fields["tokenizer.ggml.add_space_prefix"] is (not gemma)
    byte = expected_tokenizer.convert_tokens_to_ids("<0x41>")
    assert fields["tokenizer.ggml.token_type"][byte] == gguf.TokenType.BYTE
    scores = fields["tokenizer.ggml.scores"]
    first_merge = "".join(json.loads((merged / "tokenizer.json").read_text())["model"]["merges"][1])
    assert scores[expected_tokenizer.convert_tokens_to_ids(first_merge)] == -1.0
    assert tokenizer(CHECK_TEXT)["input_ids"] == ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == expected_tokenizer.decode(
        ids, skip_special_tokens=True
    )
    # f16 rounding: a near tie may flip (159 of 160 for Mistral here).
    assert result.check.compared and result.check.agreement >= 0.98, result.check.line()
    got, expected = logits(model, ids), logits(expected_model, ids)
    assert float((got - expected).abs().max()) <= 2e-3 * float(expected.abs().max())


# --- families held to their tensors -------------------------------------------------------------


def file_tensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file as float32, in the Hugging Face (numpy) orientation."""
    reader = gguf.GGUFReader(path)
    return {
        t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape(
            tuple(int(n) for n in reversed(t.shape.tolist()))
        )
        for t in reader.tensors
    }


@pytest.mark.parametrize("name", ["smollm3", "llama3", "gemma2"])
def test_f16_tensors_are_the_models_weights_renamed(family_exports, name: str) -> None:
    result = family_exports(name)["f16"]
    task = result.path.parent.parent
    model, _ = reference(task)
    family = FAMILIES[model.config.model_type]
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, family.arch), 2)
    stored = file_tensors(result.path)
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    expected_names = {names.get_name(k, try_suffixes=(".weight", ".bias")) for k in state}
    assert set(stored) - {"rope_freqs.weight"} == expected_names
    for key, value in state.items():
        data = value.float().numpy() + (family.norm_shift if key.endswith("norm.weight") else 0)
        if family.permute_qk and (".q_proj." in key or ".k_proj." in key):
            heads = model.config.num_attention_heads if ".q_proj." in key else 2
            data = interleave_rotary_halves(data, heads)
        got = stored[names.get_name(key, try_suffixes=(".weight", ".bias"))]
        np.testing.assert_allclose(got, data, rtol=1e-3, atol=1e-4, err_msg=key)
    if name not in READ_BACK:
        assert result.check.reason  # and it says why no logits were compared
    fields = {n: f.contents() for n, f in gguf.GGUFReader(result.path).fields.items()}
    assert fields["general.architecture"] == family.arch.lower()
    assert fields["tokenizer.ggml.tokens"][:4] == AutoTokenizer.from_pretrained(
        task / "merged"
    ).convert_ids_to_tokens([0, 1, 2, 3])


def test_llama3_rope_factors_give_the_models_logits(family_exports) -> None:
    """Llama 3.1+ rope scaling is stored as llama.cpp's per-frequency factors: transformers'
    reader ignores them, so they are put back here, and the file then gives the logits."""
    result = family_exports("llama3")["f16"]
    task = result.path.parent.parent
    assert "rope" in result.check.reason
    model, _ = transformers_reads(result.path)
    factors = torch.from_numpy(file_tensors(result.path)["rope_freqs.weight"].copy())
    rotary = model.model.rotary_emb
    plain = rotary.inv_freq.clone()  # the file's rope base, no scaling
    expected_model, expected_tokenizer = reference(task)
    assert not torch.allclose(expected_model.model.rotary_emb.inv_freq, plain)  # it does scale
    rotary.inv_freq = plain / factors
    ids = expected_tokenizer(CHECK_TEXT)["input_ids"]
    got, expected = logits(model, ids), logits(expected_model, ids)

    assert float((got - expected).abs().max()) <= 2e-3 * float(expected.abs().max())
    assert bool((got.argmax(-1) == expected.argmax(-1)).all())


# --- the types llama.cpp gives each tensor ------------------------------------------------------


def tensor_types(path: Path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def test_low_bit_types_keep_the_output_at_8_bit_as_llama_cpp_does(family_exports) -> None:
    untied = tensor_types(family_exports("m7")["q4_0"].path)  # separate output matrix
    assert untied["output.weight"] == "Q8_0"
    assert untied["token_embd.weight"] == untied["blk.0.attn_q.weight"] == "Q4_0"
    assert untied["blk.0.attn_norm.weight"] == untied["output_norm.weight"] == "F32"
    tied = tensor_types(family_exports("qwen3")["q5_0"].path)  # the embedding is the output
    assert tied["token_embd.weight"] == "Q8_0" and "output.weight" not in tied
    assert tied["blk.1.ffn_down.weight"] == "Q5_0"
    assert tied["blk.0.attn_q_norm.weight"] == "F32"


@pytest.mark.parametrize("quant", ["bf16", "q8_0", "q5_1", "q4_1"])
def test_every_gguf_type_is_written_and_read_back(trained_task: Path, quant: str) -> None:
    result = export_task(trained_task, quant=quant)
    types = tensor_types(result.path)
    fields = gguf.GGUFReader(result.path).fields

    assert set(types.values()) <= {"F32", "Q8_0", quant.upper()}
    assert types["blk.0.attn_k.weight"] == quant.upper()
    assert fields["general.file_type"].contents() == getattr(
        gguf.LlamaFileType, f"MOSTLY_{quant.upper()}"
    )
    assert result.check.compared and result.check.agreement >= 0.9, result.check.line()


def test_sizes_shrink_with_the_bits(family_exports) -> None:
    sizes = {q: r.size_bytes for q, r in family_exports("m7").items()}
    assert sizes["f16"] > sizes["q5_0"] > sizes["q4_0"]


# --- a LoRA adapter of a Llama-style model ------------------------------------------------------


def test_llama_adapter_gguf_applied_as_llama_cpp_does_gives_the_merged_weights(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """llama.cpp computes W + alpha / rank * lora_b @ lora_a on the base GGUF's W. Done here on
    the files, it gives the merged model's GGUF weights, q/k rows reordered alike."""
    base = family_model(tmp_path / "llama-base", "llama", tiny_model_dir)
    task = tmp_path / "root" / "lla"
    train_adapter(base, task / ADAPTER_DIR, steps=3)
    meta = TaskMeta(
        model=str(base),
        status="trained",
        adapter_path=ADAPTER_DIR,
        training={"model_name": str(base)},
    )
    save_meta(task, meta)

    adapter = export_task(task, adapter=True)
    merged = export_task(task, quant="f16")
    lora, base_weights = file_tensors(adapter.path), file_tensors(adapter.base)
    merged_weights = file_tensors(merged.path)
    fields = {n: f.contents() for n, f in gguf.GGUFReader(adapter.path).fields.items()}
    scale = fields["adapter.lora.alpha"] / 8  # rank 8, alpha 16 (conftest.train_adapter)

    assert fields["general.architecture"] == "llama" and fields["adapter.lora.alpha"] == 16.0
    targets = sorted(name.removesuffix(".lora_a") for name in lora if name.endswith(".lora_a"))
    assert len(targets) == 14  # all-linear: 7 matrices in each of 2 layers
    for name in targets:
        applied = base_weights[name] + scale * lora[name + ".lora_b"] @ lora[name + ".lora_a"]
        np.testing.assert_allclose(applied, merged_weights[name], atol=2e-3, err_msg=name)
    # The reordering matters: without it q would not match.
    q = "blk.0.attn_q.weight"
    wrong = (
        base_weights[q]
        + scale * interleave_rotary_halves(lora[q + ".lora_b"], 4) @ lora[q + ".lora_a"]
    )
    assert not np.allclose(wrong, merged_weights[q], atol=2e-3)


# --- the K-quants, through llama.cpp's quantizer -------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["q4_k_m", "q6_k"])
def test_k_quant_through_llama_cpp(family_root: Path, tiny_model_dir: Path, quant: str) -> None:
    """Where llama-cpp-python (or llama-quantize) is installed: the K-quant file is llama.cpp's
    mix, reads back, and picks the model's next token at most positions."""
    tool = llama_quantizer()
    if tool is None:
        pytest.skip("llama.cpp's quantizer is not installed (llama-cpp-python, llama-quantize)")
    task = build_family_task(family_root, "qwen2-256", tiny_model_dir)
    result = export_task(task, quant=quant, force=True)
    types = set(tensor_types(result.path).values())
    print(f"{quant} ({result.quantizer}): {result.check.line()}")

    assert result.quantizer == tool
    assert ("Q4_K" if quant == "q4_k_m" else "Q6_K") in types and "F32" in types
    assert result.check.compared and result.check.agreement >= 0.8, result.check.line()
    assert result.size_bytes < 0.5 * family_exports_size(task)


def family_exports_size(task: Path) -> int:
    return export_task(task, quant="f16", force=True, check=False).size_bytes


# --- refusals ------------------------------------------------------------------------------------


def test_unsupported_rope_scaling_is_refused_in_one_line(family_root: Path, tiny_model_dir) -> None:
    task = build_family_task(family_root, "qwen3", tiny_model_dir)
    config_file = task / "merged" / "config.json"
    config_file.write_text(
        config_file.read_text().replace(
            '"rope_type": "default"', '"rope_type": "yarn", "factor": 4.0'
        )
    )
    with pytest.raises(ExportError, match=r"rope scaling 'yarn'.*for Qwen3"):
        export_task(task, quant="q8_0", force=True)


def test_k_quant_without_llama_cpp_says_what_to_install(trained_task: Path) -> None:
    if llama_quantizer() is not None:
        pytest.skip("llama.cpp's quantizer is installed here")
    with pytest.raises(DependencyError) as error:
        export_task(trained_task, quant="q4_k_m")
    message = str(error.value)
    assert "\n" not in message
    assert f"available now {', '.join(GGUF_QUANTS)}" in message
    assert "sage-finetune-plugin[llama-cpp]" in message and "llama-quantize" in message
    assert not (trained_task / "export").exists()  # refused before any merge or write
    result = CliRunner().invoke(
        finetune, ["export", "demo", "--root", str(trained_task.parent), "--quant", "q4_k_m"]
    )
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    # --quant's completion offers what can be written here, its help says what is missing.
    from sage_finetune_plugin.cli.export import _complete_quants

    assert _complete_quants(None, None, "q4") == ["q4_1", "q4_0"]
    help_text = CliRunner().invoke(finetune, ["export", "--help"]).output
    assert "llama.cpp's quantizer, not found here" in " ".join(help_text.split())


def test_unknown_quant_is_a_usage_problem(trained_task: Path) -> None:
    with pytest.raises(UsageProblem, match="Unknown quantization 'q3_0'"):
        export_task(trained_task, quant="q3_0")
    assert set(K_QUANTS) == {"q6_k", "q5_k_m", "q4_k_m", "q3_k_m", "q2_k"}
