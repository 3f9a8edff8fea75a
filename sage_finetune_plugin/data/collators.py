"""Collators: batches of tokenized samples as tensors, padded dynamically or packed.

``PaddingCollator`` pads a batch to its longest sample (labels padded with -100 by position,
never by token id, so a pad token equal to EOS still trains the EOS). ``PackingCollator``
concatenates a batch into one row with position ids restarting at every sample
(transformers' padding-free "flattening").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .rendering import IGNORE_INDEX

if TYPE_CHECKING:
    import torch


def make_collator(tokenizer: Any, packing: bool) -> Callable[..., dict[str, Any]]:
    """The collator a run uses: packing, or padding with the tokenizer's pad (else EOS) id."""
    if packing:
        return PackingCollator()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return PaddingCollator(pad_token_id=pad)


@dataclass
class PaddingCollator:
    """Pads a batch to its longest sample (optionally a multiple of ``pad_to_multiple_of``).

    Returns int64 tensors input_ids, attention_mask and labels; labels are -100 on padding by
    position, never by token id, so a pad token equal to EOS still trains the EOS.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, rows: list[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        import torch

        longest = max(len(row["input_ids"]) for row in rows)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        shape = (len(rows), longest)
        input_ids = torch.full(shape, self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(shape, dtype=torch.long)
        labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            input_ids[i, :n] = torch.as_tensor(row["input_ids"], dtype=torch.long)
            labels[i, :n] = torch.as_tensor(row["labels"], dtype=torch.long)
            attention_mask[i, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@dataclass
class PackingCollator:
    """Packs a batch into one row without padding (transformers' DataCollatorWithFlattening).

    Returns input_ids, labels and position_ids of shape (1, total tokens); position ids
    restart at 0 for every sample and the first label of each sample is -100. There is no
    attention_mask: transformers 5 derives per-sample attention from the restarting position
    ids. flash_attention_2 (varlen), sdpa and eager then keep samples apart, the last two only
    when the model runs without a KV cache (``model.config.use_cache = False``, as in
    training); with a cache, or if an attention_mask is added, samples attend to each other.
    """

    flattener: Any = field(init=False, repr=False)

    def __post_init__(self) -> None:
        from transformers import DataCollatorWithFlattening

        self.flattener = DataCollatorWithFlattening(return_position_ids=True)

    def __call__(self, rows: list[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        features = [{"input_ids": row["input_ids"], "labels": row["labels"]} for row in rows]
        return self.flattener(features, return_tensors="pt")
