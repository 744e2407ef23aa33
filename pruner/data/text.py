"""Text and instruction data for pruning: calibration windows, Alpaca records, WikiText-2 rows.

Framework-agnostic (no Lightning): the Lightning data module in ``pruner.lightning_modules.data``
is a thin layer over these functions.

A *source* is one of
  * ``"builtin"``: English prose that ships with Python (stdlib docstrings and Python's
    LICENSE), so the default recipe needs neither network nor ``../shared``;
  * a local file or a folder of ``.txt`` files (for example ``../shared/data/gutenberg``);
  * a Hugging Face hub dataset name (``"bookcorpus"``, ``"yahma/alpaca-cleaned"``,
    ``"wikitext-2-raw-v1"``), read with ``datasets`` (needs internet).

Example:
    >>> from pruner.data import builtin_text
    >>> len(builtin_text()) > 100_000
    True
"""

from __future__ import annotations

import ast
import os
import random
import sysconfig
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import torch

from ..errors import PrunerError
from .hub import load_hub_dataset
from .windows import resolve_protocol, with_bos

BUILTIN = "builtin"
IGNORE_INDEX = -100  # the label value that torch's cross entropy (and HF losses) skip

# Prose-heavy stdlib modules, in a fixed order so that builtin calibration is reproducible for a
# given Python version. Missing files (modules move between versions) are skipped.
_BUILTIN_MODULES = (
    "argparse.py", "textwrap.py", "functools.py", "pathlib.py", "dataclasses.py", "typing.py",
    "inspect.py", "difflib.py", "heapq.py", "random.py", "statistics.py", "fractions.py",
    "_pydecimal.py", "calendar.py", "logging/__init__.py", "unittest/case.py", "json/__init__.py",
    "collections/__init__.py", "email/message.py", "http/client.py", "threading.py",
    "subprocess.py", "shutil.py", "tarfile.py", "zipfile.py", "zipfile/__init__.py", "pickle.py",
    "csv.py", "string.py", "enum.py", "contextlib.py", "doctest.py", "asyncio/tasks.py",
)

# Held-out prose for offline validation ("builtin-heldout"): other stdlib modules than above, so
# perplexity on it is not measured on the calibration or recovery text.
_HELDOUT_MODULES = (
    "datetime.py", "_pydatetime.py", "optparse.py", "configparser.py", "traceback.py", "tokenize.py",
    "pprint.py", "queue.py", "sched.py", "locale.py", "gettext.py", "smtplib.py", "ftplib.py",
    "imaplib.py", "selectors.py", "socket.py", "tempfile.py", "glob.py", "fnmatch.py", "bisect.py",
)
HELDOUT = "builtin-heldout"

# ----------------------------------------------------------------------------- sources


# Far longer than any hub dataset name: a source this long that is no path is text, not a name.
_LONGEST_NAME = 1024


def looks_like_path(source: str) -> bool:
    """Hub names are ``name`` or ``org/name``; anything else that does not exist is a typo'd
    path, which must fail as a missing file rather than as an obscure hub lookup."""
    return (
        source.startswith((".", "/", "~"))
        or source.count("/") > 1
        or Path(source).suffix in {".txt", ".json", ".jsonl", ".raw", ".md"}
    )


def local_path(source: str, what: str, instead: str = "an existing file or a hub dataset name") -> Path | None:
    """The existing local path for ``source``, None for a hub name; raises for a missing path, and
    for the text itself passed where its name belongs (a newline, or longer than any hub name and no path)."""
    def text_instead() -> PrunerError:
        return PrunerError(f"{what}: got {len(source)} characters of text where a file, folder or dataset "
                           f"name belongs; pass {instead}")

    if "\n" in source:
        raise text_instead()
    path = Path(source).expanduser()
    try:
        exists = path.exists()
    except OSError as err:  # e.g. a name longer than the filesystem allows
        if len(source) > _LONGEST_NAME:
            raise text_instead() from err
        raise PrunerError(f"{what}: {source[:80]!r} is not a usable path ({err.strerror}); pass {instead}") from err
    if exists:
        return path
    if looks_like_path(source):
        raise FileNotFoundError(
            f"{what} not found: {source} (relative paths are resolved from the current "
            f"directory {os.getcwd()}); pass {instead}"
        )
    if len(source) > _LONGEST_NAME:
        raise text_instead()
    return None


def read_text_file(path: Path, what: str) -> str:
    """A text file's contents, refused when it is not text: NUL bytes (a binary file), or more
    than 1 % of its bytes not UTF-8 (a few stray bytes are replaced, as before).

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "model.bin"; _ = path.write_bytes(bytes(range(256)) * 4)
        >>> read_text_file(path, "calibration text")
        Traceback (most recent call last):
        ...
        pruner.errors.PrunerError: calibration text ... is not text (it holds NUL bytes: a binary file?): pass a text file
    """
    raw = path.read_bytes()
    if b"\x00" in raw[:1 << 20]:
        raise PrunerError(f"{what} {path} is not text (it holds NUL bytes: a binary file?): pass a text file")
    text = raw.decode("utf-8", errors="replace")
    bad = text.count("\ufffd")
    if bad > max(16, len(text) // 100):
        raise PrunerError(f"{what} {path} is not UTF-8 text ({bad:,} bytes are not UTF-8): pass a UTF-8 text file")
    return text


@lru_cache(maxsize=1)
def builtin_text() -> str:
    """English prose shipped with Python: docstrings of a fixed list of stdlib modules (read with
    ``ast``, nothing is imported) followed by Python's LICENSE text.

    Example:
        >>> "Python Software Foundation" in builtin_text()
        True
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts = _docstrings(stdlib, _BUILTIN_MODULES)
    license_file = stdlib / "LICENSE.txt"
    if license_file.is_file():
        parts.append(license_file.read_text(encoding="utf-8", errors="replace"))
    if not parts:
        raise PrunerError(
            f"no builtin text found under {stdlib} (a stripped Python install?); pass a local "
            "text file or folder as the calibration source instead"
        )
    return "\n\n".join(parts)


@lru_cache(maxsize=1)
def builtin_heldout_rows() -> list[str]:
    """Held-out prose for offline validation (``val_source: builtin-heldout``): docstrings of
    stdlib modules that :func:`builtin_text` does not read, one row per docstring.

    Example:
        >>> rows = builtin_heldout_rows()
        >>> len(rows) > 100, any(row in builtin_text() for row in rows)
        (True, False)
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    rows = _docstrings(stdlib, _HELDOUT_MODULES)
    if not rows:
        raise PrunerError(f"no held-out builtin text found under {stdlib} (a stripped Python install?); "
                          "pass a local evaluation file such as wiki.test.raw as val_source instead")
    return rows


def _docstrings(stdlib: Path, modules: Sequence[str]) -> list[str]:
    """Docstrings longer than 80 characters of ``modules`` (paths under ``stdlib``), in order."""
    parts: list[str] = []
    for rel in modules:
        file = stdlib / rel
        if not file.is_file():
            continue
        try:
            tree = ast.parse(file.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        nodes = [tree] + [
            n for n in ast.walk(tree)
            if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        ]
        parts.extend(doc for n in nodes if (doc := ast.get_docstring(n)) and len(doc) > 80)
    return parts


def read_texts(source: str) -> list[str]:
    """Documents of a calibration source: ``"builtin"``, a ``.txt``/text file, a folder of
    ``.txt`` files (sorted by name) or a hub dataset with a ``text`` column (first 20,000 rows
    of a seeded shuffle of its train split, streamed).

    Example:
        >>> docs = read_texts("builtin")
        >>> len(docs)
        1
    """
    if source == BUILTIN:
        return [builtin_text()]
    if not source.strip():
        raise PrunerError("the calibration source is an empty string: give 'builtin', a .txt file or folder, or a "
                          "hub dataset name")
    path = local_path(source, "calibration text",
                       "an existing .txt file or folder, 'builtin', a hub dataset name, or the documents as a "
                       "list of strings")
    if path is None:
        stream = load_hub_dataset(source, "train", streaming=True).shuffle(seed=0, buffer_size=10_000)
        # Hub corpora such as BookCorpus are one sentence per row: join rows into documents.
        rows = [r["text"] for r, _ in zip(stream, range(20_000)) if r.get("text")]
        return ["\n".join(rows[i : i + 200]) for i in range(0, len(rows), 200)]
    files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
    if not files:
        raise PrunerError(f"folder {path} has no .txt files: pass a folder of .txt files or one file")
    texts = [read_text_file(f, "calibration text") for f in files]
    return [t for t in texts if t.strip()]


# ----------------------------------------------------------------------------- calibration


def _tokenize_long(text: str, tokenizer, chunk_chars: int = 4000) -> list[int]:
    """Token ids of a long text without special tokens. Tokenized in paragraph-aligned chunks so
    that no single call exceeds the tokenizer's ``model_max_length`` (which only warns, noisily)
    and a fast tokenizer can batch them."""
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    for i, para in enumerate(text.split("\n\n")):
        piece = para if i == 0 else "\n\n" + para  # "".join(chunks) == text: nothing lost
        if current and size + len(piece) > chunk_chars:
            chunks.append("".join(current))
            current, size = [], 0
        current.append(piece)
        size += len(piece)
    if current:
        chunks.append("".join(current))
    ids: list[int] = []
    for start in range(0, len(chunks), 256):
        batch = tokenizer(chunks[start : start + 256], add_special_tokens=False)["input_ids"]
        for piece in batch:
            ids.extend(piece)
    return ids


def calibration_samples(
    source: str | Sequence[str],
    tokenizer,
    num_samples: int = 10,
    seq_len: int = 64,
    seed: int = 0,
    protocol: str = "auto",
) -> torch.Tensor:
    """``num_samples`` random windows of ``seq_len`` tokens from ``source`` (LLM-Pruner: 10
    windows of 64 tokens from BookCorpus), as a ``LongTensor (num_samples, seq_len)``; under the
    ``"bos"`` window protocol (``"auto"``: when the tokenizer adds a BOS token) each window is
    the tokenizer's BOS and then the same ``seq_len`` text tokens, ``(num_samples, 1 + seq_len)``
    (:mod:`pruner.data.windows`).

    Each sample picks a document with probability proportional to its token count, then a
    uniformly random start inside it, from ``random.Random(seed)``: the same source, tokenizer
    and seed give the same tensor. ``source`` may also be a list of strings (the documents).

    Example:
        >>> from transformers import AutoTokenizer  # doctest: +SKIP
        >>> tok = AutoTokenizer.from_pretrained("gpt2")  # doctest: +SKIP
        >>> calibration_samples("builtin", tok).shape  # doctest: +SKIP
        torch.Size([10, 64])
    """
    from ..checks import check_int

    check_int("num_samples", num_samples, 1, fix="pruning needs at least 1 calibration sample (the paper: 10)")
    check_int("seq_len", seq_len, 2, fix="a calibration window needs at least 2 tokens (the paper: 64)")
    check_int("seed", seed, 0)
    _, bos = resolve_protocol(tokenizer, protocol)
    if not isinstance(source, str) and not (isinstance(source, Sequence) and all(isinstance(d, str) for d in source)):
        raise PrunerError(f"calibration source must be 'builtin', a file or folder path, a hub name or a list of "
                          f"texts, got {type(source).__name__}")
    docs = read_texts(source) if isinstance(source, str) else list(source)
    token_docs = [ids for d in docs if len(ids := _tokenize_long(d, tokenizer)) >= seq_len]
    if not token_docs:
        longest = max((len(_tokenize_long(d, tokenizer)) for d in docs), default=0)
        raise PrunerError(
            f"calibration source {source if isinstance(source, str) else '<texts>'!r} has no "
            f"document of at least seq_len={seq_len} tokens (longest: {longest}); use a longer "
            "text or a smaller seq_len"
        )
    rng = random.Random(seed)
    weights = [len(ids) - seq_len + 1 for ids in token_docs]  # number of windows per document
    samples = []
    for _ in range(num_samples):
        ids = rng.choices(token_docs, weights=weights)[0]
        start = rng.randrange(len(ids) - seq_len + 1)
        samples.append(ids[start : start + seq_len])
    return with_bos(torch.tensor(samples, dtype=torch.long), bos)  # (num_samples, [1 +] seq_len)
