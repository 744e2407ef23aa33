"""Data for pruning: calibration windows from text sources, Alpaca instruction records, evaluation
rows and windows, hub datasets, and text the dense model writes itself (:mod:`pruner.data.generated`).

Framework-agnostic (no Lightning): ``pruner.lightning_modules.data`` is a thin layer over these.
"""

from ..io.models import load_tokenizer  # the tokenizer of a model name, folder or GGUF
from .alpaca import ALPACA_PROMPT_INPUT, ALPACA_PROMPT_NO_INPUT, alpaca_records, format_alpaca, tokenize_instruction
from .evaluation import eval_text_rows, eval_windows, load_ptb_rows, load_wikitext2_rows, tokenize_rows
from .hub import HUB_ALIASES, load_hub_dataset
from .windows import PROTOCOLS, added_bos, resolve_protocol, with_bos
from .text import (BUILTIN, HELDOUT, IGNORE_INDEX, builtin_heldout_rows, builtin_text, calibration_samples,
                   read_texts)

__all__ = [
    "ALPACA_PROMPT_INPUT", "ALPACA_PROMPT_NO_INPUT", "BUILTIN", "HELDOUT", "HUB_ALIASES", "IGNORE_INDEX",
    "alpaca_records", "builtin_heldout_rows", "builtin_text", "calibration_samples", "eval_text_rows", "eval_windows",
    "format_alpaca", "load_hub_dataset", "load_ptb_rows", "load_tokenizer", "load_wikitext2_rows", "read_texts",
    "tokenize_instruction", "tokenize_rows", "PROTOCOLS", "added_bos", "resolve_protocol", "with_bos",
]
