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

from .check import CheckReport
from .families import ARCHITECTURES, FAMILIES, check_architecture, supported_families
from .modelfile import CHATML_TEMPLATE, chatml_layout, modelfile_text
from .quants import GGUF_QUANTS, K_QUANTS, QUANTS, available_quants
from .service import FORMATS, ExportResult, export_task
from .source import LLAMA3_SPLIT, QWEN2_SPLIT, pre_tokenizer_name, vocabulary
from .writer import TensorProgress, interleave_rotary_halves

__all__ = [
    "ARCHITECTURES",
    "CHATML_TEMPLATE",
    "FAMILIES",
    "FORMATS",
    "GGUF_QUANTS",
    "K_QUANTS",
    "LLAMA3_SPLIT",
    "QUANTS",
    "QWEN2_SPLIT",
    "CheckReport",
    "ExportResult",
    "TensorProgress",
    "available_quants",
    "chatml_layout",
    "check_architecture",
    "export_task",
    "interleave_rotary_halves",
    "modelfile_text",
    "pre_tokenizer_name",
    "supported_families",
    "vocabulary",
]
