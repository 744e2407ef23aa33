"""The bad-input matrix's harness: a Case runs against a Ctx that tracks every model it touches
(which must come out unchanged) and every file it prepares (anything else left behind fails it),
and the builders the cases are written with."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

import pruner
from pruner.errors import PrunerError
from pruner.testing import tiny_causal_lm
from tests.helpers import SUBPROCESS_TIMEOUT, tiny_batches


def model_state(model: torch.nn.Module) -> tuple[dict, dict]:
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
        self.tracked.append((self.model, model_state(self.model)))

    def tokenizer(self):
        from pruner.io import load_tokenizer

        return load_tokenizer(str(self.tiny_dir))

    def new_model(self, arch: str = "llama", **overrides) -> torch.nn.Module:
        model = tiny_causal_lm(arch, **overrides)
        self.tracked.append((model, model_state(model)))
        return model

    def track(self, model: torch.nn.Module) -> torch.nn.Module:
        self.tracked.append((model, model_state(model)))
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


def case_prune(**kw):
    return lambda c: pruner.prune(c.model, tiny_batches(), **kw)


def case_prune_batches(batches, **kw):
    return lambda c: pruner.prune(c.model, batches, **({"pruning_ratio": 0.5} | kw))


def case_config(**kw):
    return lambda c: pruner.PruneConfig(**({"target_sparsity": 0.2} | kw))


def case_missing_weights(c: Ctx):
    folder = c.exported()
    for f in folder.glob("*.safetensors"):
        f.unlink()
    return pruner.load_pretrained(folder)


def case_corrupt_weights(c: Ctx):
    folder = c.exported()
    for f in folder.glob("*.safetensors"):
        f.write_bytes(b"\x00garbage" * 10)
    return pruner.load_pretrained(folder)


def case_tensor_removed(c: Ctx, extra: bool = False):
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


def case_config_garbage(c: Ctx):
    folder = c.exported()
    (folder / "config.json").write_text("{not json")
    return pruner.load_pretrained(folder)


def case_existing_output(c: Ctx):
    c.write("out/keep.txt", "user data")
    return pruner.save_pretrained(c.model, c.tmp / "out")


def case_overwrite_not_an_export(c: Ctx):
    c.write("out/keep.txt", "user data")
    return pruner.save_pretrained(c.model, c.tmp / "out", overwrite=True)


def case_output_is_a_file(c: Ctx, overwrite: bool):
    return pruner.save_pretrained(c.model, c.write("out.bin", "x"), overwrite=overwrite)


def case_output_is_cwd(c: Ctx):
    return pruner.save_pretrained(c.model, ".", overwrite=True)


def case_output_parent_not_writable(c: Ctx):
    if os.geteuid() == 0:  # root writes anywhere: make the parent a file instead (not a folder to write in)
        return pruner.save_pretrained(c.model, Path(c.write("parent-file", "x")) / "out")
    locked = c.folder("locked")
    locked.chmod(0o500)
    try:
        return pruner.save_pretrained(c.model, locked / "out")
    finally:
        locked.chmod(0o700)


def case_extra_file_path(c: Ctx):
    return pruner.save_pretrained(c.model, c.tmp / "out", extra_files={"../escape.md": "x"})


def case_plan_edit(c: Ctx, edit: Callable[[dict], None]):
    plan = pruner.prune(tiny_causal_lm("llama"), tiny_batches(), pruning_ratio=0.5)  # a prepared input
    data = plan.to_dict()
    edit(data)
    path = c.write("plan.json", json.dumps(data))
    return pruner.apply_plan(pruner.Plan.load(path), c.model)


def case_foreign_plan(c: Ctx):
    plan = pruner.prune(tiny_causal_lm("llama", num_hidden_layers=4), tiny_batches(), pruning_ratio=0.5)
    path = c.tmp / "plan.json"
    plan.save(path)
    c.prepared.add(path)
    return pruner.apply_plan(pruner.Plan.load(path), c.model)


def case_other_weights(c: Ctx):
    plan = pruner.prune(tiny_causal_lm("llama", seed=7), tiny_batches(), pruning_ratio=0.5)
    return pruner.apply_plan(plan, c.model)  # same shapes, other weights


def case_set_layer(key, value):
    def edit(d):
        d["layers"][1][key] = value

    return edit


def case_reorder(d):
    d["layers"][0], d["layers"][1] = d["layers"][1], d["layers"][0]


def case_alpaca(c: Ctx, text: str):
    from pruner.data import alpaca_records

    return alpaca_records(c.write("alpaca.json", text))


def case_zeroshot(c: Ctx, text: str, limit=None):
    from pruner.eval.zeroshot import load_items

    return load_items(c.write("task.jsonl", text), limit)


def case_per_sample(c: Ctx):
    from pruner.importance import ImportanceEstimator
    from pruner.structure import discover

    fams = [discover(c.model).layers[0].mlp.channels]
    ImportanceEstimator(c.model, fams, "element2").begin_batch(4)


def case_nan_gradients(c: Ctx):
    model = c.new_model()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    c.tracked[-1] = (model, model_state(model))  # the NaN is the prepared input; nothing else may change
    return pruner.prune(model, tiny_batches(), pruning_ratio=0.5)


def case_gpt2(c: Ctx):
    import transformers as tf

    cfg = tf.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=128, bos_token_id=1, eos_token_id=2)
    return pruner.prune(c.track(tf.GPT2LMHeadModel(cfg)), tiny_batches(), pruning_ratio=0.5)


def case_base_model(c: Ctx):
    import transformers as tf

    model = tf.LlamaModel(c.model.config)
    model.config = c.model.config.__class__(**c.model.config.to_dict())
    return pruner.prune(c.track(model), tiny_batches(), pruning_ratio=0.5)


def case_gemma_channels(c: Ctx):
    import transformers as tf

    cfg = tf.GemmaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=128)
    return pruner.prune(c.track(tf.GemmaForCausalLM(cfg).eval()), tiny_batches(), mode="channel", pruning_ratio=0.25)


def case_fit(c: Ctx, callback_kw: dict | None = None, module_kw: dict | None = None, data_kw: dict | None = None,
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


def case_grad_scaler(c: Ctx):
    """fp16 AMP (a GradScaler) exists on GPUs only; the callback's check, on such a precision plugin."""
    import lightning as L
    from lightning.pytorch.plugins.precision import MixedPrecision

    from pruner.callbacks import StructuralPruneCallback
    from pruner.lightning_modules.causal_lm import CausalLMModule

    trainer = L.Trainer(accelerator="cpu", logger=False, default_root_dir=c.tmp)
    trainer.strategy.precision_plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    StructuralPruneCallback(pruning_ratio=0.5, calibration_batches=2).setup(trainer, CausalLMModule(str(c.tiny_dir)),
                                                                             "fit")


def case_callback(**kw):
    def run(c: Ctx):
        from pruner.callbacks import StructuralPruneCallback

        return StructuralPruneCallback(**({"pruning_ratio": 0.5} | kw))

    return run


def case_module(**kw):
    def run(c: Ctx):
        from pruner.lightning_modules.causal_lm import CausalLMModule

        return CausalLMModule(str(c.tiny_dir), **kw)

    return run


def case_datamodule(**kw):
    def run(c: Ctx):
        from pruner.lightning_modules.data import PruneDataModule

        return PruneDataModule(**kw)

    return run


def case_lora_settings(**kw):
    def run(c: Ctx):
        from pruner.recovery import LoraSettings

        return LoraSettings(**kw)

    return run


def case_missing_module_model(c: Ctx):
    from pruner.lightning_modules.causal_lm import CausalLMModule

    return CausalLMModule("./no/such/model")


def case_ranks_disagree(c: Ctx):
    from types import SimpleNamespace

    from pruner.callbacks.distributed import check_ranks_agree

    plan = pruner.prune(tiny_causal_lm("llama"), tiny_batches(), pruning_ratio=0.5)
    # rank 1's view: rank 0 broadcast another digest; the reduce counts one disagreeing rank
    strategy = SimpleNamespace(broadcast=lambda obj, src=0: "digest-of-rank-0", reduce=lambda t, reduce_op="sum": t)
    check_ranks_agree(SimpleNamespace(strategy=strategy, world_size=2), plan)


def case_cli_args(c: Ctx, *args: str):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "pruner", *args], capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT, cwd=c.tmp, env=env)
    lines = proc.stderr.strip().splitlines()
    raise PrunerError(f"exit {proc.returncode}: {lines[-1] if lines else ''}"
                      + (" Traceback" if "Traceback" in proc.stderr else ""))


def case_cli(c: Ctx, yaml: str, *args: str):
    return case_cli_args(c, "fit", "--config", c.write("bad.yaml", yaml), "--model.model", str(c.tiny_dir), *args)


def case_callback_yaml(init_args: str) -> str:
    return ("trainer:\n  max_steps: 2\n  callbacks:\n    - class_path: pruner.callbacks.StructuralPruneCallback\n"
            f"      init_args: {init_args}\n")


def case_evaluate(c: Ctx, *args: str):
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


def case_load_model(**kw):
    return lambda c: pruner.load_model(str(c.tiny_dir), **kw)


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


def leftovers(ctx: Ctx) -> list[str]:
    """Files and folders in ``tmp`` that the case did not prepare (temporary siblings, logs, ...)."""
    out = []
    for path in ctx.tmp.rglob("*"):
        if any(path == p or p in path.parents for p in ctx.prepared):
            continue
        if path.is_dir() and any(p.parent == path or path in p.parents for p in ctx.prepared):
            continue  # a folder that holds prepared files
        out.append(str(path.relative_to(ctx.tmp)))
    return out


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}
