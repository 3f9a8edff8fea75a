"""Loading training data: every file type and format spelling, validation errors, skip-invalid."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest

from sage_finetune_plugin.data import load_training_data, resolve_format
from sage_finetune_plugin.errors import ConfigError, DataError

ALPACA = [
    {"instruction": "Add 2 and 3.", "input": "", "output": "5"},
    {"instruction": "Translate.", "input": "chat", "output": "cat", "system": "Be brief."},
]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def roles(loaded) -> list[list[str]]:
    return [[m["role"] for m in row["messages"]] for row in loaded.dataset]


@pytest.mark.parametrize(
    ("record", "fmt", "expected_roles"),
    [
        ({"instruction": "i", "input": "x", "output": "o"}, "alpaca", ["user", "assistant"]),
        ({"question": "q", "answer": "a", "context": "c"}, "qa", ["user", "assistant"]),
        (
            {
                "conversations": [
                    {"role": "system", "content": "s"},
                    {"role": "user", "content": "u"},
                    {"role": "assistant", "content": "a"},
                ]
            },
            "conversation",
            ["system", "user", "assistant"],
        ),
        (
            {
                "conversations": [
                    {"from": "system", "value": "s"},
                    {"from": "human", "value": "u"},
                    {"from": "gpt", "value": "a"},
                ]
            },
            "conversation",
            ["system", "user", "assistant"],
        ),
        (
            {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]},
            "conversation",
            ["user", "assistant"],
        ),
        ({"text": "plain text"}, "text", ["text"]),
        ({"prompt": "p", "completion": "c"}, "prompt_completion", ["user", "assistant"]),
    ],
    ids=["alpaca", "qa", "role-content", "sharegpt", "openai-messages", "text", "completion"],
)
def test_each_format_spelling_is_detected_and_normalized(
    tmp_path: Path, record: dict, fmt: str, expected_roles: list[str]
) -> None:
    loaded = load_training_data(write_jsonl(tmp_path / "d.jsonl", [record, record]))
    assert loaded.format == fmt
    assert len(loaded) == 2 and loaded.records_read == 2
    assert roles(loaded) == [expected_roles, expected_roles]


def test_alpaca_round_trips_through_canonical_records(tmp_path: Path) -> None:
    loaded = load_training_data(write_jsonl(tmp_path / "d.jsonl", ALPACA))
    assert list(loaded.records()) == ALPACA
    row = loaded.dataset[1]
    assert row["context"] == "chat" and row["messages"][0] == {
        "role": "system",
        "content": "Be brief.",
        "extra": "",
    }


def test_sharegpt_is_written_back_as_messages(tmp_path: Path) -> None:
    turns = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]
    loaded = load_training_data(write_jsonl(tmp_path / "d.jsonl", [{"conversations": turns}]))
    assert list(loaded.records()) == [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    ]


def test_trailing_turns_after_the_last_answer_are_dropped(tmp_path: Path) -> None:
    turns = [
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": "unanswered"},
    ]
    loaded = load_training_data(write_jsonl(tmp_path / "d.jsonl", [{"messages": turns}]))
    assert roles(loaded) == [["user", "assistant"]]


def test_json_list_and_object_holding_a_list(tmp_path: Path) -> None:
    (tmp_path / "list.json").write_text(json.dumps(ALPACA))
    (tmp_path / "obj.json").write_text(json.dumps({"version": 2, "data": ALPACA}))
    (tmp_path / "one.json").write_text(json.dumps(ALPACA[0]))
    assert len(load_training_data(tmp_path / "list.json")) == 2
    assert len(load_training_data(tmp_path / "obj.json")) == 2
    assert len(load_training_data(tmp_path / "one.json")) == 1


def test_json_lines_saved_as_json_are_read(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "lines.json", ALPACA)
    assert load_training_data(path).format == "alpaca"


def test_csv_parquet_and_saved_dataset(tmp_path: Path) -> None:
    from datasets import Dataset, DatasetDict

    records = [{"question": f"q{i}", "answer": f"a{i}", "context": ""} for i in range(3)]
    Dataset.from_list(records).to_csv(tmp_path / "d.csv", index=False)
    Dataset.from_list(records).to_parquet(tmp_path / "d.parquet")
    DatasetDict({"train": Dataset.from_list(records)}).save_to_disk(tmp_path / "saved")
    for source in ("d.csv", "d.parquet", "saved"):
        loaded = load_training_data(tmp_path / source)
        assert (loaded.format, len(loaded)) == ("qa", 3), source
        assert loaded.dataset[2]["messages"][1]["content"] == "a2"


def test_csv_conversation_cells_hold_json(tmp_path: Path) -> None:
    turns = json.dumps([{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}])
    (tmp_path / "c.csv").write_text('messages\n"' + turns.replace('"', '""') + '"\n')
    assert roles(load_training_data(tmp_path / "c.csv")) == [["user", "assistant"]]


def test_forced_format_and_aliases(tmp_path: Path) -> None:
    records = [{"instruction": "i", "output": "o", "text": "rendered"}]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    assert load_training_data(path).format == "alpaca"
    forced = load_training_data(path, format="text")
    assert forced.format == "text" and forced.dataset[0]["messages"][0]["content"] == "rendered"
    assert resolve_format("sharegpt") == "conversation"
    assert resolve_format("instruction") == "alpaca"
    with pytest.raises(ConfigError, match="Unknown data format 'yaml'"):
        load_training_data(path, format="yaml")


def test_a_list_of_records_loads(tmp_path: Path) -> None:
    loaded = load_training_data(ALPACA)
    assert (loaded.format, len(loaded), loaded.source) == ("alpaca", 2, "<records>")


# --- errors ------------------------------------------------------------------------------


def error_for(path: Path, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        load_training_data(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_and_unsupported_files(tmp_path: Path) -> None:
    assert "no such file" in error_for(tmp_path / "nope.jsonl")
    (tmp_path / "d.xml").write_text("<a/>")
    assert "unsupported file type '.xml'" in error_for(tmp_path / "d.xml")
    (tmp_path / "dir").mkdir()
    assert "a folder without data files" in error_for(tmp_path / "dir")


def test_invalid_json_names_line_and_column(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text('[\n  {"instruction": "i",, "output": "o"}\n]')
    assert "invalid JSON at line 2, column 23" in error_for(tmp_path / "bad.json")


def test_jsonl_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"\n')
    assert "line 2: invalid JSON at column" in error_for(path)
    path.write_text('{"text": "a"}\n[1, 2]\n')
    assert "line 2: expected a JSON object, found an array" in error_for(path)
    path.write_bytes(b'{"text": "a"}\n{"text": "\xff"}\n')
    assert "line 2: not valid UTF-8" in error_for(path)


def test_mixed_formats_name_the_record_and_expected_keys(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [ALPACA[0], {"question": "q", "answer": "a"}])
    message = error_for(path)
    assert "line 2: record looks like qa (keys: answer, question)" in message
    assert "the data is alpaca (detected from line 1; expected instruction, output" in message


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"instruction": "i"}, "line 1: missing field 'output'"),
        ({"instruction": "i", "output": "  "}, "line 1: field 'output' is empty"),
        ({"instruction": "i", "output": 5}, "field 'output' must be a string, got int"),
        ({"instruction": "i", "input": ["x"], "output": "o"}, "field 'input' must be a string"),
        (
            {"messages": [{"role": "bot", "content": "t"}, {"role": "assistant", "content": "a"}]},
            "message 1 has unknown role 'bot'",
        ),
        (
            {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]},
            "message 1: 'content' must be a string or a list of text parts, got int",
        ),
        ({"messages": [{"role": "user", "content": "u"}]}, "has no assistant (or gpt) message"),
        ({"messages": "hello"}, "field 'messages' must be a list, got str"),
        ({"foo": 1}, "no known training fields (keys: foo)"),
    ],
    ids=[
        "missing",
        "empty",
        "non-string",
        "non-string-optional",
        "unknown-role",
        "non-string-content",
        "no-answer",
        "not-a-list",
        "unknown",
    ],
)
def test_bad_records(tmp_path: Path, record: dict, expected: str) -> None:
    message = error_for(write_jsonl(tmp_path / "d.jsonl", [record]))
    assert expected in message
    assert "skip_invalid=True" in message


def test_forced_format_reports_the_fields_it_expected(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [ALPACA[0]])
    message = error_for(path, format="qa")
    assert "line 1: expected qa fields (question, answer" in message
    assert "found keys input, instruction, output" in message


def test_empty_data(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("\n\n")
    assert "no valid training records" in error_for(tmp_path / "empty.jsonl")
    (tmp_path / "empty.json").write_text("[]")
    assert "no valid training records" in error_for(tmp_path / "empty.json")


def test_skip_invalid_drops_and_counts_by_reason(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    lines = [
        json.dumps(ALPACA[0]),
        '{"instruction": "broken"',
        json.dumps({"instruction": "i"}),
        json.dumps({"question": "q", "answer": "a"}),
        "[]",
        json.dumps({"instruction": "i", "output": ""}),
        json.dumps(ALPACA[1]),
    ]
    path.write_text("\n".join(lines) + "\n")
    loaded = load_training_data(path, skip_invalid=True)
    assert (len(loaded), loaded.records_read, loaded.records_dropped) == (2, 7, 5)
    assert loaded.dropped == {
        "invalid JSON": 1,
        "missing field": 1,
        "mixed formats": 1,
        "not an object": 1,
        "empty field": 1,
    }
    assert loaded.drop_examples["missing field"].startswith("line 3: missing field 'output'")


def test_skip_invalid_with_nothing_valid_says_why(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "i"}, {"foo": 1}])
    message = error_for(path, skip_invalid=True)
    assert "no valid training records: 1 missing field (e.g. line 1" in message


def test_jsonl_is_streamed_not_held_in_memory(tmp_path: Path) -> None:
    """Python-side allocations stay far below the file size while loading a 24 MB JSONL."""
    path = tmp_path / "big.jsonl"
    answer = "x" * 1000
    with path.open("w") as handle:
        for i in range(24_000):
            handle.write(json.dumps({"instruction": f"task {i}", "output": answer}) + "\n")
    size = path.stat().st_size
    tracemalloc.start()
    try:
        loaded = load_training_data(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(loaded) == 24_000
    assert peak < size / 4, f"peak {peak} bytes of Python objects for a {size} byte file"
