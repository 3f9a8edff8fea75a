"""The ``finetune`` Click group: parse arguments, call a service, print the result.

Runs as ``sage finetune ...`` (through host.py) and standalone as ``sage-finetune ...``.
Services raise FinetuneError; the group turns that into one line on stderr and exit code 1
(2 for usage problems). Heavy libraries are imported inside the commands that need them.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from ._version import __version__
from .config import PresetConfigs
from .errors import FinetuneError, UsageProblem
from .paths import HOME_ENV, task_root


class FinetuneCommand(click.Command):
    """A command that reports FinetuneError as one line instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        # bitsandbytes warns at import time that an optional CPU kernel package is missing.
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        try:
            return super().invoke(ctx)
        except UsageProblem as exc:
            raise click.UsageError(str(exc), ctx=ctx) from None
        except FinetuneError as exc:
            error = click.ClickException(str(exc))
            error.exit_code = exc.exit_code
            raise error from None


class FinetuneGroup(click.Group):
    command_class = FinetuneCommand


root_option = click.option(
    "--root",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help=f"Directory that holds tasks [default: ${HOME_ENV} or ./finetune_output].",
)


@click.group(
    cls=FinetuneGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, "--version", prog_name="sage-finetune-plugin")
def finetune() -> None:
    """Fine-tune small language models with LoRA / QLoRA.

    \b
    Workflow:
      quickstart code            build a dataset and a task in ./finetune_output/code
      run finetune_output/code   train a LoRA adapter
      list                       show every task with its status and metrics
      merge code                 merge the adapter into a full-precision model
      chat code                  talk to the fine-tuned model
    """


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


@finetune.command("list")
@root_option
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def list_command(root: Path | None, as_json: bool) -> None:
    """List every task under the root with its status and metrics."""
    from .meta import scan_tasks

    base = task_root(root)
    rows = [entry.summary() for entry in scan_tasks(base)]
    if as_json:
        click.echo(json.dumps({"root": str(base), "tasks": rows}, indent=2))
        return
    if not rows:
        click.echo(
            f"No tasks under {base}. Create one with `sage finetune quickstart code` "
            f"(or point --root / ${HOME_ENV} elsewhere)."
        )
        return
    columns = [
        ("NAME", "name"),
        ("STATUS", "status"),
        ("MODEL", "model"),
        ("FORMAT", "format"),
        ("SAMPLES", "samples"),
        ("STEPS", "steps"),
        ("LOSS", "train_loss"),
        ("ADAPTER", "adapter"),
        ("MERGED", "merged"),
        ("UPDATED", "updated"),
    ]
    table = [[title for title, _ in columns]]
    for row in rows:
        if row["status"] == "broken":
            table.append([row["name"], "broken", *["-"] * (len(columns) - 2)])
        else:
            table.append([_fmt(row[key]) for _, key in columns])
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    for line in table:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
    for row in rows:
        if row["status"] == "broken":
            click.echo(f"broken: {row['error']}", err=True)


# --- merge and chat ------------------------------------------------------------------------

EXIT_WORDS = ("exit", "quit", "/exit", "/quit")


def _status(message: str) -> None:
    """Progress and status lines go to stderr, so stdout holds only results."""
    click.echo(message, err=True)


def _human_size(num_bytes: int) -> str:
    size = float(num_bytes)
    for unit in ("B", "KB", "MB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


@finetune.command("merge")
@click.argument("task")
@click.option(
    "--output",
    "-o",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder for the merged model [default: <task>/merged].",
)
@click.option(
    "--checkpoint",
    default="final",
    show_default=True,
    help="Adapter to merge: final, latest, or a checkpoint step number.",
)
@click.option(
    "--dtype",
    type=click.Choice(["bf16", "fp16", "fp32"]),
    default=None,
    help="Precision of the saved weights [default: the base model's].",
)
@click.option("--force", is_flag=True, help="Replace an existing merged model.")
@root_option
def merge_command(
    task: str,
    output: Path | None,
    checkpoint: str,
    dtype: str | None,
    force: bool,
    root: Path | None,
) -> None:
    """Merge the LoRA adapter into a full-precision copy of the base model."""
    from .deps import require

    require("torch", "transformers", "peft")
    from .merge import merge_task

    result = merge_task(
        task,
        root=root,
        output=output,
        checkpoint=checkpoint,
        dtype=dtype,
        force=force,
        progress=_status,
    )
    click.echo(
        f"Merged the {result.checkpoint} adapter into {result.base_model}: {result.output} "
        f"({result.dtype}, {_human_size(result.size_bytes)}; max logit difference to "
        f"base + adapter {result.max_logit_diff:.2g}, tolerance {result.tolerance:.2g})"
    )


@finetune.command("chat")
@click.argument("task")
@click.option("--prompt", "-p", default=None, help="Answer this message and exit.")
@click.option("--system", default=None, help="System prompt for the conversation.")
@click.option("--base", is_flag=True, help="Talk to the base model, without the fine-tune.")
@click.option(
    "--compare", is_flag=True, help="Answer with the base model, then the fine-tuned one."
)
@click.option(
    "--max-new-tokens",
    type=click.IntRange(min=1),
    default=256,
    show_default=True,
    help="Longest answer in tokens.",
)
@click.option(
    "--temperature",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="0 answers greedily (reproducible); above 0 samples.",
)
@root_option
def chat_command(
    task: str,
    prompt: str | None,
    system: str | None,
    base: bool,
    compare: bool,
    max_new_tokens: int,
    temperature: float,
    root: Path | None,
) -> None:
    """Talk to the fine-tuned model (the merged one, else base + adapter).

    Type /reset to clear the history; exit, quit or Ctrl-D ends. Reads one message per line
    when the input is a pipe.
    """
    if base and compare:
        raise UsageProblem("--base and --compare cannot be combined.")
    from .deps import require

    require("torch", "transformers", "peft")
    from .chat import ChatSession, load_chat_model

    # The fine-tuned model loads first: an untrained task fails before the base model loads.
    wanted = [False, True] if compare else [base]
    models = {
        flag: load_chat_model(task, root=root, base=flag, progress=_status) for flag in wanted
    }
    sessions = [
        (
            "base" if flag else "fine-tuned",
            ChatSession(
                models[flag],
                system=system,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
            ),
        )
        for flag in sorted(models, reverse=True)
    ]
    if prompt is not None:
        _answer(sessions, prompt, labelled=compare)
        return
    interactive = sys.stdin.isatty()
    if interactive:
        names = " and ".join(session.description for _, session in sessions)
        _status(f"Chatting with {names}. /reset clears the history; exit or Ctrl-D ends.")
    for line in _user_lines(interactive):
        if line.lower() in EXIT_WORDS:
            break
        if line == "/reset":
            for _, session in sessions:
                session.reset()
            _status("History cleared.")
        elif line:
            try:
                _answer(sessions, line, labelled=compare)
            except FinetuneError as exc:
                _status(f"Error: {exc}")


def _answer(sessions: list[tuple[str, Any]], text: str, *, labelled: bool) -> None:
    """Stream each session's answer to stdout, under its label when comparing."""
    for index, (label, session) in enumerate(sessions):
        if labelled:
            if index:
                click.echo()
            click.echo(f"[{label}]")
        session.generate(text, lambda piece: click.echo(piece, nl=False))
        click.echo()


def _user_lines(interactive: bool) -> Iterator[str]:
    """User messages: prompted on a terminal, one per line from a pipe; ends at EOF."""
    while True:
        if interactive:
            try:
                line = input(">>> ")
            except EOFError:
                click.echo(err=True)
                return
        else:
            line = sys.stdin.readline()
            if not line:
                return
        yield line.strip()


# --- quickstart ------------------------------------------------------------------------------


@finetune.command("quickstart")
@click.argument("task_type", metavar="TASK_TYPE")
@click.option(
    "--data",
    metavar="FILE",
    type=click.Path(path_type=Path),
    help="Your training data (.json, .jsonl, .csv, .parquet or a datasets directory).",
)
@click.option(
    "--source",
    type=click.Path(file_okay=False, path_type=Path),
    help="Code base for the code task [default: the current directory].",
)
@click.option("--name", help="Task name [default: TASK_TYPE].")
@click.option(
    "--format",
    "data_format",
    help="Force the data format: alpaca, qa, conversation, prompt_completion or text.",
)
@click.option("--skip-invalid", is_flag=True, help="Drop malformed records instead of failing.")
@click.option("--model", help="Base model: hub id or local directory [default: the preset's].")
@click.option(
    "--preset",
    default="auto",
    show_default=True,
    help="Hardware preset: minimal, rtx_3060, rtx_4090, a100, cpu, or auto (detected).",
)
@click.option("--force", is_flag=True, help="Replace an existing task of the same name.")
@click.option("--run", "run_after", is_flag=True, help="Start training once the task is ready.")
@click.option(
    "--preview",
    type=click.IntRange(min=0),
    default=0,
    metavar="N",
    help="Print N samples as the model sees them, prompt parts marked.",
)
@root_option
def quickstart_command(
    task_type: str,
    data: Path | None,
    source: Path | None,
    name: str | None,
    data_format: str | None,
    skip_invalid: bool,
    model: str | None,
    preset: str,
    force: bool,
    run_after: bool,
    preview: int,
    root: Path | None,
) -> None:
    """Create a task (data + config + meta) ready for `run`.

    \b
    TASK_TYPE is one of:
      code         questions and answers derived from a Python code base (--source)
      qa           question/answer records from --data
      instruction  alpaca instruction/input/output records from --data
      chat         conversations (messages or ShareGPT) from --data
      custom       any supported format from --data, detected
    """
    from .deps import require

    require()
    from .tasks import quickstart

    if task_type == "code":
        scanned = (source or Path.cwd()).expanduser().resolve()
        _status(f"Scanning Python files under {scanned}")
    result = quickstart(
        task_type,
        data=data,
        source=source,
        name=name,
        data_format=data_format,
        skip_invalid=skip_invalid,
        model=model,
        preset=preset,
        force=force,
        root=root,
        preview=preview,
        on_status=_status,
    )
    _print_quickstart(result)
    if run_after:
        _status(f"Training {result.task_dir} ...")
        click.get_current_context().invoke(run_command, task=str(result.task_dir), root=root)
    else:
        click.echo(f"Next: sage finetune run {result.task_dir}")


def _print_quickstart(result: Any) -> None:
    action = "replaced" if result.replaced else "created"
    click.echo(f"Task {result.task_dir.name!r} {action} at {result.task_dir}")
    click.echo(
        f"  model {result.config.model_name}, preset {result.config.preset}, "
        f"format {result.config.data_format}"
    )
    if result.code is not None:
        skipped = ", ".join(f"{n} {why}" for why, n in sorted(result.code.skipped.items()))
        click.echo(
            f"  code: {len(result.code.records)} records from {result.code.files_used} files"
            + (f" (skipped {skipped})" if skipped else "")
        )
    if result.stats is not None:
        for line in result.stats.summary().splitlines():
            click.echo(f"  {line}")
    else:
        dropped = sum(result.dropped.values())
        click.echo(
            f"  records: {result.records_read} read, {result.records_kept} kept, {dropped} dropped"
        )
        for reason, count in result.dropped.items():
            click.echo(f"  dropped {count}: {reason}")
    for warning in result.warnings:
        _status(f"Warning: {warning}")
    if result.preview:
        click.echo("\nPreview ([[...]] is prompt: no loss; the rest is what the model learns):")
    for number, sample in enumerate(result.preview, 1):
        click.echo(f"--- sample {number} ---")
        text = "".join(
            piece if trainable else click.style(f"[[{piece}]]", dim=True)
            for piece, trainable in sample
        )
        click.echo(text)


# --- run -----------------------------------------------------------------------------------


@finetune.command("run")
@click.argument("task")
@click.option(
    "--preset",
    type=click.Choice(PresetConfigs.names()),
    default=None,
    help="Use this preset's hyperparameters (the task's model and data are kept); "
    "auto picks the largest that fits this machine.",
)
@click.option("--model", default=None, help="Base model (hub id or local directory).")
@click.option(
    "--epochs",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Passes over the data (clears the step limit unless --max-steps is given).",
)
@click.option("--max-steps", type=click.IntRange(min=1), default=None, help="Stop after N steps.")
@click.option(
    "--lr", type=click.FloatRange(min=0, min_open=True), default=None, help="Peak learning rate."
)
@click.option(
    "--max-length", type=click.IntRange(min=2), default=None, help="Longest sample in tokens."
)
@click.option(
    "--batch-size", type=click.IntRange(min=1), default=None, help="Samples per device step."
)
@click.option(
    "--grad-accum", type=click.IntRange(min=1), default=None, help="Micro-batches per step."
)
@click.option(
    "--lora-r",
    type=click.IntRange(min=1),
    default=None,
    help="LoRA rank (alpha is scaled to keep alpha / r).",
)
@click.option("--4bit", "four_bit", is_flag=True, help="Load the base model in 4-bit (QLoRA).")
@click.option("--8bit", "eight_bit", is_flag=True, help="Load the base model in 8-bit.")
@click.option("--no-quant", is_flag=True, help="Load the base model unquantized.")
@click.option("--resume", is_flag=True, help="Continue from the newest complete checkpoint.")
@click.option(
    "--dry-run",
    is_flag=True,
    help="Show the config, data statistics and memory estimate; train and write nothing.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Train even when predicted not to fit in memory, or start an interrupted task over.",
)
@click.option(
    "--nproc",
    type=click.IntRange(min=1),
    default=None,
    help="Training processes on this node (one per GPU; CPU: gloo), started with torchrun.",
)
@click.option("--nnodes", type=click.IntRange(min=1), default=1, help="Machines in the run.")
@click.option("--node-rank", type=click.IntRange(min=0), default=0, help="This machine's index.")
@click.option("--master-addr", default=None, help="Address of node 0 (needed with --nnodes > 1).")
@click.option(
    "--master-port",
    type=click.IntRange(min=1, max=65535),
    default=None,
    help="Port on node 0 [default: a free one on a single node, 29500 across nodes].",
)
@click.option(
    "--accelerate-config",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Start the processes with `accelerate launch` and this config file "
    "(DeepSpeed ZeRO, FSDP), passed through unchanged.",
)
@root_option
def run_command(
    task: str,
    preset: str | None,
    model: str | None,
    epochs: float | None,
    max_steps: int | None,
    lr: float | None,
    max_length: int | None,
    batch_size: int | None,
    grad_accum: int | None,
    lora_r: int | None,
    four_bit: bool,
    eight_bit: bool,
    no_quant: bool,
    resume: bool,
    dry_run: bool,
    force: bool,
    nproc: int | None,
    nnodes: int,
    node_rank: int,
    master_addr: str | None,
    master_port: int | None,
    accelerate_config: Path | None,
    root: Path | None,
) -> None:
    """Train a LoRA adapter for TASK (a task name or directory) from its meta file.

    With --nproc N (and --nnodes, --accelerate-config) the run is data-parallel over N
    processes per node; rank 0 writes the meta, checkpoints and the adapter, and each rank
    logs to TASK/logs/rank-<r>.log.
    """
    if four_bit + eight_bit + no_quant > 1:
        raise UsageProblem("Choose one of --4bit, --8bit and --no-quant.")
    from .launch import LaunchOptions

    launch_options = LaunchOptions(
        nproc, nnodes, node_rank, master_addr, master_port, accelerate_config
    )
    launch_options.validate()
    from .deps import require

    require()
    from .paths import resolve_task
    from .trainer import enable_console_logging, task_config

    enable_console_logging()  # before bitsandbytes is first imported: it warns at import
    task_dir = resolve_task(task, root)
    config = task_config(task_dir, preset=preset, resume=resume)
    changes: dict[str, Any] = {
        key: value
        for key, value in {
            "model_name": model,
            "num_train_epochs": epochs,
            "max_steps": max_steps,
            "learning_rate": lr,
            "max_length": max_length,
            "per_device_train_batch_size": batch_size,
            "gradient_accumulation_steps": grad_accum,
        }.items()
        if value is not None
    }
    if epochs is not None and max_steps is None:
        changes["max_steps"] = None  # the number of epochs decides the length
    if four_bit or eight_bit or no_quant:
        changes.update(load_in_4bit=four_bit, load_in_8bit=eight_bit)
    if lora_r is not None:
        alpha = max(1, round(config.lora.lora_alpha * lora_r / config.lora.r))
        changes["lora"] = {"r": lora_r, "lora_alpha": alpha}
    from .errors import ConfigError

    try:
        config = config.replace(**changes)
    except ConfigError as exc:
        raise UsageProblem(str(exc)) from None
    if dry_run:
        _dry_run(task_dir, config)
        if launch_options.distributed:
            _print_launch(task_dir, launch_options, resume=resume)
        return
    _check_can_train(
        task_dir, config, resume=resume, force=force, lock=launch_options.node_rank == 0
    )
    from .trainer import LoRATrainer, summary_lines

    if launch_options.distributed:
        from .launch import launch

        result = launch(task_dir, config, launch_options, resume=resume)
        if result is None:
            click.echo(f"Node {node_rank} finished; node 0 wrote the meta and the adapter.")
            return
    else:
        result = LoRATrainer(config, task_dir=task_dir).train(resume_from_checkpoint=resume)
    for line in summary_lines(result, task):
        click.echo(line)


def _dry_run(task_dir: Path, config: Any) -> None:
    """Print what a run would do; writes nothing (the tokenized data is not cached)."""
    from .data import prepare_dataset
    from .memory import estimate_memory
    from .models import load_tokenizer
    from .training_utils import resolve_runtime

    runtime = resolve_runtime(config)
    click.echo(f"Task: {task_dir}")
    click.echo("Config:")
    for key, value in _flatten(config.to_dict()):
        click.echo(f"  {key}: {value:g}" if isinstance(value, float) else f"  {key}: {value}")
    optim = runtime.optim + (
        f" (configured {config.optim})" if runtime.optim != config.optim else ""
    )
    click.echo(f"Device: {runtime.device}, precision {runtime.dtype_name}, optimizer {optim}")
    for note in runtime.notes:
        click.echo(f"  note: {note}")
    if not config.data_path:
        raise FinetuneError(f"Task {task_dir} names no training data (data_path).")
    tokenizer = load_tokenizer(config.model_name, trust_remote_code=config.trust_remote_code)
    data = prepare_dataset(config.data_path, tokenizer, config, cache_dir=None)
    click.echo("Data:")
    for line in data.stats.summary().splitlines():
        click.echo(f"  {line}")
    estimate = estimate_memory(config)
    click.echo(f"Memory: {_memory_verdict(estimate)[1]}")
    for line in estimate.summary():
        click.echo(f"  {line}")
    click.echo("Dry run: nothing trained, nothing written.")


def _print_launch(task_dir: Path, options: Any, *, resume: bool) -> None:
    """The command a distributed run would start on this node."""
    import shlex

    from .launch import launch_command, launch_config_path

    command = launch_command(task_dir, options, launch_config_path(task_dir), resume=resume)
    click.echo(f"Launch: {shlex.join(command)}")


def _flatten(values: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for key, value in values.items():
        if isinstance(value, dict):
            rows += _flatten(value, f"{prefix}{key}.")
        else:
            rows.append((f"{prefix}{key}", value))
    return rows


def _memory_verdict(estimate: Any) -> tuple[bool, str]:
    """Whether the estimate fits this machine, and the numbers."""
    from .memory import DEFAULT_MARGIN, GIB, available_memory, fits

    available = available_memory(estimate.device)
    ok = fits(estimate, available)
    return ok, (
        f"{'fits' if ok else 'does not fit'}: {estimate.total / GIB:.2f} GiB estimated peak "
        f"(+{DEFAULT_MARGIN:.0%} margin), {available / GIB:.2f} GiB available on {estimate.device}"
    )


def _check_can_train(
    task_dir: Path, config: Any, *, resume: bool, force: bool, lock: bool = True
) -> None:
    """Refuse a run that another process holds (``lock``: not checked on the other nodes of a
    multi-node run, where node 0 holds it), that would not fit, or that would silently start
    an interrupted task over."""
    from .locks import RunLock
    from .meta import load_meta
    from .trainer import CHECKPOINTS_DIR
    from .training_utils import latest_checkpoint

    if lock:
        RunLock(task_dir).check()
    if force:
        return
    from .memory import estimate_memory

    ok, verdict = _memory_verdict(estimate_memory(config))
    if not ok:
        raise FinetuneError(
            f"Predicted not to fit: {verdict}. Lower --batch-size or --max-length, use --4bit, "
            "pick a smaller --preset (or auto), or pass --force to try anyway."
        )
    checkpoint = latest_checkpoint(task_dir / CHECKPOINTS_DIR)
    status = load_meta(task_dir).status
    if not resume and checkpoint is not None and status in ("training", "interrupted", "failed"):
        raise FinetuneError(
            f"Training of {task_dir} stopped at {checkpoint.name} ({status}): continue with "
            "--resume, or start over with --force."
        )


# Commands of the data, training and merge/chat layers are added above this line.


def main() -> None:
    """Console script ``sage-finetune``."""
    finetune(prog_name="sage-finetune")


if __name__ == "__main__":
    main()
