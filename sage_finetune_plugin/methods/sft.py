"""Supervised fine-tuning: the model learns the answers of instruction, chat, completion and
text records, the loss on answer tokens only.

A record becomes ``input_ids`` and ``labels`` (-100 on the prompt) through the chat template
(data/rendering.py), truncated to ``max_length``; batches are padded or packed. The trainer is
``transformers.Trainer``, with the loss on answer tokens computed without full logits
(training/loss.py) where the model allows it, Liger's fused kernel on CUDA when it is
installed, and per-sample attention for packed rows (training/attention.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from ..training.memory import MemoryProfile
from .base import Method, Preview

if TYPE_CHECKING:
    from datasets import Features
    from transformers import PreTrainedTokenizerBase, Trainer

    from ..data.prepared import PreparedDataset, PrepareOptions
    from ..data.rendering import Renderer
    from ..training.recipe import LoRATrainer


class SFT(Method):
    name = "sft"
    title = "supervised fine-tuning"
    description = "Supervised fine-tuning: learn the answers (loss on answer tokens only)."
    formats: ClassVar[tuple[str, ...]] = (
        "alpaca",
        "qa",
        "conversation",
        "prompt_completion",
        "text",
    )
    reads = "alpaca, qa, conversation, prompt_completion or text records"
    memory = MemoryProfile(answer_loss=True)
    packing = True

    def cache_fields(self, options: PrepareOptions) -> dict[str, Any]:
        return {"train_on_prompt": options.train_on_prompt}

    def features(self) -> Features:
        from datasets import Features, List, Value

        ints = Value("int32")
        return Features(
            {
                "input_ids": List(ints),
                "labels": List(ints),
                "length": ints,
                **{column: ints for column in ("_length", "_full_length", "_trainable", "_tokens")},
            }
        )

    def render(self, renderer: Renderer, rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
        from ..data.rendering import IGNORE_INDEX

        out: dict[str, list[Any]] = {name: [] for name in self.features()}
        for ids, labels, full_length in renderer.encode(rows):
            trainable = sum(1 for label in labels[1:] if label != IGNORE_INDEX)
            for name, value in (
                ("input_ids", ids),
                ("labels", labels),
                ("length", len(ids)),
                ("_length", len(ids)),
                ("_full_length", full_length),
                ("_trainable", trainable),
                ("_tokens", len(ids)),
            ):
                out[name].append(value)
        return out

    def collator(self, tokenizer: PreTrainedTokenizerBase, packing: bool) -> Callable[..., Any]:
        from ..data.collators import make_collator

        return make_collator(tokenizer, packing)

    def preview(self, renderer: Renderer, rows: Sequence[Mapping[str, Any]]) -> list[Preview]:
        """Decoded token runs after truncation, each marked trained on or not."""
        from ..data.rendering import IGNORE_INDEX

        tokenizer = renderer.tokenizer
        assert tokenizer is not None
        samples = []
        for ids, labels, _ in renderer.encode(rows):
            runs: list[tuple[list[int], bool]] = []
            for token, label in zip(ids, labels, strict=True):
                trainable = label != IGNORE_INDEX
                if runs and runs[-1][1] == trainable:
                    runs[-1][0].append(token)
                else:
                    runs.append(([token], trainable))
            samples.append([(tokenizer.decode(tokens), trainable) for tokens, trainable in runs])
        return samples

    def build_trainer(self, recipe: LoRATrainer, model: Any, data: PreparedDataset) -> Trainer:
        from transformers import Trainer

        from ..training.attention import install_segment_attention
        from ..training.loss import AnswerLossTrainer, install_answer_loss, liger_available

        if data.packing:
            install_segment_attention(model)
        trainer_class: type[Trainer] = Trainer
        extra: dict[str, Any] = {}
        if recipe.runtime.device == "cuda" and liger_available():
            extra["use_liger_kernel"] = True
        elif install_answer_loss(model):
            trainer_class = AnswerLossTrainer
        trainer = trainer_class(
            model=model,
            args=recipe.training_arguments(data, **extra),
            train_dataset=data.train,
            eval_dataset=data.eval,
            data_collator=data.collator,
            processing_class=recipe.tokenizer,
        )
        recipe.install_callbacks(trainer)
        return trainer
