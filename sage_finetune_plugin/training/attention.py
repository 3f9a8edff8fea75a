"""Attention for packed batches, one sample at a time.

A packed batch (data/collators.PackingCollator) is one row of several samples whose position
ids restart at 0. With ``sdpa``, transformers builds a block-diagonal causal mask over the whole
row and attention computes every pair of positions, those across samples included, before
masking them: the cost grows with the square of the row, not with the sum of the squares of
the samples, and an explicit mask keeps the kernel from skipping the causal half. ``sdpa``
for packed rows, registered as ``sdpa_segments``, runs plain causal attention on each sample's
span instead (torch's ``scaled_dot_product_attention`` with ``is_causal``, grouped-query heads
as they are): the same numbers, with a fraction of the work (4 samples of 250 tokens: a
quarter). Anything else (a padding mask, a KV cache, rows without restarting positions) goes
to transformers' ``sdpa`` unchanged, so the model still generates and evaluates as before.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

logger = logging.getLogger(__name__)

NAME = "sdpa_segments"


def segment_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """``sdpa_attention_forward``, one sample at a time for a packed row."""
    bounds = _segments(query, key, position_ids)
    if bounds is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    grouped = getattr(module, "num_key_value_groups", 1) > 1
    outputs = [
        torch.nn.functional.scaled_dot_product_attention(
            query[:, :, start:end],
            key[:, :, start:end],
            value[:, :, start:end],
            dropout_p=dropout,
            scale=scaling,
            is_causal=True,
            enable_gqa=grouped,
        )
        for start, end in itertools.pairwise(bounds)
    ]
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def _segments(
    query: torch.Tensor, key: torch.Tensor, position_ids: torch.Tensor | None
) -> list[int] | None:
    """The sample boundaries of a packed row (None for anything else)."""
    if position_ids is None or query.shape[0] != 1 or key.shape[2] != query.shape[2]:
        return None
    positions = position_ids.reshape(-1)
    if positions.numel() != query.shape[2] or int(positions[0]) != 0:
        return None
    starts = torch.nonzero(positions == 0).reshape(-1).tolist()
    if len(starts) < 2:
        return None
    return [*starts, positions.numel()]


def install_segment_attention(model: Any) -> bool:
    """Let ``model`` (a PEFT model or a transformers model) attend within each sample of a
    packed row; False (nothing changed) unless it runs transformers' ``sdpa``."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(causal_lm.config, "_attn_implementation", None) not in ("sdpa", NAME):
        return False
    AttentionInterface.register(NAME, segment_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    causal_lm.set_attn_implementation(NAME)
    logger.info("Packed batches: attention within each sample")
    return True
