"""The command layer: the ``finetune`` Click group. Commands parse arguments, call one
service and render its result; they never hold policy.

Runs as ``sage finetune ...`` (through host.py) and standalone as ``sage-finetune ...``, with
Click's shell completion (task names completed from the root). Services raise FinetuneError;
each command turns that into one line on stderr and exit code 1 (2 for usage problems).
Heavy libraries are imported inside the commands that need them.
"""

from __future__ import annotations

import click

from .._version import __version__
from .chat import chat_command
from .doctor import doctor_command
from .eval import eval_command
from .export import export_command
from .merge import merge_command
from .methods import methods_command
from .quickstart import quickstart_command
from .run import run_command
from .serve import serve_command
from .tasks import cancel_command, delete_command, list_command
from .ui import ui_command


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="sage-finetune-plugin")
def finetune() -> None:
    """Fine-tune small language models with LoRA / QLoRA.

    \b
    Workflow:
      quickstart code            build a dataset and a task in ./finetune_output/code
      run finetune_output/code   train a LoRA adapter
      list                       show every task with its status, metrics and progress
      merge code                 merge the adapter into a full-precision model
      chat code                  talk to the fine-tuned model
      eval code                  compare the fine-tuned model with its base
      export code / serve code   a GGUF for llama.cpp and Ollama / an OpenAI-compatible API
      ui                         the tasks in a web page (and a REST API) on 127.0.0.1:7860
      cancel / delete code       stop a run from another terminal / remove a task
      methods                    the training methods (sft, dpo, orpo, kto, grpo, plugins)
      doctor                     the training stack, the device and the precision here
    """


for _command in (
    quickstart_command,
    run_command,
    list_command,
    cancel_command,
    delete_command,
    merge_command,
    chat_command,
    eval_command,
    export_command,
    serve_command,
    ui_command,
    methods_command,
    doctor_command,
):
    finetune.add_command(_command)


def main() -> None:
    """Console script ``sage-finetune``."""
    finetune(prog_name="sage-finetune")


__all__ = ["finetune", "main"]
