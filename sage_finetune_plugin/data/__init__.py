"""The data layer: one pipeline from the user's files to rendered, cached training samples
for every training method.

Stages, one module each: ``readers`` (the sources a ``data`` value names, and records from
JSON, JSONL, CSV, Parquet, text files, saved and Hugging Face datasets), ``formats``
(recognise, validate, normalize a record for a method; refuse the kinds it does not train;
the records themselves in ``messages``, ``supervised`` and ``preference``), ``loading``
(validated records of one or several sources, memory-mapped), ``rendering`` (chat template,
prompt masking, tokens and labels), ``preparation`` (render through the method, statistics,
eval split), ``cache``, ``collators`` (padding, packing) and ``code`` (datasets derived from a
Python code base). datasets, transformers and torch are imported inside the functions that use
them.
"""

from __future__ import annotations

from .code import CodeDataset, build_code_dataset
from .collators import PackingCollator, PaddingCollator, make_collator
from .formats import FORMATS, canonical_record, record_kind, resolve_format
from .loading import LoadedData, WrongFormat, load_training_data
from .preparation import (
    DataStats,
    PreparedDataset,
    PrepareOptions,
    prepare_dataset,
    preview_samples,
)
from .readers import content_hash
from .rendering import (
    IGNORE_INDEX,
    Renderer,
    format_alpaca_sample,
    format_conversation_sample,
    format_qa_sample,
    format_text_sample,
)

__all__ = [
    "FORMATS",
    "IGNORE_INDEX",
    "CodeDataset",
    "DataStats",
    "LoadedData",
    "PackingCollator",
    "PaddingCollator",
    "PrepareOptions",
    "PreparedDataset",
    "Renderer",
    "WrongFormat",
    "build_code_dataset",
    "canonical_record",
    "content_hash",
    "format_alpaca_sample",
    "format_conversation_sample",
    "format_qa_sample",
    "format_text_sample",
    "load_training_data",
    "make_collator",
    "prepare_dataset",
    "preview_samples",
    "record_kind",
    "resolve_format",
]
