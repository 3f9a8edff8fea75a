"""LoRATrainer and train_from_meta: real transformers + peft training of the tiny model on CPU."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from sage_finetune_plugin.checkpoints import latest_checkpoint, list_checkpoints
from sage_finetune_plugin.config import LoRAConfig, TrainingConfig
from sage_finetune_plugin.errors import (
    ConfigError,
    LockError,
    OutOfMemoryError,
    TrainingError,
    TrainingInterrupted,
)
from sage_finetune_plugin.locks import RunLock
from sage_finetune_plugin.meta import load_meta
from sage_finetune_plugin.presets import PresetConfigs
from sage_finetune_plugin.runs import RunOptions, resolve_config, train_from_meta
from sage_finetune_plugin.task import Task
from sage_finetune_plugin.training.recipe import LoRATrainer
from sage_finetune_plugin.training.runtime import Hardware, resolve_runtime

from conftest import records, tiny_config, write_data

PROJECTIONS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


@pytest.fixture(scope="module")
def trained(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> LoRATrainer:
    """One 20-step run shared by the tests that only inspect its results."""
    task_dir = tmp_path_factory.mktemp("trained") / "task"
    write_data(task_dir / "train.jsonl")
    config = tiny_config(
        tiny_model_dir,
        data_path=str(task_dir / "train.jsonl"),
        eval_ratio=0.1,
        report_to="tensorboard",
    )
    trainer = LoRATrainer(config, task_dir=task_dir)
    trainer.result = trainer.train()
    return trainer


def test_loss_falls_and_the_meta_records_the_run(trained: LoRATrainer) -> None:
    task_dir, metrics = trained.task_dir, trained.result.metrics
    losses = [h["loss"] for h in metrics["loss_history"]]
    assert losses[-1] < 0.7 * losses[0], losses
    assert metrics["global_step"] == 20
    assert metrics["eval_loss"] is not None and metrics["eval_loss_history"]
    assert metrics["tokens_per_second"] > 0 and metrics["peak_memory_bytes"] > 0
    assert metrics["wall_time_s"] >= metrics["train_runtime_s"] > 0

    meta = load_meta(task_dir)
    assert meta.status == "trained"
    assert meta.adapter_path == "adapter"
    assert meta.metrics["loss_history"] == metrics["loss_history"]
    assert meta.training["lora"]["target_modules"] == PROJECTIONS  # all-linear, no lm_head
    assert meta.training["optim"] == "adamw_torch" and meta.training["fp16"] is False
    assert meta.data_stats["samples"] + meta.data_stats["eval_samples"] == 48
    assert (task_dir / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert any((task_dir / "logs").glob("events.out.tfevents.*"))
    assert not (task_dir / ".lock").exists()


def test_checkpoints_and_adapter_are_safetensors(trained: LoRATrainer) -> None:
    task_dir = trained.task_dir
    steps = [step for step, _ in list_checkpoints(task_dir / "checkpoints")]
    assert steps == [10, 20]
    adapter = task_dir / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    assert (adapter / "tokenizer.json").is_file()
    weights = [p.name for p in task_dir.rglob("*model*") if p.is_file()]
    assert weights and all(name.endswith(".safetensors") for name in weights), weights
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert saved["r"] == 8
    assert sorted({name.rsplit(".", 1)[-1] for name in saved["target_modules"]}) == PROJECTIONS


def test_adapter_weights_change_and_base_weights_do_not(
    trained: LoRATrainer, tiny_model_dir: Path
) -> None:
    adapter = load_file(trained.task_dir / "adapter" / "adapter_model.safetensors")
    lora_b = [tensor for name, tensor in adapter.items() if "lora_B" in name]
    assert len(lora_b) == 2 * len(PROJECTIONS)  # 2 layers
    assert all(tensor.abs().sum() > 0 for tensor in lora_b)  # peft initializes B to zero

    original = load_file(tiny_model_dir / "model.safetensors")
    state = trained.model.state_dict()
    base = {
        name.removeprefix("base_model.model.").replace(".base_layer", ""): tensor
        for name, tensor in state.items()
        if "lora_" not in name
    }
    assert set(original) <= set(base)
    for name, tensor in original.items():
        assert torch.equal(base[name], tensor), name
    assert all(not p.requires_grad for n, p in trained.model.named_parameters() if "lora_" not in n)


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_trains_on_cpu(bits: int, tiny_model_dir: Path, tmp_path: Path) -> None:
    import bitsandbytes as bnb

    config = tiny_config(
        tiny_model_dir,
        data_path=str(write_data(tmp_path / "data.jsonl")),
        load_in_4bit=bits == 4,
        load_in_8bit=bits == 8,
        optim="paged_adamw_8bit",
        gradient_checkpointing=True,
        max_steps=8,
        eval_ratio=0.1,  # an evaluation must not leave the 4-bit weights repacked for inference
    )
    trainer = LoRATrainer(config, task_dir=tmp_path / "task")
    result = trainer.train()

    layer = trainer.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(layer, bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt)
    losses = [h["loss"] for h in result.metrics["loss_history"]]
    assert losses[-1] < losses[0], losses
    assert result.config.optim == "adamw_bnb_8bit" == load_meta(tmp_path / "task").training["optim"]
    assert any("paged_adamw_8bit needs CUDA" in note for note in result.notes)
    assert (tmp_path / "task" / "adapter" / "adapter_model.safetensors").is_file()


def test_mission_python_api_snippet_runs(tiny_model_dir: Path) -> None:
    """The snippet of docs/python-api.md, the 1.5B model swapped for the tiny one, 2 steps."""
    Path("data.json").write_text(json.dumps(records(16)))
    from sage_finetune_plugin import LoRATrainer, PresetConfigs

    config = PresetConfigs.rtx_3060()
    config.data_path = "./data.json"
    config.model_name = str(tiny_model_dir)
    config.max_steps = 2
    result = LoRATrainer(config).train()

    assert PresetConfigs.rtx_3060().effective_batch_size == 16
    assert result.global_step == 2
    task_dir = Path("finetune_output/default")
    assert (task_dir / "adapter" / "adapter_model.safetensors").is_file()
    meta = load_meta(task_dir)  # a bare config run still leaves a task `list` can show
    assert meta.status == "trained" and meta.preset == "rtx_3060"
    assert meta.training["load_in_8bit"] is True


def test_subclass_can_replace_a_step(tiny_model_dir: Path, tmp_path: Path) -> None:
    from sage_finetune_plugin.data import prepare_dataset

    class OnlyTwoDigits(LoRATrainer):
        def prepare_data(self):
            wanted = [
                r for r in records() if r["instruction"].endswith(("1 as a word.", "2 as a word."))
            ]
            return prepare_dataset(wanted, self.tokenizer, self.config)

    config = tiny_config(tiny_model_dir, max_steps=2)  # no data_path: the subclass brings data
    result = OnlyTwoDigits(config, task_dir=tmp_path / "task").train()
    assert result.global_step == 2
    assert load_meta(tmp_path / "task").num_samples == 10


def test_train_from_meta_uses_the_recorded_hyperparameters(
    tiny_model_dir: Path, tmp_path: Path, make_prepared_task
) -> None:
    task_dir = make_prepared_task(lora=LoRAConfig(r=4, lora_alpha=8), learning_rate=2e-3)
    recorded = (task_dir / "training_config.json").read_text()

    result = train_from_meta(task_dir, max_steps=3)

    assert result.global_step == 3
    meta = load_meta(task_dir)
    assert meta.training["lora"]["r"] == 4 and meta.training["lora"]["lora_alpha"] == 8
    assert meta.training["learning_rate"] == 2e-3 and meta.training["max_steps"] == 3
    assert json.loads((task_dir / "adapter" / "adapter_config.json").read_text())["r"] == 4
    assert (task_dir / "training_config.json").read_text() == recorded  # the input is kept


def task_config(task_dir: Path, preset: str | None = None, **overrides) -> TrainingConfig:
    return resolve_config(Task(task_dir), RunOptions(preset=preset, overrides=overrides))


def test_task_config_sources(tiny_model_dir: Path, tmp_path: Path, make_prepared_task) -> None:
    task_dir = make_prepared_task(learning_rate=1e-3)
    assert task_config(task_dir).learning_rate == 1e-3
    assert task_config(task_dir).data_path == str(task_dir / "data" / "train.jsonl")

    # --preset replaces the hyperparameters but keeps the task's model, data and its own
    # max_length (64 here, within the preset's limit).
    cpu = task_config(task_dir, preset="cpu")
    assert cpu.preset == "cpu" and cpu.learning_rate == PresetConfigs.cpu().learning_rate
    assert cpu.max_length == task_config(task_dir).max_length == 64
    assert cpu.model_name == str(tiny_model_dir)
    assert cpu.data_path == str(task_dir / "data" / "train.jsonl")

    # A meta of the original tool: only its keys, no config file.
    old = tmp_path / "old"
    write_data(old / "train.jsonl")
    (old / "finetune_meta.json").write_text(
        json.dumps(
            {
                "task_type": "code",
                "model": str(tiny_model_dir),
                "framework": "peft",
                "format": "alpaca",
                "dataset": "train.jsonl",
                "config": "missing_config.json",
                "output_dir": ".",
            }
        )
    )
    config = task_config(old, max_steps=5)
    assert config.model_name == str(tiny_model_dir)
    assert config.data_path == str(old / "train.jsonl")
    assert config.max_steps == 5
    assert config.learning_rate == TrainingConfig().learning_rate


class InterruptAt(TrainerCallback):
    """Sends this process a real SIGINT (what Ctrl-C does) at the end of one step."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes(
    tiny_model_dir: Path, tmp_path: Path, make_prepared_task
) -> None:
    task_dir = make_prepared_task(max_steps=8, save_steps=100)

    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when started in the background
    with pytest.raises(TrainingInterrupted, match="--resume") as caught:
        train_from_meta(task_dir, callbacks=[InterruptAt(3)])
    assert caught.value.exit_code == 130
    meta = load_meta(task_dir)
    stopped = meta.metrics["global_step"]
    assert meta.status == "interrupted" and stopped in (3, 4)  # the step running at Ctrl-C ends
    checkpoint = latest_checkpoint(task_dir / "checkpoints")
    assert checkpoint == task_dir / "checkpoints" / f"checkpoint-{stopped}"
    assert not (task_dir / "adapter").exists()
    assert signal.getsignal(signal.SIGINT) is before  # the handler from before is restored

    result = train_from_meta(task_dir, resume=True)
    assert result.metrics["resumed_from_step"] == stopped
    assert result.global_step == 8
    assert load_meta(task_dir).status == "trained"


@pytest.mark.slow
def test_resume_after_kill_9_continues_from_the_checkpoint(
    tiny_model_dir: Path, tmp_path: Path, make_prepared_task
) -> None:
    task_dir = make_prepared_task(max_steps=150, save_steps=5, logging_steps=5)
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
        proc.kill()  # SIGKILL: no handler runs, the lock and the `training` status stay behind
    finally:
        proc.wait(timeout=60)
    killed_at = int(latest_checkpoint(task_dir / "checkpoints").name.split("-")[1])
    assert 0 < killed_at < 150
    assert (task_dir / ".lock").exists() and load_meta(task_dir).status == "training"

    result = train_from_meta(task_dir, resume=True)

    assert result.metrics["resumed_from_step"] == killed_at
    assert result.global_step == 150
    assert any("stale lock" in note for note in result.notes)
    steps = [h["step"] for h in result.metrics["loss_history"]]
    assert steps == sorted(set(steps)) and steps[-1] == 150  # history continued, not restarted


@pytest.mark.parametrize(
    "error", [torch.cuda.OutOfMemoryError("CUDA out of memory."), MemoryError()], ids=repr
)
def test_out_of_memory_says_what_to_lower(
    error: BaseException, tiny_model_dir: Path, tmp_path: Path
) -> None:
    class Exhausted(LoRATrainer):
        def build_trainer(self, model, data):
            raise error

    config = tiny_config(tiny_model_dir, data_path=str(write_data(tmp_path / "d.jsonl")))
    config = config.replace(preset="minimal")
    with pytest.raises(OutOfMemoryError) as caught:
        Exhausted(config, task_dir=tmp_path / "task").train()
    message = str(caught.value)
    assert "Out of memory on cpu" in message and "preset minimal" in message
    assert "estimated peak" in message and "GiB" in message
    for advice in ("per_device_train_batch_size (now 4)", "max_length (now 64)"):
        assert advice in message
    assert "gradient_checkpointing" in message and "4-bit" in message
    assert load_meta(tmp_path / "task").status == "failed"
    assert not (tmp_path / "task" / ".lock").exists()


def test_a_non_finite_gradient_stops_the_run_and_keeps_the_last_good_state(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A learning rate of 1e30 without clipping overflows the weights after a step or two: a
    later step's gradient is NaN. The run stops at that step, before the optimizer applies it,
    and saves the weights of the step before."""
    task = tmp_path / "task"
    config = tiny_config(
        tiny_model_dir,
        data_path=str(write_data(tmp_path / "d.jsonl")),
        learning_rate=1e30,
        max_grad_norm=0.0,
        max_steps=8,
        logging_steps=1,
        save_steps=100,
    )
    with pytest.raises(TrainingError) as caught:
        LoRATrainer(config, task_dir=task).train()
    message = str(caught.value)
    found = re.match(
        r"Training stopped at step (\d+): the gradient norm became nan in float32", message
    )
    assert found, message
    step = int(found.group(1))
    assert 1 < step < 8 and "\n" not in message
    assert "a lower learning_rate (now 1e+30)" in message and "max_grad_norm=1.0" in message
    assert f"checkpoint-{step} holds the weights of step {step - 1}" in message
    meta = load_meta(task)
    assert meta.status == "failed" and not (task / "adapter").exists()
    weights = load_file(task / "checkpoints" / f"checkpoint-{step}" / "adapter_model.safetensors")
    assert weights and all(bool(torch.isfinite(w).all()) for w in weights.values())


def test_the_evaluation_before_training_is_cached_per_model_data_and_settings(
    make_prepared_task,
) -> None:
    task_dir = make_prepared_task(eval_ratio=0.2, max_steps=2, save_steps=100)

    def first_evaluation(**overrides) -> dict:
        result = train_from_meta(task_dir, force=True, **overrides)
        return next(h for h in result.metrics["eval_loss_history"] if h["step"] == 0)

    cache = task_dir / ".cache" / "base-eval.json"
    fresh = first_evaluation()
    assert cache.is_file()
    (entry,) = json.loads(cache.read_text()).values()
    assert entry["eval_loss"] == fresh["loss"]
    # The same model, split and settings: the cached numbers, not a new evaluation (the
    # evaluation's own runtime would differ).
    assert first_evaluation() == fresh
    log = json.loads((task_dir / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
    assert log["log_history"][0]["eval_runtime"] == entry["eval_runtime"]
    first_evaluation(max_length=48)  # another rendering of the split: evaluated again
    assert len(json.loads(cache.read_text())) == 2


def test_runtime_policy_on_a_cpu() -> None:
    cpu = Hardware()
    runtime = resolve_runtime(TrainingConfig(), cpu)
    assert (runtime.device, runtime.fp16, runtime.bf16) == ("cpu", False, False)
    assert runtime.quantization is None
    assert resolve_runtime(TrainingConfig(bf16=True), cpu).dtype_name == "bfloat16"
    with pytest.raises(ConfigError, match="fp16 mixed precision needs a CUDA GPU"):
        resolve_runtime(TrainingConfig(fp16=True), cpu)
    paged = resolve_runtime(PresetConfigs.minimal(), cpu)
    assert paged.optim == "adamw_bnb_8bit" and paged.notes
    assert paged.quantization == "4bit"


def test_runtime_policy_on_gpus_and_apple() -> None:
    gpu = Hardware.assumed("cuda")
    assert resolve_runtime(TrainingConfig(), gpu).dtype_name == "bfloat16"
    assert resolve_runtime(PresetConfigs.minimal(), gpu).optim == "paged_adamw_8bit"
    old_gpu = Hardware(cuda=True, cuda_bf16=False)
    assert resolve_runtime(TrainingConfig(), old_gpu).dtype_name == "float16"
    with pytest.raises(ConfigError, match="does not support bf16"):
        resolve_runtime(TrainingConfig(bf16=True), old_gpu)
    apple = Hardware.assumed("mps")
    assert resolve_runtime(TrainingConfig(), apple).device == "mps"
    quantized = resolve_runtime(PresetConfigs.minimal(), apple)
    assert quantized.device == "cpu" and any("MPS" in note for note in quantized.notes)
    assert resolve_runtime(TrainingConfig(optim="adamw_bnb_8bit"), apple).optim == "adamw_torch"


def test_latest_checkpoint_is_numeric_and_complete(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints"
    for step in (500, 900, 1000):
        checkpoint = folder / f"checkpoint-{step}"
        checkpoint.mkdir(parents=True)
        (checkpoint / "adapter_model.safetensors").write_bytes(b"x")
        if step != 1000:  # checkpoint-1000 was cut short before trainer_state.json
            (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (folder / "checkpoint-950").mkdir()  # empty
    assert [step for step, _ in list_checkpoints(folder)] == [500, 900, 950, 1000]
    assert latest_checkpoint(folder) == folder / "checkpoint-900"


def test_a_live_lock_refuses_a_second_run(
    tiny_model_dir: Path, tmp_path: Path, make_prepared_task
) -> None:
    task_dir = make_prepared_task()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (task_dir / ".lock").write_text(
            json.dumps({"pid": holder.pid, "host": socket.gethostname(), "started_at": "now"})
        )
        with pytest.raises(LockError, match=f"being trained by process {holder.pid}"):
            train_from_meta(task_dir)
    finally:
        holder.kill()
        holder.wait()
    assert load_meta(task_dir).status == "prepared"  # the refused run changed nothing
    assert json.loads((task_dir / ".lock").read_text())["pid"] == holder.pid


def test_a_stale_lock_is_taken_over(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock_file = tmp_path / ".lock"
    lock_file.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))

    with RunLock(tmp_path) as lock:
        assert lock.took_over == {"pid": dead.pid, "host": socket.gethostname()}
        assert json.loads(lock_file.read_text())["pid"] == os.getpid()
        with pytest.raises(LockError):  # held by this live process now
            RunLock(tmp_path).acquire()
    assert not lock_file.exists()

    lock_file.write_text("{garbled")  # a lock cut short by a crash is stale too
    with RunLock(tmp_path) as lock:
        assert lock.took_over == {}
