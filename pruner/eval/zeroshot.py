"""Zero-shot multiple-choice accuracy (``acc`` and ``acc_norm``) on local JSONL files or hub tasks.

Local files hold one item per line: ``{"query": str, "choices": [str, ...], "gold": int}`` (the
llm-foundry layout of ``shared/data/zeroshot/{piqa,arc_easy,boolq}.jsonl``). Each choice is
scored as a continuation of the prompt, as lm-eval's own piqa / arc / boolq tasks do::

    context      = query.rstrip() + "\\nAnswer:"
    continuation = " " + choice

* ``acc``: the choice with the highest summed log-likelihood of its continuation tokens wins;
* ``acc_norm``: the same log-likelihood divided by the choice's length in characters
  (``len(choice)``, lm-eval's definition).

The default backend is the released ``lm-eval`` package (``HFLM`` around the in-memory model, the
local file as an inline task config); without it, a built-in scorer with the same definitions
and the same context/continuation tokenization is used (``backend="builtin"``).

Example:
    >>> from pruner.eval.zeroshot import evaluate_zeroshot  # doctest: +SKIP
    >>> evaluate_zeroshot(model, tokenizer, ["piqa"], data_dir="../shared/data/zeroshot",
    ...                   limit=100)  # doctest: +SKIP
    {'piqa': {'acc': 0.64, 'acc_norm': 0.63, 'n': 100, 'backend': 'lm-eval 0.4.13', ...}}
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import json
import logging
import time
from pathlib import Path

import torch

LOCAL_TASKS = ("piqa", "arc_easy", "boolq")
HUB_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
CONTEXT_SUFFIX = "\nAnswer:"
CHOICE_PREFIX = " "


def lm_eval_version() -> str | None:
    """The installed ``lm-eval`` version, or None when it is not installed."""
    try:
        return importlib.metadata.version("lm-eval")
    except importlib.metadata.PackageNotFoundError:
        return None


def load_items(path: str | Path, limit: int | None = None) -> list[dict]:
    """The first ``limit`` items (all when None) of a ``{"query","choices","gold"}`` JSONL file;
    every item is checked, and a bad one is named by file and line."""
    from pruner.errors import PrunerError

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"zero-shot task file not found: {path}")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise PrunerError(f"limit={limit!r} must be an integer >= 1 (the first N items), or None for all")
    items = []
    with open(path, encoding="utf-8", errors="strict") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise PrunerError(f"{where} is not valid JSON ({e.msg}): one JSON object per line, "
                                  '{"query": ..., "choices": [...], "gold": index}') from None
            choices = item.get("choices") if isinstance(item, dict) else None
            if not (isinstance(item, dict) and isinstance(item.get("query"), str) and isinstance(choices, list)
                    and len(choices) >= 2 and all(isinstance(c, str) for c in choices)
                    and isinstance(item.get("gold"), int) and not isinstance(item.get("gold"), bool)
                    and 0 <= item["gold"] < len(choices)):
                raise PrunerError(f"{where}: expected {{\"query\": str, \"choices\": [two or more str], \"gold\": "
                                  f"index into choices}}, got {line.strip()[:120]}")
            items.append(item)
            if limit is not None and len(items) >= limit:
                break
    if not items:
        raise PrunerError(f"{path} holds no items: one JSON object per line, "
                          '{"query": ..., "choices": [...], "gold": index}')
    return items


def make_request(query: str, choice: str) -> tuple[str, str]:
    """``(context, continuation)`` for one choice: the prompt format of this module's docstring."""
    return query.rstrip() + CONTEXT_SUFFIX, CHOICE_PREFIX + choice


def local_task_config(name: str, path: str | Path) -> dict:
    """An lm-eval task config (dict form of a task YAML) reading a local JSONL file."""
    return {
        "task": f"pruner_local_{name}",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(Path(path).resolve())}},
        "test_split": "test",
        "output_type": "multiple_choice",
        # Same strings as make_request: lm-eval puts target_delimiter (" ") before each choice.
        "doc_to_text": "{{query.rstrip()}}" + CONTEXT_SUFFIX,
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{gold}}",
        "target_delimiter": CHOICE_PREFIX,
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1.0},
    }


# --------------------------------------------------------------------------- built-in scorer


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation token ids, split as lm-eval does: encode the whole string and the
    context alone, the continuation is what follows the context's tokens (so merges across the
    boundary are attributed to the continuation). Trailing context spaces move to the
    continuation. Uses the tokenizer's default special tokens, like lm-eval's HFLM."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer(context + continuation)["input_ids"]
    ctx = tokenizer(context)["input_ids"]
    return ctx, whole[len(ctx) :]


@torch.no_grad()
def continuation_logprobs(
    model, pairs: list[tuple[list[int], list[int]]], batch_size: int = 8, progress: bool = False
) -> list[float]:
    """Summed log-probability of each continuation given its context (float64 sums).

    Pairs whose model input is identical (same context, one-token continuations such as BoolQ's
    " no" / " yes") share one forward pass, as lm-eval's logits cache does.
    """
    device = next(model.parameters()).device
    max_len = getattr(model.config, "max_position_embeddings", None) or 2048
    # The model sees context + continuation minus the last token (nothing is predicted after
    # it), left-truncated to the context window as lm-eval does.
    inputs: dict[tuple[int, ...], list[int]] = {}
    for i, (ctx, cont) in enumerate(pairs):
        inputs.setdefault(tuple((ctx + cont)[-(max_len + 1) :][:-1]), []).append(i)
    # Longest first, so that each batch pads little.
    keys = sorted(inputs, key=len, reverse=True)
    batches = [keys[i : i + batch_size] for i in range(0, len(keys), batch_size)]
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="log-likelihoods", unit="batch")
    out = [0.0] * len(pairs)
    for batch in batches:
        width = len(batch[0])
        # Left padding puts every sequence's last tokens in the same columns, so that only the
        # last `keep` positions need logits (the LM head is a large share of a small model's
        # compute); position ids restart at 0 after the padding.
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, seq in enumerate(batch):
            ids[row, width - len(seq) :] = torch.tensor(seq)
            mask[row, width - len(seq) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        keep = max(len(pairs[i][1]) for seq in batch for i in inputs[seq])
        logits = model(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            position_ids=positions.to(device),
            use_cache=False,
            logits_to_keep=keep,
        ).logits  # (batch, keep, vocab): predictions for the last `keep` target tokens
        logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
        for row, seq in enumerate(batch):
            for i in inputs[seq]:
                cont = torch.tensor(pairs[i][1])
                lp = logprobs[row, keep - len(cont) :].gather(-1, cont[:, None])
                out[i] = lp.double().sum().item()
    return out


def score_items(
    model, tokenizer, items: list[dict], batch_size: int = 8, progress: bool = False
) -> dict:
    """Built-in scorer: ``{"acc", "acc_norm", "n"}`` for a list of multiple-choice items."""
    pairs, owners = [], []
    for k, item in enumerate(items):
        for choice in item["choices"]:
            pairs.append(encode_pair(tokenizer, *make_request(item["query"], choice)))
            owners.append(k)
    lls = continuation_logprobs(model, pairs, batch_size, progress)
    per_item: list[list[float]] = [[] for _ in items]
    for k, ll in zip(owners, lls):
        per_item[k].append(ll)
    acc = acc_norm = 0
    for item, ll in zip(items, per_item):
        norm = [x / len(c) for x, c in zip(ll, item["choices"])]
        # max() over indices picks the first maximum on ties, like numpy.argmax in lm-eval.
        acc += max(range(len(ll)), key=ll.__getitem__) == item["gold"]
        acc_norm += max(range(len(norm)), key=norm.__getitem__) == item["gold"]
    n = len(items)
    return {"acc": acc / n, "acc_norm": acc_norm / n, "n": n}


# --------------------------------------------------------------------------- lm-eval backend


@contextlib.contextmanager
def _quiet(progress: bool):
    """Silences lm-eval's INFO logging and, unless ``progress``, its tqdm bars (which write to
    ``sys.stderr`` at creation and cannot be switched off through ``simple_evaluate``)."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        if progress:
            yield
        else:
            with contextlib.redirect_stderr(io.StringIO()):
                yield
    finally:
        logger.setLevel(level)


def _lm_eval_run(model, tokenizer, tasks: list, hub: bool, limit, batch_size, progress) -> tuple[dict, dict]:
    """``simple_evaluate`` on an in-memory model: (results per task, sample counts per task)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    with _quiet(progress):
        device = str(next(model.parameters()).device)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
        # Indexing lm-eval's ~10k bundled task YAMLs takes seconds: skip it for inline configs.
        manager = TaskManager(include_defaults=hub)
        out = simple_evaluate(
            model=lm,
            tasks=tasks,
            limit=limit,
            bootstrap_iters=0,
            log_samples=False,
            task_manager=manager,
        )
    return out["results"], out.get("n-samples", {})


def evaluate_zeroshot(
    model,
    tokenizer,
    tasks: list[str] | tuple[str, ...] = LOCAL_TASKS,
    data_dir: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
    backend: str = "auto",
) -> dict[str, dict]:
    """Zero-shot accuracy per task: ``{task: {"acc", "acc_norm", "n", "backend", "source",
    "seconds"}}``.

    ``data_dir``: folder with ``<task>.jsonl`` files; None evaluates lm-eval's hub tasks of the
    same names (needs internet and lm-eval). ``limit``: the first N items of each task.
    ``backend``: ``"lm-eval"``, ``"builtin"`` or ``"auto"`` (lm-eval when installed).
    """
    version = lm_eval_version()
    if backend == "auto":
        backend = "lm-eval" if version else "builtin"
    if backend not in ("lm-eval", "builtin"):
        raise ValueError(f"unknown backend {backend!r}: use 'lm-eval', 'builtin' or 'auto'")
    if backend == "lm-eval" and not version:
        raise ImportError("lm-eval is not installed: `pip install lm-eval` or use backend='builtin'")
    if data_dir is None and backend == "builtin":
        raise ValueError("hub tasks need the lm-eval backend; pass data_dir for local files")
    paths = {}
    if data_dir is not None:
        for name in tasks:
            paths[name] = Path(data_dir) / f"{name}.jsonl"
            if not paths[name].is_file():
                raise FileNotFoundError(f"zero-shot task file not found: {paths[name]}")

    was_training = model.training
    model.eval()
    results = {}
    try:
        for name in tasks:
            start = time.perf_counter()
            if backend == "builtin":
                row = score_items(model, tokenizer, load_items(paths[name], limit), batch_size, progress)
            else:
                task = local_task_config(name, paths[name]) if paths else name
                key = task["task"] if paths else name
                res, counts = _lm_eval_run(model, tokenizer, [task], not paths, limit, batch_size, progress)
                n = counts.get(key, {}).get("effective", res[key].get("sample_len"))
                row = {"acc": res[key]["acc,none"], "acc_norm": res[key].get("acc_norm,none"), "n": n}
            row["backend"] = f"lm-eval {version}" if backend == "lm-eval" else "builtin"
            row["source"] = str(paths[name]) if paths else f"hub:{name}"
            row["seconds"] = round(time.perf_counter() - start, 2)
            results[name] = row
    finally:
        model.train(was_training)
    return results
