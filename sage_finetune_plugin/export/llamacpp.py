"""The K-quants through llama.cpp's own quantizer, run on an f16 GGUF of the same model.

``llama-cpp-python``'s ``llama_model_quantize`` (in a child process of this interpreter, so
llama.cpp's log and a crash stay out of this one) when that package imports, else the
``llama-quantize`` binary on PATH. Both choose each tensor's type as llama.cpp does for the
mix (Q4_K_M: most matrices Q4_K, half of the attention v and ffn_down matrices Q6_K, the
output Q6_K, ...).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ..errors import DependencyError, ExportError
from .quants import INSTALL_HINT, LLAMA_QUANTIZE, Quant, llama_quantizer

_PYTHON_QUANTIZE = """
import ctypes, sys
import llama_cpp
source, target, ftype, threads = sys.argv[1:]
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_" + ftype)
params.nthread = int(threads)
sys.exit(llama_cpp.llama_model_quantize(source.encode(), target.encode(), ctypes.byref(params)))
"""


def quantize(source: Path, target: Path, quant: Quant) -> str:
    """Quantize the GGUF ``source`` into ``target`` as ``quant``; returns which quantizer ran.
    ExportError with llama.cpp's last lines when it fails."""
    tool = llama_quantizer()
    threads = str(os.cpu_count() or 1)
    if tool is None:
        raise DependencyError(f"{quant.name} needs llama.cpp's quantizer: {INSTALL_HINT}.")
    if tool == "llama-cpp-python":
        ftype = quant.file_type  # MOSTLY_Q4_K_M -> llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
        command = [sys.executable, "-c", _PYTHON_QUANTIZE, str(source), str(target), ftype, threads]
    else:
        command = [tool, str(source), str(target), quant.name.upper(), threads]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise ExportError(f"Cannot run {LLAMA_QUANTIZE}: {exc}") from None
    if proc.returncode != 0 or not target.is_file() or target.stat().st_size == 0:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise ExportError(
            f"llama.cpp's quantizer ({tool}) failed to write {quant.name} "
            f"(exit {proc.returncode}): {tail or 'no output'}"
        )
    return tool
