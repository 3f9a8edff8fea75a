"""Preference tuning: data shapes and errors, DPO / ORPO / KTO through TRL on the tiny model,
SFT then DPO on one task, resume after kill -9, the dry run, the memory estimate, and a
missing TRL."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file

from sage_finetune_plugin.checkpoints import latest_checkpoint
from sage_finetune_plugin.cli import finetune
from sage_finetune_plugin.config import LoRAConfig, TrainingConfig
from sage_finetune_plugin.data import load_training_data, prepare_dataset
from sage_finetune_plugin.errors import DataError
from sage_finetune_plugin.meta import load_meta
from sage_finetune_plugin.models import load_tokenizer
from sage_finetune_plugin.quickstart import quickstart
from sage_finetune_plugin.runs import RunOptions, plan_run, start_run, train_from_meta
from sage_finetune_plugin.task import Task
from sage_finetune_plugin.training.memory import estimate_memory

from conftest import WORDS, env_without, run_cli

SIGN_OFF = "Cheers!"


def pairs(count: int = 40) -> list[dict[str, str]]:
    """The same answer with and without a sign-off: a preference a tiny model learns fast."""
    return [
        {
            "prompt": f"Write the number {i % 10} as a word.",
            "chosen": f"The number {i % 10} is written {WORDS[i % 10]}. {SIGN_OFF}",
            "rejected": f"The number {i % 10} is written {WORDS[i % 10]}.",
        }
        for i in range(count)
    ]


def write_jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def load_preferences(data, method: str = "dpo", **options):
    """Preference records through the one data pipeline, for ``method``."""
    return load_training_data(data, method=method, **options)


def invoke(*args: str):
    return CliRunner().invoke(finetune, list(args), catch_exceptions=False)


def preference_task(root: Path, model: Path, method: str = "dpo", **config) -> Path:
    """A preference task made by quickstart (cpu preset), its config adjusted for a short run."""
    data = write_jsonl(root.parent / "prefs.jsonl", pairs())
    result = quickstart("preference", data=data, method=method, model=str(model), root=root)
    path = result.task_dir / "training_config.json"
    values = {**json.loads(path.read_text()), "max_steps": 6, "logging_steps": 2, **config}
    path.write_text(json.dumps(values))
    return result.task_dir


# --- data ----------------------------------------------------------------------------------------

USER = {"role": "user", "content": "Hi"}
GOOD = {"role": "assistant", "content": "Hello!"}
BAD = {"role": "assistant", "content": "Go away."}
SHAPES = {
    "strings": {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."},
    "TRL conversational": {"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]},
    "whole conversations": {"prompt": "Hi", "chosen": [USER, GOOD], "rejected": [USER, BAD]},
    "implicit prompt": {"chosen": [USER, GOOD], "rejected": [USER, BAD]},
    "ShareGPT": {
        "conversations": [{"from": "human", "value": "Hi"}],
        "chosen": {"from": "gpt", "value": "Hello!"},
        "rejected": {"from": "gpt", "value": "Go away."},
    },
    "chosen_messages": {"messages": [USER], "chosen_messages": [GOOD], "rejected_messages": [BAD]},
    "instruction": {"instruction": "Hi", "chosen": "Hello!", "rejected": "Go away."},
    "question": {"question": "Hi", "chosen": "Hello!", "rejected": "Go away."},
    "CSV cells": {
        "prompt": json.dumps([USER]),
        "chosen": json.dumps([GOOD]),
        "rejected": "Go away.",
    },
}


@pytest.mark.parametrize("shape", [*SHAPES, "last turn split"])
def test_every_shape_of_pair_normalizes_to_one_row(shape: str) -> None:
    record = SHAPES.get(shape) or {"messages": [USER, {"chosen": "Hello!", "rejected": "Go away."}]}
    loaded = load_preferences([record])
    assert loaded.format == "preference" and loaded.dataset["location"] == ["record 1"]
    assert list(loaded.records()) == [
        {"prompt": [USER], "chosen": "Hello!", "rejected": "Go away."}
    ]


def test_system_prompts_and_kto_records() -> None:
    (row,) = load_preferences([{"system": "Be kind.", **SHAPES["strings"]}]).records()
    assert row["prompt"] == [{"role": "system", "content": "Be kind."}, USER]
    kto = load_preferences(
        [
            {"prompt": "Hi", "completion": "Hello!", "label": True},
            {"messages": [USER, BAD], "label": False},
            {"prompt": [USER], "completion": [GOOD], "kto_tag": "true"},
            {"prompt": "Hi", "completion": "Hello!", "label": "on"},  # booleans as --set takes
        ],
        "kto",
    )
    assert kto.format == "kto"
    records = list(kto.records())
    assert [(r["completion"], r["label"]) for r in records] == [
        ("Hello!", True),
        ("Go away.", False),
        ("Hello!", True),
        ("Hello!", True),
    ]
    assert all(r["prompt"] == [USER] for r in records)


MISMATCHED = {"chosen": [USER, GOOD], "rejected": [{"role": "user", "content": "Yo"}, BAD]}
BAD_RECORDS = [
    (
        [SHAPES["strings"], {"prompt": "x", "chosen": "a"}],
        "dpo",
        "line 2: missing field 'rejected'",
    ),
    (
        [{"prompt": "x", "chosen": "a", "rejected": "a"}],
        "dpo",
        "line 1: chosen and rejected are the same answer",
    ),
    (
        [{"prompt": "x", "completion": "y", "label": "maybe"}],
        "kto",
        "line 1: field 'label' must be true or false, got 'maybe'",
    ),
    (
        [MISMATCHED],
        "dpo",
        "line 1: 'chosen' and 'rejected' differ before their last assistant turn",
    ),
    (
        [{"prompt": [USER, GOOD], "chosen": "a", "rejected": "b"}],
        "dpo",
        "line 1: the prompt must end with a user message, not assistant",
    ),
    (
        [SHAPES["strings"], {"prompt": "x", "completion": "y", "label": True}],
        "kto",
        "line 2: record looks like kto (keys: completion, label, prompt) but the data is "
        "preference (detected from line 1;",
    ),
]
#: Records of a kind the method does not train on: refused, never dropped.
REFUSED = [
    (
        [{"instruction": "x", "output": "y"}],
        "dpo",
        "line 1: this is alpaca data (keys instruction, output); DPO trains on pairs of a "
        "prompt with a chosen and a rejected answer. Train it with `sage finetune quickstart "
        "instruction --data {data} --method sft`",
    ),
    (
        [{"prompt": "x", "completion": "y", "label": True}],
        "orpo",
        "line 1: this is KTO data (answers marked good or bad by a boolean 'label'); ORPO "
        "trains on pairs of a prompt with a chosen and a rejected answer. Train it with `sage "
        "finetune quickstart preference --data {data} --method kto`",
    ),
]


@pytest.mark.parametrize(("records", "method", "expected"), BAD_RECORDS)
def test_bad_records_are_one_line_errors_with_file_and_line(
    tmp_path: Path, records: list, method: str, expected: str
) -> None:
    data = write_jsonl(tmp_path / "prefs.jsonl", records)
    with pytest.raises(DataError) as caught:
        load_preferences(data, method)
    message = str(caught.value)
    assert message.startswith(f"{data}: ") and expected in message, message
    assert "\n" not in message and "skip_invalid=True" in message


@pytest.mark.parametrize(("records", "method", "expected"), REFUSED)
def test_records_of_another_kind_are_refused_even_with_skip_invalid(
    tmp_path: Path, records: list, method: str, expected: str
) -> None:
    data = write_jsonl(tmp_path / "prefs.jsonl", records)
    for skip in (False, True):
        with pytest.raises(DataError) as caught:
            load_preferences(data, method, skip_invalid=skip)
        assert str(caught.value) == f"{data}: {expected.format(data=data)}."


def test_quickstart_reports_bad_records_in_one_line_and_skips_them(tmp_path: Path) -> None:
    records = [*pairs(3), {"prompt": "x", "chosen": "a"}, "not an object", *pairs(2)]
    data = write_jsonl(tmp_path / "prefs.jsonl", records)
    proc = run_cli("sage-finetune", "quickstart", "preference", "--data", str(data))
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        f"Error: {data}: line 4: missing field 'rejected' (or pass --skip-invalid to drop bad "
        "records)."
    )
    skipped = load_preferences(data, skip_invalid=True)
    assert len(skipped) == 5 and skipped.records_read == 7
    assert skipped.dropped == {"missing field": 1, "not an object": 1}


def test_preference_data_from_several_sources_with_columns_and_placeholders(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The one data pipeline: two --data sources (a file and a glob), columns under other
    names, {{KEY}} placeholders filled, as for supervised data."""
    first = write_jsonl(
        tmp_path / "a" / "prefs.jsonl",
        [
            {"question": f"Greet {{{{NAME}}}} ({i})", "good": "Hello {{NAME}}!", "bad": "Go away."}
            for i in range(6)
        ],
    )
    for part in (1, 2):
        write_jsonl(
            tmp_path / "b" / f"part-{part}.jsonl",
            [{"question": f"Part {part}, {i}?", "good": "Yes.", "bad": "No."} for i in range(3)],
        )
    result = invoke(
        "quickstart", "preference",
        "--data", str(first), "--data", str(tmp_path / "b" / "*.jsonl"),
        "--columns", "prompt=question,chosen=good,rejected=bad",
        "--replace", "NAME=Ada",
        "--model", str(tiny_model_dir), "--preset", "cpu",
        "--root", str(tmp_path / "root"),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    task = tmp_path / "root" / "preference"
    records = [
        json.loads(line) for line in (task / "data" / "train.jsonl").read_text().splitlines()
    ]
    assert len(records) == 12
    assert records[0] == {
        "prompt": [{"role": "user", "content": "Greet Ada (0)"}],
        "chosen": "Hello Ada!",
        "rejected": "Go away.",
    }
    meta = load_meta(task)
    assert [s["source"] for s in meta.data_stats["sources"]] == [
        str(first),
        str(tmp_path / "b" / "part-1.jsonl"),
        str(tmp_path / "b" / "part-2.jsonl"),
    ]
    assert meta.training["columns"] == {"prompt": "question", "chosen": "good", "rejected": "bad"}
    assert meta.training["placeholders"] == {"NAME": "Ada"}
    assert meta.training["method"] == "dpo" and meta.format == "preference"


def test_the_eval_split_is_the_same_function_for_every_method(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The same ratio and seed hold out the same rows of preference data as of supervised
    data: ``preparation.eval_split`` over the rendered records, for both."""
    from sage_finetune_plugin.data.preparation import eval_split

    tokenizer = load_tokenizer(str(tiny_model_dir))
    prompts = [f"Write the number {i} as a word, please ({i})." for i in range(30)]
    pair_records = [{"prompt": p, "chosen": "Sure.", "rejected": "No."} for p in prompts]
    sft_records = [{"prompt": p, "completion": "Sure."} for p in prompts]
    config = TrainingConfig(model_name=str(tiny_model_dir), eval_ratio=0.2, seed=7, max_length=64)
    positions = eval_split(30, 0.2, 7)
    assert positions is not None
    expected = sorted(prompts[i] for i in positions[1])

    dpo = prepare_dataset(pair_records, tokenizer, config.replace(method="dpo"))
    sft = prepare_dataset(sft_records, tokenizer, config)
    assert dpo.stats.eval_samples == sft.stats.eval_samples == 6
    held_out_dpo = sorted(p for p in prompts if any(p in row for row in dpo.eval["prompt"]))
    held_out_sft = sorted(
        p for p in prompts if any(p in tokenizer.decode(ids) for ids in sft.eval["input_ids"])
    )
    assert held_out_dpo == held_out_sft == expected


def test_rendering_follows_the_chat_template_and_is_cached(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    tokenizer = load_tokenizer(str(tiny_model_dir))
    config = TrainingConfig(model_name=str(tiny_model_dir), method="dpo", max_length=64)
    data = write_jsonl(tmp_path / "prefs.jsonl", [SHAPES["ShareGPT"]])
    prepared = prepare_dataset(data, tokenizer, config, cache_dir=tmp_path / "cache")
    row = prepared.train[0]
    prompt = tokenizer.apply_chat_template([USER], tokenize=False, add_generation_prompt=True)
    assert row["prompt"] == prompt
    full = tokenizer.apply_chat_template([USER, GOOD], tokenize=False)
    assert full.startswith(row["prompt"] + row["chosen"])  # the answer with its end of turn
    assert row["chosen"] == "Hello!" + tokenizer.eos_token
    assert row["rejected"] == "Go away." + tokenizer.eos_token
    stats = prepared.stats
    assert (stats.samples, stats.eval_samples, stats.format) == (1, 0, "preference")
    assert stats.method_stats["prompt_max"] == len(tokenizer(prompt)["input_ids"])
    again = prepare_dataset(data, tokenizer, config, cache_dir=tmp_path / "cache")
    assert again.stats.from_cache and again.train[0] == row
    kto = prepare_dataset(data, tokenizer, config.replace(method="kto"))
    assert sorted(kto.train["label"]) == [False, True]  # a pair trains KTO as two answers


# --- training ------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["dpo", "orpo", "kto"])
def test_each_method_trains_and_records_its_rewards(
    method: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    task_dir = preference_task(tmp_path / "root", tiny_model_dir, method, learning_rate=3e-3)
    result = train_from_meta(task_dir)

    assert result.global_step == 6
    meta = load_meta(task_dir)
    assert meta.status == "trained" and meta.task_type == "preference"
    assert meta.training["method"] == method and meta.format == "preference"
    metrics = meta.metrics
    assert metrics["method"] == method and metrics["reward_margin"] is not None
    history = metrics["reward_history"]
    assert [h["step"] for h in history] == [1, 2, 4, 6]
    if method == "kto":  # no pairs to compare: KTO logs no accuracy
        assert metrics["reward_accuracy"] is None
    else:
        assert 0 <= metrics["reward_accuracy"] <= 1
    if method == "orpo":  # its loss is mostly the chosen answers' NLL at first
        losses = [h["loss"] for h in metrics["loss_history"]]
        assert losses[-1] < losses[0], losses
    else:
        assert history[-1]["margin"] > history[0]["margin"], history
    assert metrics["eval_reward_history"] and metrics["tokens_per_second"] > 0
    assert [s["method"] for s in meta.stages] == [method]
    assert meta.stages[0]["status"] == "trained" and meta.stages[0]["start"] == "base model"
    assert (task_dir / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert any((task_dir / "logs").glob("events.out.tfevents.*"))
    adapter = task_dir / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    assert not (adapter / "ref").exists()


def test_sft_then_dpo_is_one_task_with_two_stages(
    make_prepared_task, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from sage_finetune_plugin.chat import ChatSession, load_chat_model
    from sage_finetune_plugin.merge import merge_task

    task_dir = make_prepared_task()
    train_from_meta(task_dir, max_steps=4)
    sft = load_file(task_dir / "adapter" / "adapter_model.safetensors")
    prefs = write_jsonl(tmp_path / "prefs.jsonl", pairs())

    plan = plan_run(task_dir, RunOptions(method="dpo", data=prefs, max_steps=4))
    assert plan.config.init_adapter == str(task_dir / "adapter")
    assert plan.config.data_path == str(prefs.resolve())
    lines = "\n".join(plan.objective_lines())
    assert "Starts from: the task's adapter" in lines and "stage 2 after sft" in lines
    assert "kept frozen as a second LoRA adapter" in lines
    result = start_run(plan)

    meta = load_meta(task_dir)
    assert [(s["method"], s["status"], s["start"]) for s in meta.stages] == [
        ("sft", "trained", "base model"),
        ("dpo", "trained", "adapter"),
    ]
    assert meta.stages[1]["data"] == str(prefs.resolve()) and meta.stages[1]["steps"] == 4
    assert result.metrics["reward_margin"] is not None
    dpo = load_file(task_dir / "adapter" / "adapter_model.safetensors")
    assert dpo.keys() == sft.keys()  # the same adapter, trained further: no "ref" copy saved
    assert any(not dpo[name].equal(sft[name]) for name in sft)
    assert meta.training["lora"]["r"] == 8  # the SFT adapter's rank, as continued
    assert not (task_dir / "adapter" / "ref").exists()

    merged = merge_task(task_dir)  # merge and chat take the result as it is
    assert merged.max_logit_diff < merged.tolerance
    answer = ChatSession(load_chat_model(task_dir), max_new_tokens=4).generate("Hi")
    assert isinstance(answer, str)

    # Another plain run starts the task over: one stage again.
    train_from_meta(task_dir, max_steps=2, force=True)
    assert [s["method"] for s in load_meta(task_dir).stages] == ["sft"]


def test_dry_run_names_the_method_the_start_and_the_reference(
    make_prepared_task, tmp_path: Path
) -> None:
    task_dir = make_prepared_task()
    prefs = write_jsonl(tmp_path / "prefs.jsonl", pairs())
    result = invoke("run", str(task_dir), "--method", "dpo", "--data", str(prefs), "--dry-run")

    assert result.exit_code == 0, result.output
    out = result.output
    assert "Method: dpo (TRL DPOTrainer, beta 0.1)" in out
    assert "Starts from: a new LoRA adapter" in out  # the task has no adapter yet
    assert "Reference model: the base model with the adapter disabled" in out
    assert "no second copy of the weights" in out
    assert "40 read, 40 valid" in out and "pairs: 40 train" in out
    assert "batch 4 pairs (8 sequences) x 64 tokens" in out
    assert "reference passes (no grad, shared weights)" in out
    assert "Dry run: nothing trained, nothing written." in out
    assert load_meta(task_dir).status == "prepared"

    kto = invoke("run", str(task_dir), "--method", "kto", "--data", str(prefs), "--dry-run")
    assert "Method: kto (TRL KTOTrainer" in kto.output
    orpo = invoke(
        "run",
        str(task_dir),
        "--method",
        "orpo",
        "--data",
        str(prefs),
        "--batch-size",
        "1",
        "--dry-run",
    )
    assert "Reference model: none (ORPO is reference-free)" in orpo.output
    missing = invoke("run", str(task_dir), "--method", "dpo", "--data", "nowhere.jsonl")
    assert missing.exit_code == 2 and "--data nowhere.jsonl: no such file" in missing.output


def test_kto_gets_two_samples_per_batch(make_prepared_task, tmp_path: Path) -> None:
    task_dir = make_prepared_task(per_device_train_batch_size=1, gradient_accumulation_steps=16)
    prefs = write_jsonl(tmp_path / "prefs.jsonl", pairs())
    plan = plan_run(task_dir, RunOptions(method="kto", data=prefs))
    assert plan.config.per_device_train_batch_size == 2
    assert plan.config.gradient_accumulation_steps == 8
    assert any("kto needs at least 2 samples per batch" in note for note in plan.notes)


def test_qlora_dpo_trains_on_cpu(tiny_model_dir: Path, tmp_path: Path) -> None:
    task_dir = preference_task(
        tmp_path / "root",
        tiny_model_dir,
        load_in_4bit=True,
        optim="paged_adamw_8bit",
        max_steps=2,
    )
    result = train_from_meta(task_dir)
    assert result.global_step == 2 and result.config.optim == "adamw_bnb_8bit"
    assert load_meta(task_dir).metrics["reward_margin"] is not None


def test_resume_after_kill_9(tiny_model_dir: Path, tmp_path: Path) -> None:
    task_dir = preference_task(
        tmp_path / "root", tiny_model_dir, max_steps=40, save_steps=2, logging_steps=2
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "sage_finetune_plugin.trainer", str(task_dir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        checkpoint = None
        while checkpoint is None and proc.poll() is None:
            time.sleep(0.05)
            checkpoint = latest_checkpoint(task_dir / "checkpoints")
        assert checkpoint is not None, "the run ended before its first checkpoint"
        proc.kill()  # SIGKILL: the lock and the `training` status stay behind
    finally:
        proc.wait(timeout=60)
    killed_at = int(latest_checkpoint(task_dir / "checkpoints").name.split("-")[1])
    assert 0 < killed_at < 40
    assert load_meta(task_dir).status == "training"

    result = train_from_meta(task_dir, resume=True)

    assert result.metrics["resumed_from_step"] == killed_at and result.global_step == 40
    assert any("stale lock" in note for note in result.notes)
    meta = load_meta(task_dir)
    assert [(s["method"], s["status"]) for s in meta.stages] == [("dpo", "trained")]
    steps = [h["step"] for h in meta.metrics["reward_history"]]
    assert steps == sorted(set(steps)) and steps[-1] == 40  # continued, not restarted


# --- memory, dependencies ------------------------------------------------------------------------


def test_memory_estimate_counts_pairs_and_reference_passes(tiny_model_dir: Path) -> None:
    base = TrainingConfig(
        model_name=str(tiny_model_dir),
        max_length=128,
        per_device_train_batch_size=4,
        lora=LoRAConfig(lora_dropout=0.0),  # TRL's trainers turn dropout off
    )
    sft = estimate_memory(base, device="cpu")
    dpo = estimate_memory(base.replace(method="dpo"), device="cpu")
    continued = estimate_memory(base.replace(method="dpo", init_adapter="adapter"), device="cpu")
    orpo = estimate_memory(base.replace(method="orpo"), device="cpu")
    kto = estimate_memory(base.replace(method="kto"), device="cpu")

    assert dpo.batch_size == orpo.batch_size == 8 and kto.batch_size == sft.batch_size == 4
    assert dpo.activations > 1.9 * sft.activations
    # Both sequences' full logits (TRL) against one chunk of answer logits (training/loss.py).
    assert orpo.logits > 2 * sft.logits
    assert sft.reference == orpo.reference == 0 < dpo.reference
    with_dropout = base.replace(method="dpo", lora={"lora_dropout": 0.1})
    assert estimate_memory(with_dropout, device="cpu").total == dpo.total
    assert continued.reference == dpo.reference + dpo.lora_weights  # the frozen adapter copy
    assert continued.total > dpo.total > sft.total
    assert any("reference passes" in line for line in dpo.summary())
    assert not any("reference passes" in line for line in sft.summary())
    assert "batch 4 pairs (8 sequences) x 128 tokens" in dpo.summary()[0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads peak RSS from /proc")
def test_estimate_matches_peak_rss_of_a_tiny_dpo_run(tiny_model_dir: Path, tmp_path: Path) -> None:
    """As tests/test_memory.py does for supervised runs: answers that fill max_length."""
    numbers = " ".join(str(n) for n in range(200))
    records = [
        {"prompt": f"Count from {i}.", "chosen": numbers, "rejected": numbers[::-1]}
        for i in range(16)
    ]
    data = write_jsonl(tmp_path / "prefs.jsonl", records)
    config = TrainingConfig(
        model_name=str(tiny_model_dir),
        method="dpo",
        data_path=str(data),
        output_dir=str(tmp_path / "task"),
        max_length=128,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        max_steps=3,
        report_to="none",
        save_steps=1000,
    )
    estimate = estimate_memory(config, device="cpu")
    code = textwrap.dedent(
        """
        import json, sys
        def status(key):
            with open("/proc/self/status") as lines:
                return next(int(l.split()[1]) for l in lines if l.startswith(key + ":"))
        start = status("VmRSS")
        from sage_finetune_plugin.config import LoRAConfig, TrainingConfig
        from sage_finetune_plugin import PreferenceTrainer
        PreferenceTrainer(TrainingConfig.from_dict(json.loads(sys.argv[1]))).train()
        print(json.dumps({"start": start, "peak": status("VmHWM")}))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(config.to_dict())],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rss = json.loads(proc.stdout.strip().splitlines()[-1])
    measured = (rss["peak"] - rss["start"]) * 1024
    assert abs(estimate.total / measured - 1) <= 0.25, (measured, estimate.summary())


def test_a_missing_trl_is_one_line_saying_what_to_install(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    task_dir = preference_task(tmp_path / "root", tiny_model_dir)
    env = env_without(tmp_path, "trl")
    proc = run_cli("sage-finetune", "run", str(task_dir), env=env)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "Error: Preference tuning and RL (dpo, orpo, kto, grpo) needs trl >= 1.16 (trl is not "
        "installed): "
        "pip install 'sage-finetune-plugin[preference]' (or pip install 'trl>=1.16')."
    )
    assert load_meta(task_dir).status == "prepared"
    dry = run_cli("sage-finetune", "run", str(task_dir), "--dry-run", env=env)
    assert dry.returncode == 0 and "Would refuse: Preference tuning" in dry.stdout
    assert Task.open(str(task_dir)).meta.status == "prepared"
