"""The model families an export knows: each Hugging Face ``model_type`` with its llama.cpp
architecture, how its tensors differ from the Hugging Face layout, and the hyperparameters its
GGUF metadata holds. Tensor names come from the ``gguf`` package's own maps.

What each family needs, as llama.cpp's converter (``convert_hf_to_gguf.py``) does it:
- Llama, Mistral, SmolLM3: q and k rows reordered for llama.cpp's interleaved rotary layout;
  Llama 3.1+'s ``llama3`` rope scaling as a ``rope_freqs`` tensor of per-frequency factors.
- Qwen2, Qwen3 (with its q/k norms), Gemma, Phi-3: the Hugging Face layout as it is.
- Gemma 2 / Gemma 3: every norm weight stored as ``1 + weight`` (Gemma's RMSNorm scales by
  ``1 + w``); logit soft-capping and the sliding window in the metadata.
- Phi-3: fused ``qkv_proj`` and ``gate_up_proj`` kept fused; original context length.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ExportError


@dataclass(frozen=True)
class Family:
    """How one Hugging Face model type becomes a llama.cpp architecture."""

    model_type: str
    #: ``gguf.MODEL_ARCH`` member.
    arch: str
    label: str
    #: llama.cpp's graph rotates interleaved pairs: reorder q/k rows (Llama-style models).
    permute_qk: bool = False
    #: Added to every norm weight (Gemma's RMSNorm multiplies by ``1 + weight``).
    norm_shift: float = 0.0
    #: transformers' GGUF loader rebuilds this architecture (the export check compares logits).
    transformers_reads: bool = True
    #: Rope scalings this export writes (``default`` is none).
    rope_types: tuple[str, ...] = ("default",)


FAMILIES = {
    f.model_type: f
    for f in (
        Family(
            "llama",
            "LLAMA",
            "Llama (SmolLM2, Llama 3.x)",
            permute_qk=True,
            rope_types=("default", "llama3", "linear"),
        ),
        Family("mistral", "LLAMA", "Mistral", permute_qk=True),
        Family("qwen2", "QWEN2", "Qwen2 / Qwen2.5"),
        Family("qwen3", "QWEN3", "Qwen3"),
        Family("gemma2", "GEMMA2", "Gemma 2", norm_shift=1.0),
        Family(
            "gemma3_text",
            "GEMMA3",
            "Gemma 3 (text)",
            norm_shift=1.0,
            rope_types=("default", "linear"),
        ),
        Family("phi3", "PHI3", "Phi-3"),
        Family("smollm3", "SMOLLM3", "SmolLM3", permute_qk=True, transformers_reads=False),
    )
}
#: Hugging Face ``model_type`` -> llama.cpp architecture name (``gguf.MODEL_ARCH`` member).
ARCHITECTURES = {name: family.arch for name, family in FAMILIES.items()}


def supported_families() -> str:
    """The supported families in one phrase, for messages and help."""
    return ", ".join(family.label for family in FAMILIES.values())


def family_of(config: Any, where: str | Path) -> Family:
    """The Family of a model config; ExportError in one line naming the model and listing the
    supported families, for another architecture or a rope scaling the family does not write."""
    model_type = getattr(config, "model_type", None)
    family = FAMILIES.get(str(model_type))
    if family is None:
        names = ", ".join(getattr(config, "architectures", None) or []) or "unknown class"
        raise ExportError(
            f"GGUF export supports {supported_families()}; {where} holds a {model_type!r} "
            f"model ({names}), which is not exported."
        )
    _, kind, _ = rope(config)
    if kind not in family.rope_types:
        raise ExportError(
            f"The model in {where} uses rope scaling {kind!r}, which this GGUF export does not "
            f"write for {family.label} (it writes: {', '.join(family.rope_types)})."
        )
    return family


def check_architecture(config: Any, where: str | Path) -> None:
    """ExportError naming the model type unless its family (and rope) is exported."""
    family_of(config, where)


def rope(config: Any) -> tuple[float, str, dict[str, Any]]:
    """Rope base frequency, scaling type and the scaling's parameters (transformers 5
    ``rope_parameters``, per layer type for Gemma 3, or the older ``rope_theta`` /
    ``rope_scaling``). For models with several layer types, the full-attention layers'."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if "full_attention" in params:
        params = dict(params["full_attention"])
    scaling = getattr(config, "rope_scaling", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    return float(theta), kind, {**scaling, **params}


def head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def kv_heads(config: Any) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def add_hyperparameters(writer: Any, family: Family, config: Any) -> None:
    """The architecture's hyperparameters, as llama.cpp's converter writes them."""
    import gguf

    theta, kind, params = rope(config)
    dim = head_dim(config)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(kv_heads(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(theta)
    rotary = int(dim * (getattr(config, "partial_rotary_factor", None) or 1.0))
    writer.add_rope_dimension_count(rotary)
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(params["factor"]))
    if family.norm_shift or dim * config.num_attention_heads != config.hidden_size:
        writer.add_key_length(dim)
        writer.add_value_length(dim)
    writer.add_vocab_size(config.vocab_size)
    if family.model_type == "gemma2":
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
        writer.add_sliding_window(config.sliding_window)
    elif family.model_type == "gemma3_text":
        if getattr(config, "final_logit_softcapping", None):
            writer.add_final_logit_softcapping(config.final_logit_softcapping)
        if getattr(config, "sliding_window", None):
            writer.add_sliding_window(config.sliding_window)
    elif family.model_type == "phi3":
        original = getattr(config, "original_max_position_embeddings", None)
        writer.add_rope_scaling_orig_ctx_len(original or config.max_position_embeddings)
        writer.add_sliding_window(getattr(config, "sliding_window", None) or 0)


def rope_factors(config: Any) -> Any | None:
    """Llama 3.1+'s ``llama3`` rope scaling as llama.cpp stores it: one factor per rotary
    frequency (``rope_freqs.weight``), the plain frequency divided by the scaled one. Both come
    from transformers' own rope functions. None for other models."""
    _, kind, _ = rope(config)
    if kind != "llama3":
        return None
    import numpy as np
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    plain, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    return np.ascontiguousarray((plain / scaled).float().numpy(), dtype=np.float32)
