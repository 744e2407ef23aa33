"""Perplexity with the LLM-Pruner paper protocol, and the WikiText-2 / PTB test rows.

Protocol: rows joined with ``"\\n\\n"``, tokenized once without BOS or other special tokens,
truncated to the first ``max_tokens`` tokens, cut into non-overlapping windows of ``seq_len``
tokens (the incomplete last window is dropped); the perplexity is ``exp`` of the mean negative
log-likelihood over the ``seq_len - 1`` predicted tokens of every window. The window protocol
(:mod:`pruner.data.windows`) says whether each window is read after the tokenizer's BOS token
(``"bos"``; ``"auto"`` picks it when the tokenizer adds one) or alone (``"paper"``): the scored
tokens are the same either way.

Example:
    >>> from pruner.data import load_wikitext2_rows
    >>> from pruner.eval.perplexity import perplexity  # doctest: +SKIP
    >>> rows = load_wikitext2_rows("../shared/data/wikitext2_raw/wiki.test.raw")  # doctest: +SKIP
    >>> perplexity(model, tokenizer, rows, seq_len=128, max_tokens=32768)  # doctest: +SKIP
    56.35...
"""

from __future__ import annotations

import math

import torch

from ..data.evaluation import load_ptb_rows, load_wikitext2_rows, tokenize_rows  # noqa: F401  (pruner.eval's API)
from ..data.windows import resolve_protocol, with_bos
from ..errors import PrunerError


@torch.no_grad()
def window_nll(model, windows: torch.Tensor, prefix: int = 0) -> torch.Tensor:
    """Summed negative log-likelihood (float64) of tokens ``prefix + 1 ..`` of each window given
    what precedes them: the text's tokens 1.. after ``prefix`` leading tokens (a BOS) that are
    context only.

    ``windows``: ``(batch, prefix + seq_len)`` token ids; returns ``(batch,)``.
    """
    device = next(model.parameters()).device
    windows = windows.to(device)
    logits = model(input_ids=windows, use_cache=False).logits  # (batch, prefix + seq_len, vocab)
    # Position t predicts token t+1; the last position predicts nothing inside the window.
    logprobs = torch.log_softmax(logits[:, prefix:-1].float(), dim=-1)  # (batch, seq_len-1, vocab)
    token_lp = logprobs.gather(-1, windows[:, prefix + 1 :].unsqueeze(-1)).squeeze(-1)  # (batch, seq_len-1)
    return -token_lp.double().sum(dim=-1).cpu()


def perplexity(
    model,
    tokenizer,
    rows: list[str],
    seq_len: int = 128,
    max_tokens: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
    protocol: str = "auto",
) -> float:
    """Perplexity of ``model`` on ``rows`` (see the module docstring); ``protocol``: ``"auto"``,
    ``"paper"`` or ``"bos"`` (:func:`pruner.data.windows.resolve_protocol` names what ``"auto"``
    chose for a tokenizer).

    The NLL is accumulated in float64 so that the result does not depend on ``batch_size``.
    Raises ``PrunerError`` when the text has fewer than ``seq_len`` tokens.
    """
    if seq_len < 2:
        raise PrunerError(f"seq_len must be at least 2, got {seq_len}: a window predicts its next tokens (the paper uses 128)")
    _, bos = resolve_protocol(tokenizer, protocol)
    ids = tokenize_rows(tokenizer, rows, max_tokens)
    n_windows = ids.numel() // seq_len
    if n_windows == 0:
        raise PrunerError(f"the text has {ids.numel()} tokens, fewer than one window of {seq_len}: give more text or a "
                          "smaller seq_len")
    windows = with_bos(ids[: n_windows * seq_len].view(n_windows, seq_len), bos)  # (n_windows, [1 +] seq_len)
    prefix = 0 if bos is None else 1

    was_training = model.training
    model.eval()
    total = 0.0
    starts = range(0, n_windows, batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"perplexity ({n_windows} windows)", unit="batch")
    try:
        for start in starts:
            total += window_nll(model, windows[start : start + batch_size], prefix).sum().item()
    finally:
        model.train(was_training)
    return math.exp(total / (n_windows * (seq_len - 1)))


@torch.no_grad()
def loader_perplexity(model, batches, device=None) -> float:
    """Perplexity over batches of ``input_ids`` / ``attention_mask`` / ``labels`` (-100 = not
    scored), the labels shifted as in the HF causal-LM loss; token NLL summed in float64.
    This is how the pruning callback scores its validation data before and after pruning.

    Example:
        >>> loader_perplexity(model, datamodule.val_dataloader())  # doctest: +SKIP
        57.1
    """
    device = device if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in batches:
            ids = batch["input_ids"].to(device)
            labels = batch.get("labels", ids).to(device)
            mask = batch.get("attention_mask")
            logits = model(input_ids=ids, attention_mask=None if mask is None else mask.to(device),
                           use_cache=False).logits
            target = labels[:, 1:]  # (B, T-1): position t predicts token t+1
            keep = target != -100
            lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)[keep]  # (N, vocab)
            total -= lp.gather(-1, target[keep].unsqueeze(-1)).double().sum().item()
            count += int(keep.sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise PrunerError("no labelled tokens in the batches: cannot compute a perplexity; give batches whose labels "
                          "are not all -100")
    return math.exp(total / count)
