"""``python -m sage_finetune_plugin.cli``: the same as ``sage-finetune``."""

from . import main

main()
