"""Check that the training stack (and optional packages) are installed, without importing them."""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import logging
import re
import sys
from collections.abc import Iterator

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
    "trl": ("1.16", "Preference tuning and RL (dpo, orpo, kto, grpo)", "preference"),
}
#: The extra of this package that installs each optional module a command needs.
EXTRAS = {
    "trl": "preference",
    "gguf": "export",
    "rouge_score": "eval",
    "fastapi": "serve",
    "uvicorn": "serve",
    "openai": "serve",
    "wandb": "wandb",
    "mlflow": "mlflow",
}


def require(*modules: str, extra: str | None = None) -> None:
    """Raise DependencyError naming every missing package and how to install it: the extra
    of this package that adds an optional one (``extra`` when the command has its own), pip
    for the training stack."""
    wanted = modules or tuple(TRAINING_STACK)
    missing = [m for m in wanted if not installed(m)]
    extras = sorted({extra or EXTRAS[m] for m in missing if m in EXTRAS})
    if extras:
        names = ",".join(extras)
        raise DependencyError(
            f"Missing package(s): {', '.join(missing)}. Install them with "
            f"`pip install 'sage-finetune-plugin[{names}]'`."
        )
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
    found = _version(module) if installed(module) else None
    if found is not None and _numbers(found) >= _numbers(oldest):
        return
    where = f"found {module} {found}" if found else f"{module} is not installed"
    raise DependencyError(
        f"{purpose} needs {module} >= {oldest} ({where}): "
        f"pip install 'sage-finetune-plugin[{extra}]' (or pip install '{module}>={oldest}')."
    )


def installed(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it)."""
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


def quiet_bitsandbytes() -> None:
    """bitsandbytes warns at import time that an optional CPU kernel package is missing: keep
    its logging to errors."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


#: Availability checks that remember whether bitsandbytes could be imported.
_AVAILABILITY_CHECKS = ("peft.import_utils", "transformers.utils.import_utils", "accelerate.utils")
_CHECK_NAME = re.compile(r"^is_(bnb|bitsandbytes)\w*_available$")


@contextlib.contextmanager
def without_bitsandbytes() -> Iterator[bool]:
    """Keep bitsandbytes out of this process while the block runs, for a run that does not
    use it: peft imports it whenever it is installed, and its CPU backend compiles kernels as
    it loads (1.5-2.5 s of a run's start here). Meanwhile ``import bitsandbytes`` fails and
    ``find_spec`` finds nothing, so peft and transformers go on without it; afterwards it is
    importable again and their cached checks are forgotten, so a later quantized run in the
    same process finds it. Yields False (nothing done) if it is already imported."""
    if "bitsandbytes" in sys.modules:
        yield False
        return
    sys.modules["bitsandbytes"] = None  # type: ignore[assignment]
    try:
        yield True
    finally:
        if "bitsandbytes" in sys.modules and sys.modules["bitsandbytes"] is None:
            del sys.modules["bitsandbytes"]
        for name in _AVAILABILITY_CHECKS:
            module = sys.modules.get(name)
            for attribute in dir(module) if module is not None else ():
                check = getattr(module, attribute)
                if _CHECK_NAME.match(attribute) and hasattr(check, "cache_clear"):
                    check.cache_clear()
