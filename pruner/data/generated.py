"""Data-free recovery text: samples the dense model generates itself from short prompts.

A user with no dataset (or no network) can still recover a pruned model: the dense model
writes the text and, with distillation, also grades the pruned model on it. Samples come in
chunks of ``chunk_size`` sequences, each chunk generated under its own seed, so a sample's
content depends only on (model, seed, seq_len, chunk_size, temperature, top_p) — not on how
many processes generate or in which order. By default the text is drawn from the model's whole
distribution (``top_p = 1``; docs/results.md compares it with the truncated 0.95).
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

import contextlib
import hashlib
import inspect
import json
import os
import random
import tempfile
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList

from ..distributed.dtensor import is_sharded
from ..errors import PrunerError
from ..tempfiles import writer_alive
from ..structure.params import model_fingerprint

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


def cache_key(fingerprint: str, seed: int, seq_len: int, chunk_size: int, temperature: float, top_p: float,
              prompt_bos: int | None = None) -> str:
    # prompt_bos joins the key only when set: text written without a BOS keeps its cache folder
    extra = [] if prompt_bos is None else [["prompt_bos", prompt_bos]]
    blob = json.dumps([fingerprint, seed, seq_len, chunk_size, temperature, top_p, PROMPTS, SAMPLER_VERSION, *extra])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _write_atomic(path: Path, write) -> None:
    """``write(tmp)`` into a temporary sibling, then renamed over ``path``: a reader sees the whole
    file or none, and a failure (a full disk) leaves no partial file behind."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-{os.getpid()}-")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_chunk(path: Path, chunk: int, ids: list[list[int]]) -> None:
    _write_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps({"chunk": chunk, "ids": ids})))


class CorruptChunk(PrunerError):
    """A cached chunk of generated text that is not what this package wrote."""


def read_chunk(path: Path, chunk: int, rows: int, seq_len: int, vocab_size: int | None) -> list[list[int]]:
    """The token ids of a cached chunk, checked: whole JSON, its own chunk number, ``rows`` rows of
    ``seq_len`` ids inside the vocabulary. Raises :class:`CorruptChunk` naming the file and the fault.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "chunk00000.json"
        >>> _write_chunk(path, 0, [[1, 2, 3]])
        >>> read_chunk(path, 0, rows=1, seq_len=3, vocab_size=10)
        [[1, 2, 3]]
        >>> read_chunk(path, 0, rows=2, seq_len=3, vocab_size=10)
        Traceback (most recent call last):
        ...
        pruner.data.generated.CorruptChunk: ... holds 1 rows, not 2: ...
    """
    def corrupt(fault: str) -> CorruptChunk:
        return CorruptChunk(f"the cached generated text {path} {fault}: it is not what pruner wrote (an interrupted "
                            "copy, or an edit); delete it and it is written again")

    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise corrupt(f"cannot be read ({type(err).__name__}: {str(err).splitlines()[0][:80]})") from None
    ids = data.get("ids") if isinstance(data, dict) else None
    if not isinstance(ids, list) or data.get("chunk") != chunk:
        raise corrupt(f"is not chunk {chunk} of this text (no 'ids' list, or another chunk number)")
    if len(ids) != rows:
        raise corrupt(f"holds {len(ids)} rows, not {rows}")
    for row in ids:
        if not isinstance(row, list) or len(row) != seq_len or not all(isinstance(t, int) for t in row):
            raise corrupt(f"holds a row that is not {seq_len} token ids")
        if vocab_size is not None and any(t < 0 or t >= vocab_size for t in row):
            raise corrupt(f"holds token ids outside the model's vocabulary (0..{vocab_size - 1})")
    return ids


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
    Why not ``torch.multinomial``: over a large vocabulary it is many times slower on a CPU
    (``benchmarks/generation_speed.py``).

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


class OutputLayerInputs:
    """Records what the output layer (``model.get_output_embeddings()``) receives, call by call:
    the teacher states of ``save_states``. A context manager; ``states()`` concatenates the
    calls along the sequence, ``(B, total tokens, hidden)``."""

    def __init__(self, model) -> None:
        self.head, self.calls = model.get_output_embeddings(), []
        if self.head is None:
            raise PrunerError(f"{type(model).__name__} has no output embeddings (get_output_embeddings() is None): "
                              "its teacher states cannot be saved; distil with the teacher's forward pass instead")

    def __enter__(self) -> OutputLayerInputs:
        self.handle = self.head.register_forward_pre_hook(lambda module, args: self.calls.append(args[0].detach()))
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()

    def states(self) -> torch.Tensor:
        return torch.cat(self.calls, dim=1)


@torch.no_grad()
def output_layer_reproduces_logits(model, tokens: int = 8) -> bool:
    """Whether ``model``'s logits are its output layer applied to that layer's input, so that a
    teacher's logits can be recomputed from saved states (False for models that post-process
    them, e.g. Gemma 2's soft-capping). One forward pass of ``tokens``.

    Example:
        >>> from pruner.testing import tiny_causal_lm
        >>> output_layer_reproduces_logits(tiny_causal_lm("llama"))
        True
    """
    if model.get_output_embeddings() is None:
        return False
    device = next(model.parameters()).device
    ids = torch.arange(tokens, device=device)[None] % model.config.vocab_size  # (1, tokens)
    was_training = model.training
    model.eval()
    try:
        with OutputLayerInputs(model) as inputs:
            logits = model(input_ids=ids).logits.float()
        recomputed = model.get_output_embeddings()(inputs.states()).float()
    finally:
        model.train(was_training)
    if recomputed.shape != logits.shape:
        return False
    # fp32 agrees to rounding; bf16 to its 8-bit mantissa (post-processing moves logits far more)
    tolerance = 1e-3 if next(model.parameters()).dtype == torch.float32 else 3e-2
    return bool((recomputed - logits).abs().max() <= tolerance * logits.abs().max().clamp_min(1.0))


@torch.no_grad()
def _states_of_windows(model, windows: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """The output layer's inputs over full ``windows (N, T)``, positions 0..T-2: ``(N, T-1, H)``."""
    device = next(model.parameters()).device
    out = []
    for batch in windows.split(batch_size):
        with OutputLayerInputs(model) as inputs:
            model(input_ids=batch.to(device))
        out.append(inputs.states()[:, :-1].cpu())
    return torch.cat(out)


def _save_states(path: Path, states: torch.Tensor) -> None:
    from safetensors.torch import save_file

    _write_atomic(path, lambda tmp: save_file({"states": states.contiguous()}, tmp))


def _chunk_path(folder: Path, chunk: int) -> Path:
    return folder / f"chunk{chunk:05d}.json"


def _states_path(chunk_path: Path) -> Path:
    return chunk_path.with_name(chunk_path.stem + ".states.safetensors")


def encode_left_padded(tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    """``texts`` tokenized and padded on the left (generation appends on the right), the
    tokenizer left as it was: a fast tokenizer's call with ``padding=True`` also switches on its
    backend's padding, which ``save_pretrained`` would write into the export's tokenizer.json."""
    side = tokenizer.padding_side
    backend = getattr(tokenizer, "backend_tokenizer", None)
    padding = backend.padding if backend is not None else None
    tokenizer.padding_side = "left"
    try:
        return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
        if backend is not None:
            if padding is None:
                backend.no_padding()
            else:
                fixed = padding.get("strategy")
                backend.enable_padding(direction=padding["direction"], pad_id=padding["pad_id"],
                                       pad_type_id=padding["pad_type_id"], pad_token=padding["pad_token"],
                                       pad_to_multiple_of=padding["pad_to_multiple_of"],
                                       length=fixed.get("Fixed") if isinstance(fixed, dict) else None)


@torch.no_grad()
def _generate_chunk(model, tokenizer, chunk: int, seed: int, size: int, seq_len: int, temperature: float,
                    top_p: float, save_states: bool = False,
                    prompt_bos: int | None = None) -> tuple[list[list[int]], torch.Tensor | None]:
    rng = random.Random(seed * 1_000_003 + chunk)
    prompts = [rng.choice(PROMPTS) for _ in range(size)]
    enc = encode_left_padded(tokenizer, prompts)
    if prompt_bos is not None:  # [pad.., prompt] -> [pad.., BOS, prompt]: each row's BOS right after its padding
        pads = (enc["attention_mask"] == 0).sum(1)  # (size,)
        rows = torch.arange(size)
        ids = torch.cat([enc["input_ids"][:, :1], enc["input_ids"]], 1)  # (size, 1 + prompt)
        mask = torch.cat([torch.zeros_like(enc["attention_mask"][:, :1]), enc["attention_mask"]], 1)
        ids[rows, pads], mask[rows, pads] = prompt_bos, 1
        enc = {"input_ids": ids, "attention_mask": mask}
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # With save_states the prompt's positions must reach the output layer too (transformers
    # passes logits_to_keep=1 to the prompt's forward pass otherwise; 0 keeps them all).
    extra = {"logits_to_keep": 0} if save_states and "logits_to_keep" in inspect.signature(model.forward).parameters \
        else {}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
            (OutputLayerInputs(model) if save_states else contextlib.nullcontext()) as inputs:
        torch.manual_seed(seed * 1_000_003 + chunk)
        out = model.generate(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
                             do_sample=False, logits_processor=LogitsProcessorList([NucleusSampler(temperature, top_p)]),
                             max_new_tokens=seq_len, min_new_tokens=seq_len, pad_token_id=pad, **extra)
    starts = [len(mask) - sum(mask) for mask in enc["attention_mask"].tolist()]  # the left padding
    samples = [row[start : start + seq_len] for row, start in zip(out.tolist(), starts)]
    if not save_states:
        return samples, None
    # the prompt's forward pass, then one per new token but the last: every position but the last
    states = inputs.states()  # (size, prompt + seq_len - 1, H)
    if states.shape[1] != out.shape[1] - 1:
        raise PrunerError(f"{type(model).__name__}'s output layer saw {states.shape[1]} positions while writing "
                          f"{out.shape[1]} tokens: its teacher states cannot be saved; distil with the teacher's "
                          "forward pass (CausalLMModule(teacher_states=False))")
    # a window's position t predicts its token t + 1: positions 0..seq_len-2 of each window
    return samples, torch.stack([states[r, start : start + seq_len - 1] for r, start in enumerate(starts)]).cpu()


def _uncached_chunks(folder: Path | None, n_chunks: int) -> list[int]:
    return [c for c in range(n_chunks) if folder is None or not _chunk_path(folder, c).is_file()]


def _drop_corrupt_chunks(folder: Path, n_chunks: int, rows: int, seq_len: int, vocab_size: int | None) -> None:
    """Deletes cached chunks that are not what this package wrote (they are written again),
    warning once per file, and temporary files of writers that are gone."""
    import warnings

    for c in range(n_chunks):
        path = _chunk_path(folder, c)
        if path.is_file():
            try:
                read_chunk(path, c, rows, seq_len, vocab_size)
            except CorruptChunk as err:
                warnings.warn(f"{err}: writing it again", stacklevel=3)
                path.unlink(missing_ok=True)
                _states_path(path).unlink(missing_ok=True)
    for tmp in folder.glob(".chunk*.tmp-*"):
        pid = tmp.name.split(".tmp-")[-1].split("-")[0]
        if pid.isdigit() and not writer_alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _dealt_chunks(folder: Path | None, n_chunks: int, rank: int, world_size: int) -> list[int]:
    """The chunks this rank writes through a model sharded by FSDP2, in order. Every forward pass
    of such a model is a collective, so every rank must make as many ``generate`` calls as the
    others: rank 0's list of the chunks not cached yet is broadcast and dealt out in rounds, and a
    rank left without one in the last round writes the first of them again and throws it away
    (given as ``-1 - chunk``)."""
    import torch.distributed as dist

    box = [_uncached_chunks(folder, n_chunks)]
    dist.broadcast_object_list(box, src=0)  # rank 0's view: another rank may already see its first chunk written
    todo = box[0]
    rounds = -(-len(todo) // world_size)
    return [todo[i] if (i := r * world_size + rank) < len(todo) else -1 - todo[0] for r in range(rounds)]


def generate_samples(model, tokenizer, num_samples: int, seq_len: int, *, seed: int = 0,
                     cache_dir: str | Path | None = None, chunk_size: int = 8, temperature: float = 1.0,
                     top_p: float = 1.0, rank: int = 0, world_size: int = 1, progress: bool = False,
                     read_all: bool = True, fingerprint: str | None = None,
                     allow_generation: bool = True, save_states: bool = False,
                     prompt_bos: int | None = None) -> torch.Tensor:
    """``num_samples`` sequences of ``seq_len`` tokens sampled from ``model``, as a LongTensor
    ``(num_samples, seq_len)``. This process generates the chunks ``c`` with
    ``c % world_size == rank`` that are not cached yet; with ``read_all`` (call after a barrier
    when several processes generate) it returns every sample, else only its own chunks'. Through
    a model sharded by FSDP2 every rank must call it (its forward passes are collectives): the
    chunks not cached yet are then dealt out in turn, so that every rank makes as many forward
    passes as the others whatever the chunk count or the cache holds.

    ``prompt_bos``: a token put before each prompt (the tokenizer's BOS under the ``"bos"``
    window protocol, :mod:`pruner.data.windows`), so each window starts with it; part of the
    cache key when set.

    ``fingerprint`` names the model that wrote (or must write) the cache, by default
    ``model``'s own; a resumed run whose model is already pruned passes the dense model's
    fingerprint with ``allow_generation=False``: the text must come from the cache.

    ``save_states`` (needs ``cache_dir``) also writes, beside each of this process's chunks,
    what the output layer received at each window's positions 0..seq_len-2 while the text was
    written (``chunk00012.states.safetensors``, in the model's dtype): the teacher's logits for
    distillation without a teacher forward pass (:func:`read_states`). A chunk already cached
    without them gets them from one forward pass of the model over its text."""
    from ..checks import check_int, check_model, check_number, check_writable_folder

    check_model(model)
    if not isinstance(num_samples, int) or not isinstance(seq_len, int) or num_samples < 1 or seq_len < 2:
        raise PrunerError(f"generated recovery text needs num_samples >= 1 and seq_len >= 2, got "
                          f"{num_samples!r} and {seq_len!r}")
    check_number("temperature", temperature, 0.0, low_open=True, fix="1.0 samples the model's own distribution")
    check_number("top_p", top_p, 0.0, 1.0, low_open=True, fix="e.g. 0.95")
    check_int("chunk_size", chunk_size, 1)
    check_int("seed", seed, 0)
    if save_states and cache_dir is None:
        raise PrunerError("generate_samples(save_states=True) writes the states beside the cached text: give "
                          "cache_dir")
    folder = None
    vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    n_chunks = -(-num_samples // chunk_size)
    if cache_dir is not None:
        check_writable_folder("the generated-text cache_dir", cache_dir, fix="give a folder (it is created)")
        key = cache_key(fingerprint or model_fingerprint(model), seed, seq_len, chunk_size, temperature, top_p,
                        prompt_bos)
        folder = Path(cache_dir) / key
        folder.mkdir(parents=True, exist_ok=True)
        if allow_generation and rank == 0 and not (world_size > 1 and is_sharded(model)):
            _drop_corrupt_chunks(folder, n_chunks, chunk_size, seq_len, vocab_size)
    if not allow_generation:  # every rank checks every chunk: all of them stop here, none waits for the others
        if absent := _uncached_chunks(folder, n_chunks):
            raise PrunerError(f"generated recovery chunk {absent[0]} is not in the cache {folder}, and this call may "
                              "not write it (a model already pruned, or a rank reading what all ranks wrote): restore "
                              "the cache folder or start over; with several processes the folder must be on a "
                              "filesystem all of them share")
    sharded = world_size > 1 and is_sharded(model)
    if sharded and save_states:
        # the states of cached chunks would take forward passes on some ranks only (a hang), and a
        # teacher made of the output layer alone would hold a shard of its weight
        raise PrunerError("generate_samples(save_states=True) does not record teacher states through a model "
                          "sharded by FSDP2: distil with the teacher's forward pass "
                          "(CausalLMModule(teacher_states=False)), or write the text with one process")
    if sharded and allow_generation:  # (nothing to write otherwise: every chunk is cached, checked above)
        mine = _dealt_chunks(folder, n_chunks, rank, world_size)
    else:
        mine = [c for c in range(n_chunks) if c % world_size == rank]
    chunks: dict[int, list[list[int]]] = {}
    was_training = model.training
    model.eval()
    try:
        for c in tqdm(mine, desc="generating text", disable=not progress):
            if c < 0:  # sharded: a chunk written and thrown away keeps this rank's collectives in step
                _generate_chunk(model, tokenizer, -c - 1, seed, chunk_size, seq_len, temperature, top_p,
                                prompt_bos=prompt_bos)
                continue
            path = _chunk_path(folder, c) if folder is not None else None
            if path is not None and path.is_file():
                if save_states and allow_generation and not _states_path(path).is_file():
                    ids = torch.tensor(read_chunk(path, c, chunk_size, seq_len, vocab_size))
                    _save_states(_states_path(path), _states_of_windows(model, ids))
                continue
            chunks[c], states = _generate_chunk(model, tokenizer, c, seed, chunk_size, seq_len, temperature, top_p,
                                                save_states, prompt_bos)
            if path is not None:
                if states is not None:  # before the text: a chunk whose text is cached is complete
                    _save_states(_states_path(path), states)
                _write_chunk(path, c, chunks[c])
    finally:
        model.train(was_training)
    wanted = range(n_chunks) if read_all else [c for c in mine if c >= 0]
    rows: list[list[int]] = []
    for c in wanted:
        if c not in chunks:
            path = _chunk_path(folder, c) if folder is not None else None
            if path is None or not path.is_file():
                raise PrunerError(f"generated chunk {c} is missing from {folder}: with several processes the "
                                  "cache folder must be on a filesystem all of them share")
            chunks[c] = read_chunk(path, c, chunk_size, seq_len, vocab_size)
        rows.extend(chunks[c])
    if read_all:
        rows = rows[:num_samples]
    return torch.tensor(rows, dtype=torch.long)


def read_states(num_samples: int, seq_len: int, *, fingerprint: str, seed: int = 0, cache_dir: str | Path,
                chunk_size: int = 8, temperature: float = 1.0, top_p: float = 1.0,
                hidden_size: int | None = None, prompt_bos: int | None = None) -> torch.Tensor | None:
    """The teacher states that ``generate_samples(..., save_states=True)`` cached beside the
    text of these settings, ``(num_samples, seq_len - 1, hidden)``, or None when a chunk has
    none (cached by a run without ``save_states``, or written by a model whose states were not
    wanted). ``fingerprint``: the model that wrote the text (``pruner.structure.model_fingerprint``).

    Example:
        >>> states = read_states(256, 128, fingerprint=fp, cache_dir="pruner_cache/generated")  # doctest: +SKIP
        >>> logits = dense.get_output_embeddings()(states[:4])  # doctest: +SKIP
    """

    folder = Path(cache_dir) / cache_key(fingerprint, seed, seq_len, chunk_size, temperature, top_p, prompt_bos)
    parts = []
    for c in range(-(-num_samples // chunk_size)):
        path = _states_path(_chunk_path(folder, c))
        if not path.is_file():
            return None
        parts.append(_read_states_file(path, chunk_size, seq_len, hidden_size))
    return torch.cat(parts)[:num_samples]


def _read_states_file(path: Path, rows: int, seq_len: int, hidden_size: int | None) -> torch.Tensor:
    """One chunk's saved states, checked: ``(rows, seq_len - 1, hidden_size)``, finite."""
    from safetensors.torch import load_file

    def corrupt(fault: str) -> CorruptChunk:
        return CorruptChunk(f"the cached teacher states {path} {fault}: delete it (and its chunk) and it is written "
                            "again, or distil with the teacher's forward pass (CausalLMModule(teacher_states=False))")

    try:
        states = load_file(str(path)).get("states")
    except Exception as err:  # noqa: BLE001 - any parse failure: not a file this package wrote whole
        raise corrupt(f"cannot be read ({type(err).__name__})") from None
    want = (rows, seq_len - 1, hidden_size if hidden_size is not None else states.shape[-1] if states is not None else 0)
    if states is None or tuple(states.shape) != want:
        got = "no 'states' tensor" if states is None else f"shape {tuple(states.shape)}"
        raise corrupt(f"holds {got}, not {want} (rows, positions, the model's hidden size)")
    return states
