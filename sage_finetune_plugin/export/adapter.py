"""A task's LoRA adapter alone as a GGUF adapter file, the one llama.cpp loads with ``--lora``
onto the base model's GGUF (and Ollama with ``ADAPTER``).

Laid out as llama.cpp's ``convert_lora_to_gguf.py`` writes it: ``general.type`` ``adapter``,
``adapter.type`` ``lora``, ``adapter.lora.alpha``; for each adapted matrix two tensors named
after the base tensor, ``<name>.lora_a`` (rank x input) and ``<name>.lora_b`` (output x rank),
float32 (the converter's default). llama.cpp scales an adapter by alpha / rank, as peft does;
the rows of Llama-style q/k ``lora_b`` matrices are reordered like the base weights.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..errors import ExportError
from ..progress import ProgressSink
from .families import Family
from .writer import PlannedTensor, gguf_name, write_tensors

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def lora_settings(adapter_dir: Path) -> tuple[float, int]:
    """The alpha to write (llama.cpp scales by alpha / rank) and the rank; ExportError in one
    line for an adapter llama.cpp cannot apply as it is."""
    config_file = adapter_dir / ADAPTER_CONFIG
    if not config_file.is_file() or not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise ExportError(
            f"{adapter_dir} holds no peft LoRA adapter ({ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}): "
            "export it without --adapter."
        )
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if config.get("peft_type") != "LORA":
        raise ExportError(
            f"The adapter in {adapter_dir} is {config.get('peft_type')!r}, not LoRA: llama.cpp "
            "loads LoRA adapters only; export the merged model without --adapter."
        )
    unsupported = [
        key
        for key in ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save")
        if config.get(key)
    ]
    if unsupported:
        raise ExportError(
            f"The adapter in {adapter_dir} uses {', '.join(unsupported)}, which a llama.cpp LoRA "
            "file cannot hold: export the merged model without --adapter."
        )
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    if config.get("use_rslora"):  # peft scales by alpha / sqrt(rank); llama.cpp by alpha / rank
        alpha *= math.sqrt(rank)
    return alpha, rank


def write_adapter_gguf(
    adapter_dir: Path,
    family: Family,
    config: Any,
    path: Path,
    name: str,
    progress: ProgressSink | None,
) -> tuple[list[PlannedTensor], float]:
    """Write the adapter in ``adapter_dir`` (for a base model of ``family`` with ``config``)
    into ``path``. Returns the tensors as planned and the alpha written."""
    import gguf

    alpha, _ = lora_settings(adapter_dir)
    arch = getattr(gguf.MODEL_ARCH, family.arch)
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_name(name)
    tensors = plan_adapter(adapter_dir, family, config)
    write_tensors(writer, tensors, progress)
    return tensors, alpha


def plan_adapter(adapter_dir: Path, family: Family, config: Any) -> list[PlannedTensor]:
    """``<gguf name>.lora_a`` / ``.lora_b`` for each adapted matrix, in the file's order."""
    import gguf
    from safetensors import safe_open

    names = gguf.get_tensor_name_map(
        getattr(gguf.MODEL_ARCH, family.arch), config.num_hidden_layers
    )
    f32 = gguf.GGMLQuantizationType.F32
    file = adapter_dir / ADAPTER_WEIGHTS
    tensors = []
    with safe_open(file, framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
            if ".lora_A." not in key and ".lora_B." not in key:
                raise ExportError(
                    f"{file} holds {key}, which is not a LoRA matrix (an embedding or a fully "
                    "trained layer): llama.cpp cannot load it as an adapter; export the merged "
                    "model without --adapter."
                )
            base = key.removeprefix("base_model.model.")
            base = base.replace(".lora_A.weight", ".weight").replace(".lora_B.weight", ".weight")
            target = gguf_name(names, base, adapter_dir, config.model_type)
            suffix = ".lora_a" if ".lora_A." in key else ".lora_b"
            heads = None
            if suffix == ".lora_b" and family.permute_qk:
                if ".self_attn.q_proj." in key:
                    heads = config.num_attention_heads
                elif ".self_attn.k_proj." in key:
                    heads = (
                        getattr(config, "num_key_value_heads", None) or config.num_attention_heads
                    )
            shape = tuple(handle.get_slice(key).get_shape())
            tensors.append(
                PlannedTensor(
                    target + suffix, shape, f32, source=key, file=file, permute_heads=heads
                )
            )
    if not tensors:
        raise ExportError(f"{file} holds no LoRA matrices.")
    return sorted(tensors, key=lambda t: t.name)
