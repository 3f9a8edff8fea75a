"""`chat`: the fine-tuned model answers through its chat template, streams, keeps history."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoTokenizer

from sage_finetune_plugin.chat import ChatSession, load_chat_model
from sage_finetune_plugin.cli import finetune
from sage_finetune_plugin.data import format_conversation_sample
from sage_finetune_plugin.errors import ModelError, TaskError
from sage_finetune_plugin.merge import merge_task
from sage_finetune_plugin.meta import TaskMeta, save_meta
from sage_finetune_plugin.templates import (
    FALLBACK_TEMPLATE,
    end_of_turn_id,
    ensure_chat_template,
    stop_token_ids,
)

from conftest import ANSWER, QUESTION, run_cli


@pytest.fixture(scope="module")
def tuned(trained_task_template: Path):
    """The fine-tuned model (base + adapter), loaded once for the session tests."""
    return load_chat_model(trained_task_template)


@pytest.fixture
def task(trained_task: Path) -> Path:
    return trained_task


def chat(task: Path, *args: str, input: str | None = None):
    result = CliRunner().invoke(
        finetune, ["chat", task.name, "--root", str(task.parent), *args], input=input
    )
    return result


def test_end_of_turn_comes_from_the_template(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_id(tokenizer) == im_end
    assert stop_token_ids(tokenizer) == [im_end]

    tokenizer.eos_token = "<|endoftext|>"  # a base-model tokenizer: EOS differs from end of turn
    assert stop_token_ids(tokenizer) == [tokenizer.convert_tokens_to_ids("<|endoftext|>"), im_end]

    tokenizer.chat_template = FALLBACK_TEMPLATE
    assert stop_token_ids(tokenizer) == [tokenizer.eos_token_id]


def test_fallback_template_renders_like_the_training_data(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = None
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": ANSWER},
    ]
    trained_on = format_conversation_sample({"messages": conversation}, tokenizer)

    ensure_chat_template(tokenizer)
    prompt = tokenizer.apply_chat_template(
        conversation[:-1], tokenize=False, add_generation_prompt=True
    )
    assert trained_on == prompt + ANSWER + tokenizer.eos_token
    assert tokenizer.apply_chat_template(conversation, tokenize=False).rstrip() == trained_on


def test_session_streams_the_answer_and_stops_at_end_of_turn(tuned) -> None:
    session = ChatSession(tuned, max_new_tokens=40)
    pieces: list[str] = []

    answer = session.generate(QUESTION, pieces.append)

    assert answer == ANSWER
    assert len(pieces) > 1 and "".join(pieces).strip() == ANSWER
    assert session.history == [
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": ANSWER},
    ]


def test_session_keeps_history_until_reset(tuned) -> None:
    session = ChatSession(tuned, max_new_tokens=5, system="Be brief.")
    first = session.generate(QUESTION)
    session.generate("And again?")
    assert [turn["role"] for turn in session.history] == ["user", "assistant"] * 2
    text = prompt_text(session, "third")
    assert "Be brief." in text and QUESTION in text and first in text

    session.reset()
    assert session.history == []
    text = prompt_text(session, "fourth")
    assert QUESTION not in text and "Be brief." in text and "fourth" in text


def prompt_text(session: ChatSession, user_text: str) -> str:
    """What the model would read for the next message."""
    inputs = session._encode([{"role": "user", "content": user_text}])
    return session.tokenizer.decode(inputs["input_ids"][0])


def test_oldest_turns_make_room_when_the_context_is_full(tuned) -> None:
    context = tuned.model.config.max_position_embeddings
    session = ChatSession(tuned, max_new_tokens=5)
    session.generate(QUESTION)
    alone = len(ChatSession(tuned)._encode([{"role": "user", "content": QUESTION}])["input_ids"][0])

    session.max_new_tokens = context - alone  # room for this message only, not the history
    assert prompt_text(session, QUESTION).count(QUESTION) == 1
    assert session.generate(QUESTION) == ANSWER
    session.max_new_tokens += 1
    with pytest.raises(ModelError, match="The message is too long"):
        session.generate(QUESTION)


def test_greedy_is_reproducible_and_temperature_samples(tuned) -> None:
    greedy = {ChatSession(tuned, max_new_tokens=12).generate("Tell me a story.") for _ in range(2)}
    assert len(greedy) == 1
    torch.manual_seed(0)
    sampled = {
        ChatSession(tuned, max_new_tokens=12, temperature=5.0).generate("Tell me a story.")
        for _ in range(3)
    }
    assert len(sampled) > 1


def test_prompt_prints_only_the_answer(task: Path) -> None:
    result = chat(task, "--prompt", QUESTION)
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{ANSWER}\n"
    assert "Applying the adapter" in result.stderr


def test_merged_model_is_preferred(task: Path) -> None:
    merge_task(task.name, root=task.parent)
    result = chat(task, "-p", QUESTION)
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{ANSWER}\n"
    assert f"Loading the merged model {task / 'merged'}" in result.stderr

    # An adapter trained again after the merge wins over the older merged model.
    adapter = task / "adapter" / "adapter_model.safetensors"
    later = (task / "merged" / "config.json").stat().st_mtime + 10
    os.utime(adapter, (later, later))
    result = chat(task, "-p", QUESTION)
    assert result.exit_code == 0 and result.stdout == f"{ANSWER}\n"
    assert "is older than the adapter; using base + adapter" in result.stderr
    os.utime(adapter, (later - 20, later - 20))

    # A merged folder that lost its weights falls back to base + adapter.
    for weights in (task / "merged").glob("*.safetensors"):
        weights.unlink()
    result = chat(task, "-p", QUESTION)
    assert result.exit_code == 0 and result.stdout == f"{ANSWER}\n"
    assert "missing or incomplete; using base + adapter" in result.stderr


def test_base_and_compare(task: Path) -> None:
    base = chat(task, "--base", "-p", QUESTION, "--max-new-tokens", "12")
    assert base.exit_code == 0, base.output
    assert base.stdout.strip() and ANSWER not in base.stdout

    compare = chat(task, "--compare", "-p", QUESTION, "--max-new-tokens", "12")
    assert compare.exit_code == 0, compare.output
    lines = compare.stdout.splitlines()
    assert lines == ["[base]", base.stdout.strip(), "", "[fine-tuned]", ANSWER]

    both = chat(task, "--base", "--compare", "-p", "hi")
    assert both.exit_code == 2 and "--base and --compare cannot be combined" in both.stderr


def test_multi_turn_session_with_reset(task: Path) -> None:
    result = chat(
        task, "--max-new-tokens", "6", input=f"{QUESTION}\n\n/reset\n{QUESTION}\nexit\nnever\n"
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [ANSWER, ANSWER]
    assert "History cleared." in result.stderr


def test_end_of_input_ends_the_session(task: Path) -> None:
    result = chat(task, input=f"{QUESTION}\n")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{ANSWER}\n"


def test_chat_reads_a_pipe_in_a_real_process(task: Path) -> None:
    proc = run_cli(
        "sage-finetune",
        "chat",
        task.name,
        "--root",
        str(task.parent),
        input=f"{QUESTION}\nquit\n",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{ANSWER}\n"


def test_errors_are_one_line(task: Path, tmp_path: Path, tiny_model_dir: Path) -> None:
    unknown = chat(task.parent / "nope", "-p", "hi")
    assert unknown.exit_code == 1
    assert unknown.stderr.startswith("Error: Task 'nope' not found") and _one_line(unknown)

    untrained = tmp_path / "root" / "fresh"
    save_meta(untrained, TaskMeta(model=str(tiny_model_dir), status="prepared"))
    result = chat(untrained, "-p", "hi")
    assert result.exit_code == 1 and _one_line(result)
    assert "has no trained model (status prepared" in result.stderr
    assert f"run `sage finetune run {untrained}` first" in result.stderr
    with pytest.raises(TaskError):
        load_chat_model(untrained)
    # The base model needs no training.
    assert chat(untrained, "--base", "-p", "hi", "--max-new-tokens", "3").exit_code == 0

    save_meta(untrained, TaskMeta(model=str(tmp_path / "gone"), status="prepared"))
    missing = chat(untrained, "--base", "-p", "hi")
    assert missing.exit_code == 1 and _one_line(missing)
    assert "does not exist" in missing.stderr

    shutil.rmtree(task / "adapter")
    result = chat(task, "-p", "hi")
    assert result.exit_code == 1 and "has no trained model" in result.stderr


def _one_line(result) -> bool:
    return len(result.stderr.strip().splitlines()) == 1
