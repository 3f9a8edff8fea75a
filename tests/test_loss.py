"""The answer-token loss (training/loss.py) against the plain computation: the model's own loss
over full logits. Loss and LoRA gradients must be equal, on padded and packed batches of real
prepared samples, with and without train_on_prompt, with rows that have no label, in fp32 and
under bf16 autocast; the Trainer's evaluation loss must be the same number."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sage_finetune_plugin.data import prepare_dataset
from sage_finetune_plugin.data.collators import make_collator
from sage_finetune_plugin.training import loss as loss_module
from sage_finetune_plugin.training.loss import (
    FLAG,
    AnswerLossTrainer,
    install_answer_loss,
    linear_cross_entropy,
    unsupported_reason,
)

from conftest import tiny_config, write_data

RECORDS = [
    {"instruction": "Name the capital of France.", "output": "Paris."},
    {
        "instruction": "Add the numbers.",
        "input": "12 and 30",
        "output": "12 plus 30 is 42, which is the answer to the question.",
    },
    {"instruction": "Hi", "output": "Hello", "system": "You are terse."},
    {
        "instruction": "Translate to Chinese.",
        "input": "good morning",
        "output": "早上好。今天天气很好。",
        "history": [["Say hi.", "Hi!"]],
    },
]


def lora_model(model_dir: Path, dtype=torch.float32):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model.config.use_cache = False
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")
    model = get_peft_model(model, config)
    for name, parameter in model.named_parameters():  # lora_B starts at zero: make it matter
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.02)
    return model


def batch_of(model_dir: Path, *, packing: bool, train_on_prompt: bool, no_labels: bool):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prepared = prepare_dataset(
        RECORDS,
        tokenizer,
        max_length=40,  # the Chinese sample is truncated
        train_on_prompt=train_on_prompt,
        packing=packing,
    )
    rows = [dict(row) for row in prepared.train]
    if no_labels:  # a prompt-only row: every label masked
        rows.append({**rows[0], "labels": [-100] * len(rows[0]["labels"])})
    return make_collator(tokenizer, packing)(rows)


def loss_and_grads(model, batch, **kwargs):
    model.zero_grad(set_to_none=True)
    loss = model(**batch, **kwargs).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize(
    ("packing", "train_on_prompt", "no_labels"),
    [(False, False, False), (False, True, False), (True, False, False), (False, False, True)],
)
def test_loss_and_lora_gradients_equal_the_plain_computation(
    tiny_model_dir: Path, packing: bool, train_on_prompt: bool, no_labels: bool
) -> None:
    model = lora_model(tiny_model_dir)
    assert install_answer_loss(model)
    batch = batch_of(
        tiny_model_dir, packing=packing, train_on_prompt=train_on_prompt, no_labels=no_labels
    )
    assert ("position_ids" in batch) == packing
    if not packing:  # padded: the forward drops the mask and runs causal attention
        assert loss_module._right_padding_without_labels(
            batch["attention_mask"], batch["labels"], None
        )
        assert not batch["attention_mask"].all()
    for count in (None, torch.tensor(57)):  # the Trainer's count over gradient accumulation
        extra = {} if count is None else {"num_items_in_batch": count}
        plain, plain_grads = loss_and_grads(model, batch, **extra)
        answer, answer_grads = loss_and_grads(model, batch, **extra, **{FLAG: True})
        torch.testing.assert_close(answer, plain, rtol=1e-5, atol=1e-6)
        assert answer_grads.keys() == plain_grads.keys()
        assert len(answer_grads) == sum(1 for n, _ in model.named_parameters() if "lora_" in n)
        for name, gradient in plain_grads.items():  # equal up to float summation order
            scale = float(gradient.abs().max())
            torch.testing.assert_close(answer_grads[name], gradient, rtol=1e-4, atol=1e-4 * scale)
    assert model(**batch, **{FLAG: True}).logits is None
    assert model(**batch).logits is not None  # without the flag: the model's own forward


def test_bf16_autocast_matches_the_plain_computation(tiny_model_dir: Path) -> None:
    model = lora_model(tiny_model_dir)
    install_answer_loss(model)
    batch = batch_of(tiny_model_dir, packing=False, train_on_prompt=False, no_labels=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain, plain_grads = loss_and_grads(model, batch)
        answer, answer_grads = loss_and_grads(model, batch, **{FLAG: True})
    torch.testing.assert_close(answer, plain, rtol=1e-3, atol=1e-3)
    for name, gradient in plain_grads.items():
        assert gradient.dtype == torch.float32  # LoRA weights stay fp32
        error = (answer_grads[name] - gradient).norm() / gradient.norm().clamp(min=1e-12)
        assert error < 0.02, name


def test_chunked_cross_entropy_with_bias_and_head_gradients() -> None:
    """Chunks smaller than the positions, a bias, and gradients for the head too."""
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    bias = torch.randn(50, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    plain = torch.nn.functional.cross_entropy(hidden @ weight.t() + bias, targets, reduction="sum")
    expected = torch.autograd.grad(plain * 0.5, (hidden, weight, bias))
    fused = linear_cross_entropy(hidden, weight, bias, targets, chunk_elements=50 * 8)
    got = torch.autograd.grad(fused * 0.5, (hidden, weight, bias))
    torch.testing.assert_close(fused, plain)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, bias, targets), plain)


def test_evaluation_loss_is_the_same_number(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoTokenizer, Trainer, TrainingArguments

    calls = []
    answer_token_loss = loss_module.answer_token_loss
    monkeypatch.setattr(
        loss_module,
        "answer_token_loss",
        lambda *args, **kwargs: calls.append(1) or answer_token_loss(*args, **kwargs),
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    data = prepare_dataset(RECORDS * 3, tokenizer, max_length=64)
    model = lora_model(tiny_model_dir)
    install_answer_loss(model)
    results = []
    for trainer_class in (Trainer, AnswerLossTrainer):
        trainer = trainer_class(
            model=model,
            args=TrainingArguments(
                output_dir=str(tmp_path), per_device_eval_batch_size=3, report_to="none"
            ),
            eval_dataset=data.train,
            data_collator=data.collator,
        )
        results.append(trainer.evaluate()["eval_loss"])
        assert len(calls) == (0 if trainer_class is Trainer else 4)  # 12 samples, batches of 3
    assert results[1] == pytest.approx(results[0], rel=1e-6)


def test_models_outside_the_checked_types_keep_their_own_loss(tiny_model_dir: Path) -> None:
    model = lora_model(tiny_model_dir)
    model.get_base_model().config.model_type = "granite"  # divides its logits: not supported
    assert "granite" in unsupported_reason(model)
    assert not install_answer_loss(model)
    assert not hasattr(model.get_base_model().forward, "_answer_loss")


@pytest.mark.parametrize("packing", [False, True])
def test_a_run_trains_on_the_answer_loss(
    tiny_model_dir: Path, tmp_path: Path, packing: bool
) -> None:
    """Through the recipe, with evaluation, and with gradient checkpointing (packed)."""
    from sage_finetune_plugin import LoRATrainer

    config = tiny_config(
        tiny_model_dir,
        data_path=str(write_data(tmp_path / "data.jsonl")),
        output_dir=str(tmp_path / "task"),
        packing=packing,
        gradient_checkpointing=packing,
        eval_ratio=0.1,
        max_steps=12,
    )
    runner = LoRATrainer(config)
    result = runner.train()
    assert isinstance(runner.trainer, AnswerLossTrainer)
    history = result.metrics["loss_history"]
    assert history[-1]["loss"] < 0.8 * history[0]["loss"]
    evals = result.metrics["eval_loss_history"]
    assert evals[-1]["loss"] < evals[0]["loss"]


def test_packed_attention_per_sample_equals_the_block_mask(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sdpa_segments (training/attention.py) against sdpa's block-diagonal mask: loss, LoRA
    gradients and logits of a packed batch; unpacked batches fall back to sdpa."""
    from sage_finetune_plugin.training import attention
    from sage_finetune_plugin.training.attention import NAME, install_segment_attention

    found = []
    segments = attention._segments
    monkeypatch.setattr(attention, "_segments", lambda *a: found.append(segments(*a)) or found[-1])

    batch = batch_of(tiny_model_dir, packing=True, train_on_prompt=False, no_labels=False)
    assert int((batch["position_ids"] == 0).sum()) == len(RECORDS)
    model = lora_model(tiny_model_dir)
    plain, plain_grads = loss_and_grads(model, batch)
    with torch.no_grad():
        logits = model(**batch).logits
    assert install_segment_attention(model)
    assert model.get_base_model().config._attn_implementation == NAME
    segmented, segmented_grads = loss_and_grads(model, batch)
    assert len(found) == 2 and len(found[0]) == len(RECORDS) + 1  # two layers, per sample
    torch.testing.assert_close(segmented, plain, rtol=1e-5, atol=1e-6)
    for name, gradient in plain_grads.items():
        scale = float(gradient.abs().max())
        torch.testing.assert_close(segmented_grads[name], gradient, rtol=1e-4, atol=1e-4 * scale)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, logits, rtol=1e-4, atol=1e-4)
    padded = batch_of(tiny_model_dir, packing=False, train_on_prompt=False, no_labels=False)
    with torch.no_grad():  # a padding mask: sdpa as before
        again = model(**padded).loss
    model.get_base_model().set_attn_implementation("sdpa")
    with torch.no_grad():
        torch.testing.assert_close(again, model(**padded).loss)
