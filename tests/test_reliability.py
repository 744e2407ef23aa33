"""Reliability: the bad-input matrix (every case fails early with a message naming the problem and
the fix, leaves every model it touched exactly as it was, and leaves no file behind), plus kill
during export, concurrent exports, permissions, code that must not run, rollback of a failed
surgery and determinism across processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch

import pruner
from pruner.data import calibration_samples
from pruner.errors import PlanMismatchError, PrunerError, UnsupportedArchitectureError
from pruner.testing import tiny_causal_lm

from .conftest import SUBPROCESS_TIMEOUT


def _batches(n: int = 2, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 120, (1, 12), generator=g) for _ in range(n)]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    from pruner.testing import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny"))


def _state(model: torch.nn.Module) -> tuple[dict, dict]:
    return ({n: p.detach().clone() for n, p in model.state_dict().items()}, model.config.to_dict())


@dataclass
class Ctx:
    """What a case may use. Every model a case touches goes through ``model()`` (or is
    ``self.model``) and must come out unchanged; every file it prepares goes through
    ``write()``/``folder()``/``exported()``, and anything else left in ``tmp`` fails the case."""

    tmp: Path
    tiny_dir: Path
    model: torch.nn.Module  # a tiny Llama whose weights and config must not change
    tracked: list = field(default_factory=list)
    prepared: set = field(default_factory=set)

    def __post_init__(self) -> None:
        self.tracked.append((self.model, _state(self.model)))

    def tokenizer(self):
        from pruner.io import load_tokenizer

        return load_tokenizer(str(self.tiny_dir))

    def new_model(self, arch: str = "llama", **overrides) -> torch.nn.Module:
        model = tiny_causal_lm(arch, **overrides)
        self.tracked.append((model, _state(model)))
        return model

    def track(self, model: torch.nn.Module) -> torch.nn.Module:
        self.tracked.append((model, _state(model)))
        return model

    def write(self, name: str, text: str) -> str:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        self.prepared.add(path)
        return str(path)

    def folder(self, name: str) -> Path:
        path = self.tmp / name
        path.mkdir(parents=True, exist_ok=True)
        self.prepared.add(path)
        return path

    def exported(self, name: str = "exported", model: torch.nn.Module | None = None, **kw) -> Path:
        folder = self.tmp / name
        pruner.save_pretrained(model or tiny_causal_lm("llama"), folder, **kw)
        self.prepared.add(folder)
        return folder


@dataclass
class Case:
    id: str
    run: Callable[[Ctx], object]
    error: type[BaseException]
    problem: str  # regex: what is wrong
    fix: str  # regex: what to do about it


def _prune(**kw):
    return lambda c: pruner.prune(c.model, _batches(), **kw)


def _prune_batches(batches, **kw):
    return lambda c: pruner.prune(c.model, batches, **({"pruning_ratio": 0.5} | kw))


def _config(**kw):
    return lambda c: pruner.PruneConfig(**({"target_sparsity": 0.2} | kw))


# ----------------------------------------------------------------------------- exports and files


def _missing_weights(c: Ctx):
    folder = c.exported()
    for f in folder.glob("*.safetensors"):
        f.unlink()
    return pruner.load_pretrained(folder)


def _corrupt_weights(c: Ctx):
    folder = c.exported()
    for f in folder.glob("*.safetensors"):
        f.write_bytes(b"\x00garbage" * 10)
    return pruner.load_pretrained(folder)


def _tensor_removed(c: Ctx, extra: bool = False):
    from safetensors.torch import load_file, save_file

    folder = c.exported()
    (weights,) = folder.glob("*.safetensors")
    tensors = load_file(weights)
    if extra:
        tensors["model.extra.weight"] = torch.zeros(2)
    else:
        del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, weights, metadata={"format": "pt"})
    return pruner.load_pretrained(folder)


def _config_garbage(c: Ctx):
    folder = c.exported()
    (folder / "config.json").write_text("{not json")
    return pruner.load_pretrained(folder)


def _existing_output(c: Ctx):
    c.write("out/keep.txt", "user data")
    return pruner.save_pretrained(c.model, c.tmp / "out")


def _overwrite_not_an_export(c: Ctx):
    c.write("out/keep.txt", "user data")
    return pruner.save_pretrained(c.model, c.tmp / "out", overwrite=True)


def _output_is_a_file(c: Ctx, overwrite: bool):
    return pruner.save_pretrained(c.model, c.write("out.bin", "x"), overwrite=overwrite)


def _output_is_cwd(c: Ctx):
    return pruner.save_pretrained(c.model, ".", overwrite=True)


def _output_parent_not_writable(c: Ctx):
    if os.geteuid() == 0:  # root writes anywhere: make the parent a file instead (not a folder to write in)
        return pruner.save_pretrained(c.model, Path(c.write("parent-file", "x")) / "out")
    locked = c.folder("locked")
    locked.chmod(0o500)
    try:
        return pruner.save_pretrained(c.model, locked / "out")
    finally:
        locked.chmod(0o700)


def _extra_file_path(c: Ctx):
    return pruner.save_pretrained(c.model, c.tmp / "out", extra_files={"../escape.md": "x"})


def _plan_edit(c: Ctx, edit: Callable[[dict], None]):
    plan = pruner.prune(tiny_causal_lm("llama"), _batches(), pruning_ratio=0.5)  # a prepared input
    data = plan.to_dict()
    edit(data)
    path = c.write("plan.json", json.dumps(data))
    return pruner.apply_plan(pruner.Plan.load(path), c.model)


def _foreign_plan(c: Ctx):
    plan = pruner.prune(tiny_causal_lm("llama", num_hidden_layers=4), _batches(), pruning_ratio=0.5)
    path = c.tmp / "plan.json"
    plan.save(path)
    c.prepared.add(path)
    return pruner.apply_plan(pruner.Plan.load(path), c.model)


def _other_weights(c: Ctx):
    plan = pruner.prune(tiny_causal_lm("llama", seed=7), _batches(), pruning_ratio=0.5)
    return pruner.apply_plan(plan, c.model)  # same shapes, other weights


def _set_layer(key, value):
    def edit(d):
        d["layers"][1][key] = value

    return edit


def _reorder(d):
    d["layers"][0], d["layers"][1] = d["layers"][1], d["layers"][0]


# ----------------------------------------------------------------------------- data


def _alpaca(c: Ctx, text: str):
    from pruner.data import alpaca_records

    return alpaca_records(c.write("alpaca.json", text))


def _zeroshot(c: Ctx, text: str, limit=None):
    from pruner.eval.zeroshot import load_items

    return load_items(c.write("task.jsonl", text), limit)


def _per_sample(c: Ctx):
    from pruner.structure import discover
    from pruner.importance import ImportanceEstimator

    fams = [discover(c.model).layers[0].mlp.channels]
    ImportanceEstimator(c.model, fams, "element2").begin_batch(4)


def _nan_gradients(c: Ctx):
    model = c.new_model()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    c.tracked[-1] = (model, _state(model))  # the NaN is the prepared input; nothing else may change
    return pruner.prune(model, _batches(), pruning_ratio=0.5)


def _gpt2(c: Ctx):
    import transformers as tf

    cfg = tf.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=128, bos_token_id=1, eos_token_id=2)
    return pruner.prune(c.track(tf.GPT2LMHeadModel(cfg)), _batches(), pruning_ratio=0.5)


def _base_model(c: Ctx):
    import transformers as tf

    model = tf.LlamaModel(c.model.config)
    model.config = c.model.config.__class__(**c.model.config.to_dict())
    return pruner.prune(c.track(model), _batches(), pruning_ratio=0.5)


def _gemma_channels(c: Ctx):
    import transformers as tf

    cfg = tf.GemmaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=128)
    return pruner.prune(c.track(tf.GemmaForCausalLM(cfg).eval()), _batches(), mode="channel", pruning_ratio=0.25)


# ----------------------------------------------------------------------------- Lightning


def _fit(c: Ctx, callback_kw: dict | None = None, module_kw: dict | None = None, data_kw: dict | None = None,
         trainer_kw: dict | None = None):
    import lightning as L

    from pruner.callbacks import StructuralPruneCallback
    from pruner.lightning_modules.causal_lm import CausalLMModule
    from pruner.lightning_modules.data import PruneDataModule

    module = CausalLMModule(str(c.tiny_dir), **(module_kw or {}))
    trainer = L.Trainer(**{**dict(accelerator="cpu", max_steps=4, logger=False, enable_checkpointing=False,
                                  enable_progress_bar=False, enable_model_summary=False, default_root_dir=c.tmp,
                                  callbacks=[StructuralPruneCallback(**({"pruning_ratio": 0.5, "verbose": False}
                                                                        | (callback_kw or {})))]),
                          **(trainer_kw or {})})
    data = PruneDataModule(**({"calibration_samples": 2, "calibration_seq_len": 16} | (data_kw or {})))
    try:
        trainer.fit(module, data)
    finally:
        if module.lm is not None:  # the module's own copy of the tiny model: untouched until the prune step
            assert module.lm.model.layers[0].mlp.down_proj.in_features == 64, "pruned although the fit failed"


def _grad_scaler(c: Ctx):
    """fp16 AMP (a GradScaler) exists on GPUs only; the callback's check, on such a precision plugin."""
    import lightning as L
    from lightning.pytorch.plugins.precision import MixedPrecision

    from pruner.callbacks import StructuralPruneCallback
    from pruner.lightning_modules.causal_lm import CausalLMModule

    trainer = L.Trainer(accelerator="cpu", logger=False, default_root_dir=c.tmp)
    trainer.strategy.precision_plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    StructuralPruneCallback(pruning_ratio=0.5, calibration_batches=2).setup(trainer, CausalLMModule(str(c.tiny_dir)),
                                                                             "fit")


def _callback(**kw):
    def run(c: Ctx):
        from pruner.callbacks import StructuralPruneCallback

        return StructuralPruneCallback(**({"pruning_ratio": 0.5} | kw))

    return run


def _module(**kw):
    def run(c: Ctx):
        from pruner.lightning_modules.causal_lm import CausalLMModule

        return CausalLMModule(str(c.tiny_dir), **kw)

    return run


def _datamodule(**kw):
    def run(c: Ctx):
        from pruner.lightning_modules.data import PruneDataModule

        return PruneDataModule(**kw)

    return run


def _lora_settings(**kw):
    def run(c: Ctx):
        from pruner.recovery import LoraSettings

        return LoraSettings(**kw)

    return run


def _missing_module_model(c: Ctx):
    from pruner.lightning_modules.causal_lm import CausalLMModule

    return CausalLMModule("./no/such/model")


def _ranks_disagree(c: Ctx):
    from types import SimpleNamespace

    from pruner.callbacks.distributed import check_ranks_agree

    plan = pruner.prune(tiny_causal_lm("llama"), _batches(), pruning_ratio=0.5)
    # rank 1's view: rank 0 broadcast another digest; the reduce counts one disagreeing rank
    strategy = SimpleNamespace(broadcast=lambda obj, src=0: "digest-of-rank-0", reduce=lambda t, reduce_op="sum": t)
    check_ranks_agree(SimpleNamespace(strategy=strategy, world_size=2), plan)


# ----------------------------------------------------------------------------- command lines


def _cli_args(c: Ctx, *args: str):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "pruner", *args], capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT, cwd=c.tmp, env=env)
    lines = proc.stderr.strip().splitlines()
    raise PrunerError(f"exit {proc.returncode}: {lines[-1] if lines else ''}"
                      + (" Traceback" if "Traceback" in proc.stderr else ""))


def _cli(c: Ctx, yaml: str, *args: str):
    return _cli_args(c, "fit", "--config", c.write("bad.yaml", yaml), "--model.model", str(c.tiny_dir), *args)


def _callback_yaml(init_args: str) -> str:
    return ("trainer:\n  max_steps: 2\n  callbacks:\n    - class_path: pruner.callbacks.StructuralPruneCallback\n"
            f"      init_args: {init_args}\n")


def _evaluate(c: Ctx, *args: str):
    from pruner.eval.cli import main

    c.folder("zs")
    for task in ("piqa",):
        c.write(f"zs/{task}.jsonl", json.dumps({"query": "q", "choices": ["a", "b"], "gold": 0}) + "\n")
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = main(["--model", str(c.tiny_dir), "--tasks", "piqa", "--zeroshot-dir", str(c.tmp / "zs"),
                       "--no-latency", "--new-tokens", "0", "--output", str(c.tmp / "report"), *args])
    raise PrunerError(f"exit {status}: {err.getvalue().strip()}")


def _load_model(**kw):
    return lambda c: pruner.load_model(str(c.tiny_dir), **kw)


BIG_IDS = torch.full((1, 12), 500)
CASES = [
    # --- prune() arguments: ranges, types, non-finite values, unknown names
    Case("ratio-negative", _prune(pruning_ratio=-0.1), PrunerError, "pruning_ratio must be a number strictly between 0 "
         "and 1, got -0.1", "such as 0.2"),
    Case("ratio-one", _prune(pruning_ratio=1.0), PrunerError, "strictly between 0 and 1, got 1.0", "such as 0.2"),
    Case("ratio-nan", _prune(pruning_ratio=float("nan")), PrunerError, "got nan", "such as 0.2"),
    Case("target-string", _prune(target_sparsity="0.2"), PrunerError, r"target_sparsity .* got '0.2' \(a str\)",
         "such as 0.2"),
    Case("target-bool", _prune(target_sparsity=True), PrunerError, r"got True \(a bool\)", "such as 0.2"),
    Case("both-targets", _prune(target_sparsity=0.2, pruning_ratio=0.2), PrunerError, "give exactly one",
         "target_sparsity .* or pruning_ratio"),
    Case("no-target", _prune(), PrunerError, "give exactly one", "target_sparsity"),
    Case("target-beyond-ranges", _prune(target_sparsity=0.9, attention_layers=(0, 1), mlp_layers=(0, 1)),
         PrunerError, "asks to remove .* allow at most", "widen attention_layers/mlp_layers, or lower the target"),
    Case("range-outside-model", _prune(pruning_ratio=0.2, attention_layers=(2, 9)), PrunerError,
         r"attention_layers=\(2, 9\) reaches past the model's 3 layers", "use an end <= 3"),
    Case("range-empty", _prune(pruning_ratio=0.2, mlp_layers=(2, 2)), PrunerError, r"mlp_layers=\(2, 2\) is empty",
         r"use \(start, end\) with 0 <= start < end"),
    Case("range-strings", _prune(pruning_ratio=0.2, mlp_layers=("0", "2")), PrunerError,
         "mlp_layers must be a .start, end. pair of integers", "pair of integers"),
    Case("range-string", _prune(pruning_ratio=0.2, layers="0-2", mode="layer"), PrunerError,
         "layers must be a .start, end. pair of integers, got '0-2'", "pair of integers"),
    Case("unknown-criterion", _prune(pruning_ratio=0.2, criterion="taylor"), PrunerError,
         "unknown criterion 'taylor'", "element1"),
    Case("criterion-list", _prune(pruning_ratio=0.2, criterion=["element1"]), PrunerError,
         "criterion must be a name", "a string"),
    Case("unknown-aggregation", _prune(pruning_ratio=0.2, aggregation="median"), PrunerError,
         "unknown aggregation 'median'", "sum"),
    Case("unknown-mode", _prune(pruning_ratio=0.2, mode="width"), PrunerError, "unknown mode 'width'", "block"),
    Case("unknown-option", _prune(pruning_ratio=0.2, iterative=2), PrunerError, r"unknown prune\(\) option",
         "valid: .*iterative_steps"),
    Case("granularity", _prune(pruning_ratio=0.2, head_granularity="heads"), PrunerError,
         "head_granularity must be 'query' or 'kv', got 'heads'", "'query' or 'kv'"),
    Case("gqa-whole-groups", _prune(pruning_ratio=0.25, head_granularity="kv"), PrunerError,
         "cannot be met by removing whole key/value groups: layer 0 has 2 KV groups",
         "head_granularity='query' .* or pruning_ratio=0.5"),
    Case("max-layer-ratio-zero", _prune(pruning_ratio=0.2, global_ranking=True, max_layer_ratio=0), PrunerError,
         r"max_layer_ratio must be a number in \(0, 1\], got 0", "e.g. 0.9"),
    Case("damping-nan", _prune(pruning_ratio=0.5, reconstruct=True, reconstruct_damping=float("nan")), PrunerError,
         "reconstruct_damping must be a finite number > 0, got nan", r"e\.g\. 0\.1"),
    Case("damping-inf", _prune(pruning_ratio=0.5, reconstruct=True, reconstruct_damping=float("inf")), PrunerError,
         "reconstruct_damping must be a finite number > 0, got inf", r"e\.g\. 0\.1"),
    Case("damping-negative", _prune(pruning_ratio=0.5, reconstruct=True, reconstruct_damping=-1.0), PrunerError,
         "reconstruct_damping must be a finite number > 0, got -1.0", "ridge term"),
    Case("round-to-float", _prune(pruning_ratio=0.5, round_to=8.0), PrunerError,
         r"round_to must be an integer >= 1, got 8.0 \(a float\)", "multiples"),
    Case("round-to-zero", _prune(pruning_ratio=0.5, round_to=0), PrunerError, "round_to must be an integer >= 1",
         "e.g. 1, 8 or 64"),
    Case("steps-bool", _prune(pruning_ratio=0.5, iterative_steps=True), PrunerError,
         r"iterative_steps must be an integer >= 1, got True \(a bool\)", "1 prunes in one step"),
    Case("seed-string", _prune(pruning_ratio=0.5, seed="abc"), PrunerError, "seed must be an integer >= 0, got 'abc'",
         "non-negative integer"),
    Case("seed-negative", _prune(pruning_ratio=0.5, seed=-3), PrunerError, "seed must be an integer >= 0, got -3",
         "non-negative integer"),
    Case("flag-string", _prune(pruning_ratio=0.5, prune_attention="false"), PrunerError,
         "prune_attention must be true or false, got 'false'", "not a string"),
    Case("reconstruct-string", _prune(pruning_ratio=0.5, reconstruct="yes"), PrunerError,
         "reconstruct must be true or false, got 'yes'", "not a string"),
    Case("obs-without-refit", _prune(pruning_ratio=0.5, mlp_selection="obs"), PrunerError,
         "mlp_selection='obs' chooses from the input statistics", "set reconstruct=True"),
    Case("unknown-selection", _prune(pruning_ratio=0.5, attention_selection="best"), PrunerError,
         "attention_selection must be 'score', 'measured' or 'obs', got 'best'", "'score'"),
    Case("refit-not-block", _prune(pruning_ratio=0.5, mode="layer", reconstruct=True), PrunerError,
         "reconstruct=True refits o_proj/down_proj", "use mode='block'"),
    Case("nothing-to-prune", _prune(pruning_ratio=0.5, prune_attention=False, prune_mlp=False), PrunerError,
         "removes nothing", "prune_attention=False and prune_mlp=False"),
    Case("refit-text-without-refit", lambda c: pruner.prune(c.model, _batches(), pruning_ratio=0.5,
                                                            reconstruction_batches=_batches()), PrunerError,
         "reconstruction_batches are only used with reconstruct=True", "set it, or drop them"),
    Case("refit-text-empty", lambda c: pruner.prune(c.model, _batches(), pruning_ratio=0.5, reconstruct=True,
                                                    reconstruction_batches=[]), PrunerError,
         "reconstruction_batches is empty", "or None to reuse the calibration"),
    Case("config-string-number", _config(max_layer_ratio="0.9"), PrunerError, r"got '0.9' \(a str\)", "e.g. 0.9"),
    # --- wrong kinds of object where the API expects a model, batches, a plan, a tokenizer
    Case("prune-a-name", lambda c: pruner.prune("smollm2", _batches(), pruning_ratio=0.5), PrunerError,
         "model must be a torch.nn.Module .*got str", "pruner.load_model"),
    Case("prune-no-batches", lambda c: pruner.prune(c.model, None, pruning_ratio=0.5), PrunerError,
         r"batches must be an iterable of calibration batches \(.*\), got NoneType", "calibration_samples"),
    Case("apply-a-dict", lambda c: pruner.apply_plan({"layers": []}, c.model), PlanMismatchError,
         "plan must be a pruner.Plan, got dict", r"pruner.Plan.load\(path\)"),
    Case("mask-a-path", lambda c: pruner.mask_plan("plan.json", c.model), PlanMismatchError,
         "plan must be a pruner.Plan, got str", "Plan.load"),
    Case("estimate-a-name", lambda c: pruner.estimate_importance(c.model, _batches(), pruner.discover(c.model),
                                                               "element1"), PrunerError,
         "cfg must be a pruner.PruneConfig, got str", "PruneConfig"),
    Case("count-a-name", lambda c: pruner.count_parameters("model"), PrunerError, "must be a torch.nn.Module",
         "load it first"),
    Case("save-tokenizer-name", lambda c: pruner.save_pretrained(c.model, c.tmp / "out", tokenizer="gpt2"),
         PrunerError, "tokenizer must be a transformers tokenizer .*got str", "load_tokenizer"),
    Case("save-plan-path", lambda c: pruner.save_pretrained(c.model, c.tmp / "out", plan="plan.json"), PrunerError,
         "plan must be a pruner.Plan, got str", "Plan.load"),
    Case("save-extra-not-text", lambda c: pruner.save_pretrained(c.model, c.tmp / "out", extra_files={"a.md": 5}),
         PrunerError, "extra file 'a.md' must be given as text", "a str"),
    Case("save-folder-int", lambda c: pruner.save_pretrained(c.model, 5), PrunerError,
         "the export folder must be a path, got int", "a path"),
    Case("save-overwrite-string", lambda c: pruner.save_pretrained(c.model, c.tmp / "out", overwrite="yes"),
         PrunerError, "overwrite='yes' must be True or False", "True or False"),
    Case("load-folder-none", lambda c: pruner.load_pretrained(None), PrunerError,
         "the model folder must be a path, got NoneType", "a path"),
    Case("load-int8", lambda c: pruner.load_pretrained(c.exported(), dtype=torch.int8), PrunerError,
         "dtype=torch.int8 is not a floating-point dtype", "'bfloat16'"),
    Case("load-bad-device", lambda c: pruner.load_pretrained(c.exported(), device="gpu0"), PrunerError,
         "device 'gpu0' is not a device", "'cuda:N'"),
    Case("plan-load-none", lambda c: pruner.Plan.load(None), PrunerError, "the plan path must be a path",
         "plan.json"),
    Case("plan-save-missing-folder", lambda c: pruner.prune(tiny_causal_lm("llama"), _batches(), pruning_ratio=0.5)
         .save(c.tmp / "no" / "plan.json"), FileNotFoundError, "does not exist", "create it first"),
    Case("calibration-count-string", lambda c: calibration_samples("builtin", c.tokenizer(), "10", 16), PrunerError,
         "num_samples must be an integer >= 1, got '10'", "the paper: 10"),
    Case("calibration-length-float", lambda c: calibration_samples("builtin", c.tokenizer(), 4, 16.0), PrunerError,
         "seq_len must be an integer >= 2, got 16.0", "the paper: 64"),
    Case("calibration-source-int", lambda c: calibration_samples(5, c.tokenizer(), 4, 16), PrunerError,
         "calibration source must be 'builtin', a file or folder path", "a list of texts"),
    Case("calibration-source-empty", lambda c: calibration_samples("", c.tokenizer(), 4, 16), PrunerError,
         "the calibration source is an empty string", "give 'builtin'"),
    Case("generate-temperature", lambda c: __import__("pruner.data.generated", fromlist=["g"]).generate_samples(
        c.model, c.tokenizer(), 2, 8, temperature=-1.0), PrunerError, "temperature must be a finite number > 0",
         "1.0 samples the model's own distribution"),
    Case("perplexity-window", lambda c: __import__("pruner.eval.perplexity", fromlist=["p"]).perplexity(
        c.model, c.tokenizer(), ["hello world " * 50], seq_len=1), PrunerError, "seq_len must be at least 2",
         "the paper uses 128"),
    Case("perplexity-no-text", lambda c: __import__("pruner.eval.perplexity", fromlist=["p"]).perplexity(
        c.model, c.tokenizer(), [], seq_len=16), PrunerError, "the text has 0 tokens", "give more text"),
    Case("distill-alpha", _module(distillation_alpha=2.0), PrunerError, "distillation alpha must be a number in",
         "0 = plain cross entropy"),
    Case("distill-alpha-string", _module(distillation_alpha="0.5"), PrunerError,
         r"distillation alpha .* got '0.5' \(a str\)", "KL only"),
    Case("module-teacher-missing", _module(teacher="./no/teacher", distillation_alpha=0.5), FileNotFoundError,
         "model folder not found", "./no/teacher"),
    Case("callback-tokenizer-int", _callback(tokenizer=5), PrunerError, r"tokenizer=5\)` must be a tokenizer",
         "a model name or folder"),
    Case("fit-prune-after-first-epoch", lambda c: _fit(c, {"calibration_batches": 2, "prune_at_step": 50},
                                                       trainer_kw={"max_steps": 60}), PrunerError,
         "the train loader has 2 batches per epoch, fewer than the 50", "lower calibration_batches/prune_at_step"),
    # --- calibration batches
    Case("no-calibration", lambda c: pruner.prune(c.model, [], pruning_ratio=0.2), PrunerError,
         "no calibration batches", r"data-free criterion \(l1, l2, random\)"),
    Case("float-ids", _prune_batches([torch.rand(1, 12) * 100]), PrunerError,
         "input_ids must be integer token ids, got dtype torch.float32", "tokenize the text"),
    Case("ids-beyond-vocab", _prune_batches([BIG_IDS]), PrunerError,
         r"token id 500 is outside the model's vocabulary \(0..127\)", "the model's own tokenizer"),
    Case("negative-ids", _prune_batches([-torch.ones(1, 12, dtype=torch.long)]), PrunerError,
         "token id -1 is outside the model's vocabulary", "tokenizer"),
    Case("too-long", _prune_batches([torch.randint(3, 120, (1, 200))]), PrunerError,
         "200 tokens per sample, more than the model's max_position_embeddings=128", "shorter windows"),
    Case("mask-shape", _prune_batches([{"input_ids": _batches(1)[0], "attention_mask": torch.ones(1, 5)}]),
         PrunerError, r"attention_mask has shape \(1, 5\), input_ids \(1, 12\)", "must match"),
    Case("labels-shape", _prune_batches([{"input_ids": _batches(1)[0], "labels": torch.ones(2, 12, dtype=torch.long)}]),
         PrunerError, r"labels has shape \(2, 12\)", "must match"),
    Case("all-padding", _prune_batches([{"input_ids": _batches(1)[0], "attention_mask": torch.zeros(1, 12)}]),
         PrunerError, "attention_mask is all zeros", "drop empty samples"),
    Case("all-ignored-labels", _prune_batches([{"input_ids": _batches(1)[0],
                                                "labels": torch.full((1, 12), -100)}]), PrunerError,
         "no token to predict", "labels = input_ids for plain text"),
    Case("one-token", _prune_batches([torch.tensor([[5]])]), PrunerError, r"shape \(batch, tokens >= 2\), got \(1, 1\)",
         "tokens >= 2"),
    Case("three-dims", _prune_batches([torch.ones(1, 2, 3, dtype=torch.long)]), PrunerError,
         r"got \(1, 2, 3\)", "shape .batch, tokens >= 2."),
    Case("strings-as-batch", _prune_batches(["The capital of France"]), PrunerError,
         "must be input_ids tensors .* got str", "dicts holding 'input_ids'"),
    Case("list-as-ids", _prune_batches([{"input_ids": [1, 2, 3]}]), PrunerError,
         "input_ids must be a tensor of token ids, got list", "tokenize the text first"),
    Case("bad-refit-text", lambda c: pruner.prune(c.model, _batches(), pruning_ratio=0.5, reconstruct=True,
                                                  reconstruction_batches=[BIG_IDS]), PrunerError,
         "reconstruction batch 0: token id 500", "tokenizer"),
    Case("calibration-too-short", lambda c: calibration_samples(["A short text."], c.tokenizer(), 4, 64), PrunerError,
         "no document of at least seq_len=64 tokens", "use a longer text or a smaller seq_len"),
    Case("second-order-per-sample", _per_sample, PrunerError, "'element2' needs per-sample gradients",
         "use calibration batches of one sample"),
    Case("nan-gradients", _nan_gradients, PrunerError, "NaN/inf", "check the data and the model's dtype"),
    # --- architectures
    Case("conv1d-architecture", _gpt2, UnsupportedArchitectureError, "c_attn: Conv1D projections are not supported",
         "nn.Linear"),
    Case("not-a-causal-lm", _base_model, UnsupportedArchitectureError, "LlamaModel has no output",
         "load it with AutoModelForCausalLM"),
    Case("gemma-channel-mode", _gemma_channels, UnsupportedArchitectureError,
         r"does not compute weight \* x / rms\(x\)", "use mode='block' or mode='layer'"),
    # --- plans
    Case("plan-for-another-model", _foreign_plan, PlanMismatchError, "the plan has 4 layers but the model has 3",
         "apply a plan to the dense model it was made for"),
    Case("plan-for-other-weights", _other_weights, PlanMismatchError, "made for a model with fingerprint",
         "check_fingerprint=False"),
    Case("plan-reordered", lambda c: _plan_edit(c, _reorder), PrunerError, r"layers\[0\]\.index is 1",
         "in layer order with index equal to their position"),
    Case("plan-removed-string", lambda c: _plan_edit(c, _set_layer("removed", "false")), PrunerError,
         r"layers\[1\]\.removed must be true or false, got 'false'", "true or false"),
    Case("plan-kept-strings", lambda c: _plan_edit(c, _set_layer("mlp_channels_kept", ["0", "1"])), PrunerError,
         r"layers\[1\]\.mlp_channels_kept must be a list of integer indices", "or null"),
    Case("plan-kept-out-of-range", lambda c: _plan_edit(c, _set_layer("mlp_channels_kept", [0, 1, 500])),
         PlanMismatchError, "out of range 0..95", "MLP channels"),
    Case("plan-kept-duplicates", lambda c: _plan_edit(c, _set_layer("mlp_channels_kept", [0, 0, 1])),
         PlanMismatchError, "out of range 0..95 or repeated", "kept indices"),
    Case("plan-kept-nothing", lambda c: _plan_edit(c, _set_layer("mlp_channels_kept", [])), PlanMismatchError,
         "keeps nothing", "remove the whole layer instead"),
    Case("plan-uneven-gqa", lambda c: _plan_edit(c, _set_layer("attention_heads_kept", [0, 1, 2])),
         PlanMismatchError, "the same number of query heads per group", "equally many in each"),
    Case("plan-format", lambda c: _plan_edit(c, lambda d: d.update(format="other/1")), PrunerError,
         "is not a pruning plan", "expected 'pruner-plan/2'"),
    Case("plan-no-layers", lambda c: _plan_edit(c, lambda d: d.update(layers=[])), PrunerError,
         "'layers' must be a non-empty list", "layer entries"),
    Case("plan-settings-type", lambda c: _plan_edit(c, lambda d: d.update(settings=[1])), PrunerError,
         "'settings' must be a JSON object", "object"),
    Case("plan-invalid-json", lambda c: pruner.Plan.load(c.write("plan.json", '{"layers": [')), PrunerError,
         "is not valid JSON", "was it written completely"),
    Case("plan-missing", lambda c: pruner.Plan.load(c.tmp / "none.json"), FileNotFoundError, "plan file not found",
         "none.json"),
    Case("refit-wrong-shape", lambda c: pruner.apply_plan(
        pruner.Plan([pruner.LayerPlan(0, mlp_channels_kept=list(range(48))), pruner.LayerPlan(1), pruner.LayerPlan(2)]),
        c.model, refit={"model.layers.0.mlp.down_proj.weight": torch.zeros(64, 10)}), PlanMismatchError,
         r"refit weight of shape \(64, 10\) for a parameter pruned to \(64, 48\)", "pruned to"),
    # --- exports and loading
    Case("output-folder-exists", _existing_output, PrunerError, "already exists and is not empty",
         "choose another folder or pass overwrite=True"),
    Case("overwrite-not-an-export", _overwrite_not_an_export, PrunerError, "is not an export written by pruner",
         "move its contents away yourself"),
    Case("output-is-a-file", lambda c: _output_is_a_file(c, False), PrunerError, "is an existing file",
         "choose a folder path"),
    Case("output-is-a-file-overwrite", lambda c: _output_is_a_file(c, True), PrunerError, "is an existing file",
         "never replaced"),
    Case("output-is-cwd", _output_is_cwd, PrunerError, "is the current directory", "new sub-folder"),
    Case("output-empty-path", lambda c: pruner.save_pretrained(c.model, " "), PrunerError, "empty path",
         "give a folder name"),
    Case("output-parent-unwritable", _output_parent_not_writable, PrunerError, "cannot create the export folder",
         "choose a folder you can write to"),
    Case("extra-file-path", _extra_file_path, PrunerError, "must be a plain file name", "not a path"),
    Case("missing-safetensors", _missing_weights, FileNotFoundError, "no .safetensors weights",
         "the export is incomplete"),
    Case("corrupt-safetensors", _corrupt_weights, PrunerError, "is not a valid safetensors file", "re-export"),
    Case("missing-tensor", lambda c: _tensor_removed(c), PrunerError,
         r"missing keys: \['model.layers.1.mlp.up_proj.weight'\]", "re-export the model"),
    Case("unexpected-tensor", lambda c: _tensor_removed(c, extra=True), PrunerError,
         r"unexpected keys: \['model.extra.weight'\]", "re-export the model"),
    Case("config-not-json", _config_garbage, PrunerError, "is not valid JSON", "config.json"),
    Case("load-missing-folder", lambda c: pruner.load_pretrained(c.tmp / "nowhere"), FileNotFoundError,
         "model folder not found", "nowhere"),
    Case("load-dtype", lambda c: pruner.load_pretrained(c.exported(), dtype="float33"), PrunerError,
         "dtype='float33' is not a floating-point dtype", "use 'float32', 'bfloat16' or 'float16'"),
    Case("load-model-dtype", _load_model(dtype="float33"), PrunerError, "dtype='float33'", "'bfloat16'"),
    Case("load-model-remote-code", _load_model(trust_remote_code="yes"), PrunerError,
         "trust_remote_code='yes' must be True or False", "True or False"),
    Case("load-model-missing", lambda c: pruner.load_model(str(c.tmp / "no" / "such")), FileNotFoundError,
         "model folder not found", "no/such"),
    Case("load-model-file", lambda c: pruner.load_model(c.write("weights.bin", "x")), FileNotFoundError,
         "is a file, not a model folder", "config.json"),
    Case("load-model-no-config", lambda c: pruner.load_model(str(c.folder("empty-model"))), FileNotFoundError,
         "has no config.json", "not a model folder"),
    # --- data files
    Case("missing-data-file", lambda c: calibration_samples(str(c.tmp / "none.txt"), c.tokenizer()),
         FileNotFoundError, "calibration text not found: .*none.txt", "pass an existing .txt file or folder"),
    Case("empty-text-folder", lambda c: calibration_samples(str(c.folder("texts")), c.tokenizer()), PrunerError,
         "has no .txt files", "pass a folder of .txt files"),
    Case("malformed-json", lambda c: _alpaca(c, "[{not json"), PrunerError, "is not valid JSON",
         "expected a list of records"),
    Case("alpaca-missing-field", lambda c: _alpaca(c, json.dumps([{"instruction": "Say hi."}])), PrunerError,
         "'output'", "instruction"),
    Case("alpaca-not-a-list", lambda c: _alpaca(c, json.dumps({"instruction": "x"})), PrunerError,
         "holds a JSON dict", "expected a list of records"),
    Case("zeroshot-empty", lambda c: _zeroshot(c, ""), PrunerError, "holds no items", "one JSON object per line"),
    Case("zeroshot-bad-json", lambda c: _zeroshot(c, json.dumps({"query": "q", "choices": ["a", "b"], "gold": 0})
                                                  + "\n{oops"), PrunerError,
         r"task.jsonl:2 is not valid JSON", "one JSON object per line"),
    Case("zeroshot-bad-gold", lambda c: _zeroshot(c, json.dumps({"query": "q", "choices": ["a", "b"], "gold": 5})),
         PrunerError, r"task.jsonl:1: expected", "index into choices"),
    Case("zeroshot-limit-zero", lambda c: _zeroshot(c, json.dumps({"query": "q", "choices": ["a", "b"], "gold": 0}),
                                                    limit=0), PrunerError, "limit=0 must be an integer >= 1",
         "or None for all"),
    # --- the Lightning classes' arguments
    Case("callback-calibration-zero", _callback(calibration_batches=0), PrunerError,
         r"calibration_batches=0\)` must be an integer >= 1", "datamodule's calibration_batches"),
    Case("callback-calibration-string", _callback(calibration_batches="10"), PrunerError,
         r"calibration_batches='10'\)` must be an integer", "datamodule"),
    Case("callback-prune-before-calibration", _callback(calibration_batches=10, prune_at_step=5), PrunerError,
         "comes before the 10 calibration batches end", "use prune_at_step >= calibration_batches"),
    Case("callback-export-empty", _callback(export_dir=""), PrunerError, r"export_dir=''\)` must be a folder path",
         "or None"),
    Case("callback-flag-string", _callback(attach_lora="true"), PrunerError,
         r"attach_lora='true'\)` must be true or false", "true or false"),
    Case("callback-model-attribute", _callback(model_attribute=""), PrunerError,
         "model_attribute=''.* must be a dotted attribute path", "or None to find the model"),
    Case("callback-lora-rank", _callback(lora_r=0), PrunerError, "LoRA rank r=0 must be an integer >= 1", "uses 8"),
    Case("callback-lora-dropout", _callback(lora_dropout=1.0), PrunerError, "LoRA dropout=1.0 must be a number in",
         "uses 0.05"),
    Case("callback-lora-targets-string", _callback(lora_target_modules="q_proj"), PrunerError,
         "target_modules='q_proj' must be a non-empty list", "e.g. .q_proj, v_proj."),
    Case("callback-target-string", _callback(target_sparsity="0.2", pruning_ratio=None), PrunerError,
         "target_sparsity must be a number", "such as 0.2"),
    Case("lora-alpha-negative", _lora_settings(alpha=-1), PrunerError, "LoRA alpha=-1 must be a positive number",
         "uses 16"),
    Case("module-dtype", _module(dtype="float16"), PrunerError, r"dtype='float16'\)` is not supported",
         "use 'auto', 'float32' or 'bfloat16'"),
    Case("module-lr-zero", _module(learning_rate=0), PrunerError, "learning_rate=0.* must be a positive number",
         "the paper uses 1e-4"),
    Case("module-lr-nan", _module(learning_rate=float("nan")), PrunerError, "learning_rate=nan", "positive number"),
    Case("module-weight-decay", _module(weight_decay=-0.1), PrunerError, r"weight_decay=-0.1\)` must be a number >= 0",
         ">= 0"),
    Case("module-teacher-unused", _module(teacher="x"), PrunerError, "is unused with distillation_alpha=0",
         "set distillation_alpha > 0"),
    Case("module-missing-model", _missing_module_model, FileNotFoundError, "model folder not found", "./no/such/model"),
    Case("data-calibration-string", _datamodule(calibration_samples="10"), PrunerError,
         r"calibration_samples\)` must be an integer >= 1, got '10'", "integer"),
    Case("data-seq-len-one", _datamodule(calibration_seq_len=1), PrunerError, r"calibration_seq_len=1\)` must be >= 2",
         "the paper uses 64"),
    Case("data-source-empty", _datamodule(reconstruction_source=""), PrunerError,
         r"reconstruction_source=''\)` must be a non-empty string", "or None"),
    Case("data-max-windows-zero", _datamodule(val_max_windows=0), PrunerError,
         r"val_max_windows\)` must be an integer >= 1", "or None for all"),
    # --- a fit that cannot succeed stops before calibration, with the fix
    Case("lora-target-missing", lambda c: _fit(c, {"lora_target_modules": ["q_proj", "c_attn"]}), PrunerError,
         r"LoRA target\(s\) \['c_attn'\] match no linear layer", "set lora_target_modules"),
    Case("fit-export-exists", lambda c: (c.write("busy/keep.txt", "x"), _fit(c, {"export_dir": str(c.tmp / "busy")})),
         PrunerError, "already exists and is not empty", "choose another folder"),
    Case("fit-range-beyond-model", lambda c: _fit(c, {"mlp_layers": (0, 4)}), PrunerError,
         r"mlp_layers=\(0, 4\) reaches past the model's 2 layers", "use an end <= 2"),
    Case("fit-lora-at-start", lambda c: _fit(c, module_kw={"attach_lora_at_start": True}), PrunerError,
         "already has LoRA/peft adapters", "set model.attach_lora_at_start: false"),
    Case("fit-too-long-windows", lambda c: _fit(c, data_kw={"calibration_seq_len": 600}), PrunerError,
         "600 tokens per sample, more than the model's max_position_embeddings=512", "shorter windows"),
    Case("fit-refit-text-without-refit", lambda c: _fit(c, data_kw={"reconstruction_source": "generated"}),
         PrunerError, "reconstruction_source='generated'", "set reconstruct: true"),
    Case("fit-fp16-scaler", _grad_scaler, PrunerError, "scales the loss with a GradScaler",
         "use precision bf16-mixed or 32-true"),
    Case("load-export-without-tokenizer", lambda c: pruner.load_model(str(c.exported())), PrunerError,
         "could not load a tokenizer from .*exported", "export it with save_pretrained.*tokenizer=tok"),
    Case("ranks-disagree", _ranks_disagree, PrunerError, "ranks disagree on the pruning plan",
         "check that every rank loads the same weights"),
    # --- command lines: one line naming the key, the value and the fix, never a traceback
    Case("cli-unknown-key", lambda c: _cli(c, "trainer:\n  max_stepz: 3\n"), PrunerError,
         "exit 2: .*unknown option 'trainer.max_stepz'", "did you mean 'trainer.max_steps'"),
    Case("cli-missing-config", lambda c: _cli_args(c, "fit", "--config", str(c.tmp / "nope.yaml")), PrunerError,
         "exit 2: pruner: error: config file not found: .*nope.yaml", "pass --config with an existing YAML file"),
    Case("cli-wrong-type", lambda c: _cli(c, "model:\n  learning_rate: fast\n"), PrunerError,
         "exit 2: .*model.learning_rate: expected a float, got 'fast'", "give a value of that type"),
    Case("cli-callback-typo", lambda c: _cli(c, _callback_yaml("{target_sparsty: 0.2}")), PrunerError,
         r"exit 2: .*StructuralPruneCallback\]: unknown option 'target_sparsty'", "did you mean 'target_sparsity'"),
    Case("cli-callback-value", lambda c: _cli(c, _callback_yaml("{target_sparsity: 1.5}")), PrunerError,
         r"exit 1: .*StructuralPruneCallback\]: target_sparsity must be a number strictly between 0 and 1, "
         "got 1.5", "pass a fraction such as 0.2"),
    Case("cli-callback-type", lambda c: _cli(c, _callback_yaml("{target_sparsity: 0.2, round_to: eight}")), PrunerError,
         r"exit 2: .*StructuralPruneCallback\]\.round_to: expected an int or null, got 'eight'", "of that type"),
    Case("cli-data-value", lambda c: _cli(c, "data:\n  calibration_samples: 0\n"), PrunerError,
         r"exit 1: .*calibration_samples\)` must be an integer >= 1, got 0", "integer"),
    Case("cli-model-missing", lambda c: _cli(c, "model:\n  dtype: float32\n", "--model.model", str(c.tmp / "gone")),
         PrunerError, "exit 1: .*model folder not found", "gone"),
    # --- evaluation: checked before any model is loaded
    Case("eval-limit-zero", lambda c: _evaluate(c, "--limit", "0"), PrunerError, "exit 2: error: --limit 0 must be at "
         "least 1", "leave it out for all items"),
    Case("eval-seq-len", lambda c: _evaluate(c, "--seq-len", "1"), PrunerError, "--seq-len 1 must be at least 2",
         "at least 2"),
    Case("eval-tokens-window", lambda c: _evaluate(c, "--max-tokens", "64", "--seq-len", "128"), PrunerError,
         "--max-tokens 64 is shorter than one --seq-len 128 window", "raise --max-tokens or lower --seq-len"),
    Case("eval-dtype", lambda c: _evaluate(c, "--dtype", "float33"), PrunerError, "--dtype 'float33' is not supported",
         "use float32, bfloat16 or float16"),
    Case("eval-output-file", lambda c: _evaluate(c, "--output", c.write("report.txt", "x")), PrunerError,
         "--output .*report.txt is an existing file", "give a folder"),
    Case("eval-compare-missing", lambda c: _evaluate(c, "--compare", str(c.tmp / "pruned")), PrunerError,
         "exit 2: error: model folder not found", "pruned"),
    Case("eval-bad-plan", lambda c: _evaluate(c, "--plan", c.write("p.json", "{")), PrunerError,
         "exit 2: error: .*p.json is not valid JSON", "was it written completely"),
]


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


def _leftovers(ctx: Ctx) -> list[str]:
    """Files and folders in ``tmp`` that the case did not prepare (temporary siblings, logs, ...)."""
    out = []
    for path in ctx.tmp.rglob("*"):
        if any(path == p or p in path.parents for p in ctx.prepared):
            continue
        if path.is_dir() and any(p.parent == path or path in p.parents for p in ctx.prepared):
            continue  # a folder that holds prepared files
        out.append(str(path.relative_to(ctx.tmp)))
    return out


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_fails_early_with_problem_and_fix_and_leaves_no_files(case, tiny_dir, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    ctx = Ctx(work, tiny_dir, tiny_causal_lm("llama"))
    with pytest.raises(case.error) as info:
        case.run(ctx)
    message = str(info.value)
    assert info.match(case.problem), message
    assert info.match(case.fix), message
    assert "Traceback" not in message  # CLI cases: one line, no traceback
    for model, (weights, config) in ctx.tracked:  # every model the case touched is as it was
        now = model.state_dict()
        assert now.keys() == weights.keys(), f"{type(model).__name__}: parameters changed"
        assert all(_same(now[k], v) for k, v in weights.items()), f"{type(model).__name__}: weights changed"
        assert model.config.to_dict() == config, f"{type(model).__name__}: config changed"
    assert _leftovers(ctx) == []


def test_the_matrix_covers_each_class_of_fault():
    assert len({c.id for c in CASES}) == len(CASES) >= 100
    prefixes = {"cli-", "eval-", "plan-", "output-", "load-", "zeroshot-", "callback-", "module-", "data-", "fit-"}
    assert all(any(c.id.startswith(p) for c in CASES) for p in prefixes)
    assert all(c.fix for c in CASES)  # every case names a fix, CLI cases too


def test_existing_output_folder_is_left_untouched(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "keep.txt").write_text("user data")
    snap = _snapshot(tmp_path)
    for overwrite in (False, True):
        with pytest.raises(PrunerError):
            pruner.save_pretrained(tiny_causal_lm("llama"), folder, overwrite=overwrite)
    assert _snapshot(tmp_path) == snap


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


# ----------------------------------------------------------------------------- surgery is all or nothing


@pytest.mark.parametrize("where", ["_set_attention_sizes", "_remove_layers", "_shrink_hidden"])
def test_a_failure_in_the_middle_of_surgery_leaves_the_model_as_it_was(where, monkeypatch):
    import pruner.structure.surgery as surgery

    model = tiny_causal_lm("llama")
    weights, config = _state(model)
    modules = {n: type(m) for n, m in model.named_modules()}
    original = getattr(surgery, where)

    def fail_after(*args, **kw):
        original(*args, **kw)  # its changes are made, then the surgery breaks
        raise RuntimeError("injected failure")

    monkeypatch.setattr(surgery, where, fail_after)
    plan = pruner.Plan([pruner.LayerPlan(0, heads_kept=[0, 2], kv_heads_kept=[0, 1], mlp_channels_kept=list(range(48))),
                        pruner.LayerPlan(1, removed=True), pruner.LayerPlan(2)], hidden_kept=list(range(0, 64, 2)))
    with pytest.raises(RuntimeError, match="injected failure"):
        pruner.apply_plan(plan, model)
    assert model.state_dict().keys() == weights.keys()
    assert all(torch.equal(p, weights[n]) for n, p in model.state_dict().items())
    assert model.config.to_dict() == config and {n: type(m) for n, m in model.named_modules()} == modules
    assert model.model.layers[0].self_attn.num_key_value_groups == 2
    assert model.model.layers[0].mlp.down_proj.in_features == 96 and len(model.model.layers) == 3
    with torch.no_grad():  # and it still runs as the dense model
        assert model(input_ids=_batches(1)[0]).logits.shape == (1, 12, 128)


def test_a_failing_second_step_undoes_the_first(monkeypatch):
    import pruner.loop.steps as pipeline

    model = tiny_causal_lm("llama")
    weights, _ = _state(model)
    calls = []
    original = pipeline.make_plan

    def second_fails(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("step 2 failed")
        return original(*args, **kw)

    monkeypatch.setattr(pipeline, "make_plan", second_fails)
    with pytest.raises(RuntimeError, match="step 2 failed"):
        pruner.prune(model, _batches(), target_sparsity=0.2, global_ranking=True, iterative_steps=2)
    assert len(calls) == 2 and model.model.layers[0].mlp.up_proj.out_features == 96
    assert all(torch.equal(p, weights[n]) for n, p in model.state_dict().items())


# ----------------------------------------------------------------------------- files: concurrency, permissions


def test_of_two_concurrent_exports_to_a_new_folder_one_wins_and_the_other_raises(tmp_path):
    script = textwrap.dedent('''
        import sys, time
        from pathlib import Path
        import pruner, pruner.io.pretrained as io
        from pruner.testing import tiny_causal_lm
        folder, go, seed = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
        original = io._put_in_place
        def wait_then_place(tmp, target, overwrite):  # both writers reach the rename together
            (go.parent / f"ready{seed}").write_text("ready")
            while not go.exists():
                time.sleep(0.01)
            original(tmp, target, overwrite)
        io._put_in_place = wait_then_place
        try:
            pruner.save_pretrained(tiny_causal_lm("llama", seed=seed), folder)
            print("WON")
        except pruner.PrunerError as e:
            print("LOST", e)
    ''')
    (tmp_path / "writer.py").write_text(script)
    folder, go = tmp_path / "model", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "writer.py"), str(folder), str(go), str(seed)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for seed in (1, 2)]
    ready = [tmp_path / f"ready{seed}" for seed in (1, 2)]
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT
    while not all(r.exists() for r in ready):  # both have written their temporary folders (slow under load)
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.05)
    go.write_text("go")
    outs = [p.communicate(timeout=SUBPROCESS_TIMEOUT)[0] for p in procs]
    assert sorted(o.split()[0] for o in outs) == ["LOST", "WON"], outs
    assert "was written by someone else" in next(o for o in outs if o.startswith("LOST"))
    winner = 1 if outs[0].startswith("WON") else 2
    torch.testing.assert_close(pruner.load_pretrained(folder).state_dict(), tiny_causal_lm("llama", seed=winner).state_dict())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["go", "model", "ready1", "ready2", "writer.py"]  # no temporary folder


def test_exports_get_the_permissions_of_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        folder = pruner.save_pretrained(tiny_causal_lm("llama"), tmp_path / "out", plan=pruner.prune(
            tiny_causal_lm("llama"), _batches(), pruning_ratio=0.5))
    finally:
        os.umask(old)
    assert oct(folder.stat().st_mode & 0o777) == oct(0o755)
    assert {oct(p.stat().st_mode & 0o777) for p in folder.iterdir()} == {oct(0o644)}


def test_home_folders_are_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    pruner.save_pretrained(tiny_causal_lm("llama"), "~/exports/tiny")
    assert (tmp_path / "exports" / "tiny" / "config.json").is_file()
    assert pruner.load_pretrained("~/exports/tiny").config.num_hidden_layers == 3
    assert not (Path.cwd() / "~").exists()


# ----------------------------------------------------------------------------- no code from model folders runs


def test_loading_an_export_never_runs_its_modeling_file(tmp_path):
    model = tiny_causal_lm("llama")
    plan = pruner.prune(model, _batches(), target_sparsity=0.2, global_ranking=True)  # uneven widths: auto_map
    from pruner.io import load_tokenizer
    from pruner.testing import save_tiny_llama

    tokenizer = load_tokenizer(str(save_tiny_llama(tmp_path / "tok")))
    folder = pruner.save_pretrained(model, tmp_path / "export", plan=plan, tokenizer=tokenizer)
    marker = tmp_path / "ran"
    with open(folder / "modeling_pruned.py", "a") as f:  # a hostile edit
        f.write(f"\nopen({str(marker)!r}, 'w').write('code from the folder ran')\n")
    code = textwrap.dedent(f'''
        import warnings, pruner
        from pruner.lightning_modules.causal_lm import CausalLMModule
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            a = pruner.load_pretrained({str(folder)!r})
            b, _ = pruner.load_model({str(folder)!r})
            c, _ = pruner.load_model({str(folder)!r}, trust_remote_code=True)  # ours is used all the same
        print(sum("was edited" in str(w.message) for w in caught), type(a).__name__, type(c).__name__)
    ''')
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert not marker.exists()
    assert out.stdout.split() == ["3", "PrunedLlamaForCausalLM", "PrunedLlamaForCausalLM"]  # warned each time


class _RunsCode:
    """Unpickling this calls ``open(marker, 'w')``: what a hostile checkpoint can do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(tiny_dir, tmp_path):
    from pruner.callbacks import load_pruned_checkpoint
    from pruner.lightning_modules.causal_lm import CausalLMModule

    marker = tmp_path / "ran"
    crafted = tmp_path / "crafted.ckpt"
    torch.save({"state_dict": {}, "callbacks": {"StructuralPruneCallback": {"pruned": True}},
                "hyper_parameters": _RunsCode(marker)}, crafted)
    with pytest.raises(PrunerError, match=r"objects other than tensors.*never unpickles.*weights_only=False"):
        load_pruned_checkpoint(CausalLMModule(str(tiny_dir)), crafted)
    assert not marker.exists()
    not_a_checkpoint = tmp_path / "config.yaml"
    not_a_checkpoint.write_text("trainer: {max_steps: 1}\n")
    with pytest.raises(PrunerError, match="is not a torch checkpoint"):
        load_pruned_checkpoint(CausalLMModule(str(tiny_dir)), not_a_checkpoint)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_pruned_checkpoint(CausalLMModule(str(tiny_dir)), tmp_path / "missing.ckpt")


# ----------------------------------------------------------------------------- kill during export

KILL_SCRIPT = textwrap.dedent('''
    import sys, time
    from pathlib import Path
    import pruner
    from pruner.structure import Plan
    from pruner.testing import tiny_causal_lm

    folder, marker, seed = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    model = tiny_causal_lm("llama", seed=seed)
    plan = pruner.prune(model, [], pruning_ratio=0.5, criterion="l2")
    def stall(self, path):  # the plan is the last file written: stall there until killed
        marker.write_text("writing")
        time.sleep(600)
    Plan.save = stall
    pruner.save_pretrained(model, folder, plan=plan, overwrite=True)
''')


def _kill_during_export(tmp_path: Path, folder: Path, seed: int) -> None:
    script, marker = tmp_path / "kill.py", tmp_path / f"marker{seed}"
    script.write_text(KILL_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(folder), str(marker), str(seed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + SUBPROCESS_TIMEOUT
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "the export never reached its last file"
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    proc.stderr.close()


@pytest.mark.slow
def test_kill_during_export_leaves_the_old_folder_or_nothing(tmp_path):
    new_folder = tmp_path / "fresh"
    _kill_during_export(tmp_path, new_folder, seed=1)
    assert not new_folder.exists()  # a first export killed midway leaves no folder at all

    folder = tmp_path / "model"
    old = tiny_causal_lm("llama", seed=2)
    pruner.save_pretrained(old, folder)
    snap = _snapshot(folder)
    _kill_during_export(tmp_path, folder, seed=3)
    assert _snapshot(folder) == snap  # the previous export, whole
    torch.testing.assert_close(pruner.load_pretrained(folder).state_dict(), old.state_dict())
    stale = sorted(p.name for p in tmp_path.glob(".model.tmp-*"))
    assert len(stale) == 1  # the killed writer's temporary folder ...
    new = tiny_causal_lm("llama", seed=4)
    pruner.save_pretrained(new, folder, overwrite=True)
    assert not list(tmp_path.glob(".model.tmp-*"))  # ... is removed by the next export
    torch.testing.assert_close(pruner.load_pretrained(folder).state_dict(), new.state_dict())


# ----------------------------------------------------------------------------- determinism


def test_plan_records_what_reapplying_needs_and_is_bit_identical_across_runs(tmp_path):
    plans = []
    for run in range(2):
        model = tiny_causal_lm("llama")
        plan = pruner.prune(model, _batches(3), target_sparsity=0.2, global_ranking=True)
        plan.save(tmp_path / f"plan{run}.json")
        plans.append((tmp_path / f"plan{run}.json").read_bytes())
    assert plans[0] == plans[1]
    data = json.loads(plans[0])
    assert data["pruner_version"] and data["model"]["fingerprint"] and data["settings"]["target_sparsity"] == 0.2
    reapplied = tiny_causal_lm("llama")
    pruner.apply_plan(pruner.Plan.load(tmp_path / "plan0.json"), reapplied)
    assert pruner.count_parameters(reapplied) == data["params"]["after"]


def test_every_criterion_gives_the_same_plan_in_every_process_and_hash_seed():
    code = textwrap.dedent('''
        import hashlib, torch, pruner
        from pruner.testing import tiny_causal_lm
        g = torch.Generator().manual_seed(0)
        batches = [torch.randint(3, 120, (1, 12), generator=g) for _ in range(2)]
        for criterion in ("random", "element1", "l2"):
            plan = pruner.prune(tiny_causal_lm("llama"), batches, criterion=criterion, target_sparsity=0.2,
                                global_ranking=True)
            print(hashlib.sha256(plan.to_json().encode()).hexdigest())
    ''')
    outs = []
    for seed in ("0", "1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                             timeout=SUBPROCESS_TIMEOUT)
        assert out.returncode == 0, out.stderr[-2000:]
        outs.append(out.stdout)
    assert outs[0] == outs[1] == outs[2] and len(outs[0].split()) == 3
