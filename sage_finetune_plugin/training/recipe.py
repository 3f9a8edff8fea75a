"""LoRA / QLoRA training of a causal language model, as a recipe that reads top to bottom.

``LoRATrainer(config).train()`` runs: resolve the model -> load it (4-bit, 8-bit or not
quantized) -> attach the adapter -> prepare the data -> build the method's trainer and train
-> save the adapter. The training method (methods/: sft, dpo, orpo, kto, or a plugin's) renders
the data and builds the trainer; the adapter (adapters/: LoRA) is attached, saved and counted
by its unit. Each step is a method a subclass may override::

    class MyTrainer(LoRATrainer):
        def prepare_data(self):
            ...  # return a PreparedDataset (.train, .eval, .collator)

This is the engine: it trains the config it is given, does what ``resume_from_checkpoint``
says and reports what happened (a ``TrainOutcome``). The task's books (books.py: the lock, the
meta, the stages, the loss plot) record it; the policy around a run (which config, whether an
interrupted task may start over, whether it fits in memory) is the run service's (runs.py).
Nothing here prints: progress goes to the ``progress`` sink (or to ``logging``), problems are
raised as FinetuneError subclasses.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..adapters import adapter_for
from ..books import RunBooks
from ..checkpoints import is_complete_checkpoint, latest_checkpoint, list_checkpoints
from ..config import TrainingConfig
from ..errors import (
    ConfigError,
    DataError,
    FinetuneError,
    ModelError,
    OutOfMemoryError,
    TrainingError,
    TrainingInterrupted,
)
from ..methods import get_method
from ..models import quiet_deprecations
from ..paths import (
    BASE_EVAL_CACHE,
    CANCEL_FILE,
    CHECKPOINTS_DIR,
    LOSS_PLOT,
    PREPARED_CACHE,
    atomic_directory,
    remove_tree,
)
from ..progress import ProgressSink
from ..task import Task
from .base_eval import base_evaluation_key, cache_base_evaluation
from .callbacks import (
    NonFinite,
    ProgressCallback,
    RankLogCallback,
    StopOnNonFinite,
    StopOnSignal,
)
from .distributed import fsdp_enabled, is_main_process, world_size
from .metrics import TrainOutcome, TrainResult, run_metrics
from .runtime import Hardware, Runtime, quantization_config, resolve_runtime
from .tracking import TrackerRuns, run_params

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer

    from ..data import PreparedDataset

logger = logging.getLogger(__name__)


class LoRATrainer:
    """Train an adapter for ``config`` with its method; outputs go to ``task_dir`` (a folder or
    a Task; default: ``config.output_dir``).

    ``callbacks`` are extra ``transformers.TrainerCallback`` objects; ``progress`` receives a
    ``RunProgress`` at every step and logging step (without one, logging steps go to
    ``logging``); ``hardware`` states the machine for the runtime policy (detected when not
    given). ``books`` keep the task's records (the run service passes its own; by default the
    task directory's). After ``train()`` the steps' results stay available as ``tokenizer``,
    ``model``, ``data`` and ``trainer``. ``notes`` are recorded with the run.
    """

    def __init__(
        self,
        config: TrainingConfig,
        *,
        task_dir: Task | str | os.PathLike[str] | None = None,
        callbacks: Sequence[Any] | None = None,
        progress: ProgressSink | None = None,
        hardware: Hardware | None = None,
        notes: Sequence[str] = (),
        books: RunBooks | None = None,
    ) -> None:
        config.validate()
        self.config = config
        self.method = get_method(config.method)
        for blocker in self.method.blockers(config):  # a missing TRL, before any model loads
            raise blocker
        self.adapter = adapter_for(config)
        for blocker in self.adapter.blockers(config):  # what this kind cannot train
            raise blocker
        task = task_dir if isinstance(task_dir, Task) else None
        if isinstance(task_dir, Task):
            self.task_dir = task_dir.path
        else:
            self.task_dir = Path(task_dir or config.output_dir)
        self.books = books or RunBooks(task or self.task_dir, forward=progress)
        self.callbacks = list(callbacks or [])
        self.hardware = hardware
        self._runtime: Runtime | None = None
        self.model_path: Path | None = None
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.model: Any = None
        self.data: PreparedDataset | None = None
        self.trainer: Trainer | None = None
        self.target_modules: list[str] = []
        self.notes: list[str] = []
        for note in notes:
            self._note(note)
        self._stop = StopOnSignal(cancel_file=self.task_dir / CANCEL_FILE)
        self._finite = StopOnNonFinite()
        self.trackers = TrackerRuns(config, self.task_dir, self.books)
        self.trackers.check()  # a missing wandb or mlflow, before any model loads

    @property
    def checkpoints_dir(self) -> Path:
        return self.task_dir / CHECKPOINTS_DIR

    @property
    def quantized(self) -> bool:
        return self.config.quantization is not None

    @property
    def runtime(self) -> Runtime:
        """Where and how this run trains (the runtime policy, resolved once)."""
        if self._runtime is None:
            self._runtime = resolve_runtime(self.config, self.hardware)
        return self._runtime

    # --- the recipe ---------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: bool | str | os.PathLike[str] = False) -> TrainResult:
        """Run the whole recipe and record it in the task's books;
        ``resume_from_checkpoint=True`` continues from the newest complete checkpoint of the
        task (from scratch when there is none)."""
        with self.books.run(self.config, resume=bool(resume_from_checkpoint)):
            result = self.books.finish(self.fit(resume_from_checkpoint))
        if self.config.tracker_artifacts and is_main_process():
            from ..tracking import log_to_task_runs

            files = [self.task_dir / LOSS_PLOT, self.task_dir / self.adapter.folder]
            result.notes.extend(log_to_task_runs(Task(self.task_dir), files=files))
        return result

    def fit(self, resume_from_checkpoint: bool | str | os.PathLike[str] = False) -> TrainOutcome:
        """The recipe without the books: what the run did. Raises TrainingInterrupted (with
        the outcome until then) when it was stopped at the end of a step, OutOfMemoryError
        when the device ran out of memory."""
        started = time.monotonic()
        try:
            with quiet_deprecations():
                return self._recipe(resume_from_checkpoint, started)
        except BaseException as exc:
            if not isinstance(exc, FinetuneError | KeyboardInterrupt) and _is_out_of_memory(exc):
                raise OutOfMemoryError(self._out_of_memory_message()) from exc
            raise

    def _recipe(self, resume: bool | str | os.PathLike[str], started: float) -> TrainOutcome:
        self._stop.requested = False
        self._finite.failure = None
        self._runtime = None
        for note in self.runtime.notes:
            self._note(note)
        self._setup_process()
        self.model_path = self.resolve_model()
        self.tokenizer = self.load_tokenizer()
        self.model = self.attach_lora(self.load_model())
        self.data = self.prepare_data()
        self.trainer = self.build_trainer(self.model, self.data)
        self._cache_base_evaluation(self.trainer, self.data)
        self.adapter.configure_trainer(self.trainer, self.config)  # LoRA+: its optimizer
        checkpoint = self._checkpoint_to_resume(resume)
        resumed = _resume_point(checkpoint)  # read now: rotation may delete the checkpoint
        params = run_params(self._config_used(), self.runtime, self.data.stats)
        with self.trackers.running(params, resume=checkpoint is not None):
            with self._stop.installed():
                output = self.trainer.train(resume_from_checkpoint=checkpoint and str(checkpoint))
            if self._finite.failure is not None:
                raise TrainingError(self._non_finite_message(self._finite.failure))
            if self._stop.requested:
                outcome = self._outcome(started, resumed)
                message = self.books.interrupted_message(saved=self.trainer.state)
                raise TrainingInterrupted(message, outcome)
            self._evaluate_final()
            self.save(self.trainer)
        return self._outcome(started, resumed, output)

    # --- steps (override in a subclass) -----------------------------------------------------

    def resolve_model(self) -> Path:
        """The local folder of the base model (hub id, local dir, HF cache or embedded)."""
        from ..models import resolve_model

        config = self.config
        return resolve_model(config.model_name, trust_remote_code=config.trust_remote_code)

    def load_tokenizer(self) -> PreTrainedTokenizerBase:
        from ..models import load_tokenizer

        return load_tokenizer(
            str(self.model_path or self.config.model_name),
            trust_remote_code=self.config.trust_remote_code,
        )

    def load_model(self) -> PreTrainedModel:
        """The base model, quantized with bitsandbytes when the config asks for 4 or 8 bits,
        made ready for its adapter."""
        from transformers import AutoModelForCausalLM

        runtime = self.runtime
        kwargs: dict[str, Any] = {
            "dtype": runtime.dtype,
            "trust_remote_code": self.config.trust_remote_code,
        }
        quantization = quantization_config(self.config, runtime, fsdp=fsdp_enabled())
        if quantization is not None:
            from ..deps import require

            require("bitsandbytes")
            kwargs["quantization_config"] = quantization
            if not fsdp_enabled():  # FSDP places the shards itself
                kwargs["device_map"] = _device_map(runtime.device)
        path = self.model_path or self.config.model_name
        try:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        except (OSError, ValueError, ImportError) as exc:
            name = self.config.model_name
            raise ModelError(f"Cannot load model {name} from {path}: {exc}") from None
        model.config.use_cache = False  # the KV cache is useless in training
        if runtime.device == "cpu" and quantization is not None:
            _keep_4bit_layout(model)
        logger.info(
            "Loaded %s (%s) on %s%s",
            self.config.model_name,
            runtime.dtype_name,
            runtime.device,
            f", {runtime.quantization} quantized" if runtime.quantization else "",
        )
        return self.adapter.prepare(
            model, self.config, quantized=quantization is not None, fsdp=fsdp_enabled()
        )

    def attach_lora(self, model: PreTrainedModel) -> Any:
        """Attach the config's adapter (LoRA): ``all-linear`` becomes the architecture's linear
        projections (the output head excluded), recorded in ``target_modules``. With
        ``config.init_adapter`` (a later stage of a task) that adapter is trained further
        instead, with its own rank and targets."""
        if self.config.init_adapter:
            model, self.target_modules, changes = self.adapter.resume(
                model, self.config.init_adapter, self.config
            )
            self.config = self.config.replace(**changes)
            return model
        model, self.target_modules = self.adapter.attach(model, self.config)
        return model

    def prepare_data(self) -> PreparedDataset:
        """The data rendered for the method: train (and eval) splits and their collator."""
        from ..data import prepare_dataset

        if not self.config.data_path:
            raise DataError("No training data: set data_path in the training config.")
        data = prepare_dataset(
            self.config.data_path,
            self.tokenizer,
            self.config,
            cache_dir=self.task_dir / PREPARED_CACHE,
        )
        logger.info("Data: %s", data.stats.summary().replace("\n", "; "))
        return data

    def build_trainer(self, model: Any, data: PreparedDataset) -> Trainer:
        """The method's ``transformers.Trainer`` (or TRL's), with this plugin's progress
        reports, the experiment trackers (TensorBoard logs in ``<task>/logs``, W&B, MLflow)
        and the Ctrl-C / cancel handler."""
        return self.method.build_trainer(self, model, data)

    def install_callbacks(self, trainer: Trainer) -> None:
        """This plugin's progress reports, Ctrl-C / cancel handler and experiment trackers
        (``config.report_to``) in place of the Trainer's console output (any Trainer
        subclass)."""
        from transformers import PrinterCallback
        from transformers import ProgressCallback as HFProgressCallback

        trainer.remove_callback(HFProgressCallback)
        trainer.remove_callback(PrinterCallback)
        reports = ProgressCallback(self.books.progress)
        trackers = self.trackers.callbacks()
        for callback in (reports, self._stop, self._finite, *trackers, *self.callbacks):
            trainer.add_callback(callback)
        if world_size() > 1:
            trainer.add_callback(RankLogCallback())

    def training_arguments(
        self, data: PreparedDataset, arguments_class: type | None = None, **extra: Any
    ) -> Any:
        """``transformers.TrainingArguments`` (or ``arguments_class``, a subclass such as TRL's
        configs, with ``extra`` fields) for this config, device and data."""
        from transformers import TrainingArguments

        arguments_class = arguments_class or TrainingArguments
        config, runtime = self.config, self.runtime
        has_eval = data.eval is not None
        packing = data.packing
        group_by_length = not packing and config.per_device_train_batch_size > 1
        values = dict(
            output_dir=str(self.checkpoints_dir),
            num_train_epochs=config.num_train_epochs,
            max_steps=config.max_steps or -1,
            per_device_train_batch_size=config.per_device_train_batch_size,
            per_device_eval_batch_size=config.per_device_train_batch_size,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            learning_rate=config.learning_rate,
            lr_scheduler_type=config.lr_scheduler_type,
            warmup_ratio=config.warmup_ratio,
            weight_decay=config.weight_decay,
            max_grad_norm=config.max_grad_norm,
            optim=runtime.optim,
            fp16=runtime.fp16,
            bf16=runtime.bf16,
            use_cpu=runtime.device == "cpu",
            gradient_checkpointing=config.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
            group_by_length=group_by_length,
            length_column_name="length",
            logging_steps=config.logging_steps,
            logging_first_step=True,
            logging_nan_inf_filter=False,  # a non-finite loss stops the run (StopOnNonFinite)
            save_strategy="steps",
            save_steps=config.save_steps,
            save_total_limit=config.save_total_limit,
            save_safetensors=True,
            eval_strategy="steps" if has_eval else "no",
            eval_steps=config.save_steps if has_eval else None,
            eval_on_start=has_eval,  # the base model's loss: what fine-tuning gained
            report_to="none",
            neftune_noise_alpha=config.neftune_noise_alpha,
            seed=config.seed,
            dataloader_num_workers=config.dataloader_num_workers,
            remove_unused_columns=False,
            # A packed batch has no padding (and no attention mask to count it from).
            include_num_input_tokens_seen="all" if packing else "non_padding",
            **_distributed_arguments(runtime),
        )
        values = _compatible_arguments(arguments_class, **{**values, **extra})
        try:
            return arguments_class(**values)
        except (ValueError, ImportError) as exc:
            raise ConfigError(f"Invalid training settings: {exc}") from None

    def save(self, trainer: Trainer) -> Path:
        """Save the adapter (``<task>/adapter``; full and freeze: the model, ``<task>/model``)
        and the tokenizer."""
        target = self.task_dir / self.adapter.folder
        self.method.before_save(trainer)
        if not trainer.is_world_process_zero():
            return target
        assert self.tokenizer is not None
        with atomic_directory(target, replace=True) as staging:
            self.adapter.save(trainer.model, staging, self.config, self.tokenizer)
            self.tokenizer.save_pretrained(staging)
        logger.info("%s saved to %s", "Model" if self.adapter.standalone else "Adapter", target)
        return target

    # --- helpers ----------------------------------------------------------------------------

    def _outcome(
        self, started: float, resumed: dict[str, int] | None, output: Any = None
    ) -> TrainOutcome:
        """What the run did: its metrics (the method's included) and the config as it ran."""
        assert self.trainer is not None
        state = self.trainer.state
        runtime_s = (output.metrics.get("train_runtime") if output else None) or (
            time.monotonic() - started
        )
        metrics = run_metrics(
            state,
            self.runtime,
            runtime_s=runtime_s,
            wall_time_s=time.monotonic() - started,
            resumed=resumed,
            effective_batch_size=self.config.effective_batch_size,
            world_size=world_size(),
        )
        metrics.update(self.method.metrics(state.log_history))
        data_stats = self.data.stats if self.data is not None else None
        return TrainOutcome(
            metrics, self._config_used(), list(self.target_modules), list(self.notes), data_stats
        )

    def _note(self, text: str) -> None:
        self.notes.append(text)
        logger.warning("Note: %s", text)

    def _evaluate_final(self) -> None:
        """Evaluate the final adapter, unless the last step was evaluated already."""
        if self.data is None or self.data.eval is None:
            return
        assert self.trainer is not None
        state = self.trainer.state
        last = [h for h in state.log_history if "eval_loss" in h][-1:]
        if not last or last[0]["step"] != state.global_step:
            self.trainer.evaluate()

    def _cache_base_evaluation(self, trainer: Trainer, data: PreparedDataset) -> None:
        """The evaluation before the first step from the task's cache, keyed by what it depends
        on: the model (and the adapter a later stage starts from), the eval split as rendered,
        where and how it runs, the batches and the adapter's settings."""
        if data.eval is None or not data.stats.cache_key:
            return
        config, runtime = self.config, self.runtime
        key = base_evaluation_key(
            model=self.model_path or config.model_name,
            start=Path(config.init_adapter) if config.init_adapter else None,
            data=data.stats.cache_key,
            device=runtime.device,
            dtype=runtime.dtype_name,
            quantization=runtime.quantization,
            batch=config.per_device_train_batch_size,
            packing=data.packing,
            method=config.method,
            adapter=config.to_dict()["lora"],
        )
        cache_base_evaluation(trainer, self.task_dir / BASE_EVAL_CACHE, key)

    def _setup_process(self) -> None:
        import torch
        from transformers import set_seed

        if self.config.num_threads:
            torch.set_num_threads(self.config.num_threads)
        set_seed(self.config.seed)

    def _checkpoint_to_resume(self, resume: bool | str | os.PathLike[str]) -> Path | None:
        """The checkpoint to continue from; a fresh run clears the old checkpoints."""
        if resume is True:
            checkpoint = latest_checkpoint(self.checkpoints_dir)
            if checkpoint is None:
                self._note("no complete checkpoint to resume from: starting at step 0")
            else:
                logger.info("Resuming from %s", checkpoint)
            return checkpoint
        if resume:
            checkpoint = Path(resume)
            if not is_complete_checkpoint(checkpoint):
                raise TrainingError(
                    f"{checkpoint} is not a complete checkpoint (adapter_model.safetensors and "
                    "trainer_state.json): resume from another one, or use resume=True."
                )
            return checkpoint
        old = list_checkpoints(self.checkpoints_dir)
        if old and is_main_process():
            earlier = "the stage before" if self.config.init_adapter else "an earlier run"
            start = "new stage" if self.config.init_adapter else "starting over"
            self._note(f"{start}: removed {len(old)} checkpoint(s) of {earlier}")
            remove_tree(self.checkpoints_dir)
        return None

    def _config_used(self) -> TrainingConfig:
        """The config with what was resolved at run time: targets, precision, optimizer."""
        runtime = self.runtime
        changes: dict[str, Any] = {
            "optim": runtime.optim,
            "fp16": runtime.fp16,
            "bf16": runtime.bf16,
            "output_dir": str(self.task_dir),
        }
        if self.target_modules:
            changes["lora"] = {"target_modules": list(self.target_modules)}
        return self.config.replace(**changes)

    def _non_finite_message(self, failure: NonFinite) -> str:
        """One line: the step, the precision, the last good state and what to try."""
        config, runtime = self.config, self.runtime
        if failure.intact and failure.step > 1:
            kept = f"checkpoint-{failure.step} holds the weights of step {failure.step - 1}"
        elif failure.intact:
            kept = "no step succeeded, so there is no checkpoint"
        else:
            newest = latest_checkpoint(self.checkpoints_dir)
            kept = f"{newest.name} is the last good state" if newest else "there is no checkpoint"
        advice = [f"a lower learning_rate (now {config.learning_rate:g})"]
        if runtime.fp16:
            advice.append("bf16 instead of fp16 (bf16=True, fp16=False) where the device has it")
        if not config.max_grad_norm:
            advice.append("gradient clipping (max_grad_norm=1.0)")
        return (
            f"Training stopped at step {failure.step}: the {failure.what} became "
            f"{failure.value} in {runtime.dtype_name} ({kept}). Try {', '.join(advice)}; then "
            "start over (force=True) or continue from the checkpoint (resume=True)."
        )

    def _out_of_memory_message(self) -> str:
        from .memory import estimate_memory

        config = self.config
        device = self.runtime.device
        try:
            estimate = f"estimated peak {estimate_memory(config, hardware=self.hardware)}"
        except FinetuneError as exc:  # the estimate needs the model's config
            estimate = f"no estimate: {exc}"
        advice = [f"per_device_train_batch_size (now {config.per_device_train_batch_size})"]
        advice.append(f"max_length (now {config.max_length})")
        if not config.gradient_checkpointing:
            advice.append("enable gradient_checkpointing")
        if config.quantization != "4bit":
            advice.append("load the model in 4-bit (load_in_4bit=True)")
        return (
            f"Out of memory on {device} training {config.model_name} with preset "
            f"{config.preset or 'custom'} ({estimate}). Lower {', '.join(advice)}; "
            "raise gradient_accumulation_steps to keep the effective batch size."
        )


class PreferenceTrainer(LoRATrainer):
    """A LoRATrainer for the preference methods only (kept from 0.2, when LoRATrainer trained
    supervised fine-tuning alone; LoRATrainer now trains every method)."""

    def __init__(self, config: TrainingConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        if "preference" not in self.method.formats:
            raise ConfigError(
                f"PreferenceTrainer trains preference methods, not {config.method!r}: use "
                "LoRATrainer, which trains every method."
            )


# --- small helpers ---------------------------------------------------------------------------


def _compatible_arguments(arguments_class: type, **values: Any) -> dict[str, Any]:
    """Map our argument names to those of the installed transformers (names moved in 5.x)."""
    fields = {f.name for f in dataclasses.fields(arguments_class)}
    if "warmup_ratio" not in fields:  # 5.x: warmup_steps < 1 is a ratio
        values["warmup_steps"] = values.pop("warmup_ratio")
    if "group_by_length" not in fields:
        grouped = values.pop("group_by_length")
        values.setdefault("train_sampling_strategy", "group_by_length" if grouped else "random")
    if "activation_checkpointing" in fields:
        values["activation_checkpointing"] = values.pop("gradient_checkpointing")
        values["activation_checkpointing_kwargs"] = values.pop("gradient_checkpointing_kwargs")
    return {key: value for key, value in values.items() if key in fields}


def _keep_4bit_layout(model: Any) -> None:
    """bitsandbytes repacks 4-bit weights for fast CPU inference the first time a layer runs
    in eval mode without gradients (an evaluation step); training on the repacked weights then
    fails. Keep the training layout."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _device_map(device: str) -> Any:
    if device == "cuda":
        import torch

        return {"": int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))}
    return {"": device}


def _distributed_arguments(runtime: Runtime) -> dict[str, Any]:
    """TrainingArguments for a multi-process run: gloo off CUDA; every LoRA weight gets a
    gradient each step, so DDP need not search for unused parameters."""
    if world_size() <= 1:
        return {}
    values: dict[str, Any] = {"ddp_find_unused_parameters": False}
    if runtime.device != "cuda":
        values["ddp_backend"] = "gloo"
    return values


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    try:
        import torch
    except ImportError:
        return False
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _resume_point(checkpoint: Path | None) -> dict[str, int] | None:
    """Step and tokens already trained at ``checkpoint`` (None for a fresh run)."""
    if checkpoint is None:
        return None
    state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    return {
        "step": int(state.get("global_step") or 0),
        "tokens": int(state.get("num_input_tokens_seen") or 0),
    }
