"""Data in the shapes people download, written here in small files of our own content:
Anthropic hh-rlhf transcripts and conversational pairs with a shared start (TRL's implicit
prompt), TRL's conversational prompt/completion for SFT and for preference, OpenAI's chat
files with per-message ``weight`` and its preference files, tool records dropped by
--skip-invalid on a template without tools, a databricks-dolly-shaped file, and eval without
rouge-score."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from sage_finetune_plugin.cli import finetune
from sage_finetune_plugin.data import load_training_data, prepare_dataset, preview_samples
from sage_finetune_plugin.data.rendering import IGNORE_INDEX
from sage_finetune_plugin.errors import DataError
from sage_finetune_plugin.meta import load_meta
from sage_finetune_plugin.models import load_tokenizer
from sage_finetune_plugin.runs import train_from_meta

from conftest import WORDS, build_prepared_task, env_without, run_cli


def write_jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def invoke(*args: str):
    return CliRunner().invoke(finetune, list(args))


def quickstart(tmp_path: Path, model: Path, *args: str):
    return invoke(
        "quickstart", *args, "--model", str(model), "--preset", "cpu", "--root",
        str(tmp_path / "root"),
    )  # fmt: skip


def task_records(tmp_path: Path, name: str) -> list[dict]:
    lines = (tmp_path / "root" / name / "data" / "train.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def transcript(*turns: str) -> str:
    """An hh-rlhf transcript: alternating Human and Assistant turns."""
    roles = ("Human", "Assistant")
    return "".join(f"\n\n{roles[i % 2]}: {text}" for i, text in enumerate(turns))


# --- implicit prompts ----------------------------------------------------------------------------


def test_hh_rlhf_transcripts_share_their_prompt(tiny_model_dir: Path, tmp_path: Path) -> None:
    records = [
        {
            "chosen": transcript(f"Name a colour ({i}).", "Blue.", "And a number?", WORDS[i % 10]),
            "rejected": transcript(f"Name a colour ({i}).", "Blue.", "And a number?", "No."),
        }
        for i in range(12)
    ]
    data = write_jsonl(tmp_path / "hh.jsonl", records)
    result = quickstart(tmp_path, tiny_model_dir, "preference", "--data", str(data))
    assert result.exit_code == 0, result.output
    first = task_records(tmp_path, "preference")[0]
    assert first == {
        "prompt": [
            {"role": "user", "content": "Name a colour (0)."},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "And a number?"},
        ],
        "chosen": "zero",
        "rejected": "No.",
    }


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        (
            {"chosen": transcript("Hi", "Hello"), "rejected": transcript("Yo", "Go away")},
            "'chosen' and 'rejected' differ before their last assistant turn",
        ),
        (
            {
                "chosen": [{"role": "assistant", "content": "Hello"}],
                "rejected": [{"role": "assistant", "content": "Go away"}],
            },
            "'chosen' and 'rejected' share no turn and there is no prompt",
        ),
        (
            {
                "chosen": transcript("Hi", "Hello", "More?", "Yes"),
                "rejected": transcript("Hi", "Hey", "More?", "No"),
            },
            "differ before their last assistant turn",
        ),
    ],
)
def test_pairs_without_a_shared_prompt_are_refused_in_one_line(
    tmp_path: Path, record: dict, expected: str
) -> None:
    data = write_jsonl(tmp_path / "bad.jsonl", [record])
    with pytest.raises(DataError) as caught:
        load_training_data(data, method="dpo")
    message = str(caught.value)
    assert message.startswith(f"{data}: line 1: ") and expected in message
    assert "\n" not in message


def test_conversational_pairs_with_a_shared_start() -> None:
    user = {"role": "user", "content": "Hi"}
    (record,) = load_training_data(
        [
            {
                "chosen": [user, {"role": "assistant", "content": "Hello!"}],
                "rejected": [user, {"role": "assistant", "content": "Go away."}],
            }
        ],
        method="dpo",
    ).records()
    assert record == {"prompt": [user], "chosen": "Hello!", "rejected": "Go away."}


# --- TRL's conversational prompt/completion ----------------------------------------------------


def test_trl_conversational_prompt_completion_learns_the_completion_only(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    records = [
        {
            "prompt": [
                {"role": "user", "content": f"Count to {i % 10}."},
                {"role": "assistant", "content": "EARLIER-ANSWER"},
                {"role": "user", "content": "In words, please."},
            ],
            "completion": [{"role": "assistant", "content": f"Up to {WORDS[i % 10]}."}],
        }
        for i in range(10)
    ]
    data = write_jsonl(tmp_path / "pc.jsonl", records)
    result = quickstart(tmp_path, tiny_model_dir, "custom", "--data", str(data), "--preview", "1")
    assert result.exit_code == 0, result.output
    assert "format prompt_completion" in result.output
    assert task_records(tmp_path, "custom")[0] == records[0]  # written back as given

    tokenizer = load_tokenizer(str(tiny_model_dir))
    loaded = load_training_data(data)
    ((prompt, _), (answer, trained)) = preview_samples(loaded, tokenizer, 1)[0]
    assert "EARLIER-ANSWER" in prompt and "Up to zero." in answer and trained
    prepared = prepare_dataset(loaded, tokenizer, max_length=128)
    ids, labels = prepared.train[0]["input_ids"], prepared.train[0]["labels"]
    learned = tokenizer.decode(
        [t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]
    )
    assert "Up to" in learned and "EARLIER" not in learned


def test_trl_conversational_preference_is_read_as_pairs(tiny_model_dir: Path, tmp_path) -> None:
    user = {"role": "user", "content": "Say hi."}
    records = [
        {
            "prompt": [user],
            "chosen": [{"role": "assistant", "content": f"Hi there ({i})!"}],
            "rejected": [{"role": "assistant", "content": "No."}],
        }
        for i in range(8)
    ]
    data = write_jsonl(tmp_path / "trl.jsonl", records)
    result = quickstart(tmp_path, tiny_model_dir, "preference", "--data", str(data))
    assert result.exit_code == 0, result.output
    assert task_records(tmp_path, "preference")[3] == {
        "prompt": [user],
        "chosen": "Hi there (3)!",
        "rejected": "No.",
    }


# --- OpenAI's formats --------------------------------------------------------------------------


def weighted(i: int, first_weight: int = 0, second_weight: int = 1) -> dict:
    return {
        "messages": [
            {"role": "system", "content": "You count."},
            {"role": "user", "content": f"Start at {i % 10}."},
            {"role": "assistant", "content": "CONTEXT-ONLY", "weight": first_weight},
            {"role": "user", "content": "Now in words."},
            {"role": "assistant", "content": f"It is {WORDS[i % 10]}.", "weight": second_weight},
        ]
    }


def test_openai_weight_zero_turns_are_context_not_learned(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    data = write_jsonl(tmp_path / "openai.jsonl", [weighted(i) for i in range(10)])
    result = quickstart(tmp_path, tiny_model_dir, "chat", "--data", str(data), "--preview", "1")
    assert result.exit_code == 0, result.output
    preview = result.output.split("--- sample 1 ---", 1)[1]
    assert "[[" in preview and "CONTEXT-ONLY" in preview.split("]]")[0]  # inside the prompt part
    written = task_records(tmp_path, "chat")[0]["messages"]
    assert written[2]["weight"] == 0 and "weight" not in written[4]

    tokenizer = load_tokenizer(str(tiny_model_dir))
    prepared = prepare_dataset(data, tokenizer, max_length=128)
    ids, labels = prepared.train[0]["input_ids"], prepared.train[0]["labels"]
    learned = tokenizer.decode(
        [t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]
    )
    assert "It is zero." in learned and "CONTEXT" not in learned


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        (weighted(0, first_weight=2), "message 3: 'weight' must be 0 (not learned) or 1, got 2"),
        (weighted(0, 0, 0), "every assistant turn of 'messages' has weight 0: nothing to learn"),
    ],
)
def test_bad_weights_are_refused(tmp_path: Path, record: dict, expected: str) -> None:
    data = write_jsonl(tmp_path / "bad.jsonl", [record])
    with pytest.raises(DataError, match=re.escape(expected)):
        load_training_data(data)


def test_openai_preference_files(tiny_model_dir: Path, tmp_path: Path) -> None:
    records = [
        {
            "input": {
                "messages": [{"role": "user", "content": f"Greet number {i}."}],
                "tools": [],
                "parallel_tool_calls": True,
            },
            "preferred_output": [{"role": "assistant", "content": f"Hello, {WORDS[i % 10]}!"}],
            "non_preferred_output": [{"role": "assistant", "content": "Go away."}],
        }
        for i in range(8)
    ]
    data = write_jsonl(tmp_path / "openai_pref.jsonl", records)
    result = quickstart(tmp_path, tiny_model_dir, "preference", "--data", str(data))
    assert result.exit_code == 0, result.output
    assert task_records(tmp_path, "preference")[1] == {
        "prompt": [{"role": "user", "content": "Greet number 1."}],
        "chosen": "Hello, one!",
        "rejected": "Go away.",
    }


# --- records that cannot be trained as they mean, and hints ----------------------------------


TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]


def tool_mix() -> list[dict]:
    plain = [
        {
            "messages": [
                {"role": "user", "content": f"Write {i % 10} as a word."},
                {"role": "assistant", "content": f"It is {WORDS[i % 10]}."},
            ]
        }
        for i in range(9)
    ]
    calls = [
        {
            "messages": [
                {"role": "user", "content": "Add 2 and 3."},
                {"role": "assistant", "content": "5"},
            ],
            "tools": TOOLS,
        }
        for _ in range(3)
    ]
    return plain[:3] + calls + plain[3:]


def test_tool_records_are_dropped_by_skip_invalid_and_counted(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    data = write_jsonl(tmp_path / "tools.jsonl", tool_mix())
    refused = quickstart(tmp_path, tiny_model_dir, "chat", "--data", str(data))
    assert refused.exit_code == 1
    assert "has no tool support" in refused.output and "--skip-invalid" in refused.output

    result = quickstart(tmp_path, tiny_model_dir, "chat", "--data", str(data), "--skip-invalid")
    assert result.exit_code == 0, result.output
    assert "12 read, 9 valid, 3 invalid" in result.output
    assert "invalid 3: tools the chat template cannot show" in result.output
    task = tmp_path / "root" / "chat"
    stats = load_meta(task).data_stats
    assert stats["dropped"] == {"tools the chat template cannot show": 3}
    assert stats["samples"] + stats["eval_samples"] == 9
    trained = train_from_meta(task, max_steps=2, report_to="none")  # `run` drops them alike
    assert trained.global_step == 2


def test_a_dolly_shaped_file_is_told_the_columns_that_read_it(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    records = [
        {
            "instruction": f"Summarise note {i}.",
            "context": f"Note {i} says the number is {WORDS[i % 10]}.",
            "response": f"The number is {WORDS[i % 10]}.",
            "category": "summarization",
        }
        for i in range(8)
    ]
    data = write_jsonl(tmp_path / "dolly.jsonl", records)
    refused = quickstart(tmp_path, tiny_model_dir, "instruction", "--data", str(data))
    assert refused.exit_code == 1
    assert (
        "line 1: missing field 'output'; the record has 'response', 'context': read them with "
        "--columns output=response,input=context" in refused.output
    )
    fixed = quickstart(
        tmp_path, tiny_model_dir, "instruction", "--data", str(data),
        "--columns", "output=response,input=context",
    )  # fmt: skip
    assert fixed.exit_code == 0, fixed.output
    assert task_records(tmp_path, "instruction")[0]["input"] == "Note 0 says the number is zero."
    with pytest.raises(DataError, match=r"columns=\{'output': 'response', 'input': 'context'\}"):
        load_training_data(data)  # Python callers: the API's words


# --- eval on the plain install --------------------------------------------------------------------


def test_eval_without_rouge_score_reports_the_rest_and_names_the_extra(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    task = build_prepared_task(tmp_path / "root", tiny_model_dir, "demo", eval_ratio=0.25)
    train_from_meta(task, max_steps=4)
    env = env_without(tmp_path, "rouge_score")
    proc = run_cli(
        "sage-finetune", "eval", "demo", "--root", str(task.parent), "--max-samples", "3", env=env
    )
    assert proc.returncode == 0, proc.stderr
    rows = {line.split("  ")[0]: line for line in proc.stdout.splitlines()}
    assert "ROUGE-L" in rows and rows["ROUGE-L"].split()[1:3] == ["-", "-"]
    assert any(char.isdigit() for char in rows["token F1"])
    assert "pip install 'sage-finetune-plugin[eval]'" in proc.stdout
    evaluation = load_meta(task).eval
    assert evaluation["metric"] == "token_f1" and evaluation["tuned"]["token_f1"] is not None
    report = json.loads((task / "eval" / "report.json").read_text())
    assert report["tuned"]["rouge_l"] is None and report["notes"]
