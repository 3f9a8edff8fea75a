"""`sage finetune quickstart`: the code dataset from a committed sample tree, tasks from the
user's data, the task directory it writes, --force, --preview, and its errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from sage_finetune_plugin.cli import finetune
from sage_finetune_plugin.config import TrainingConfig
from sage_finetune_plugin.data.code import MAX_FILE_BYTES, build_code_dataset
from sage_finetune_plugin.errors import DataError
from sage_finetune_plugin.meta import load_meta
from sage_finetune_plugin.presets import PresetConfigs

from conftest import ASSETS, run_cli

SAMPLE = ASSETS / "sample_project"
QA = [
    {"question": "What is the capital of France?", "answer": "Paris."},
    {"question": "What is 2 + 2?", "answer": "4", "context": "Arithmetic."},
]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of the sample tree plus what must never be scanned (not committable as is)."""
    root = tmp_path / "project"
    shutil.copytree(SAMPLE, root)
    planted = {
        "venv/lib/site.py": "def venv_module():\n    '''From a virtualenv.'''\n",
        "envs/py311/pyvenv.cfg": "home = /usr/bin\n",
        "envs/py311/lib/inside_env.py": "def env_module():\n    '''Inside a venv.'''\n",
        "build/lib/built.py": "def built():\n    '''Build output.'''\n",
        "geometry/__pycache__/cached.py": "def cached():\n    '''A cache.'''\n",
        ".git/hooks/hook.py": "def hook():\n    '''VCS internals.'''\n",
        "node_modules/pkg/tool.py": "def node_tool():\n    '''JavaScript land.'''\n",
        "pkg.egg-info/meta.py": "def egg_info():\n    '''Packaging metadata.'''\n",
        "broken.py": "def broken(:\n    '''Not Python.'''\n",
        "deploy.py": "KEY = '''-----BEGIN RSA PRIVATE KEY-----\nabc\n'''\n",
    }
    for relative, text in planted.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (root / "latin1.py").write_bytes(b"def caf\xe9():\n    '''Latin-1.'''\n")
    (root / "huge.py").write_text("X = 1\n" * (MAX_FILE_BYTES // 6 + 1))
    return root


def invoke(*args: str):
    return CliRunner().invoke(finetune, list(args))


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# --- the code dataset -------------------------------------------------------------------------


def test_code_dataset_answers_come_from_the_code(project: Path) -> None:
    code = build_code_dataset(project)
    by_instruction = {r["instruction"]: r for r in code.records}
    assert by_instruction["What does the function `distance` in `geometry.shapes` do?"][
        "output"
    ] == ("Return the Euclidean distance between points p and q.")
    write = by_instruction[
        "Write the Python function `distance` in `geometry.shapes` with this signature and "
        "docstring."
    ]
    source = (SAMPLE / "geometry/shapes.py").read_text()
    assert write["output"] in source and write["output"].startswith("def distance(")
    assert write["input"] == (
        "def distance(p: tuple[float, float], q: tuple[float, float]) -> float:\n"
        '    """Return the Euclidean distance between points p and q."""'
    )
    method = by_instruction[
        "Write the Python method `area` of class `Circle` in `geometry.shapes` with this "
        "signature and docstring."
    ]
    assert method["output"].startswith("def area(self) -> float:")  # dedented
    decorated = next(
        r for r in code.records if r["instruction"].startswith("Write the Python function `banner`")
    )
    assert decorated["output"].startswith("@functools.cache\ndef banner(")
    module = by_instruction["What does the Python module `geometry.vectors` contain?"]["output"]
    assert module.startswith("Two-dimensional vectors as tuples.")
    assert (
        "- `add(u: tuple[float, float], v: tuple[float, float]) -> tuple[float, float]`" in module
    )
    assert (
        "Its public methods: `area`, `contains`."
        in by_instruction["What does the class `Circle` in `geometry.shapes` do?"]["output"]
    )


def test_code_dataset_skips_what_it_must(project: Path) -> None:
    code = build_code_dataset(project)
    text = json.dumps(code.records)
    for absent in (
        "venv_module", "env_module", "built", "cached", "hook", "node_tool", "egg_info",
        "broken", "PRIVATE KEY", "caf", "huge", "hidden", "sk_test_FAKE", "service_key",
        "fake-token", "generated_by_protoc", "lookup", "vectors_copy", "`undocumented` in",
        "__repr__", "`stub`` in", "Write the Python function `stub`",
    ):  # fmt: skip
        assert absent not in text, absent
    assert code.files_used == 4
    assert code.skipped == {
        "skipped folder": 7,
        "hidden file": 1,
        "secret-like name": 1,
        "generated": 2,
        "duplicate file": 1,
        "syntax error": 1,
        "contains a private key": 1,
        "not UTF-8": 1,
        "too large": 1,
    }


def test_code_dataset_is_deterministic_and_deduplicated(project: Path) -> None:
    first = build_code_dataset(project)
    assert build_code_dataset(project).records == first.records
    keys = [json.dumps(r, sort_keys=True) for r in first.records]
    assert len(keys) == len(set(keys))


def test_code_dataset_refuses_a_tree_without_python(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "index.md").write_text("# Docs")
    (tmp_path / ".venv").mkdir()
    (tmp_path / ".venv" / "x.py").write_text("def f():\n    '''x'''\n")
    with pytest.raises(
        DataError, match=r"No usable Python files under .* \(skipped: 1 skipped folder\)"
    ):
        build_code_dataset(tmp_path)


def test_code_dataset_needs_something_documented(tmp_path: Path) -> None:
    (tmp_path / "m.py").write_text("def f(x):\n    return x\n")
    with pytest.raises(DataError, match="no documented function, class or module"):
        build_code_dataset(tmp_path)


# --- the command ------------------------------------------------------------------------------


def test_quickstart_code_writes_a_task(project: Path, tiny_model_dir: Path) -> None:
    result = invoke("quickstart", "code", "--source", str(project), "--model", str(tiny_model_dir))
    assert result.exit_code == 0, result.output
    assert f"Scanning Python files under {project}" in result.output
    assert "Next: sage finetune run finetune_output/code" in result.output
    task = Path("finetune_output/code")
    meta = load_meta(task)
    records = [json.loads(line) for line in (task / "data/train.jsonl").read_text().splitlines()]
    assert (meta.task_type, meta.format, meta.framework, meta.status) == (
        "code", "alpaca", "peft", "prepared"
    )  # fmt: skip
    assert (meta.dataset, meta.config, meta.output_dir) == (
        "data/train.jsonl", "training_config.json", "."
    )  # fmt: skip
    assert meta.code_root == str(project) and meta.data_file is None
    assert meta.model == str(tiny_model_dir) and meta.preset == "cpu"
    stats = meta.data_stats
    assert meta.num_samples == len(records) == stats["samples"] + stats["eval_samples"]
    assert meta.data_stats["code"]["files_used"] == 4
    assert meta.data_stats["tokens"] > meta.data_stats["trainable_tokens"] > 0
    config = TrainingConfig.load(task / "training_config.json")
    assert (config.data_path, config.model_name, config.preset) == (
        "data/train.jsonl", str(tiny_model_dir), "cpu"
    )  # fmt: skip
    assert meta.training == config.to_dict()
    assert (task / ".cache/prepared" / meta.data_stats["cache_key"] / "stats.json").is_file()
    assert not [p for p in Path("finetune_output").iterdir() if p.name.startswith(".")]


def test_quickstart_scans_the_current_directory_by_default(
    project, tiny_model_dir, monkeypatch
) -> None:
    monkeypatch.chdir(project)
    result = invoke("quickstart", "code", "--model", str(tiny_model_dir), "--root", "../tasks")
    assert result.exit_code == 0, result.output
    assert f"Scanning Python files under {project}" in result.output
    assert load_meta(project.parent / "tasks" / "code").code_root == str(project)


def test_quickstart_qa_from_user_data(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = write_jsonl(tmp_path / "qa.jsonl", QA)
    result = invoke(
        "quickstart", "qa", "--data", str(data), "--model", str(tiny_model_dir), "--name", "faq"
    )
    assert result.exit_code == 0, result.output
    meta = load_meta(Path("finetune_output/faq"))
    assert (meta.task_type, meta.format, meta.data_file) == ("qa", "qa", str(data))
    written = Path("finetune_output/faq/data/train.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in written] == [
        {"question": QA[0]["question"], "context": "", "answer": "Paris."},
        {"question": "What is 2 + 2?", "context": "Arithmetic.", "answer": "4"},
    ]


def test_task_type_forces_its_format_and_custom_detects(tmp_path, tiny_model_dir) -> None:
    data = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "i", "output": "o"}])
    wrong = invoke("quickstart", "qa", "--data", str(data), "--model", str(tiny_model_dir))
    assert wrong.exit_code == 1
    assert "line 1: expected qa fields (question, answer" in wrong.output
    ok = invoke("quickstart", "custom", "--data", str(data), "--model", str(tiny_model_dir))
    assert ok.exit_code == 0, ok.output
    assert load_meta(Path("finetune_output/custom")).format == "alpaca"


def test_skip_invalid_reports_what_was_dropped(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = tmp_path / "chat.jsonl"
    good = {
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    }
    bad_role = {
        "messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]
    }
    data.write_text(json.dumps(good) + "\nnot json\n" + json.dumps(bad_role) + "\n")
    failed = invoke("quickstart", "chat", "--data", str(data), "--model", str(tiny_model_dir))
    assert failed.exit_code == 1 and "line 2: invalid JSON" in failed.output
    result = invoke(
        "quickstart", "chat", "--data", str(data), "--skip-invalid", "--model", str(tiny_model_dir)
    )
    assert result.exit_code == 0, result.output
    assert "records: 3 read, 1 valid, 2 invalid" in result.output
    assert (
        "invalid 1: unknown role (e.g. line 3: message 1 has unknown role 'robot'" in result.output
    )
    stats = load_meta(Path("finetune_output/chat")).data_stats
    assert stats["dropped"] == {"invalid JSON": 1, "unknown role": 1}


def test_existing_task_needs_force_and_a_failed_replace_keeps_it(tmp_path, tiny_model_dir) -> None:
    data = write_jsonl(tmp_path / "qa.jsonl", QA)
    args = ("quickstart", "qa", "--data", str(data), "--model", str(tiny_model_dir))
    assert invoke(*args).exit_code == 0
    again = invoke(*args)
    assert again.exit_code == 1 and "already exists" in again.output and "--force" in again.output

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q"}\n')
    failed = invoke(
        "quickstart", "qa", "--data", str(bad), "--force", "--model", str(tiny_model_dir)
    )
    assert failed.exit_code == 1
    assert load_meta(Path("finetune_output/qa")).num_samples == 2  # the old task is intact
    assert sorted(p.name for p in Path("finetune_output").iterdir()) == ["qa"]

    write_jsonl(data, [*QA, QA[0]])
    replaced = invoke(*args, "--force")
    assert replaced.exit_code == 0 and "replaced" in replaced.output
    assert load_meta(Path("finetune_output/qa")).num_samples == 3


def test_force_refuses_a_directory_that_is_not_a_task(tmp_path, tiny_model_dir) -> None:
    Path("finetune_output/qa").mkdir(parents=True)
    Path("finetune_output/qa/notes.txt").write_text("mine")
    data = write_jsonl(tmp_path / "qa.jsonl", QA)
    result = invoke(
        "quickstart", "qa", "--data", str(data), "--force", "--model", str(tiny_model_dir)
    )
    assert result.exit_code == 1 and "is not a task directory" in result.output
    assert Path("finetune_output/qa/notes.txt").read_text() == "mine"


def test_preview_marks_the_prompt(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = write_jsonl(tmp_path / "qa.jsonl", QA)
    result = invoke(
        "quickstart", "qa", "--data", str(data), "--model", str(tiny_model_dir), "--preview", "1"
    )
    assert result.exit_code == 0, result.output
    assert (
        "--- sample 1 ---\n[[<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n]]Paris.<|im_end|>\n"
    ) in result.output
    assert "sample 2" not in result.output


def test_the_trainer_reuses_the_quickstart_cache(tmp_path: Path, tiny_model_dir: Path) -> None:
    from sage_finetune_plugin.data import prepare_dataset
    from sage_finetune_plugin.models import load_tokenizer
    from sage_finetune_plugin.paths import PREPARED_CACHE
    from sage_finetune_plugin.runs import RunOptions, resolve_config
    from sage_finetune_plugin.task import Task

    data = write_jsonl(tmp_path / "qa.jsonl", QA)
    assert (
        invoke("quickstart", "qa", "--data", str(data), "--model", str(tiny_model_dir)).exit_code
        == 0
    )
    task = Path("finetune_output/qa").resolve()
    config = resolve_config(Task(task), RunOptions())
    prepared = prepare_dataset(
        config.data_path,
        load_tokenizer(config.model_name),
        config,
        cache_dir=task / PREPARED_CACHE,
    )
    assert prepared.stats.from_cache
    assert prepared.stats.samples + prepared.stats.eval_samples == 2


@pytest.mark.parametrize(
    ("args", "code", "expected"),
    [
        (("quickstart", "poetry"), 2, "Unknown task type 'poetry'"),
        (("quickstart", "qa"), 2, "quickstart qa needs --data FILE"),
        (
            ("quickstart", "code", "--data", "x.json"),
            2,
            "quickstart code builds its data from --source",
        ),
        (("quickstart", "custom", "--data", "missing.jsonl"), 1, "missing.jsonl: no such file"),
        (
            ("quickstart", "custom", "--data", "x.jsonl", "--format", "yaml"),
            2,
            "Unknown data format",
        ),
        (("quickstart", "code", "--name", "../up"), 1, "Invalid task name '../up'"),
        (
            ("quickstart", "custom", "--data", "x.jsonl", "--preset", "rtx3060"),
            2,
            "'rtx3060' is not one of",
        ),
    ],
)
def test_usage_errors(args: tuple[str, ...], code: int, expected: str) -> None:
    Path("x.jsonl").write_text('{"text": "t"}\n')
    result = invoke(*args)
    assert result.exit_code == code, result.output
    assert expected in result.output
    assert "Traceback" not in result.output


def test_console_script_reports_bad_data_in_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('[{"instruction": "i", "output": "o"},\n {"instruction": }]')
    proc = run_cli("sage-finetune", "quickstart", "custom", "--data", str(bad))
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        f"Error: {bad}: invalid JSON at line 2, column 18: Expecting value."
    )


def test_run_trains_right_after_quickstart(tmp_path: Path, tiny_model_dir: Path) -> None:
    records = [{"question": f"What is {a} plus 2?", "answer": f"{a + 2}."} for a in range(12)]
    data = write_jsonl(tmp_path / "qa.jsonl", records)
    result = invoke(
        "quickstart", "qa", "--data", str(data), "--model", str(tiny_model_dir), "--run"
    )
    assert result.exit_code == 0, result.output
    assert f"Trained {PresetConfigs.cpu().max_steps} steps" in result.output
    meta = load_meta(Path("finetune_output/qa"))
    assert meta.status == "trained" and meta.data_stats["from_cache"]
    assert (Path("finetune_output/qa") / meta.adapter_path / "adapter_config.json").is_file()


def test_a_model_that_cannot_be_found_only_skips_token_statistics(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "qa.jsonl", QA)
    missing = str(tmp_path / "no-such-model")
    result = invoke("quickstart", "qa", "--data", str(data), "--model", missing, "--preview", "1")
    assert result.exit_code == 0, result.output
    assert "Warning: Token statistics and preview skipped:" in result.output
    assert "records: 2 read, 2 valid, 0 invalid" in result.output
    meta = load_meta(Path("finetune_output/qa"))
    assert meta.model == missing and meta.num_samples == 2
    stats = meta.data_stats
    assert (stats["records_read"], stats["records_kept"], stats["records_invalid"]) == (2, 2, 0)
    assert stats["sources"] == [
        {"source": str(data), "format": "qa", "read": 2, "valid": 2, "invalid": 0}
    ]


# --- max_length chosen from the data -------------------------------------------------------------


def spread(count: int, longest_words: int) -> list[dict[str, str]]:
    """Alpaca records whose answers grow from 1 to ``longest_words`` words."""
    return [
        {
            "instruction": f"Count to {i}.",
            "output": " ".join(["step"] * (1 + i * longest_words // count)),
        }
        for i in range(count)
    ]


def test_max_length_is_chosen_from_the_data_unless_given(tmp_path, tiny_model_dir) -> None:
    data = write_jsonl(tmp_path / "spread.jsonl", spread(100, 400))
    model = ("--model", str(tiny_model_dir), "--preset", "cpu")
    chosen = invoke("quickstart", "custom", "--data", str(data), *model, "--name", "auto")
    assert chosen.exit_code == 0, chosen.output
    meta = load_meta(Path("finetune_output/auto"))
    length, stats = meta.training["max_length"], meta.data_stats
    whole = stats["whole_p99"]
    assert 256 < whole <= length < whole + 64 and length % 64 == 0  # above the preset's 256
    assert f"max_length {length}, from the data: it keeps 99% of the samples whole" in chosen.output
    assert "the cpu preset allows up to 1024" in chosen.output
    assert stats["max_length"] == length and stats["truncated"] <= 1
    assert "longer than max_length" not in chosen.output
    saved = TrainingConfig.load(Path("finetune_output/auto/training_config.json"))
    assert saved.max_length == length
    cache = list(Path("finetune_output/auto/.cache/prepared").iterdir())
    assert len(cache) == 1  # only the entry `run` reads

    pinned = invoke(
        "quickstart", "custom", "--data", str(data), *model, "--max-length", "128", "--name", "pin"
    )
    assert pinned.exit_code == 0, pinned.output
    assert load_meta(Path("finetune_output/pin")).training["max_length"] == 128
    assert "from the data" not in pinned.output
    assert "are longer than max_length" in " ".join(pinned.output.split())


def test_a_chosen_max_length_stops_at_what_the_preset_allows(tmp_path, tiny_model_dir) -> None:
    data = write_jsonl(tmp_path / "long.jsonl", spread(50, 3000))
    result = invoke(
        "quickstart", "custom", "--data", str(data), "--model", str(tiny_model_dir),
        "--preset", "cpu",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    meta = load_meta(Path("finetune_output/custom"))
    assert meta.training["max_length"] == 1024
    text = " ".join(result.output.split())
    assert f"99% of the samples would need {meta.data_stats['whole_p99']} tokens" in text
    assert "but the cpu preset allows up to 1024" in text
