"""pruner: structural pruning of LLaMA-class causal LMs (LLM-Pruner) for PyTorch / Lightning."""
__version__ = "0.1.0"
