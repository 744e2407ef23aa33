"""Hugging Face hub datasets the recipes name, loaded with the ``datasets`` we allow (>= 3).

``datasets`` 4.0 stopped running dataset loading scripts ("Dataset scripts are no longer
supported, but found bookcorpus.py", huggingface/datasets#7693). Script datasets such as
BookCorpus (``bookcorpus/bookcorpus``, LLM-Pruner's calibration set) and the Penn Treebank
(``ptb_text_only``) still load from the Parquet copy that the hub's dataset viewer wrote to the
repository's ``refs/convert/parquet`` branch (one folder per config, ``{config}/{split}/*.parquet``
or ``{config}/partial-{split}/*.parquet`` for the largest). So a load that fails on a script is
retried there, with the config as the data folder. Datasets stored as data files
(``yahma/alpaca-cleaned``: one JSON file; ``wikitext``: Parquet) load directly.

Example:
    >>> HUB_ALIASES["bookcorpus"]
    HubSource(path='bookcorpus/bookcorpus', config=None, parquet_config='plain_text')
    >>> rows = load_hub_dataset("bookcorpus", "train", streaming=True)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import NamedTuple

from ..errors import PrunerError

PARQUET_REVISION = "refs/convert/parquet"


class HubSource(NamedTuple):
    path: str  # the hub repository
    config: str | None  # the config name load_dataset takes (None: the default)
    parquet_config: str | None  # its folder on refs/convert/parquet (None: the same as config)


HUB_ALIASES: dict[str, HubSource] = {  # the names users and recipes type
    "bookcorpus": HubSource("bookcorpus/bookcorpus", None, "plain_text"),  # a script dataset
    "alpaca-cleaned": HubSource("yahma/alpaca-cleaned", None, None),  # one JSON file
    "wikitext-2-raw-v1": HubSource("wikitext", "wikitext-2-raw-v1", None),  # Parquet files
    "wikitext2": HubSource("wikitext", "wikitext-2-raw-v1", None),
    "ptb": HubSource("ptb_text_only", "penn_treebank", None),  # a script dataset
}


def _is_script_error(err: Exception) -> bool:
    """datasets >= 4 on a repository with a loading script (its message names the script)."""
    text = str(err).lower()
    return "script" in text and ("no longer supported" in text or "not supported" in text)


def load_hub_dataset(name: str, split: str, streaming: bool = False):
    """``datasets.load_dataset`` of an alias in :data:`HUB_ALIASES` or any ``org/name``; a
    repository whose loading script the installed ``datasets`` refuses is read from its
    ``refs/convert/parquet`` branch instead. Raises :class:`PrunerError` naming the fixes."""
    import datasets

    source = HUB_ALIASES.get(name, HubSource(name, None, None))
    try:
        return datasets.load_dataset(source.path, source.config, split=split, streaming=streaming)
    except Exception as err:  # noqa: BLE001 - every failure gets the same advice below
        first = err
    if _is_script_error(first):
        folder = source.parquet_config or source.config or "default"
        try:
            return datasets.load_dataset(source.path, revision=PARQUET_REVISION, data_dir=folder, split=split,
                                         streaming=streaming)
        except Exception as err:  # noqa: BLE001
            raise PrunerError(
                f"hub dataset {name!r} ({source.path}) has a loading script, which datasets "
                f"{getattr(datasets, '__version__', '')} no longer runs, and its Parquet conversion ({PARQUET_REVISION}, folder "
                f"{folder!r}) did not load either ({type(err).__name__}: {err}). Fixes: pip install 'datasets<4' "
                "(runs the script), or pass a local text/JSON file or 'builtin' instead"
            ) from err
    raise PrunerError(
        f"could not load hub dataset {name!r} ({type(first).__name__}: {first}); check the name "
        "and your internet connection, or pass a local file/folder or 'builtin'"
    ) from first
