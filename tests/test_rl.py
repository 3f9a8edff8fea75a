"""Reinforcement learning (GRPO) and the preference losses: the built-in rewards, the code
reward's sandbox, the user's reward files and their one-line errors, GRPO through TRL on the
tiny model (quickstart rl, run, the meta, list, the dry run, the memory estimate), code
prompts with doctests, and pref_loss (SimPO through TRL's CPO, a wrong loss type)."""

from __future__ import annotations

import json
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_preference import pairs, write_jsonl

from sage_finetune_plugin.cli import finetune
from sage_finetune_plugin.config import TrainingConfig
from sage_finetune_plugin.errors import RewardError
from sage_finetune_plugin.meta import load_meta
from sage_finetune_plugin.quickstart import quickstart
from sage_finetune_plugin.rewards import load_rewards
from sage_finetune_plugin.rewards.sandbox import run_code
from sage_finetune_plugin.runs import train_from_meta
from sage_finetune_plugin.training.memory import estimate_memory

CAPITALS = {
    "France": "Paris",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Japan": "Tokyo",
    "Peru": "Lima",
    "Kenya": "Nairobi",
    "Egypt": "Cairo",
    "Norway": "Oslo",
}
#: A short run: 2 completions of up to 8 tokens per prompt, one prompt per step.
SHORT = {
    "grpo_num_generations": 2,
    "grpo_max_completion_length": 8,
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 1,
    "max_steps": 2,
    "logging_steps": 1,
    "learning_rate": 1e-3,
}


def prompts() -> list[dict[str, str]]:
    return [
        {"prompt": f"What is the capital of {country}?", "answer": city}
        for country, city in CAPITALS.items()
    ]


def reward_file(folder: Path, body: str, name: str = "rewards.py") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(body))
    return path


SHORT_REWARD = """
def brevity(prompts, completions, answer, **kwargs):
    return [1.0 if len(c) < 20 else 0.0 for c in completions]
"""


def invoke(*args: str):
    return CliRunner().invoke(finetune, list(args), catch_exceptions=False)


def rl_task(root: Path, model: Path, rewards: list[str], **config) -> Path:
    data = write_jsonl(root.parent / "prompts.jsonl", prompts())
    result = quickstart("rl", data=data, model=str(model), root=root, settings={"rewards": rewards})
    path = result.task_dir / "training_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **SHORT, **config}))
    return result.task_dir


# --- the built-in rewards ---------------------------------------------------------------------


def score(spec: str, completions: list[str], **columns) -> list[float]:
    (reward,) = load_rewards([spec])
    encoded = [json.dumps({k: v[i] for k, v in columns.items()}) for i in range(len(completions))]
    locations = [f"line {i + 1}" for i in range(len(completions))]
    return reward(["p"] * len(completions), completions, columns=encoded, location=locations)


def test_the_built_in_rewards() -> None:
    answer = ["Paris", "Paris"]
    assert score("builtin:exact", [" paris.", "Lyon"], answer=answer) == [1.0, 0.0]
    assert score("builtin:exact=city", ["Rome", "x"], city=["Rome", "y"]) == [1.0, 0.0]
    f1 = score("builtin:f1", ["It is Paris", "Lyon"], answer=answer)
    assert 0 < f1[0] < 1 and f1[1] == 0
    assert score("builtin:regex=Cheers!$", ["ok. Cheers!", "Cheers! ok"]) == [1.0, 0.0]
    assert score("builtin:regex=a,b=c", ["xa,b=cx", "ab"]) == [1.0, 0.0]  # = and , in it
    assert score("builtin:length=3-5", ["abcd", "a", "a" * 20]) == [1.0, pytest.approx(1 / 3), 0.0]
    assert score("builtin:json", ['{"a": 1}', "```json\n[1]\n```", "{nope"]) == [1.0, 1.0, 0.0]
    assert score("builtin:json_keys=a,b", ['{"a": 1}', '{"a": 1, "b": 2}', "[]"]) == [
        0.5,
        1.0,
        0.0,
    ]
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {
        "type": "object", "required": ["city"]}}}]  # fmt: skip
    calls = [
        '<tool_call>{"name": "weather", "arguments": {"city": "Oslo"}}</tool_call>',
        '{"name": "weather", "arguments": {}}',
        '{"name": "stocks", "arguments": {"city": "Oslo"}}',
    ]
    assert score("builtin:tool_call", calls, tools=[tools] * 3) == [1.0, 0.5, 0.0]
    code = ["```python\ndef f():\n    return 1\n```", "def f(:", ""]
    assert score("builtin:code_parses", code) == [1.0, 0.0, 0.0]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("builtin:nope", "Unknown built-in reward 'builtin:nope': choose one of builtin:exact"),
        ("builtin:regex", "builtin:regex needs a pattern: builtin:regex=..."),
        ("builtin:regex=(", "builtin:regex: invalid pattern '('"),
        ("builtin:json=x", "builtin:json takes no argument"),
        ("builtin:length=9-3", "builtin:length takes MIN-MAX characters"),
        ("nothing", "is neither builtin:NAME[=ARGUMENT] nor FILE.py:FUNCTION"),
    ],
)
def test_a_bad_built_in_is_one_line(spec: str, message: str) -> None:
    with pytest.raises(RewardError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_rewards([spec])


def test_a_reference_column_that_the_prompts_lack_is_named() -> None:
    with pytest.raises(RewardError, match="column 'answer', which the prompts do not have"):
        score("builtin:exact", ["x"], city=["y"])


# --- the code reward: a child process with limits -------------------------------------------


def test_code_tests_run_in_a_limited_child_process() -> None:
    assert run_code("def f(x):\n    return x + 1\n", "assert f(1) == 2").passed
    assert not run_code("def f(x):\n    return x\n", "assert f(1) == 2").passed
    started = time.monotonic()
    looping = run_code("while True:\n    pass\n", "", timeout=2)
    assert looping.timed_out and not looping.passed
    assert time.monotonic() - started < 30  # killed: the test goes on
    exiting = run_code("import os\nos._exit(0)\n", "assert False")  # exits before the tests
    assert not exiting.passed and exiting.returncode == 0
    network = run_code("import socket\nsocket.create_connection(('127.0.0.1', 9))\n", "")
    assert not network.passed and "socket" in network.output and "not allowed" in network.output
    spawning = run_code("import subprocess\nsubprocess.run(['true'])\n", "")
    assert not spawning.passed and "subprocess.Popen is not allowed" in spawning.output
    writing = run_code(f"open({str(Path.home() / 'x.txt')!r}, 'w')\n", "")
    assert not writing.passed and "not allowed" in writing.output
    assert run_code("open('here.txt', 'w').write('ok')\n", "").passed  # its own folder
    memory = run_code("x = bytearray(4 << 30)\n", "", memory=512 << 20)
    assert not memory.passed and "MemoryError" in memory.output


def test_the_code_tests_reward_scores_in_child_processes() -> None:
    completions = [
        "Here:\n```python\ndef double(x):\n    return 2 * x\n```",
        "```python\ndef double(x):\n    while True:\n        pass\n```",
        "```python\nimport os\nos._exit(0)\n```",
    ]
    tests = ["assert double(3) == 6"] * 3
    (reward,) = load_rewards(["builtin:code_tests"])
    encoded = [json.dumps({"tests": t}) for t in tests]
    started = time.monotonic()
    result = reward(["p"] * 3, completions, columns=encoded, location=["a", "b", "c"])
    assert result == [1.0, 0.0, 0.0]
    assert time.monotonic() - started < 60


# --- the user's rewards ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("def other(prompts, completions, **kw):\n    return []\n", "has no function 'score'"),
        ("def score(prompts, completions:\n", "does not import at line 1: SyntaxError"),
        ("import no_such_module_xyz\n", "does not import: ModuleNotFoundError"),
        ("score = 3\n", "score is not a function"),
    ],
)
def test_a_reward_file_that_cannot_be_used_stops_quickstart_in_one_line(
    body: str, message: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    data = write_jsonl(tmp_path / "prompts.jsonl", prompts())
    reward_file(tmp_path, body)
    root = tmp_path / "root"
    result = invoke(
        "quickstart", "rl", "--data", str(data), "--reward", f"{tmp_path}/rewards.py:score",
        "--model", str(tiny_model_dir), "--root", str(root),
    )  # fmt: skip
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("Error: Reward rewards.py:score") and message in lines[-1]
    assert not root.exists() or not any(root.iterdir())  # no task, not even half of one


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            "def score(prompts, completions, answer, **kw):\n"
            "    raise KeyError(answer[0] + ' is missing')\n",
            "Reward rewards.py:score raised KeyError: ",
        ),
        (
            "def score(prompts, completions, **kw):\n    return [1.0]\n",
            "Reward rewards.py:score returned 1 rewards for ",
        ),
        (
            "def score(prompts, completions, **kw):\n    return ['high'] * len(completions)\n",
            "Reward rewards.py:score returned 'high' for the completion of",
        ),
    ],
)
def test_a_reward_that_fails_stops_the_dry_run_and_the_run_in_one_line(
    body: str, message: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    path = reward_file(tmp_path, "def score(prompts, completions, **kw):\n    return []\n")
    task_dir = rl_task(tmp_path / "root", tiny_model_dir, [f"{path}:score"])
    path.write_text(body)  # it imports, but fails when called

    dry = invoke("run", str(task_dir), "--dry-run")
    assert dry.exit_code == 1 and message in dry.output.strip().splitlines()[-1]
    assert "data/train.jsonl: line " in dry.output.strip().splitlines()[-1]  # the record
    run = invoke("run", str(task_dir))
    assert run.exit_code == 1 and message in run.output.strip().splitlines()[-1]
    meta = load_meta(task_dir)
    assert meta.status == "failed" and not (task_dir / "adapter").exists()
    assert not (task_dir / "checkpoints").exists() or not any((task_dir / "checkpoints").iterdir())


# --- GRPO on the tiny model ------------------------------------------------------------------


def test_grpo_trains_with_a_reward_file_and_a_built_in(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    path = reward_file(tmp_path, SHORT_REWARD)
    data = write_jsonl(tmp_path / "prompts.jsonl", prompts())
    root = tmp_path / "root"
    made = invoke(
        "quickstart", "rl", "--data", str(data), "--reward", f"{path}:brevity",
        "--reward", "builtin:exact", "--reward-weights", "1,0.5", "--name", "capitals",
        "--model", str(tiny_model_dir), "--root", str(root),
    )  # fmt: skip
    assert made.exit_code == 0, made.output
    assert "format prompts, method grpo" in made.output
    task_dir = root / "capitals"
    config = TrainingConfig.load(task_dir / "training_config.json")
    assert config.rewards == [f"{path.resolve()}:brevity", "builtin:exact"]
    assert config.reward_weights == [1.0, 0.5]
    path_config = task_dir / "training_config.json"
    path_config.write_text(json.dumps({**json.loads(path_config.read_text()), **SHORT}))

    dry = invoke("run", "capitals", "--root", str(root), "--dry-run")
    assert dry.exit_code == 0, dry.output
    out = dry.output
    assert "Method: grpo (TRL GRPOTrainer, 2 completions per prompt of up to 8 tokens" in out
    assert "Rewards: rewards.py:brevity, builtin:exact x0.5" in out
    assert "Reference model: none (grpo_beta 0: no KL term)" in out
    assert "Rewards on 4 completions of the first prompts (untrained): brevity " in out
    assert "generation (2 completions, KV cache)" in out

    run = invoke("run", "capitals", "--root", str(root), "--set", "grpo_beta=0.04")
    assert run.exit_code == 0, run.output
    assert "Rewards (grpo): mean " in run.output and "(brevity " in run.output
    progress = [line for line in run.output.splitlines() if line.startswith("step 2/2  loss")]
    assert "reward " in progress[0] and "(brevity " in progress[0] and "kl " in progress[0]
    meta = load_meta(task_dir)
    metrics = meta.metrics
    assert meta.status == "trained" and metrics["method"] == "grpo"
    assert [h["step"] for h in metrics["reward_history"]] == [1, 2]
    assert set(metrics["rewards"]) == {"brevity", "exact"}
    assert metrics["reward"] is not None and metrics["completion_length"] > 0
    assert metrics["kl"] is not None  # grpo_beta > 0: the KL term against the base
    assert metrics["eval_reward_history"][0]["step"] == 0  # the held-out prompts, untrained
    assert meta.stages[0]["method"] == "grpo" and "reward" in meta.stages[0]
    assert (task_dir / "loss.png").read_bytes()[:4] == b"\x89PNG"
    adapter = task_dir / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and not (adapter / "ref").exists()

    evaluated = invoke("eval", "capitals", "--root", str(root))
    assert evaluated.exit_code == 0, evaluated.output
    assert "rewards of the answers to 1 prompts" in evaluated.output
    for row in ("mean reward (weighted)", "reward brevity", "reward exact"):
        assert row in evaluated.output
    report = json.loads((task_dir / "eval" / "report.json").read_text())
    assert set(report["tuned"]) >= {"reward", "reward/brevity", "reward/exact"}
    assert report["base"]["reward"] is not None and load_meta(task_dir).eval["metric"] == "reward"

    listing = invoke("list", "--root", str(root))
    header, row = listing.output.splitlines()[:2]
    assert "REWARD" in header and "(brevity " in row and "exact " in row
    rows = json.loads(invoke("list", "--root", str(root), "--json").output)["tasks"]
    assert set(rows[0]["rewards"]) == {"brevity", "exact"}


def test_grpo_settings_are_checked_in_one_line(tiny_model_dir: Path, tmp_path: Path) -> None:
    task_dir = rl_task(tmp_path / "root", tiny_model_dir, ["builtin:length=1-20"])
    wrong = invoke("run", str(task_dir), "--set", "grpo_loss_type=nope")
    assert wrong.exit_code == 1
    assert (
        "grpo_loss_type 'nope' is not a loss type of the installed TRL's GRPO: choose grpo, "
        in (wrong.output)
    )
    assert "dr_grpo" in wrong.output and "dapo" in wrong.output
    one = invoke("run", str(task_dir), "--set", "grpo_num_generations=1", "--dry-run")
    assert one.exit_code == 2 and "grpo_num_generations must be at least 2" in one.output
    weights = invoke("run", str(task_dir), "--reward-weights", "1,2", "--dry-run")
    assert weights.exit_code == 2 and "reward_weights has 2 weight(s) for 1 reward(s)" in (
        weights.output
    )
    none = invoke("run", str(task_dir), "--set", "rewards=[]")
    assert none.exit_code == 1 and "GRPO needs at least one reward" in none.output
    dry = invoke("run", str(task_dir), "--set", "rewards=[]", "--dry-run")
    assert dry.exit_code == 1 and "Error: GRPO needs at least one reward: name one" in dry.output


def test_grpo_memory_counts_the_generations(tiny_model_dir: Path) -> None:
    config = TrainingConfig(
        model_name=str(tiny_model_dir),
        method="grpo",
        rewards=["builtin:json"],
        max_length=64,
        gradient_accumulation_steps=1,
    )
    small = estimate_memory(config.replace(grpo_num_generations=2, per_device_train_batch_size=2))
    large = estimate_memory(config.replace(grpo_num_generations=8, per_device_train_batch_size=8))
    assert 0 < small.generation < large.generation and small.reference == 0
    assert small.seq_len == 64 + config.grpo_max_completion_length  # prompt + completion
    with_kl = estimate_memory(config.replace(grpo_beta=0.1, per_device_train_batch_size=4))
    assert with_kl.reference > 0
    assert any("generation (8 completions, KV cache)" in line for line in large.summary())


def test_code_prompts_carry_their_doctests(tiny_model_dir: Path, tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "numbers.py").write_text(
        textwrap.dedent(
            '''
            import math


            def hypotenuse(a: float, b: float) -> float:
                """The long side of a right triangle.

                >>> hypotenuse(3, 4)
                5.0
                """
                return math.sqrt(a * a + b * b)


            def double(x: int) -> int:
                """Twice x."""
                return 2 * x
            '''
        )
    )
    result = quickstart(
        "code", source=project, method="grpo", model=str(tiny_model_dir), root=tmp_path / "root"
    )
    assert result.config.method == "grpo" and result.config.data_format == "prompts"
    assert result.config.rewards == ["builtin:code_parses", "builtin:code_tests"]
    records = [json.loads(line) for line in (result.task_dir / "data/train.jsonl").open()]
    first = next(r for r in records if "hypotenuse" in r["prompt"])
    assert "with this signature and docstring" in first["prompt"]
    assert "import math" in first["tests"] and "doctest" in first["tests"]
    (reward,) = load_rewards(["builtin:code_tests"])
    right = f"```python\n{first['answer']}\n```"
    wrong = right.replace("math.sqrt(a * a + b * b)", "a + b")
    columns = [json.dumps({"tests": first["tests"]})] * 2
    assert reward(["p", "p"], [right, wrong], columns=columns, location=["a", "b"]) == [1.0, 0.0]


# --- the preference losses ---------------------------------------------------------------------


def test_simpo_through_set_trains_without_a_reference(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "prefs.jsonl", pairs(16))
    result = quickstart("preference", data=data, model=str(tiny_model_dir), root=tmp_path / "r")
    task = str(result.task_dir)
    dry = invoke("run", task, "--set", "pref_loss=simpo", "--max-steps", "2", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "Method: dpo (TRL CPOTrainer, loss simpo, beta 0.1)" in dry.output
    assert "Reference model: none (simpo is reference-free)" in dry.output
    assert "reference passes" not in dry.output

    run = invoke("run", task, "--set", "pref_loss=simpo", "--max-steps", "2")
    assert run.exit_code == 0, run.output
    meta = load_meta(result.task_dir)
    assert meta.status == "trained" and meta.training["pref_loss"] == "simpo"
    assert meta.metrics["reward_margin"] is not None

    ipo = invoke("run", task, "--set", "pref_loss=ipo", "--max-steps", "1", "--force")
    assert ipo.exit_code == 0, ipo.output

    wrong = invoke("run", task, "--set", "pref_loss=nope")
    assert wrong.exit_code == 1
    (line,) = [line for line in wrong.output.splitlines() if line.startswith("Error:")]
    assert "pref_loss 'nope' is not a loss of the installed TRL: choose sigmoid, hinge, ipo" in line
    assert line.endswith("or simpo or cpo (reference-free).")


@pytest.mark.parametrize(
    ("kind", "saved"),
    [
        ({"finetuning_type": "freeze", "grpo_beta": 0.1}, "model/model.safetensors"),
        ({"load_in_4bit": True}, "adapter/adapter_model.safetensors"),
    ],
    ids=["freeze-with-kl", "qlora"],
)
def test_grpo_trains_other_adapter_kinds(
    kind: dict, saved: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """freeze (the model's own weights; full works alike), with a KL term against TRL's own
    reference copy; QLoRA (4-bit base, bitsandbytes on the CPU)."""
    rewards = ["builtin:length=1-20"]
    task_dir = rl_task(tmp_path / "root", tiny_model_dir, rewards, max_steps=1, **kind)
    result = train_from_meta(task_dir)
    assert result.global_step == 1 and result.metrics["reward"] is not None
    assert (task_dir / saved).is_file()
