"""Fast preparation produces the same tokens as the plain definition: every sample's segments
(rendering.Renderer.segments) tokenized one by one with the tokenizer's own call, BOS first,
EOS last, -100 on prompt segments (everything trained with train_on_prompt), cut at max_length.
Checked on varied records, through two processes (as for large data) and in one. And the
batch renderer's one rendering per conversation splits the turns exactly as rendering turn by
turn does, on chat templates of several families and records made to mislead it."""

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


TEMPLATES = {
    # ChatML, as the tiny model and SmolLM2 have it.
    "chatml": None,
    "llama3": (
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>"
        "\n\n{{ m.content | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
        "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    ),
    "gemma": (
        "{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
        "<start_of_turn>{{ 'model' if m.role == 'assistant' else m.role }}\n"
        "{{ m.content | trim }}<end_of_turn>\n{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    ),
    # No generation prompt: no header to find turns by, every conversation turn by turn.
    "llama2": (
        "{% for m in messages %}{% if m.role == 'user' %}[INST] {{ m.content }} [/INST]"
        "{% elif m.role == 'assistant' %} {{ m.content }} </s>{% endif %}{% endfor %}"
    ),
    # The last answer rendered differently from earlier ones (as Qwen3's thinking block).
    "think": (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' and "
        "loop.last %}<think>\n\n</think>\n\n{% endif %}{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
}

MISLEADING = [
    [("user", "<|im_start|>assistant\nyes"), ("assistant", "yes")],  # the header in a question
    [("user", "Say it."), ("assistant", "<|im_end|>")],  # an answer that is the turn end
    [("user", "Pad"), ("assistant", "  spaced answer \n\n")],  # trimmed by some templates
    [("user", "a"), ("assistant", "b"), ("user", "b"), ("assistant", "b"), ("user", "end")],
    [("system", "Own system."), ("user", "x"), ("assistant", "y"), ("user", "z")],
    [("user", "same"), ("assistant", "same"), ("user", "same"), ("assistant", "same")],
]


@pytest.mark.parametrize("template", list(TEMPLATES))
def test_one_rendering_per_conversation_splits_turns_as_turn_by_turn(
    tiny_model_dir: Path, template: str
) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    if TEMPLATES[template] is not None:
        tokenizer.chat_template = TEMPLATES[template]
    misleading = [{"messages": [{"role": r, "content": c} for r, c in t]} for t in MISLEADING]
    groups = [*RECORDS.values(), misleading]
    rows = [row for group in groups for row in load_training_data(group).dataset]
    for system_prompt in (None, "Be kind."):
        renderer = Renderer(tokenizer, system_prompt=system_prompt)
        assert renderer.segments_batch(rows) == [renderer.segments(row) for row in rows]


def test_plain_conversations_are_rendered_once(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not the turn-by-turn way (which renders each conversation 1 + 2 x answers times)."""
    from transformers import AutoTokenizer

    renderer = Renderer(AutoTokenizer.from_pretrained(tiny_model_dir))
    groups = [RECORDS["alpaca"], RECORDS["conversation"]]
    rows = [row for group in groups for row in load_training_data(group).dataset]
    expected = [renderer.segments(row) for row in rows]

    def turn_by_turn(*args, **kwargs):
        raise AssertionError("rendered turn by turn")

    monkeypatch.setattr(Renderer, "_template_segments", turn_by_turn)
    assert renderer.segments_batch(rows) == expected
