"""StructuralPruneCallback in users' own trainers: ordinary LightningModules that hold a Hugging
Face causal LM and import nothing from pruner (tests/plain_modules.py), with plain DataLoaders.
The plan must equal ``pruner.prune`` on the same batches; calibration must move no weight
whatever the optimizer; recovery trains LoRA only; exports reload with ``from_pretrained``;
a fresh process resumes a checkpoint written after the prune step; DDP and FSDP2 with two
processes match one process."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.testing import assert_close
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

import pruner
from pruner.callbacks import StructuralPruneCallback
from pruner.errors import PrunerError
from tests.helpers import SUBPROCESS_TIMEOUT

from .plain_modules import MyFinetune, NestedFinetune, SGDFinetune, TupleFinetune

HERE = Path(__file__).resolve().parent


def test_the_plain_modules_import_nothing_from_pruner():
    tree = ast.parse((HERE / "plain_modules.py").read_text())
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert imported and not any(m.split(".")[0] == "pruner" for m in imported), imported


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from pruner.testing import tiny_causal_lm

    folder = tmp_path_factory.mktemp("plain-model")
    tiny_causal_lm("llama").save_pretrained(folder)  # hidden 64, 3 layers, 4 query / 2 KV heads, MLP 96
    return folder


def samples(n: int, seq_len: int = 16, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (n, seq_len), generator=g)
    return [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()} for x in ids]


def loader(n: int, batch_size: int = 2, seed: int = 0) -> DataLoader:
    return DataLoader(samples(n, seed=seed), batch_size=batch_size, shuffle=False)


def trainer(tmp_path, callbacks, **kw) -> L.Trainer:
    return L.Trainer(**{**dict(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                               enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                               callbacks=callbacks), **kw})


def reference_plan(model_dir: Path, batches: DataLoader, n: int, **options):
    dense = AutoModelForCausalLM.from_pretrained(model_dir)
    return pruner.prune(dense, [b for _, b in zip(range(n), batches)], **options)


class Watch(L.Callback):
    """Records whether any weight moved in each calibration batch, the losses, and what trains."""

    def __init__(self, calibration: int, attr: str = "model") -> None:
        self.calibration, self.attr, self.moved, self.losses = calibration, attr, [], []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.before = {n: p.detach().clone() for n, p in module.named_parameters()}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))
        if batch_idx < self.calibration - 1:  # the last calibration batch ends with the prune step
            self.moved.append(any(not torch.equal(p, self.before[n]) for n, p in module.named_parameters()))
        if batch_idx == self.calibration:  # the first recovery step
            self.trainable = sorted(n for n, p in module.named_parameters() if p.requires_grad)
            self.changed = sorted(n for n, p in module.named_parameters()
                                  if n in self.before and not torch.equal(p, self.before[n]))


OPTIONS = dict(target_sparsity=0.2, attention_layers=(0, 3), mlp_layers=(0, 3),
               global_ranking=False)  # local: every layer alike (a plain config)


def test_plain_module_prunes_like_pruner_prune_recovers_lora_only_and_exports(model_dir, tmp_path):
    L.seed_everything(0, verbose=False)
    module = MyFinetune(str(model_dir))
    model = module.model
    watch = Watch(calibration=4)
    prune = StructuralPruneCallback(calibration_batches=4, export_dir=str(tmp_path / "export"), verbose=False,
                                    **OPTIONS)
    trainer(tmp_path, [prune, watch]).fit(module, loader(20))
    assert prune.model_path == "model" and module.model is model  # pruned in place, same object
    assert watch.moved == [False, False, False]
    reference = reference_plan(model_dir, loader(20), 4, **OPTIONS)
    assert prune.plan.to_dict()["layers"] == reference.to_dict()["layers"] and not prune.plan.is_identity
    assert_close([g["score"] for g in prune.plan.group_records()], [g["score"] for g in reference.group_records()],
                 rtol=1e-5, atol=0)
    assert prune.plan.params == reference.params
    assert prune.plan.params["removed_fraction"] == pytest.approx(0.2, abs=0.05)  # units of 2 heads or 1 channel
    # recovery: only the LoRA adapters train, the loss is finite
    assert watch.trainable and all("lora_" in n for n in watch.trainable)
    assert watch.changed and all("lora_" in n for n in watch.changed)
    assert all(torch.isfinite(torch.tensor(watch.losses)))
    # export: LoRA merged, the same layer widths everywhere -> a plain config for plain from_pretrained
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    assert "auto_map" not in json.loads((tmp_path / "export" / "config.json").read_text())
    assert sum(p.numel() for p in exported.parameters()) == prune.plan.params["after"]
    ids = torch.randint(3, 128, (2, 12))
    with torch.no_grad():
        assert_close(exported(input_ids=ids).logits, module.model.eval()(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_nested_model_is_found_and_the_users_own_loss_drives_importance(model_dir, tmp_path):
    L.seed_everything(0, verbose=False)
    module = NestedFinetune(str(model_dir))
    prune = StructuralPruneCallback(calibration_batches=4, verbose=False, **OPTIONS)
    trainer(tmp_path, [prune], max_steps=6).fit(module, loader(20))
    assert prune.model_path == "backbone.lm"
    # the user's cross entropy at temperature 1 is the model's own loss: the same plan
    assert prune.plan.to_dict()["layers"] == reference_plan(model_dir, loader(20), 4, **OPTIONS).to_dict()["layers"]
    assert module.backbone.lm.model.layers[0].mlp.down_proj.base_layer.in_features < 96


def test_sgd_with_momentum_decay_and_a_step_scheduler_moves_no_weight_during_calibration(model_dir, tmp_path):
    L.seed_everything(0, verbose=False)
    module = SGDFinetune(str(model_dir))

    class LR(L.Callback):
        lrs: list = []

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            LR.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    watch = Watch(calibration=4)
    prune = StructuralPruneCallback(calibration_batches=4, verbose=False, **OPTIONS)
    trainer(tmp_path, [prune, watch, LR()], max_steps=7).fit(module, loader(20))
    assert watch.moved == [False, False, False]  # no update, no decay, no momentum during calibration
    assert prune.plan.to_dict()["layers"] == reference_plan(model_dir, loader(20), 4, **OPTIONS).to_dict()["layers"]
    # the scheduler stepped through calibration, then was rebuilt with the optimizer at the prune step
    assert LR.lrs[:5] == pytest.approx([0.05, 0.025, 0.0125, 0.00625, 0.05])
    assert watch.changed and all("lora_" in n for n in watch.changed)


def test_without_lora_every_weight_of_the_pruned_model_trains(model_dir, tmp_path):
    L.seed_everything(0, verbose=False)
    module = MyFinetune(str(model_dir))
    watch = Watch(calibration=4)
    prune = StructuralPruneCallback(calibration_batches=4, attach_lora=False, verbose=False, **OPTIONS)
    trainer(tmp_path, [prune, watch], max_steps=6).fit(module, loader(20))
    assert watch.moved == [False, False, False]
    assert not any("lora_" in n for n in watch.trainable) and len(watch.trainable) == len(list(module.parameters()))
    assert "model.model.layers.0.mlp.down_proj.weight" in watch.changed


@pytest.mark.parametrize("kwargs, message", [
    (dict(model_attribute="backbone"), "model_attribute='backbone' is a Backbone, not a transformers causal LM"),
    (dict(model_attribute="nope"), "has no submodule 'nope'"),
], ids=["not-a-causal-lm", "missing"])
def test_model_attribute_errors_name_what_was_found(model_dir, tmp_path, kwargs, message):
    module = NestedFinetune(str(model_dir))
    with pytest.raises(PrunerError, match=message):
        trainer(tmp_path, [StructuralPruneCallback(pruning_ratio=0.5, calibration_batches=2, **kwargs)],
                max_steps=3).fit(module, loader(8))
    assert module.backbone.lm.model.layers[0].mlp.down_proj.in_features == 96  # untouched


def test_several_or_no_causal_lms_are_refused_with_the_fix(model_dir, tmp_path):
    class Two(MyFinetune):
        def __init__(self, path):
            super().__init__(path)
            self.reference = AutoModelForCausalLM.from_pretrained(path)

    class Empty(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 2)

        def training_step(self, batch, batch_idx):
            return self.layer(batch["input_ids"].float()[:, :2]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(PrunerError, match=r"several causal LMs \('model', 'reference'\).*model_attribute='model'"):
        trainer(tmp_path, [StructuralPruneCallback(pruning_ratio=0.5, calibration_batches=2)], max_steps=3).fit(
            Two(str(model_dir)), loader(8))
    with pytest.raises(PrunerError, match="holds no transformers causal LM.*AutoModelForCausalLM"):
        trainer(tmp_path, [StructuralPruneCallback(pruning_ratio=0.5, calibration_batches=2)], max_steps=3).fit(
            Empty(), loader(8))


def test_calibration_count_is_required_without_a_datamodule_that_has_one(model_dir, tmp_path):
    module = MyFinetune(str(model_dir))
    with pytest.raises(PrunerError, match="pass calibration_batches=N"):
        trainer(tmp_path, [StructuralPruneCallback(pruning_ratio=0.5)], max_steps=3).fit(module, loader(8))


@pytest.mark.parametrize("options, message", [
    (dict(attention_selection="measured"), "attention_selection='measured' runs the calibration batches again"),
    (dict(iterative_steps=2), "iterative_steps=2 runs the calibration batches again"),
    (dict(reconstruct=True, mlp_selection="obs-fisher"),
     "mlp_selection='obs-fisher' without reconstruction text runs the calibration batches again"),
    (dict(reconstruct=True, mlp_selection="obs"),
     r"reconstruct=True without reconstruction text \(the refit walks the calibration batches\)"),
    (dict(mlp_selection="score"), None),  # no passes of its own: any batch will do
])
def test_tuple_batches_are_refused_only_where_the_callback_reruns_them(model_dir, tmp_path, options, message):
    ids = torch.stack([s["input_ids"] for s in samples(8)])
    tuples = DataLoader(list(zip(ids, ids.clone())), batch_size=2)  # batches (input_ids, labels)
    callback = StructuralPruneCallback(pruning_ratio=0.5, calibration_batches=2, attach_lora=False, **options)
    fit = trainer(tmp_path, [callback], max_steps=3).fit
    if message is None:
        fit(TupleFinetune(str(model_dir)), tuples)
        assert callback.plan is not None
    else:
        with pytest.raises(PrunerError, match=message + r".*dict batches holding 'input_ids'.*got list"):
            fit(TupleFinetune(str(model_dir)), tuples)


def test_tuple_batches_refit_on_the_datamodules_reconstruction_text(model_dir, tmp_path):
    class TupleText(L.LightningDataModule):
        def train_dataloader(self) -> DataLoader:
            ids = torch.stack([s["input_ids"] for s in samples(8)])
            return DataLoader(list(zip(ids, ids.clone())), batch_size=2)

        def reconstruction_batches(self) -> list[torch.Tensor]:
            return [torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(i)) for i in range(2)]

    options = dict(pruning_ratio=0.5, reconstruct=True, mlp_selection="obs")
    callback = StructuralPruneCallback(calibration_batches=2, attach_lora=False, verbose=False, **options)
    module = TupleFinetune(str(model_dir))
    trainer(tmp_path, [callback], max_steps=2).fit(module, datamodule=TupleText())  # ends at the prune step
    dense = AutoModelForCausalLM.from_pretrained(model_dir)
    reference = pruner.prune(dense, [b for _, b in zip(range(2), loader(8))],
                             reconstruction_batches=TupleText().reconstruction_batches(), **options)
    assert callback.plan.to_dict()["layers"] == reference.to_dict()["layers"]
    assert_close(module.model.state_dict(), dense.state_dict(), rtol=1e-5, atol=1e-6)


def test_a_bad_export_folder_is_refused_before_any_calibration(model_dir, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("the user's own file")
    (tmp_path / "a-file").write_text("x")
    for folder, message in ((tmp_path / "taken", "already exists and is not empty"),
                            (tmp_path / "a-file", "is an existing file")):
        watch = Watch(calibration=2)
        prune = StructuralPruneCallback(pruning_ratio=0.5, calibration_batches=2, export_dir=str(folder))
        with pytest.raises(PrunerError, match=message):
            trainer(tmp_path, [prune, watch], max_steps=3).fit(MyFinetune(str(model_dir)), loader(8))
        assert watch.losses == []  # refused in setup: not one batch ran
    assert (tmp_path / "taken" / "notes.txt").read_text() == "the user's own file"


# ----------------------------------------------------------------------------- in fresh processes

SCRIPT = '''
import json, sys
sys.path.insert(0, sys.argv[2])
import lightning as L, torch
from torch.utils.data import DataLoader
from plain_modules import MODULES
from pruner.callbacks import StructuralPruneCallback

spec = json.load(open(sys.argv[1]))
L.seed_everything(0, verbose=False)
data = torch.load(spec["data"])
samples = [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()} for x in data]
module = MODULES[spec["module"]](spec["model_dir"])
prune = StructuralPruneCallback(verbose=False, lora_dropout=0.0, **spec["callback"])
callbacks = [prune]
if spec.get("checkpoint"):
    from lightning.pytorch.callbacks import ModelCheckpoint
    callbacks.append(ModelCheckpoint(dirpath=spec["out"], filename="epoch{epoch}", save_top_k=-1))
strategy = spec.get("strategy", "auto")
if strategy == "fsdp2":
    from lightning.pytorch.strategies import ModelParallelStrategy
    shards = spec.get("hsdp_shards", 1)  # HybridShardedFinetune: the mesh's second (sharding) dimension
    strategy = ModelParallelStrategy(data_parallel_size=spec["devices"] // shards, tensor_parallel_size=shards)
trainer = L.Trainer(accelerator="cpu", devices=spec.get("devices", 1), strategy=strategy,
                    max_epochs=spec.get("epochs", 1), max_steps=spec.get("max_steps", -1), logger=False,
                    enable_checkpointing=bool(spec.get("checkpoint")), enable_progress_bar=False,
                    enable_model_summary=False, default_root_dir=spec["out"], callbacks=callbacks,
                    use_distributed_sampler=False)  # Lightning's would shuffle: each rank takes every world-th sample
samples = samples[trainer.global_rank::trainer.world_size]
trainer.fit(module, DataLoader(samples, batch_size=spec["batch_size"], shuffle=False), ckpt_path=spec.get("ckpt_in"))
model = prune.model(module)
full = lambda p: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
torch.save({"plan": prune.plan.to_dict() if prune.plan else None, "vectors": prune.vectors,
            "step": trainer.global_step, "weights": {n: full(p) for n, p in model.named_parameters()}},
           f"{spec['out']}/rank{trainer.global_rank}.pt")
'''


def run(tmp_path: Path, model_dir: Path, name: str, **spec) -> list[dict]:
    out = tmp_path / name
    out.mkdir()
    if not (tmp_path / "data.pt").exists():
        torch.save(torch.randint(3, 128, (24, 16), generator=torch.Generator().manual_seed(0)), tmp_path / "data.pt")
    spec = {"out": str(out), "data": str(tmp_path / "data.pt"), "model_dir": str(model_dir), **spec}
    (tmp_path / "run.py").write_text(SCRIPT)
    (out / "spec.json").write_text(json.dumps(spec))
    # generous: a busy 2-core machine runs these several times slower than an idle one
    proc = subprocess.run([sys.executable, str(tmp_path / "run.py"), str(out / "spec.json"), str(HERE)],
                          capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(spec.get("devices", 1))]


@pytest.mark.slow
def test_a_fresh_process_resumes_after_the_prune_step_and_exports_the_same_model(model_dir, tmp_path):
    callback = {"calibration_batches": 4, **{k: list(v) if isinstance(v, tuple) else v for k, v in OPTIONS.items()}}
    common = dict(module="MyFinetune", batch_size=2)
    run(tmp_path, model_dir, "full", epochs=2, callback={**callback, "export_dir": str(tmp_path / "export-full")},
        **common)
    # epoch 0 (calibration, prune, recovery) ends with a checkpoint; a new process does epoch 1
    run(tmp_path, model_dir, "first", epochs=1, checkpoint=True, callback=callback, **common)
    (ckpt,) = (tmp_path / "first").glob("*.ckpt")
    run(tmp_path, model_dir, "resumed", epochs=2, ckpt_in=str(ckpt),
        callback={**callback, "export_dir": str(tmp_path / "export-resumed")}, **common)
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "export-full").state_dict()
    resumed = AutoModelForCausalLM.from_pretrained(tmp_path / "export-resumed").state_dict()
    assert full.keys() == resumed.keys()
    assert_close(resumed, full, rtol=1e-5, atol=1e-6)
    assert (json.loads((tmp_path / "export-full" / "plan.json").read_text())["layers"]
            == json.loads((tmp_path / "export-resumed" / "plan.json").read_text())["layers"])
    # other pruning settings than the checkpoint's are refused, naming them
    with pytest.raises(AssertionError, match=r"target_sparsity: checkpoint 0.2, callback 0.3"):
        run(tmp_path, model_dir, "changed", epochs=2, ckpt_in=str(ckpt), callback={**callback, "target_sparsity": 0.3},
            **common)


@pytest.mark.slow
@pytest.mark.parametrize("strategy, module, options, steps, devices, shards", [
    ("ddp", "MyFinetune", {}, 5, 2, 1),
    ("fsdp2", "ShardedFinetune", {}, 5, 2, 1),
    ("fsdp2", "HybridShardedFinetune", {}, 5, 4, 2),  # HSDP, 2 replicas x 2 shards
    # the layer window; compared at the prune step (ranks sum the Grams in another order)
    ("fsdp2", "HybridShardedFinetune", {"reconstruct": True, "mlp_selection": "obs"}, 2, 4, 2),
], ids=["ddp", "fsdp2", "hsdp-2x2", "hsdp-2x2-refit"])
def test_several_processes_give_the_plan_and_weights_of_one(model_dir, tmp_path, strategy, module, options, steps,
                                                            devices, shards):
    callback = {"calibration_batches": 2, **{k: list(v) if isinstance(v, tuple) else v for k, v in OPTIONS.items()},
                **options}
    # one process with batches of 4 == N ranks with batches of 4 / N (each rank takes every N-th sample)
    (single,) = run(tmp_path, model_dir, "single", module="MyFinetune", batch_size=4, callback=callback,
                    max_steps=steps)
    ranks = run(tmp_path, model_dir, strategy, module=module, batch_size=4 // devices, devices=devices,
                hsdp_shards=shards, strategy=strategy, callback=callback, max_steps=steps)
    r0 = ranks[0]
    assert all(r["plan"] == r0["plan"] for r in ranks) and r0["plan"]["layers"] == single["plan"]["layers"]
    assert r0["plan"]["calibration"]["samples"] == single["plan"]["calibration"]["samples"] == 8
    assert_close(r0["vectors"], single["vectors"], rtol=1e-5, atol=1e-9)
    assert r0["step"] == single["step"] == steps
    for r in ranks[1:]:
        assert_close(r["weights"], r0["weights"], rtol=0, atol=0)  # one model on every rank
    assert_close(r0["weights"], single["weights"], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_tensor_parallelism_is_refused_before_calibration(model_dir, tmp_path):
    callback = {"calibration_batches": 2, "pruning_ratio": 0.5}
    with pytest.raises(AssertionError, match=r"mlp.down_proj.weight is laid out as \(Shard\(dim=1\),\): tensor "
                                             r"parallelism is not supported.*fully_shard"):
        run(tmp_path, model_dir, "tp", module="TensorParallelFinetune", batch_size=2, devices=1, strategy="fsdp2",
            callback=callback, max_steps=3)


class TextData(L.LightningDataModule):
    """A user's own datamodule: train batches, and the refit's text through ``reconstruction_batches()``."""

    def __init__(self, text: list[torch.Tensor] | None) -> None:
        super().__init__()
        self.text = text

    def train_dataloader(self) -> DataLoader:
        return loader(8)

    def val_dataloader(self) -> DataLoader:
        return loader(4, seed=1)

    def reconstruction_batches(self) -> list[torch.Tensor]:
        return self.text


REGIONAL = dict(pruning_ratio=0.5, reconstruct=True, reconstruct_damping=0.01, mlp_selection="obs", regional_epochs=2)


def test_a_users_datamodule_feeds_the_regional_fit_like_pruner_prune(model_dir, tmp_path):
    text = [torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    module = MyFinetune(str(model_dir))
    prune = StructuralPruneCallback(calibration_batches=2, attach_lora=False, verbose=False, **REGIONAL)
    trainer(tmp_path, [prune], max_steps=2).fit(module, datamodule=TextData(text))  # ends at the prune step
    dense = AutoModelForCausalLM.from_pretrained(model_dir)
    reference = pruner.prune(dense, [b for _, b in zip(range(2), loader(8))], reconstruction_batches=text, **REGIONAL)
    assert prune.plan.to_dict()["layers"] == reference.to_dict()["layers"]
    report = prune.plan.calibration["regional"]
    assert report["layers"] == [0, 1, 2] and report == {**reference.calibration["regional"], "seconds": report["seconds"]}
    assert_close(module.model.state_dict(), dense.state_dict(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("data, message", [
    (None, r"fits the pruned MLPs on the refit's text, which comes from the datamodule's reconstruction_batches\(\)"),
    (TextData([]), r"reconstruction_batches\(\) gave no batch on this rank"),
])
def test_regional_without_text_is_refused_before_any_weight_changes(model_dir, tmp_path, data, message):
    module = MyFinetune(str(model_dir))
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    prune = StructuralPruneCallback(calibration_batches=2, attach_lora=False, verbose=False, **REGIONAL)
    fit = trainer(tmp_path, [prune], max_steps=2).fit
    with pytest.raises(PrunerError, match=message):
        fit(module, loader(8)) if data is None else fit(module, datamodule=data)
    assert prune.plan is None
    assert all(torch.equal(v, before[k]) for k, v in module.model.state_dict().items())
