"""Tiny random causal LMs of transformers' own classes, for exactness tests and examples.

Example:
    >>> model = tiny_causal_lm("phi3")
    >>> type(model).__name__, model.config.num_key_value_heads
    ('Phi3ForCausalLM', 2)
"""

from __future__ import annotations

import torch

ARCHITECTURES = ("llama", "llama_mha", "mistral", "qwen2", "glm", "phi3")


def tiny_causal_lm(arch: str = "llama", seed: int = 0, **overrides):
    """A randomly initialised 3-layer model: hidden 64, 4 query / 2 key-value heads of 16, MLP 96.

    ``llama_mha`` has 4 key/value heads (no GQA); ``qwen2`` has q/k/v biases; ``glm`` a fused
    gate_up_proj and partial rotary; ``phi3`` fused qkv_proj and gate_up_proj."""
    import transformers as tf

    classes = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "llama_mha": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM), "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "glm": (tf.GlmConfig, tf.GlmForCausalLM), "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM),
    }
    if arch not in classes:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {list(classes)}")
    kw = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=4 if arch == "llama_mha" else 2, head_dim=16, vocab_size=128,
              max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    kw.update(overrides)
    config_cls, model_cls = classes[arch]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kw))
    # random init leaves norms at 1 and biases at 0: perturb them so that tests can see slicing mistakes
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()
