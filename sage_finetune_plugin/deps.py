"""Check that the training stack is installed, without importing it."""

from __future__ import annotations

import importlib.util

from .errors import DependencyError

#: Import name -> pip requirement, for the packages the training commands need.
TRAINING_STACK = {
    "torch": "torch",
    "transformers": "transformers",
    "peft": "peft",
    "accelerate": "accelerate",
    "datasets": "datasets",
}


def require(*modules: str) -> None:
    """Raise DependencyError naming every missing package and how to install it."""
    wanted = modules or tuple(TRAINING_STACK)
    missing = [m for m in wanted if not _installed(m)]
    if missing:
        pip_names = " ".join(TRAINING_STACK.get(m, m) for m in missing)
        raise DependencyError(
            f"Missing package(s): {', '.join(missing)}. Install them with "
            f"`pip install {pip_names}` (CPU-only machines: `pip install torch==2.13.0` "
            "or the CPU wheel of your platform first), or reinstall sage-finetune-plugin."
        )


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a blocked or half-installed package
        return False
