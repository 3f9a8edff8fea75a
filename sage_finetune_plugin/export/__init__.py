"""Export a task's model to GGUF, the file llama.cpp, Ollama and LM Studio run.

Modules: ``service`` (``export_task``, the recipe), ``families`` (the architectures and their
hyperparameters), ``source`` (the model folder and its tokenizer metadata), ``quants`` (the
weight types and who writes each), ``writer`` (the gguf package's writer and quantizers),
``llamacpp`` (the K-quants through llama.cpp's quantizer), ``adapter`` (a LoRA adapter as a
GGUF adapter file), ``check`` (reading every file back) and ``modelfile`` (Ollama).

Built on the ``gguf`` package (llama.cpp's Python side): its writer, tensor-name maps,
quantizers and merges reader. Importing this package imports nothing heavy.
"""

from __future__ import annotations

import importlib
from typing import Any

#: Public name -> the module that defines it (loaded on first use, so that the command line
#: can read the quantization table without loading the rest).
_NAMES = {
    "CheckReport": "check",
    "ARCHITECTURES": "families",
    "FAMILIES": "families",
    "check_architecture": "families",
    "supported_families": "families",
    "CHATML_TEMPLATE": "modelfile",
    "chatml_layout": "modelfile",
    "modelfile_text": "modelfile",
    "GGUF_QUANTS": "quants",
    "K_QUANTS": "quants",
    "QUANTS": "quants",
    "available_quants": "quants",
    "FORMATS": "service",
    "ExportResult": "service",
    "export_task": "service",
    "LLAMA3_SPLIT": "source",
    "QWEN2_SPLIT": "source",
    "pre_tokenizer_name": "source",
    "vocabulary": "source",
    "TensorProgress": "writer",
    "interleave_rotary_halves": "writer",
}
__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    module = _NAMES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
