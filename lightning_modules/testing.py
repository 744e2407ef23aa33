"""A tiny random LLaMA with an offline tokenizer, saved as a model folder, for tests and examples.

Example:
    >>> import tempfile
    >>> from pruner.lightning_modules.testing import save_tiny_llama
    >>> folder = save_tiny_llama(tempfile.mkdtemp())
    >>> sorted(p.name for p in folder.glob("*.json"))[:2]
    ['config.json', 'generation_config.json']
"""

from __future__ import annotations

from pathlib import Path

import torch


def save_tiny_llama(folder: str | Path, vocab_size: int = 320, seed: int = 0) -> Path:
    """Writes a 2-layer, 32-wide ``LlamaForCausalLM`` (4 query / 2 KV heads, MLP 64) and a
    byte-level BPE tokenizer trained on ``pruner.data.builtin_text()`` (no hub, no network) to
    ``folder``, which then loads with ``pruner.models.load_model(folder)``. Byte-level: any text
    tokenizes without unknown tokens, so Alpaca prompts and WikiText work too."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from pruner.data import builtin_text

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
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder
