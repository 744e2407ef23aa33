"""Pruned models at published shapes (random weights) through GGUF and a real llama.cpp: how far
llama.cpp's logits are from transformers', and whether greedy tokens agree.

    python benchmarks/gguf_families.py                      # Qwen3-0.6B, Gemma-3-270M, Phi-3-mini (4 layers)
    python benchmarks/gguf_families.py --only gemma-3-270m

Each model is built in fp32 at its published layer shape (Phi-3-mini with 4 of its 32 layers, so
that it fits this machine in f32), pruned with the same widths in every layer (``uniform=True``,
the form llama.cpp's qwen3 / gemma3 graphs take: half of the KV groups and MLP channels; Gemma 3
270M: a quarter of its query heads and MLP channels), exported as f32 GGUF and run by
llama-cpp-python on 32 random tokens (``--tokens 600`` goes past Gemma 3's 512-token window).
Prints one table row per model.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

# (family, published sizes, how it is pruned: uniform widths in every layer)
HALF_KV = dict(pruning_ratio=0.5, head_granularity="kv")
SHAPES = {
    "qwen3-0.6b": ("qwen3", HALF_KV, dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                                 num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True)),
    # 3 of its 4 query heads (its one KV head stays): the case whose plain config transformers refuses
    "gemma-3-270m": ("gemma3_text", dict(pruning_ratio=0.25, head_granularity="query"), dict(hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                                         num_attention_heads=4, num_key_value_heads=1, head_dim=256, vocab_size=262144,
                                         query_pre_attn_scalar=256, sliding_window=512)),
    "phi-3-mini-4-layers": ("phi3", HALF_KV, dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=4,
                                         num_attention_heads=32, num_key_value_heads=32, head_dim=96, vocab_size=32064,
                                         tie_word_embeddings=False)),
}


def byte_level_tokenizer():
    """A small byte-level BPE tokenizer (the kind the export converts), trained on two sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(["the quick brown fox jumps over the lazy dog", "pruning keeps what matters"] * 20,
                            trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def one(name: str, tokens: int) -> dict:
    import numpy as np
    import torch
    from llama_cpp import Llama

    import pruner
    from pruner.io.gguf_layout import describe
    from pruner.testing import tiny_causal_lm

    family, options, sizes = SHAPES[name]
    model = tiny_causal_lm(family, init_std=0.02, max_position_embeddings=2048, **sizes).eval()
    vocab = sizes["vocab_size"]
    g = torch.Generator().manual_seed(0)
    calibration = [torch.randint(3, vocab, (2, 64), generator=g)]
    plan = pruner.prune(model, calibration, uniform=True, **options)
    layout = describe(model)
    with tempfile.TemporaryDirectory() as folder:
        tok = byte_level_tokenizer()  # ids past its 300 are written as unused tokens: the test feeds ids
        start = time.perf_counter()
        path = pruner.export_gguf(model, Path(folder) / "m.gguf", dtype="f32", tokenizer=tok)
        export_s = time.perf_counter() - start
        ids = torch.randint(3, vocab, (tokens,), generator=g).tolist()
        with torch.no_grad():
            hf = model(torch.tensor([ids])).logits[0]
            greedy = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, tokens:].tolist()
        llm = Llama(model_path=str(path), n_ctx=tokens + 16, n_batch=tokens + 16, logits_all=True, n_threads=2,
                    verbose=False)
        llm.eval(ids)
        cpp = torch.from_numpy(np.array(llm.scores[:tokens], dtype=np.float32))
        out = []
        for _ in range(8):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            out.append(token)
            llm.eval([token])
    return {"name": name, "graph": layout.architecture, "params": plan.params["after"],
            "heads": f"{layout.heads[0]}/{layout.kv_heads[0]}", "max_abs": float((cpp - hf).abs().max()),
            "scale": float(hf.abs().max()), "greedy_equal": out == greedy, "export_s": export_s}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=sorted(SHAPES))
    p.add_argument("--tokens", type=int, default=32)
    args = p.parse_args(argv)
    print(f"{time.strftime('%Y-%m-%d')}, f32 GGUF, llama-cpp-python, {args.tokens} prompt tokens")
    print("| shape | llama.cpp graph | parameters after | query/KV heads per layer | max abs logit diff "
          "(max abs logit) | 8 greedy tokens equal | export s |")
    print("|---|---|---|---|---|---|---|")
    warnings.filterwarnings("ignore", message="the tokenizer's pre-tokenizer")  # the test tokenizer's: not a family
    for name in [args.only] if args.only else SHAPES:
        r = one(name, args.tokens)
        print(f"| {r['name']} | {r['graph']} | {r['params'] / 1e6:.0f}M | {r['heads']} | {r['max_abs']:.2e} "
              f"({r['scale']:.2f}) | {'yes' if r['greedy_equal'] else 'NO'} | {r['export_s']:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
