"""Where the benchmarks read real text: ``../shared/data`` beside the repository, with the
package's offline stand-ins where it is absent (as on a user's machine)."""

from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def calibration_source() -> str:
    """The Gutenberg novels (the paper's BookCorpus stand-in), else the builtin text."""
    return str(DATA / "gutenberg") if (DATA / "gutenberg").is_dir() else "builtin"


def wikitext2_rows() -> list[str]:
    """WikiText-2 raw test rows (the paper's perplexity set), else the builtin held-out rows."""
    from pruner.data import eval_text_rows, HELDOUT

    wiki = DATA / "wikitext2_raw" / "wiki.test.raw"
    return eval_text_rows(str(wiki) if wiki.is_file() else HELDOUT)
