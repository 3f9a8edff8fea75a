"""TrainingConfig, LoRAConfig and PresetConfigs: defaults, validation, JSON round trip, presets."""

from __future__ import annotations

import json

import pytest

from sage_finetune_plugin.config import (
    ALL_LINEAR,
    SMALL_MODEL,
    LoRAConfig,
    TrainingConfig,
    parse_setting,
)
from sage_finetune_plugin.errors import ConfigError
from sage_finetune_plugin.presets import PresetConfigs, choose_preset
from sage_finetune_plugin.training.runtime import Hardware, resolve_runtime


def test_original_defaults():
    config = TrainingConfig()
    assert config.model_name == "Qwen/Qwen2.5-Coder-1.5B-Instruct"
    assert config.num_train_epochs == 3
    assert config.learning_rate == 5e-5
    assert config.lr_scheduler_type == "cosine"
    assert config.warmup_ratio == 0.1
    assert config.seed == 42
    assert (config.logging_steps, config.save_steps, config.save_total_limit) == (10, 500, 2)
    assert config.report_to == ["tensorboard"]
    assert config.lora.lora_dropout == 0.05
    assert config.lora.target_modules == ALL_LINEAR
    # The original's defaults could not run on CPU: no fp16 / 8-bit optimizer / 8-bit loading.
    assert config.fp16 is None and config.bf16 is None
    assert not config.load_in_8bit and config.optim == "adamw_torch"


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"learning_rate": 0}, "learning_rate must be positive"),
        ({"learning_rate": -1e-4}, "learning_rate must be positive"),
        ({"num_train_epochs": 0}, "num_train_epochs must be positive"),
        ({"per_device_train_batch_size": 0}, "per_device_train_batch_size must be positive"),
        ({"gradient_accumulation_steps": -2}, "gradient_accumulation_steps must be positive"),
        ({"max_steps": 0}, "max_steps must be positive"),
        ({"load_in_4bit": True, "load_in_8bit": True}, "choose one"),
        ({"fp16": True, "bf16": True}, "choose one"),
        ({"warmup_ratio": 1.5}, "warmup_ratio"),
        ({"learning_rate": "fast"}, "learning_rate must be"),
        ({"max_length": 1.5}, "max_length must be int"),
        ({"load_in_4bit": "yes"}, "load_in_4bit must be bool"),
        ({"report_to": "comet"}, "report_to: unknown tracker"),
        ({"report_to": 3}, "report_to must be a list"),
        ({"model_name": "  "}, "model_name is empty"),
    ],
)
def test_invalid_training_values(changes, fragment):
    with pytest.raises(ConfigError, match=fragment):
        TrainingConfig(**changes)


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"r": 0}, "lora.r must be at least 1"),
        ({"lora_dropout": 1.0}, r"lora_dropout must be in \[0, 1\)"),
        ({"lora_dropout": -0.1}, "lora_dropout"),
        ({"bias": "some"}, "lora.bias"),
        ({"target_modules": []}, "target_modules is empty"),
    ],
)
def test_invalid_lora_values(changes, fragment):
    with pytest.raises(ConfigError, match=fragment):
        LoRAConfig(**changes)


def test_effective_batch_size():
    assert PresetConfigs.rtx_3060().effective_batch_size == 16
    assert (
        TrainingConfig(
            per_device_train_batch_size=3, gradient_accumulation_steps=5
        ).effective_batch_size
        == 15
    )


def test_json_round_trip(tmp_path):
    config = TrainingConfig(
        model_name="some/model",
        data_path=tmp_path / "data.json",  # a Path is stored as a string
        load_in_4bit=True,
        lora=LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    path = tmp_path / "config.json"
    config.save(path)
    loaded = TrainingConfig.load(path)
    assert loaded == config
    assert isinstance(loaded.lora, LoRAConfig)
    assert loaded.lora.target_modules == ["q_proj", "v_proj"]
    assert json.loads(path.read_text())["data_path"] == str(tmp_path / "data.json")
    assert TrainingConfig.from_dict(config.to_dict()) == config


def test_unknown_keys_are_named_with_a_suggestion():
    with pytest.raises(ConfigError, match="'learning_rat' \\(did you mean 'learning_rate'\\?\\)"):
        TrainingConfig.from_dict({"learning_rat": 1e-4})
    with pytest.raises(ConfigError, match="Unknown lora key"):
        TrainingConfig.from_dict({"lora": {"rank": 8}})


def test_load_reports_bad_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"learning_rate": 1e-4,,}')
    with pytest.raises(ConfigError, match=r"bad.json: invalid JSON at line 1, column 24"):
        TrainingConfig.load(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        TrainingConfig.load(tmp_path / "missing.json")
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must be a JSON object"):
        TrainingConfig.load(listed)


def test_replace_validates_and_merges_lora():
    config = TrainingConfig().replace(learning_rate=1e-4, lora={"r": 32})
    assert config.learning_rate == 1e-4 and config.lora.r == 32 and config.lora.lora_alpha == 16
    with pytest.raises(ConfigError):
        TrainingConfig().replace(per_device_train_batch_size=0)
    with pytest.raises(ConfigError, match="Unknown training config key"):
        TrainingConfig().replace(batch=4)


# The preset table of the original tool (docs/training.md, "Presets"); rtx_4090 and a100 keep
# its context length and effective batch (16) but use batch 1 with gradient checkpointing,
# which is what lets the 7B model fit those cards (test_large_presets_fit_their_cards).
PRESET_TABLE = {
    "minimal": dict(
        load_in_4bit=True,
        load_in_8bit=False,
        max_length=512,
        batch=1,
        accum=32,
        ckpt=True,
        optim="paged_adamw_8bit",
        r=4,
        alpha=8,
    ),
    "rtx_3060": dict(
        load_in_4bit=False,
        load_in_8bit=True,
        max_length=1024,
        batch=1,
        accum=16,
        ckpt=True,
        optim="paged_adamw_8bit",
        r=8,
        alpha=16,
    ),
    "rtx_4090": dict(
        load_in_4bit=False,
        load_in_8bit=False,
        max_length=2048,
        batch=1,
        accum=16,
        ckpt=True,
        optim="adamw_torch",
        r=8,
        alpha=16,
    ),
    "a100": dict(
        load_in_4bit=False,
        load_in_8bit=False,
        max_length=4096,
        batch=1,
        accum=16,
        ckpt=True,
        optim="adamw_torch",
        r=8,
        alpha=16,
    ),
}


@pytest.mark.parametrize("name", sorted(PRESET_TABLE))
def test_presets_match_the_table(name):
    want = PRESET_TABLE[name]
    config = PresetConfigs.get(name)
    assert config.preset == name
    assert config.load_in_4bit is want["load_in_4bit"]
    assert config.load_in_8bit is want["load_in_8bit"]
    assert config.max_length == want["max_length"]
    assert config.per_device_train_batch_size == want["batch"]
    assert config.gradient_accumulation_steps == want["accum"]
    assert config.gradient_checkpointing is want["ckpt"]
    assert config.optim == want["optim"]
    assert (config.lora.r, config.lora.lora_alpha) == (want["r"], want["alpha"])


@pytest.mark.parametrize(("name", "card_gib"), [("rtx_4090", 24), ("a100", 40)])
def test_large_presets_fit_their_cards(name, card_gib):
    from sage_finetune_plugin.training.memory import GIB, estimate_memory, fits

    estimate = estimate_memory(PresetConfigs.get(name), device="cuda")
    assert fits(estimate, card_gib * GIB), f"{name}: {estimate.total / GIB:.1f} GiB"
    assert PresetConfigs.get(name).effective_batch_size == 16


def test_minimal_uses_double_quant_nf4_and_a100_bf16():
    minimal = PresetConfigs.minimal()
    assert minimal.bnb_4bit_quant_type == "nf4" and minimal.bnb_4bit_use_double_quant
    assert PresetConfigs.a100().bf16 is True


def test_cpu_preset_runs_anywhere():
    cpu = PresetConfigs.cpu()
    assert not cpu.load_in_4bit and not cpu.load_in_8bit
    assert cpu.fp16 is False and cpu.bf16 is None  # bf16 where the CPU is fast at it
    assert not resolve_runtime(cpu, Hardware()).bf16
    assert cpu.model_name == SMALL_MODEL
    assert cpu.max_length <= 512
    assert "8bit" not in cpu.optim


def test_recommended_models():
    assert PresetConfigs.minimal().model_name == SMALL_MODEL
    assert PresetConfigs.rtx_3060().model_name == "Qwen/Qwen2.5-Coder-1.5B-Instruct"
    for name in ("rtx_4090", "a100"):
        assert "7B" in PresetConfigs.get(name).model_name


def test_names_and_unknown_preset():
    assert PresetConfigs.names() == ["minimal", "rtx_3060", "rtx_4090", "a100", "cpu", "auto"]
    assert "auto" not in PresetConfigs.names(include_auto=False)
    with pytest.raises(ConfigError, match="Did you mean 'rtx_3060'"):
        PresetConfigs.get("rtx3060")


def test_auto_without_gpu_is_cpu():
    assert choose_preset(hardware=Hardware())[0] == "cpu"
    assert choose_preset(hardware=Hardware.assumed("mps"))[0] == "cpu"


def test_auto_sizes_the_preset_for_the_given_model(tiny_model_dir):
    from sage_finetune_plugin.training.memory import GIB

    small_gpu = Hardware(cuda=True, cuda_bf16=True, cuda_memory=2 * GIB)
    assert PresetConfigs.auto(hardware=small_gpu).preset == "minimal"  # the presets own models
    tiny = PresetConfigs.auto(str(tiny_model_dir), hardware=small_gpu)
    assert tiny.preset == "a100" and tiny.model_name == str(tiny_model_dir)
    unknown = PresetConfigs.auto("/no/such/model", hardware=small_gpu)  # no config to size
    assert unknown.preset == "minimal" and unknown.model_name == "/no/such/model"
    assert PresetConfigs.auto(str(tiny_model_dir), hardware=Hardware()).preset == "cpu"


@pytest.mark.gpu
def test_auto_on_this_gpu_is_a_gpu_preset():
    assert PresetConfigs.auto().preset in ("minimal", "rtx_3060", "rtx_4090", "a100")


# --- every setting declared once: its field's metadata ---------------------------------------


def test_every_setting_has_help_and_a_scope():
    from sage_finetune_plugin.config import PRESET, TASK, setting_fields

    for key, field in setting_fields().items():
        assert field.metadata.get("help", "").strip(), f"{key} has no help text"
        assert field.metadata.get("scope") in (TASK, PRESET), f"{key} has no scope"
        flag = field.metadata.get("flag")
        assert flag is None or set(flag.commands) <= {"run", "quickstart"}, key


def test_a_preset_keeps_every_task_level_setting():
    """`run --preset X` replaces the hyperparameters and keeps what describes the task: every
    setting of scope ``task``, as the field metadata says (no hand-kept list)."""
    import dataclasses

    from sage_finetune_plugin.config import TASK, setting_fields
    from sage_finetune_plugin.presets import apply_preset

    task_keys = [k for k, f in setting_fields().items() if f.metadata["scope"] == TASK]
    assert {"model_name", "data_path", "columns", "method", "pref_beta"} <= set(task_keys)
    defaults = TrainingConfig()
    changed = {
        "model_name": "org/my-model",
        "data_path": "mine.jsonl",
        "eval_data_path": "eval.jsonl",
        "data_format": "qa",
        "columns": {"answer": "reply"},
        "placeholders": {"NAME": "Ada"},
        "system_prompt": "Be brief.",
        "output_dir": "somewhere",
        "method": "kto",
        "init_adapter": "adapter",
        "eval_ratio": 0.2,
        "report_to": ["mlflow", "wandb"],
        "tracker_project": "team",
        "mlflow_tracking_uri": "sqlite:///runs.db",
        "finetuning_type": "freeze",
        "freeze_trainable_layers": -3,
        "freeze_trainable_modules": ["mlp"],
        "freeze_extra_modules": ["norm"],
        "pref_loss": "ipo",
        "rewards": ["builtin:json"],
        "reward_weights": [2.0],
        "grpo_loss_type": "grpo",
    }
    for key in task_keys:  # the rest: booleans flipped, numbers moved
        value = getattr(defaults, key)
        if key not in changed:
            changed[key] = (not value) if isinstance(value, bool) else value + 0.37
    assert all(changed[key] != getattr(defaults, key) for key in task_keys)
    config = TrainingConfig(**changed)
    for preset in ("minimal", "rtx_3060", "cpu"):
        applied = apply_preset(config, preset)
        for key in task_keys:
            assert getattr(applied, key) == getattr(config, key), (preset, key)
        preset_config = PresetConfigs.get(preset)
        assert applied.learning_rate == preset_config.learning_rate
        assert dataclasses.asdict(applied.lora) == dataclasses.asdict(preset_config.lora)
        assert applied.quantization is None  # a freeze task's weights train: never quantized


def test_a_preset_keeps_the_tasks_own_max_length_within_its_limit():
    """quickstart chooses max_length from the data (896 for `make demo`); `run --preset` must
    not put the preset's default back and truncate what the task was made to keep whole."""
    from sage_finetune_plugin.presets import apply_preset

    chosen = PresetConfigs.cpu().replace(max_length=896)
    assert apply_preset(chosen, "cpu").max_length == 896
    assert apply_preset(chosen, "rtx_3060").max_length == 896
    assert apply_preset(chosen, "minimal").max_length == 512  # minimal allows up to 512
    default = PresetConfigs.cpu()  # a task that took its preset's length takes the new one's
    assert apply_preset(default, "rtx_3060").max_length == PresetConfigs.rtx_3060().max_length
    assert apply_preset(TrainingConfig(), "cpu").max_length == PresetConfigs.cpu().max_length


def test_named_options_come_from_the_metadata():
    from sage_finetune_plugin.config import apply_flags, flags

    run = {key: flag.name for key, flag in flags("run")}
    assert run["learning_rate"] == "lr" and run["num_train_epochs"] == "epochs"
    assert run["lora.r"] == "lora-r" and "system_prompt" not in run
    quickstart = {key: flag.name for key, flag in flags("quickstart")}
    assert quickstart["placeholders"] == "replace" and quickstart["system_prompt"] == "system"
    config = TrainingConfig(max_steps=40, lora=LoRAConfig(r=8, lora_alpha=16))
    changed = apply_flags(config, {"num_train_epochs": 2, "lora.r": 4, "skip_invalid": False})
    assert changed.num_train_epochs == 2 and changed.max_steps is None  # --epochs clears it
    assert (changed.lora.r, changed.lora.lora_alpha) == (4, 8)  # alpha / r kept
    assert not changed.skip_invalid  # False: the flag was not given
    both = apply_flags(config, {"num_train_epochs": 2, "max_steps": 5})
    assert both.max_steps == 5


def test_one_boolean_rule_for_settings_and_data():
    from sage_finetune_plugin.config import parse_bool, parse_mapping

    for word in ("true", "Yes", "on", "1", True, 1):
        assert parse_bool(word) is True
    for word in ("false", "No", "OFF", "0", False, 0):
        assert parse_bool(word) is False
    assert parse_bool("maybe") is None and parse_bool(2) is None
    assert parse_setting("packing=on") == ("packing", True)
    # One mapping rule for --set columns=..., --columns and --replace: a comma that is not
    # followed by KEY= belongs to the value, and values may be empty.
    assert parse_mapping("NAME=Smith, John,CITY=Oslo", "x") == {
        "NAME": "Smith, John",
        "CITY": "Oslo",
    }
    assert parse_mapping(["A=1", "B="], "--replace") == {"A": "1", "B": ""}
