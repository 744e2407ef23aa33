"""Efficiency figures: parameter count, analytic MACs, latency / throughput and peak memory.

Every size is read from the modules themselves (``nn.Linear`` shapes, each attention block's
``q_proj`` / ``k_proj`` widths), never from ``model.config``, so that pruned models whose
layers have different numbers of heads or MLP channels are measured correctly.

Example:
    >>> from pruner.eval.efficiency import macs_per_token
    >>> from pruner.structure import count_parameters
    >>> from pruner.testing import tiny_llama
    >>> model = tiny_llama(vocab_size=62)
    >>> count_parameters(model), macs_per_token(model, seq_len=64)
    (69696, 81792)
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from typing import Any, Callable

import torch
from torch import nn

from ..structure import count_parameters  # noqa: F401  (pruner.eval.efficiency's too: tied weights counted once)


def weights_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (shared tensors counted once)."""
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _attention_blocks(model: nn.Module):
    """Attention modules of a LLaMA-like model: those with ``q_proj`` and ``o_proj`` children."""
    for module in model.modules():
        if isinstance(getattr(module, "q_proj", None), nn.Module) and hasattr(module, "o_proj"):
            yield module


def _out_features(module: nn.Module) -> int:
    # LoRA (peft) wraps the projection; the width is that of the wrapped Linear.
    module = getattr(module, "base_layer", module)
    return module.out_features


def attention_heads(model: nn.Module) -> list[tuple[int, int, int]]:
    """``(query_heads, kv_heads, head_dim)`` of each attention block, from its projection widths."""
    config = getattr(model, "config", None)
    out = []
    for attn in _attention_blocks(model):
        head_dim = getattr(attn, "head_dim", None) or getattr(config, "head_dim", None)
        if not head_dim:
            head_dim = config.hidden_size // config.num_attention_heads
        q = _out_features(attn.q_proj) // head_dim
        kv = _out_features(attn.k_proj) // head_dim if hasattr(attn, "k_proj") else q
        out.append((q, kv, head_dim))
    return out


def macs_per_token(model: nn.Module, seq_len: int) -> int:
    """Multiply-accumulates per token of a forward pass over ``seq_len`` tokens.

    Formula (analytic, from module shapes)::

        sum over every nn.Linear:           in_features * out_features
      + sum over every attention block:     2 * query_heads * head_dim * seq_len

    The second term is the score matmul ``Q K^T`` and the value matmul ``softmax(.) V``: each
    query head of each token takes ``head_dim`` MACs per key position, for ``seq_len`` positions
    (the full score matrix, as eager / SDPA kernels compute it before causal masking; GQA shares
    keys and values across heads but not these MACs). Embedding lookups, norms, activations,
    RoPE and softmax are not counted (they are not MACs or are O(hidden) per token). The LM head
    counts even when tied to the embeddings: it is a real matmul. LoRA adapters count as the
    Linears they are.
    """
    linear = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))
    attention = sum(2 * q * d * seq_len for q, _, d in attention_heads(model))
    return linear + attention


def _vocab_ids(model: nn.Module, tokenizer_or_vocab: Any) -> int:
    vocab = tokenizer_or_vocab if isinstance(tokenizer_or_vocab, int) else len(tokenizer_or_vocab)
    return min(vocab, model.get_input_embeddings().num_embeddings)


def _current_rss() -> int | None:
    try:
        import psutil

        return psutil.Process(os.getpid()).memory_info().rss
    except ImportError:
        return None


def peak_memory(fn: Callable[[], Any], device: torch.device | str | None = None) -> tuple[Any, int]:
    """Runs ``fn()`` and returns ``(its result, peak memory increase in bytes)``.

    CUDA: ``torch.cuda.max_memory_allocated`` above the allocation before the call. CPU: peak
    resident set size above the RSS before the call, sampled every 2 ms by a thread with psutil
    (without psutil: the growth of ``ru_maxrss``, which only sees new lifetime peaks).
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, max(0, torch.cuda.max_memory_allocated(device) - before)

    before = _current_rss()
    if before is None:
        import resource

        start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        result = fn()
        return result, max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start) * 1024
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _current_rss())
            done.wait(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        result = fn()
    finally:
        done.set()
        thread.join()
    peak[0] = max(peak[0], _current_rss())
    return result, peak[0] - before


@torch.no_grad()
def measure_latency(
    model: nn.Module,
    tokenizer_or_vocab: Any,
    batch_size: int = 1,
    seq_len: int = 64,
    new_tokens: int = 32,
    repeats: int = 3,
    seed: int = 0,
) -> dict[str, float]:
    """Prefill and greedy-generation speed on random prompts (median of ``repeats`` runs after a
    warm-up run).

    Returns ``prefill_tokens_per_s`` (batch * seq_len / one forward pass), ``generate_tokens_per_s``
    (batch * new_tokens / a whole ``generate`` call, prefill included), ``decode_tokens_per_s``
    (the same without the prefill time), the median seconds of each, ``weights_mb`` (parameter
    and buffer bytes) and ``peak_memory_mb``: the peak increase during the *first* ``generate``
    call (see :func:`peak_memory`); later calls reuse the allocator's freed memory and would
    show about 0 on CPU.
    """
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(_vocab_ids(model, tokenizer_or_vocab), (batch_size, seq_len), generator=gen)
    ids = ids.to(device)
    mask = torch.ones_like(ids)
    pad = getattr(model.config, "pad_token_id", None)
    if pad is None:
        pad = getattr(model.config, "eos_token_id", None)
    if isinstance(pad, list):
        pad = pad[0]
    was_training = model.training
    model.eval()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def prefill() -> None:
        model(input_ids=ids, attention_mask=mask, use_cache=False)
        sync()

    def generate() -> torch.Tensor:
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,  # no early stop at EOS: every run makes the same tokens
            do_sample=False,
            use_cache=True,
            pad_token_id=pad,
        )
        sync()
        return out

    def timed(fn: Callable[[], Any]) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    try:
        # Also the warm-up: first calls allocate and pick kernels, so they are not timed.
        out, peak = peak_memory(generate, device)
        prefill()
        t_prefill = statistics.median(timed(prefill) for _ in range(repeats))
        t_generate = statistics.median(timed(generate) for _ in range(repeats))
    finally:
        model.train(was_training)
    assert out.shape == (batch_size, seq_len + new_tokens), out.shape
    decode_time = max(t_generate - t_prefill, 1e-9)
    return {
        "batch_size": batch_size,
        "seq_len": seq_len,
        "new_tokens": new_tokens,
        "prefill_seconds": t_prefill,
        "generate_seconds": t_generate,
        "prefill_tokens_per_s": batch_size * seq_len / t_prefill,
        "generate_tokens_per_s": batch_size * new_tokens / t_generate,
        "decode_tokens_per_s": batch_size * new_tokens / decode_time,
        "weights_mb": weights_bytes(model) / 2**20,
        "peak_memory_mb": peak / 2**20,
    }


def efficiency(
    model: nn.Module,
    tokenizer_or_vocab: Any,
    seq_len: int = 64,
    batch_size: int = 1,
    new_tokens: int = 32,
    repeats: int = 3,
) -> dict[str, float]:
    """Parameters, MACs and latency in one dict (the efficiency row of the report)."""
    macs = macs_per_token(model, seq_len)
    return {
        "parameters": count_parameters(model),
        "macs_per_token": macs,
        "gmacs_per_sequence": macs * seq_len / 1e9,
        **measure_latency(model, tokenizer_or_vocab, batch_size, seq_len, new_tokens, repeats),
    }
