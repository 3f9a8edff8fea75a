"""Writing a model GGUF with the ``gguf`` package: metadata first, then each tensor renamed to
llama.cpp's name, converted to its stored type and streamed into the file (one in memory at a
time).

Which type each tensor gets follows llama.cpp: norms, biases and other 1-D tensors stay f32 (as
its converter keeps them); the matrices take the asked type; for the 4- and 5-bit block types
the output matrix (the token embedding when the two are tied) is kept at higher precision, as
``llama-quantize`` does. llama.cpp stores it in Q6_K, which the ``gguf`` package cannot write,
so it is stored in Q8_0, the type llama.cpp itself falls back to where Q6_K does not fit. A
matrix whose rows do not split into the type's blocks is stored in f16, as llama.cpp does.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ExportError
from ..progress import Progress, ProgressSink
from .families import add_hyperparameters, rope_factors
from .quants import QUANT_TYPES, Quant
from .source import Source, add_tokenizer

#: Types whose output matrix llama.cpp keeps at higher precision.
LOW_BIT = ("Q4_0", "Q4_1", "Q5_0", "Q5_1")


@dataclass
class TensorProgress(Progress):
    """A tensor written (``done`` of ``total``), and its name."""

    label: str = "export"
    unit: str = "tensor"
    tensor: str = ""

    def postfix(self) -> dict[str, str]:
        return {"tensor": self.tensor}


@dataclass
class PlannedTensor:
    """A tensor as it goes into the file."""

    name: str  # GGUF name
    shape: tuple[int, ...]
    kind: Any  # gguf.GGMLQuantizationType
    source: str = ""  # name in the safetensors file
    file: Path | None = None
    permute_heads: int | None = None  # Llama q/k: the head count to undo rotary's half-split by
    shift: float = 0.0  # added to the values (Gemma's norms)
    data: Any = None  # values computed here (llama3 rope factors), instead of a file's


def write_model_gguf(
    source: Source, path: Path, quant: Quant, name: str, progress: ProgressSink | None
) -> list[PlannedTensor]:
    """Write the model into ``path`` in ``quant`` (a type the gguf package writes). Returns
    the tensors as planned (names, shapes, types), for the check that reads the file back."""
    import gguf

    arch = getattr(gguf.MODEL_ARCH, source.family.arch)
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type("model")
    writer.add_name(name)
    writer.add_description(f"Fine-tuned with sage-finetune-plugin from {source.folder.name}")
    writer.add_file_type(getattr(gguf.LlamaFileType, quant.file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_hyperparameters(writer, source.family, source.config)
    add_tokenizer(writer, source)
    tensors = plan_tensors(source, arch, quant)
    write_tensors(writer, tensors, progress)
    return tensors


def write_tensors(writer: Any, tensors: list[PlannedTensor], progress: ProgressSink | None) -> None:
    """Header, metadata, tensor infos, then the data of each tensor in turn; closes ``writer``."""
    for tensor in tensors:
        shape, dtype, nbytes = stored_layout(tensor)
        writer.add_tensor_info(tensor.name, shape, dtype, nbytes, raw_dtype=tensor.kind)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for index, tensor in enumerate(tensors, start=1):
            writer.write_tensor_data(converted(tensor))
            if progress is not None:
                progress(TensorProgress("step", index, len(tensors), tensor=tensor.name))
    finally:
        writer.close()


def plan_tensors(source: Source, arch: Any, quant: Quant) -> list[PlannedTensor]:
    import gguf

    tensors = list(_model_tensors(source, arch, quant))
    factors = rope_factors(source.config)
    if factors is not None:
        name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        f32 = gguf.GGMLQuantizationType.F32
        tensors.insert(0, PlannedTensor(name, tuple(factors.shape), f32, data=factors))
    return tensors


def _model_tensors(source: Source, arch: Any, quant: Quant) -> Iterator[PlannedTensor]:
    """The model's tensors under their GGUF names, with the type each is stored in."""
    import gguf
    from safetensors import safe_open

    config, family = source.config, source.family
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    files = sorted(source.folder.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{source.folder} has no safetensors weights to export.")
    for file in files:
        with safe_open(file, framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                if key.endswith("rotary_emb.inv_freq") or (source.tied and key == "lm_head.weight"):
                    continue
                name = gguf_name(names, key, source.folder, source.model_type)
                shape = tuple(handle.get_slice(key).get_shape())
                shift = family.norm_shift if key.endswith("norm.weight") else 0.0
                yield PlannedTensor(
                    name,
                    shape,
                    stored_type(name, shape, quant, source.tied),
                    source=key,
                    file=file,
                    permute_heads=rotary_heads(source, key),
                    shift=shift,
                )


def gguf_name(names: Any, key: str, folder: Path, model_type: str) -> str:
    """llama.cpp's name for the Hugging Face tensor ``key`` (ExportError when it has none)."""
    name = names.get_name(key, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise ExportError(
            f"Tensor {key} of {folder} has no GGUF name for {model_type}: this model variant "
            "is not exported."
        )
    return name


def stored_type(name: str, shape: tuple[int, ...], quant: Quant, tied: bool) -> Any:
    """The type llama.cpp would store this tensor in, for ``quant`` (see the module doc)."""
    import gguf

    types = gguf.GGMLQuantizationType
    if len(shape) < 2 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return types.F32
    kind = getattr(types, QUANT_TYPES[quant.name].tensor_type)
    if kind in (types.F16, types.BF16):
        return kind
    is_output = name == "output.weight" or (tied and name == "token_embd.weight")
    if is_output and kind.name in LOW_BIT:
        kind = types.Q8_0
    block = gguf.GGML_QUANT_SIZES[kind][0]
    return kind if shape[-1] % block == 0 else types.F16


def rotary_heads(source: Source, key: str) -> int | None:
    """llama.cpp's Llama graph applies rotary to interleaved pairs; Hugging Face stores q and k
    with the two halves of each head apart. Other families' graphs read the Hugging Face
    layout. Returns the head count to reorder by, or None."""
    if not source.family.permute_qk:
        return None
    if ".self_attn.q_proj." in key:
        return source.config.num_attention_heads
    if ".self_attn.k_proj." in key:
        return source.kv_heads
    return None


def stored_layout(tensor: PlannedTensor) -> tuple[tuple[int, ...], Any, int]:
    """Shape, numpy dtype and byte size of a tensor as written (before its data exists)."""
    import gguf
    import numpy as np

    count = int(np.prod(tensor.shape))
    if tensor.kind == gguf.GGMLQuantizationType.F32:
        return tensor.shape, np.float32, count * 4
    if tensor.kind == gguf.GGMLQuantizationType.F16:
        return tensor.shape, np.float16, count * 2
    shape = gguf.quants.quant_shape_to_byte_shape(tensor.shape, tensor.kind)
    return shape, np.uint8, int(np.prod(shape))


def converted(tensor: PlannedTensor) -> Any:
    """The tensor's data as stored: read, shifted, permuted for Llama's rotary layout,
    converted."""
    import numpy as np

    if tensor.data is not None:
        data = tensor.data
    else:
        from safetensors import safe_open

        with safe_open(tensor.file, framework="pt") as handle:
            data = handle.get_tensor(tensor.source).float().numpy()
    if tensor.shift:
        data = data + np.float32(tensor.shift)
    if tensor.permute_heads is not None:
        data = interleave_rotary_halves(data, tensor.permute_heads)
    return encode(data, tensor.kind)


def encode(data: Any, kind: Any) -> Any:
    """float32 values in the stored type ``kind`` (the gguf package's quantizers)."""
    import gguf
    import numpy as np

    if kind == gguf.GGMLQuantizationType.F32:
        return np.ascontiguousarray(data, dtype=np.float32)
    if kind == gguf.GGMLQuantizationType.F16:
        return np.ascontiguousarray(data, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), kind)


def interleave_rotary_halves(data: Any, heads: int) -> Any:
    """Reorder the rows of each head of a q or k projection (weight or bias) from
    [first halves..., second halves...] to [pairs...]: row i of the first half and row i of
    the second become rows 2i and 2i+1."""
    rows = data.shape[0]
    half = rows // heads // 2
    return data.reshape(heads, 2, half, *data.shape[1:]).swapaxes(1, 2).reshape(data.shape)
