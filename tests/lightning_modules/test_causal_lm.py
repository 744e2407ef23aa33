"""CausalLMModule on a tiny random LLaMA: LoRA training, the callback contract, validation."""

import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from pruner.errors import PrunerError
from pruner.lightning_modules.causal_lm import CausalLMModule
from pruner.lightning_modules.data import window_batch
from tests.helpers import SUBPROCESS_TIMEOUT


def _trainer(tmp_path, **kw) -> L.Trainer:
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                    default_root_dir=tmp_path)
    return L.Trainer(**{**defaults, **kw})


def _repeated(batch: dict, n: int) -> DataLoader:
    return DataLoader([batch] * n, batch_size=None)


def _batch(seed: int = 0, vocab: int = 300) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return window_batch(torch.randint(3, vocab, (2, 24), generator=gen))


def _loss(module: CausalLMModule, batch: dict) -> float:
    with torch.no_grad():
        return module(**batch).loss.item()


def test_lora_training_changes_only_lora_and_lowers_loss(tiny_dir, tmp_path):
    torch.manual_seed(0)
    module = CausalLMModule(str(tiny_dir), attach_lora_at_start=True, lora_dropout=0.0, learning_rate=1e-2)
    module.configure_model()
    batch = _batch()
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    loss_before = _loss(module, batch)
    _trainer(tmp_path, max_steps=3).fit(module, _repeated(batch, 3))
    changed = {n for n, p in module.named_parameters() if not torch.equal(p, before[n])}
    assert changed, "training changed nothing"
    assert all("lora_" in n for n in changed), sorted(changed)[:5]
    # lora_B starts at zero, so step 1 only moves B; after 3 steps both A and B moved.
    assert any("lora_A" in n for n in changed) and any("lora_B" in n for n in changed)
    assert _loss(module, batch) < loss_before - 0.01


def test_merge_lora_keeps_the_function(tiny_dir, tmp_path):
    module = CausalLMModule(str(tiny_dir), attach_lora_at_start=True, lora_dropout=0.0, learning_rate=1e-2)
    _trainer(tmp_path, max_steps=2).fit(module, _repeated(_batch(), 2))
    batch = _batch(1)
    module.eval()
    with torch.no_grad():
        logits = module(**batch).logits
    module.merge_lora()
    assert not module.has_lora
    assert type(module.hf_model).__name__ == "LlamaForCausalLM"
    assert not any("lora_" in n for n, _ in module.named_parameters())
    with torch.no_grad():
        assert torch.allclose(module(**batch).logits, logits, atol=1e-5)
    with pytest.raises(PrunerError, match="has no LoRA adapters to merge"):
        module.merge_lora()


class ShrinkMLPThenLoRA(L.Callback):
    """What the pruning callback does: after the first batch, resize the model, attach LoRA and
    rebuild the optimizer through the strategy."""

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if batch_idx != 0:
            return
        mlp = module.hf_model.model.layers[0].mlp
        keep = torch.arange(0, mlp.up_proj.out_features, 2)
        for name in ("gate_proj", "up_proj"):
            old = getattr(mlp, name)
            new = torch.nn.Linear(old.in_features, len(keep), bias=False)
            new.weight.data = old.weight.data[keep].clone()
            setattr(mlp, name, new)
        old = mlp.down_proj
        mlp.down_proj = torch.nn.Linear(len(keep), old.out_features, bias=False)
        mlp.down_proj.weight.data = old.weight.data[:, keep].clone()
        module.attach_lora()
        trainer.strategy.setup_optimizers(trainer)
        self.snapshot = {n: p.detach().clone() for n, p in module.named_parameters()}


def test_resized_model_and_late_lora_are_trained(tiny_dir, tmp_path):
    module = CausalLMModule(str(tiny_dir), lora_dropout=0.0, learning_rate=1e-2)  # dense at start
    callback = ShrinkMLPThenLoRA()
    _trainer(tmp_path, max_steps=3, callbacks=[callback]).fit(module, _repeated(_batch(), 3))
    assert module.has_lora
    assert module.hf_model.model.layers[0].mlp.down_proj.in_features == 32
    optimizer = module.trainer.optimizers[0]
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    trainable = [p for p in module.parameters() if p.requires_grad]
    assert trainable and {id(p) for p in trainable} == in_optimizer
    changed = {n for n, p in module.named_parameters() if not torch.equal(p, callback.snapshot[n])}
    assert changed and all("lora_" in n for n in changed)
    assert any("layers.0.mlp.down_proj.lora_" in n for n in changed)


def test_validation_perplexity(tiny_dir, tmp_path):
    module = CausalLMModule(str(tiny_dir))
    loader = DataLoader([_batch(i) for i in range(3)], batch_size=None)
    (metrics,) = _trainer(tmp_path).validate(module, loader)
    # Equal-length windows and batches: token-level perplexity == exp(mean batch loss).
    assert metrics["val_ppl"] == pytest.approx(math.exp(metrics["val_loss"]), rel=1e-4)
    assert 10 < metrics["val_ppl"] < 10 * len(module.tokenizer)


def test_dtype_auto_is_float32_on_cpu_and_contract(tiny_dir):
    module = CausalLMModule(str(tiny_dir))
    assert module.lm is None  # weights wait for configure_model
    model = module.hf_model  # ... or the first access
    assert model.dtype == torch.float32
    assert all(p.requires_grad for p in module.parameters())  # no LoRA: full fine-tuning
    module.attach_lora()
    assert module.hf_model is model  # LoRA is injected in place
    with pytest.raises(PrunerError, match="already has adapters"):
        module.attach_lora()
    module.merge_lora()
    assert module.hf_model is model and not module.has_lora


def test_argument_validation(tiny_dir):
    with pytest.raises(PrunerError, match=r"dtype='float16'\)` is not supported: use 'auto'"):
        CausalLMModule(str(tiny_dir), dtype="float16")
    with pytest.raises(PrunerError, match=r"LoRA rank r=0 must be an integer >= 1"):
        CausalLMModule(str(tiny_dir), lora_r=0)
    with pytest.raises(PrunerError, match=r"LoRA target_modules=\(\) must be a non-empty list"):
        CausalLMModule(str(tiny_dir), lora_target_modules=[])
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        CausalLMModule("./no/such/model")


def test_checkpoint_of_a_pruning_fit_loads_without_a_trainer(tiny_dir, tmp_path):
    from pruner.callbacks import StructuralPruneCallback, load_pruned_checkpoint
    from pruner.lightning_modules.data import PruneDataModule

    module = CausalLMModule(str(tiny_dir), learning_rate=1e-2)
    prune = StructuralPruneCallback(pruning_ratio=0.5, calibration_batches=2, lora_dropout=0.0, verbose=False)
    trainer = _trainer(tmp_path, max_steps=4, callbacks=[prune])
    trainer.fit(module, PruneDataModule(calibration_samples=2, calibration_seq_len=16, recovery_source="builtin",
                                        recovery_max_records=8, micro_batch_size=2, cutoff_len=16))
    ckpt = tmp_path / "pruned.ckpt"
    trainer.save_checkpoint(ckpt)
    batch = _batch(1)
    fresh = load_pruned_checkpoint(CausalLMModule(str(tiny_dir)), ckpt)  # dense, no LoRA, then rebuilt
    assert fresh.has_lora and fresh.hf_model.model.layers[0].mlp.down_proj.in_features == 32
    trained = dict(module.named_parameters())
    assert all(torch.equal(p, trained[n]) for n, p in fresh.named_parameters())
    assert _loss(fresh.eval(), batch) == pytest.approx(_loss(module.eval(), batch), rel=1e-6)
    with pytest.raises(PrunerError, match="holds no StructuralPruneCallback state"):
        plain = tmp_path / "plain.ckpt"
        torch.save({"state_dict": {}, "callbacks": {}}, plain)
        load_pruned_checkpoint(CausalLMModule(str(tiny_dir)), plain)


MULTI_SCRIPT = """
import json, sys, torch, lightning as L
from lightning.pytorch.strategies import ModelParallelStrategy
from pruner.lightning_modules.causal_lm import CausalLMModule
from pruner.lightning_modules.data import PruneDataModule
model_dir, out, kind, alpaca = sys.argv[1:5]
json.dump([{"instruction": f"Count to {i}.", "output": " ".join(map(str, range(i)))} for i in range(12)],
          open(alpaca, "w"))
strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) if kind == "fsdp2" else "ddp"
module = CausalLMModule(model_dir, attach_lora_at_start=True, lora_dropout=0.0, learning_rate=1e-2)
data = PruneDataModule(calibration_samples=8, calibration_seq_len=32, recovery_source=alpaca,
                       micro_batch_size=2, recovery_epochs=1)
trainer = L.Trainer(max_steps=6, accelerator="cpu", devices=2, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, default_root_dir=out,
                    strategy=strategy)
trainer.fit(module, data)
name, p = next((n, p) for n, p in module.named_parameters() if "lora_A" in n)
local = p.to_local() if hasattr(p, "to_local") else p
full = p.full_tensor() if hasattr(p, "full_tensor") else p
torch.save({"local": tuple(local.shape), "full": full.detach(), "calib": data.calibration_batches,
            "batches": len(data.train_dataloader()), "step": trainer.global_step},
           f"{out}/rank{trainer.global_rank}.pt")
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ddp", "fsdp2"])
def test_two_process_training_shards_data_and_keeps_ranks_in_sync(kind, tiny_dir, tmp_path):
    import subprocess
    import sys

    script = tmp_path / "multi.py"
    script.write_text(MULTI_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(tiny_dir), str(tmp_path), kind,
                           str(tmp_path / "alpaca.json")], capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    # lora_A is (8, 32): FSDP2 keeps half of it per rank, DDP all of it.
    assert r0["local"] == r1["local"] == ((4, 32) if kind == "fsdp2" else (8, 32))
    assert r0["calib"] == r1["calib"] == 4  # 8 calibration windows split over 2 ranks
    assert r0["batches"] == r1["batches"] == 4 + 12 // 2 // 2  # equal counts: no rank waits
    assert r0["step"] == r1["step"] == 6
    assert torch.equal(r0["full"], r1["full"])  # gradients were reduced: one model


class RecordLR(L.Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_linear_schedule_decays_over_the_recovery_steps(tiny_dir, tmp_path):
    from pruner.callbacks import StructuralPruneCallback
    from pruner.lightning_modules.data import PruneDataModule

    module = CausalLMModule(str(tiny_dir), learning_rate=1e-2, lr_schedule="linear", warmup_steps=1)
    prune = StructuralPruneCallback(pruning_ratio=0.5, calibration_batches=2, verbose=False)
    record = RecordLR()
    trainer = _trainer(tmp_path, max_steps=7, callbacks=[prune, record])
    trainer.fit(module, PruneDataModule(calibration_samples=2, calibration_seq_len=16, recovery_source="builtin",
                                        recovery_max_records=10, micro_batch_size=2, cutoff_len=16))
    assert trainer.global_step == 7
    # 2 calibration steps, then 5 recovery steps: one of warm-up (1e-2 / 2), then 4/4 .. 1/4 of 1e-2
    assert record.lrs[2:] == pytest.approx([5e-3, 1e-2, 7.5e-3, 5e-3, 2.5e-3])
    saved = trainer.lr_scheduler_configs[0].scheduler.state_dict()["lr_lambdas"][0]
    assert saved == {"warmup": 1, "steps": 5}  # in checkpoints: a resumed fit decays to the same end


def test_linear_schedule_needs_a_known_length(tiny_dir, tmp_path):
    class Endless(torch.utils.data.IterableDataset):
        def __iter__(self):
            while True:
                yield _batch()

    module = CausalLMModule(str(tiny_dir), lr_schedule="linear")
    with pytest.raises(PrunerError, match="needs to know how many steps the fit has: set trainer.max_steps"):
        _trainer(tmp_path, max_epochs=1).fit(module, DataLoader(Endless(), batch_size=None))
    with pytest.raises(PrunerError, match=r"lr_schedule='cosine'\)`: use 'constant' or 'linear'"):
        CausalLMModule(str(tiny_dir), lr_schedule="cosine")
    with pytest.raises(PrunerError, match=r"warmup_steps\)` must be an integer >= 0, got -1"):
        CausalLMModule(str(tiny_dir), warmup_steps=-1)
