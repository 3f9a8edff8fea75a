"""Fast preparation produces the same tokens as the plain definition: every sample's segments
(rendering.Renderer.segments) tokenized one by one with the tokenizer's own call, BOS first,
EOS last, -100 on prompt segments (everything trained with train_on_prompt), cut at max_length.
Checked on varied records, through two processes (as for large data) and in one."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from test_real_world_data import TOOL_TEMPLATE

from sage_finetune_plugin.data import load_training_data, prepare_dataset
from sage_finetune_plugin.data import preparation as preparation_module
from sage_finetune_plugin.data.rendering import IGNORE_INDEX, Renderer

from conftest import ASSETS

MAX_LENGTH = 48
RECORDS = {
    "alpaca": [
        {"instruction": "Name the capital of France.", "output": "Paris."},
        {"instruction": "Add the numbers.", "input": "12 and 30", "output": "42."},
        {
            "instruction": "And in German?",
            "output": "Guten Morgen.",
            "system": "You translate.",
            "history": [["Say good morning in French.", "Bonjour."]],
        },
        {
            "instruction": "翻译成中文。",
            "input": "good morning",
            "output": "早上好。今天天气很好。",
        },
        {"instruction": "Count.", "output": " ".join(str(n) for n in range(80))},  # truncated
    ],
    "conversation": [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Goodbye."},
            ]
        },
        {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]},
    ],
    "text": [{"text": "Plain text to continue."}, {"text": "Zweiter Text, etwas länger."}],
    "prompt_completion": [{"prompt": "The sky is", "completion": " blue."}],
}


def reference(renderer: Renderer, row, max_length: int) -> tuple[list[int], list[int]]:
    """A sample's ids and labels by the plain definition (see the module docstring)."""
    tokenizer = renderer.tokenizer
    ids, labels = list(renderer.bos_ids), [IGNORE_INDEX] * len(renderer.bos_ids)
    for text, trainable in renderer.segments(row):
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += tokens
        labels += tokens if trainable else [IGNORE_INDEX] * len(tokens)
    if ids[-1] != tokenizer.eos_token_id:
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    if renderer.train_on_prompt:
        labels = list(ids)
    return ids[:max_length], labels[:max_length]


def assert_identical(
    data, tokenizer, *, train_on_prompt: bool, processes: bool, monkeypatch, max_length=MAX_LENGTH
):
    monkeypatch.setattr(preparation_module, "PARALLEL_MIN_ROWS", 1 if processes else 10**9)
    loaded = load_training_data(data)
    prepared = prepare_dataset(
        loaded, tokenizer, max_length=max_length, train_on_prompt=train_on_prompt
    )
    renderer = Renderer(tokenizer, max_length=max_length, train_on_prompt=train_on_prompt)
    expected = [reference(renderer, row, max_length) for row in loaded.dataset]
    expected = [(i, labels) for i, labels in expected if any(x != -100 for x in labels[1:])]
    got = [(row["input_ids"], row["labels"]) for row in prepared.train]
    assert got == expected
    assert any(len(ids) == max_length for ids, _ in got) or data != RECORDS["alpaca"] * 6


@pytest.mark.parametrize("processes", [True, False])
@pytest.mark.parametrize("kind", list(RECORDS))
def test_tokens_and_labels_match_the_plain_definition(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, kind: str, processes: bool
) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for train_on_prompt in (False, True):
        assert_identical(
            RECORDS[kind] * 6,
            tokenizer,
            train_on_prompt=train_on_prompt,
            processes=processes,
            monkeypatch=monkeypatch,
        )


def test_tool_calls_match_the_plain_definition(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoTokenizer

    model = tmp_path / "tiny-tools"
    shutil.copytree(tiny_model_dir, model)
    (model / "chat_template.jinja").write_text(TOOL_TEMPLATE)
    tokenizer = AutoTokenizer.from_pretrained(model)
    data = [str(ASSETS / "datasets" / "openai_tools.jsonl")] * 3
    assert_identical(
        data,
        tokenizer,
        train_on_prompt=False,
        processes=True,
        monkeypatch=monkeypatch,
        max_length=1024,
    )


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["alpaca", "conversation"])
def test_smollm2_tokens_match_the_plain_definition(
    monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """The real SmolLM2 tokenizer (byte-level BPE, its chat template and default system)."""
    from sage_finetune_plugin.config import SMALL_MODEL
    from sage_finetune_plugin.models import load_tokenizer

    tokenizer = load_tokenizer(SMALL_MODEL)
    for train_on_prompt in (False, True):
        assert_identical(
            RECORDS[kind] * 6,
            tokenizer,
            train_on_prompt=train_on_prompt,
            processes=True,
            monkeypatch=monkeypatch,
        )
