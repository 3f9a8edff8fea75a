"""``sage finetune export``: the task's model as a GGUF file for llama.cpp, Ollama, LM Studio."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..export.quants import (
    GGUF_QUANTS,
    INSTALL_HINT,
    K_QUANTS,
    QUANTS,
    available_quants,
    llama_quantizer,
)
from ._common import ProgressBar, cli_words, command, human_size, root_option, task_argument


def _complete_quants(ctx: Any, param: Any, incomplete: str) -> list[str]:
    """The types this installation can write now (the K-quants only with llama.cpp)."""
    return [name for name in available_quants() if name.startswith(incomplete)]


def _quant_help() -> str:
    """What --quant can write in this installation (found without importing anything)."""
    tool = llama_quantizer()
    k_quants = ", ".join(K_QUANTS)
    where = (
        f"through llama.cpp's quantizer ({tool})"
        if tool
        else f"need llama.cpp's quantizer, not found here: {INSTALL_HINT}"
    )
    return (
        f"Weight type: {', '.join(GGUF_QUANTS)} (always); the K-quants {k_quants} {where}. "
        "q8_0 is about half the size of f16, q4_0 and q4_k_m about a third."
    )


@command("export")
@task_argument
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["gguf"]),
    default="gguf",
    show_default=True,
    help="File format (GGUF: llama.cpp, Ollama, LM Studio).",
)
@click.option(
    "--quant",
    type=click.Choice(QUANTS),
    default="f16",
    show_default=True,
    shell_complete=_complete_quants,
    help=_quant_help(),
)
@click.option(
    "--adapter",
    is_flag=True,
    help="Export the LoRA adapter alone as a GGUF adapter file (llama.cpp --lora, Ollama "
    "ADAPTER), with the base model's GGUF beside it (written when missing).",
)
@click.option(
    "--no-check",
    is_flag=True,
    help="Skip comparing the file's logits with the merged model (the file is still read back).",
)
@click.option(
    "--output",
    "-o",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder for the GGUF file and its Modelfile [default: <task>/export].",
)
@click.option("--force", is_flag=True, help="Replace an existing export of the same quantization.")
@root_option
def export_command(
    task: str,
    fmt: str,
    quant: str,
    adapter: bool,
    no_check: bool,
    output: Path | None,
    force: bool,
    root: Path | None,
) -> None:
    """Export the fine-tuned model to GGUF, with an Ollama Modelfile beside it.

    Exports the merged model (the adapter is merged first if needed) with its tokenizer, chat
    template and stop tokens, then reads the file back and compares it with the merged model.
    Families: Llama (SmolLM2, Llama 3.x), Mistral, Qwen2 / Qwen2.5, Qwen3, Gemma 2, Gemma 3
    (text), Phi-3, SmolLM3.
    """
    from ..deps import require

    require("torch", "transformers", "peft", "gguf")
    from ..export import export_task

    bar = ProgressBar()
    try:
        result = export_task(
            task,
            root=root,
            format=fmt,
            quant=quant,
            output=output,
            force=force,
            adapter=adapter,
            check=not no_check,
            status=bar.status,
            progress=bar,
        )
    finally:
        bar.close()
    what = "LoRA adapter" if result.base else "model"
    click.echo(
        f"Exported {result.architecture} {what} ({result.quant}, {result.tensors} tensors, "
        f"{human_size(result.size_bytes)}): {result.path}"
    )
    if result.base:
        click.echo(f"Base model GGUF: {result.base}")
    click.echo(cli_words(result.check.line()))
    click.echo(f"Ollama Modelfile: {result.modelfile}")
    click.echo("Run it with:")
    for line in result.commands:
        click.echo(f"  {line}")
