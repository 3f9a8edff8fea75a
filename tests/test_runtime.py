"""Precision from the hardware on the CPU: measured by the precision probe (cached per machine)
where the CPU has bf16 instructions, else bf16 where it is fast (AMX) and fp32 elsewhere, the
config's word first; the plan, the dry run and the memory estimate follow; a real short bf16
run on the tiny model. And bitsandbytes only in runs that use it."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from sage_finetune_plugin.config import TrainingConfig
from sage_finetune_plugin.errors import ConfigError
from sage_finetune_plugin.presets import PresetConfigs
from sage_finetune_plugin.runs import RunOptions, needs_bitsandbytes, plan_run
from sage_finetune_plugin.task import Task
from sage_finetune_plugin.training.memory import estimate_memory
from sage_finetune_plugin.training.precision import PrecisionProbe, cpu_precision
from sage_finetune_plugin.training.runtime import Hardware, measured_hardware, resolve_runtime

from conftest import tiny_config, write_data

AMX = Hardware(cpu_bf16=True, cpu_bf16_isa="AMX")
AVX512_BF16 = Hardware(cpu_bf16_isa="AVX512-BF16")
ARM_BF16 = Hardware(cpu_bf16_isa="Arm BF16")


def test_bf16_by_default_where_the_cpu_is_fast_at_it() -> None:
    for config in (TrainingConfig(), PresetConfigs.cpu()):  # the cpu preset leaves it unset
        runtime = resolve_runtime(config, AMX)
        assert (runtime.device, runtime.bf16, runtime.fp16) == ("cpu", True, False)
        assert runtime.dtype_name == "bfloat16" and "AMX" in runtime.precision_reason
    off = resolve_runtime(TrainingConfig(bf16=False), AMX)
    assert not off.bf16 and off.precision_reason == "bf16 off in the config"
    with pytest.raises(ConfigError, match="fp16 mixed precision needs a CUDA GPU"):
        resolve_runtime(TrainingConfig(fp16=True), AMX)


def test_fp32_where_bf16_is_not_faster() -> None:
    slower = resolve_runtime(TrainingConfig(), AVX512_BF16)  # the rule, without a probe
    assert not slower.bf16 and "AVX512-BF16, not measured" in slower.precision_reason
    unmeasured = resolve_runtime(PresetConfigs.cpu(), ARM_BF16)
    assert not unmeasured.bf16 and "Arm BF16, not measured" in unmeasured.precision_reason
    plain = resolve_runtime(TrainingConfig(), Hardware())
    assert plain.dtype_name == "float32"
    assert plain.precision_reason == "the CPU has no bf16 instructions"
    for hardware in (AVX512_BF16, ARM_BF16, Hardware()):  # asked for: given
        assert resolve_runtime(TrainingConfig(bf16=True), hardware).bf16


def verdict(fp32_s: float, bf16_s: float) -> PrecisionProbe:
    return PrecisionProbe(fp32_s, bf16_s, 64, 256, 1, "test CPU", "2026-12-07T00:00:00+00:00")


def test_a_measured_verdict_decides_on_the_cpu() -> None:
    faster = resolve_runtime(TrainingConfig(), replace(AVX512_BF16, cpu_probe=verdict(0.156, 0.1)))
    assert faster.bf16 and not faster.fp16
    assert "measured on this CPU: bf16 1.56x the speed of fp32" in faster.precision_reason
    assert faster.precision_reason.endswith("bf16=false for fp32")
    # A measurement beats the AMX rule; a gain under 10 % is not worth bf16's rounding.
    for probe in (verdict(0.1, 0.185), verdict(0.105, 0.1)):
        runtime = resolve_runtime(TrainingConfig(), replace(AMX, cpu_probe=probe))
        assert not runtime.bf16 and runtime.precision_reason.endswith("use it anyway")
    told = replace(AVX512_BF16, cpu_probe=verdict(0.2, 0.1))
    assert not resolve_runtime(TrainingConfig(bf16=False), told).bf16


def test_the_probe_measures_once_per_machine_and_caches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SAGE_FINETUNE_CACHE", str(tmp_path))
    first = cpu_precision(16, 64, threads=1)
    assert not first.cached and first.fp32_s > 0 and first.bf16_s > 0 and first.cost_s > 0
    assert (first.hidden, first.intermediate, first.threads) == (16, 64, 1)
    again = cpu_precision(16, 64, threads=1)
    assert again.cached and again.fp32_s == first.fp32_s
    saved = json.loads((tmp_path / "precision.json").read_text())
    assert [entry["fp32_s"] for entry in saved.values()] == [first.fp32_s]
    assert not cpu_precision(16, 64, threads=1, refresh=True).cached
    (tmp_path / "precision.json").write_text("{not json")  # a damaged cache: measured again
    assert not cpu_precision(16, 64, threads=1).cached


def test_a_cpu_run_is_probed_only_where_it_can_matter(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SAGE_FINETUNE_CACHE", str(tmp_path))
    config = tiny_config(tiny_model_dir)
    probed = measured_hardware(config, AVX512_BF16)
    assert probed.cpu_probe is not None and probed.cpu_probe.hidden == 64  # the model's shapes
    assert probed.cpu_probe.reason() in resolve_runtime(config, probed).precision_reason
    for hardware, settings in (
        (Hardware(), {}),  # no bf16 instructions
        (AVX512_BF16, {"bf16": False}),  # the config decides
        (Hardware(cuda=True, cuda_bf16=True, cpu_bf16_isa="AMX"), {}),  # not on the CPU
    ):
        assert measured_hardware(config.replace(**settings), hardware) is hardware


def test_detected_hardware_is_consistent() -> None:
    hardware = Hardware.detect()
    assert hardware.cpu_bf16 == (hardware.cpu_bf16_isa == "AMX")
    assert hardware.cpu_bf16_isa in (None, "AMX", "AVX512-BF16", "Arm BF16")


def test_plan_dry_run_and_memory_estimate_follow(make_prepared_task) -> None:
    task = Task.open(make_prepared_task())
    plan = plan_run(task, RunOptions(), hardware=AMX)
    assert plan.runtime.bf16 and plan.memory.precision == "bfloat16"
    off = plan_run(task, RunOptions(settings=("bf16=false",)), hardware=AMX)
    assert not off.runtime.bf16 and off.memory.precision == "float32"
    assert plan.memory.weights * 2 == off.memory.weights  # the weights load in bf16
    preset = PresetConfigs.cpu()  # SmolLM2: bf16 halves weights and activations
    assert estimate_memory(preset, hardware=AMX).total < estimate_memory(preset).total


def test_a_short_bf16_run_trains(tiny_model_dir: Path, tmp_path: Path) -> None:
    """bf16 asked for (as the policy does on AMX): bf16 base weights under autocast, LoRA
    weights in fp32, the loss falls, the meta says bfloat16."""
    import torch

    from sage_finetune_plugin import LoRATrainer
    from sage_finetune_plugin.meta import load_meta

    config = tiny_config(
        tiny_model_dir,
        data_path=str(write_data(tmp_path / "data.jsonl")),
        output_dir=str(tmp_path / "task"),
        bf16=True,
        max_steps=12,
    )
    runner = LoRATrainer(config)
    result = runner.train()
    lora = {p.dtype for n, p in runner.model.named_parameters() if "lora_" in n}
    base = {p.dtype for n, p in runner.model.named_parameters() if "lora_" not in n}
    assert lora == {torch.float32} and base == {torch.bfloat16}
    history = result.metrics["loss_history"]
    assert history[-1]["loss"] < 0.8 * history[0]["loss"]
    meta = load_meta(tmp_path / "task")
    assert meta.metrics["precision"] == "bfloat16" and meta.training["bf16"] is True


def test_bitsandbytes_only_where_a_run_needs_it() -> None:
    config = PresetConfigs.cpu()
    runtime = resolve_runtime(config, Hardware())
    assert not needs_bitsandbytes(config, runtime)
    for changed in (
        config.replace(load_in_4bit=True),
        config.replace(optim="paged_adamw_8bit"),  # adamw_8bit on the CPU: bitsandbytes
        config.replace(method="dpo"),  # TRL
    ):
        assert needs_bitsandbytes(changed, resolve_runtime(changed, Hardware()))


#: `sage-finetune ARGS...` in this interpreter, then what bitsandbytes is in sys.modules.
CLI_THEN_BITSANDBYTES = """
import sys
from sage_finetune_plugin.cli import main
sys.argv = ["sage-finetune", *sys.argv[1:]]
try:
    main()
except SystemExit as exit:
    assert not exit.code, exit.code
print("bitsandbytes:", type(sys.modules.get("bitsandbytes", "absent")).__name__)
"""


@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_8bit"])
def test_a_run_without_bitsandbytes_never_imports_it(prepared_task: Path, optim: str) -> None:
    """peft imports bitsandbytes whenever it is installed (and it compiles kernels as it
    loads); `run` keeps it out of a process whose run does not use it."""
    command = ["run", str(prepared_task), "--max-steps", "2", "--set", f"optim={optim}"]
    proc = subprocess.run(
        [sys.executable, "-c", CLI_THEN_BITSANDBYTES, *command],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = proc.stdout.strip().splitlines()[-1]
    # Kept out while the run lasts (peft and transformers go on without it), and never
    # imported: not in sys.modules afterwards.
    assert found == ("bitsandbytes: module" if optim == "adamw_8bit" else "bitsandbytes: str")
    assert "Trained 2 steps" in proc.stdout


def test_doctor_shows_the_machine_and_measures_on_request(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from sage_finetune_plugin.cli import finetune

    monkeypatch.setenv("SAGE_FINETUNE_CACHE", str(tmp_path))
    model = ("--model", str(tiny_model_dir), "--threads", "1")
    shown = CliRunner().invoke(finetune, ["doctor", *model, "--json"])
    assert shown.exit_code == 0, shown.output
    report = json.loads(shown.output)
    expected = resolve_runtime(tiny_config(tiny_model_dir, num_threads=1))
    assert (report["device"], report["precision"]) == ("cpu", expected.dtype_name)
    assert report["versions"]["torch"] and report["cpu"]["capability"]
    benched = CliRunner().invoke(finetune, ["doctor", *model, "--bench"])
    assert benched.exit_code == 0, benched.output
    assert "measured on this CPU: bf16" in benched.output
    (verdict,) = json.loads((tmp_path / "precision.json").read_text()).values()
    assert (verdict["hidden"], verdict["threads"]) == (64, 1)
