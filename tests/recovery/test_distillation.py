"""Distillation recovery: the loss against hand computations, what it trains, the callback keeping the dense
teacher, teacher states instead of a teacher forward, and DDP / FSDP2."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from pruner.callbacks import StructuralPruneCallback
from pruner.errors import PrunerError
from pruner.recovery import distillation_loss
from pruner.testing import tiny_causal_lm
from tests.helpers import SUBPROCESS_TIMEOUT, run_in_subprocess
from tests.helpers import cpu_trainer as _trainer
from tests.helpers import write_alpaca as _alpaca


def _labels(b=2, t=7, v=13, masked=2):
    labels = torch.randint(0, v, (b, t), generator=torch.Generator().manual_seed(1))
    labels[:, :masked] = -100  # a masked prompt
    return labels


def test_alpha_zero_is_exactly_the_models_own_cross_entropy():
    model = tiny_causal_lm("llama")
    ids = torch.randint(3, 120, (2, 9), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :4] = -100
    out = model(input_ids=ids, labels=labels)
    parts = distillation_loss(out.logits, torch.randn_like(out.logits), labels, alpha=0.0)
    assert_close(parts.loss, out.loss)
    assert_close(parts.ce, out.loss)


@pytest.mark.parametrize("top_k", [None, 3])
def test_student_equal_to_teacher_has_zero_kl(top_k):
    logits = torch.randn(2, 7, 13)
    parts = distillation_loss(logits, logits.clone(), _labels(), alpha=0.7, temperature=2.0, top_k=top_k)
    assert_close(parts.kl, torch.tensor(0.0), atol=1e-6, rtol=0)
    assert_close(parts.loss, 0.3 * parts.ce)


def test_kl_matches_a_hand_computation_with_temperature_and_mask():
    s, t, labels = torch.randn(2, 7, 13), torch.randn(2, 7, 13), _labels()
    T, alpha = 3.0, 0.4
    parts = distillation_loss(s, t, labels, alpha=alpha, temperature=T)
    mask = labels[:, 1:] != -100  # logits at t predict the label at t+1
    p_t = F.softmax(t[:, :-1][mask] / T, -1)
    expected_kl = (p_t * (p_t.log() - F.log_softmax(s[:, :-1][mask] / T, -1))).sum(-1).mean()
    assert_close(parts.kl, expected_kl)
    assert_close(parts.loss, alpha * expected_kl * T**2 + (1 - alpha) * parts.ce)
    # top_k over the whole vocabulary is the full KL; a smaller k differs
    assert_close(distillation_loss(s, t, labels, alpha, T, top_k=13).kl, expected_kl)
    assert not torch.isclose(distillation_loss(s, t, labels, alpha, T, top_k=2).kl, expected_kl)


def test_teacher_logits_without_the_last_position_give_the_same_loss():
    s, t, labels = torch.randn(2, 7, 13), torch.randn(2, 7, 13), _labels()
    whole = distillation_loss(s, t, labels, alpha=0.6, temperature=2.0)
    shifted = distillation_loss(s, t[:, :-1], labels, alpha=0.6, temperature=2.0)  # what cached states give
    assert_close(shifted.loss, whole.loss, rtol=0, atol=0)
    with pytest.raises(PrunerError, match=r"teacher logits \(2, 5, 13\) do not match the student's \(2, 7, 13\)"):
        distillation_loss(s, t[:, :-2], labels)


def test_bad_distillation_arguments(tiny_dir):
    from pruner.lightning_modules.causal_lm import CausalLMModule

    with pytest.raises(ValueError, match=r"alpha must be a number in \[0, 1\], got 1.5"):
        distillation_loss(torch.randn(1, 3, 5), torch.randn(1, 3, 5), torch.zeros(1, 3, dtype=torch.long), alpha=1.5)
    with pytest.raises(PrunerError, match="temperature must be a finite number > 0, got 0"):
        CausalLMModule(str(tiny_dir), distillation_alpha=0.5, distillation_temperature=0)
    with pytest.raises(PrunerError, match="top_k must be an integer >= 1, got 0"):
        CausalLMModule(str(tiny_dir), distillation_alpha=0.5, distillation_top_k=0)
    with pytest.raises(PrunerError, match="unused with distillation_alpha=0: set distillation_alpha > 0"):
        CausalLMModule(str(tiny_dir), teacher=str(tiny_dir))


@pytest.mark.parametrize("lora", [True, False])
def test_gradients_reach_only_the_trainable_student_weights(tiny_dir, lora):
    from pruner.lightning_modules.causal_lm import CausalLMModule

    module = CausalLMModule(str(tiny_dir), distillation_alpha=0.5)
    module.configure_model()
    module.keep_teacher(module.hf_model)
    if lora:
        module.attach_lora()
    ids = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    loss = module.training_step({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}, 0)
    loss.backward()
    grads = {n: p.grad for n, p in module.named_parameters()}
    assert all(p.grad is None for p in module.teacher.parameters())
    assert not any(n.startswith("_teacher") or "teacher" in n for n in module.state_dict())
    if lora:
        assert all((g is not None) == ("lora_" in n) for n, g in grads.items()), \
            [n for n, g in grads.items() if (g is not None) != ("lora_" in n)]
    else:
        assert all(g is not None for g in grads.values())
        assert any(g.abs().sum() > 0 for g in grads.values())



def test_a_teacher_handed_over_is_kept_as_it_is_and_only_in_the_teacher_dtype(tiny_dir):
    import pruner
    from pruner.callbacks.distributed import gather_reason
    from pruner.callbacks.recovery import teacher_in_place
    from pruner.lightning_modules.causal_lm import CausalLMModule

    dense, _ = pruner.load_model(str(tiny_dir))  # float32
    module = CausalLMModule(str(tiny_dir), distillation_alpha=0.5)
    module.keep_teacher(dense, copy=False)
    assert module.teacher is dense and not any(p.requires_grad for p in dense.parameters())
    assert teacher_in_place(module, dense)
    halved = CausalLMModule(str(tiny_dir), distillation_alpha=0.5, teacher_dtype="bfloat16")
    with pytest.raises(PrunerError, match="teacher_dtype"):
        halved.keep_teacher(dense, copy=False)
    assert halved.teacher is None
    assert not teacher_in_place(halved, dense)  # FSDP2 then gathers a copy to convert, and says why

    class OwnModule(L.LightningModule):  # a user's module whose keep_teacher always copies
        wants_teacher = True

        def keep_teacher(self, model):
            pass

    assert not teacher_in_place(OwnModule(), dense)
    assert gather_reason(copies_teacher=False) is None  # reconstruct too: its refit gathers a layer at a time
    assert "keep_teacher takes no copy=False" in gather_reason(copies_teacher=True)


def _prune_and_recover(tiny_dir, tmp_path, alpha):
    from pruner.lightning_modules.causal_lm import CausalLMModule
    from pruner.lightning_modules.data import PruneDataModule

    L.seed_everything(0, verbose=False)
    module = CausalLMModule(str(tiny_dir), learning_rate=1e-2, distillation_alpha=alpha,
                            distillation_temperature=1.0)
    data = PruneDataModule(calibration_samples=4, calibration_seq_len=32, micro_batch_size=2, recovery_epochs=6,
                           recovery_source=_alpaca(tmp_path / "alpaca.json"))
    _trainer(tmp_path, [StructuralPruneCallback(lora_dropout=0.0, pruning_ratio=0.5, verbose=False)]).fit(module, data)
    return module, data


def test_callback_keeps_the_dense_teacher_and_distillation_pulls_the_student_to_it(tiny_dir, tmp_path):
    import pruner

    distilled, data = _prune_and_recover(tiny_dir, tmp_path, alpha=1.0)
    plain, _ = _prune_and_recover(tiny_dir, tmp_path, alpha=0.0)
    dense, _ = pruner.load_model(str(tiny_dir))
    # the teacher is the untouched dense model; the student is pruned; the optimizer ignores the teacher
    assert_close(dict(distilled.teacher.named_parameters()), dict(dense.named_parameters()))
    assert distilled.hf_model.model.layers[0].mlp.up_proj.out_features == 32
    assert plain.teacher is None
    trainable = {id(p) for g in distilled.optimizers().optimizer.param_groups for p in g["params"]}
    assert not trainable & {id(p) for p in distilled.teacher.parameters()}
    # on the recovery data, the distilled student is closer to the dense model than the CE-trained one
    from pruner.lightning_modules.data import pad_collate

    batch = pad_collate(data.recovery, data.pad_id)
    with torch.no_grad():
        t = dense(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

        def kl(module):
            s = module.eval()(**batch).logits
            return distillation_loss(s, t, batch["labels"], alpha=1.0, temperature=1.0).kl

        assert kl(distilled) < 0.5 * kl(plain), (kl(distilled), kl(plain))


def _recovery_fit(tiny_dir, tmp_path, name, **module_args):
    from pruner.lightning_modules.causal_lm import CausalLMModule
    from pruner.lightning_modules.data import PruneDataModule

    class Batches(L.Callback):
        def __init__(self):
            self.losses, self.keys = [], []

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.losses.append(float(outputs["loss"]))
            self.keys.append(sorted(batch))

    L.seed_everything(0, verbose=False)
    module = CausalLMModule(str(tiny_dir), learning_rate=1e-2, **module_args)
    data = PruneDataModule(calibration_samples=2, calibration_seq_len=16, recovery_source="generated",
                           recovery_max_records=8, cutoff_len=24, micro_batch_size=4, recovery_epochs=2,
                           generation_cache=str(tmp_path / name))
    record = Batches()
    _trainer(tmp_path, [StructuralPruneCallback(lora_dropout=0.0, pruning_ratio=0.5, verbose=False), record]).fit(
        module, data)
    return module, record


def test_distillation_from_teacher_states_follows_the_teacher_forward(tiny_dir, tmp_path):
    with_states, states_run = _recovery_fit(tiny_dir, tmp_path, "states", distillation_alpha=0.5)
    forward, forward_run = _recovery_fit(tiny_dir, tmp_path, "forward", distillation_alpha=0.5, teacher_states=False)
    assert_close(states_run.losses, forward_run.losses, rtol=1e-5, atol=1e-6)
    assert_close(dict(with_states.hf_model.named_parameters()), dict(forward.hf_model.named_parameters()),
                 rtol=1e-4, atol=1e-5)
    # recovery batches carry the states; the teacher kept is the dense output layer alone
    assert states_run.keys[-1] == ["attention_mask", "input_ids", "labels", "teacher_states"]
    assert forward_run.keys[-1] == ["attention_mask", "input_ids", "labels"]
    assert isinstance(with_states.teacher, torch.nn.Linear)
    assert_close(with_states.teacher.weight, forward.teacher.get_output_embeddings().weight, rtol=0, atol=0)
    assert with_states.teacher.weight.data_ptr() != with_states.hf_model.get_output_embeddings().weight.data_ptr()
    assert sum(p.numel() for p in forward.teacher.parameters()) > 3 * with_states.teacher.weight.numel()
    # without distillation no module sees the key (a plain module's model would reject it)
    _, plain_run = _recovery_fit(tiny_dir, tmp_path, "plain")
    assert plain_run.keys[-1] == ["attention_mask", "input_ids", "labels"]


@pytest.mark.slow
def test_ddp_distillation_on_generated_text_keeps_ranks_identical(tiny_dir, tmp_path):
    _alpaca(tmp_path / "alpaca.json")
    spec = {"model_dir": str(tiny_dir), "devices": 2, "strategy": "ddp", "calibration_samples": 4,
            "module": {"distillation_alpha": 0.5},
            "data": {"recovery_source": "generated", "recovery_max_records": 8, "cutoff_len": 24,
                     "generation_cache": str(tmp_path / "cache"), "recovery_epochs": 2}}
    r0, r1 = run_in_subprocess(tmp_path, spec, "ddp")
    assert r0["plan"] == r1["plan"] and r0["plan"] is not None
    assert r0["recovery"] == r1["recovery"] and len(r0["recovery"]) == 8
    assert_close(r0["lora"], r1["lora"], rtol=0, atol=0)
    assert r0["teacher"] is not None and set(r0["teacher"]) == {"weight"}  # teacher states: the output layer alone
    (single,) = run_in_subprocess(tmp_path, {**spec, "devices": 1, "strategy": "auto"}, "single")
    assert single["recovery"] == r0["recovery"]  # the same text whatever the rank count



@pytest.mark.slow
def test_fsdp2_distillation_keeps_the_dense_shards_as_teacher_like_one_process(tiny_dir, tmp_path):
    """Under FSDP2 the teacher is the dense model's own shards, swapped out at the prune step: no
    rank gathers the whole model (a gather fails this test), and recovery is what one process with
    a whole dense copy as teacher does."""
    import pruner
    from pruner.io import load_pretrained

    dense, tok = pruner.load_model(str(tiny_dir))
    with torch.no_grad():
        dense.lm_head.weight.mul_(30.0)  # a sharp teacher: a random model's KL would start near zero
    pruner.save_pretrained(dense, tmp_path / "sharp", tokenizer=tok)
    _alpaca(tmp_path / "alpaca.json")
    runs = {}
    for name, extra in (("single", {"accumulate": 2}),
                        ("fsdp2", {"devices": 2, "strategy": "fsdp2", "forbid_whole_model_gathers": True})):
        callback = {"pruning_ratio": 0.5, "export_dir": str(tmp_path / f"export-{name}")}
        runs[name] = run_in_subprocess(tmp_path, {"model_dir": str(tmp_path / "sharp"), "callback": callback,
                                                  "module": {"distillation_alpha": 0.5}, **extra}, name)
    (single,), (r0, r1) = runs["single"], runs["fsdp2"]
    assert r0["plan"]["layers"] == r1["plan"]["layers"] == single["plan"]["layers"]
    assert r0["teacher_sharded"] and r1["teacher_sharded"] and not single["teacher_sharded"]
    for run in (r0, r1, single):  # the teacher is the dense model, untouched by pruning and recovery
        assert_close(run["teacher"], dict(dense.named_parameters()), rtol=0, atol=0)
    assert r0["step"] == r1["step"] == single["step"]
    a, b = load_pretrained(tmp_path / "export-fsdp2"), load_pretrained(tmp_path / "export-single")
    ids = torch.arange(1, 17).reshape(2, 8)
    assert_close(a(ids).logits, b(ids).logits, rtol=1e-4, atol=1e-5)
    # and distillation moved the student: the same fit without a teacher ends elsewhere
    callback = {"pruning_ratio": 0.5, "export_dir": str(tmp_path / "export-plain")}
    run_in_subprocess(tmp_path, {"model_dir": str(tmp_path / "sharp"), "callback": callback, "accumulate": 2}, "plain")
    plain = load_pretrained(tmp_path / "export-plain")
    assert not torch.allclose(plain(ids).logits, b(ids).logits, rtol=1e-3, atol=1e-3)


FSDP_SCRIPT = """
import sys, torch, lightning as L
from lightning.pytorch.strategies import ModelParallelStrategy
from pruner.lightning_modules.causal_lm import CausalLMModule
from pruner.lightning_modules.data import PruneDataModule
student, teacher, out = sys.argv[1:4]
L.seed_everything(0, verbose=False)
module = CausalLMModule(student, attach_lora_at_start=True, lora_dropout=0.0, learning_rate=1e-2,
                        distillation_alpha=1.0, distillation_temperature=1.0, teacher=teacher)
data = PruneDataModule(calibration_samples=2, calibration_seq_len=32, recovery_source="builtin",
                       recovery_max_records=8, cutoff_len=32, micro_batch_size=2, recovery_epochs=6)
kl = []
class Rec(L.Callback):
    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if "train_kl" in trainer.callback_metrics:
            kl.append(float(trainer.callback_metrics["train_kl"]))
trainer = L.Trainer(accelerator="cpu", devices=2, strategy=ModelParallelStrategy(data_parallel_size=2,
                    tensor_parallel_size=1), max_epochs=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, default_root_dir=out, callbacks=[Rec()])
trainer.fit(module, data)
name, p = next((n, p) for n, p in module.named_parameters() if "lora_B" in n)
torch.save({"kl": kl, "local": tuple(p.to_local().shape), "full": p.full_tensor().detach()},
           f"{out}/rank{trainer.global_rank}.pt")
"""


@pytest.mark.slow
def test_fsdp2_distillation_from_a_teacher_folder(tiny_dir, tmp_path):
    import subprocess
    import sys

    import pruner

    # teacher: the dense folder with a sharper head (a random model is near-uniform, so the KL
    # would start near zero); student: the same model pruned and exported
    dense, tok = pruner.load_model(str(tiny_dir))
    with torch.no_grad():
        dense.lm_head.weight.mul_(30.0)
    pruner.save_pretrained(dense, tmp_path / "teacher", tokenizer=tok)
    plan = pruner.prune(dense, [], pruning_ratio=0.5, criterion="l2")
    pruner.save_pretrained(dense, tmp_path / "student", tokenizer=tok, plan=plan)
    (tmp_path / "fsdp.py").write_text(FSDP_SCRIPT)
    proc = subprocess.run([sys.executable, str(tmp_path / "fsdp.py"), str(tmp_path / "student"),
                           str(tmp_path / "teacher"), str(tmp_path)], capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["local"][0] * 2 == r0["full"].shape[0]  # the student is sharded over the two ranks
    assert torch.equal(r0["full"], r1["full"])
    assert len(r0["kl"]) >= 10 and sum(r0["kl"][-3:]) < sum(r0["kl"][:3]), r0["kl"]
