"""Check that the training stack (and optional packages) are installed, without importing them."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import sys

from .errors import DependencyError

#: Import name -> pip requirement, for the packages the training commands need.
TRAINING_STACK = {
    "torch": "torch",
    "transformers": "transformers",
    "peft": "peft",
    "accelerate": "accelerate",
    "datasets": "datasets",
}

#: Optional packages: import name -> (oldest version that works, what needs it, the extra).
OPTIONAL = {
    "trl": ("1.16", "Preference tuning (dpo, orpo, kto)", "preference"),
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


def require_optional(module: str) -> None:
    """Raise DependencyError, in one line saying what to install, when the optional package
    ``module`` is missing or older than the plugin needs."""
    oldest, purpose, extra = OPTIONAL[module]
    found = _version(module) if _installed(module) else None
    if found is not None and _numbers(found) >= _numbers(oldest):
        return
    where = f"found {module} {found}" if found else f"{module} is not installed"
    raise DependencyError(
        f"{purpose} needs {module} >= {oldest} ({where}): "
        f"pip install 'sage-finetune-plugin[{extra}]' (or pip install '{module}>={oldest}')."
    )


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a blocked or half-installed package
        return False


def _version(module: str) -> str | None:
    try:
        return importlib.metadata.version(module)
    except importlib.metadata.PackageNotFoundError:
        return None


def _numbers(version: str) -> tuple[int, ...]:
    """The leading numeric parts of a version (``1.16.0rc1`` -> (1, 16, 0))."""
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3])


def hide_bitsandbytes() -> bool:
    """Keep bitsandbytes out of this process, for a run that does not use it: peft imports it
    whenever it is installed, and its CPU backend compiles kernels as it loads (1.5-2.5 s of a
    run's start here). Afterwards ``import bitsandbytes`` fails and ``find_spec`` finds nothing,
    so peft and transformers go on without it. False (nothing done) if it is already imported."""
    if "bitsandbytes" in sys.modules:
        return False
    sys.modules["bitsandbytes"] = None  # type: ignore[assignment]
    return True
