"""Alpaca-format instruction data (``instruction``, optional ``input``, ``output``): records from
a local JSON file or the hub, the Alpaca prompt, and tokenized examples whose prompt tokens are
not learned (alpaca-lora / LLM-Pruner with ``train_on_inputs=False``).

Example:
    >>> format_alpaca({"instruction": "Say hi.", "output": "Hi!"}).splitlines()[-2:]
    ['### Response:', 'Hi!']
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from ..errors import PrunerError
from .hub import load_hub_dataset
from .text import IGNORE_INDEX, local_path, read_text_file

ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


def alpaca_records(source: str, max_records: int | None = None) -> list[dict[str, str]]:
    """Alpaca-format records (``instruction``, optional ``input``, ``output``) from a local JSON
    list / JSON-lines file or a hub dataset (``"yahma/alpaca-cleaned"``, train split).

    Example:
        >>> recs = alpaca_records("../shared/data/alpaca/alpaca_5000.json")  # doctest: +SKIP
        >>> sorted(recs[0])  # doctest: +SKIP
        ['input', 'instruction', 'output']
    """
    path = local_path(source, "Alpaca data file",
                       "an existing JSON list of records or 'yahma/alpaca-cleaned' (hub)")
    if path is None:
        records: Iterable[Any] = load_hub_dataset(source, "train")
    elif path.is_dir():
        raise PrunerError(f"{path} is a folder: pass the Alpaca JSON file itself")
    else:
        text = read_text_file(path, "Alpaca data file")
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
