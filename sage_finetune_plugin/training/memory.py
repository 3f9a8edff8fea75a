"""Peak-memory estimate of a LoRA / QLoRA run, and whether it fits.

``estimate_memory(config)`` predicts the peak memory of training ``config`` from the model's
configuration alone: the model is instantiated on the meta device (no weights are read or
allocated) to count its parameters and list its linear layers, and the rest is arithmetic on
the config (hidden size, layers, heads, vocabulary) and the training settings (batch size,
sequence length, quantization, precision, gradient checkpointing, LoRA targets, optimizer).

What is counted, and why (each term was checked against saved-tensor hooks and peak RSS on the
CPU; see tests/test_memory.py):

- weights: every parameter at the load precision; with 4-bit or 8-bit loading the linear layers
  of the decoder at their quantized size (4-bit: half a byte per weight plus the block
  constants, 8-bit: one byte plus a scale per row) and everything else in fp32, because
  ``prepare_model_for_kbit_training`` upcasts it; on the CPU, the memory-mapped checkpoint
  quantized from stays resident too.
- LoRA weights, their gradients and the optimizer states, all fp32 (8-bit optimizers: 2 bytes);
  DoRA adds a magnitude per output feature. Full and freeze fine-tuning (the adapter unit's
  ``trains_base_weights``) add no weights: the trained ones are the model's, held in fp32, with
  their gradients and optimizer states (the rest stays at the load precision).
- activations saved for the backward pass, per token and decoder layer: the two RMS norms
  (input and inverse RMS, fp32), attention inputs and output (keys and values repeated to every
  head when a padding mask is passed, plus the mask itself), the gated MLP (3 x intermediate),
  and for each LoRA layer its dropout mask and output and its rank-sized hidden state (DoRA:
  also its base and low-rank outputs, and each layer's composed weight; full and freeze: each
  trained layer's input). With
  gradient checkpointing only each layer's input is kept, plus one layer being recomputed. A
  freeze run keeps them only for the layers the backward pass runs through (the adapter's
  ``backward_layers``).
  A quantized model adds bitsandbytes' dequantized weights: one matrix on a GPU, on the CPU
  most of the copies (freed, but kept resident by malloc).
- logits: supervised runs of the model types training/loss.py supports compute the loss on
  answer tokens in chunks: one chunk of logits (fp32, plus its half-precision copy) and the
  gradient of the hidden states; a right-padded batch then runs without its attention mask.
  Other models keep the log-softmax saved by the loss, its gradient and the gradient of the
  logits, each batch x sequence x vocabulary in fp32 (plus the half-precision logits).
- overhead: on a GPU the CUDA context and allocator slack; on the CPU the resident size of
  Python with torch, transformers, peft and datasets loaded, plus the freed activation memory
  that glibc's malloc keeps resident (measured: half of a step's activations).

Preference tuning (``config.method``) changes four terms. DPO and ORPO run the chosen and the
rejected answer of each pair through the model together, so activations and logits are those
of twice the batch. TRL's trainers turn dropout off, so no dropout masks are saved. DPO and
KTO score tokens with TRL's fused LM head, in chunks of at most ``FUSED_HEAD_CHUNK`` positions.
And DPO and KTO run the reference model: the same weights with the adapter disabled (or a
frozen copy of a continued adapter, counted in ``reference``), in forward passes without
gradients while the policy's activations and logits are held; such a pass keeps one layer's
tensors and its own chunk of logits at a time (KTO's passes for its KL term, one after the
other, the same). Against peak RSS on the CPU (SmolLM2-135M, 4 pairs x 256 tokens, the runs
``NO_GRAD_LOGITS_COPIES`` was measured on): dpo -2 %, dpo with gradient checkpointing 0 %,
orpo -6 %, kto -2 %.

GRPO (``MemoryProfile.generations``) samples the completions of a step first, without
gradients: their KV cache (prompt and completion, every layer, keys and values) and the last
position's logits are added (the ``generation`` component); the step then trains on prompt +
completion sequences (``max_length`` bounds the prompt, ``grpo_max_completion_length`` is
added), and with ``grpo_beta`` > 0 the reference passes are counted as for DPO. Not yet
checked against a measured peak.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..adapters import adapter_for
from ..config import TrainingConfig
from ..errors import ModelError
from ..methods import get_method
from .runtime import (
    ANSWER_LOSS_MODEL_TYPES,
    LOSS_CHUNK_ELEMENTS,
    Hardware,
    Runtime,
    resolve_runtime,
)

if TYPE_CHECKING:
    from transformers import PretrainedConfig


GIB = 2**30
MIB = 2**20

#: Share of the device memory kept free by ``fits`` (the run's memory check, the automatic
#: preset).
DEFAULT_MARGIN = 0.1
#: Resident memory of a Python process with torch, transformers, peft, datasets and a Trainer
#: at work, on a negligible model (measured on Linux x86-64, torch 2.13 CPU: 0.54 GiB peak
#: training the tiny test model).
CPU_BASELINE = 560 * MIB
#: Share of a step's activation memory (as if nothing were checkpointed) that glibc's malloc
#: keeps resident after it is freed, measured on SmolLM2-135M with the answer-token loss
#: (packed 1 x 1024 and padded 4 x 256 tokens, with and without gradient checkpointing).
CPU_ALLOCATOR_RETENTION = 0.9
#: CUDA context, cuBLAS workspaces and kernels loaded on the GPU, outside torch's allocator.
CUDA_CONTEXT = 700 * MIB
#: Caching-allocator slack on the GPU, as a share of the memory allocated per step.
CUDA_ALLOCATOR_SLACK = 0.1
#: 4-bit quantization stores one absmax per 64 weights: a byte (double quantization, plus one
#: fp32 constant per 256 blocks) or an fp32.
BNB_4BIT_BLOCK = 64
BNB_DOUBLE_QUANT_GROUP = 256
#: Bytes per trainable parameter of the optimizer's states.
OPTIMIZER_STATE_BYTES = {"8bit": 2, "sgd": 0, "adafactor": 4}
ADAM_STATE_BYTES = 8
#: fp32 tensors of batch x sequence x vocabulary alive at the loss's peak: the log-softmax
#: saved for backward, its gradient and the gradient of the logits.
LOGITS_COPIES = 3
#: Positions TRL's fused LM head (DPO, KTO) scores at once: logits exist for one chunk only.
FUSED_HEAD_CHUNK = 32768
#: fp32 chunk-sized tensors alive in a reference pass: logits, their exponentials, the
#: log-softmax (measured on SmolLM2: the reference passes add 1.0 GiB at 2048 positions).
NO_GRAD_LOGITS_COPIES = 3


@dataclass(frozen=True)
class MemoryProfile:
    """How a method's step uses memory beyond plain supervised training (training/memory.py).

    ``sequences_per_sample``: sequences run together per sample (a pair's two answers);
    ``reference``: forward passes of a frozen reference model; ``fused_head``: logits scored in
    chunks by the trainer; ``dropout``: whether LoRA dropout stays on; ``answer_loss``: the loss
    of training/loss.py (answer tokens only, in chunks) where the model allows it;
    ``generations`` completions of up to ``completion_length`` tokens sampled at once before
    the step (their KV cache and the last position's logits)."""

    sequences_per_sample: int = 1
    reference: bool = False
    fused_head: bool = False
    dropout: bool = True
    answer_loss: bool = False
    #: Sampling before the step (GRPO): completions generated at once and their new tokens.
    generations: int = 0
    completion_length: int = 0


@dataclass
class MemoryEstimate:
    """Predicted peak memory of a training run, in bytes per component."""

    model_name: str
    device: str
    precision: str
    quantization: str | None
    batch_size: int
    seq_len: int
    gradient_checkpointing: bool
    parameters: int
    trainable_parameters: int
    weights: int
    lora_weights: int
    gradients: int
    optimizer_states: int
    activations: int
    logits: int
    overhead: int
    #: What the reference model's forward passes (DPO, KTO) add to the peak, and a frozen
    #: copy of a continued adapter.
    reference: int = 0
    #: Sampling the completions of a step (GRPO): their KV cache and logits.
    generation: int = 0
    generations: int = 0
    method: str = "sft"
    #: What training changes (``finetuning_type``): lora, full or freeze.
    finetuning_type: str = "lora"
    #: Sequences per sample in one forward pass (a pair's two answers go together).
    sequences_per_sample: int = 1

    COMPONENTS = (
        "weights",
        "lora_weights",
        "gradients",
        "optimizer_states",
        "activations",
        "logits",
        "reference",
        "generation",
        "overhead",
    )

    @property
    def total(self) -> int:
        return sum(getattr(self, name) for name in self.COMPONENTS)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "total": self.total}

    def summary(self) -> list[str]:
        """Human-readable lines: the setting, then one line per component and the total."""
        quantized = f", {self.quantization}" if self.quantization else ""
        checkpointing = ", gradient checkpointing" if self.gradient_checkpointing else ""
        if self.sequences_per_sample > 1:  # both answers of each pair
            pairs = self.batch_size // self.sequences_per_sample
            batch = f"batch {pairs} pairs ({self.batch_size} sequences)"
        else:
            batch = f"batch {self.batch_size}"
        lines = [
            f"Memory estimate for {self.model_name} on {self.device} ({self.precision}"
            f"{quantized}{checkpointing}), {batch} x {self.seq_len} tokens:",
        ]
        trainable = f"{self.trainable_parameters / 1e6:,.2f}M trainable"
        own = self.finetuning_type != "lora"
        labels = {
            "weights": f"weights ({self.parameters / 1e6:,.1f}M parameters"
            + (f", {trainable} in fp32)" if own else ")"),
            "lora_weights": "adapter weights (none)" if own else f"LoRA weights ({trainable})",
            "gradients": "gradients" if own else "LoRA gradients",
            "optimizer_states": "optimizer states",
            "activations": "activations",
            "logits": "logits and loss",
            "reference": "reference passes (no grad, shared weights)",
            "generation": f"generation ({self.generations} completions, KV cache)",
            "overhead": "CUDA context and allocator"
            if self.device == "cuda"
            else "Python, libraries and allocator",
        }
        lines += [
            f"  {labels[name]:<42} {_gib(getattr(self, name))}"
            for name in self.COMPONENTS
            if name not in ("reference", "generation") or getattr(self, name)
        ]
        lines.append(f"  {'total (peak)':<42} {_gib(self.total)}")
        return lines

    def __str__(self) -> str:
        parts = ", ".join(
            f"{name.replace('_', ' ')} {getattr(self, name) / GIB:.2f}"
            for name in ("weights", "activations", "logits", "overhead")
        )
        return f"{_gib(self.total)} on {self.device} ({parts} GiB)"


def estimate_memory(
    config: TrainingConfig,
    *,
    model_config: PretrainedConfig | None = None,
    device: str | None = None,
    hardware: Hardware | None = None,
    seq_len: int | None = None,
) -> MemoryEstimate:
    """Predict the peak memory of training ``config`` without loading weights.

    ``model_config`` defaults to ``models.model_config(config.model_name)``. Device and
    precision are those the runtime policy picks for ``hardware`` (this machine when not
    given; ``device`` "cuda", "mps" or "cpu" states a typical machine of that kind instead).
    ``seq_len`` (the longest sample after truncation) defaults to ``config.max_length``.
    """
    if model_config is None:
        from ..models import model_config as load_model_config

        model_config = load_model_config(
            config.model_name, trust_remote_code=config.trust_remote_code
        )
    if hardware is None and device is not None:
        hardware = Hardware.assumed(device)
    runtime = resolve_runtime(config, hardware)
    profile = get_method(config.method).memory_profile(config)
    adapter = adapter_for(config)
    arch = _Architecture.of(model_config, config.trust_remote_code)
    answer_loss = profile.answer_loss and _answer_loss(model_config)
    setting = _Setting.of(config, runtime, seq_len, profile, answer_loss=answer_loss)
    adapted = adapter.adapted_layers(arch.linears, config)
    trainable = adapter.trainable_parameters(adapted, config, arch.named_parameters)
    # Bytes per token one decoder layer saves for backward, its adapted layers included.
    layer = _layer_bytes_per_token(arch, setting) + adapter.saved_bytes_per_token(
        adapted,
        config,
        element=setting.element,
        mask_element=setting.mask_element,
        dropout=profile.dropout,
    ) / max(arch.layers, 1)
    backward = adapter.backward_layers(arch.layers, config)
    activations = _activations(arch, setting, layer, config, backward)
    weight_sized = adapter.saved_bytes(adapted, config, element=setting.element)
    if config.gradient_checkpointing:  # recomputed one layer at a time
        weight_sized //= max(arch.layers, 1)
    activations += weight_sized
    if answer_loss:
        logits = _answer_loss_logits(arch, setting)
    else:
        logits = _logits(arch, setting, fused=profile.fused_head)
    reference = _reference(arch, setting, layer, config, trainable) if profile.reference else 0
    generation = _generation(arch, setting, profile)
    return MemoryEstimate(
        model_name=config.model_name,
        device=runtime.device,
        precision=setting.precision,
        quantization=_quantization_name(config),
        batch_size=setting.batch,
        seq_len=setting.seq_len,
        gradient_checkpointing=config.gradient_checkpointing,
        parameters=arch.parameters,
        trainable_parameters=trainable,
        weights=_weights(arch, setting, config, trainable if adapter.trains_base_weights else 0),
        lora_weights=0 if adapter.trains_base_weights else trainable * 4,
        gradients=trainable * 4,
        optimizer_states=trainable * _optimizer_bytes(runtime.optim),
        activations=activations,
        logits=logits,
        overhead=_overhead(arch, setting, layer, activations + logits + reference + generation),
        reference=reference,
        generation=generation,
        generations=profile.generations,
        method=config.method,
        sequences_per_sample=profile.sequences_per_sample,
        finetuning_type=adapter.name,
    )


def fits(estimate: MemoryEstimate, available_bytes: int, margin: float = DEFAULT_MARGIN) -> bool:
    """Whether the estimate, plus ``margin`` of it, fits in ``available_bytes``."""
    return estimate.total * (1 + margin) <= available_bytes


def available_memory(device: str, hardware: Hardware | None = None) -> int:
    """Memory a run may use on ``device``: the GPU's total, or the host's available RAM."""
    if device == "cuda":
        total = (hardware or Hardware.detect()).cuda_memory
        if total is not None:
            return total
    import psutil

    return int(psutil.virtual_memory().available)


# --- the model's shape -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Linear:
    name: str
    parent: str
    in_features: int
    out_features: int


@dataclass(frozen=True)
class _Architecture:
    """What the estimate needs from a model: sizes and its linear layers."""

    hidden: int
    layers: int
    vocab: int
    heads: int
    q_dim: int
    kv_dim: int
    intermediate: int
    gated_mlp: bool
    parameters: int
    stored_element: int  # bytes per parameter in the checkpoint
    linears: tuple[_Linear, ...]  # decoder linear layers (quantizable, LoRA candidates)
    named_parameters: tuple[tuple[str, int], ...] = ()  # every parameter: (name, size)

    @classmethod
    def of(cls, config: PretrainedConfig, trust_remote_code: bool) -> _Architecture:
        model = _meta_model(config, trust_remote_code)
        head = model.get_output_embeddings()
        linears = tuple(
            _Linear(name, name.rpartition(".")[0], module.in_features, module.out_features)
            for name, module in _linear_modules(model)
            if module is not head
        )
        hidden = _config_value(config, "hidden_size", "n_embd", "d_model")
        heads = _config_value(config, "num_attention_heads", "n_head")
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
        return cls(
            hidden=hidden,
            layers=_config_value(config, "num_hidden_layers", "n_layer"),
            vocab=_config_value(config, "vocab_size"),
            heads=heads,
            q_dim=heads * head_dim,
            kv_dim=kv_heads * head_dim,
            intermediate=intermediate,
            gated_mlp=_is_gated(linears, intermediate),
            parameters=sum(p.numel() for p in model.parameters()),
            named_parameters=tuple((n, p.numel()) for n, p in model.named_parameters()),
            stored_element=4 if str(_stored_dtype(config)).endswith("float32") else 2,
            linears=linears,
        )


def _meta_model(config: PretrainedConfig, trust_remote_code: bool) -> Any:
    """The model built on the meta device: shapes only, nothing allocated."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (ValueError, ImportError, KeyError) as exc:
        raise ModelError(
            f"Cannot build {getattr(config, 'model_type', 'this model')} to estimate its "
            f"memory: {exc}"
        ) from None


def _stored_dtype(config: PretrainedConfig) -> Any:
    """The checkpoint's dtype (``dtype`` in transformers 5, ``torch_dtype`` before)."""
    values = vars(config)
    return values.get("dtype") or values.get("torch_dtype")


def _linear_modules(model: Any) -> Iterator[tuple[str, Any]]:
    import torch

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            yield name, module


def _config_value(config: PretrainedConfig, *names: str) -> int:
    for name in names:
        value = getattr(config, name, None)
        if value:
            return int(value)
    raise ModelError(
        f"Cannot estimate memory for model type {getattr(config, 'model_type', '?')!r}: "
        f"its config has none of {', '.join(names)}."
    )


def _is_gated(linears: tuple[_Linear, ...], intermediate: int) -> bool:
    """A gated MLP (SwiGLU: gate and up projections) has two linear layers, or one fused
    layer, producing 2 x intermediate features under the same parent module."""
    produced: dict[str, int] = {}
    for layer in linears:
        if layer.out_features in (intermediate, 2 * intermediate):
            produced[layer.parent] = produced.get(layer.parent, 0) + layer.out_features
    return any(total == 2 * intermediate for total in produced.values())


# --- the training setting --------------------------------------------------------------------


@dataclass(frozen=True)
class _Setting:
    device: str
    precision: str
    batch: int
    seq_len: int
    padded: bool  # batches carry a padding mask (dynamic padding of several samples)

    @classmethod
    def of(
        cls,
        config: TrainingConfig,
        runtime: Runtime,
        seq_len: int | None,
        profile: MemoryProfile,
        *,
        answer_loss: bool = False,
    ) -> _Setting:
        # GRPO: max_length bounds the prompt, the completion comes on top.
        length = min(seq_len or config.max_length, config.max_length) + profile.completion_length
        batch = config.per_device_train_batch_size * profile.sequences_per_sample
        device, precision = runtime.device, runtime.dtype_name
        if config.packing:  # the collator packs a batch into one row
            # Attention within each sample (training/attention.py): no mask of the row.
            return cls(device, precision, 1, batch * length, not answer_loss)
        # The answer-token loss runs right-padded batches without their mask.
        return cls(device, precision, batch, length, batch > 1 and not answer_loss)

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len

    @property
    def element(self) -> int:
        """Bytes per element of weights and activations."""
        return 4 if self.precision == "float32" else 2

    @property
    def mask_element(self) -> int:
        """Bytes per element of a dropout mask: bool on CUDA (fused kernel), else a float."""
        return 1 if self.device == "cuda" else self.element


def _quantization_name(config: TrainingConfig) -> str | None:
    if config.load_in_4bit:
        double = " + double quant" if config.bnb_4bit_use_double_quant else ""
        return f"4-bit {config.bnb_4bit_quant_type}{double}"
    return "8-bit" if config.load_in_8bit else None


# --- the components --------------------------------------------------------------------------


def _weights(
    arch: _Architecture, setting: _Setting, config: TrainingConfig, fp32_trained: int = 0
) -> int:
    """The model's weights; ``fp32_trained`` of them trained in fp32 (full, freeze)."""
    if config.quantization is None:
        return (arch.parameters - fp32_trained) * setting.element + fp32_trained * 4
    quantized = sum(layer.in_features * layer.out_features for layer in arch.linears)
    rest = (arch.parameters - quantized) * 4  # upcast to fp32 by prepare_model_for_kbit_training
    # On the CPU the checkpoint quantized from stays memory-mapped: its pages count as resident.
    mapped = arch.parameters * arch.stored_element if setting.device != "cuda" else 0
    if config.load_in_8bit:
        scales = sum(layer.out_features for layer in arch.linears) * 4
        return quantized + scales + rest + mapped
    blocks = quantized / BNB_4BIT_BLOCK
    if config.bnb_4bit_use_double_quant:
        constants = blocks + blocks / BNB_DOUBLE_QUANT_GROUP * 8
    else:
        constants = blocks * 4
    return int(quantized / 2 + constants) + rest + mapped


def _optimizer_bytes(optim: str) -> int:
    for key, size in OPTIMIZER_STATE_BYTES.items():
        if key in optim:
            return size
    return ADAM_STATE_BYTES


def _activations(
    arch: _Architecture,
    setting: _Setting,
    layer: float,
    config: TrainingConfig,
    backward: int | None = None,
) -> int:
    """Bytes saved for the backward pass at its start (the peak), by the ``backward`` layers
    it runs through (all by default)."""
    layers = arch.layers if backward is None else backward
    if config.gradient_checkpointing:
        # Each layer keeps its input; the layer being recomputed holds everything once.
        per_token = layers * arch.hidden * setting.element + layer
    else:
        per_token = layers * layer
    final_norm = (arch.hidden + 1) * 4
    mask = setting.seq_len if setting.padded else 0  # the boolean attention mask, shared
    workspace = _dequantization_workspace(arch, setting, config)
    return int(setting.tokens * (per_token + final_norm + mask)) + workspace


def _layer_bytes_per_token(arch: _Architecture, setting: _Setting) -> int:
    """Bytes per token a decoder layer saves, LoRA layers aside."""
    e = setting.element
    norms = 2 * (arch.hidden + 1) * 4  # input and inverse RMS, computed in fp32
    # A padding mask makes sdpa repeat keys and values to every head and take a float mask.
    kv = arch.q_dim if setting.padded else arch.kv_dim
    attention = (2 * arch.q_dim + 2 * kv) * e + arch.heads * 4  # q, out, k, v; log-sum-exp
    if setting.padded:
        attention += setting.seq_len * e
    mlp = (3 if arch.gated_mlp else 1) * arch.intermediate * e
    return norms + attention + mlp


def _dequantization_workspace(
    arch: _Architecture, setting: _Setting, config: TrainingConfig
) -> int:
    """bitsandbytes dequantizes each weight matrix for its matmul, one at a time. On the GPU the
    caching allocator reuses one matrix's block; on the CPU glibc's malloc keeps most of the
    freed copies resident, as it does activations (SmolLM2-135M, 2 x 512 tokens with gradient
    checkpointing: 8-bit peaked 0.32-0.34 GiB and 4-bit 0.39 GiB above a one-matrix
    workspace, about 0.9x the quantized layers in the compute dtype)."""
    if config.quantization is None or not arch.linears:
        return 0
    sizes = [layer.in_features * layer.out_features for layer in arch.linears]
    if setting.device == "cuda":
        return max(sizes) * setting.element
    return int(CPU_ALLOCATOR_RETENTION * sum(sizes) * setting.element)


def _answer_loss(model_config: PretrainedConfig) -> bool:
    """Whether training/loss.py computes the loss of this model (its supported types)."""
    from .distributed import deepspeed_enabled, fsdp_enabled

    supported = getattr(model_config, "model_type", None) in ANSWER_LOSS_MODEL_TYPES
    return supported and not (fsdp_enabled() or deepspeed_enabled())


def _answer_loss_logits(arch: _Architecture, setting: _Setting) -> int:
    """One chunk of logits in fp32 (and its half-precision twin and copy of the gradient),
    and the gradient of the scored hidden states."""
    rows = min(setting.tokens, max(1, LOSS_CHUNK_ELEMENTS // arch.vocab))
    half = 0 if setting.precision == "float32" else 2 * setting.element
    return rows * arch.vocab * (4 + half) + setting.tokens * arch.hidden * 2 * 4


def _logits(arch: _Architecture, setting: _Setting, *, fused: bool = False) -> int:
    extra = 0 if setting.precision == "float32" else setting.element  # the half-precision logits
    positions = min(setting.tokens, FUSED_HEAD_CHUNK) if fused else setting.tokens
    return positions * arch.vocab * (LOGITS_COPIES * 4 + extra)


def _reference(
    arch: _Architecture, setting: _Setting, layer: float, config: TrainingConfig, trainable: int
) -> int:
    """The reference passes, run while the policy's activations and logits are held: one
    layer's tensors and one chunk of logits at a time; plus the frozen copy of a continued
    adapter."""
    hidden = 2 * arch.hidden * setting.element  # a layer's input and output
    positions = min(setting.tokens, FUSED_HEAD_CHUNK)
    head = positions * arch.vocab * 4 * NO_GRAD_LOGITS_COPIES
    copy = trainable * 4 if config.init_adapter else 0
    return int(setting.tokens * (layer + hidden)) + head + copy


def _generation(arch: _Architecture, setting: _Setting, profile: MemoryProfile) -> int:
    """Sampling ``profile.generations`` completions at once, without gradients: the KV cache of
    every layer for the prompt and the completion (keys and values, the load precision), and
    the logits of the last position in fp32 (with the sampling's softmax copy)."""
    if not profile.generations:
        return 0
    positions = profile.generations * setting.seq_len
    cache = positions * arch.layers * 2 * arch.kv_dim * setting.element
    return cache + profile.generations * arch.vocab * 4 * 2


def _overhead(arch: _Architecture, setting: _Setting, layer: float, dynamic: int) -> int:
    """GPU: context and allocator slack. CPU: the libraries, and the memory the C allocator
    keeps after the step's temporaries are freed (measured: half of what every layer would
    save without checkpointing, with or without it)."""
    if setting.device == "cuda":
        return CUDA_CONTEXT + int(dynamic * CUDA_ALLOCATOR_SLACK)
    return CPU_BASELINE + int(CPU_ALLOCATOR_RETENTION * setting.tokens * arch.layers * layer)


def _gib(size: int) -> str:
    return f"{size / GIB:6.2f} GiB" if size >= 100 * MIB else f"{size / MIB:6.1f} MiB"
