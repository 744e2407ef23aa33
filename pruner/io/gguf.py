"""GGUF export for llama.cpp (and ollama, LM Studio): pruned LLaMA, Mistral, Qwen2 and Phi-3 models
with per-layer widths, Qwen3 and Gemma 3 with one width for every layer, the tokenizer and chat
template carried over, optionally quantized. Which llama.cpp graph holds which model, and why:
:mod:`pruner.io.gguf_layout`; everything is checked before a byte is written, and the file
appears whole or not at all.

Example:
    >>> export_gguf("outputs/smollm2_20pct/export", "smollm2-20pct.q8_0.gguf", dtype="q8_0")  # doctest: +SKIP
    PosixPath('smollm2-20pct.q8_0.gguf')
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from ..checks import check_bool, check_choice, current_umask, existing_ancestor
from ..errors import PrunerError
from .gguf_layout import SUPPORTED_MODEL_TYPES, GGUFLayout, describe, gguf_tensors, rotary_permutation  # noqa: F401
from .models import added_bos
from ..tempfiles import remove_stale, temporary_file

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


def _check_quantizable(model: nn.Module, layout: GGUFLayout, dtype: str) -> None:
    import gguf

    if dtype in ("f32", "f16", "bf16"):
        return
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[dtype.upper()]][0]
    bad = [(name, t.shape[-1]) for name, t in gguf_tensors(model, layout, permute=False)
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
    # what the tokenizer does, not a flag some tokenizer classes lack (pruner.data.windows)
    fields["tokenizer.ggml.add_bos_token"] = (added_bos(tokenizer) is not None, B, None)
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
    if layout.rope_linear_factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(layout.rope_linear_factor)
    if layout.sliding_window is not None:
        writer.add_sliding_window(layout.sliding_window)
    if layout.attn_softcap is not None:
        writer.add_attn_logit_softcapping(layout.attn_softcap)
    if layout.final_softcap is not None:
        writer.add_final_logit_softcapping(layout.final_softcap)
    if layout.multipliers is not None:  # Granite: inputs x embedding, blocks x residual, logits / logit
        writer.add_embedding_scale(layout.multipliers["embedding"])
        writer.add_residual_scale(layout.multipliers["residual"])
        writer.add_attention_scale(layout.multipliers["attention"])
        writer.add_logit_scale(layout.multipliers["logit"])
    writer.add_layer_norm_rms_eps(layout.rms_eps)
    writer.add_vocab_size(layout.vocab)
    file_types = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
                  "q5_1": "MOSTLY_Q5_1", "q5_0": "MOSTLY_Q5_0", "q4_1": "MOSTLY_Q4_1", "q4_0": "MOSTLY_Q4_0"}
    writer.add_file_type(int(gguf.LlamaFileType[file_types[dtype]]))
    for key, (value, vtype, sub) in fields.items():
        writer.add_key_value(key, value, vtype, sub_type=sub)
    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16}.get(
        dtype, gguf.GGMLQuantizationType[dtype.upper()])
    for tensor_name, t in gguf_tensors(model, layout):
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
