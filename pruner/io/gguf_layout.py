"""What a GGUF file says about a pruned model: its llama.cpp graph, per-layer widths, rotary
settings and tensors by llama.cpp's names (``pruner.io.gguf`` writes them).

What llama.cpp can express (read in its sources, llama-cpp-python 0.3.36's vendored copy): the
GGUF loader reads ``head_count``, ``head_count_kv`` and ``feed_forward_length`` as per-layer
arrays for every architecture, but the ``llama`` graph creates each layer's tensors with layer
0's widths (``hparams.n_head()`` without a layer index), so a ``llama`` file with uneven layers
fails to load. The ``deci`` architecture (DeciLM / Llama-Nemotron, ``src/models/deci.cpp``)
builds every layer with its own ``n_head(il)``, ``n_head_kv(il)`` and ``n_ff(il)``, skips the
attention of a layer with no heads and the MLP of one with no channels, and is otherwise the
LLaMA graph (RMSNorm, SwiGLU, the same rotary embedding). So a model whose layers all have the
same widths is written as ``llama`` (every engine reads it); an uneven one as ``deci``.

Qwen2 is written the same way, not as llama.cpp's ``qwen2`` architecture: that graph creates
``attn_q`` and ``attn_output`` as ``n_embd x n_embd`` and ``n_ff()`` for every layer, so it cannot
hold a model with heads or per-layer MLP channels removed. Qwen2 differs from LLaMA only by its
q/k/v biases, which both ``llama`` and ``deci`` load as optional tensors (``create_tensor_qkv``)
and add in ``build_qkv``; its rotary embedding is Hugging Face's halves layout like LLaMA's
(llama.cpp's ``qwen2`` graph uses NEOX rope on unpermuted rows instead), so the q/k rows and
biases take the same permutation. Sliding-window Qwen2 configs are refused.

Phi-3 is LLaMA with fused projections (``qkv_proj``: query, key, value rows; ``gate_up_proj``:
gate, then up rows): split by their shapes, it goes into ``llama`` / ``deci`` too (llama.cpp's
``phi3`` graph sizes the query as ``n_embd`` wide, so it cannot hold removed heads). Qwen3 and
Gemma 3 need their per-head q/k norms, which only their own graphs (``qwen3``, ``gemma3``) have,
and those build every layer with layer 0's widths: a uniform prune (``uniform=True``) exports, a
per-layer one is refused naming that. Their graphs rotate halves (NEOX), as Hugging Face does, so
their rows are not permuted; Gemma's norms scale by ``1 + weight`` (written as ``weight + 1``, as
llama.cpp's converter does), and the gemma3 graph fixes the pattern of sliding and global layers
(every sixth global), the local layers' rotary base and the attention scale: a config that differs
is refused. Gemma and Gemma 2 go into their own graphs (``gemma``, ``gemma2``) for the same
reasons (NEOX rotary, norms by ``1 + weight``, the embedding scaled by sqrt(hidden) in the graph)
and with the same one-width rule; both compute the logits with the input embedding (an untied
output is refused), and the gemma2 graph alternates sliding and global layers (every second
global) and always soft-caps attention scores and logits (a config without both is refused).
Granite goes into llama.cpp's ``granite`` graph: LLaMA's (rows permuted alike) with Hugging Face's
four multipliers as its embedding, residual, attention and logit scales; SmolLM3 into its
``smollm3`` graph, LLaMA's without the rotary embedding in every fourth layer; OLMo 2 into its
``olmo2`` graph (NEOX rotary, norms after each block only, q/k norms over the whole projection, the
query as wide as the hidden size, an output tensor even where tied); one width for every layer in
each.

Layouts follow llama.cpp's own converter (``convert_hf_to_gguf.py``): tensors keep the Hugging
Face ``(out, in)`` layout (ggml reads it as ``ne = (in, out)``), norms stay f32, and the rows of
``q_proj`` / ``k_proj`` are permuted from the Hugging Face rotary layout (halves) to llama.cpp's
(interleaved pairs), per layer with that layer's head counts.

Example:
    >>> from pruner.testing import tiny_causal_lm
    >>> model = tiny_causal_lm("llama")
    >>> plan_gguf = describe(model)
    >>> plan_gguf.architecture, plan_gguf.heads[0], plan_gguf.head_dim
    ('llama', 4, 16)
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import PrunerError
from ..recovery.lora import check_merged

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "phi3", "qwen3", "gemma", "gemma2", "gemma3_text", "granite",
                         "smollm3", "olmo2")
# families written into llama.cpp's own graph of that name: one width for every layer (its loader
# creates each layer's tensors with layer 0's head counts and MLP width)
OWN_GRAPHS = {"qwen3": "qwen3", "gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3", "granite": "granite",
              "smollm3": "smollm3", "olmo2": "olmo2"}
NEOX_GRAPHS = ("qwen3", "gemma", "gemma2", "gemma3", "olmo2")  # rotate halves as Hugging Face does: rows as they are
GEMMA_GRAPHS = ("gemma", "gemma2", "gemma3")  # norms that scale by 1 + weight
# llama.cpp's gemma2 / gemma3 graphs: layer il slides unless il % n == n - 1 (set_swa_pattern(n))
SWA_PATTERN = {"gemma2": 2, "gemma3_text": 6}
# ... and scale attention by 1/sqrt(hidden / heads) instead of 1/sqrt(head_dim) at this depth (their 27B)
SCALE_BY_WIDTH_AT = {"gemma2": 46, "gemma3_text": 62}
GEMMA_NAMES = {"gemma": "Gemma", "gemma2": "Gemma 2", "gemma3_text": "Gemma 3"}  # model type -> how messages say it
SMOLLM3_NO_ROPE_STEP = 4  # llama.cpp's smollm3 graph: no rotary embedding where (il + 1) % 4 == 0

@dataclass
class GGUFLayout:
    """What the file will say about the model: architecture and per-layer widths."""

    architecture: str  # "llama" (every layer alike), "deci" (per-layer widths), or a family's own graph
    hidden: int
    head_dim: int
    heads: list[int]  # query heads per layer
    kv_heads: list[int]
    ff: list[int]  # MLP channels per layer
    vocab: int
    context: int
    rms_eps: float
    rope_theta: float
    rope_factors: list[float] | None = None  # llama3 rope scaling
    tied: bool = True
    qkv_bias: bool = False  # Qwen2: q/k/v biases (llama.cpp's optional attn_q/k/v.bias)
    sliding_window: int | None = None  # Gemma 2 / 3's local layers
    rope_linear_factor: float | None = None  # Gemma 3's global layers (4B and larger)
    attn_softcap: float | None = None  # Gemma 2: tanh soft-capping of attention scores
    final_softcap: float | None = None  # ... and of the output logits
    multipliers: dict[str, float] | None = None  # Granite: embedding, residual, attention, logit scales

    @property
    def uniform(self) -> bool:
        return len(set(self.heads)) == len(set(self.kv_heads)) == len(set(self.ff)) == 1


def _decoder(model: nn.Module):
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if inner is None or layers is None or not hasattr(inner, "embed_tokens"):
        raise PrunerError(f"{type(model).__name__} is not a LLaMA-family causal LM (model.model.layers): "
                          f"GGUF export supports {', '.join(SUPPORTED_MODEL_TYPES)}")
    return inner, layers


def layer_tensors(layer: nn.Module, index: int) -> dict[str, torch.Tensor | None]:
    """One decoder layer's tensors by role (``q``, ``k``, ``v``, their ``*_bias``, ``o``,
    ``gate``, ``up``, ``down``, the norms; None where the layer has none), fused projections
    split by their shapes: Phi-3's ``qkv_proj`` holds the query rows (as many as ``o_proj``
    reads), then key and value rows in equal parts; its ``gate_up_proj`` the gate rows, then the
    up rows (``Phi3MLP``: ``gate, up = chunk(2)``)."""
    attn, mlp = layer.self_attn, layer.mlp
    if getattr(attn.o_proj, "bias", None) is not None:
        raise PrunerError(f"layer {index} o_proj has a bias: not expressible in this export")
    out: dict[str, torch.Tensor | None] = {
        "o": attn.o_proj.weight, "down": mlp.down_proj.weight, "attn_post_norm": None, "ffn_post_norm": None,
        "q_norm": getattr(getattr(attn, "q_norm", None), "weight", None),
        "k_norm": getattr(getattr(attn, "k_norm", None), "weight", None)}
    if not hasattr(layer, "input_layernorm"):  # OLMo 2: a norm after each block only
        out.update(attn_norm=None, attn_post_norm=layer.post_attention_layernorm.weight, ffn_norm=None,
                   ffn_post_norm=layer.post_feedforward_layernorm.weight)
    else:
        out.update(attn_norm=layer.input_layernorm.weight, ffn_norm=layer.post_attention_layernorm.weight)
    if hasattr(layer, "pre_feedforward_layernorm"):  # Gemma 2/3: a norm before and after each block
        out.update(attn_post_norm=layer.post_attention_layernorm.weight, ffn_norm=layer.pre_feedforward_layernorm.weight,
                   ffn_post_norm=layer.post_feedforward_layernorm.weight)
    if hasattr(attn, "qkv_proj"):
        if attn.qkv_proj.bias is not None:
            raise PrunerError(f"layer {index} qkv_proj has a bias: not expressible in this export")
        fused, q = attn.qkv_proj.weight, attn.o_proj.weight.shape[1]  # (q + 2 kv, hidden)
        kv = (fused.shape[0] - q) // 2
        out.update(q=fused[:q], k=fused[q : q + kv], v=fused[q + kv :], q_bias=None, k_bias=None, v_bias=None)
    else:
        out.update({name: getattr(attn, f"{name}_proj").weight for name in ("q", "k", "v")})
        out.update({f"{name}_bias": getattr(getattr(attn, f"{name}_proj"), "bias", None) for name in ("q", "k", "v")})
    if hasattr(mlp, "gate_up_proj"):
        fused = mlp.gate_up_proj.weight  # (2 ff, hidden): gate rows, then up rows
        out.update(gate=fused[: fused.shape[0] // 2], up=fused[fused.shape[0] // 2 :])
    else:
        out.update(gate=mlp.gate_proj.weight, up=mlp.up_proj.weight)
    for name in ("gate_up_proj", "gate_proj", "up_proj", "down_proj"):
        if getattr(getattr(mlp, name, None), "bias", None) is not None:
            raise PrunerError(f"layer {index} mlp.{name} has a bias: not expressible in this export")
    return out


def _check_family(cfg, model_type: str) -> None:
    """What a family's config may hold that these graphs would compute differently."""
    window = getattr(cfg, "sliding_window", None)
    if model_type in ("qwen2", "qwen3") and (getattr(cfg, "use_sliding_window", False)
                                            or "sliding_attention" in (getattr(cfg, "layer_types", None) or ())):
        raise PrunerError(f"this {model_type} config uses sliding-window attention, which llama.cpp's graphs used "
                          "here do not have; it cannot be exported faithfully")
    if model_type == "mistral" and window and window < getattr(cfg, "max_position_embeddings", 0):
        raise PrunerError(f"sliding_window={cfg.sliding_window}: llama.cpp's llama graph has no sliding-window "
                          "attention; this Mistral cannot be exported faithfully")
    if model_type == "phi3" and window and window < getattr(cfg, "max_position_embeddings", 0):
        # llama.cpp's own phi3 graph turns Phi-3's window off too (ggml-org/llama.cpp#13676)
        warnings.warn(f"Phi-3's sliding_window={window} is not in the GGUF (llama.cpp's graphs, its own phi3 "
                      "included, attend to the whole context): outputs agree up to that many tokens", stacklevel=3)
    params = getattr(cfg, "rope_parameters", None) or {}
    partial = params.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0)) or 1.0
    if partial != 1.0:
        raise PrunerError(f"partial_rotary_factor={partial}: llama.cpp's graphs used here rotate whole heads; this "
                          "model cannot be exported faithfully")
    if model_type == "qwen3" and getattr(cfg, "attention_bias", False):
        raise PrunerError("this Qwen3 config has q/k/v biases, which llama.cpp's qwen3 graph does not read")
    if model_type in GEMMA_NAMES:
        _check_gemma(cfg, model_type)
    if model_type == "smollm3":
        _check_smollm3(cfg)
    if model_type == "granite" and (getattr(cfg, "hidden_act", "silu") != "silu"
                                    or getattr(cfg, "attention_bias", False)):
        raise PrunerError("this Granite's MLP activation or attention biases differ from llama.cpp's granite graph as "
                          "tested here (SiLU, no biases)")


def _check_smollm3(cfg) -> None:
    """llama.cpp's smollm3 graph leaves out the rotary embedding in every fourth layer (its
    ``n_no_rope_layer_step``, fixed at 4) and has no sliding window."""
    n = cfg.num_hidden_layers
    wanted = [int((i + 1) % SMOLLM3_NO_ROPE_STEP != 0) for i in range(n)]
    if list(getattr(cfg, "no_rope_layers", wanted)) != wanted:
        raise PrunerError(f"this SmolLM3's no_rope_layers {list(cfg.no_rope_layers)} are not llama.cpp's smollm3 "
                          f"pattern (no rotary embedding in every {SMOLLM3_NO_ROPE_STEP}th layer), e.g. after whole "
                          "layers were removed: it cannot be exported to GGUF faithfully; serve the "
                          "pruner.save_pretrained folder")
    if getattr(cfg, "use_sliding_window", False):
        raise PrunerError("this SmolLM3 config uses sliding-window attention, which llama.cpp's smollm3 graph does not "
                          "have; it cannot be exported faithfully")


def _check_gemma(cfg, model_type: str) -> None:
    """What llama.cpp's gemma, gemma2 and gemma3 graphs fix that a config could set otherwise:
    GELU (tanh) in the MLP, no q/k/v biases; Gemma 2 and 3: the pattern of sliding and global
    layers; Gemma 2: both soft-cappings (its graph always applies them); Gemma 3: none, and its
    local layers' rotary base (10000, unscaled)."""
    name = GEMMA_NAMES[model_type]
    graph = OWN_GRAPHS[model_type]
    if getattr(cfg, "hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh" or getattr(cfg, "attention_bias",
                                                                                               False):
        raise PrunerError(f"this {name}'s MLP activation or attention biases differ from llama.cpp's {graph} graph "
                          "(GELU with the tanh approximation, no biases)")
    if model_type != "gemma3_text" and not getattr(cfg, "tie_word_embeddings", True):
        raise PrunerError(f"this {name} has an output layer of its own, but llama.cpp's {graph} graph computes the "
                          "logits with the input embedding: it cannot be exported faithfully")
    if model_type in SWA_PATTERN:
        n, every = cfg.num_hidden_layers, SWA_PATTERN[model_type]
        wanted = ["sliding_attention" if i % every < every - 1 else "full_attention" for i in range(n)]
        if list(getattr(cfg, "layer_types", wanted)) != wanted:
            raise PrunerError(f"this {name}'s layer_types {list(cfg.layer_types)} are not llama.cpp's {graph} pattern "
                              f"(every {every}th layer global, the others sliding), e.g. after whole layers were "
                              "removed: it cannot be exported to GGUF faithfully; serve the pruner.save_pretrained "
                              "folder")
    caps = {key: getattr(cfg, key, None) for key in ("attn_logit_softcapping", "final_logit_softcapping")}
    if model_type == "gemma2" and not all(caps.values()):
        raise PrunerError(f"this Gemma 2 sets no {' or '.join(k for k, v in caps.items() if not v)}, but llama.cpp's "
                          "gemma2 graph always soft-caps (50 and 30 when the file says nothing)")
    if model_type != "gemma2" and any(caps.values()):
        key = next(k for k, v in caps.items() if v)
        raise PrunerError(f"this {name} sets {key}={caps[key]}, which llama.cpp's {graph} graph does not apply")
    if model_type == "gemma3_text":
        local = (getattr(cfg, "rope_parameters", None) or {}).get("sliding_attention", {})
        if float(local.get("rope_theta", 10000.0)) != 10000.0 or local.get("rope_type", "default") != "default":
            raise PrunerError(f"this Gemma 3's sliding layers use rotary settings {local}, but llama.cpp's gemma3 "
                              "graph fixes them at base 10000, unscaled")


def describe(model: nn.Module) -> GGUFLayout:
    """The GGUF layout of ``model`` (read from its weights' shapes, not its config), or a
    :class:`PrunerError` naming what llama.cpp cannot express. Nothing is written."""
    cfg = model.config
    model_type = getattr(cfg, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise PrunerError(f"GGUF export supports model types {', '.join(SUPPORTED_MODEL_TYPES)} (llama.cpp's llama, "
                          f"deci and the families' own graphs), got {model_type!r}")
    check_merged(model, "export it (or export the merged folder that pruner.save_pretrained wrote)")
    _check_family(cfg, model_type)
    inner, layers = _decoder(model)
    hidden = inner.embed_tokens.weight.shape[1]
    head_dim = getattr(cfg, "head_dim", None) or hidden // cfg.num_attention_heads
    if head_dim % 2:
        raise PrunerError(f"head_dim {head_dim} is odd: the rotary permutation needs pairs")
    heads, kv_heads, ff = [], [], []
    first = layer_tensors(layers[0], 0) if len(layers) else {}
    qkv_bias = first.get("q_bias") is not None
    for i, layer in enumerate(layers):
        t = layer_tensors(layer, i)
        for name in ("q", "k", "v"):  # optional tensors in llama.cpp: all layers or none
            if (t[f"{name}_bias"] is not None) != qkv_bias:
                raise PrunerError(f"layer {i} {name}_proj {'lacks' if qkv_bias else 'has'} a bias unlike layer 0's "
                                  "q_proj: q/k/v biases must be in every layer or in none")
        q, k = t["q"].shape[0], t["k"].shape[0]
        if q % head_dim or k % head_dim or t["v"].shape[0] != k:
            raise PrunerError(f"layer {i}: q/k/v widths {q}/{k}/{t['v'].shape[0]} are not whole heads "
                              f"of {head_dim}")
        if k and (q // head_dim) % (k // head_dim):
            raise PrunerError(f"layer {i}: {q // head_dim} query heads do not share {k // head_dim} KV heads evenly")
        heads.append(q // head_dim)
        kv_heads.append(k // head_dim)
        ff.append(t["gate"].shape[0])
    rope = _rope(cfg, head_dim) if model_type != "gemma3_text" else (0.0, None)
    lm_head = model.get_output_embeddings()
    tied = lm_head is None or lm_head.weight.data_ptr() == inner.embed_tokens.weight.data_ptr()
    layout = GGUFLayout("llama", hidden, head_dim, heads, kv_heads, ff, inner.embed_tokens.weight.shape[0],
                        int(getattr(cfg, "max_position_embeddings", 2048)), float(cfg.rms_norm_eps), rope[0],
                        rope[1], tied, qkv_bias)
    even = layout.uniform and 0 not in heads and 0 not in ff
    if model_type in OWN_GRAPHS:
        graph = OWN_GRAPHS[model_type]
        if not even:
            raise PrunerError(
                f"this {model_type} has per-layer widths (query heads {sorted(set(heads))}, KV heads "
                f"{sorted(set(kv_heads))}, MLP channels {sorted(set(ff))}), but llama.cpp's {graph} graph builds every "
                "layer with layer 0's widths (and its deci graph, which takes per-layer widths, lacks what this "
                "family adds): "
                "prune with uniform=True for GGUF, or serve the pruner.save_pretrained folder with transformers")
        layout.architecture = graph  # its q_norm / k_norm, norms, scales; its own rotary layout
        if graph in GEMMA_GRAPHS:
            _gemma_layout(cfg, layout, model_type)
        if graph == "olmo2" and heads[0] * head_dim != hidden:
            raise PrunerError(f"this OLMo 2 has {heads[0]} query heads of {head_dim} in a hidden size of {hidden}, but "
                              "llama.cpp's olmo2 graph takes the query as wide as the hidden size (head size = "
                              "hidden / heads): it cannot be exported faithfully")
        if graph == "granite":  # Hugging Face's multipliers are the factors llama.cpp's granite graph applies
            layout.multipliers = {"embedding": float(cfg.embedding_multiplier),
                                  "residual": float(cfg.residual_multiplier),
                                  "attention": float(cfg.attention_multiplier), "logit": float(cfg.logits_scaling)}
    elif not even:
        layout.architecture = "deci"  # per-layer widths (see the module docstring)
    return layout


def _gemma_layout(cfg, layout: GGUFLayout, model_type: str) -> None:
    """Gemma 3: the global layers' rotary settings; Gemma 2 and 3: the sliding window; Gemma 2:
    the soft-capping values. Refuses an attention scale llama.cpp would compute otherwise: it
    takes 1/sqrt(head_dim), or at the depth of the 27B models (46 layers for Gemma 2, 62 for
    Gemma 3) 1/sqrt(hidden / heads), where Hugging Face takes 1/sqrt(query_pre_attn_scalar)
    (Gemma 2 and 3) or 1/sqrt(head_dim) (Gemma)."""
    name = GEMMA_NAMES[model_type]
    if model_type == "gemma3_text":
        glob = (getattr(cfg, "rope_parameters", None) or {}).get("full_attention", {})
        layout.rope_theta = float(glob.get("rope_theta", 1_000_000.0))
        kind = glob.get("rope_type", "default")
        if kind == "linear":
            layout.rope_linear_factor = float(glob["factor"])
        elif kind != "default":
            raise PrunerError(f"Gemma 3 rope scaling {kind!r} is not supported by this GGUF export (default and linear "
                              "are)")
    if model_type in SWA_PATTERN:
        layout.sliding_window = int(cfg.sliding_window)
    if model_type == "gemma2":
        layout.attn_softcap = float(cfg.attn_logit_softcapping)
        layout.final_softcap = float(cfg.final_logit_softcapping)
    scalar = float(getattr(cfg, "query_pre_attn_scalar", None) or layout.head_dim)
    wide = len(layout.heads) == SCALE_BY_WIDTH_AT.get(model_type)
    llama_cpp = layout.hidden / layout.heads[0] if wide else float(layout.head_dim)
    if abs(scalar - llama_cpp) > 1e-6:
        raise PrunerError(f"this {name} scales attention by 1/sqrt({scalar:g}) (query_pre_attn_scalar), but "
                          f"llama.cpp's {OWN_GRAPHS[model_type]} graph would take 1/sqrt({llama_cpp:g}) for this "
                          "shape: it cannot be exported faithfully; serve the pruner.save_pretrained folder")


def _rope(cfg, head_dim: int) -> tuple[float, list[float] | None]:
    """(theta, per-frequency factors or None) from the config; refuses scalings llama.cpp's
    llama/deci graphs would compute differently."""
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    theta = float(params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
    kind = (params.get("rope_type") or params.get("type") or "default").lower()
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise PrunerError(f"rope scaling {kind!r} is not supported by this GGUF export (default and llama3 are)")
    # llama3: per-frequency divisors, as transformers' _compute_llama3_parameters computes them
    factor = float(params.get("factor", 8.0))
    low, high = float(params.get("low_freq_factor", 1.0)), float(params.get("high_freq_factor", 4.0))
    old_context = float(params.get("original_max_position_embeddings", 8192))
    factors = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < old_context / high:
            factors.append(1.0)
        elif wavelen > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return theta, factors


def rotary_permutation(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q/k projection from Hugging Face's rotary layout (each head's first half of
    dimensions, then its second half) to llama.cpp's (interleaved pairs).

    Example:
        >>> rotary_permutation(torch.arange(4.0).view(4, 1), 1).flatten().tolist()
        [0.0, 2.0, 1.0, 3.0]
    """
    if n_heads == 0:
        return weight
    rows = weight.shape[0]
    # (heads, 2, head_dim/2, in) -> (heads, head_dim/2, 2, in): pair dimension j with j + head_dim/2
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_tensors(model: nn.Module, layout: GGUFLayout, permute: bool = True):
    """``(gguf name, tensor (out, in) or (n,))`` in llama.cpp's order and layouts; ``permute=False``
    skips the q/k row permutation (same shapes: for checks that only read shapes). The graphs of
    :data:`NEOX_GRAPHS` rotate halves as Hugging Face does: their rows stay as they are."""
    inner, layers = _decoder(model)
    halves = permute and layout.architecture not in NEOX_GRAPHS
    rotary = rotary_permutation if halves else (lambda weight, n_heads: weight)
    gemma = layout.architecture in GEMMA_GRAPHS
    norm = (lambda w: w.detach().float() + 1) if gemma else (lambda w: w)  # Gemma's norms scale by 1 + weight
    yield "token_embd.weight", inner.embed_tokens.weight
    if layout.rope_factors is not None:
        yield "rope_freqs.weight", torch.tensor(layout.rope_factors, dtype=torch.float32)
    for i, layer in enumerate(layers):
        t = layer_tensors(layer, i)
        if layout.heads[i]:
            if t["attn_norm"] is not None:  # (OLMo 2 has none before its blocks)
                yield f"blk.{i}.attn_norm.weight", norm(t["attn_norm"])
            yield f"blk.{i}.attn_q.weight", rotary(t["q"], layout.heads[i])
            yield f"blk.{i}.attn_k.weight", rotary(t["k"], layout.kv_heads[i])
            yield f"blk.{i}.attn_v.weight", t["v"]
            if layout.qkv_bias:  # the same row permutation as the weights they are added to
                yield f"blk.{i}.attn_q.bias", rotary(t["q_bias"], layout.heads[i])
                yield f"blk.{i}.attn_k.bias", rotary(t["k_bias"], layout.kv_heads[i])
                yield f"blk.{i}.attn_v.bias", t["v_bias"]
            if t["q_norm"] is not None:  # qwen3 / gemma3 per head, OLMo 2 over the projection; before the rotation
                yield f"blk.{i}.attn_q_norm.weight", norm(t["q_norm"])
                yield f"blk.{i}.attn_k_norm.weight", norm(t["k_norm"])
            yield f"blk.{i}.attn_output.weight", t["o"]
            if t["attn_post_norm"] is not None:  # Gemma 2 / 3, OLMo 2
                yield f"blk.{i}.post_attention_norm.weight", norm(t["attn_post_norm"])
        if layout.ff[i]:
            if t["ffn_norm"] is not None:
                yield f"blk.{i}.ffn_norm.weight", norm(t["ffn_norm"])
            yield f"blk.{i}.ffn_gate.weight", t["gate"]
            yield f"blk.{i}.ffn_up.weight", t["up"]
            yield f"blk.{i}.ffn_down.weight", t["down"]
            if t["ffn_post_norm"] is not None:
                yield f"blk.{i}.post_ffw_norm.weight", norm(t["ffn_post_norm"])
    yield "output_norm.weight", norm(inner.norm.weight)
    if not layout.tied or layout.architecture == "olmo2":  # (olmo2's loader requires an output tensor)
        yield "output.weight", model.get_output_embeddings().weight
