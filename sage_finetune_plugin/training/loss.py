"""The training loss on answer tokens only, without the full logits.

A causal LM computes logits (batch x sequence x vocabulary) for every position and then the
cross-entropy on the positions whose (shifted) label is not -100. With prompt masking about half
of the positions are prompt, and the fp32 logits, their log-softmax and their gradient are the
largest tensors of a LoRA step (three copies of 200 MB for 4 x 256 tokens of SmolLM2). Here the
decoder runs as usual, then only the hidden states of positions with a label go through the
output head, in chunks: each chunk's logits give its loss and, at once, the gradient of the
loss with respect to those hidden states (softmax minus one-hot, times the head), so the logits
of a chunk are freed before the next one and nothing is recomputed in the backward pass (the
scheme of Liger's fused linear cross-entropy, in plain torch). The numbers are those of the
plain computation: the matrix product in the autocast dtype like ``lm_head`` under autocast,
the softmax in fp32 like transformers' ``ForCausalLMLoss``, the sum divided by
``num_items_in_batch`` (the Trainer's count over gradient accumulation) or by the number of
labelled positions.

What libraries offer was checked first: transformers' ``logits_to_keep`` keeps the same
positions in every row (not a per-row mask) and computes full logits for them; TRL's fused LM
head scores every position off Triton devices and recomputes each tile in the backward pass (and
TRL is an optional extra); Liger's fused linear cross-entropy needs Triton, so CUDA only: there
``training_arguments`` turns on the Trainer's ``use_liger_kernel`` when ``liger-kernel`` is
installed, and this module stands aside.

``install_answer_loss(model)`` patches the forward of the causal LM (under PEFT: the wrapped
model) to take one more keyword, ``answer_loss=True``; ``AnswerLossTrainer`` passes it when
only the loss is needed (training steps, and evaluation without ``compute_metrics``). Models
outside ``runtime.ANSWER_LOSS_MODEL_TYPES`` (whose forward is decoder -> ``lm_head`` -> loss
and nothing else: no logit scaling or soft-capping, no auxiliary loss) and sharded weights
(FSDP, DeepSpeed) keep the plain computation.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import types
from typing import Any

import torch
from transformers import Trainer
from transformers.modeling_outputs import CausalLMOutputWithPast

from .distributed import deepspeed_enabled, fsdp_enabled
from .runtime import ANSWER_LOSS_MODEL_TYPES, LOSS_CHUNK_ELEMENTS

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
#: The keyword the patched forward takes.
FLAG = "answer_loss"


def liger_available() -> bool:
    """Whether Liger's kernels are installed (they run on CUDA only)."""
    return importlib.util.find_spec("liger_kernel") is not None


def unsupported_reason(model: Any) -> str | None:
    """Why the answer-token loss cannot replace ``model``'s own (None when it can)."""
    causal_lm = _causal_lm(model)
    model_type = getattr(causal_lm.config, "model_type", None)
    if model_type not in ANSWER_LOSS_MODEL_TYPES:
        return f"model type {model_type!r} is not among those checked"
    if fsdp_enabled() or deepspeed_enabled():
        return "the weights are sharded (FSDP or DeepSpeed)"
    head = causal_lm.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or causal_lm.base_model is causal_lm:
        return "the model has no separate decoder and linear output head"
    return None


def install_answer_loss(model: Any) -> bool:
    """Let ``model`` (a causal LM, or a PEFT model around one) compute its loss on labelled
    positions only when called with ``answer_loss=True``; False (and nothing changed) for a
    model this does not support. Installing twice is harmless."""
    reason = unsupported_reason(model)
    if reason is not None:
        logger.info("Loss over all positions (%s)", reason)
        return False
    causal_lm = _causal_lm(model)
    if getattr(causal_lm.forward, "_answer_loss", False):
        return True
    original = causal_lm.forward

    # The class's signature (through __wrapped__): the Trainer reads it to pass loss kwargs.
    @functools.wraps(type(causal_lm).forward)
    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not kwargs.pop(FLAG, False) or kwargs.get("labels") is None:
            return original(*args, **kwargs)
        return _answer_loss_forward(self, *args, **kwargs)

    forward._answer_loss = True  # type: ignore[attr-defined]
    causal_lm.forward = types.MethodType(forward, causal_lm)
    return True


class AnswerLossTrainer(Trainer):
    """A ``transformers.Trainer`` that asks the model for the answer-token loss (a model
    prepared with ``install_answer_loss``) whenever the logits are not needed."""

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        logits_needed = return_outputs and (
            self.compute_metrics is not None or self.preprocess_logits_for_metrics is not None
        )
        if "labels" in inputs and self.label_smoother is None and not logits_needed:
            inputs = {**inputs, FLAG: True}
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def answer_token_loss(
    hidden: torch.Tensor,
    head: torch.nn.Linear,
    labels: torch.Tensor,
    num_items_in_batch: Any = None,
) -> torch.Tensor:
    """The causal-LM cross-entropy of ``hidden`` (batch x sequence x hidden, the decoder's
    output) through ``head`` against ``labels`` shifted by one, on labelled positions only:
    the sum divided by ``num_items_in_batch``, or the mean over labelled positions."""
    shifted = labels[:, 1:].to(hidden.device)
    mask = shifted != IGNORE_INDEX
    selected = hidden[:, :-1][mask]
    targets = shifted[mask]
    total = linear_cross_entropy(selected, head.weight, head.bias, targets)
    if num_items_in_batch is None:
        return total / mask.sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    chunk_elements: int = LOSS_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Summed cross-entropy of ``hidden @ weight.T + bias`` (positions x vocabulary) against
    ``targets``, computed in chunks of positions; differentiable with respect to all three."""
    chunk = max(1, chunk_elements // weight.shape[0])
    inputs = (hidden, weight, bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        return _LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk)
    return _chunked(hidden, weight, bias, targets, chunk, grads=(False, False, False))[0]


class _LinearCrossEntropy(torch.autograd.Function):
    """The loss and, in the same pass, its gradients; backward only scales them."""

    @staticmethod
    def forward(ctx: Any, hidden, weight, bias, targets, chunk):
        grads = tuple(bool(flag) for flag in ctx.needs_input_grad[:3])
        total, *saved = _chunked(hidden, weight, bias, targets, chunk, grads=grads)
        ctx.save_for_backward(*(t for t in saved if t is not None))
        ctx.present = [t is not None for t in saved]
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor):
        stored = iter(ctx.saved_tensors)
        saved = [next(stored) if present else None for present in ctx.present]
        scaled = [None if g is None else (g * grad_total.to(g.dtype)).to(g.dtype) for g in saved]
        return (*scaled, None, None)


def _chunked(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    chunk: int,
    *,
    grads: tuple[bool, ...],
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Summed loss and the requested gradients of it (hidden, weight, bias)."""
    device = hidden.device
    compute = (
        torch.get_autocast_dtype(device.type)
        if torch.is_autocast_enabled(device.type)
        else weight.dtype
    )
    positions, vocab = hidden.shape[0], weight.shape[0]
    total = torch.zeros((), dtype=torch.float32, device=device)
    grad_hidden = torch.empty_like(hidden) if grads[0] else None
    grad_weight = (
        torch.zeros(weight.shape, dtype=torch.float32, device=device) if grads[1] else None
    )
    grad_bias = (
        torch.zeros(vocab, dtype=torch.float32, device=device)
        if grads[2] and bias is not None
        else None
    )
    if positions == 0:
        return total, grad_hidden, _as(grad_weight, weight), _as(grad_bias, bias)
    with torch.autocast(device.type, enabled=False):
        w = weight.to(compute)
        b = bias.to(compute) if bias is not None else None
        rows = min(positions, chunk)
        buffer = torch.empty((rows, vocab), dtype=compute, device=device)
        upcast = (
            torch.empty((rows, vocab), dtype=torch.float32, device=device)
            if compute != torch.float32
            else None
        )
        for start in range(0, positions, chunk):
            end = min(start + chunk, positions)
            h = hidden[start:end].to(compute)
            logits = buffer[: end - start]
            if b is None:
                torch.mm(h, w.t(), out=logits)
            else:
                torch.addmm(b, h, w.t(), out=logits)
            if upcast is not None:
                logits = upcast[: end - start].copy_(logits)
            target = targets[start:end].unsqueeze(1)
            log_z = torch.logsumexp(logits, dim=1, keepdim=True)
            total += (log_z - logits.gather(1, target)).sum()
            if not any(grads):
                continue
            # d loss / d logits = softmax - one-hot, in place of the logits
            probabilities = logits.sub_(log_z).exp_()
            probabilities.scatter_add_(1, target, probabilities.new_full(target.shape, -1.0))
            if grad_hidden is not None:
                grad_hidden[start:end] = torch.mm(probabilities.to(compute), w).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += torch.mm(probabilities.t(), h.float())
            if grad_bias is not None:
                grad_bias += probabilities.sum(0)
    return total, grad_hidden, _as(grad_weight, weight), _as(grad_bias, bias)


def _as(gradient: torch.Tensor | None, like: torch.Tensor | None) -> torch.Tensor | None:
    return gradient if gradient is None or like is None else gradient.to(like.dtype)


def _causal_lm(model: Any) -> Any:
    """The transformers causal LM inside a PEFT model (the model itself otherwise)."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def _answer_loss_forward(
    self: Any,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    logits_to_keep: Any = None,
    **kwargs: Any,
) -> CausalLMOutputWithPast:
    """The causal LM's forward with the answer-token loss and no logits. A right-padded batch
    whose padding has no labels runs without its attention mask, as a plain causal one: real
    tokens never attend to the padding after them, so their outputs and the loss are the same,
    and attention can skip the masked half and the repeated keys and values."""
    kwargs["use_cache"] = False
    if _right_padding_without_labels(attention_mask, labels, position_ids):
        attention_mask = None
    outputs = self.base_model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        inputs_embeds=inputs_embeds,
        **kwargs,
    )
    loss = answer_token_loss(outputs[0], self.get_output_embeddings(), labels, num_items_in_batch)
    return CausalLMOutputWithPast(loss=loss, logits=None)


def _right_padding_without_labels(
    attention_mask: torch.Tensor | None, labels: torch.Tensor, position_ids: torch.Tensor | None
) -> bool:
    """Whether every row of ``attention_mask`` is ones then zeros, with no label on a zero."""
    if attention_mask is None or attention_mask.dim() != 2 or position_ids is not None:
        return False
    mask = attention_mask.bool()
    ones = mask.sum(dim=1, keepdim=True)
    prefix = torch.arange(mask.shape[1], device=mask.device) < ones
    return bool(torch.equal(mask, prefix) and (labels[~mask] == IGNORE_INDEX).all())
