"""Each family at a published shape, through discovery and planning: the projections live on the
meta device (no memory), everything discovery runs for real is built for real (embeddings with a
256-token vocabulary, norms, rotary tables), and the plan is made for the published parameter
count (the real vocabulary's embeddings counted). What the probe finds must be what the config
declares, and a 20 % target must be met over the model and over the decoder layers."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from pruner.config import PruneConfig
from pruner.loop import families_for, make_plan
from pruner.structure import discover, removed_slices
from pruner.testing import FAMILIES

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
# (family, published model, its config's sizes); vocab_size is the published one
PUBLISHED = [
    ("llama", "Llama-3.1-8B", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                                   tie_word_embeddings=False, rope_parameters=LLAMA3_ROPE)),
    ("mistral", "Mistral-7B-v0.3", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                        num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                        vocab_size=32768, sliding_window=None, tie_word_embeddings=False)),
    ("qwen2", "Qwen2.5-7B", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                 num_attention_heads=28, num_key_value_heads=4, head_dim=128, vocab_size=152064,
                                 tie_word_embeddings=False)),
    ("qwen3", "Qwen3-8B", dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                               num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                               tie_word_embeddings=False)),
    ("gemma2", "Gemma-2-9B", dict(hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
                                  num_attention_heads=16, num_key_value_heads=8, head_dim=256, vocab_size=256000,
                                  query_pre_attn_scalar=256, sliding_window=4096)),
    ("gemma3_text", "Gemma-3-4B", dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
                                       num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                                       vocab_size=262208, query_pre_attn_scalar=256, sliding_window=1024)),
    ("phi3", "Phi-3-mini-4k", dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=32, head_dim=96, vocab_size=32064,
                                   tie_word_embeddings=False)),
    ("glm4", "GLM-4-9B-0414", dict(hidden_size=4096, intermediate_size=13696, num_hidden_layers=40,
                                   num_attention_heads=32, num_key_value_heads=2, head_dim=128, vocab_size=151552,
                                   tie_word_embeddings=False)),
    ("olmo2", "OLMo-2-7B", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=32, head_dim=128, vocab_size=100352,
                                tie_word_embeddings=False)),
    ("granite", "Granite-3.1-8B", dict(hidden_size=4096, intermediate_size=12800, num_hidden_layers=40,
                                       num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                       vocab_size=49155, embedding_multiplier=12.0, residual_multiplier=0.22,
                                       attention_multiplier=0.0078125, logits_scaling=16.0)),
    ("smollm3", "SmolLM3-3B", dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                                   num_attention_heads=16, num_key_value_heads=4, head_dim=128, vocab_size=128256)),
    ("gpt_neox", "Pythia-1.4B", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                                     num_attention_heads=16, vocab_size=50304, tie_word_embeddings=False)),
    ("stablelm", "StableLM-2-1.6B", dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                                         num_attention_heads=32, num_key_value_heads=32, head_dim=64,
                                         vocab_size=100352, tie_word_embeddings=False)),
]
LACKS = {"gpt_neox": ("num_key_value_heads", "head_dim"), "stablelm": ("head_dim",)}


@contextlib.contextmanager
def projections_on_meta():
    """Every nn.Linear built inside holds its weight on the meta device."""
    original = nn.Linear.__init__

    def init(self, *args, **kwargs):
        kwargs["device"] = "meta"
        original(self, *args, **kwargs)

    nn.Linear.__init__ = init
    try:
        yield
    finally:
        nn.Linear.__init__ = original


def published(family: str, sizes: dict) -> tuple[nn.Module, int]:
    """The family's model at ``sizes`` with a 256-token vocabulary, and its published parameter
    count (the real vocabulary's embeddings, and output layer where untied, counted)."""
    import transformers as tf

    config_name, model_name, _ = FAMILIES[family]
    kw = {k: v for k, v in sizes.items() if k not in LACKS.get(family, ())}
    vocab = kw.pop("vocab_size")
    config = getattr(tf, config_name)(vocab_size=256, max_position_embeddings=256, pad_token_id=None, **kw)
    with projections_on_meta(), torch.device("cpu"):
        model = getattr(tf, model_name)(config).eval()
    tied = model.get_output_embeddings() is None or model.get_output_embeddings().weight is \
        model.get_input_embeddings().weight
    built = sum(p.numel() for p in model.parameters())
    return model, built + (vocab - 256) * config.hidden_size * (1 if tied else 2)


@pytest.mark.slow
@pytest.mark.parametrize("family, name, sizes", PUBLISHED, ids=[p[1] for p in PUBLISHED])
def test_published_shapes_are_discovered_and_planned(family, name, sizes):
    model, total = published(family, sizes)
    structure = discover(model)
    heads, kv = sizes["num_attention_heads"], sizes.get("num_key_value_heads", sizes["num_attention_heads"])
    head_dim = sizes.get("head_dim", sizes["hidden_size"] // heads)
    assert len(structure.layers) == sizes["num_hidden_layers"]
    for info in structure.layers:
        assert info.mlp is not None and info.mlp.num_channels == sizes["intermediate_size"], name
        if family == "olmo2":  # q/k norms over the whole projection: the heads are coupled
            assert info.attention is None and "coupled" in info.attention_problem
        else:
            a = info.attention
            assert (a.num_heads, a.num_kv_heads, a.head_dim) == (heads, kv, head_dim), name
    layers = structure.layer_parameters()
    for scope, base in (("model", total), ("layers", layers)):
        cfg = PruneConfig(target_sparsity=0.2, target_scope=scope, prune_attention=family != "olmo2")
        g = torch.Generator().manual_seed(0)
        vectors = {(m.param, m.dim): torch.rand(structure.shapes[m.param][m.dim], generator=g)
                   for f in families_for(structure, cfg) for m in f.members}
        plan = make_plan(structure, vectors, cfg, total)
        removed = removed_parameters(removed_slices(plan, structure), structure)
        assert abs(removed / base - 0.2) < 0.01, (name, scope, removed / base)


def removed_parameters(slices: dict[tuple[str, int], set[int]], structure) -> int:
    """Parameters the plan's slices remove: each tensor's full size minus what it keeps."""
    cut: dict[str, dict[int, int]] = {}
    for (param, dim), indices in slices.items():
        cut.setdefault(param, {})[dim] = len(indices)
    total = 0
    for param, dims in cut.items():
        shape = list(structure.shapes[param])
        kept = 1
        for d, n in enumerate(shape):
            kept *= n - dims.get(d, 0)
        total += torch.Size(shape).numel() - kept
    return total
