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
import json
import os
import random
import sysconfig
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from pruner.errors import PrunerError
from pruner.hub import HUB_ALIASES, load_hub_dataset

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

ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)



# ----------------------------------------------------------------------------- sources


# Far longer than any hub dataset name: a source this long that is no path is text, not a name.
_LONGEST_NAME = 1024


def _looks_like_path(source: str) -> bool:
    """Hub names are ``name`` or ``org/name``; anything else that does not exist is a typo'd
    path, which must fail as a missing file rather than as an obscure hub lookup."""
    return (
        source.startswith((".", "/", "~"))
        or source.count("/") > 1
        or Path(source).suffix in {".txt", ".json", ".jsonl", ".raw", ".md"}
    )


def _local_path(source: str, what: str, instead: str = "an existing file or a hub dataset name") -> Path | None:
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
    if _looks_like_path(source):
        raise FileNotFoundError(
            f"{what} not found: {source} (relative paths are resolved from the current "
            f"directory {os.getcwd()}); pass {instead}"
        )
    if len(source) > _LONGEST_NAME:
        raise text_instead()
    return None


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
    path = _local_path(source, "calibration text",
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
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
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
) -> torch.Tensor:
    """``num_samples`` random windows of ``seq_len`` tokens from ``source`` (LLM-Pruner: 10
    windows of 64 tokens from BookCorpus), as a ``LongTensor (num_samples, seq_len)``.

    Each sample picks a document with probability proportional to its token count, then a
    uniformly random start inside it, from ``random.Random(seed)``: the same source, tokenizer
    and seed give the same tensor. ``source`` may also be a list of strings (the documents).

    Example:
        >>> from transformers import AutoTokenizer  # doctest: +SKIP
        >>> tok = AutoTokenizer.from_pretrained("gpt2")  # doctest: +SKIP
        >>> calibration_samples("builtin", tok).shape  # doctest: +SKIP
        torch.Size([10, 64])
    """
    from .checks import check_int

    check_int("num_samples", num_samples, 1, fix="pruning needs at least 1 calibration sample (the paper: 10)")
    check_int("seq_len", seq_len, 2, fix="a calibration window needs at least 2 tokens (the paper: 64)")
    check_int("seed", seed, 0)
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
    return torch.tensor(samples, dtype=torch.long)


# ----------------------------------------------------------------------------- Alpaca


def alpaca_records(source: str, max_records: int | None = None) -> list[dict[str, str]]:
    """Alpaca-format records (``instruction``, optional ``input``, ``output``) from a local JSON
    list / JSON-lines file or a hub dataset (``"yahma/alpaca-cleaned"``, train split).

    Example:
        >>> recs = alpaca_records("../shared/data/alpaca/alpaca_5000.json")  # doctest: +SKIP
        >>> sorted(recs[0])  # doctest: +SKIP
        ['input', 'instruction', 'output']
    """
    path = _local_path(source, "Alpaca data file",
                       "an existing JSON list of records or 'yahma/alpaca-cleaned' (hub)")
    if path is None:
        records: Iterable[Any] = load_hub_dataset(source, "train")
    elif path.is_dir():
        raise PrunerError(f"{path} is a folder: pass the Alpaca JSON file itself")
    else:
        text = path.read_text(encoding="utf-8")
        try:
            records = (
                [json.loads(line) for line in text.splitlines() if line.strip()]
                if path.suffix == ".jsonl"
                else json.loads(text)
            )
        except json.JSONDecodeError as err:
            raise PrunerError(f"{path} is not valid JSON ({err}): expected a list of records") from err
        if not isinstance(records, list):
            raise PrunerError(f"{path} holds a JSON {type(records).__name__}: expected a list of records")
    out: list[dict[str, str]] = []
    for i, rec in enumerate(records):
        if max_records is not None and i >= max_records:
            break
        if not isinstance(rec, Mapping):
            raise PrunerError(f"Alpaca record {i} of {source} is a {type(rec).__name__}, not an object")
        for field in ("instruction", "output"):
            if not isinstance(rec.get(field), str):
                raise PrunerError(
                    f"Alpaca record {i} of {source} has no string field {field!r}: every record "
                    "needs 'instruction' and 'output' (and optionally 'input')"
                )
        out.append({"instruction": rec["instruction"], "input": rec.get("input") or "",
                    "output": rec["output"]})
    if not out:
        raise PrunerError(f"{source} has no Alpaca records: pass a non-empty list of records")
    return out


def format_alpaca(record: Mapping[str, str], include_response: bool = True) -> str:
    """The Alpaca prompt (the variant with ``### Input:`` when the record has a non-empty
    ``input``), followed by the ``output`` unless ``include_response=False``.

    Example:
        >>> print(format_alpaca({"instruction": "Say hi.", "output": "Hi!"}))  # doctest: +NORMALIZE_WHITESPACE
        Below is an instruction that describes a task. Write a response that appropriately
        completes the request.
        <BLANKLINE>
        ### Instruction:
        Say hi.
        <BLANKLINE>
        ### Response:
        Hi!
    """
    template = ALPACA_PROMPT_INPUT if record.get("input") else ALPACA_PROMPT_NO_INPUT
    prompt = template.format(instruction=record["instruction"], input=record.get("input", ""))
    return prompt + record["output"] if include_response else prompt


def tokenize_instruction(
    record: Mapping[str, str], tokenizer, cutoff_len: int = 256, add_eos: bool = True
) -> dict[str, list[int]]:
    """``input_ids``, ``attention_mask`` and ``labels`` of one Alpaca record, truncated to
    ``cutoff_len`` tokens, with an EOS appended when it fits, and the prompt tokens' labels set
    to -100 so that only the response is learned (alpaca-lora / LLM-Pruner with
    ``train_on_inputs=False``).

    Example:
        >>> out = tokenize_instruction({"instruction": "Say hi.", "output": "Hi!"}, tok)  # doctest: +SKIP
        >>> out["labels"][:3]  # doctest: +SKIP
        [-100, -100, -100]
    """
    if cutoff_len < 2:
        raise PrunerError(f"cutoff_len={cutoff_len}: needs at least 2 tokens")
    full = tokenizer(format_alpaca(record), truncation=True, max_length=cutoff_len)["input_ids"]
    eos = tokenizer.eos_token_id
    if add_eos and eos is not None and len(full) < cutoff_len and (not full or full[-1] != eos):
        full = full + [eos]
    prompt = tokenizer(format_alpaca(record, include_response=False), truncation=True,
                       max_length=cutoff_len)["input_ids"]
    n_prompt = min(len(prompt), len(full))
    labels = [IGNORE_INDEX] * n_prompt + full[n_prompt:]
    return {"input_ids": full, "attention_mask": [1] * len(full), "labels": labels}


# ----------------------------------------------------------------------------- WikiText-2


def eval_text_rows(source: str) -> list[str]:
    """WikiText-2 raw test rows in the Hugging Face layout, from a local ``wiki.test.raw`` (each
    line becomes ``line + "\\n"`` if it is not blank, else ``""``) or the hub
    (``"wikitext-2-raw-v1"``); or ``"builtin-heldout"`` (:func:`builtin_heldout_rows`,
    offline). LLM-Pruner evaluates on ``"\\n\\n".join(rows)``. The reading is
    ``pruner.eval.perplexity.load_wikitext2_rows``: validation and evaluation see the same rows.

    Example:
        >>> rows = eval_text_rows("../shared/data/wikitext2_raw/wiki.test.raw")  # doctest: +SKIP
        >>> len(rows)  # doctest: +SKIP
        4358
    """
    from pruner.eval.perplexity import load_wikitext2_rows

    if source == HELDOUT:
        return builtin_heldout_rows()
    if source in HUB_ALIASES and HUB_ALIASES[source].path == "wikitext":
        try:
            return load_wikitext2_rows(None)
        except Exception as err:
            raise PrunerError(
                f"could not load {source!r} from the hub ({type(err).__name__}: {err}); pass a "
                "local wiki.test.raw (e.g. ../shared/data/wikitext2_raw/wiki.test.raw) instead"
            ) from err
    path = _local_path(source, "evaluation text",
                       "an existing wiki.test.raw, 'builtin-heldout' or 'wikitext-2-raw-v1' (hub)")
    if path is None or path.is_dir():
        raise PrunerError(
            f"evaluation source {source!r} is neither a text file nor 'wikitext-2-raw-v1': pass "
            "a raw text file such as wiki.test.raw, or 'wikitext-2-raw-v1' (hub)"
        )
    return load_wikitext2_rows(path)


def eval_windows(rows: Sequence[str], tokenizer, seq_len: int = 128) -> torch.Tensor:
    """Non-overlapping ``seq_len``-token windows of ``"\\n\\n".join(rows)`` tokenized as
    ``pruner.eval.perplexity`` does (LLM-Pruner's protocol; the incomplete tail is dropped),
    ``LongTensor (W, seq_len)``.

    Example:
        >>> eval_windows(["a b c " * 100], tok, seq_len=16).shape[1]  # doctest: +SKIP
        16
    """
    from pruner.eval.perplexity import tokenize_rows

    ids = tokenize_rows(tokenizer, list(rows))
    n = ids.numel() // seq_len
    if n == 0:
        raise PrunerError(
            f"evaluation text has {ids.numel()} tokens, fewer than one window of {seq_len}: use "
            "a longer text or a smaller window"
        )
    return ids[: n * seq_len].view(n, seq_len)


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """The tokenizer of a model name/folder/GGUF (same resolution as ``pruner.models``), without
    loading the weights; sets ``pad_token`` to EOS where the model has none. Runs no code from
    the folder unless ``trust_remote_code``.

    Example:
        >>> tok = load_tokenizer("smollm2")  # doctest: +SKIP
    """
    from transformers import AutoTokenizer

    from pruner.models import resolve_model_source

    source, gguf_file = resolve_model_source(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code,
                                            **({"gguf_file": gguf_file} if gguf_file else {}))
    except (OSError, ValueError) as err:
        if not Path(source).is_dir():
            raise
        raise PrunerError(f"could not load a tokenizer from {source} ({str(err).splitlines()[0]}): the folder has no "
                          "usable tokenizer files; export it with save_pretrained(..., tokenizer=tok), or name "
                          "another folder for the tokenizer (data.tokenizer)") from err
    if tok.pad_token_id is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token  # padded positions are masked from loss and attention
    return tok
