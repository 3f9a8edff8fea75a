"""The run service: one plan for `run`, `train_from_meta` and `python -m ...trainer`, with the
same checks; `--set` and `--config` recipes; the dry run shows the plan."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from sage_finetune_plugin.cli import finetune
from sage_finetune_plugin.config import TrainingConfig, parse_setting
from sage_finetune_plugin.errors import ConfigError, TrainingError
from sage_finetune_plugin.meta import load_meta, update_meta
from sage_finetune_plugin.runs import RunOptions, plan_run, train_from_meta
from sage_finetune_plugin.training.runtime import Hardware, resolve_runtime


def invoke(*args: str):
    return CliRunner().invoke(finetune, list(args))


def interrupt(task: Path, step: int = 7) -> None:
    """Leave ``task`` as an interrupted run does: a checkpoint and the status."""
    checkpoint = task / "checkpoints" / f"checkpoint-{step}"
    checkpoint.mkdir(parents=True)
    (checkpoint / "adapter_model.safetensors").write_bytes(b"x")
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    update_meta(task, status="interrupted")


def test_every_entry_point_refuses_to_start_an_interrupted_task_over(prepared_task: Path) -> None:
    interrupt(prepared_task)
    expected = "stopped at checkpoint-7 (interrupted): continue with --resume"

    # Python callers are told the API's words, the command line its options.
    with pytest.raises(TrainingError, match=re.escape(expected.replace("--resume", "resume=True"))):
        train_from_meta(prepared_task)
    cli = invoke("run", str(prepared_task))
    assert cli.exit_code == 1 and expected in cli.output
    module = subprocess.run(
        [sys.executable, "-m", "sage_finetune_plugin.trainer", str(prepared_task)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert module.returncode == 1 and expected in module.stderr
    # Nothing was deleted or changed by any of them.
    assert (prepared_task / "checkpoints" / "checkpoint-7" / "trainer_state.json").is_file()
    assert load_meta(prepared_task).status == "interrupted"


def test_the_plan_lists_what_would_stop_the_run(prepared_task: Path) -> None:
    interrupt(prepared_task)
    plan = plan_run(prepared_task, RunOptions(max_steps=3), hardware=Hardware())
    assert plan.config.max_steps == 3 and plan.runtime.device == "cpu"
    assert plan.fits is True and "fits:" in plan.memory_verdict()
    assert [type(b) for b in plan.blockers] == [TrainingError]
    assert plan.resume_from is None

    resumed = plan_run(prepared_task, RunOptions(resume=True), hardware=Hardware())
    assert resumed.blockers == []
    assert resumed.resume_from == prepared_task / "checkpoints" / "checkpoint-7"

    forced = plan_run(prepared_task, RunOptions(force=True), hardware=Hardware())
    assert forced.blockers == [] and forced.stale_checkpoints == 1


def test_dry_run_prints_the_plan(prepared_task: Path) -> None:
    interrupt(prepared_task)
    result = invoke("run", str(prepared_task), "--dry-run", "--nproc", "2")
    assert result.exit_code == 0, result.output
    assert "Would refuse: Training of" in result.output
    assert "Launch: " in result.output and "--nproc-per-node=2" in result.output
    precision = resolve_runtime(TrainingConfig()).dtype_name  # fp32 unless the CPU has AMX
    assert f"Device: cpu, precision {precision} (the CPU has" in result.output


def test_set_takes_any_key_typed_by_its_field(prepared_task: Path) -> None:
    result = invoke(
        "run",
        str(prepared_task),
        "--dry-run",
        "--set",
        "lora.target_modules=q_proj,v_proj",
        "--set",
        "packing=true",
        "--set",
        "max_steps=none",
        "--set",
        "learning_rate=2e-4",
    )
    assert result.exit_code == 0, result.output
    for line in (
        "lora.target_modules: ['q_proj', 'v_proj']",
        "packing: True",
        "max_steps: None",
        "learning_rate: 0.0002",
    ):
        assert f"  {line}  # " in result.output  # each setting with its help text


def test_set_trains_with_the_settings(prepared_task: Path) -> None:
    result = invoke(
        "run", str(prepared_task), "--max-steps", "2", "--set", "lora.target_modules=q_proj,v_proj"
    )
    assert result.exit_code == 0, result.output
    adapter = json.loads((prepared_task / "adapter" / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]
    assert load_meta(prepared_task).training["lora"]["target_modules"] == ["q_proj", "v_proj"]


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("lora.r=four", "lora.r must be an integer, got 'four'"),
        ("packing=maybe", "packing must be true/false"),
        ("lora.rank=4", "Unknown setting 'lora.rank'. Did you mean lora.r"),
        ("learning_rte=1e-4", "Did you mean learning_rate"),
        ("packing", "is not KEY=VALUE"),
        ("lora.r=0", "lora.r must be at least 1"),
    ],
)
def test_bad_settings_are_usage_errors(prepared_task: Path, setting: str, message: str) -> None:
    result = invoke("run", str(prepared_task), "--dry-run", "--set", setting)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_parse_setting_types() -> None:
    assert parse_setting("fp16=none") == ("fp16", None)
    assert parse_setting("bf16=yes") == ("bf16", True)
    assert parse_setting("num_train_epochs=2") == ("num_train_epochs", 2.0)
    assert parse_setting("lora.target_modules=all-linear") == ("lora.target_modules", "all-linear")
    assert parse_setting(" seed = 7 ") == ("seed", 7)
    with pytest.raises(ConfigError, match="must be a number"):
        parse_setting("learning_rate=inf")
    updated = TrainingConfig().with_settings(["lora.r=32", "lora.lora_alpha=64", "seed=1"])
    assert (updated.lora.r, updated.lora.lora_alpha, updated.seed) == (32, 64, 1)


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_config_applies_a_recipe_file(prepared_task: Path, tmp_path: Path, suffix: str) -> None:
    values = {"learning_rate": 0.001, "packing": True, "lora": {"r": 4, "lora_dropout": 0.1}}
    recipe = tmp_path / f"recipe{suffix}"
    if suffix == ".yaml":
        recipe.write_text(
            "# a recipe\nlearning_rate: 0.001\npacking: true\nlora:\n  r: 4\n  lora_dropout: 0.1\n"
        )
    else:
        recipe.write_text(json.dumps(values))
    # --set and the named options come after the recipe.
    result = invoke(
        "run", str(prepared_task), "--dry-run", "--config", str(recipe), "--set", "lora.r=6"
    )
    assert result.exit_code == 0, result.output
    for line in ("learning_rate: 0.001", "packing: True", "lora.r: 6", "lora.lora_dropout: 0.1"):
        assert f"  {line}  # " in result.output


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("learning_rate: [1\n", "invalid YAML at line"),
        ("lora:\n  rank: 4\n", "Unknown lora key(s): 'rank' (did you mean 'r'?)"),
        ("- 1\n- 2\n", "a recipe holds config keys"),
        ("learning_rate: fast\n", "learning_rate must be"),
    ],
)
def test_bad_recipe_files_name_the_file(
    prepared_task: Path, tmp_path: Path, text: str, message: str
) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    result = invoke("run", str(prepared_task), "--dry-run", "--config", str(recipe))
    assert result.exit_code == 1, result.output
    assert f"{recipe}: " in result.output and message in result.output
    assert "Traceback" not in result.output


def test_quant_and_its_aliases(prepared_task: Path) -> None:
    four = invoke("run", str(prepared_task), "--dry-run", "--quant", "4bit")
    assert four.exit_code == 0 and "load_in_4bit: True" in four.output
    assert "4bit quantized" in four.output
    alias = invoke("run", str(prepared_task), "--dry-run", "--8bit")
    assert alias.exit_code == 0 and "load_in_8bit: True" in alias.output
    clash = invoke("run", str(prepared_task), "--dry-run", "--quant", "8bit", "--4bit")
    assert clash.exit_code == 2 and "Choose one quantization" in clash.output


def test_completion_of_task_names_and_settings(prepared_task: Path) -> None:
    from click.shell_completion import ShellComplete

    complete = ShellComplete(finetune, {}, "sage-finetune", "_SAGE_FINETUNE_COMPLETE")
    names = complete.get_completions(["run", "--root", str(prepared_task.parent)], "de")
    assert [item.value for item in names] == ["demo"]
    keys = complete.get_completions(["run", "demo", "--set"], "lora.r")
    assert [item.value for item in keys] == ["lora.r="]


def test_train_from_meta_keeps_bitsandbytes_out_of_an_unquantized_run(prepared_task: Path) -> None:
    """As `run` does (the run service decides, not the command): bitsandbytes compiles its CPU
    kernels as it loads. Afterwards it is importable again, and peft finds it."""
    code = (
        "import sys\n"
        "from sage_finetune_plugin.runs import train_from_meta\n"
        f"train_from_meta({str(prepared_task)!r}, max_steps=2)\n"
        "print('imported' if sys.modules.get('bitsandbytes') else 'kept out')\n"
        "import bitsandbytes, peft.import_utils\n"
        "print('available again', peft.import_utils.is_bnb_available())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[-2:] == ["kept out", "available again True"]
    assert load_meta(prepared_task).status == "trained"
