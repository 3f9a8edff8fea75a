"""The plugin inside both `sage` hosts and standalone: help, argument pass-through, exit codes,
a light start-up, and a broken environment that must not break the host."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import run_cli

HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "datasets", "accelerate")
META = {"task_type": "qa", "model": "m", "framework": "peft", "format": "qa"}


def make_root(tmp_path: Path) -> Path:
    root = tmp_path / "tasks"
    (root / "alpha").mkdir(parents=True)
    (root / "alpha" / "finetune_meta.json").write_text(json.dumps(META))
    return root


def python(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


# --- the argparse host (isage >= 0.3) ------------------------------------------------------


def test_sage_help_lists_finetune():
    proc = run_cli("sage", "--help", check=True)
    assert "finetune" in proc.stdout


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_leading_help_reaches_the_group(flag):
    proc = run_cli("sage", "finetune", flag, check=True)
    assert proc.stdout.startswith("Usage: sage finetune [OPTIONS] COMMAND")
    assert "list" in proc.stdout


def test_subcommand_help():
    proc = run_cli("sage", "finetune", "list", "--help", check=True)
    assert "Usage: sage finetune list" in proc.stdout and "--json" in proc.stdout


def test_options_before_and_after_positionals(tmp_path):
    root = make_root(tmp_path)
    for args in (["list", "--json", "--root", str(root)], ["list", "--root", str(root), "--json"]):
        proc = run_cli("sage", "finetune", *args, check=True)
        assert [t["name"] for t in json.loads(proc.stdout)["tasks"]] == ["alpha"]


def test_usage_errors_exit_2():
    assert run_cli("sage", "finetune", "no-such-verb").returncode == 2
    proc = run_cli("sage", "finetune", "list", "--bogus")
    assert proc.returncode == 2 and "No such option '--bogus'" in proc.stderr
    # "--" passes through unchanged: click sees a stray argument after it.
    proc = run_cli("sage", "finetune", "list", "--", "--json")
    assert proc.returncode == 2 and "unexpected extra argument" in proc.stderr.lower()


def test_group_without_command_shows_usage():
    proc = run_cli("sage", "finetune")
    assert proc.returncode in (0, 2)  # click >= 8.2 exits 2 when no command is given
    assert "Usage: sage finetune" in proc.stdout + proc.stderr


def test_host_main_called_with_an_argv_list(tmp_path):
    root = make_root(tmp_path)
    proc = python(
        f"""
        import sys
        from sage.cli.main import main
        sys.exit(main(["finetune", "list", "--root", {str(root)!r}, "--json"]))
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["tasks"][0]["name"] == "alpha"


def test_registration_and_help_import_nothing_heavy():
    proc = python(
        """
        import argparse, sys, contextlib, io
        from sage_finetune_plugin.host import register, run_group
        parser = argparse.ArgumentParser(prog="sage")
        register(parser.add_subparsers(dest="command"))
        with contextlib.redirect_stdout(io.StringIO()):
            assert run_group(["--help"]) == 0
            assert run_group(["list", "--help"]) == 0
            assert run_group(["list"]) == 0
        print(" ".join(sys.modules))
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert not set(HEAVY) & set(proc.stdout.split())


def test_package_api_is_lazy():
    proc = python(
        """
        import sys
        import sage_finetune_plugin as p
        p.PresetConfigs.rtx_3060(); p.TrainingConfig(); p.LoRAConfig()
        print(" ".join(sys.modules))
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert not set(HEAVY) & set(proc.stdout.split())


# --- a broken environment -------------------------------------------------------------------


def blocker(tmp_path: Path, *modules: str) -> dict:
    """Environment whose Python cannot import ``modules`` (as if they were not installed)."""
    site = tmp_path / "blocker"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(
        textwrap.dedent(
            f"""
            import sys
            class _Block:
                def find_spec(self, name, path=None, target=None):
                    if name.split(".")[0] in {modules!r}:
                        raise ModuleNotFoundError(f"No module named {{name!r}}")
            sys.meta_path.insert(0, _Block())
            """
        )
    )
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])),
    }


def test_host_survives_a_plugin_that_cannot_load(tmp_path):
    env = blocker(tmp_path, "click")
    proc = run_cli("sage", "--help", env=env)
    assert proc.returncode == 0 and "finetune" in proc.stdout
    assert run_cli("sage", "version", env=env).returncode == 0
    proc = run_cli("sage", "finetune", "list", env=env)
    assert proc.returncode == 1
    assert "sage finetune is unavailable" in proc.stderr and "click" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_list_works_without_the_training_stack(tmp_path):
    root = make_root(tmp_path)
    env = blocker(tmp_path, *HEAVY)
    proc = run_cli("sage", "finetune", "list", "--root", str(root), env=env)
    assert proc.returncode == 0, proc.stderr
    assert "alpha" in proc.stdout


def test_register_never_raises_on_an_unknown_host(capsys):
    from sage_finetune_plugin.host import register

    register(object())
    assert "not registered" in capsys.readouterr().err


# --- the Typer host (isage-cli 0.2.x) --------------------------------------------------------

TYPER_HOST = """
import sys, typer
from sage_finetune_plugin.host import register
app = typer.Typer(name="sage")
@app.command()
def version():
    print("host version 0.2")
register(app)
sys.argv = ["sage", *sys.argv[1:]]
app()
"""


def typer_host(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", TYPER_HOST, *args], capture_output=True, text=True, timeout=120
    )


def test_typer_host_help_and_passthrough(tmp_path):
    assert "finetune" in typer_host("--help").stdout
    assert typer_host("version").stdout.strip() == "host version 0.2"
    proc = typer_host("finetune", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "Usage: sage finetune [OPTIONS] COMMAND" in proc.stdout
    root = make_root(tmp_path)
    proc = typer_host("finetune", "list", "--json", "--root", str(root))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["tasks"][0]["name"] == "alpha"


def test_typer_host_exit_codes():
    proc = typer_host("finetune", "list", "--bogus")
    assert proc.returncode == 2 and "No such option '--bogus'" in proc.stderr
    assert typer_host("finetune", "nope").returncode == 2


# --- standalone -------------------------------------------------------------------------------


def test_standalone_script(tmp_path):
    proc = run_cli("sage-finetune", "--help", check=True)
    assert proc.stdout.startswith("Usage: sage-finetune [OPTIONS] COMMAND")
    root = make_root(tmp_path)
    proc = run_cli("sage-finetune", "list", env={**os.environ, "SAGE_FINETUNE_HOME": str(root)})
    assert proc.returncode == 0 and "alpha" in proc.stdout
    version = run_cli("sage-finetune", "--version", check=True)
    assert version.stdout.startswith("sage-finetune-plugin, version ")
