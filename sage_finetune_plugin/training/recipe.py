"""LoRA / QLoRA training of a causal language model, as a recipe that reads top to bottom.

``LoRATrainer(config).train()`` runs: resolve the model -> load it (4-bit, 8-bit or not
quantized) -> attach LoRA -> prepare the data -> train with ``transformers.Trainer`` -> save the
adapter -> update the task's meta. Each step is a method a subclass may override::

    class MyTrainer(LoRATrainer):
        def prepare_data(self):
            ...  # return a PreparedDataset (.train, .eval, .collator)

This is the engine: it trains the config it is given and does what ``resume_from_checkpoint``
says. The policy around a run (which config, whether an interrupted task may start over,
whether it fits in memory) is the run service's (runs.py). Nothing here prints: progress goes
to the ``progress`` sink (or to ``logging``), problems are raised as FinetuneError subclasses.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
    first_line,
)
from ..locks import RunLock
from ..meta import TaskMeta, load_meta, meta_path, now_iso, save_meta
from ..models import quiet_deprecations
from ..paths import (
    ADAPTER_DIR,
    CANCEL_FILE,
    CHECKPOINTS_DIR,
    LOGS_DIR,
    LOSS_PLOT,
    PREPARED_CACHE,
    atomic_directory,
    remove_tree,
)
from ..task import Task
from .callbacks import ProgressCallback, ProgressSink, RankLogCallback, RunProgress, StopOnSignal
from .distributed import fsdp_enabled, is_main_process, launched, world_size
from .metrics import TrainResult, loss_histories, peak_memory_bytes, plot_loss
from .runtime import Hardware, Runtime, quantization_config, resolve_runtime

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer

    from ..data import PreparedDataset

logger = logging.getLogger(__name__)


class LoRATrainer:
    """Train a LoRA adapter for ``config``; outputs go to ``task_dir`` (a folder or a Task;
    default: ``config.output_dir``).

    ``callbacks`` are extra ``transformers.TrainerCallback`` objects; ``progress`` receives a
    ``RunProgress`` at every step and logging step (without one, logging steps go to
    ``logging``); ``hardware`` states the machine for the runtime policy (detected when not
    given). After ``train()`` the steps' results stay available as ``tokenizer``, ``model``,
    ``data`` and ``trainer``. ``notes`` are recorded with the run (the run service's).
    """

    #: The training objectives (``config.method``) this trainer runs.
    METHODS: tuple[str, ...] = ("sft",)

    def __init__(
        self,
        config: TrainingConfig,
        *,
        task_dir: Task | str | os.PathLike[str] | None = None,
        callbacks: Sequence[Any] | None = None,
        progress: ProgressSink | None = None,
        hardware: Hardware | None = None,
        notes: Sequence[str] = (),
    ) -> None:
        config.validate()
        if config.method not in self.METHODS:
            raise ConfigError(
                f"{type(self).__name__} trains {' or '.join(self.METHODS)}, not method "
                f"{config.method!r}: use train_from_meta or start_run, which pick the trainer "
                "for the method (PreferenceTrainer for dpo, orpo and kto)."
            )
        self.config = config
        self.task = task_dir if isinstance(task_dir, Task) else None
        self.task_dir = self.task.path if self.task else Path(task_dir or config.output_dir)
        self.callbacks = list(callbacks or [])
        self.progress = progress
        self.hardware = hardware
        self.runtime: Runtime | None = None
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

    @property
    def checkpoints_dir(self) -> Path:
        return self.task_dir / CHECKPOINTS_DIR

    @property
    def quantized(self) -> bool:
        return self.config.quantization is not None

    # --- the recipe ---------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: bool | str | os.PathLike[str] = False) -> TrainResult:
        """Run the whole recipe; ``resume_from_checkpoint=True`` continues from the newest
        complete checkpoint of the task (from scratch when there is none)."""
        started = time.monotonic()
        self.task_dir.mkdir(parents=True, exist_ok=True)
        with self._run_lock() as lock:
            if lock is not None and lock.took_over is not None:
                self._note(f"took over the stale lock of dead process {lock.took_over.get('pid')}")
            self._update_meta(
                status="training",
                training=self.config.to_dict(),
                progress={},
                stages=self._stages_at_start(bool(resume_from_checkpoint)),
            )
            try:
                return self._run(resume_from_checkpoint, started)
            except TrainingInterrupted:
                raise
            except KeyboardInterrupt:
                self._update_meta(status="interrupted", stages=self._stages_marked("interrupted"))
                raise TrainingInterrupted(self._interrupted_message(saved=None)) from None
            except BaseException as exc:
                self._update_meta(status="failed", stages=self._stages_marked("failed"))
                if _is_out_of_memory(exc):
                    raise OutOfMemoryError(self._out_of_memory_message()) from exc
                raise

    def _run(self, resume: bool | str | os.PathLike[str], started: float) -> TrainResult:
        with quiet_deprecations():
            return self._recipe(resume, started)

    def _recipe(self, resume: bool | str | os.PathLike[str], started: float) -> TrainResult:
        self._stop.requested = False
        self.runtime = resolve_runtime(self.config, self.hardware)
        for note in self.runtime.notes:
            self._note(note)
        self._setup_process()
        self.model_path = self.resolve_model()
        self.tokenizer = self.load_tokenizer()
        self.model = self.attach_lora(self.load_model())
        self.data = self.prepare_data()
        self.trainer = self.build_trainer(self.model, self.data)
        checkpoint = self._checkpoint_to_resume(resume)
        resumed = _resume_point(checkpoint)  # read now: rotation may delete the checkpoint
        with self._stop.installed():
            output = self.trainer.train(resume_from_checkpoint=checkpoint and str(checkpoint))
        if self._stop.requested:
            self._record(started, resumed, status="interrupted")
            raise TrainingInterrupted(self._interrupted_message(saved=self.trainer.state))
        self._evaluate_final()
        adapter = self.save(self.trainer)
        metrics = self._record(started, resumed, status="trained", output=output)
        return TrainResult(
            self.task_dir, adapter, metrics, self._config_used(), self.target_modules, self.notes
        )

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
        """The base model, quantized with bitsandbytes when the config asks for 4 or 8 bits."""
        from transformers import AutoModelForCausalLM

        runtime = self._runtime()
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
        # Its fp32 upcast of the norms would break FSDP's one-dtype flat parameters.
        if quantization is not None and not fsdp_enabled():
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(
                model,
                use_gradient_checkpointing=self.config.gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False},
            )
        logger.info(
            "Loaded %s (%s) on %s%s",
            self.config.model_name,
            runtime.dtype_name,
            runtime.device,
            f", {runtime.quantization} quantized" if runtime.quantization else "",
        )
        return model

    def attach_lora(self, model: PreTrainedModel) -> Any:
        """Wrap the model with LoRA adapters; ``all-linear`` becomes the architecture's linear
        projections (the output head excluded), recorded in ``target_modules``. With
        ``config.init_adapter`` (a later stage of a task) that adapter is trained further
        instead, with its own rank and targets."""
        from peft import LoraConfig, get_peft_model

        lora = self.config.lora
        if self.config.gradient_checkpointing and (not self.quantized or fsdp_enabled()):
            model.enable_input_require_grads()
        if self.config.init_adapter:
            return self._continue_adapter(model, self.config.init_adapter)
        peft_config = LoraConfig(
            r=lora.r,
            lora_alpha=lora.lora_alpha,
            lora_dropout=lora.lora_dropout,
            target_modules=lora.target_modules,
            bias=lora.bias,
            task_type=lora.task_type,
        )
        try:
            model = get_peft_model(model, peft_config)
        except ValueError as exc:
            raise ConfigError(f"Cannot attach LoRA to {self.config.model_name}: {exc}") from None
        resolved = model.peft_config["default"].target_modules
        self.target_modules = sorted({name.rsplit(".", 1)[-1] for name in resolved})
        trainable, total = model.get_nb_trainable_parameters()
        logger.info(
            "LoRA r=%d alpha=%d on %s: %s trainable parameters of %s (%.2f%%)",
            lora.r,
            lora.lora_alpha,
            ", ".join(self.target_modules),
            f"{trainable:,}",
            f"{total:,}",
            100 * trainable / max(total, 1),
        )
        return model

    def _continue_adapter(self, model: PreTrainedModel, adapter: str) -> Any:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
        except (OSError, ValueError, KeyError) as exc:
            raise ModelError(
                f"Cannot continue the adapter in {adapter}: {first_line(exc)}"
            ) from None
        lora = model.peft_config["default"]
        self.target_modules = sorted({name.rsplit(".", 1)[-1] for name in lora.target_modules})
        settings = {"r": lora.r, "lora_alpha": lora.lora_alpha, "lora_dropout": lora.lora_dropout}
        self.config = self.config.replace(
            lora={**settings, "target_modules": list(self.target_modules)}
        )
        trainable, total = model.get_nb_trainable_parameters()
        logger.info(
            "Continuing the adapter %s (LoRA r=%d on %s): %s trainable parameters of %s",
            adapter,
            lora.r,
            ", ".join(self.target_modules),
            f"{trainable:,}",
            f"{total:,}",
        )
        return model

    def prepare_data(self) -> PreparedDataset:
        """Tokenized train (and eval) data with loss masks and a padding collator."""
        from ..data import prepare_dataset

        if not self.config.data_path:
            raise DataError("No training data: set data_path in the training config.")
        data = prepare_dataset(
            self.config.data_path,
            self.tokenizer,
            self.config,
            skip_invalid=self.config.skip_invalid,
            cache_dir=self.task_dir / PREPARED_CACHE,
        )
        logger.info("Data: %s", data.stats.summary().replace("\n", "; "))
        return data

    def build_trainer(self, model: Any, data: PreparedDataset) -> Trainer:
        """A ``transformers.Trainer`` with this plugin's progress reports, TensorBoard logs in
        ``<task>/logs`` and the Ctrl-C / cancel handler. The loss is computed on answer tokens
        only, without full logits (training/loss.py): by Liger's fused kernel on CUDA when
        ``liger-kernel`` is installed, else by this package's chunked loss where the model
        allows it, else by the model itself. Packed batches attend within each sample
        (training/attention.py) where the model runs sdpa."""
        from transformers import Trainer

        from .attention import install_segment_attention
        from .loss import AnswerLossTrainer, install_answer_loss, liger_available

        if getattr(data, "packing", False):
            install_segment_attention(model)
        trainer_class, extra = Trainer, {}
        if self._runtime().device == "cuda" and liger_available():
            extra["use_liger_kernel"] = True
        elif install_answer_loss(model):
            trainer_class = AnswerLossTrainer
        trainer = trainer_class(
            model=model,
            args=self.training_arguments(data, **extra),
            train_dataset=data.train,
            eval_dataset=getattr(data, "eval", None),
            data_collator=data.collator,
            processing_class=self.tokenizer,
        )
        self.install_callbacks(trainer)
        return trainer

    def install_callbacks(self, trainer: Trainer) -> None:
        """This plugin's progress reports, Ctrl-C / cancel handler and TensorBoard logs in
        place of the Trainer's console output (any Trainer subclass)."""
        from transformers import PrinterCallback
        from transformers import ProgressCallback as HFProgressCallback

        trainer.remove_callback(HFProgressCallback)
        trainer.remove_callback(PrinterCallback)
        reports = ProgressCallback(self._report)
        for callback in (reports, self._stop, *self._tensorboard(), *self.callbacks):
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
        config, runtime = self.config, self._runtime()
        has_eval = getattr(data, "eval", None) is not None
        packing = getattr(data, "packing", False)
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
            save_strategy="steps",
            save_steps=config.save_steps,
            save_total_limit=config.save_total_limit,
            save_safetensors=True,
            eval_strategy="steps" if has_eval else "no",
            eval_steps=config.save_steps if has_eval else None,
            eval_on_start=has_eval,  # the base model's loss: what fine-tuning gained
            report_to="none",
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
        """Save the adapter (safetensors) and the tokenizer to ``<task>/adapter``."""
        target = self.task_dir / ADAPTER_DIR
        if not trainer.is_world_process_zero():
            return target
        with atomic_directory(target, replace=True) as staging:
            trainer.model.save_pretrained(staging, safe_serialization=True)
            self.tokenizer.save_pretrained(staging)
        logger.info("Adapter saved to %s", target)
        return target

    # --- helpers ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _run_lock(self) -> Iterator[RunLock | None]:
        """The task's run lock, taken by rank 0 only, and not at all under ``launch`` (the
        launcher holds it for all ranks). A cancel request is only valid while it is held."""
        if launched() or not is_main_process():
            yield None
            return
        cancel_file = self.task_dir / CANCEL_FILE
        with RunLock(self.task_dir) as lock:
            cancel_file.unlink(missing_ok=True)
            try:
                yield lock
            finally:
                cancel_file.unlink(missing_ok=True)

    def _runtime(self) -> Runtime:
        if self.runtime is None:
            self.runtime = resolve_runtime(self.config, self.hardware)
        return self.runtime

    def _report(self, progress: RunProgress) -> None:
        """Record the run's progress in the meta (for `list`) and pass it on."""
        if progress.event in ("start", "log"):
            self._update_meta(
                progress={
                    "step": progress.step,
                    "max_steps": progress.max_steps,
                    "loss": progress.loss,
                    "tokens_per_second": round(progress.tokens_per_second, 1),
                    "updated_at": now_iso(),
                }
            )
        if self.progress is not None:
            self.progress(progress)
        elif progress.event == "log":
            logger.info("%s", progress.line())

    def _note(self, text: str) -> None:
        self.notes.append(text)
        logger.warning("Note: %s", text)

    def _evaluate_final(self) -> None:
        """Evaluate the final adapter, unless the last step was evaluated already."""
        if getattr(self.data, "eval", None) is None:
            return
        state = self.trainer.state
        last = [h for h in state.log_history if "eval_loss" in h][-1:]
        if not last or last[0]["step"] != state.global_step:
            self.trainer.evaluate()

    def _setup_process(self) -> None:
        import torch
        from transformers import set_seed

        if self.config.num_threads:
            torch.set_num_threads(self.config.num_threads)
        set_seed(self.config.seed)

    def _tensorboard(self) -> list[Any]:
        if self.config.report_to != "tensorboard" or not is_main_process():
            return []
        from ..deps import require

        require("tensorboard")
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        return [TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(self.task_dir / LOGS_DIR)))]

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
                    "trainer_state.json): resume from another one, or use --resume."
                )
            return checkpoint
        old = list_checkpoints(self.checkpoints_dir)
        if old and is_main_process():
            earlier = "the stage before" if self.config.init_adapter else "an earlier run"
            start = "new stage" if self.config.init_adapter else "starting over"
            self._note(f"{start}: removed {len(old)} checkpoint(s) of {earlier}")
            remove_tree(self.checkpoints_dir)
        return None

    def _record(
        self,
        started: float,
        resumed: dict[str, int] | None,
        *,
        status: str,
        output: Any = None,
    ) -> dict[str, Any]:
        """Metrics into the meta, the config actually used, and the loss plot."""
        state = self.trainer.state
        runtime = self._runtime()
        train, evals = loss_histories(state)
        runtime_s = (output.metrics.get("train_runtime") if output else None) or (
            time.monotonic() - started
        )
        session_tokens = state.num_input_tokens_seen - (resumed["tokens"] if resumed else 0)
        metrics = {
            "global_step": state.global_step,
            "max_steps": state.max_steps,
            "epochs": round(state.epoch or 0.0, 4),
            "train_loss": train[-1]["loss"] if train else None,
            "eval_loss": evals[-1]["loss"] if evals else None,
            "loss_history": train,
            "eval_loss_history": evals,
            "tokens_seen": state.num_input_tokens_seen,
            "tokens_per_second": round(session_tokens / runtime_s, 2) if runtime_s else None,
            "train_runtime_s": round(runtime_s, 2),
            "wall_time_s": round(time.monotonic() - started, 2),
            "peak_memory_bytes": peak_memory_bytes(runtime.device),
            "device": runtime.device,
            "precision": runtime.dtype_name,
            "world_size": world_size(),
            "effective_batch_size": self.config.per_device_train_batch_size
            * self.config.gradient_accumulation_steps
            * world_size(),
            "resumed_from_step": resumed["step"] if resumed else None,
            "notes": self.notes,
        }
        metrics.update(self.objective_metrics(state))
        changes: dict[str, Any] = {"status": status, "training": self._config_used().to_dict()}
        if status == "trained":
            changes["adapter_path"] = ADAPTER_DIR
            merged = self.task.merged_dir if self.task is not None else None
            if merged:  # chat would otherwise answer with the model from before this run
                changes["merged_path"] = None
                self._note(
                    f"the merged model in {merged} predates this run: rebuild it with "
                    f"`sage finetune merge {self.task_dir} --force`"
                )
        title = f"{self.task_dir.name}: {self.config.model_name}"
        if self.config.method != "sft":
            title += f" ({self.config.method})"
        plot = None
        if is_main_process():
            plot = plot_loss(
                train,
                evals,
                self.task_dir / LOSS_PLOT,
                title,
                rewards=metrics.get("reward_history"),
                eval_rewards=metrics.get("eval_reward_history"),
            )
        changes["metrics"] = metrics
        changes["stages"] = self._stages_at_end(status, metrics)
        if self.data is not None and hasattr(self.data, "stats"):
            changes["data_stats"] = self.data.stats.to_dict()
            changes["num_samples"] = self.data.stats.samples + self.data.stats.eval_samples
        self._update_meta(**changes)
        logger.info("Loss curve: %s", plot)
        return metrics

    def objective_metrics(self, state: Any) -> dict[str, Any]:
        """Metrics of the training objective beyond the loss, for the meta (override; the
        preference methods add their rewards)."""
        return {}

    def _stages_at_start(self, resume: bool) -> list[dict[str, Any]]:
        """The meta's stages as this run begins: a resumed run goes on with its stage, a run
        that continues an adapter (``init_adapter``) adds a stage after the finished ones,
        any other run starts the list over."""
        meta = self.task.meta if self.task is not None else None
        if meta is None and meta_path(self.task_dir).exists():
            with contextlib.suppress(FinetuneError):
                meta = load_meta(self.task_dir)
        stages = [dict(stage) for stage in meta.stages] if meta is not None else []
        if resume and stages and stages[-1].get("method") == self.config.method:
            stages[-1]["status"] = "training"
            return stages
        stage = {
            "method": self.config.method,
            "data": self._relative(self.config.data_path),
            "start": "adapter" if self.config.init_adapter else "base model",
            "status": "training",
            "started_at": now_iso(),
        }
        if not self.config.init_adapter:
            return [stage]
        if not stages and meta is not None and meta.status in ("trained", "merged"):
            # An adapter trained before stages were recorded.
            stages = [
                {
                    "method": meta.training.get("method", "sft"),
                    "data": self._relative(meta.training.get("data_path")),
                    "status": "trained",
                    "steps": meta.steps,
                }
            ]
        return [*(s for s in stages if s.get("status") == "trained"), stage]

    def _relative(self, path: str | None) -> str | None:
        """A path inside the task relative to it (as the meta stores its own files)."""
        if not path:
            return path
        with contextlib.suppress(ValueError):
            return str(Path(path).resolve().relative_to(self.task_dir.resolve()))
        return path

    def _stages_at_end(self, status: str, metrics: dict[str, Any]) -> list[dict[str, Any]]:
        keys = ("train_loss", "eval_loss", "reward_margin", "reward_accuracy")
        return self._stages_marked(
            status,
            steps=metrics["global_step"],
            finished_at=now_iso(),
            **{key: metrics[key] for key in keys if metrics.get(key) is not None},
        )

    def _stages_marked(self, status: str, **fields: Any) -> list[dict[str, Any]]:
        """The meta's stages with this run's (the last) given ``status`` and ``fields``."""
        stages = [dict(stage) for stage in self.task.meta.stages] if self.task else []
        if stages:
            stages[-1].update(status=status, **fields)
        return stages

    def _config_used(self) -> TrainingConfig:
        """The config with what was resolved at run time: LoRA targets, precision, optimizer."""
        runtime = self._runtime()
        changes: dict[str, Any] = {
            "optim": runtime.optim,
            "fp16": runtime.fp16,
            "bf16": runtime.bf16,
            "output_dir": str(self.task_dir),
        }
        if self.target_modules:
            changes["lora"] = {"target_modules": list(self.target_modules)}
        return self.config.replace(**changes)

    def _update_meta(self, **changes: Any) -> None:
        """Change the task's meta (rank 0 only), creating one for a run started from a bare
        config."""
        if not is_main_process():
            return
        if self.task is None:
            if not meta_path(self.task_dir).exists():
                save_meta(
                    self.task_dir,
                    TaskMeta(
                        model=self.config.model_name,
                        dataset=self.config.data_path,
                        output_dir=".",
                        preset=self.config.preset,
                    ),
                )
            self.task = Task(self.task_dir)
        self.task.update(**changes, model=self.config.model_name, preset=self.config.preset)

    def _interrupted_message(self, saved: Any) -> str:
        checkpoint = latest_checkpoint(self.checkpoints_dir)
        where = (
            f"checkpoint saved at step {saved.global_step} of {saved.max_steps}"
            if saved is not None
            else f"last checkpoint: {checkpoint.name}"
            if checkpoint
            else "no checkpoint yet"
        )
        return (
            f"Training of {self.task_dir} interrupted ({where}): continue with "
            f"`sage finetune run {self.task_dir} --resume`."
        )

    def _out_of_memory_message(self) -> str:
        from .memory import estimate_memory

        config = self.config
        device = self.runtime.device if self.runtime else "the device"
        try:
            estimate = f"estimated peak {estimate_memory(config, hardware=self.hardware)}"
        except FinetuneError as exc:  # the estimate needs the model's config
            estimate = f"no estimate: {exc}"
        advice = [f"per_device_train_batch_size (now {config.per_device_train_batch_size})"]
        advice.append(f"max_length (now {config.max_length})")
        if not config.gradient_checkpointing:
            advice.append("enable gradient_checkpointing")
        if config.quantization != "4bit":
            advice.append("load the model in 4-bit (--4bit)")
        return (
            f"Out of memory on {device} training {config.model_name} with preset "
            f"{config.preset or 'custom'} ({estimate}). Lower {', '.join(advice)}; "
            "raise gradient_accumulation_steps to keep the effective batch size."
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
