"""Experiment tracking with the real libraries, offline: MLflow on a SQLite store read back with
MlflowClient, W&B offline runs read back from their transaction log, TensorBoard events; a
resumed run continues the same tracker runs, `eval` logs into them, `list` shows them; a
missing extra and an unknown tracker are one line each."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from sage_finetune_plugin.cli import finetune
from sage_finetune_plugin.config import TrainingConfig
from sage_finetune_plugin.errors import ConfigError
from sage_finetune_plugin.evaluation import evaluate_task
from sage_finetune_plugin.meta import load_meta
from sage_finetune_plugin.runs import train_from_meta
from sage_finetune_plugin.task import scan_tasks

from conftest import build_prepared_task, run_cli

#: A short run with held-out data (eval loss) and a checkpoint at step 2 and 4.
SHORT = {"max_steps": 4, "save_steps": 2, "logging_steps": 2, "eval_ratio": 0.1}


def invoke(*args: str) -> Any:
    return CliRunner().invoke(finetune, list(args), catch_exceptions=False)


# --- the setting -----------------------------------------------------------------------------


def test_report_to_takes_a_list_a_comma_separated_text_or_none() -> None:
    assert TrainingConfig().report_to == ["tensorboard"]  # the default, as before
    assert TrainingConfig(report_to="tensorboard, MLflow").report_to == ["tensorboard", "mlflow"]
    assert TrainingConfig(report_to=["wandb", "wandb"]).report_to == ["wandb"]
    assert TrainingConfig(report_to="none").report_to == []
    # A meta or config file written by 0.x holds the text form.
    assert TrainingConfig.from_dict({"report_to": "none"}).report_to == []
    assert TrainingConfig.from_dict({"report_to": "tensorboard"}).report_to == ["tensorboard"]
    changed = TrainingConfig().with_settings(["report_to=wandb,mlflow"])
    assert changed.report_to == ["wandb", "mlflow"]
    assert TrainingConfig.from_dict(changed.to_dict()).report_to == ["wandb", "mlflow"]
    with pytest.raises(ConfigError, match=r"unknown tracker 'comet'; known: tensorboard, wandb"):
        TrainingConfig(report_to="tensorboard,comet")
    with pytest.raises(ConfigError, match=r"unknown tracker 'neptune'"):
        TrainingConfig().with_settings(["report_to=neptune"])


def test_an_unknown_tracker_is_one_line_listing_the_known_ones(prepared_task: Path) -> None:
    result = invoke("run", str(prepared_task), "--report-to", "tensorboard,comet")
    assert result.exit_code == 2
    assert "unknown tracker 'comet'; known: tensorboard, wandb, mlflow (or none)" in result.output
    assert "Traceback" not in result.output
    assert load_meta(prepared_task).status == "prepared"


def test_the_dry_run_says_where_each_tracker_logs(
    prepared_task: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = invoke(
        "run", str(prepared_task), "--report-to", "tensorboard,mlflow,wandb", "--dry-run"
    )
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    at = lines.index("Tracking:")
    store = (prepared_task.parent / "mlflow.db").resolve()
    assert lines[at + 1 : at + 4] == [
        f"  TensorBoard: {prepared_task / 'logs'}",
        f"  MLflow: sqlite:///{store}, experiment sage-finetune",
        f"  W&B: project sage-finetune, offline (run folders in {prepared_task}/logs/wandb)",
    ]
    assert not store.exists()  # a dry run writes nothing
    none = invoke("run", str(prepared_task), "--report-to", "none", "--dry-run").output
    assert "Tracking: none" in none


@pytest.mark.parametrize("tracker", ["mlflow", "wandb"])
def test_a_missing_tracker_package_is_one_line_naming_the_extra(
    prepared_task: Path, tmp_path: Path, tracker: str
) -> None:
    proc = run_cli(
        "sage-finetune",
        "run",
        str(prepared_task),
        "--report-to",
        f"tensorboard,{tracker}",
        env=env_uninstalled(tmp_path, tracker),
    )
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert f"Missing package(s): {tracker}" in lines[0]
    assert f"pip install 'sage-finetune-plugin[{tracker}]'" in lines[0]
    assert load_meta(prepared_task).status == "prepared"  # refused before anything ran


def test_a_tracker_that_cannot_open_its_run_stops_the_run_in_one_line(
    prepared_task: Path,
) -> None:
    result = invoke(
        "run", str(prepared_task), "--report-to", "mlflow", "--set", "mlflow_tracking_uri=foo://x"
    )
    assert result.exit_code == 1
    (line,) = result.output.strip().splitlines()[-1:]
    assert line.startswith("Error: Cannot open the MLflow run: ") and "foo://x" in line
    assert "leave mlflow out of report_to" in line and "Traceback" not in result.output
    assert load_meta(prepared_task).status == "failed"


# --- MLflow ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlflow_task(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A task trained 4 steps with MLflow in the default store (the task root's SQLite
    database), then resumed to step 6 with the artefacts logged."""
    base = tmp_path_factory.mktemp("mlflow")
    with pytest.MonkeyPatch.context() as patch:
        _isolate(patch, base)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        task = build_prepared_task(
            base / "root", tiny_model_dir, "demo", report_to="mlflow", **SHORT
        )
        first = train_from_meta(task)
        first_run = load_meta(task).tracking["mlflow"]
        second = train_from_meta(task, resume=True, max_steps=6, tracker_artifacts=True)
        task.joinpath("first-run.json").write_text(
            json.dumps({"run": first_run, "loss_history": first.metrics["loss_history"]})
        )
        assert second.metrics["resumed_from_step"] == 4
        yield task


def test_mlflow_run_on_a_sqlite_store_has_the_params_and_each_logged_loss(
    mlflow_task: Path,
) -> None:
    from mlflow.tracking import MlflowClient

    meta = load_meta(mlflow_task)
    record = meta.tracking["mlflow"]
    store = mlflow_task.parent / "mlflow.db"
    assert record["tracking_uri"] == f"sqlite:///{store.resolve()}" and store.is_file()
    client = MlflowClient(tracking_uri=record["tracking_uri"])
    run = client.get_run(record["run_id"])
    assert run.info.run_name == "demo" and run.info.status == "FINISHED"
    params = run.data.params
    assert params["config/learning_rate"] == "0.003" and params["learning_rate"] == "0.003"
    assert params["config/lora.r"] == "8" and params["config/lora.lora_alpha"] == "16"
    assert params["runtime/device"] == "cpu" and params["runtime/precision"] == "float32"
    assert params["data/samples"] == str(meta.data_stats["samples"])
    assert {"grad_norm", "learning_rate", "train_tokens_per_second", "eval_loss"} <= set(
        run.data.metrics
    )
    logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    recorded = {h["step"]: h["loss"] for h in meta.metrics["loss_history"]}
    assert sorted(logged) == [1, 2, 4, 6]  # the first step, every 2nd, and the resumed run's
    assert logged == pytest.approx(recorded)
    assert client.get_experiment(run.info.experiment_id).name == "sage-finetune"


def test_a_resumed_run_continues_the_same_mlflow_run(mlflow_task: Path) -> None:
    from mlflow.tracking import MlflowClient

    first = json.loads(mlflow_task.joinpath("first-run.json").read_text())
    record = load_meta(mlflow_task).tracking["mlflow"]
    assert record["run_id"] == first["run"]["run_id"]
    client = MlflowClient(tracking_uri=record["tracking_uri"])
    runs = client.search_runs([record["experiment_id"]])
    assert [r.info.run_id for r in runs] == [record["run_id"]]  # no second run opened
    run = runs[0]
    # MLflow keeps a parameter's first value; the resumed run tags what it changed.
    assert run.data.params["config/max_steps"] == "4"
    assert run.data.tags["sage.resumed.config/max_steps"] == "6"
    assert first["loss_history"][-1]["step"] == 4


def test_artefacts_are_logged_when_asked_beside_the_local_store(mlflow_task: Path) -> None:
    from mlflow.tracking import MlflowClient

    record = load_meta(mlflow_task).tracking["mlflow"]
    client = MlflowClient(tracking_uri=record["tracking_uri"])
    logged = {a.path for a in client.list_artifacts(record["run_id"])}
    assert logged == {"loss.png", "adapter"}
    adapter = {a.path for a in client.list_artifacts(record["run_id"], "adapter")}
    assert "adapter/adapter_model.safetensors" in adapter
    stored = mlflow_task.parent / "mlartifacts"  # beside mlflow.db, not in the working folder
    assert next(stored.rglob("loss.png")).read_bytes()[:4] == b"\x89PNG"


def test_a_preference_run_logs_its_rewards(tiny_model_dir: Path, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient
    from test_preference import preference_task

    uri = f"sqlite:///{tmp_path / 'runs.db'}"
    task = preference_task(
        tmp_path / "root", tiny_model_dir, "dpo", max_steps=2, report_to="mlflow"
    )
    train_from_meta(task, mlflow_tracking_uri=uri)
    record = load_meta(task).tracking["mlflow"]
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(record["run_id"])
    assert run.data.params["config/method"] == "dpo" and run.data.params["config/pref_beta"]
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, name)]
        assert steps[:2] == [1, 2], name


@pytest.mark.slow
def test_two_processes_log_one_mlflow_run(make_prepared_task, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    task = make_prepared_task(report_to="mlflow", max_steps=4, logging_steps=2)
    uri = f"sqlite:///{tmp_path / 'runs.db'}"
    proc = run_cli(
        "sage-finetune", "run", str(task), "--nproc", "2", "--set", f"mlflow_tracking_uri={uri}"
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = load_meta(task).tracking["mlflow"]
    client = MlflowClient(tracking_uri=uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    (run,) = client.search_runs(experiments)  # one run, opened by rank 0
    assert run.info.run_id == record["run_id"] and run.data.params["runtime/world_size"] == "2"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert steps == [1, 2, 4]  # once per logging step, not once per process


def test_mlflow_run_id_attaches_and_an_interrupted_run_is_killed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    from sage_finetune_plugin.books import RunBooks
    from sage_finetune_plugin.errors import TrainingInterrupted
    from sage_finetune_plugin.training.tracking import TrackerRuns

    uri = f"sqlite:///{tmp_path / 'runs.db'}"
    client = MlflowClient(tracking_uri=uri)
    theirs = client.create_run(client.create_experiment("team")).info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", theirs)
    config = TrainingConfig(report_to="mlflow", mlflow_tracking_uri=uri)
    books = RunBooks(tmp_path / "task")
    books.config = config
    runs = TrackerRuns(config, tmp_path / "task", books)
    with pytest.raises(TrainingInterrupted), runs.running({"config/lora.r": 8}, resume=False):
        raise TrainingInterrupted("stopped")
    run = client.get_run(theirs)
    assert run.info.status == "KILLED" and run.data.params == {"config/lora.r": "8"}
    assert load_meta(tmp_path / "task").tracking["mlflow"]["run_id"] == theirs
    assert os.environ["MLFLOW_RUN_ID"] == theirs  # hidden from MLflowCallback only meanwhile


def test_only_the_main_process_opens_runs_and_logs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sage_finetune_plugin.books import RunBooks
    from sage_finetune_plugin.training.tracking import TrackerRuns

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    store = tmp_path / "runs.db"
    config = TrainingConfig(
        report_to="tensorboard,wandb,mlflow", mlflow_tracking_uri=f"sqlite:///{store}"
    )
    task_dir = tmp_path / "task"
    runs = TrackerRuns(config, task_dir, RunBooks(task_dir))
    assert runs.callbacks() == []
    with runs.running({"config/learning_rate": 1e-4}, resume=False):
        pass
    assert not store.exists() and not task_dir.exists()


def test_eval_logs_its_metrics_into_the_same_mlflow_run_and_list_shows_it(
    mlflow_task: Path,
) -> None:
    from mlflow.tracking import MlflowClient

    report = evaluate_task(mlflow_task, base=False, max_samples=2, max_new_tokens=4)
    record = load_meta(mlflow_task).tracking["mlflow"]
    client = MlflowClient(tracking_uri=record["tracking_uri"])
    history = client.get_metric_history(record["run_id"], "eval_report/tuned/loss")
    assert [(m.step, m.value) for m in history] == [(6, pytest.approx(report.tuned["loss"]))]

    (row,) = [e.summary() for e in scan_tasks(mlflow_task.parent)]
    assert row["tracker"] == f"mlflow:{record['run_id']}"
    listed = invoke("list", "--root", str(mlflow_task.parent), "--json")
    assert json.loads(listed.output)["tasks"][0]["tracking"]["mlflow"] == record
    table = invoke("list", "--root", str(mlflow_task.parent)).output
    assert "TRACKER" in table and f"mlflow:{record['run_id']}" in table


# --- W&B offline and TensorBoard ---------------------------------------------------------------


def test_wandb_offline_run_holds_the_config_and_history_and_eval_joins_it(
    make_prepared_task, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    task = make_prepared_task(report_to="wandb,tensorboard", **SHORT)
    result = train_from_meta(task)
    record = load_meta(task).tracking["wandb"]
    assert record["mode"] == "offline" and record["project"] == "sage-finetune"
    folder = Path(record["run_dir"])
    assert folder.parent == task / "logs" / "wandb" and folder.name.endswith(record["run_id"])

    records = wandb_records(_log(folder))
    (run,) = records["run"]
    assert run.run.run_id == record["run_id"] and run.run.display_name == task.name
    updates = [*run.run.config.update, *(i for r in records["config"] for i in r.config.update)]
    config = {item.key: json.loads(item.value_json) for item in updates}
    assert config["config/lora.r"] == 8 and config["config/learning_rate"] == 0.003
    assert config["runtime/device"] == "cpu" and config["data/samples"] > 0
    steps = [_history(r) for r in records["history"]]
    losses = {int(h["train/global_step"]): h["train/loss"] for h in steps if "train/loss" in h}
    recorded = {h["step"]: h["loss"] for h in result.metrics["loss_history"]}
    assert losses == pytest.approx(recorded) and sorted(losses) == [1, 2, 4]
    assert any("eval/loss" in h for h in steps)
    assert all("train/train_tokens_per_second" in h for h in steps if "train/loss" in h)

    # TensorBoard, as before, next to it.
    scalars = tensorboard_scalars(task / "logs")
    assert sorted(step for step, _ in scalars["train/loss"]) == [1, 2, 4]

    # run --resume: the same run id; offline, W&B writes the reopened run into a folder of
    # its own (`wandb sync` uploads the folders of one run in order).
    train_from_meta(task, resume=True, max_steps=6)
    resumed = load_meta(task).tracking["wandb"]
    assert resumed["run_id"] == record["run_id"] and resumed["run_dir"] != record["run_dir"]
    logged = [_history(r) for r in wandb_records(_log(resumed["run_dir"]))["history"]]
    assert [h["train/global_step"] for h in logged if "train/loss" in h] == [6]

    # eval: into the same run id again, and into the TensorBoard logs.
    report = evaluate_task(task, base=False, max_samples=2, max_new_tokens=4)
    folders = sorted(folder.parent.glob(f"offline-run-*-{record['run_id']}"))
    assert len(folders) == 3 and folders[:2] == [folder, Path(resumed["run_dir"])]
    logged = [_history(r) for r in wandb_records(_log(folders[2]))["history"]]
    assert logged[0]["eval_report/tuned/loss"] == pytest.approx(report.tuned["loss"])
    assert tensorboard_scalars(task / "logs")["eval_report/tuned/loss"] == [
        (6, pytest.approx(report.tuned["loss"]))
    ]
    assert load_meta(task).tracking["wandb"] == resumed


def _log(run_dir: str | Path) -> Path:
    """The transaction log of a W&B run folder."""
    return next(Path(run_dir).glob("run-*.wandb"))


def test_no_tracker_leaves_no_run_records(make_prepared_task) -> None:
    task = make_prepared_task(report_to="none", max_steps=2)
    train_from_meta(task)
    assert load_meta(task).tracking == {}
    assert not (task / "logs").exists() or not any((task / "logs").iterdir())
    (row,) = [e.summary() for e in scan_tasks(task.parent)]
    assert row["tracker"] is None


# --- readers -----------------------------------------------------------------------------------


def wandb_records(path: Path) -> dict[str, list[Any]]:
    """The records of a W&B transaction log (``run-<id>.wandb``), by kind. The file is a
    LevelDB-style log (a 7-byte header ``:W&B``, magic, version; then 32 KiB blocks of chunks,
    each with a checksum, a length and a type: full, first, middle or last) of W&B's own
    protobuf ``Record`` messages, parsed here with W&B's message class."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, _magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B"
    found: dict[str, list[Any]] = {}
    position, block, pending = 7, 32768, b""
    while position + 7 <= len(data):
        left = block - position % block
        _crc, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if left < 7 or (length == 0 and kind == 0):  # the rest of a block is padding
            position += left
            continue
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            found.setdefault(record.WhichOneof("record_type"), []).append(record)
            pending = b""
    return found


def _history(record: Any) -> dict[str, float]:
    return {
        item.key or "/".join(item.nested_key): json.loads(item.value_json)
        for item in record.history.item
    }


def tensorboard_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(logdir.glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            found.setdefault(tag, []).extend((e.step, e.value) for e in accumulator.Scalars(tag))
    return found


def env_uninstalled(tmp_path: Path, package: str) -> dict[str, str]:
    """A subprocess environment in which ``package`` looks uninstalled to every check:
    ``import`` fails and ``importlib.util.find_spec`` answers None, as transformers' own
    availability checks expect (conftest.env_without makes find_spec raise, which they do
    not survive)."""
    site = tmp_path / "uninstalled"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(f"import sys\nsys.modules[{package!r}] = None\n")
    paths = [str(site), os.environ.get("PYTHONPATH")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, paths))}


def _isolate(patch: pytest.MonkeyPatch, base: Path) -> None:
    """HOME and XDG_* in ``base`` (as the autouse fixture does for each test)."""
    home = base / "home"
    home.mkdir()
    patch.setenv("HOME", str(home))
    for var in ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME"):
        patch.setenv(var, str(home / var.lower()))
    patch.chdir(base)
