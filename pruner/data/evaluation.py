"""Evaluation text: WikiText-2 / PTB test rows (Hugging Face layout), tokenized once without
special tokens and cut into windows, as LLM-Pruner's perplexity protocol reads them.

Example:
    >>> rows = load_wikitext2_rows("../shared/data/wikitext2_raw/wiki.test.raw")  # doctest: +SKIP
    >>> len(rows)  # doctest: +SKIP
    4358
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import PrunerError
from .hub import HUB_ALIASES, load_hub_dataset
from .text import HELDOUT, builtin_heldout_rows, local_path, read_text_file
from .windows import resolve_protocol, with_bos


def _raw_lines_to_rows(path: str | Path) -> list[str]:
    """Rows of a raw WikiText file laid out like the Hugging Face ``wikitext`` test split."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file not found: {path}")
    # The hub rows keep each line's newline and turn blank lines into "" (see
    # shared/data/README.md); getting this wrong changes the tokens and the perplexity.
    lines = read_text_file(path, "evaluation text").split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the file does not start another row
    return [line + "\n" if line.strip() else "" for line in lines]


def load_wikitext2_rows(path: str | Path | None = None) -> list[str]:
    """WikiText-2 raw test rows: from a local ``wiki.test.raw`` or, when ``path`` is None, from
    the hub (``wikitext`` / ``wikitext-2-raw-v1``, test split; needs internet once)."""
    if path is not None:
        return _raw_lines_to_rows(path)
    return list(load_hub_dataset("wikitext-2-raw-v1", "test")["text"])


def load_ptb_rows(path: str | Path | None = None, split: str = "test") -> list[str]:
    """Penn Treebank sentences: one per non-blank line of a local file (e.g. ``ptb.test.txt``,
    stripped) or, when ``path`` is None, the hub ``ptb_text_only`` ``split``'s ``sentence`` field.

    Note: the LLM-Pruner reference code evaluates PTB on the *validation* split
    (``split="validation"``); the test split is the default here.
    """
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"text file not found: {path}")
        return [line.strip() for line in read_text_file(path, "evaluation text").split("\n") if line.strip()]
    return list(load_hub_dataset("ptb", split)["sentence"])


def tokenize_rows(tokenizer, rows: list[str], max_tokens: int | None = None) -> torch.Tensor:
    """The token ids of ``"\\n\\n".join(rows)`` without special tokens, shape ``(n_tokens,)``."""
    text = "\n\n".join(rows)
    # verbose=False: the whole test set is far longer than model_max_length, on purpose.
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return torch.tensor(ids, dtype=torch.long)



def eval_text_rows(source: str) -> list[str]:
    """WikiText-2 raw test rows in the Hugging Face layout, from a local ``wiki.test.raw`` (each
    line becomes ``line + "\\n"`` if it is not blank, else ``""``) or the hub
    (``"wikitext-2-raw-v1"``); or ``"builtin-heldout"`` (:func:`builtin_heldout_rows`,
    offline). LLM-Pruner evaluates on ``"\\n\\n".join(rows)``. The reading is
    ``pruner.eval.perplexity.load_wikitext2_rows``: validation and evaluation see the same rows.

    Example:
        >>> rows = eval_text_rows("../shared/data/wikitext2_raw/wiki.test.raw")  # doctest: +SKIP
        >>> len(rows)  # doctest: +SKIP
        4358
    """
    if source == HELDOUT:
        return builtin_heldout_rows()
    if source in HUB_ALIASES and HUB_ALIASES[source].path == "wikitext":
        try:
            return load_wikitext2_rows(None)
        except Exception as err:
            raise PrunerError(
                f"could not load {source!r} from the hub ({type(err).__name__}: {err}); pass a "
                "local wiki.test.raw (e.g. ../shared/data/wikitext2_raw/wiki.test.raw) instead"
            ) from err
    path = local_path(source, "evaluation text",
                       "an existing wiki.test.raw, 'builtin-heldout' or 'wikitext-2-raw-v1' (hub)")
    if path is None or path.is_dir():
        raise PrunerError(
            f"evaluation source {source!r} is neither a text file nor 'wikitext-2-raw-v1': pass "
            "a raw text file such as wiki.test.raw, or 'wikitext-2-raw-v1' (hub)"
        )
    return load_wikitext2_rows(path)


def eval_windows(rows: Sequence[str], tokenizer, seq_len: int = 128, protocol: str = "auto") -> torch.Tensor:
    """Non-overlapping ``seq_len``-token windows of ``"\\n\\n".join(rows)`` tokenized as
    ``pruner.eval.perplexity`` does (the incomplete tail is dropped), ``LongTensor (W, seq_len)``;
    ``(W, 1 + seq_len)`` with the tokenizer's BOS first under the ``"bos"`` window protocol
    (``"auto"``: when the tokenizer adds one; :mod:`pruner.data.windows`).

    Example:
        >>> eval_windows(["a b c " * 100], tok, seq_len=16).shape[1]  # doctest: +SKIP
        16
    """
    _, bos = resolve_protocol(tokenizer, protocol)
    ids = tokenize_rows(tokenizer, list(rows))
    n = ids.numel() // seq_len
    if n == 0:
        raise PrunerError(
            f"evaluation text has {ids.numel()} tokens, fewer than one window of {seq_len}: use "
            "a longer text or a smaller window"
        )
    return with_bos(ids[: n * seq_len].view(n, seq_len), bos)  # (W, [1 +] seq_len)
