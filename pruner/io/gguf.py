"""GGUF export for llama.cpp (and ollama, LM Studio): pruned LLaMA-family models with per-layer
widths, the tokenizer and chat template carried over, optionally quantized.

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

import hashlib
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..checks import check_bool, check_choice, current_umask, existing_ancestor
from ..errors import PrunerError
from ..recovery.lora import check_merged
from .tempfiles import remove_stale, temporary_file

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
# dtype -> (ggml type of 2-D weights, llama.cpp file type); quantized rows hold whole blocks
GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
# K-quants have no exact Python quantizer: llama.cpp's own quantizer (llama-cpp-python) makes them
LLAMA_CPP_DTYPES = ("q6_k", "q5_k_m", "q5_k_s", "q4_k_m", "q4_k_s", "q3_k_m", "q2_k")

# llama.cpp names its BPE pre-tokenizers by a hash of the token ids of this text
# (convert_hf_to_gguf.py, get_vocab_base_pre); the families pruner's targets use.
PRE_TOKENIZER_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ "
    "🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you "
    "sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen 1.5 / 2
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen 3
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral Nemo
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # GPT-2
}


@dataclass
class GGUFLayout:
    """What the file will say about the model: architecture and per-layer widths."""

    architecture: str  # "llama" (every layer alike) or "deci" (per-layer widths)
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


def describe(model: nn.Module) -> GGUFLayout:
    """The GGUF layout of ``model`` (read from its weights' shapes, not its config), or a
    :class:`PrunerError` naming what llama.cpp cannot express. Nothing is written."""
    cfg = model.config
    model_type = getattr(cfg, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise PrunerError(f"GGUF export supports model types {', '.join(SUPPORTED_MODEL_TYPES)} (llama.cpp's llama / "
                          f"deci graphs), got {model_type!r}")
    check_merged(model, "export it (or export the merged folder that pruner.save_pretrained wrote)")
    window = getattr(cfg, "sliding_window", None)
    if model_type == "qwen2" and (getattr(cfg, "use_sliding_window", False)
                                  or "sliding_attention" in (getattr(cfg, "layer_types", None) or ())):
        raise PrunerError("this Qwen2 config uses sliding-window attention, which llama.cpp's llama / deci graphs do "
                          "not have; it cannot be exported faithfully")
    if model_type == "mistral" and window and window < getattr(cfg, "max_position_embeddings", 0):
        raise PrunerError(f"sliding_window={cfg.sliding_window}: llama.cpp's llama graph has no sliding-window "
                              "attention; this Mistral cannot be exported faithfully")
    inner, layers = _decoder(model)
    hidden = inner.embed_tokens.weight.shape[1]
    head_dim = getattr(cfg, "head_dim", None) or hidden // cfg.num_attention_heads
    if head_dim % 2:
        raise PrunerError(f"head_dim {head_dim} is odd: the rotary permutation needs pairs")
    heads, kv_heads, ff = [], [], []
    qkv_bias = getattr(layers[0].self_attn.q_proj, "bias", None) is not None if len(layers) else False
    for i, layer in enumerate(layers):
        attn, mlp = layer.self_attn, layer.mlp
        for name in ("q_proj", "k_proj", "v_proj"):  # optional tensors in llama.cpp: all layers or none
            if (getattr(getattr(attn, name), "bias", None) is not None) != qkv_bias:
                raise PrunerError(f"layer {i} {name} {'lacks' if qkv_bias else 'has'} a bias unlike layer 0's q_proj: "
                                  "q/k/v biases must be in every layer or in none")
        if getattr(attn.o_proj, "bias", None) is not None:
            raise PrunerError(f"layer {i} o_proj has a bias: not expressible in this export")
        for name in ("gate_proj", "up_proj", "down_proj"):
            if getattr(getattr(mlp, name), "bias", None) is not None:
                raise PrunerError(f"layer {i} mlp.{name} has a bias: not expressible in this export")
        q, k = attn.q_proj.weight.shape[0], attn.k_proj.weight.shape[0]
        if q % head_dim or k % head_dim or attn.v_proj.weight.shape[0] != k:
            raise PrunerError(f"layer {i}: q/k/v widths {q}/{k}/{attn.v_proj.weight.shape[0]} are not whole heads "
                              f"of {head_dim}")
        if k and (q // head_dim) % (k // head_dim):
            raise PrunerError(f"layer {i}: {q // head_dim} query heads do not share {k // head_dim} KV heads evenly")
        heads.append(q // head_dim)
        kv_heads.append(k // head_dim)
        ff.append(mlp.gate_proj.weight.shape[0])
    rope = _rope(cfg, head_dim)
    lm_head = model.get_output_embeddings()
    tied = lm_head is None or lm_head.weight.data_ptr() == inner.embed_tokens.weight.data_ptr()
    layout = GGUFLayout("llama", hidden, head_dim, heads, kv_heads, ff, inner.embed_tokens.weight.shape[0],
                        int(getattr(cfg, "max_position_embeddings", 2048)), float(cfg.rms_norm_eps), rope[0],
                        rope[1], tied, qkv_bias)
    if not layout.uniform or 0 in heads or 0 in ff:
        layout.architecture = "deci"  # per-layer widths (see the module docstring)
    return layout


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


def _tensors(model: nn.Module, layout: GGUFLayout, permute: bool = True):
    """``(gguf name, tensor (out, in) or (n,))`` in llama.cpp's order and layouts; ``permute=False``
    skips the q/k row permutation (same shapes: for checks that only read shapes)."""
    inner, layers = _decoder(model)
    rotary = rotary_permutation if permute else (lambda weight, n_heads: weight)
    yield "token_embd.weight", inner.embed_tokens.weight
    if layout.rope_factors is not None:
        yield "rope_freqs.weight", torch.tensor(layout.rope_factors, dtype=torch.float32)
    for i, layer in enumerate(layers):
        attn, mlp = layer.self_attn, layer.mlp
        if layout.heads[i]:
            yield f"blk.{i}.attn_norm.weight", layer.input_layernorm.weight
            yield f"blk.{i}.attn_q.weight", rotary(attn.q_proj.weight, layout.heads[i])
            yield f"blk.{i}.attn_k.weight", rotary(attn.k_proj.weight, layout.kv_heads[i])
            yield f"blk.{i}.attn_v.weight", attn.v_proj.weight
            if layout.qkv_bias:  # the same row permutation as the weights they are added to
                yield f"blk.{i}.attn_q.bias", rotary(attn.q_proj.bias, layout.heads[i])
                yield f"blk.{i}.attn_k.bias", rotary(attn.k_proj.bias, layout.kv_heads[i])
                yield f"blk.{i}.attn_v.bias", attn.v_proj.bias
            yield f"blk.{i}.attn_output.weight", attn.o_proj.weight
        if layout.ff[i]:
            yield f"blk.{i}.ffn_norm.weight", layer.post_attention_layernorm.weight
            yield f"blk.{i}.ffn_gate.weight", mlp.gate_proj.weight
            yield f"blk.{i}.ffn_up.weight", mlp.up_proj.weight
            yield f"blk.{i}.ffn_down.weight", mlp.down_proj.weight
    yield "output_norm.weight", inner.norm.weight
    if not layout.tied:
        yield "output.weight", model.get_output_embeddings().weight


def _check_quantizable(model: nn.Module, layout: GGUFLayout, dtype: str) -> None:
    import gguf

    if dtype in ("f32", "f16", "bf16"):
        return
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[dtype.upper()]][0]
    bad = [(name, t.shape[-1]) for name, t in _tensors(model, layout, permute=False)
           if t.dim() == 2 and t.shape[-1] % block]
    if bad:
        listed = ", ".join(f"{n} ({w})" for n, w in bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
        raise PrunerError(f"dtype {dtype!r} quantizes rows in blocks of {block}, but these tensors' rows are not a "
                          f"multiple of {block}: {listed}. Prune with round_to={block} (widths in whole blocks) "
                          "or export as f16")


# --- tokenizer -------------------------------------------------------------------------------

def _tokenizer_from_gguf(path: Path) -> dict[str, tuple]:
    """Every ``tokenizer.*`` key of a GGUF file: ``{key: (value, value type, sub type)}``."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = {}
    for name, f in reader.fields.items():
        if name.startswith("tokenizer."):
            sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
            fields[name] = (f.contents(), f.types[0], sub)
    if "tokenizer.ggml.tokens" not in fields:
        raise PrunerError(f"{path} holds no tokenizer (tokenizer.ggml.tokens)")
    return fields


def pre_tokenizer_name(tokenizer) -> str | None:
    """llama.cpp's name for a BPE tokenizer's pre-tokenizer, or None if it is not one we know."""
    ids = tokenizer.encode(PRE_TOKENIZER_TEXT)
    return PRE_TOKENIZERS.get(hashlib.sha256(str(ids).encode()).hexdigest())


def _tokenizer_from_hf(tokenizer, vocab_size: int) -> dict[str, tuple]:
    """A byte-level BPE (GPT-2 style) transformers tokenizer as llama.cpp's ``gpt2`` model."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model", {})
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise PrunerError("the tokenizer is not a byte-level BPE (GPT-2 style) tokenizer, which is what this export "
                          "converts: pass tokenizer= a .gguf file of the dense model (llama.cpp's "
                          "convert_hf_to_gguf.py writes one) and its tokenizer is copied")
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise PrunerError(f"the tokenizer has ids up to {max(vocab.values())}, the model's embedding only {vocab_size}")
    reverse = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
        elif i in added:
            tokens.append(reverse[i])
            types.append(int(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED))
        else:
            tokens.append(reverse[i])
            types.append(int(gguf.TokenType.NORMAL))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    pre = pre_tokenizer_name(tokenizer)
    if pre is None:
        warnings.warn("the tokenizer's pre-tokenizer is not one llama.cpp is known to name here: writing 'default'; "
                      "token ids are exact, but llama.cpp may split text differently from transformers", stacklevel=3)
        pre = "default"
    S, U32, I32, A, B = (gguf.GGUFValueType.STRING, gguf.GGUFValueType.UINT32, gguf.GGUFValueType.INT32,
                         gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.BOOL)
    fields = {"tokenizer.ggml.model": ("gpt2", S, None), "tokenizer.ggml.pre": (pre, S, None),
              "tokenizer.ggml.tokens": (tokens, A, S), "tokenizer.ggml.token_type": (types, A, I32),
              "tokenizer.ggml.merges": (merges, A, S)}
    for key, attr in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unknown", "unk_token_id"),
                      ("padding", "pad_token_id")):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            fields[f"tokenizer.ggml.{key}_token_id"] = (int(value), U32, None)
    fields["tokenizer.ggml.add_bos_token"] = (bool(getattr(tokenizer, "add_bos_token", False)), B, None)
    if getattr(tokenizer, "chat_template", None):
        fields["tokenizer.chat_template"] = (tokenizer.chat_template, S, None)
    return fields


def _tokenizer_fields(tokenizer, vocab_size: int) -> dict[str, tuple]:
    if tokenizer is None:
        raise PrunerError("no tokenizer: pass tokenizer= (a transformers tokenizer, its folder, or a .gguf file "
                          "whose tokenizer to copy); llama.cpp needs one in the file")
    if isinstance(tokenizer, (str, os.PathLike)):
        from .models import resolve_model_source

        folder, gguf_file = resolve_model_source(str(tokenizer))
        if gguf_file is not None:
            fields = _tokenizer_from_gguf(Path(folder) / gguf_file)
            n = len(fields["tokenizer.ggml.tokens"][0])
            if n != vocab_size:
                raise PrunerError(f"{gguf_file} has {n} tokens, the model's embedding {vocab_size} rows: not its tokenizer")
            return fields
        from .models import load_tokenizer

        tokenizer = load_tokenizer(folder)
    return _tokenizer_from_hf(tokenizer, vocab_size)


# --- writing ---------------------------------------------------------------------------------

def check_gguf_target(path, overwrite: bool = False) -> Path:
    """The output path, refused before any work if it is not a ``.gguf`` file name, exists (and
    ``overwrite`` is False), is a folder, or its folder cannot be written."""
    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        raise PrunerError(f"the GGUF path must be a file path ending in .gguf, got {path!r}")
    path = Path(path).expanduser().absolute()
    if path.suffix != ".gguf":
        raise PrunerError(f"{path}: a GGUF file name ends in .gguf")
    if path.is_dir():
        raise PrunerError(f"{path} is a folder: give a file path ending in .gguf")
    if path.exists() and not overwrite:
        raise PrunerError(f"{path} exists: choose another path or pass overwrite=True (--overwrite)")
    parent = existing_ancestor(path.parent)
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise PrunerError(f"cannot write in {parent}: choose a folder you can write to")
    return path


def export_gguf(model_or_folder, path, dtype: str = "f16", tokenizer=None, overwrite: bool = False,
                name: str | None = None) -> Path:
    """Writes ``model_or_folder`` (a transformers LLaMA / Mistral model, pruned or not, or a folder
    or ``.gguf`` it loads from) as a GGUF file that llama.cpp runs; returns the path.

    ``dtype``: ``f32``, ``f16``, ``bf16`` or a llama.cpp block type (``q8_0``, ``q5_1``, ``q5_0``,
    ``q4_1``, ``q4_0``; quantized by ``gguf``'s reference quantizers, which llama.cpp's converter
    uses) or a K-quant (``q6_k``, ``q5_k_m``, ``q4_k_m``, ...: an f16 file is requantized by
    llama.cpp's own quantizer from ``llama-cpp-python``). Norms stay f32 as llama.cpp writes them.
    ``tokenizer``: a transformers tokenizer, a folder, or a ``.gguf`` whose tokenizer keys
    (vocabulary, merges, special ids, chat template) are copied; by default the model folder's.
    Everything is checked before writing, and the file appears whole (written beside it, then
    renamed) or not at all.

    Example:
        >>> import pruner  # doctest: +SKIP
        >>> pruner.export_gguf("exports/smollm2-20pct", "smollm2-20pct.q8_0.gguf", dtype="q8_0")  # doctest: +SKIP
    """
    check_choice("dtype", dtype, GGUF_DTYPES + LLAMA_CPP_DTYPES)
    check_bool("overwrite", overwrite)
    target = check_gguf_target(path, overwrite)
    if isinstance(model_or_folder, (str, os.PathLike)):
        from .models import load_model

        source = str(model_or_folder)
        model, loaded_tokenizer = load_model(source, dtype=torch.float32)
        if tokenizer is None:
            tokenizer = source if str(source).endswith(".gguf") or source == "smollm2" else loaded_tokenizer
    elif isinstance(model_or_folder, nn.Module):
        from .models import find_causal_lm

        model = find_causal_lm(model_or_folder)[1]
    else:
        raise PrunerError(f"model_or_folder must be a model, a folder or a .gguf path, got {type(model_or_folder).__name__}")
    layout = describe(model)
    _check_quantizable(model, layout, dtype if dtype in GGUF_DTYPES else "f16")
    if dtype in LLAMA_CPP_DTYPES:
        _llama_cpp_quantizer()  # refuse before writing anything if the binding is absent
    fields = _tokenizer_fields(tokenizer, layout.vocab)
    remove_stale(target.parent, target.name, magic=b"GGUF")  # what a killed export of this file left
    tmp = temporary_file(target.parent, target.name, suffix=".tmp")
    try:
        if dtype in LLAMA_CPP_DTYPES:
            half = tmp.with_suffix(".f16.tmp")
            try:
                _write(model, layout, fields, half, "f16", name)
                _requantize(half, tmp, dtype)
            finally:
                half.unlink(missing_ok=True)
        else:
            _write(model, layout, fields, tmp, dtype, name)
        os.chmod(tmp, 0o666 & ~current_umask())
        if overwrite:
            os.replace(tmp, target)
        else:
            os.link(tmp, target)  # fails if the path appeared meanwhile: never clobbers a file
            tmp.unlink()
    except FileExistsError:
        tmp.unlink(missing_ok=True)
        raise PrunerError(f"{target} appeared while exporting: nothing was replaced; pass overwrite=True") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def _write(model: nn.Module, layout: GGUFLayout, fields: dict, path: Path, dtype: str, name: str | None) -> None:
    import gguf
    import numpy as np

    arch = layout.architecture
    writer = gguf.GGUFWriter(str(path), arch)
    per_layer = (lambda xs: xs) if arch == "deci" else (lambda xs: xs[0])
    writer.add_name(name or getattr(model.config, "_name_or_path", "") or "pruned model")
    writer.add_context_length(layout.context)
    writer.add_embedding_length(layout.hidden)
    writer.add_block_count(len(layout.heads))
    writer.add_feed_forward_length(per_layer(layout.ff))
    writer.add_head_count(per_layer(layout.heads))
    writer.add_head_count_kv(per_layer(layout.kv_heads))
    writer.add_key_length(layout.head_dim)
    writer.add_value_length(layout.head_dim)
    writer.add_rope_dimension_count(layout.head_dim)
    writer.add_rope_freq_base(layout.rope_theta)
    writer.add_layer_norm_rms_eps(layout.rms_eps)
    writer.add_vocab_size(layout.vocab)
    file_types = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
                  "q5_1": "MOSTLY_Q5_1", "q5_0": "MOSTLY_Q5_0", "q4_1": "MOSTLY_Q4_1", "q4_0": "MOSTLY_Q4_0"}
    writer.add_file_type(int(gguf.LlamaFileType[file_types[dtype]]))
    for key, (value, vtype, sub) in fields.items():
        writer.add_key_value(key, value, vtype, sub_type=sub)
    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16}.get(
        dtype, gguf.GGMLQuantizationType[dtype.upper()])
    for tensor_name, t in _tensors(model, layout):
        data = t.detach().to("cpu", torch.float32).contiguous().numpy()
        if data.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(tensor_name, data)
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(tensor_name, data.astype(np.float16))
        else:
            writer.add_tensor(tensor_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _llama_cpp_quantizer():
    try:
        import llama_cpp
    except ImportError:
        raise PrunerError("K-quant types are made by llama.cpp's own quantizer: pip install llama-cpp-python "
                          "(or export q8_0 / q4_0 / q4_1 / q5_0 / q5_1, which need no llama.cpp)") from None
    return llama_cpp


def _requantize(src: Path, dst: Path, dtype: str) -> None:
    llama_cpp = _llama_cpp_quantizer()
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{dtype.upper()}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    status = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if status != 0:
        raise PrunerError(f"llama.cpp's quantizer failed ({status}) making {dtype}")


def main(argv: list[str] | None = None) -> int:
    """``pruner export-gguf FOLDER OUT.gguf [--dtype ...] [--tokenizer ...] [--overwrite]``."""
    import argparse

    p = argparse.ArgumentParser(prog="pruner export-gguf", description="Write a (pruned) LLaMA-family model as a "
                                "GGUF file for llama.cpp, ollama and LM Studio.")
    p.add_argument("model", help="a folder (e.g. a pruned export), a .gguf file, a hub name or 'smollm2'")
    p.add_argument("output", help="the GGUF file to write (ends in .gguf)")
    p.add_argument("--dtype", default="f16", choices=GGUF_DTYPES + LLAMA_CPP_DTYPES,
                   help="weight type of the 2-D tensors (norms stay f32); default f16")
    p.add_argument("--tokenizer", default=None, help="where the tokenizer comes from: a folder or a .gguf whose "
                   "tokenizer keys are copied (default: the model's own)")
    p.add_argument("--name", default=None, help="general.name in the file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = p.parse_args(argv)
    try:
        out = export_gguf(args.model, args.output, dtype=args.dtype, tokenizer=args.tokenizer,
                          overwrite=args.overwrite, name=args.name)
    except (PrunerError, FileNotFoundError) as err:
        p.exit(2, f"pruner export-gguf: error: {err}\n")
    print(f"wrote {out} ({out.stat().st_size / 2**20:,.1f} MiB, {args.dtype})")
    return 0
