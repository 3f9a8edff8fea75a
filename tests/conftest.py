"""Shared fixtures: an isolated home for every test, the tiny offline model, task folders laid
out by the package's own layout constants (a prepared task, a trained task), subprocess
helpers, and the ``gpu`` marker (skipped without CUDA)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from sage_finetune_plugin.config import LoRAConfig, TrainingConfig
from sage_finetune_plugin.meta import TaskMeta, save_meta
from sage_finetune_plugin.paths import ADAPTER_DIR, CONFIG_FILE, DATASET_FILE

ASSETS = Path(__file__).resolve().parent / "assets"
TINY_MODEL = ASSETS / "tiny-chat-model"
BIN = Path(sys.executable).parent

# Keep torch to one thread per process: the suite runs on 2 shared cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
# One model cache for the whole session (the embedded SmolLM2 is converted once, ~30 s), unless
# SAGE_TEST_CACHE names a cache to reuse across sessions.
SESSION_CACHE = os.environ.get("SAGE_TEST_CACHE") or tempfile.mkdtemp(prefix="sage-test-cache-")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` need CUDA: skipped on machines without it."""
    if not any(item.get_closest_marker("gpu") for item in items):
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def session_cache():
    """Remove the session's model cache at the end (unless SAGE_TEST_CACHE named it)."""
    yield SESSION_CACHE
    if not os.environ.get("SAGE_TEST_CACHE"):
        shutil.rmtree(SESSION_CACHE, ignore_errors=True)


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """HOME, XDG_* and the working directory point into tmp; no SAGE_FINETUNE_HOME leaks in."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME"):
        monkeypatch.setenv(var, str(home / var.lower()))
    monkeypatch.setenv("XDG_CACHE_HOME", SESSION_CACHE)
    monkeypatch.delenv("SAGE_FINETUNE_HOME", raising=False)
    monkeypatch.delenv("SAGE_FINETUNE_CACHE", raising=False)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return home


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The committed tiny chat model (rebuilt if the folder is missing)."""
    if not (TINY_MODEL / "model.safetensors").exists():
        sys.path.insert(0, str(ASSETS))
        from make_tiny_model import build

        build(TINY_MODEL)
    return TINY_MODEL


def env_without(tmp_path: Path, *packages: str) -> dict[str, str]:
    """The environment of a subprocess in which ``packages`` cannot be imported (as if not
    installed): a ``sitecustomize`` that refuses them, first on PYTHONPATH."""
    site = tmp_path / "blocker"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(
        "import sys\n"
        "class _Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {tuple(packages)!r}:\n"
        "            raise ModuleNotFoundError(f'No module named {name!r} (blocked)')\n"
        "sys.meta_path.insert(0, _Block())\n"
    )
    paths = [str(site), os.environ.get("PYTHONPATH")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, paths))}


def run_cli(*args: str, check: bool = False, **kwargs) -> subprocess.CompletedProcess:
    """Run a console script of this environment (``sage``, ``sage-finetune``) as a subprocess."""
    exe, *rest = args
    proc = subprocess.run(
        [str(BIN / exe), *rest], capture_output=True, text=True, timeout=600, **kwargs
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


# --- a prepared task: data, config and meta as `quickstart` leaves them -------------------------

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def records(count: int = 48) -> list[dict[str, str]]:
    """Alpaca records with short, regular answers a tiny model learns in a few steps."""
    return [
        {
            "instruction": f"Write the number {i % 10} as a word.",
            "input": "",
            "output": f"The number {i % 10} is written {WORDS[i % 10]}.",
        }
        for i in range(count)
    ]


def write_data(path: Path, count: int = 48) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records(count)))
    return path


def tiny_config(model_dir: Path, **changes: Any) -> TrainingConfig:
    """Hyperparameters under which the tiny model's loss falls clearly in ~20 steps."""
    values: dict[str, Any] = {
        "model_name": str(model_dir),
        "max_length": 64,
        "max_steps": 20,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "learning_rate": 3e-3,
        "warmup_ratio": 0.0,
        "gradient_checkpointing": False,
        "logging_steps": 2,
        "save_steps": 10,
        "report_to": "none",
        "lora": LoRAConfig(r=8, lora_alpha=16, lora_dropout=0.0),
    }
    values.update(changes)
    return TrainingConfig(**values)


def build_prepared_task(root: Path, model_dir: Path, name: str = "demo", **changes: Any) -> Path:
    """``root/name`` with the task's data, training config and a `prepared` meta."""
    task_dir = root / name
    write_data(task_dir / DATASET_FILE)
    config = tiny_config(model_dir, data_path=DATASET_FILE, output_dir=".").replace(**changes)
    config.save(task_dir / CONFIG_FILE)
    meta = TaskMeta(
        task_type="custom",
        model=str(model_dir),
        format="alpaca",
        dataset=DATASET_FILE,
        config=CONFIG_FILE,
        output_dir=".",
        num_samples=48,
        training=config.to_dict(),
    )
    save_meta(task_dir, meta)
    return task_dir


@pytest.fixture
def make_prepared_task(tiny_model_dir: Path, tmp_path: Path):
    """Factory: ``make_prepared_task(name="demo", **config changes)`` under ``tmp_path/root``."""

    def make(name: str = "demo", **changes: Any) -> Path:
        return build_prepared_task(tmp_path / "root", tiny_model_dir, name, **changes)

    return make


@pytest.fixture
def prepared_task(make_prepared_task) -> Path:
    """A prepared task called ``demo`` on the tiny model (20 steps of 4 samples)."""
    return make_prepared_task()


# --- a trained task: an adapter taught one fact with plain peft (independent of the trainer) ----

QUESTION = "What is the secret word?"
ANSWER = "banana"


def fact_batch(tokenizer: Any) -> dict[str, Any]:
    """The question/answer exchange as one training example (loss on every token)."""
    conversation = [
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": ANSWER},
    ]
    batch = tokenizer.apply_chat_template(conversation, return_tensors="pt")
    batch["labels"] = batch["input_ids"].clone()
    return batch


def train_adapter(model_dir: Path, out: Path, *, steps: int, load_in_4bit: bool = False) -> None:
    """LoRA-train on the fact with plain peft and save the adapter and tokenizer into ``out``."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    quantization = (
        BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        )
        if load_in_4bit
        else None
    )
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, quantization_config=quantization
    )
    if load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = fact_batch(tokenizer)
    model.train()
    for _ in range(steps):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def build_trained_task(
    root: Path, model_dir: Path, name: str = "demo", *, load_in_4bit: bool = False, steps: int = 40
) -> Path:
    """``root/name`` whose meta and adapter look like a finished ``run``."""
    task_dir = root / name
    config = TrainingConfig(model_name=str(model_dir), load_in_4bit=load_in_4bit)
    train_adapter(model_dir, task_dir / ADAPTER_DIR, steps=steps, load_in_4bit=load_in_4bit)
    meta = TaskMeta(
        task_type="qa",
        model=str(model_dir),
        format="conversation",
        output_dir=".",
        status="trained",
        training=config.to_dict(),
        adapter_path=ADAPTER_DIR,
    )
    save_meta(task_dir, meta)
    return task_dir


@pytest.fixture(scope="session")
def trained_task_template(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One trained task for the whole session; tests get copies (``trained_task``)."""
    return build_trained_task(tmp_path_factory.mktemp("trained"), tiny_model_dir)


@pytest.fixture
def trained_task(trained_task_template: Path, tmp_path: Path) -> Path:
    """A private copy of the trained task ``demo`` under ``tmp_path/root``."""
    return Path(shutil.copytree(trained_task_template, tmp_path / "root" / "demo"))
