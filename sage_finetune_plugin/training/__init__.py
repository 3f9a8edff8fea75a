"""The training engine: runtime policy, the LoRA recipe, its callbacks, the memory estimate,
and multi-process runs (the workers' view in ``distributed``, the launcher in ``launch``).

``runtime``, ``memory``, ``distributed`` and ``launch`` import nothing heavy at module level;
``recipe`` and ``callbacks`` import transformers.
"""
