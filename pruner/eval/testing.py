"""Tiny offline models and tokenizers for the evaluation tests and docstring examples.

Nothing here touches the network: the tokenizer is a word-level ``tokenizers`` model trained
on a few sentences, and the model is a randomly initialised ``LlamaForCausalLM``.

Example:
    >>> from pruner.eval.testing import tiny_llama, tiny_tokenizer
    >>> tok = tiny_tokenizer()
    >>> model = tiny_llama(vocab_size=len(tok))
    >>> model.config.num_hidden_layers
    2
"""

from __future__ import annotations

import torch

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
    raw.train_from_iterator(
        corpus or CORPUS, trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS)
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=raw,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        model_max_length=512,
    )


def tiny_llama(
    vocab_size: int = 64,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 96,
    seed: int = 0,
    tie_word_embeddings: bool = False,
):
    """A random ``LlamaForCausalLM`` in eval mode (float32, eager attention, head_dim 16)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=512,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=3,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # Larger-than-default weights so that the random model has clearly non-uniform predictions
    # (otherwise every choice gets nearly the same likelihood and accuracy ties are common).
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    return model.eval()


def shrink_layer(model, layer: int, keep_heads: int, keep_kv_heads: int, keep_mlp: int) -> None:
    """Slices one decoder layer in place to fewer heads / MLP channels, as structural pruning
    would, so that tests can check code that must read widths from modules, not from config."""
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
