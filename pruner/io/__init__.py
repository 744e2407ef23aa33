"""Files in and out: pruned exports (safetensors + config + plan, atomically), models by name,
folder or GGUF, GGUF export for llama.cpp, and checkpoints read without running code.
"""

from .checkpoint import read_checkpoint
from .pretrained import check_export_target, is_pruner_export, load_pretrained, save_pretrained
from .models import find_causal_lm, load_model, load_tokenizer, resolve_model_source
from .gguf import export_gguf

__all__ = ["check_export_target", "export_gguf", "find_causal_lm", "is_pruner_export", "load_model",
           "load_pretrained", "load_tokenizer", "read_checkpoint", "resolve_model_source", "save_pretrained"]
