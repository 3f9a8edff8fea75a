"""``sage finetune export``: the task's model as a GGUF file for llama.cpp, Ollama, LM Studio."""

from __future__ import annotations

from pathlib import Path

import click

from ._common import ProgressBar, command, human_size, root_option, task_argument


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
    type=click.Choice(["f16", "q8_0"]),
    default="f16",
    show_default=True,
    help="Weight type: f16 (half precision) or q8_0 (8-bit, about half the size of f16).",
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
    task: str, fmt: str, quant: str, output: Path | None, force: bool, root: Path | None
) -> None:
    """Export the fine-tuned model to GGUF, with an Ollama Modelfile beside it.

    Exports the merged model (the adapter is merged first if needed) with its tokenizer, chat
    template and stop tokens. Architectures: Llama (SmolLM2) and Qwen2 / Qwen2.5.
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
            status=bar.status,
            progress=bar,
        )
    finally:
        bar.close()
    click.echo(
        f"Exported {result.architecture} model ({result.quant}, {result.tensors} tensors, "
        f"{human_size(result.size_bytes)}): {result.path}"
    )
    click.echo(f"Ollama Modelfile: {result.modelfile}")
    click.echo("Run it with:")
    for line in result.commands:
        click.echo(f"  {line}")
