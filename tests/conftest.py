"""Shared fixtures: an isolated home for every test, the tiny offline model, subprocess helpers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ASSETS = Path(__file__).resolve().parent / "assets"
TINY_MODEL = ASSETS / "tiny-chat-model"
BIN = Path(sys.executable).parent

# Keep torch to one thread per process: the suite runs on 2 shared cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
# One model cache for the whole session (the embedded SmolLM2 is converted once, ~30 s), unless
# SAGE_TEST_CACHE names a cache to reuse across sessions.
SESSION_CACHE = os.environ.get("SAGE_TEST_CACHE") or tempfile.mkdtemp(prefix="sage-test-cache-")


@pytest.fixture(scope="session", autouse=True)
def session_cache():
    """Remove the session's model cache at the end (unless SAGE_TEST_CACHE named it)."""
    yield SESSION_CACHE
    if not os.environ.get("SAGE_TEST_CACHE"):
        shutil.rmtree(SESSION_CACHE, ignore_errors=True)


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """HOME, XDG_* and the working directory point into tmp; no SAGE_FINETUNE_HOME leaks in."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME"):
        monkeypatch.setenv(var, str(home / var.lower()))
    monkeypatch.setenv("XDG_CACHE_HOME", SESSION_CACHE)
    monkeypatch.delenv("SAGE_FINETUNE_HOME", raising=False)
    monkeypatch.delenv("SAGE_FINETUNE_CACHE", raising=False)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return home


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The committed tiny chat model (rebuilt if the folder is missing)."""
    if not (TINY_MODEL / "model.safetensors").exists():
        sys.path.insert(0, str(ASSETS))
        from make_tiny_model import build

        build(TINY_MODEL)
    return TINY_MODEL


def run_cli(*args: str, check: bool = False, **kwargs) -> subprocess.CompletedProcess:
    """Run a console script of this environment (``sage``, ``sage-finetune``) as a subprocess."""
    exe, *rest = args
    proc = subprocess.run(
        [str(BIN / exe), *rest], capture_output=True, text=True, timeout=600, **kwargs
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc
