"""Evaluation: perplexity (paper protocol), zero-shot accuracy (lm-eval), efficiency, reports.

Example:
    >>> from pruner.eval import perplexity, load_wikitext2_rows  # doctest: +SKIP
    >>> perplexity(model, tokenizer, load_wikitext2_rows("wiki.test.raw"), max_tokens=32768)  # doctest: +SKIP
"""

from .perplexity import load_ptb_rows, load_wikitext2_rows, perplexity  # noqa: F401  (the function shadows the module name on purpose: pruner.eval.perplexity(...))
