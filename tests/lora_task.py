"""A trained task on the tiny model, built with plain peft (independent of trainer.py).

The adapter is taught one made-up fact with a few dozen real optimizer steps, so a merged or
adapted model answers differently from the base model.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from sage_finetune_plugin.config import TrainingConfig
from sage_finetune_plugin.meta import TaskMeta, save_meta

QUESTION = "What is the secret word?"
ANSWER = "banana"


def fact_batch(tokenizer) -> dict[str, torch.Tensor]:
    """The question/answer exchange as one training example (loss on every token)."""
    conversation = [
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": ANSWER},
    ]
    batch = tokenizer.apply_chat_template(conversation, return_tensors="pt")
    batch["labels"] = batch["input_ids"].clone()
    return batch


def train_adapter(model_dir: Path, out: Path, *, steps: int, load_in_4bit: bool = False) -> None:
    """LoRA-train on the fact and save the adapter and tokenizer into ``out``."""
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


def make_task(
    root: Path, model_dir: Path, name: str = "demo", *, load_in_4bit: bool = False
) -> Path:
    """A task directory whose meta and ``adapter/`` look like a finished ``run``."""
    task_dir = root / name
    config = TrainingConfig(model_name=str(model_dir), load_in_4bit=load_in_4bit)
    train_adapter(model_dir, task_dir / "adapter", steps=40, load_in_4bit=load_in_4bit)
    meta = TaskMeta(
        task_type="qa",
        model=str(model_dir),
        format="conversation",
        output_dir=".",
        status="trained",
        training=config.to_dict(),
        adapter_path="adapter",
    )
    save_meta(task_dir, meta)
    return task_dir


def copy_task(task_dir: Path, root: Path) -> Path:
    """A private copy of a prepared task under ``root``."""
    return Path(shutil.copytree(task_dir, root / task_dir.name))
