"""Rendering, prompt masking, EOS, truncation, caching, eval split, statistics and collators,
checked on the tiny model's real tokenizer (ChatML template) and on one without a template."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from sage_finetune_plugin.config import TrainingConfig
from sage_finetune_plugin.data import (
    IGNORE_INDEX,
    PackingCollator,
    PaddingCollator,
    Renderer,
    format_alpaca_sample,
    format_conversation_sample,
    format_qa_sample,
    format_text_sample,
    load_training_data,
    prepare_dataset,
)
from sage_finetune_plugin.errors import DataError

ALPACA = {"instruction": "Add 2 and 3.", "input": "Use digits.", "output": "The sum is 5."}
CONVERSATION = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "See you."},
    ]
}


@pytest.fixture(scope="module")
def chat_tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def plain_tokenizer(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The same vocabulary without a chat template (the ### Instruction fallback applies)."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("plain-tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, folder / name)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert not tokenizer.chat_template
    return tokenizer


def jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def split_by_label(tokenizer, row: dict) -> tuple[str, str]:
    """(text of trained tokens, text of masked tokens)."""
    ids, labels = row["input_ids"], row["labels"]
    trained = [t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]
    masked = [t for t, label in zip(ids, labels, strict=True) if label == IGNORE_INDEX]
    return tokenizer.decode(trained), tokenizer.decode(masked)


def prepare(records: list[dict], tokenizer, tmp_path: Path, **kwargs):
    return prepare_dataset(jsonl(tmp_path / "d.jsonl", records), tokenizer, **kwargs)


# --- masking and EOS ----------------------------------------------------------------------


def test_chat_template_masks_exactly_the_prompt(chat_tokenizer, tmp_path: Path) -> None:
    prepared = prepare([ALPACA], chat_tokenizer, tmp_path)
    row = prepared.train[0]
    trained, masked = split_by_label(chat_tokenizer, row)
    assert trained == "The sum is 5.<|im_end|>"
    assert masked == (
        "<|im_start|>user\nAdd 2 and 3.\n\nUse digits.<|im_end|>\n<|im_start|>assistant\n"
    )
    # Labels are -100 on one contiguous prompt block, then equal the ids.
    first = row["labels"].index(next(x for x in row["labels"] if x != IGNORE_INDEX))
    assert set(row["labels"][:first]) == {IGNORE_INDEX}
    assert row["labels"][first:] == row["input_ids"][first:]
    # The sample ends with EOS exactly once (ChatML's end of turn is the EOS).
    eos = chat_tokenizer.eos_token_id
    assert row["input_ids"][-1] == eos and row["input_ids"][-2] != eos
    assert row["length"] == len(row["input_ids"])


def test_chat_template_tokens_match_the_template_rendering(chat_tokenizer, tmp_path) -> None:
    prepared = prepare([CONVERSATION], chat_tokenizer, tmp_path)
    rendered = chat_tokenizer.apply_chat_template(CONVERSATION["messages"], tokenize=False)
    expected = chat_tokenizer(rendered.rstrip("\n"), add_special_tokens=False)["input_ids"]
    assert prepared.train[0]["input_ids"] == expected


def test_multi_turn_trains_on_every_assistant_turn(chat_tokenizer, tmp_path: Path) -> None:
    prepared = prepare([CONVERSATION], chat_tokenizer, tmp_path)
    trained, masked = split_by_label(chat_tokenizer, prepared.train[0])
    assert trained == "Hello!<|im_end|>See you.<|im_end|>"
    assert "Bye" in masked and "Be brief." in masked and "Hello" not in masked


def test_without_template_uses_instruction_input_response(plain_tokenizer, tmp_path) -> None:
    prepared = prepare([ALPACA], plain_tokenizer, tmp_path)
    assert prepared.stats.template == "fallback"
    trained, masked = split_by_label(plain_tokenizer, prepared.train[0])
    assert trained == "The sum is 5.<|im_end|>"
    assert masked == "### Instruction:\nAdd 2 and 3.\n\n### Input:\nUse digits.\n\n### Response:\n"
    assert prepared.train[0]["input_ids"][-1] == plain_tokenizer.eos_token_id


def test_without_template_multi_turn(plain_tokenizer, tmp_path: Path) -> None:
    prepared = prepare([CONVERSATION], plain_tokenizer, tmp_path)
    trained, masked = split_by_label(plain_tokenizer, prepared.train[0])
    assert trained == "Hello!<|im_end|>See you.<|im_end|>"
    assert masked.startswith("### System:\nBe brief.\n\n### Instruction:\nHi there\n\n")


def test_eos_is_appended_once_when_the_template_has_another_turn_end(
    chat_tokenizer, tmp_path: Path
) -> None:
    import copy

    tokenizer = copy.deepcopy(chat_tokenizer)
    tokenizer.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    prepared = prepare([ALPACA], tokenizer, tmp_path)
    ids = prepared.train[0]["input_ids"]
    trained, masked = split_by_label(tokenizer, prepared.train[0])
    assert trained == "The sum is 5.<|im_end|>"
    assert masked == "[user] Add 2 and 3.\n\nUse digits.\n[assistant] "
    assert ids.count(tokenizer.eos_token_id) == 1 and ids[-1] == tokenizer.eos_token_id


def test_train_on_prompt_trains_on_everything(chat_tokenizer, tmp_path: Path) -> None:
    prepared = prepare([ALPACA], chat_tokenizer, tmp_path, train_on_prompt=True)
    row = prepared.train[0]
    assert row["labels"] == row["input_ids"]


def test_text_and_completion_samples(chat_tokenizer, tmp_path: Path) -> None:
    text = prepare([{"text": "Just some text."}], chat_tokenizer, tmp_path)
    row = text.train[0]
    assert row["labels"] == row["input_ids"]
    assert chat_tokenizer.decode(row["input_ids"]) == "Just some text.<|im_end|>"

    completion = prepare([{"prompt": "2 + 2 =", "completion": " 4"}], chat_tokenizer, tmp_path)
    trained, masked = split_by_label(chat_tokenizer, completion.train[0])
    assert (masked, trained) == ("2 + 2 =", " 4<|im_end|>")


def test_format_functions_return_the_training_text(chat_tokenizer, plain_tokenizer) -> None:
    assert format_alpaca_sample(ALPACA) == (
        "### Instruction:\nAdd 2 and 3.\n\n### Input:\nUse digits.\n\n### Response:\nThe sum is 5."
    )
    assert format_alpaca_sample(ALPACA, chat_tokenizer) == (
        "<|im_start|>user\nAdd 2 and 3.\n\nUse digits.<|im_end|>\n"
        "<|im_start|>assistant\nThe sum is 5.<|im_end|>"
    )
    qa = {"question": "Capital of France?", "answer": "Paris."}
    assert format_qa_sample(qa, plain_tokenizer) == (
        "### Instruction:\nCapital of France?\n\n### Response:\nParis.<|im_end|>"
    )
    assert format_conversation_sample(CONVERSATION, chat_tokenizer).endswith(
        "<|im_start|>assistant\nSee you.<|im_end|>"
    )
    assert format_text_sample({"text": "abc"}, chat_tokenizer) == "abc<|im_end|>"
    with pytest.raises(DataError, match="Invalid qa record: missing field 'answer'"):
        format_qa_sample({"question": "q"})


def test_renderer_segments_mark_the_trainable_parts(chat_tokenizer) -> None:
    row = {
        "kind": "chat",
        "messages": CONVERSATION["messages"],
        "context": "",
        "location": "record 1",
    }
    segments = Renderer(chat_tokenizer).segments(row)
    assert [text for text, trainable in segments if trainable] == [
        "Hello!<|im_end|>",
        "See you.<|im_end|>",
    ]


# --- truncation, statistics ----------------------------------------------------------------


def test_truncation_drops_samples_without_answer_tokens(chat_tokenizer, tmp_path) -> None:
    long_prompt = {"instruction": "word " * 200, "output": "short"}
    long_answer = {"instruction": "Say it.", "output": "answer " * 200}
    short = {"instruction": "Hi", "output": "Hello"}
    prepared = prepare([long_prompt, long_answer, short], chat_tokenizer, tmp_path, max_length=32)
    stats = prepared.stats
    assert (stats.records_read, stats.records_kept, stats.samples) == (3, 3, 2)
    assert stats.dropped == {} and stats.truncation_dropped == 1  # not an invalid record
    assert stats.records_invalid == 0 and stats.records_dropped == 1
    assert stats.truncated == 1  # the long answer, cut but kept
    lengths = sorted(prepared.train["length"])
    assert lengths[-1] == 32 == stats.length_max
    cut = next(row for row in prepared.train if row["length"] == 32)
    assert cut["input_ids"][-1] != chat_tokenizer.eos_token_id  # cut answers do not end


def test_everything_truncated_is_an_error(chat_tokenizer, tmp_path: Path) -> None:
    record = {"instruction": "word " * 100, "output": "short"}
    with pytest.raises(DataError, match="every sample lost all its answer tokens"):
        prepare([record], chat_tokenizer, tmp_path, max_length=16)


def test_statistics(chat_tokenizer, tmp_path: Path) -> None:
    records = [
        {"instruction": f"Count to {i}.", "output": " ".join(["n"] * i)} for i in range(1, 41)
    ]
    prepared = prepare(records, chat_tokenizer, tmp_path)
    stats = prepared.stats
    lengths = sorted(prepared.train["length"])
    trained = sum(
        sum(1 for label in row["labels"][1:] if label != IGNORE_INDEX) for row in prepared.train
    )
    assert stats.tokens == sum(lengths)
    assert stats.trainable_tokens == trained
    assert 0 < stats.trainable_share < 1
    assert stats.length_max == lengths[-1]
    assert lengths[0] <= stats.length_p50 <= stats.length_p90 <= stats.length_p99 <= lengths[-1]
    data = stats.to_dict()
    assert data["records_dropped"] == 0 and data["format"] == "alpaca"
    assert json.loads(json.dumps(data)) == data


def test_config_supplies_defaults_and_keywords_override(chat_tokenizer, tmp_path: Path) -> None:
    config = TrainingConfig(max_length=24, train_on_prompt=True)
    record = {"instruction": "Say it.", "output": "answer " * 50}
    prepared = prepare([record], chat_tokenizer, tmp_path, config=config)
    assert prepared.stats.max_length == 24 and prepared.train[0]["labels"][0] != IGNORE_INDEX
    prepared = prepare([record], chat_tokenizer, tmp_path, config=config, max_length=40)
    assert prepared.stats.max_length == 40


# --- eval split ------------------------------------------------------------------------------


def test_eval_ratio_is_seeded(chat_tokenizer, tmp_path: Path) -> None:
    records = [{"text": f"sample number {i}"} for i in range(20)]
    first = prepare(records, chat_tokenizer, tmp_path, eval_ratio=0.25, seed=1)
    again = prepare(records, chat_tokenizer, tmp_path, eval_ratio=0.25, seed=1)
    other = prepare(records, chat_tokenizer, tmp_path, eval_ratio=0.25, seed=2)
    assert (len(first.train), len(first.eval)) == (15, 5)
    assert (first.stats.samples, first.stats.eval_samples) == (15, 5)
    assert first.eval["input_ids"] == again.eval["input_ids"]
    assert first.eval["input_ids"] != other.eval["input_ids"]


def test_eval_data_file(chat_tokenizer, tmp_path: Path) -> None:
    eval_file = jsonl(tmp_path / "eval.jsonl", [ALPACA, ALPACA])
    prepared = prepare([ALPACA] * 3, chat_tokenizer, tmp_path, eval_data=eval_file)
    assert (len(prepared.train), len(prepared.eval)) == (3, 2)
    assert prepared.eval.column_names == ["input_ids", "labels", "length"]


def test_eval_ratio_on_too_little_data_keeps_every_sample_for_training(
    chat_tokenizer, tmp_path: Path
) -> None:
    prepared = prepare([ALPACA], chat_tokenizer, tmp_path, eval_ratio=0.5)
    assert len(prepared.train) == 1 and prepared.eval is None
    assert prepared.stats.eval_samples == 0
    two = prepare([ALPACA, ALPACA], chat_tokenizer, tmp_path, eval_ratio=0.05)
    assert (len(two.train), len(two.eval)) == (1, 1)


# --- cache -------------------------------------------------------------------------------------


def count_tokenize_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many rows the supervised method renders, call by call."""
    from sage_finetune_plugin.methods.sft import SFT

    calls: list[int] = []
    real = SFT.render

    def counting(self, renderer, rows):
        calls.append(len(rows))
        return real(self, renderer, rows)

    monkeypatch.setattr(SFT, "render", counting)
    return calls


def test_second_prepare_loads_from_cache(chat_tokenizer, tmp_path, monkeypatch) -> None:
    calls = count_tokenize_calls(monkeypatch)
    data = jsonl(tmp_path / "d.jsonl", [ALPACA, dict(ALPACA, output="Six.")])
    cache = tmp_path / "task" / ".cache" / "prepared"
    first = prepare_dataset(data, chat_tokenizer, cache_dir=cache, eval_ratio=0.5)
    assert calls and not first.stats.from_cache
    assert (cache / first.stats.cache_key / "stats.json").is_file()
    calls.clear()

    second = prepare_dataset(data, chat_tokenizer, cache_dir=cache, eval_ratio=0.5)
    assert calls == [] and second.stats.from_cache
    assert second.train["input_ids"] == first.train["input_ids"]
    assert second.eval["labels"] == first.eval["labels"]
    assert second.stats.tokens == first.stats.tokens
    assert second.format == "alpaca"


def test_cache_key_follows_content_and_options(chat_tokenizer, tmp_path, monkeypatch) -> None:
    calls = count_tokenize_calls(monkeypatch)
    data = jsonl(tmp_path / "d.jsonl", [ALPACA])
    cache = tmp_path / "cache"
    keys = {prepare_dataset(data, chat_tokenizer, cache_dir=cache).stats.cache_key}
    keys.add(prepare_dataset(data, chat_tokenizer, cache_dir=cache, max_length=64).stats.cache_key)
    keys.add(
        prepare_dataset(data, chat_tokenizer, cache_dir=cache, train_on_prompt=True).stats.cache_key
    )
    jsonl(data, [ALPACA, ALPACA])  # same path, new content
    changed = prepare_dataset(data, chat_tokenizer, cache_dir=cache)
    keys.add(changed.stats.cache_key)
    assert len(keys) == 4 and len(calls) == 4
    assert len(changed.train) == 2
    # Packing changes only the collator, not the tokens: the cache is shared.
    packed = prepare_dataset(data, chat_tokenizer, cache_dir=cache, packing=True)
    assert packed.stats.from_cache and packed.packing and len(calls) == 4


def test_cache_key_follows_the_template(chat_tokenizer, plain_tokenizer, tmp_path) -> None:
    data = jsonl(tmp_path / "d.jsonl", [ALPACA])
    cache = tmp_path / "cache"
    chat = prepare_dataset(data, chat_tokenizer, cache_dir=cache)
    plain = prepare_dataset(data, plain_tokenizer, cache_dir=cache)
    assert chat.stats.cache_key != plain.stats.cache_key and not plain.stats.from_cache


def test_loaded_data_can_be_prepared(chat_tokenizer, tmp_path: Path) -> None:
    loaded = load_training_data(jsonl(tmp_path / "d.jsonl", [ALPACA, ALPACA]))
    prepared = prepare_dataset(loaded, chat_tokenizer, cache_dir=tmp_path / "c")
    again = prepare_dataset(tmp_path / "d.jsonl", chat_tokenizer, cache_dir=tmp_path / "c")
    assert len(prepared.train) == 2 and again.stats.from_cache


# --- collators ---------------------------------------------------------------------------------


def test_padding_collator_pads_labels_by_position(chat_tokenizer, tmp_path: Path) -> None:
    prepared = prepare([ALPACA, {"instruction": "Hi", "output": "Hello"}], chat_tokenizer, tmp_path)
    rows = list(prepared.train)
    batch = prepared.collator(rows)
    longest = max(len(r["input_ids"]) for r in rows)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape == (2, longest)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        assert batch["input_ids"][i, :n].tolist() == row["input_ids"]
        assert batch["labels"][i, :n].tolist() == row["labels"]
        assert batch["labels"][i, n:].eq(IGNORE_INDEX).all()
        assert batch["attention_mask"][i].sum() == n


def test_pad_equal_to_eos_keeps_the_eos_label() -> None:
    collator = PaddingCollator(pad_token_id=2, pad_to_multiple_of=8)
    batch = collator(
        [{"input_ids": [5, 6, 2], "labels": [-100, 6, 2]}, {"input_ids": [7], "labels": [7]}]
    )
    assert batch["input_ids"].shape == (2, 8)
    assert batch["labels"][0].tolist() == [-100, 6, 2, *[-100] * 5]


def test_packed_samples_do_not_attend_to_each_other(tiny_model_dir: Path) -> None:
    """A sample's logits are the same alone and packed behind another one (eager and sdpa)."""
    import torch
    from transformers import AutoModelForCausalLM

    first = {"input_ids": [5, 6, 7, 8, 9, 10], "labels": [5, 6, 7, 8, 9, 10]}
    second = {"input_ids": [11, 12, 13, 14], "labels": [-100, -100, 13, 14]}
    batch = PackingCollator()([first, second])
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 0, 1, 2, 3]]
    assert batch["labels"].tolist() == [[-100, 6, 7, 8, 9, 10, -100, -100, 13, 14]]
    for implementation in ("eager", "sdpa"):
        model = AutoModelForCausalLM.from_pretrained(
            tiny_model_dir, attn_implementation=implementation
        )
        model.config.use_cache = False
        with torch.no_grad():
            packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
            alone = model(input_ids=torch.tensor([second["input_ids"]])).logits
        assert torch.allclose(packed[0, 6:], alone[0], atol=1e-4), implementation


def test_packing_dataset_uses_the_packing_collator(chat_tokenizer, tmp_path: Path) -> None:
    prepared = prepare([ALPACA, ALPACA], chat_tokenizer, tmp_path, packing=True)
    batch = prepared.collator(list(prepared.train))
    assert batch["input_ids"].shape == (1, 2 * prepared.train[0]["length"])


def test_prepared_data_outlives_the_loaded_data(chat_tokenizer, tmp_path: Path) -> None:
    import gc

    train = prepare([ALPACA] * 4, chat_tokenizer, tmp_path).train
    gc.collect()
    assert len(train.shuffle(seed=0).map(lambda row: row)) == 4
