"""Tiny random causal LMs of transformers' own classes and offline tokenizers, for exactness
tests, examples and benchmarks' dry runs. One factory, :func:`tiny_causal_lm`; the rest are
its uses (a word-level tokenizer, a saved model folder, a layer sliced by hand).

Example:
    >>> model = tiny_causal_lm("phi3")
    >>> type(model).__name__, model.config.num_key_value_heads
    ('Phi3ForCausalLM', 2)
"""

from __future__ import annotations

from pathlib import Path

import torch

ARCHITECTURES = ("llama", "llama_mha", "mistral", "qwen2", "glm", "phi3")
# every dense decoder family the family tests cover (tests/structure/test_families.py); the
# value: (config class, model class, config fields that differ from the common tiny shape)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"sliding_window": 4}),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"sliding_window": 4}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "glm": ("GlmConfig", "GlmForCausalLM", {}),
    "glm4": ("Glm4Config", "Glm4ForCausalLM", {}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "olmo3": ("Olmo3Config", "Olmo3ForCausalLM", {"sliding_window": 4}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {"embedding_multiplier": 2.0, "residual_multiplier": 0.5,
                                                         "attention_multiplier": 0.3, "logits_scaling": 2.0}),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", {}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {"num_key_value_heads": None}),
    "falcon": ("FalconConfig", "FalconForCausalLM", {"head_dim": None, "num_key_value_heads": None, "num_kv_heads": 2,
                                                     "new_decoder_architecture": True, "ffn_hidden_size": 96}),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", {}),
    "olmo": ("OlmoConfig", "OlmoForCausalLM", {}),
}


def _classes(arch: str):
    import transformers as tf

    classes = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "llama_mha": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM), "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "glm": (tf.GlmConfig, tf.GlmForCausalLM), "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM),
    }
    classes.update({name: (getattr(tf, c), getattr(tf, m)) for name, (c, m, _) in FAMILIES.items()
                    if name not in classes})
    if arch not in classes:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {list(classes)}")
    return classes[arch]


def tiny_causal_lm(arch: str = "llama", seed: int = 0, *, init_std: float | None = None, perturb_norms: bool = True,
                   attn_implementation: str | None = None, **overrides):
    """A randomly initialised model in eval mode; by default 3 layers, hidden 64, 4 query / 2
    key-value heads of 16, MLP 96, vocabulary 128 (``overrides`` change any config field).

    ``llama_mha`` has 4 key/value heads (no GQA); ``qwen2`` has q/k/v biases; ``glm`` a fused
    gate_up_proj and partial rotary; ``phi3`` fused qkv_proj and gate_up_proj. ``init_std``: the
    matrices drawn from N(0, init_std²) instead of the class's init (clearly non-uniform
    predictions). ``perturb_norms``: norms and biases moved off 1 and 0, so that tests see
    slicing mistakes."""
    config_cls, model_cls = _classes(arch)
    kw = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=4 if arch == "llama_mha" else 2, head_dim=16, vocab_size=128,
              max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    family = FAMILIES.get(arch, (None, None, {}))[2]
    kw.update(family)
    kw.update(overrides)
    lacks = {k for k, v in family.items() if v is None and k not in overrides}  # fields this family has not
    config = config_cls(**{k: v for k, v in kw.items() if k not in lacks})
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = model_cls(config)
    with torch.no_grad():
        for p in model.parameters():
            if init_std is not None and p.dim() == 2:
                p.normal_(0.0, init_std)
            elif perturb_norms and p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def tiny_llama(vocab_size: int = 64, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
               num_kv_heads: int = 2, intermediate_size: int = 96, seed: int = 0, tie_word_embeddings: bool = False):
    """A random 2-layer ``LlamaForCausalLM`` with N(0, 0.04) matrices (eager attention, head_dim
    ``hidden_size / num_heads``), for evaluation tests whose choices must not tie."""
    return tiny_causal_lm("llama", seed, init_std=0.2, perturb_norms=False, attn_implementation="eager",
                          vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                          num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, head_dim=None,
                          intermediate_size=intermediate_size, max_position_embeddings=512,
                          tie_word_embeddings=tie_word_embeddings, pad_token_id=1, bos_token_id=2, eos_token_id=3)


CORPUS = [
    "The cat sat on the mat and looked at the dog .",
    "A dog ran in the park while the sun was shining .",
    "Question : what is the capital of France ? Answer : Paris is the capital .",
    "Passage : water boils at one hundred degrees . Answer : yes no maybe",
    "Robots read books , birds sing songs , and rivers flow to the sea .",
    "one two three four five six seven eight nine ten",
]

SPECIAL_TOKENS = ["<unk>", "<pad>", "<s>", "</s>"]


def tiny_tokenizer(corpus: list[str] | None = None):
    """A ``PreTrainedTokenizerFast`` with a word-level vocabulary (whitespace + punctuation split).

    Word-level splitting means ``tokens(a + " " + b) == tokens(a) + tokens(b)``, which lets tests
    compute log-likelihoods of continuations by hand without tokenizer boundary effects.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(corpus or CORPUS, trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", model_max_length=512)


def save_tiny_llama(folder: str | Path, vocab_size: int = 320, seed: int = 0) -> Path:
    """Writes a 2-layer, 32-wide ``LlamaForCausalLM`` (4 query / 2 KV heads, MLP 64) and a
    byte-level BPE tokenizer trained on ``pruner.data.builtin_text()`` (no hub, no network) to
    ``folder``, which then loads with ``pruner.load_model(folder)``. Byte-level: any text
    tokenizes without unknown tokens, so Alpaca prompts and WikiText work too.

    Example:
        >>> import tempfile
        >>> folder = save_tiny_llama(tempfile.mkdtemp())
        >>> sorted(p.name for p in folder.glob("*.json"))[:2]
        ['config.json', 'generation_config.json']
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from .data import builtin_text

    folder = Path(folder)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    bpe.train_from_iterator([builtin_text()[:50_000]], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.save_pretrained(folder)
    model = tiny_causal_lm("llama", seed, perturb_norms=False, vocab_size=len(tok), hidden_size=32,
                           intermediate_size=64, num_hidden_layers=2, head_dim=None, max_position_embeddings=512,
                           pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                           eos_token_id=tok.eos_token_id)
    model.save_pretrained(folder)
    return folder


def shrink_layer(model, layer: int, keep_heads: int, keep_kv_heads: int, keep_mlp: int) -> None:
    """Slices one decoder layer of a LLaMA in place to fewer heads / MLP channels, as structural
    pruning would, so that tests can check code that must read widths from modules, not config."""
    from torch import nn

    block = model.model.layers[layer]
    attn, mlp = block.self_attn, block.mlp
    head_dim = attn.head_dim

    def cut(linear: nn.Linear, out: int | None = None, inp: int | None = None) -> nn.Linear:
        out = out or linear.out_features
        inp = inp or linear.in_features
        new = nn.Linear(inp, out, bias=linear.bias is not None)
        with torch.no_grad():
            new.weight.copy_(linear.weight[:out, :inp])
            if linear.bias is not None:
                new.bias.copy_(linear.bias[:out])
        return new

    attn.q_proj = cut(attn.q_proj, out=keep_heads * head_dim)
    attn.k_proj = cut(attn.k_proj, out=keep_kv_heads * head_dim)
    attn.v_proj = cut(attn.v_proj, out=keep_kv_heads * head_dim)
    attn.o_proj = cut(attn.o_proj, inp=keep_heads * head_dim)
    attn.num_key_value_groups = keep_heads // keep_kv_heads
    mlp.gate_proj = cut(mlp.gate_proj, out=keep_mlp)
    mlp.up_proj = cut(mlp.up_proj, out=keep_mlp)
    mlp.down_proj = cut(mlp.down_proj, inp=keep_mlp)
