"""Data-free recovery text: samples the dense model generates itself from short prompts.

A user with no dataset (or no network) can still recover a pruned model: the dense model
writes the text and, with distillation, also grades the pruned model on it. Samples come in
chunks of ``chunk_size`` sequences, each chunk generated under its own seed, so a sample's
content depends only on (model, seed, seq_len, chunk_size, temperature, top_p) — not on how
many processes generate or in which order. By default the text is drawn from the model's whole
distribution (``top_p = 1``), which pruned better than the truncated 0.95 (docs/results.md).
Each finished chunk is written atomically to the cache folder
(``cache_dir/<key>/chunk00012.json``): an interrupted run resumes where it stopped, and ranks
of a multi-process run generate disjoint chunks into the same folder (which must then be on
a shared filesystem).

Example:
    >>> from pruner.testing import tiny_causal_lm
    >>> from transformers import AutoTokenizer  # doctest: +SKIP
    >>> ids = generate_samples(model, tokenizer, 16, 64, cache_dir="cache")  # doctest: +SKIP
    >>> ids.shape  # doctest: +SKIP
    torch.Size([16, 64])
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList

from .errors import PrunerError
from .plan import model_fingerprint

# Openers across registers (narrative, expository, instructional, dialogue), so that the
# generated text is not one genre. Changing this list changes the cache key.
PROMPTS = (
    "The", "In", "Once upon a time,", "Scientists have", "The history of", "How to", "Dear", "Chapter 1",
    "Today,", "According to", "It was", "When I", "A", "There are several", "Question:", "Recipe:",
    "The city of", "In 1850,", "Instructions:", "The following", "My grandmother", "Researchers at",
    "One of the most", "If you", "Why do", "The first", "Here is", "Water", "During the war,", "Music",
    "The company", "Yesterday", "To make", "Summary:", "In mathematics,", "She", "He", "We",
)


# The sampler's version: part of the cache key, so that text drawn by an earlier sampler (the same
# distribution, other draws) is not mixed with this one's. 2: NucleusSampler (1: transformers' own);
# 3: inverse-CDF draws (version 2 drew with torch.multinomial, and sorted the vocabulary at top_p = 1).
SAMPLER_VERSION = 3


def cache_key(fingerprint: str, seed: int, seq_len: int, chunk_size: int, temperature: float, top_p: float) -> str:
    blob = json.dumps([fingerprint, seed, seq_len, chunk_size, temperature, top_p, PROMPTS, SAMPLER_VERSION])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _write_atomic(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


class NucleusSampler(LogitsProcessor):
    """Temperature + top-p (nucleus) sampling as a logits processor for ``generate(do_sample=False)``:
    it draws the next token itself and returns scores that are ``-inf`` everywhere else, so greedy
    decoding takes the drawn token. Why not ``do_sample=True``: transformers' top-p sorts the whole
    vocabulary and its sampler draws one random number per vocabulary entry at every step, half of
    a CPU generation's time at batch 64 with SmolLM2's 49,152 tokens. Here only the ``candidates``
    most likely tokens are ranked (``topk``); a row whose nucleus reaches beyond them is ranked in
    full, so the nucleus is always exact: the most likely tokens until their mass reaches ``top_p``.
    With ``top_p = 1`` (the model's whole distribution) nothing is ranked. Every draw is one
    inverse-CDF draw (``inverse_cdf_draw``).
    Draws use the global torch generator (seed it for reproducible text).

    Example:
        >>> sampler = NucleusSampler(temperature=1.0, top_p=0.5)
        >>> scores = torch.log(torch.tensor([[0.6, 0.3, 0.1], [0.1, 0.2, 0.7]]))
        >>> sampler(None, scores).argmax(-1).tolist()  # each row's nucleus is its one top token
        [0, 2]
    """

    def __init__(self, temperature: float = 1.0, top_p: float = 0.95, candidates: int = 1024):
        self.temperature, self.top_p, self.candidates = temperature, top_p, candidates

    def __call__(self, input_ids, scores: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)  # (B, V)
        if self.top_p >= 1.0:
            chosen = inverse_cdf_draw(probs)
        else:
            top, index = probs.topk(min(self.candidates, probs.shape[-1]), dim=-1)  # (B, k), most likely first
            chosen = self._draw(top, index)
            wide = top.sum(-1) < self.top_p  # rows whose nucleus reaches beyond the k candidates
            if wide.any():
                chosen[wide] = self._draw(*probs[wide].sort(dim=-1, descending=True))  # (b, V) ranked in full
        return torch.full_like(scores, float("-inf")).scatter_(1, chosen[:, None], 0.0)

    def _draw(self, ranked: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """One token per row from the nucleus of ``ranked`` (probabilities, descending; ``index``: their ids)."""
        in_nucleus = (ranked.cumsum(-1) - ranked) < self.top_p  # the mass before a token is below top_p
        return index.gather(1, inverse_cdf_draw(ranked * in_nucleus)[:, None])[:, 0]


def inverse_cdf_draw(weights: torch.Tensor) -> torch.Tensor:
    """One index per row of ``weights`` (B, V), non-negative, drawn with probability proportional
    to its weight: the first entry whose running sum passes a uniform point of the row's total.
    Why not ``torch.multinomial``: on SmolLM2's 49,152 tokens at batch 64 it takes 147 ms a step on
    2 CPU cores, this 3 ms (measured).

    Example:
        >>> torch.manual_seed(0) and None
        >>> inverse_cdf_draw(torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 2.0]])).tolist()
        [1, 2]
    """
    cdf = weights.cumsum(-1)  # (B, V)
    total = cdf[:, -1:]  # (B, 1)
    point = torch.rand(total.shape, dtype=cdf.dtype, device=cdf.device) * total
    # strictly below the total, so the entry found has a positive weight (cdf[i-1] <= point < cdf[i])
    point = torch.minimum(point, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, point, right=True)[:, 0]


@torch.no_grad()
def _generate_chunk(model, tokenizer, chunk: int, seed: int, size: int, seq_len: int, temperature: float,
                    top_p: float) -> list[list[int]]:
    rng = random.Random(seed * 1_000_003 + chunk)
    prompts = [rng.choice(PROMPTS) for _ in range(size)]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation appends on the right
    try:
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed * 1_000_003 + chunk)
        out = model.generate(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
                             do_sample=False, logits_processor=LogitsProcessorList([NucleusSampler(temperature, top_p)]),
                             max_new_tokens=seq_len, min_new_tokens=seq_len, pad_token_id=pad)
    samples = []
    for row, mask in zip(out.tolist(), enc["attention_mask"].tolist()):
        start = len(mask) - sum(mask)  # drop the left padding
        samples.append(row[start : start + seq_len])
    return samples


def generate_samples(model, tokenizer, num_samples: int, seq_len: int, *, seed: int = 0,
                     cache_dir: str | Path | None = None, chunk_size: int = 8, temperature: float = 1.0,
                     top_p: float = 1.0, rank: int = 0, world_size: int = 1, progress: bool = False,
                     read_all: bool = True, fingerprint: str | None = None,
                     allow_generation: bool = True) -> torch.Tensor:
    """``num_samples`` sequences of ``seq_len`` tokens sampled from ``model``, as a LongTensor
    ``(num_samples, seq_len)``. This process generates the chunks ``c`` with
    ``c % world_size == rank`` that are not cached yet; with ``read_all`` (call after a barrier
    when several processes generate) it returns every sample, else only its own chunks'.

    ``fingerprint`` names the model that wrote (or must write) the cache, by default
    ``model``'s own; a resumed run whose model is already pruned passes the dense model's
    fingerprint with ``allow_generation=False``: the text must come from the cache."""
    from .checks import check_int, check_model, check_number

    check_model(model)
    if not isinstance(num_samples, int) or not isinstance(seq_len, int) or num_samples < 1 or seq_len < 2:
        raise PrunerError(f"generated recovery text needs num_samples >= 1 and seq_len >= 2, got "
                          f"{num_samples!r} and {seq_len!r}")
    check_number("temperature", temperature, 0.0, low_open=True, fix="1.0 samples the model's own distribution")
    check_number("top_p", top_p, 0.0, 1.0, low_open=True, fix="e.g. 0.95")
    check_int("chunk_size", chunk_size, 1)
    check_int("seed", seed, 0)
    folder = None
    if cache_dir is not None:
        key = cache_key(fingerprint or model_fingerprint(model), seed, seq_len, chunk_size, temperature, top_p)
        folder = Path(cache_dir) / key
        folder.mkdir(parents=True, exist_ok=True)
    n_chunks = -(-num_samples // chunk_size)
    mine = [c for c in range(n_chunks) if c % world_size == rank]
    chunks: dict[int, list[list[int]]] = {}
    was_training = model.training
    model.eval()
    try:
        for c in tqdm(mine, desc="generating text", disable=not progress):
            path = folder / f"chunk{c:05d}.json" if folder is not None else None
            if path is not None and path.is_file():
                continue
            if not allow_generation:
                raise PrunerError(f"generated recovery chunk {c} is not in the cache {folder}, and this model can no "
                                  "longer write it (it is already pruned): restore the cache folder or start over")
            chunks[c] = _generate_chunk(model, tokenizer, c, seed, chunk_size, seq_len, temperature, top_p)
            if path is not None:
                _write_atomic(path, {"chunk": c, "ids": chunks[c]})
    finally:
        model.train(was_training)
    wanted = range(n_chunks) if read_all else mine
    rows: list[list[int]] = []
    for c in wanted:
        if c not in chunks:
            path = folder / f"chunk{c:05d}.json" if folder is not None else None
            if path is None or not path.is_file():
                raise PrunerError(f"generated chunk {c} is missing from {folder}: with several processes the "
                                  "cache folder must be on a filesystem all of them share")
            chunks[c] = json.loads(path.read_text())["ids"]
        rows.extend(chunks[c])
    if read_all:
        rows = rows[:num_samples]
    return torch.tensor(rows, dtype=torch.long)
