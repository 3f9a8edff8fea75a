"""The ways to adapt a model (issue 22) on the tiny model: the LoRA variants (DoRA, rsLoRA,
PiSSA, OLoRA, LoRA+), NEFTune, and full and freeze fine-tuning. Each trains a few steps with the
package's trainer, resumes from a checkpoint and merges (or says why not); `chat --prompt`
answers the same before and after the merge of an adapter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from sage_finetune_plugin.cli import finetune
from sage_finetune_plugin.config import TrainingConfig
from sage_finetune_plugin.errors import ConfigError, FinetuneError
from sage_finetune_plugin.meta import load_meta
from sage_finetune_plugin.runs import RunOptions, plan_run, train_from_meta

from conftest import build_prepared_task

PROMPT = "Write the number 3 as a word."
#: A few steps, a checkpoint every two: enough to resume from step 4.
SHORT = {"max_steps": 4, "save_steps": 2}

LORA_VARIANTS: dict[str, dict[str, Any]] = {
    "dora": {"use_dora": True},
    "rslora": {"use_rslora": True},
    "pissa": {"init_lora_weights": "pissa"},
    "pissa_niter": {"init_lora_weights": "pissa_niter_2"},
    "olora": {"init_lora_weights": "olora"},
    "loraplus": {"loraplus_lr_ratio": 16.0},
}


def cli(*args: str) -> Any:
    return CliRunner().invoke(finetune, list(args))


def ask(task: Path) -> str:
    result = cli("chat", str(task), "-p", PROMPT, "--max-new-tokens", "8")
    assert result.exit_code == 0, result.output
    return result.stdout


def train_and_resume(task: Path) -> None:
    """Train 4 steps, then resume from the checkpoint at step 4 to step 6."""
    first = train_from_meta(task)
    assert first.global_step == 4
    resumed = train_from_meta(task, resume=True, max_steps=6)
    assert resumed.metrics["resumed_from_step"] == 4
    assert resumed.global_step == 6
    assert load_meta(task).status == "trained"


@pytest.mark.parametrize("variant", list(LORA_VARIANTS))
def test_lora_variant_trains_resumes_and_merges(make_prepared_task, variant: str) -> None:
    lora = {**LORA_VARIANTS[variant], "r": 4, "lora_alpha": 8}
    task = make_prepared_task(variant, lora=lora, **SHORT)
    train_and_resume(task)
    meta = load_meta(task)
    for key, value in LORA_VARIANTS[variant].items():
        assert meta.training["lora"][key] == value  # the meta says how the adapter was made
    before = ask(task)  # base + adapter
    merged = cli("merge", str(task))
    assert merged.exit_code == 0, merged.output
    assert load_meta(task).merge["max_logit_diff"] <= load_meta(task).merge["tolerance"]
    assert ask(task) == before  # the merged model answers the same


def test_dora_saves_magnitudes_and_rslora_scales_by_the_root_of_r(make_prepared_task) -> None:
    from safetensors import safe_open

    task = make_prepared_task("dora", lora={"use_dora": True, "use_rslora": True}, **SHORT)
    train_from_meta(task)
    with safe_open(str(task / "adapter" / "adapter_model.safetensors"), "pt") as weights:
        names = list(weights.keys())
    assert any("lora_magnitude_vector" in name for name in names)
    saved = json.loads((task / "adapter" / "adapter_config.json").read_text())
    assert saved["use_dora"] is True and saved["use_rslora"] is True


def test_pissa_adapter_is_converted_to_apply_to_the_original_base(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The trained model (residual base + PiSSA adapter), the original base with the saved
    adapter and the base with the last checkpoint give the same logits; the saved adapter has
    twice the rank."""
    import torch

    from sage_finetune_plugin.chat import load_chat_model
    from sage_finetune_plugin.training.recipe import LoRATrainer

    task = build_prepared_task(
        tmp_path, tiny_model_dir, "pissa", lora={"init_lora_weights": "pissa", "r": 4}, **SHORT
    )
    config = TrainingConfig.load(task / "training_config.json").replace(output_dir=str(task))
    config = config.replace(data_path=str(task / "data" / "train.jsonl"))
    trainer = LoRATrainer(config, task_dir=task)
    trainer.train()
    saved = json.loads((task / "adapter" / "adapter_config.json").read_text())
    assert saved["r"] == 8 and saved["init_lora_weights"] is True
    assert (task / "adapter_init" / "adapter_model.safetensors").is_file()
    ids = torch.tensor([[5, 17, 99, 230, 41, 7]])
    trainer.model.eval()
    with torch.inference_mode():
        trained = trainer.model(input_ids=ids).logits
        reloaded = load_chat_model(task).model(input_ids=ids).logits
        # The checkpoint of the last step keeps the unconverted adapter: peft re-runs PiSSA.
        checkpoint = load_chat_model(task, checkpoint=4).model(input_ids=ids).logits
    assert torch.allclose(trained, reloaded, atol=1e-4)
    assert torch.allclose(trained, checkpoint, atol=1e-4)


def test_loraplus_gives_the_b_matrices_a_larger_learning_rate(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from sage_finetune_plugin.training.recipe import LoRATrainer

    task = build_prepared_task(
        tmp_path, tiny_model_dir, "plus", lora={"loraplus_lr_ratio": 8.0}, max_steps=1
    )
    config = TrainingConfig.load(task / "training_config.json").replace(
        output_dir=str(task), data_path=str(task / "data" / "train.jsonl")
    )
    trainer = LoRATrainer(config, task_dir=task)
    trainer.train()
    optimizer = trainer.trainer.optimizer
    by_name = {id(p): n for n, p in trainer.model.named_parameters()}
    rates = {}
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            rates[by_name[id(parameter)].split(".lora_")[1].split(".")[0]] = group["initial_lr"]
    assert rates["B"] == pytest.approx(8 * rates["A"])
    assert rates["A"] == pytest.approx(config.learning_rate)


def test_neftune_reaches_the_training_arguments(tiny_model_dir: Path, tmp_path: Path) -> None:
    from sage_finetune_plugin.training.recipe import LoRATrainer

    task = build_prepared_task(tmp_path, tiny_model_dir, "neft", neftune_noise_alpha=5.0, **SHORT)
    train_from_meta(task)
    config = TrainingConfig.from_dict(load_meta(task).training)
    assert config.neftune_noise_alpha == 5.0
    trainer = LoRATrainer(config.replace(output_dir=str(task)), task_dir=task)
    trainer.tokenizer = None
    data = type("Data", (), {"eval": None, "packing": False})()
    assert trainer.training_arguments(data).neftune_noise_alpha == 5.0


def _weights(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize(
    ("kind", "changes", "trained"),
    [
        ("full", {}, lambda name: True),
        ("freeze", {"freeze_trainable_layers": 1}, lambda name: ".1." in name),
        (
            "freeze",
            {"freeze_trainable_layers": -1, "freeze_trainable_modules": ["mlp"]},
            lambda name: ".0.mlp." in name,
        ),
    ],
)
def test_full_and_freeze_train_the_model_itself(
    make_prepared_task, tiny_model_dir: Path, kind: str, changes: dict[str, Any], trained
) -> None:
    task = make_prepared_task(kind, finetuning_type=kind, learning_rate=1e-3, **changes, **SHORT)
    train_and_resume(task)
    model = task / "model"
    assert not (task / "adapter").exists()
    base, tuned = _weights(tiny_model_dir), _weights(model)
    changed = {name for name in tuned if not (tuned[name] == base[name]).all()}
    expected = {name for name in tuned if trained(name)}
    assert changed == expected
    assert load_meta(task).adapter_path == "model"
    assert load_meta(task).training["finetuning_type"] == kind

    # No adapter: merge says so in one line; chat, export and serve use the model folder.
    merged = cli("merge", str(task))
    assert merged.exit_code == 1
    assert f"is a {kind} fine-tune: it has no adapter to merge" in merged.output
    assert "Traceback" not in merged.output and len(merged.output.strip().splitlines()) == 1
    assert ask(task).strip()
    from sage_finetune_plugin.merge import merged_model

    assert merged_model(task) == model


def test_full_model_checkpoint_and_list_and_dry_run(make_prepared_task) -> None:
    task = make_prepared_task("full", finetuning_type="full", learning_rate=1e-3, **SHORT)
    dry = cli("run", str(task), "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "Trains: full fine-tuning (every weight)" in dry.output
    assert "adapter weights (none)" in dry.output
    train_from_meta(task)
    from sage_finetune_plugin.chat import ChatSession, load_chat_model

    chat = load_chat_model(task, checkpoint=2)  # a checkpoint of a full run is a whole model
    assert "checkpoint-2" in chat.description
    assert ChatSession(chat, max_new_tokens=4).generate(PROMPT) is not None
    listed = cli("list", "--root", str(task.parent), "--json")
    rows = {row["name"]: row for row in json.loads(listed.output)["tasks"]}
    assert rows["full"]["kind"] == "full"
    table = cli("list", "--root", str(task.parent))
    assert "KIND" in table.output.splitlines()[0]


def test_eval_runs_on_a_full_fine_tune(make_prepared_task) -> None:
    from sage_finetune_plugin.evaluation import EvalOptions, evaluate_task

    task = make_prepared_task("full", finetuning_type="full", learning_rate=1e-3, **SHORT)
    train_from_meta(task)
    options = EvalOptions(split="train", max_samples=2, max_new_tokens=4, base=False)
    report = evaluate_task(task, options)
    assert report.tuned is not None and report.tuned["loss"] > 0


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"finetuning_type": "all"}, "finetuning_type must be lora, full, freeze"),
        ({"finetuning_type": "full", "load_in_4bit": True}, "cannot be 4- or 8-bit"),
        ({"freeze_trainable_layers": 0}, "must not be 0"),
        ({"lora": {"init_lora_weights": "pissa_fast"}}, "or pissa_niter_N"),
        ({"lora": {"loraplus_lr_ratio": 0}}, "must be positive"),
        ({"neftune_noise_alpha": -1.0}, "must be positive"),
    ],
)
def test_bad_settings_are_refused_in_one_line(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TrainingConfig().replace(**changes)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"finetuning_type": "full", "method": "dpo"}, "frozen copy of the whole model"),
        ({"lora": {"init_lora_weights": "loftq"}}, "needs load_in_4bit=True"),
        (
            {"load_in_8bit": True, "lora": {"init_lora_weights": "pissa"}},
            "changes the base weights",
        ),
    ],
)
def test_plans_the_kind_cannot_train_are_blocked(
    make_prepared_task, changes: dict[str, Any], message: str
) -> None:
    task = make_prepared_task("blocked")
    plan = plan_run(task, RunOptions(overrides=changes))
    assert plan.blockers, plan
    assert message in str(plan.blockers[0])
    with pytest.raises(FinetuneError, match=message):
        plan.check()


def test_quickstart_records_the_kind(tiny_model_dir: Path, tmp_path: Path) -> None:
    from conftest import write_data

    data = write_data(tmp_path / "data.jsonl", 8)
    root = tmp_path / "root"
    args = ["quickstart", "instruction", "--data", str(data), "--name", "frz", "--root", str(root)]
    created = cli(*args, "--model", str(tiny_model_dir), "--finetuning-type", "freeze")
    assert created.exit_code == 0, created.output
    assert load_meta(root / "frz").training["finetuning_type"] == "freeze"
    refused = cli("run", str(root / "frz"), "--4bit", "--dry-run")
    assert refused.exit_code == 2
    assert "cannot be 4- or 8-bit" in refused.output and "Traceback" not in refused.output


def test_finetuning_type_option_and_set_keys() -> None:
    help_text = cli("run", "--help").output
    assert "--finetuning-type [lora|full|freeze]" in help_text
    assert "--finetuning-type" in cli("quickstart", "--help").output
    config = TrainingConfig().with_settings(
        ["freeze_trainable_modules=mlp,self_attn", "freeze_extra_modules=none", "lora.use_dora=on"]
    )
    assert config.freeze_trainable_modules == ["mlp", "self_attn"]
    assert config.freeze_extra_modules is None and config.lora.use_dora is True


def test_export_of_a_freeze_task_reads_its_model_folder(make_prepared_task) -> None:
    pytest.importorskip("gguf")
    import gguf

    from sage_finetune_plugin.export import export_task

    task = make_prepared_task("frozen", finetuning_type="freeze", max_steps=2, save_steps=10)
    train_from_meta(task)
    result = export_task(task, quant="f16")
    assert result.model_dir == task / "model"
    assert not (task / "merged").exists()
    names = {t.name for t in gguf.GGUFReader(result.path).tensors}
    assert "token_embd.weight" in names and "blk.1.ffn_down.weight" in names


def test_a_later_stage_of_a_full_task_starts_from_its_model(make_prepared_task, tmp_path) -> None:
    """New data on a full task: a stage that continues the saved model, not the base."""
    from sage_finetune_plugin.runs import start_run

    from conftest import write_data

    task = make_prepared_task("full", finetuning_type="full", learning_rate=1e-3, max_steps=2)
    train_from_meta(task)
    first = _weights(task / "model")
    data = write_data(tmp_path / "more.jsonl", 16)
    plan = plan_run(task, RunOptions(data=str(data), overrides={"learning_rate": 1e-9}))
    assert plan.config.init_adapter == str(task / "model")
    assert "Starts from: the task's model" in "\n".join(plan.objective_lines())
    start_run(plan)
    second = _weights(task / "model")
    assert max(float((first[k] - second[k]).abs().max()) for k in first) < 1e-6


def test_full_fine_tuning_that_does_not_fit_is_refused_with_the_numbers(make_prepared_task) -> None:
    from sage_finetune_plugin.training.runtime import Hardware

    task = make_prepared_task("big", finetuning_type="full")
    small_gpu = Hardware(cuda=True, cuda_bf16=True, cuda_memory=700 * 2**20)
    plan = plan_run(task, RunOptions(), hardware=small_gpu)
    message = str(plan.blockers[0])
    assert message.startswith("Predicted not to fit: does not fit:")
    assert "GiB estimated peak" in message and "use finetuning_type=lora" in message
    lora = plan_run(task, RunOptions(overrides={"finetuning_type": "lora"}), hardware=small_gpu)
    assert lora.memory is not None and plan.memory is not None
    assert plan.memory.total > lora.memory.total  # gradients and Adam states for every weight
