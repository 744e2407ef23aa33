"""GGUF export: layouts, checks before writing, and the file run by a real llama.cpp
(llama-cpp-python; those tests skip where it is absent, CI installs it)."""

import importlib.util
import subprocess
import sys

import numpy as np
import pytest
import torch

import pruner
import pruner.io.gguf
from pruner.io import export_gguf
from pruner.io.gguf import describe, pre_tokenizer_name, rotary_permutation
from pruner.testing import tiny_causal_lm
from tests.helpers import SUBPROCESS_TIMEOUT, needs_smollm2

# the tiny BPE tokenizer is no family llama.cpp names: its warning is tested once, below
pytestmark = pytest.mark.filterwarnings("ignore:the tokenizer's pre-tokenizer")
needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                     reason="llama-cpp-python absent: .ci/run shows how to build it")


def tiny_bpe_tokenizer(vocab_size: int = 300):
    """A byte-level BPE tokenizer (GPT-2 style) trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog", "pruning keeps what matters"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _tiny(**overrides):
    kw = dict(vocab_size=300, head_dim=32, hidden_size=64, intermediate_size=128)
    kw.update(overrides)
    return tiny_causal_lm("llama", **kw)


def _batches(vocab=300, n=4, t=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (1, t), generator=g) for _ in range(n)]


def _uneven(round_to: int = 1):
    """A tiny Llama pruned with global ranking: its layers keep different widths."""
    model = _tiny(num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
    target = 0.35 if round_to == 1 else 0.18  # whole blocks of 32 leave less to remove
    pruner.prune(model, _batches(), target_sparsity=target, global_ranking=True, round_to=round_to)
    layout = describe(model)
    assert not layout.uniform, "the fixture must have uneven layers"
    return model


def _ids(n=12, vocab=300, seed=1):
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def _llama_cpp(path):
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=128, n_batch=128, logits_all=True, n_threads=2, verbose=False)


def _llama_cpp_logits(path, ids):
    llm = _llama_cpp(path)
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))


def _llama_cpp_greedy(path, ids, n):
    llm = _llama_cpp(path)
    llm.eval(ids)
    out = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return out


# --- layout and checks (no llama.cpp needed) -------------------------------------------------

def test_uniform_model_is_llama_and_uneven_one_is_deci():
    assert describe(_tiny()).architecture == "llama"
    model = _uneven()
    layout = describe(model)
    assert layout.architecture == "deci"
    assert layout.heads == [layer.self_attn.q_proj.out_features // 32 for layer in model.model.layers]
    assert layout.ff == [layer.mlp.gate_proj.out_features for layer in model.model.layers]


def test_rotary_permutation_pairs_each_heads_halves():
    w = torch.arange(8.0).view(8, 1)  # 2 heads of 4 dimensions: halves (0,1 | 2,3), (4,5 | 6,7)
    assert rotary_permutation(w, 2).flatten().tolist() == [0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]


def test_f32_export_loads_back_in_transformers_bit_exact(tmp_path):
    """transformers' own GGUF reader undoes llama.cpp's q/k permutation: a round trip through it
    checks names, layouts and the permutation without llama.cpp."""
    from transformers import AutoModelForCausalLM

    model = _tiny()
    export_gguf(model, tmp_path / "m.gguf", dtype="f32", tokenizer=tiny_bpe_tokenizer())
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    ids = _ids()
    torch.testing.assert_close(_hf_logits(back, ids), _hf_logits(model, ids), rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["glm", "gpt_neox"])
def test_architectures_llama_cpp_graphs_cannot_express_are_refused_before_writing(tmp_path, arch):
    with pytest.raises(pruner.PrunerError, match="GGUF export supports"):
        export_gguf(tiny_causal_lm(arch), tmp_path / "m.gguf", tokenizer=tiny_bpe_tokenizer())
    assert list(tmp_path.iterdir()) == []


def _qwen2(uneven: bool):
    """A tiny Qwen2 (q/k/v biases, tied embeddings), pruned unevenly by global ranking or not at all."""
    model = tiny_causal_lm("qwen2", vocab_size=300, head_dim=32, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=4 if uneven else 3, num_attention_heads=4, num_key_value_heads=2)
    if uneven:
        pruner.prune(model, _batches(), target_sparsity=0.35, global_ranking=True)
    return model


def test_qwen2_is_written_with_its_biases_permuted_like_its_rows():
    model = _qwen2(uneven=True)
    layout = describe(model)
    assert layout.architecture == "deci" and layout.qkv_bias
    tensors = dict(pruner.io.gguf.gguf_tensors(model, layout))
    attn = model.model.layers[1].self_attn
    assert torch.equal(tensors["blk.1.attn_q.bias"], rotary_permutation(attn.q_proj.bias, layout.heads[1]))
    assert torch.equal(tensors["blk.1.attn_k.bias"], rotary_permutation(attn.k_proj.bias, layout.kv_heads[1]))
    assert torch.equal(tensors["blk.1.attn_v.bias"], attn.v_proj.bias)
    assert not torch.equal(tensors["blk.1.attn_q.bias"], attn.q_proj.bias)  # the permutation moved something


def test_sliding_window_qwen2_is_refused(tmp_path):
    model = tiny_causal_lm("qwen2", vocab_size=300, use_sliding_window=True, sliding_window=8)
    with pytest.raises(pruner.PrunerError, match="sliding-window"):
        export_gguf(model, tmp_path / "m.gguf", tokenizer=tiny_bpe_tokenizer())
    assert list(tmp_path.iterdir()) == []


def test_unmerged_lora_is_refused(tmp_path):
    from pruner.recovery import LoraSettings, attach_lora

    model = _tiny()
    attach_lora(model, LoraSettings(r=2))
    with pytest.raises(pruner.PrunerError, match="merge"):
        export_gguf(model, tmp_path / "m.gguf", tokenizer=tiny_bpe_tokenizer())


def test_widths_a_block_type_cannot_take_are_refused_before_writing(tmp_path):
    model = _uneven(round_to=1)
    widths = [layer.mlp.gate_proj.out_features for layer in model.model.layers]
    assert any(w % 32 for w in widths), f"the fixture must leave a width that is not whole blocks: {widths}"
    with pytest.raises(pruner.PrunerError, match="round_to=32"):
        export_gguf(model, tmp_path / "m.gguf", dtype="q8_0", tokenizer=tiny_bpe_tokenizer())
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad, match", [("m.bin", "ends in .gguf"), ("", "must be a file path")])
def test_bad_output_paths_are_refused(tmp_path, bad, match):
    target = tmp_path / bad if bad else bad
    with pytest.raises(pruner.PrunerError, match=match):
        export_gguf(_tiny(), target, tokenizer=tiny_bpe_tokenizer())


def test_existing_file_is_kept_unless_overwrite(tmp_path):
    target = tmp_path / "m.gguf"
    target.write_bytes(b"precious")
    with pytest.raises(pruner.PrunerError, match="exists"):
        export_gguf(_tiny(), target, tokenizer=tiny_bpe_tokenizer())
    assert target.read_bytes() == b"precious"
    export_gguf(_tiny(), target, tokenizer=tiny_bpe_tokenizer(), overwrite=True)
    assert target.read_bytes()[:4] == b"GGUF"


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    import pruner.io.gguf as ge

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ge, "_write", broken)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(_tiny(), tmp_path / "m.gguf", tokenizer=tiny_bpe_tokenizer())
    assert list(tmp_path.iterdir()) == []


def test_unknown_pre_tokenizer_is_said(tmp_path):
    import warnings

    import gguf

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_gguf(_tiny(), tmp_path / "m.gguf", tokenizer=tiny_bpe_tokenizer())
    assert any("writing 'default'" in str(w.message) for w in caught)
    fields = gguf.GGUFReader(str(tmp_path / "m.gguf")).fields
    assert fields["tokenizer.ggml.pre"].contents() == "default"
    assert len(fields["tokenizer.ggml.tokens"].contents()) == 300


def test_bad_dtype_and_missing_tokenizer_are_refused(tmp_path):
    with pytest.raises(pruner.PrunerError, match="dtype must be one of"):
        export_gguf(_tiny(), tmp_path / "m.gguf", dtype="int3", tokenizer=tiny_bpe_tokenizer())
    with pytest.raises(pruner.PrunerError, match="no tokenizer"):
        export_gguf(_tiny(), tmp_path / "m.gguf")
    with pytest.raises(pruner.PrunerError, match="embedding"):
        export_gguf(_tiny(vocab_size=128), tmp_path / "m.gguf", tokenizer=tiny_bpe_tokenizer())
    assert list(tmp_path.iterdir()) == []


@needs_smollm2
def test_smollm2_tokenizer_is_named_as_llama_cpp_names_it_and_copied_from_its_gguf(tmp_path):
    import gguf

    from pruner.io import load_tokenizer
    from pruner.io.models import SMOLLM2_GGUF, smollm2_folder

    assert pre_tokenizer_name(load_tokenizer("smollm2")) == "smollm"
    model = _tiny(vocab_size=49152)
    export_gguf(model, tmp_path / "m.gguf", tokenizer="smollm2")
    source = gguf.GGUFReader(str(smollm2_folder() / SMOLLM2_GGUF)).fields
    written = gguf.GGUFReader(str(tmp_path / "m.gguf")).fields
    keys = [k for k in source if k.startswith("tokenizer.")]
    assert "tokenizer.chat_template" in keys
    for key in keys:
        assert written[key].contents() == source[key].contents(), key


# --- a real llama.cpp -------------------------------------------------------------------------

@needs_llama_cpp
@pytest.mark.parametrize("uneven", [False, True], ids=["uniform-llama", "uneven-deci"])
def test_llama_cpp_logits_match_transformers_in_f32(tmp_path, uneven):
    model = _uneven() if uneven else _tiny()
    path = export_gguf(model, tmp_path / "m.gguf", dtype="f32", tokenizer=tiny_bpe_tokenizer())
    ids = _ids()
    expected = _hf_logits(model, ids)
    torch.testing.assert_close(_llama_cpp_logits(path, ids), expected, rtol=1e-3, atol=1e-3)
    hf = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
    assert _llama_cpp_greedy(path, ids, 8) == hf


@needs_llama_cpp
@pytest.mark.parametrize("uneven", [False, True], ids=["uniform-llama", "uneven-deci"])
def test_llama_cpp_runs_qwen2_with_its_biases_in_f32(tmp_path, uneven):
    model = _qwen2(uneven)
    assert describe(model).architecture == ("deci" if uneven else "llama")
    path = export_gguf(model, tmp_path / "m.gguf", dtype="f32", tokenizer=tiny_bpe_tokenizer())
    ids = _ids()
    torch.testing.assert_close(_llama_cpp_logits(path, ids), _hf_logits(model, ids), rtol=1e-3, atol=1e-3)
    hf = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
    assert _llama_cpp_greedy(path, ids, 8) == hf


@needs_llama_cpp
# relative logit error measured on this model: f16 6e-4, bf16 4.5e-3, q8_0 1.6e-2 (q4_0: 0.17)
@pytest.mark.parametrize("dtype, tolerance", [("f16", 2e-3), ("bf16", 1e-2), ("q8_0", 4e-2)])
def test_llama_cpp_logits_follow_transformers_in_lower_precision(tmp_path, dtype, tolerance):
    model = _uneven(round_to=32)
    path = export_gguf(model, tmp_path / "m.gguf", dtype=dtype, tokenizer=tiny_bpe_tokenizer())
    ids = _ids(24)
    expected, got = _hf_logits(model, ids), _llama_cpp_logits(path, ids)
    assert (got - expected).norm() / expected.norm() < tolerance


@needs_llama_cpp
def test_k_quant_uses_llama_cpp_quantizer(tmp_path):
    import gguf

    model = _tiny(hidden_size=256, intermediate_size=256, head_dim=64)
    path = export_gguf(model, tmp_path / "m.gguf", dtype="q4_k_m", tokenizer=tiny_bpe_tokenizer())
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    assert "Q4_K" in set(types.values()) or "Q6_K" in set(types.values())
    assert np.isfinite(_llama_cpp_logits(path, _ids()).numpy()).all()


@needs_llama_cpp
def test_cli_exports_a_pruned_folder(tmp_path):
    model = _uneven(round_to=32)
    tok = tiny_bpe_tokenizer()
    pruner.save_pretrained(model, tmp_path / "pruned", tokenizer=tok)
    out = tmp_path / "pruned.q8_0.gguf"
    cmd = [sys.executable, "-m", "pruner", "export-gguf", str(tmp_path / "pruned"), str(out), "--dtype", "q8_0"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert done.returncode == 0, done.stderr
    ids = _ids()
    assert int(_llama_cpp_logits(out, ids)[-1].argmax()) == int(_hf_logits(model, ids)[-1].argmax())
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert again.returncode == 2 and "exists" in again.stderr and "Traceback" not in again.stderr


@needs_llama_cpp
@needs_smollm2
@pytest.mark.slow
def test_pruned_smollm2_runs_in_llama_cpp(tmp_path):
    from pruner.data import calibration_samples

    model, tok = pruner.load_model("smollm2")
    x = calibration_samples("builtin", tok, 4, 64, seed=0)
    pruner.prune(model, [x], target_sparsity=0.2, attention_layers=(4, 28), mlp_layers=(4, 28),
                 global_ranking=True, round_to=32)
    assert describe(model).architecture == "deci"
    ids = tok("The capital of France is", add_special_tokens=False).input_ids
    expected = _hf_logits(model, ids)
    f32 = export_gguf(model, tmp_path / "p.f32.gguf", dtype="f32", tokenizer="smollm2")
    got = _llama_cpp_logits(f32, ids)
    # 30 layers of fp32 in another summation order: logits of magnitude ~20 differ by up to ~0.02
    assert (got - expected).norm() / expected.norm() < 1e-3
    torch.testing.assert_close(got, expected, rtol=0, atol=0.1)
    hf = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)[0, len(ids):].tolist()
    assert _llama_cpp_greedy(f32, ids, 6) == hf
    q8 = export_gguf(model, tmp_path / "p.q8_0.gguf", dtype="q8_0", tokenizer="smollm2")
    assert q8.stat().st_size < 0.3 * f32.stat().st_size
    assert int(_llama_cpp_logits(q8, ids)[-1].argmax()) == int(expected[-1].argmax())
    llm = _llama_cpp(q8)  # llama.cpp's own tokenizer, from the copied keys, splits text as transformers does
    assert llm.tokenize(b"The capital of France is", add_bos=False) == ids


# --- uniform widths: a plain config every engine loads ---------------------------------------

def test_uniform_pruning_gives_equal_layers_a_plain_config_and_a_llama_gguf(tmp_path):
    import json

    from transformers import AutoModelForCausalLM

    model = _tiny(num_hidden_layers=4)
    plan = pruner.prune(model, _batches(), target_sparsity=0.2, uniform=True, head_granularity="kv")
    assert plan.params["removed"] > 0
    widths = {(layer.self_attn.q_proj.out_features, layer.mlp.gate_proj.out_features) for layer in model.model.layers}
    assert len(widths) == 1 and widths != {(4 * 32, 128)}
    assert describe(model).architecture == "llama"
    pruner.save_pretrained(model, tmp_path / "plain", tokenizer=tiny_bpe_tokenizer())
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert "pruner_shapes" not in config and "auto_map" not in config
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", trust_remote_code=False).eval()
    ids = _ids()
    torch.testing.assert_close(_hf_logits(plain, ids), _hf_logits(model, ids))


@pytest.mark.parametrize("kwargs, match", [
    (dict(global_ranking=True), "global_ranking=False"),
    (dict(attention_layers=(1, 3), mlp_layers=(1, 3)), "leaves some layers whole"),
])
def test_uniform_refuses_what_cannot_be_uniform(kwargs, match):
    with pytest.raises(pruner.PrunerError, match=match):
        pruner.prune(_tiny(), _batches(), target_sparsity=0.2, uniform=True, **kwargs)


# --- families beyond LLaMA: Qwen3, Gemma 1-3, Granite, SmolLM3 and OLMo 2 into llama.cpp's own graphs, Phi-3 into llama / deci

def _family(arch: str, how: str, **overrides):
    """A tiny ``arch`` model of 6 layers (Gemma 3: five sliding, one global; Gemma 2: alternating,
    with soft-caps small enough to move its logits), dense, pruned to equal layers (``uniform``)
    or pruned in two layers' heads only (``uneven``)."""
    kw = dict(vocab_size=300, head_dim=32, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
              num_attention_heads=4, num_key_value_heads=2)
    if arch in ("gemma2", "gemma3_text"):  # llama.cpp scales attention by 1/sqrt(head_dim): so do their 2B-12B
        kw.update(query_pre_attn_scalar=32, sliding_window=4)
    if arch == "gemma2":  # (its defaults, 50 and 30, leave a tiny model's logits as they are)
        kw.update(attn_logit_softcapping=2.0, final_logit_softcapping=1.5)
    if arch == "olmo2":  # llama.cpp's olmo2 graph: head size = hidden / heads, as in OLMo 2's configs
        kw.update(head_dim=16)
    kw.update(overrides)
    model = tiny_causal_lm(arch, **kw)
    if how == "uniform":  # (OLMo 2's heads are coupled: its MLP channels only)
        pruner.prune(model, _batches(), pruning_ratio=0.5, uniform=True, head_granularity="kv",
                     prune_attention=arch != "olmo2")
    elif how == "uneven":
        pruner.prune(model, _batches(), pruning_ratio=0.5, head_granularity="kv", attention_layers=(1, 3),
                     prune_mlp=False)
    return model


@needs_llama_cpp
@pytest.mark.parametrize("arch, how, graph", [
    ("qwen3", "dense", "qwen3"), ("qwen3", "uniform", "qwen3"),
    ("gemma3_text", "dense", "gemma3"), ("gemma3_text", "uniform", "gemma3"),
    ("gemma", "dense", "gemma"), ("gemma", "uniform", "gemma"),
    ("gemma2", "dense", "gemma2"), ("gemma2", "uniform", "gemma2"),
    ("granite", "dense", "granite"), ("granite", "uniform", "granite"),  # every multiplier off 1 (pruner.testing)
    ("smollm3", "dense", "smollm3"), ("smollm3", "uniform", "smollm3"),  # layer 3 of 6 without rotary embedding
    ("olmo2", "dense", "olmo2"), ("olmo2", "uniform", "olmo2"),  # MLP channels only (its heads are coupled)
    ("phi3", "uniform", "llama"), ("phi3", "uneven", "deci"),
])
def test_llama_cpp_runs_each_familys_own_graph_in_f32(tmp_path, arch, how, graph):
    model = _family(arch, how)
    layout = describe(model)
    assert layout.architecture == graph
    if how != "dense":
        assert min(layout.heads) == 2 or (arch == "olmo2" and max(layout.ff) < 128)
    path = export_gguf(model, tmp_path / "m.gguf", dtype="f32", tokenizer=tiny_bpe_tokenizer())
    ids = _ids(14)  # longer than Gemma 2 / 3's sliding window of 4: the local layers' mask matters
    torch.testing.assert_close(_llama_cpp_logits(path, ids), _hf_logits(model, ids), rtol=2e-3, atol=2e-3)
    hf = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
    assert _llama_cpp_greedy(path, ids, 8) == hf


def test_what_qwen3_and_gemma3_graphs_cannot_hold_is_refused_before_writing(tmp_path):
    uneven = _family("qwen3", "uneven")
    with pytest.raises(pruner.PrunerError, match="qwen3 graph builds every layer with layer 0's widths.*uniform=True"):
        export_gguf(uneven, tmp_path / "a.gguf", tokenizer=tiny_bpe_tokenizer())
    shifted = _family("gemma3_text", "dense")
    shifted.config.layer_types = ["full_attention"] + shifted.config.layer_types[1:]
    with pytest.raises(pruner.PrunerError, match="not llama.cpp's gemma3 pattern"):
        export_gguf(shifted, tmp_path / "b.gguf", tokenizer=tiny_bpe_tokenizer())
    scaled = _family("gemma3_text", "dense")
    scaled.config.query_pre_attn_scalar = 256
    with pytest.raises(pruner.PrunerError, match=r"1/sqrt\(256\).*would take 1/sqrt\(32\)"):
        export_gguf(scaled, tmp_path / "c.gguf", tokenizer=tiny_bpe_tokenizer())
    uncapped = _family("gemma2", "dense", attn_logit_softcapping=None)
    with pytest.raises(pruner.PrunerError, match="sets no attn_logit_softcapping.*always soft-caps"):
        export_gguf(uncapped, tmp_path / "d.gguf", tokenizer=tiny_bpe_tokenizer())
    untied = _family("gemma", "dense", tie_word_embeddings=False)
    with pytest.raises(pruner.PrunerError, match="output layer of its own.*gemma graph"):
        export_gguf(untied, tmp_path / "e.gguf", tokenizer=tiny_bpe_tokenizer())
    for arch in ("gemma2", "granite", "smollm3"):
        with pytest.raises(pruner.PrunerError, match=f"{arch} graph builds every layer with layer 0's widths"):
            export_gguf(_family(arch, "uneven"), tmp_path / "f.gguf", tokenizer=tiny_bpe_tokenizer())
    wide_heads = _family("olmo2", "dense", head_dim=32)  # 4 x 32 query rows for a hidden size of 64
    with pytest.raises(pruner.PrunerError, match="olmo2 graph takes the query as wide as the hidden size"):
        export_gguf(wide_heads, tmp_path / "h.gguf", tokenizer=tiny_bpe_tokenizer())
    shortened = _family("smollm3", "dense", num_hidden_layers=4, no_rope_layers=[1, 1, 0, 1])
    with pytest.raises(pruner.PrunerError, match="not llama.cpp's smollm3 pattern"):
        export_gguf(shortened, tmp_path / "g.gguf", tokenizer=tiny_bpe_tokenizer())
    assert list(tmp_path.iterdir()) == []


def test_add_bos_token_follows_what_the_tokenizer_does(tmp_path):
    import gguf
    from tokenizers.processors import TemplateProcessing

    plain = tiny_bpe_tokenizer()
    with_bos = tiny_bpe_tokenizer()
    with_bos.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A",
                                                                   special_tokens=[("<s>", with_bos.bos_token_id)])
    for name, tok, expected in (("plain", plain, False), ("bos", with_bos, True)):
        path = export_gguf(_tiny(), tmp_path / f"{name}.gguf", dtype="f32", tokenizer=tok)
        field = gguf.GGUFReader(str(path)).fields["tokenizer.ggml.add_bos_token"]
        assert bool(field.parts[field.data[0]][0]) is expected, name
