"""Memory estimates checked against real models: parameter counts, bitsandbytes storage,
tensors saved for backward, and the peak RSS of real training runs in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sage_finetune_plugin.config import SMALL_MODEL, LoRAConfig, TrainingConfig
from sage_finetune_plugin.presets import GPU_PRESETS, PresetConfigs, choose_preset
from sage_finetune_plugin.training.loss import FLAG, install_answer_loss
from sage_finetune_plugin.training.memory import GIB, estimate_memory, fits
from sage_finetune_plugin.training.runtime import Hardware

#: Largest accepted relative error of the estimated peak RSS against the measured one.
RSS_TOLERANCE = 0.25

#: Run in a fresh interpreter: train, then report the RSS at start-up and the peak RSS (in
#: KiB, from /proc: ru_maxrss would include the parent's peak, inherited across fork).
TRAIN_AND_MEASURE = """
import json, sys
def status(key):
    with open("/proc/self/status") as lines:
        return next(int(line.split()[1]) for line in lines if line.startswith(key + ":"))
start = status("VmRSS")
from sage_finetune_plugin.config import TrainingConfig
from sage_finetune_plugin.training.recipe import LoRATrainer
LoRATrainer(TrainingConfig.from_dict(json.loads(sys.argv[1]))).train()
print(json.dumps({"start": start, "peak": status("VmHWM")}))
"""
linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads peak RSS from /proc"
)


def tiny_config(model: Path, **changes) -> TrainingConfig:
    return TrainingConfig(model_name=str(model), **changes)


def test_parameters_and_lora_counts_match_the_real_model(tiny_model_dir: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    for targets in ("all-linear", ["q_proj", "v_proj"], r".*mlp\.(up|down)_proj"):
        lora = LoRAConfig(r=4, lora_alpha=8, target_modules=targets)
        estimate = estimate_memory(tiny_config(tiny_model_dir, lora=lora), device="cpu")
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
        trainable, total = peft_model.get_nb_trainable_parameters()
        assert estimate.trainable_parameters == trainable, targets
        assert estimate.parameters == total - trainable
        assert estimate.lora_weights == estimate.gradients == 4 * trainable
        assert estimate.optimizer_states == 8 * trainable  # AdamW: two fp32 states


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_weights_match_bitsandbytes_storage(tiny_model_dir: Path, bits: int) -> None:
    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = (
        BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
        if bits == 4
        else BitsAndBytesConfig(load_in_8bit=True)
    )
    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, dtype=torch.float32, quantization_config=quantization
    )
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    stored = {}
    for tensor in [*model.parameters(), *model.buffers(), *_quantization_tensors(model)]:
        stored[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    config = tiny_config(tiny_model_dir, load_in_4bit=bits == 4, load_in_8bit=bits == 8)
    # On a GPU nothing else is resident (on the CPU the mapped checkpoint adds to it).
    estimate = estimate_memory(config, device="cuda")
    assert estimate.weights == pytest.approx(sum(stored.values()), rel=0.01)
    assert estimate.quantization.startswith(f"{bits}-bit")


@pytest.mark.parametrize(
    ("dropout", "targets", "batch", "length"),
    [(0.05, "all-linear", 2, 32), (0.0, ["q_proj", "v_proj"], 4, 64), (0.1, "all-linear", 1, 64)],
)
def test_activations_match_tensors_saved_for_backward(
    tiny_model_dir: Path, dropout: float, targets, batch: int, length: int
) -> None:
    """The activation term against what autograd really keeps, called as training calls the
    model (the answer-token loss: a right-padded batch runs without its mask); the estimate
    may only be above it, by what the first layer does not save."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    lora = LoRAConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets)
    config = tiny_config(
        tiny_model_dir,
        max_length=length,
        per_device_train_batch_size=batch,
        gradient_checkpointing=False,
        lora=lora,
    )
    estimate = estimate_memory(config, device="cpu")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets)
    )
    assert install_answer_loss(model)
    model.train()
    ids = torch.randint(5, model.config.vocab_size, (batch, length))
    mask = torch.ones_like(ids)
    if batch > 1:  # a right-padded batch, its padding without labels
        mask[0, -5:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    saved = _saved_for_backward(model, ids, mask, labels, exclude_last_dim=model.config.vocab_size)
    # The loss saves the gradient of the scored hidden states: counted under logits.
    assert 0.99 <= estimate.activations / saved <= 1.15


KINDS = {
    "dora": {"lora": LoRAConfig(r=4, lora_alpha=8, lora_dropout=0.0, use_dora=True)},
    "full": {"finetuning_type": "full"},
    "freeze": {"finetuning_type": "freeze", "freeze_trainable_layers": 1},
    "freeze_first_mlp": {
        "finetuning_type": "freeze",
        "freeze_trainable_layers": -1,
        "freeze_trainable_modules": ["mlp"],
        "freeze_extra_modules": ["norm"],
    },
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_adapter_kinds_count_what_trains_and_what_backward_keeps(
    tiny_model_dir: Path, kind: str
) -> None:
    """DoRA, full and freeze: the trainable parameters are those the unit leaves trainable, the
    weights and gradients follow, and the activations term matches what autograd keeps
    (only the layers the backward pass runs through, for freeze)."""
    import torch
    from transformers import AutoModelForCausalLM

    from sage_finetune_plugin.adapters import adapter_for

    config = tiny_config(
        tiny_model_dir,
        max_length=32,
        per_device_train_batch_size=2,
        gradient_checkpointing=False,
        **KINDS[kind],
    )
    estimate = estimate_memory(config, device="cpu")
    unit = adapter_for(config)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = unit.prepare(model, config, quantized=False, fsdp=False)
    model, _ = unit.attach(model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert estimate.trainable_parameters == trainable
    assert estimate.gradients == 4 * trainable
    assert estimate.optimizer_states == 8 * trainable
    if kind == "dora":
        assert estimate.lora_weights == 4 * trainable
    else:  # the model's own weights train: nothing added
        assert estimate.lora_weights == 0
        assert estimate.weights == 4 * sum(p.numel() for p in model.parameters())
    assert install_answer_loss(model)
    model.train()
    ids = torch.randint(5, model.config.vocab_size, (2, 32))
    mask = torch.ones_like(ids)
    mask[0, -5:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    # Per token only: the weight-shaped tensors saved (the head's gradient, which the
    # answer-token loss computes in the forward pass, and weight copies) are weights' terms.
    saved = _saved_for_backward(
        model, ids, mask, labels, exclude_last_dim=model.config.vocab_size, weight_shaped=False
    )
    if kind == "dora":  # DoRA keeps each adapted layer's composed weight for backward
        saved += sum(layer.in_features * layer.out_features * 4 for layer in _linears(model))
    # The first layers of a freeze run save less than a trained layer: the estimate errs high.
    assert 0.95 <= estimate.activations / saved <= 1.3, (estimate.activations, saved)


def test_estimate_follows_the_settings() -> None:
    from sage_finetune_plugin.models import model_config

    base = PresetConfigs.cpu().replace(
        max_length=128, per_device_train_batch_size=2, packing=False, bf16=False
    )
    smollm2 = model_config(base.model_name)  # 30 layers

    def estimate(config: TrainingConfig, device: str = "cpu", **kwargs):
        return estimate_memory(config, model_config=smollm2, device=device, **kwargs)

    plain = estimate(base)
    checkpointed = estimate(base.replace(gradient_checkpointing=True))
    double = estimate(base.replace(per_device_train_batch_size=4))
    shorter = estimate(base, seq_len=64)
    four_bit = estimate(base.replace(load_in_4bit=True), "cuda")
    assert checkpointed.activations < plain.activations / 10  # 30 layers: inputs + one layer
    # The answer-token loss holds one chunk of logits (341 positions of SmolLM2), not all.
    assert plain.logits < double.logits < 2 * plain.logits
    assert double.logits < 400 * smollm2.vocab_size * 4
    assert double.activations > 1.9 * plain.activations
    assert shorter.seq_len == 64 and shorter.logits < plain.logits
    assert four_bit.weights < estimate(base, "cuda").weights / 2
    assert plain.total == sum(plain.to_dict()[name] for name in plain.COMPONENTS)
    assert plain.to_dict()["total"] == plain.total
    lines = plain.summary()
    assert "batch 2 x 128 tokens" in lines[0] and "total (peak)" in lines[-1]
    assert "GiB" in str(plain) and "cpu" in str(plain)


@pytest.mark.parametrize("gib", [4, 8, 12, 24, 80, 200])
def test_choose_preset_takes_the_largest_preset_that_fits(gib: int) -> None:
    memory = gib * GIB
    name, estimate = choose_preset(device_memory=memory)
    ahead = GPU_PRESETS[: GPU_PRESETS.index(name)]
    for larger in ahead:
        assert not fits(estimate_memory(PresetConfigs.get(larger), device="cuda"), memory)
    assert estimate.device == "cuda"
    assert fits(estimate, memory) or name == GPU_PRESETS[-1]


def test_choose_preset_uses_the_given_model_and_cpu_without_gpu(tiny_model_dir: Path) -> None:
    name, estimate = choose_preset(str(tiny_model_dir), device_memory=8 * GIB)
    assert estimate.model_name == str(tiny_model_dir)
    assert name == GPU_PRESETS[0]  # a tiny model fits any preset
    gpu = Hardware(cuda=True, cuda_bf16=True, cuda_memory=8 * GIB)
    assert choose_preset(str(tiny_model_dir), hardware=gpu)[0] == GPU_PRESETS[0]
    name, estimate = choose_preset(hardware=Hardware())
    assert (name, estimate.device) == ("cpu", "cpu")


@linux_only
def test_estimate_matches_peak_rss_of_tiny_training(tiny_model_dir: Path, tmp_path: Path) -> None:
    config = tiny_config(
        tiny_model_dir,
        max_length=128,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        max_steps=3,
    )
    _assert_estimate_matches_training(config, tmp_path)


@linux_only
@pytest.mark.slow
def test_estimate_matches_peak_rss_of_smollm2_cpu_preset(tmp_path: Path) -> None:
    """The cpu preset on the embedded SmolLM2-135M for two steps (about a minute)."""
    from sage_finetune_plugin.models import resolve_model

    resolve_model(SMALL_MODEL)  # convert outside the measured process
    config = PresetConfigs.cpu().replace(max_steps=2)
    _assert_estimate_matches_training(config, tmp_path)


def _assert_estimate_matches_training(config: TrainingConfig, tmp_path: Path) -> None:
    """Train in a fresh interpreter; compare its peak RSS with the estimate."""
    estimate = estimate_memory(config, device="cpu")
    measured = measured_training_rss(config, tmp_path)
    error = estimate.total / measured - 1
    assert abs(error) <= RSS_TOLERANCE, (
        f"estimate {estimate.total / GIB:.2f} GiB vs measured {measured / GIB:.2f} GiB "
        f"({error:+.0%})\n" + "\n".join(estimate.summary())
    )


def measured_training_rss(config: TrainingConfig, folder: Path) -> int:
    """Bytes of peak RSS above the bare interpreter's of training ``config`` in a fresh
    interpreter on samples that all fill max_length (benchmarks/memory.py uses it too).
    RuntimeError with the end of its output when the training fails."""
    data = folder / "data.jsonl"
    with data.open("w", encoding="utf-8") as out:
        for i in range(32):
            numbers = " ".join(str(n) for n in range(i, i + 2 * config.max_length))
            record = {"instruction": f"Count upwards from {i}.", "output": numbers}
            out.write(json.dumps(record) + "\n")
    config = config.replace(
        data_path=str(data), output_dir=str(folder / "task"), report_to="none", save_steps=1000
    )
    proc = subprocess.run(
        [sys.executable, "-c", TRAIN_AND_MEASURE, json.dumps(config.to_dict())],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"training failed:\n{proc.stderr[-3000:]}")
    rss = json.loads(proc.stdout.strip().splitlines()[-1])
    return (rss["peak"] - rss["start"]) * 1024


def _saved_for_backward(
    model, ids, mask, labels, *, exclude_last_dim: int, weight_shaped: bool = True
) -> int:
    """Bytes of distinct tensors autograd saves in a forward pass (weights and the
    vocabulary-sized logits excluded; ``weight_shaped=False``: tensors of a weight's shape
    too, the gradients and weight copies of a run that trains the weights)."""
    import torch

    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    shapes = set() if weight_shaped else {tuple(p.shape) for p in model.parameters()}
    shapes |= {tuple(reversed(shape)) for shape in shapes}
    saved: dict[int, int] = {}

    def pack(tensor):
        key = tensor.untyped_storage().data_ptr()
        if tuple(tensor.shape) in shapes:
            return tensor
        if key not in weights and (tensor.dim() == 0 or tensor.shape[-1] != exclude_last_dim):
            saved[key] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=ids, attention_mask=mask, labels=labels, **{FLAG: True})
    return sum(saved.values())


def _linears(model):
    """The adapted linear layers of a peft model (their base layers)."""
    return [
        module.base_layer for module in model.modules() if hasattr(module, "lora_magnitude_vector")
    ]


def _quantization_tensors(model):
    """bitsandbytes' per-block constants and per-row scales (kept outside parameters)."""
    import torch

    for module in model.modules():
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        candidates = [getattr(weight, "SCB", None)]
        if state is not None:
            candidates += [state.absmax, getattr(state, "offset", None)]
            if state.state2 is not None:
                candidates.append(state.state2.absmax)
        yield from (t for t in candidates if isinstance(t, torch.Tensor))


@linux_only
@pytest.mark.slow
def test_estimate_matches_peak_rss_of_smollm2_in_8_bit(tmp_path: Path) -> None:
    """The embedded SmolLM2-135M loaded in 8 bits on the CPU, 2 x 512 tokens with gradient
    checkpointing: bitsandbytes' dequantized copies count (docs: within 15 %)."""
    from sage_finetune_plugin.models import resolve_model

    resolve_model(SMALL_MODEL)
    config = PresetConfigs.cpu().replace(
        max_steps=2,
        packing=False,
        per_device_train_batch_size=2,
        max_length=512,
        gradient_checkpointing=True,
        eval_ratio=0.0,
        bf16=False,
        load_in_8bit=True,
    )
    _assert_estimate_matches_training(config, tmp_path)
