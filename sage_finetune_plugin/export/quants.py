"""The weight types an export can write, and who writes each.

The ``gguf`` package (llama.cpp's Python side) writes the 16-bit floats and the block types
q8_0, q5_1, q5_0, q4_1, q4_0 itself; the K-quants (q6_k, q5_k_m, q4_k_m, q3_k_m, q2_k) come
from llama.cpp's own quantizer, run on an f16 file of the same model: ``llama-cpp-python``'s
``llama_model_quantize`` when that package is installed, else a ``llama-quantize`` binary on
PATH. Nothing here imports anything heavy: the command line lists the types from this table.
"""

from __future__ import annotations

import importlib.util
import shutil
from dataclasses import dataclass

from ..errors import DependencyError, UsageProblem


@dataclass(frozen=True)
class Quant:
    """One ``--quant`` choice."""

    name: str
    #: ``gguf.LlamaFileType`` member: what the file says it mostly holds.
    file_type: str
    #: ``gguf.GGMLQuantizationType`` member the large matrices are stored in.
    tensor_type: str
    #: ``gguf`` (this process, the gguf package) or ``llama.cpp`` (its quantizer).
    writer: str
    #: Bits a weight, including the block scales (K-quant mixes: their main type's).
    bits: float
    summary: str


QUANT_TYPES = {
    q.name: q
    for q in (
        Quant("f16", "MOSTLY_F16", "F16", "gguf", 16, "half precision"),
        Quant("bf16", "MOSTLY_BF16", "BF16", "gguf", 16, "bfloat16, the range of f32"),
        Quant("q8_0", "MOSTLY_Q8_0", "Q8_0", "gguf", 8.5, "8-bit blocks of 32"),
        Quant("q5_1", "MOSTLY_Q5_1", "Q5_1", "gguf", 6, "5-bit blocks, scale and minimum"),
        Quant("q5_0", "MOSTLY_Q5_0", "Q5_0", "gguf", 5.5, "5-bit blocks, one scale"),
        Quant("q4_1", "MOSTLY_Q4_1", "Q4_1", "gguf", 5, "4-bit blocks, scale and minimum"),
        Quant("q4_0", "MOSTLY_Q4_0", "Q4_0", "gguf", 4.5, "4-bit blocks, one scale"),
        Quant("q6_k", "MOSTLY_Q6_K", "Q6_K", "llama.cpp", 6.56, "6-bit K-quant"),
        Quant("q5_k_m", "MOSTLY_Q5_K_M", "Q5_K", "llama.cpp", 5.5, "5-bit K-quant mix"),
        Quant("q4_k_m", "MOSTLY_Q4_K_M", "Q4_K", "llama.cpp", 4.5, "4-bit K-quant mix"),
        Quant("q3_k_m", "MOSTLY_Q3_K_M", "Q3_K", "llama.cpp", 3.44, "3-bit K-quant mix"),
        Quant("q2_k", "MOSTLY_Q2_K", "Q2_K", "llama.cpp", 2.63, "2-bit K-quant mix"),
    )
}
#: Every ``--quant`` name, largest files first.
QUANTS = tuple(QUANT_TYPES)
#: The types the ``gguf`` package writes itself (always available with the export extra).
GGUF_QUANTS = tuple(n for n, q in QUANT_TYPES.items() if q.writer == "gguf")
#: The types only llama.cpp's quantizer writes.
K_QUANTS = tuple(n for n, q in QUANT_TYPES.items() if q.writer == "llama.cpp")
LLAMA_QUANTIZE = "llama-quantize"
INSTALL_HINT = (
    "pip install 'sage-finetune-plugin[llama-cpp]' (compiles llama.cpp: about 17 minutes on "
    f"2 cores), or put llama.cpp's {LLAMA_QUANTIZE} on PATH"
)


def llama_quantizer() -> str | None:
    """``llama-cpp-python`` when it can be imported, else the path of ``llama-quantize`` on
    PATH, else None (found without importing anything)."""
    try:
        if importlib.util.find_spec("llama_cpp") is not None:
            return "llama-cpp-python"
    except (ImportError, ValueError):
        pass
    return shutil.which(LLAMA_QUANTIZE)


def available_quants() -> tuple[str, ...]:
    """The types this installation can write now."""
    return QUANTS if llama_quantizer() else GGUF_QUANTS


def require_quant(name: str) -> Quant:
    """The Quant named ``name``; UsageProblem for an unknown name, DependencyError in one line
    (what is available now, what to install) for a K-quant without llama.cpp's quantizer."""
    quant = QUANT_TYPES.get(name)
    if quant is None:
        raise UsageProblem(f"Unknown quantization {name!r}: use one of {', '.join(QUANTS)}.")
    if quant.writer == "llama.cpp" and llama_quantizer() is None:
        raise DependencyError(
            f"{name} is written by llama.cpp's quantizer, which is not installed: available now "
            f"{', '.join(GGUF_QUANTS)}; for {', '.join(K_QUANTS)}: {INSTALL_HINT}."
        )
    return quant
