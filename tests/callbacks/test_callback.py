"""StructuralPruneCallback on the tiny LLaMA: agreement with pruner.prune, recovery, export,
resuming from checkpoints in a fresh process, and 2-process DDP."""


import json

import lightning as L
import pytest
import torch
from torch.testing import assert_close

from pruner.callbacks import StructuralPruneCallback
from pruner.errors import PrunerError
from tests.helpers import cpu_trainer as _trainer
from tests.helpers import run_in_subprocess
from tests.helpers import write_alpaca as _alpaca


class Record(L.Callback):
    """Per-batch losses, and whether weights moved during the calibration batches."""

    def __init__(self, calibration: int) -> None:
        self.calibration, self.losses, self.moved_in_calibration = calibration, [], []

    def on_train_start(self, trainer, module):
        self.start = {n: p.detach().clone() for n, p in module.hf_model.named_parameters()}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        if batch_idx < self.calibration - 1:  # the last calibration batch is followed by pruning
            self.moved_in_calibration.append(
                any(not torch.equal(p, self.start[n]) for n, p in module.hf_model.named_parameters()))


def test_argument_validation():
    with pytest.raises(PrunerError, match="give exactly one of target_sparsity"):
        StructuralPruneCallback()
    with pytest.raises(PrunerError, match="unknown criterion 'taylor'"):
        StructuralPruneCallback(criterion="taylor", target_sparsity=0.2)
    with pytest.raises(PrunerError, match=r"attention_layers=\(4, 2\) is empty"):
        StructuralPruneCallback(target_sparsity=0.2, attention_layers=(4, 2))
    with pytest.raises(PrunerError, match=r"iterative_steps must be an integer >= 1, got 0"):
        StructuralPruneCallback(target_sparsity=0.2, iterative_steps=0)
    with pytest.raises(PrunerError, match=r"calibration_batches=0\)` must be an integer >= 1"):
        StructuralPruneCallback(target_sparsity=0.2, calibration_batches=0)
    with pytest.raises(PrunerError, match=r"prune_at_step=0\)` must be an integer >= 1"):
        StructuralPruneCallback(target_sparsity=0.2, prune_at_step=0)
    with pytest.raises(PrunerError, match="use prune_at_step >= calibration_batches"):
        StructuralPruneCallback(target_sparsity=0.2, calibration_batches=10, prune_at_step=5)
    cb = StructuralPruneCallback(pruning_ratio=0.25, attention_layers=[4, 30], mlp_layers=[4, 30])
    assert cb.config.attention_layers == (4, 30)  # YAML lists become tuples


def test_lora_at_start_and_layer_ranges_are_refused(tiny_dir, tmp_path):
    from pruner.lightning_modules.causal_lm import CausalLMModule
    from pruner.lightning_modules.data import PruneDataModule

    data = PruneDataModule(calibration_samples=2, calibration_seq_len=16)
    with pytest.raises(PrunerError, match="already has LoRA/peft adapters.*set model.attach_lora_at_start: false"):
        _trainer(tmp_path, [StructuralPruneCallback(lora_dropout=0.0, pruning_ratio=0.5)], max_steps=3).fit(
            CausalLMModule(str(tiny_dir), attach_lora_at_start=True), data)
    with pytest.raises(PrunerError, match=r"mlp_layers=\(0, 4\) reaches past the model's 2 layers"):
        _trainer(tmp_path, [StructuralPruneCallback(lora_dropout=0.0, pruning_ratio=0.5, mlp_layers=(0, 4))], max_steps=3).fit(
            CausalLMModule(str(tiny_dir)), PruneDataModule(calibration_samples=2, calibration_seq_len=16))


def test_reconstruction_text_without_reconstruct_is_refused_before_generating(tiny_dir, tmp_path):
    from pruner.lightning_modules.causal_lm import CausalLMModule
    from pruner.lightning_modules.data import PruneDataModule

    data = PruneDataModule(calibration_samples=2, calibration_seq_len=16, reconstruction_source="generated",
                           generation_cache=str(tmp_path / "cache"))
    with pytest.raises(PrunerError, match=r"reconstruction_source='generated'.*set reconstruct: true, or "
                                          r"data.reconstruction_source: null"):
        _trainer(tmp_path, [StructuralPruneCallback(lora_dropout=0.0, pruning_ratio=0.5)], max_steps=3).fit(
            CausalLMModule(str(tiny_dir)), data)
    assert not (tmp_path / "cache").exists()  # refused before the dense model wrote any text


@pytest.mark.parametrize("criterion", ["element1", "element2", "activation"])
def test_callback_prunes_like_pruner_prune_then_recovers_and_exports(criterion, tiny_dir, tmp_path):
    import pruner
    from pruner.lightning_modules.causal_lm import CausalLMModule
    from pruner.lightning_modules.data import PruneDataModule

    L.seed_everything(0, verbose=False)
    module = CausalLMModule(str(tiny_dir), learning_rate=1e-2)
    data = PruneDataModule(calibration_samples=4, calibration_seq_len=32, micro_batch_size=2, recovery_epochs=6,
                           recovery_source=_alpaca(tmp_path / "alpaca.json"))
    prune = StructuralPruneCallback(lora_dropout=0.0, criterion=criterion, target_sparsity=0.15, global_ranking=True,
                                    export_dir=str(tmp_path / "export"), verbose=False)
    record = Record(calibration=4)
    _trainer(tmp_path, [prune, record]).fit(module, data)

    # Calibration moved no weight; the plan is the one pruner.prune selects on the same windows.
    assert record.moved_in_calibration == [False, False, False]
    dense, _ = pruner.load_model(str(tiny_dir))
    reference = pruner.prune(dense, [w.unsqueeze(0) for w in data.calibration], criterion=criterion,
                             target_sparsity=0.15, global_ranking=True)
    ours = prune.plan.to_dict()
    assert ours["layers"] == reference.to_dict()["layers"]
    assert not prune.plan.is_identity
    assert_close([g["score"] for g in prune.plan.group_records()], [g["score"] for g in reference.group_records()],
                 rtol=1e-5, atol=0)
    assert ours["params"] == reference.params and ours["calibration"]["samples"] == 4
    assert 0.1 < ours["params"]["removed_fraction"] < 0.2
    assert prune.state_dict()["plan"]["layers"] == ours["layers"]  # checkpoints can rebuild the structure

    # Recovery: 4 records x 6 epochs of the same data; the loss falls.
    recovery = record.losses[4:]
    assert len(recovery) == 6 * 4 and sum(recovery[-4:]) < sum(recovery[:4]) - 0.5, recovery

    # Export: LoRA merged; the folder reloads as the pruned model and computes the same logits.
    assert not module.has_lora and prune.export_path == (tmp_path / "export").resolve()
    loaded = pruner.load_pretrained(tmp_path / "export")
    assert pruner.count_parameters(loaded) == ours["params"]["after"]
    ids = data.calibration[:2]
    module.eval()
    with torch.no_grad():
        assert_close(loaded(input_ids=ids).logits, module.hf_model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    assert pruner.Plan.load(tmp_path / "export" / "plan.json").layers == prune.plan.layers


@pytest.mark.parametrize("options", [dict(target_sparsity=0.2, global_ranking=True),
                                     dict(target_sparsity=0.2, attention_selection="measured", criterion="vector")])
def test_iterative_steps_in_the_callback_match_pruner_prune(options, tiny_dir, tmp_path):
    import pruner
    from pruner.lightning_modules.causal_lm import CausalLMModule
    from pruner.lightning_modules.data import PruneDataModule

    L.seed_everything(0, verbose=False)
    module = CausalLMModule(str(tiny_dir))
    data = PruneDataModule(calibration_samples=4, calibration_seq_len=32, micro_batch_size=2, recovery_epochs=1,
                           recovery_source=_alpaca(tmp_path / "alpaca.json"))
    prune = StructuralPruneCallback(lora_dropout=0.0, iterative_steps=2, verbose=False, **options)
    _trainer(tmp_path, [prune]).fit(module, data)
    dense, _ = pruner.load_model(str(tiny_dir))
    single_step = pruner.prune(dense, [w.unsqueeze(0) for w in data.calibration], **options)
    dense, _ = pruner.load_model(str(tiny_dir))
    reference = pruner.prune(dense, [w.unsqueeze(0) for w in data.calibration], iterative_steps=2, **options)
    ours = prune.plan.to_dict()
    # step 2 re-estimated importance on the partly pruned model, exactly as pruner.prune does
    assert ours["layers"] == reference.to_dict()["layers"]
    assert len(list(prune.plan.group_records())) < len(list(single_step.group_records()))  # the last step scored the smaller model
    assert_close([g["score"] for g in prune.plan.group_records()], [g["score"] for g in reference.group_records()],
                 rtol=1e-5, atol=0)
    assert ours["params"] == reference.params
    assert sum(p.numel() for n, p in module.hf_model.named_parameters() if "lora_" not in n) == ours["params"]["after"]


def test_optimizer_holds_exactly_the_lora_parameters_after_pruning(tiny_dir, tmp_path):
    from pruner.lightning_modules.causal_lm import CausalLMModule
    from pruner.lightning_modules.data import PruneDataModule

    class Check(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if batch_idx == 3:  # first recovery batch
                trainable = {id(p) for p in module.parameters() if p.requires_grad}
                in_opt = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
                self.ok = bool(trainable) and trainable == in_opt and module.has_lora
                self.mlp = module.hf_model.model.layers[0].mlp.up_proj.base_layer.out_features

    check = Check()
    module = CausalLMModule(str(tiny_dir))
    data = PruneDataModule(calibration_samples=3, calibration_seq_len=16, micro_batch_size=2, recovery_epochs=1,
                           recovery_source=_alpaca(tmp_path / "alpaca.json"))
    _trainer(tmp_path, [StructuralPruneCallback(lora_dropout=0.0, pruning_ratio=0.5, prune_attention=False, verbose=False), check],
             max_steps=5).fit(module, data)
    assert check.ok and check.mlp == 32  # 64 MLP channels, half removed


def test_a_fit_too_short_for_the_prune_step_is_refused_before_calibration(tiny_dir, tmp_path):
    from pruner.lightning_modules.causal_lm import CausalLMModule
    from pruner.lightning_modules.data import PruneDataModule

    prune = StructuralPruneCallback(lora_dropout=0.0, pruning_ratio=0.5, export_dir=str(tmp_path / "export"), verbose=False)
    with pytest.raises(PrunerError, match=r"trainer\.max_steps=2 ends the fit after 2 train batches, before the prune "
                                          r"step after batch 4 .*at least 4 plus the recovery steps"):
        _trainer(tmp_path, [prune], max_steps=2).fit(
            CausalLMModule(str(tiny_dir)), PruneDataModule(calibration_samples=4, calibration_seq_len=16))
    assert prune.plan is None and prune.session is None and not (tmp_path / "export").exists()


@pytest.mark.slow
@pytest.mark.parametrize("module, data", [
    ({}, {}), ({"distillation_alpha": 0.5}, {}),
    ({"distillation_alpha": 0.5}, {"recovery_source": "generated", "recovery_max_records": 8, "cutoff_len": 24})],
    ids=["lora-ce", "lora-distillation", "distillation-from-cached-teacher-states"])
def test_resume_after_pruning_in_a_new_process_continues_like_an_uninterrupted_run(tiny_dir, tmp_path, module, data):
    # With distillation the resumed process has no dense model left to copy: the callback keeps
    # the teacher from the freshly built module before it rebuilds the pruned structure. On
    # generated text the resumed run reads the teacher states from the cache the first one wrote.
    _alpaca(tmp_path / "alpaca.json")
    if data:
        data = {**data, "generation_cache": str(tmp_path / "cache")}
    base = {"model_dir": str(tiny_dir), "calibration_samples": 4, "module": module, "data": data}
    (full,) = run_in_subprocess(tmp_path, {**base}, "full")
    n = full["step"]
    assert n == 4 + 4 * 4  # 4 calibration batches + 4 epochs of 4 recovery batches
    # Stopped after 7 batches (pruned after 4) with a ModelCheckpoint, resumed in a new process.
    (first,) = run_in_subprocess(tmp_path, {**base, "max_steps": 7, "checkpoint_every": 7}, "first")
    (resumed,) = run_in_subprocess(tmp_path, {**base, "ckpt_in": str(tmp_path / "first" / "step=7.ckpt")},
                                   "resumed")
    assert first["plan"] == resumed["plan"] == full["plan"] and full["plan"] is not None
    assert sorted(first["losses"]) == list(range(7)) and sorted(resumed["losses"]) == list(range(7, n))
    assert_close([resumed["losses"][i] for i in range(7, n)], [full["losses"][i] for i in range(7, n)],
                 rtol=1e-5, atol=1e-6)
    assert_close(resumed["lora"], full["lora"], rtol=1e-5, atol=1e-6)
    if module and not data:
        assert_close(resumed["teacher"], full["teacher"], rtol=0, atol=0)
    if data:  # the uninterrupted run kept the output layer alone; the resumed one reads the states too
        assert set(full["teacher"]) == {"weight"} and resumed["teacher_states"] and full["teacher_states"]


@pytest.mark.slow
@pytest.mark.parametrize("callback", [{"pruning_ratio": 0.5},
                                      {"pruning_ratio": 0.5, "reconstruct": True, "mlp_selection": "obs"}],
                         ids=["importance", "with-reconstruction-statistics"])
def test_resume_in_the_middle_of_calibration_gives_the_same_plan(callback, tiny_dir, tmp_path):
    _alpaca(tmp_path / "alpaca.json")
    base = {"model_dir": str(tiny_dir), "calibration_samples": 4, "recovery_epochs": 1, "callback": callback,
            "save_weights": True}
    (full,) = run_in_subprocess(tmp_path, base, "full")
    # ModelCheckpoint after step 2: two of the four calibration batches are in the checkpoint.
    run_in_subprocess(tmp_path, {**base, "max_steps": 2, "checkpoint_every": 2}, "first")
    (resumed,) = run_in_subprocess(tmp_path, {**base, "ckpt_in": str(tmp_path / "first" / "step=2.ckpt")},
                                   "resumed")
    assert resumed["plan"]["layers"] == full["plan"]["layers"]
    assert resumed["plan"]["calibration"]["samples"] == 4
    assert_close(resumed["vectors"], full["vectors"], rtol=1e-5, atol=0)
    assert_close(resumed["lora"], full["lora"], rtol=1e-5, atol=1e-6)
    assert_close(resumed["weights"], full["weights"], rtol=1e-5, atol=1e-6)  # with the refit, if any


@pytest.mark.slow
@pytest.mark.parametrize("kill_at,last_checkpoint", [(3, 2), (8, 6)], ids=["in-calibration", "in-recovery"])
def test_sigkill_then_resume_from_the_last_checkpoint_gives_identical_results(tiny_dir, tmp_path, kill_at,
                                                                               last_checkpoint):
    _alpaca(tmp_path / "alpaca.json")
    base = {"model_dir": str(tiny_dir), "calibration_samples": 4, "recovery_epochs": 2}
    (full,) = run_in_subprocess(tmp_path, base, "full")
    every = 2 if kill_at < 4 else 3
    run_in_subprocess(tmp_path, {**base, "checkpoint_every": every, "kill_at_step": kill_at}, "killed")
    ckpts = sorted((tmp_path / "killed").glob("*.ckpt"))
    assert ckpts[-1].name == f"step={last_checkpoint}.ckpt", ckpts
    (resumed,) = run_in_subprocess(tmp_path, {**base, "ckpt_in": str(ckpts[-1])}, "resumed")
    assert resumed["plan"]["layers"] == full["plan"]["layers"]
    assert resumed["step"] == full["step"]
    assert_close([resumed["losses"][i] for i in range(max(last_checkpoint, 4), full["step"])],
                 [full["losses"][i] for i in range(max(last_checkpoint, 4), full["step"])], rtol=1e-5, atol=1e-6)
    assert_close(resumed["lora"], full["lora"], rtol=1e-5, atol=1e-6)



@pytest.mark.slow
@pytest.mark.parametrize("module", [{}, {"distillation_alpha": 0.5}], ids=["lora", "lora-distillation"])
def test_fsdp2_resume_after_the_prune_step_gives_identical_results(module, tiny_dir, tmp_path):
    """The pruned (+ LoRA) structure is rebuilt, sharded, before the strategy loads the sharded
    checkpoint (it loads weights and optimizer states before any hook); no whole-model gather."""
    _alpaca(tmp_path / "alpaca.json")
    base = {"model_dir": str(tiny_dir), "calibration_samples": 4, "recovery_epochs": 2, "devices": 2,
            "strategy": "fsdp2", "forbid_whole_model_gathers": True, "module": module}
    full = run_in_subprocess(tmp_path, base, "full")
    # (not at step 2, the prune step: torch's distributed checkpoint gives an optimizer without state
    # a zero step of its own as it saves, so that run would no longer be the uninterrupted one)
    run_in_subprocess(tmp_path, {**base, "checkpoint_every": 3, "kill_at_step": 5}, "killed")
    ckpts = sorted((tmp_path / "killed").glob("*.ckpt"))
    assert ckpts[-1].name == "step=3.ckpt" and ckpts[-1].is_dir(), ckpts  # a sharded checkpoint, after pruning
    resumed = run_in_subprocess(tmp_path, {**base, "ckpt_in": str(ckpts[-1])}, "resumed")
    for r, f in zip(resumed, full):
        assert r["plan"] == f["plan"] and r["step"] == f["step"]
        assert_close([r["losses"][i] for i in range(3, f["step"])], [f["losses"][i] for i in range(3, f["step"])],
                     rtol=1e-5, atol=1e-6)
        assert_close(r["lora"], f["lora"], rtol=1e-5, atol=1e-6)
        assert (r["teacher"] is not None) == bool(module)
        # the dense perplexity comes from the checkpoint: measured once, by the run that pruned
        assert f["measured"][0] == "dense" and "dense" not in r["measured"], r["measured"]
        assert r["perplexity"] == pytest.approx(f["perplexity"], rel=1e-5)
        if module:
            assert r["teacher_sharded"] and f["teacher_sharded"]
            assert_close(r["teacher"], f["teacher"], rtol=0, atol=0)


TEXT = {"reconstruction_source": "builtin", "reconstruction_samples": 6, "reconstruction_seq_len": 24}


@pytest.mark.parametrize("options, data_options", [
    (dict(pruning_ratio=0.5, attention_selection="obs", mlp_selection="obs"), {}),
    (dict(target_sparsity=0.2, global_ranking=True, iterative_steps=2), {}),
    (dict(pruning_ratio=0.5, attention_selection="obs", mlp_selection="obs"), TEXT),
    (dict(target_sparsity=0.2, global_ranking=True, iterative_steps=2), TEXT),
    (dict(pruning_ratio=0.5, mlp_selection="obs-fisher", fisher_samples=3), {}),
    (dict(pruning_ratio=0.5, mlp_selection="obs-fisher", fisher_samples=3), TEXT),
    (dict(pruning_ratio=0.5, mlp_selection="obs", regional_epochs=2), TEXT),
], ids=["obs", "iterative", "obs-reconstruction-text", "iterative-reconstruction-text", "obs-fisher",
        "obs-fisher-reconstruction-text", "regional"])
def test_reconstruction_in_the_callback_matches_pruner_prune(options, data_options, tiny_dir, tmp_path):
    import pruner
    from pruner.lightning_modules.causal_lm import CausalLMModule
    from pruner.lightning_modules.data import PruneDataModule

    L.seed_everything(0, verbose=False)
    module = CausalLMModule(str(tiny_dir))
    data = PruneDataModule(calibration_samples=4, calibration_seq_len=32, micro_batch_size=2, recovery_epochs=1,
                           recovery_source=_alpaca(tmp_path / "alpaca.json"), **data_options)
    common = dict(reconstruct=True, reconstruct_damping=0.1, **options)
    prune = StructuralPruneCallback(lora_dropout=0.0, attach_lora=False, verbose=False, **common)
    _trainer(tmp_path, [prune], max_steps=4).fit(module, data)  # ends right after the prune step
    windows = [w.unsqueeze(0) for w in data.calibration]
    dense, _ = pruner.load_model(str(tiny_dir))
    text = data.reconstruction_batches() or None  # the datamodule's refit text: 3 batches of (2, 24)
    assert text is None or [tuple(b.shape) for b in text] == [(2, 24)] * 3
    reference = pruner.prune(dense, windows, reconstruction_batches=text, **common)
    assert prune.plan.calibration.get("reconstruction_tokens") == (6 * 24 if text else None)
    assert prune.plan.to_dict()["layers"] == reference.to_dict()["layers"]
    assert prune.plan.settings["reconstruct"] and prune.plan.settings["mlp_selection"] == common.get("mlp_selection", "score")
    assert prune.plan.settings["attention_selection"] == common.get("attention_selection", "score")
    assert any(lp.mlp_channels_kept is not None for lp in prune.plan.layers)
    if "attention_selection" in options:  # heads went too, so OBS chose them
        assert any(lp.heads_kept is not None and len(lp.heads_kept) < 4 for lp in prune.plan.layers)
    # the same statistics (recorded during the calibration batches) gave the same refit weights
    ours = module.hf_model.state_dict()
    assert ours.keys() == dense.state_dict().keys()
    assert_close(ours, dense.state_dict(), rtol=1e-5, atol=1e-6)
    unfitted, _ = pruner.load_model(str(tiny_dir))
    pruner.apply_plan(reference, unfitted)
    plain = unfitted.state_dict()  # the refit changed kept columns of the consumers:
    assert any(not torch.allclose(ours[k], plain[k]) for k in ours if k.endswith(("down_proj.weight", "o_proj.weight")))
    if text:  # ... and the refit text, not the calibration windows, gave them
        on_calibration, _ = pruner.load_model(str(tiny_dir))
        pruner.prune(on_calibration, windows, **common)
        other = on_calibration.state_dict()
        assert any(ours[k].shape != other[k].shape or not torch.allclose(ours[k], other[k]) for k in ours
                   if k.endswith("down_proj.weight"))


@pytest.mark.slow
def test_ddp_two_processes_sum_importance_and_match_one_process(tiny_dir, tmp_path):
    _alpaca(tmp_path / "alpaca.json")
    callback = {"pruning_ratio": 0.5, "export_dir": None}
    # One process, micro-batch 2 x accumulate 2  ==  two ranks x micro-batch 2 (DDP averages):
    # the same 8 calibration windows, the same recovery examples in each optimizer step.
    (single,) = run_in_subprocess(tmp_path, {"model_dir": str(tiny_dir), "accumulate": 2,
                                             "callback": callback}, "single")
    r0, r1 = run_in_subprocess(tmp_path, {"model_dir": str(tiny_dir), "devices": 2, "strategy": "ddp",
                                          "callback": callback}, "ddp")
    # Importance: the all-reduced sum of the two ranks' accumulators == one process on all data.
    assert single["plan"]["calibration"]["samples"] == r0["plan"]["calibration"]["samples"] == 8
    assert_close(r0["vectors"], single["vectors"], rtol=1e-5, atol=1e-9)
    assert r0["plan"] == r1["plan"]
    assert r0["plan"]["layers"] == single["plan"]["layers"]
    # Recovery ran on both ranks in lockstep (one model) and the loss fell.
    assert r0["step"] == r1["step"] == single["step"] == 4 + 4 * 8 // 2 // 2
    assert_close(r0["lora"], r1["lora"], rtol=0, atol=0)
    losses = [r0["losses"][i] + r1["losses"][i] for i in sorted(r0["losses"])][4:]
    assert sum(losses[-2:]) < sum(losses[:2]), losses
    # ... and trained the same adapters as the single process.
    assert_close(r0["lora"], single["lora"], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("strategy, data, selection", [
    ("ddp", {}, {}), ("fsdp2", {}, {}), ("ddp", TEXT, {}), ("fsdp2", TEXT, {}),
    # obs-fisher over every window (8 calibration / 6 refit windows): each rank runs its own share backward
    ("ddp", {}, {"mlp_selection": "obs-fisher", "fisher_samples": 8}),
    ("ddp", TEXT, {"mlp_selection": "obs-fisher", "fisher_samples": 6}),
    # ... and under FSDP2 through the sharded model, before the gather
    ("fsdp2", {}, {"mlp_selection": "obs-fisher", "fisher_samples": 8}),
    ("fsdp2", TEXT, {"mlp_selection": "obs-fisher", "fisher_samples": 6}),
], ids=["ddp", "fsdp2", "ddp-reconstruction-text", "fsdp2-reconstruction-text", "ddp-obs-fisher",
        "ddp-obs-fisher-reconstruction-text", "fsdp2-obs-fisher", "fsdp2-obs-fisher-reconstruction-text"])
def test_reconstruction_statistics_are_summed_over_ranks(strategy, data, selection, tiny_dir, tmp_path):
    _alpaca(tmp_path / "alpaca.json")
    callback = {"pruning_ratio": 0.5, "reconstruct": True, "mlp_selection": "obs", "attach_lora": False,
                "export_dir": None, **selection}
    # with TEXT: 6 refit windows, 3 per rank (forward passes at the prune step), none from calibration
    spec = {"model_dir": str(tiny_dir), "callback": callback, "max_steps": 4, "save_weights": True, "data": data}
    # 8 calibration windows: one process (4 steps of 2 accumulated batches) or 4 per rank; fit ends at the prune step
    (single,) = run_in_subprocess(tmp_path, {**spec, "accumulate": 2}, "single")
    # under FSDP2 the refit gathers one decoder layer at a time: any whole-model gather fails the run
    r0, r1 = run_in_subprocess(tmp_path, {**spec, "devices": 2, "strategy": strategy,
                                          "forbid_whole_model_gathers": strategy == "fsdp2"}, strategy)
    assert r0["plan"] == r1["plan"] and r0["plan"]["layers"] == single["plan"]["layers"]
    # OBS choice and refit from the all-reduced Gram matrices == one process on all 8 windows
    assert_close(r0["weights"], single["weights"], rtol=1e-5, atol=1e-6)
    assert_close(r1["weights"], r0["weights"], rtol=0, atol=0)
    assert r0["plan"]["calibration"].get("reconstruction_tokens") == (6 * 24 if data else None)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_the_regional_fit_sums_its_gradients_over_ranks(strategy, tiny_dir, tmp_path):
    _alpaca(tmp_path / "alpaca.json")
    # LoRA attached (untrained: the fit ends at the prune step): under FSDP2 the walked layers' new
    # weights reach the adapters' base layers
    callback = {"pruning_ratio": 0.5, "reconstruct": True, "mlp_selection": "obs", "regional_epochs": 3,
                "export_dir": None}
    spec = {"model_dir": str(tiny_dir), "callback": callback, "max_steps": 4, "save_weights": True, "data": TEXT}
    (single,) = run_in_subprocess(tmp_path, {**spec, "accumulate": 2}, "single")
    r0, r1 = run_in_subprocess(tmp_path, {**spec, "devices": 2, "strategy": strategy,
                                          "forbid_whole_model_gathers": strategy == "fsdp2"}, strategy)
    # the same plan and one model: every rank stepped with the gradients summed over both
    assert r0["plan"] == r1["plan"] and r0["plan"]["layers"] == single["plan"]["layers"]
    assert_close(r1["weights"], r0["weights"], rtol=0, atol=0)
    report = r0["plan"]["calibration"]["regional"]
    assert report["layers"] == [lp["index"] for lp in r0["plan"]["layers"]]  # every layer prunes MLP channels
    assert all(a < b for a, b in zip(report["error_after"], report["error_before"]))
    # 144 refit tokens: one step an epoch, all of them (one process) or each rank's 72 (the mean of the two
    # ranks' gradients is the whole text's), so the ranks fit what one process fits
    assert_close(report["error_before"], single["plan"]["calibration"]["regional"]["error_before"], rtol=1e-4, atol=0)
    assert_close(r0["weights"], single["weights"], rtol=1e-4, atol=1e-5)
    assert r0["plan"]["settings"]["mlp_selection"] == single["plan"]["settings"]["mlp_selection"] == \
        callback["mlp_selection"]


@pytest.mark.slow
@pytest.mark.parametrize("criterion", ["element1", "activation"])
def test_fsdp2_two_processes_score_shards_and_match_one_process(criterion, tiny_dir, tmp_path):
    from pruner.io import load_pretrained

    _alpaca(tmp_path / "alpaca.json")
    val = tmp_path / "val.txt"
    val.write_text(" = Heading = \n\n" + "The quick brown fox jumps over the lazy dog. " * 80)
    runs = {}
    # the paper's pipeline under FSDP2: each rank slices its own shards, no whole-model copy anywhere
    fsdp2 = {"devices": 2, "strategy": "fsdp2", "forbid_whole_model_gathers": True}
    for name, extra in (("single", {"accumulate": 2}), ("fsdp2", fsdp2)):
        callback = {"pruning_ratio": 0.5, "criterion": criterion, "export_dir": str(tmp_path / f"export-{name}")}
        runs[name] = run_in_subprocess(tmp_path, {"model_dir": str(tiny_dir), "callback": callback,
                                                  "data": {"val_source": str(val), "val_seq_len": 32,
                                                           "val_max_windows": 4},
                                                  "trainer": {"limit_val_batches": 0, "num_sanity_val_steps": 0},
                                                  **extra}, name)
    (single,), (r0, r1) = runs["single"], runs["fsdp2"]
    # Scores from gradient shards (one all-reduce of partial vectors) == one process on all data.
    assert r0["plan"]["calibration"]["samples"] == 8
    assert_close(r0["vectors"], single["vectors"], rtol=1e-5, atol=1e-9)
    assert r0["plan"] == r1["plan"]
    assert r0["plan"]["layers"] == single["plan"]["layers"]
    # Recovery on the re-sharded pruned model: ranks in lockstep, the loss fell, same adapters.
    assert r0["step"] == r1["step"] == single["step"]
    assert_close(r0["lora"], r1["lora"], rtol=0, atol=0)
    losses = [r0["losses"][i] + r1["losses"][i] for i in sorted(r0["losses"])][4:]
    assert sum(losses[-2:]) < sum(losses[:2]), losses
    assert r0["lora"] and not single["lora"]  # FSDP2 merges into the export only, one device in place
    assert_close(r0["perplexity"], single["perplexity"], rtol=1e-4, atol=0)
    # The export (gathered on rank 0, LoRA merged there) is the model the single process exported.
    a, b = load_pretrained(tmp_path / "export-fsdp2"), load_pretrained(tmp_path / "export-single")
    ids = torch.arange(1, 17).reshape(2, 8)
    assert_close(a(ids).logits, b(ids).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_fsdp2_with_the_modules_activation_checkpointing_matches_one_process_without(tiny_dir, tmp_path):
    from pruner.io import load_pretrained

    _alpaca(tmp_path / "alpaca.json")
    runs = {}
    fsdp2 = {"devices": 2, "strategy": "fsdp2", "forbid_whole_model_gathers": True,
             "module": {"activation_checkpointing": True}}
    for name, extra in (("single", {"accumulate": 2}), ("fsdp2", fsdp2)):
        callback = {"pruning_ratio": 0.5, "export_dir": str(tmp_path / f"export-{name}")}
        runs[name] = run_in_subprocess(tmp_path, {"model_dir": str(tiny_dir), "callback": callback, "recovery_epochs": 2,
                                                  **extra}, name)
    (single,), (r0, r1) = runs["single"], runs["fsdp2"]
    assert_close(r0["vectors"], single["vectors"], rtol=1e-5, atol=1e-9)
    assert r0["plan"]["layers"] == r1["plan"]["layers"] == single["plan"]["layers"]
    assert r0["step"] == r1["step"] == single["step"]
    a, b = load_pretrained(tmp_path / "export-fsdp2"), load_pretrained(tmp_path / "export-single")
    ids = torch.arange(1, 17).reshape(2, 8)
    assert_close(a(ids).logits, b(ids).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_fsdp2_slices_tied_embeddings_along_the_hidden_size_like_one_process(tiny_dir, tmp_path):
    """Hidden channels go from every reader and writer of the residual stream: the tied embedding's
    columns (its shards split the rows), the norms rescaled; each rank writes its own shards."""
    import shutil

    from pruner.io import load_pretrained
    from pruner.testing import tiny_causal_lm

    tied = tmp_path / "tied"
    shutil.copytree(tiny_dir, tied)
    config = json.loads((tied / "config.json").read_text())
    model = tiny_causal_lm("llama", 1, vocab_size=config["vocab_size"], hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, head_dim=None, tie_word_embeddings=True)
    model.save_pretrained(tied)
    _alpaca(tmp_path / "alpaca.json")
    runs = {}
    fsdp2 = {"devices": 2, "strategy": "fsdp2", "forbid_whole_model_gathers": True}
    for name, extra in (("single", {"accumulate": 2}), ("fsdp2", fsdp2)):
        callback = {"pruning_ratio": 0.25, "mode": "channel", "export_dir": str(tmp_path / f"export-{name}")}
        runs[name] = run_in_subprocess(tmp_path, {"model_dir": str(tied), "callback": callback, **extra}, name)
    (single,), (r0, r1) = runs["single"], runs["fsdp2"]
    assert r0["plan"] == r1["plan"] and r0["plan"]["hidden_kept"] == single["plan"]["hidden_kept"]
    assert len(single["plan"]["hidden_kept"]) < 32
    assert_close(r0["lora"], r1["lora"], rtol=0, atol=0)
    a, b = load_pretrained(tmp_path / "export-fsdp2"), load_pretrained(tmp_path / "export-single")
    assert a.get_output_embeddings().weight is a.get_input_embeddings().weight  # still tied
    ids = torch.arange(1, 17).reshape(2, 8)
    assert_close(a(ids).logits, b(ids).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_fsdp2_writes_generated_text_like_one_process_whatever_the_cache_holds(tiny_dir, tmp_path):
    """Every forward pass of a sharded model is a collective: ranks must make as many generate
    calls as each other. 4 chunks, the first already cached: 3 left for 2 ranks (it hung before)."""
    from transformers import AutoModelForCausalLM

    from pruner.data.generated import generate_samples
    from pruner.io import load_tokenizer
    from pruner.lightning_modules.data import RECONSTRUCTION_SEED

    model, tok = AutoModelForCausalLM.from_pretrained(tiny_dir), load_tokenizer(str(tiny_dir))
    cache = tmp_path / "cache"
    written = generate_samples(model, tok, 8, 16, seed=RECONSTRUCTION_SEED, chunk_size=2)  # no cache
    generate_samples(model, tok, 2, 16, seed=RECONSTRUCTION_SEED, chunk_size=2, cache_dir=cache)  # chunk 0 only
    # the default recipe's data: the refit's text serves as the recovery text too
    data = {"recovery_source": "generated", "reconstruction_source": "generated", "recovery_max_records": 8,
            "reconstruction_samples": 8, "reconstruction_seq_len": 16, "cutoff_len": 16,
            "generation_batch_size": 2, "generation_cache": str(cache)}
    callback = {"pruning_ratio": 0.5, "reconstruct": True, "mlp_selection": "obs", "export_dir": None}
    r0, r1 = run_in_subprocess(tmp_path, {"model_dir": str(tiny_dir), "callback": callback, "data": data,
                                          "max_steps": 6, "devices": 2, "strategy": "fsdp2"}, "fsdp2")
    (folder,) = cache.iterdir()  # the sharded model has the dense model's fingerprint: one cache key
    assert sorted(p.name for p in folder.glob("chunk*.json")) == [f"chunk{c:05d}.json" for c in range(4)]
    for run in (r0, r1):
        assert torch.equal(torch.tensor([w["input_ids"] for w in run["recovery"]]), written)
    assert r0["step"] == r1["step"] == 6 and r0["plan"]["calibration"]["reconstruction_tokens"] == 8 * 16


def test_prune_at_step_calibrates_on_the_batches_just_before_it(tiny_dir, tmp_path):
    from pruner.lightning_modules.causal_lm import CausalLMModule
    from pruner.lightning_modules.data import PruneDataModule

    class Moved(L.Callback):
        moved: list = []

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.before = [p.detach().clone() for p in module.hf_model.parameters()]

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if batch_idx < 4:  # batch 4 ends with the prune step (new shapes)
                after = list(module.hf_model.parameters())
                Moved.moved.append(any(not torch.equal(a, b) for a, b in zip(after, self.before)))

    # Batches 0-2 train the dense model (full fine-tuning), 3-4 calibrate, pruning follows 4.
    prune = StructuralPruneCallback(lora_dropout=0.0, pruning_ratio=0.5, calibration_batches=2, prune_at_step=5, verbose=False)
    data = PruneDataModule(calibration_samples=2, calibration_seq_len=16, micro_batch_size=2, recovery_epochs=2,
                           recovery_source=_alpaca(tmp_path / "alpaca.json"))
    module = CausalLMModule(str(tiny_dir))
    module.configure_model()
    module.hf_model.requires_grad_(True)  # dense training first: every weight trains
    _trainer(tmp_path, [prune, Moved()], max_steps=6).fit(module, data)
    assert Moved.moved == [True, True, True, False]  # batches 0-2 trained; batch 3 calibrated, no step
    assert prune.plan.calibration["samples"] == 4  # two recovery micro-batches of 2


@pytest.mark.parametrize("options, message", [
    (dict(criterion="element2"), "needs per-sample gradients.*use criterion element1"),
    (dict(criterion="mix"), "needs per-sample gradients.*or strategy: ddp"),
    (dict(attention_selection="measured"), "'measured' is not supported under ModelParallelStrategy"),
    (dict(iterative_steps=2), "iterative_steps=2 is not supported.*iterative_steps: 1"),
])
def test_fsdp2_refuses_what_sharded_gradients_cannot_give(tiny_dir, options, message):
    from lightning.pytorch.strategies import ModelParallelStrategy

    from pruner.lightning_modules.causal_lm import CausalLMModule

    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False,
                        strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1))
    with pytest.raises(PrunerError, match=message):
        StructuralPruneCallback(target_sparsity=0.2, **options).setup(trainer, CausalLMModule(str(tiny_dir)), "fit")


def test_validation_inside_calibration_does_not_feed_importance(tiny_dir, tmp_path):
    """``activation`` importance counts the inputs seen by forward hooks: validation batches
    run between calibration batches must not be counted (the plan equals one without them)."""
    from pruner.data import builtin_text
    from pruner.lightning_modules.causal_lm import CausalLMModule
    from pruner.lightning_modules.data import PruneDataModule

    raw = tmp_path / "wiki.test.raw"
    raw.write_text("\n".join(builtin_text()[:4000].splitlines()[:60]))
    plans = []
    for val in (None, str(raw)):
        prune = StructuralPruneCallback(lora_dropout=0.0, criterion="activation", target_sparsity=0.1, global_ranking=True,
                                        verbose=False)
        data = PruneDataModule(calibration_samples=4, calibration_seq_len=16, val_source=val, val_seq_len=32,
                               val_max_windows=2)
        _trainer(tmp_path, [prune], max_steps=4, val_check_interval=1 if val else None).fit(
            CausalLMModule(str(tiny_dir)), data)
        plans.append(prune.plan.to_dict())
    assert plans[0]["layers"] == plans[1]["layers"]
    assert plans[0]["groups"] == plans[1]["groups"]


def test_export_carries_a_report_with_perplexity_before_and_after_pruning_and_recovery(tiny_dir, tmp_path):
    import pruner
    from pruner.eval.perplexity import loader_perplexity
    from pruner.lightning_modules.causal_lm import CausalLMModule
    from pruner.lightning_modules.data import PruneDataModule

    L.seed_everything(0, verbose=False)
    val = tmp_path / "val.txt"
    val.write_text(" = Heading = \n\n" + "The quick brown fox jumps over the lazy dog. " * 80)
    module = CausalLMModule(str(tiny_dir), learning_rate=1e-2)
    data = PruneDataModule(calibration_samples=4, calibration_seq_len=32, micro_batch_size=2, recovery_epochs=2,
                           recovery_source=_alpaca(tmp_path / "alpaca.json"), val_source=str(val), val_seq_len=32,
                           val_max_windows=6)
    prune = StructuralPruneCallback(lora_dropout=0.0, pruning_ratio=0.5, export_dir=str(tmp_path / "export"), verbose=False)
    _trainer(tmp_path, [prune], num_sanity_val_steps=0, limit_val_batches=0).fit(module, data)
    loader = data.val_dataloader()
    dense, _ = pruner.load_model(str(tiny_dir))
    assert prune.perplexity["dense"] == pytest.approx(loader_perplexity(dense, loader), rel=1e-6)
    pruner.apply_plan(prune.plan, dense)
    assert prune.perplexity["pruned"] == pytest.approx(loader_perplexity(dense, loader), rel=1e-6)
    exported = pruner.load_pretrained(tmp_path / "export")
    assert prune.perplexity["recovered"] == pytest.approx(loader_perplexity(exported, loader), rel=1e-5)
    report = (tmp_path / "export" / "report.md").read_text()
    assert f"| dense (before pruning) | {prune.perplexity['dense']:.3f} |" in report
    assert "| after recovery (8 steps) |" in report
    assert f"| after | {prune.plan.params['after']:,} |" in report
    assert "mlp_selection=score, round_to=auto, reconstruct=False" in report  # the settings that shape the result


def test_the_report_summarises_the_regional_fit():
    from pruner.callbacks.report import pruning_report
    from pruner.structure import LayerPlan, Plan

    fit = {"layers": [4, 5, 6], "error_before": [0.3, 0.5, 0.4], "error_after": [0.2, 0.4, 0.3], "epochs": 2,
           "lr": 1e-3, "seconds": 171.2}
    plan = Plan([LayerPlan(0)], params={"before": 100, "after": 80, "removed": 20, "removed_fraction": 0.2},
                settings={"reconstruct": True, "regional_epochs": 2, "regional_lr": 1e-3},
                calibration={"batches": 10, "regional": fit})
    report = pruning_report(plan, {}, recovery_steps=0)
    assert "Settings: reconstruct=True, regional_epochs=2, regional_lr=0.001" in report
    assert "Calibration: {'batches': 10}" in report  # the per-layer lists stay in plan.json
    assert ("Regional fit: the MLPs of 3 layers (4..6), mean relative error to the dense layer outputs 0.4000 -> "
            "0.3000, 171 s") in report


def test_measured_attention_selection_in_the_callback_matches_pruner_prune(tiny_dir, tmp_path):
    import pruner
    from pruner.lightning_modules.causal_lm import CausalLMModule
    from pruner.lightning_modules.data import PruneDataModule

    L.seed_everything(0, verbose=False)
    data = PruneDataModule(calibration_samples=4, calibration_seq_len=32, micro_batch_size=2, recovery_epochs=1,
                           recovery_source=_alpaca(tmp_path / "alpaca.json"))
    prune = StructuralPruneCallback(lora_dropout=0.0, pruning_ratio=0.5, head_granularity="kv", attention_selection="measured",
                                    verbose=False)
    _trainer(tmp_path, [prune]).fit(CausalLMModule(str(tiny_dir)), data)
    windows = [w.unsqueeze(0) for w in data.calibration]
    dense, _ = pruner.load_model(str(tiny_dir))
    measured = pruner.prune(dense, windows, pruning_ratio=0.5, head_granularity="kv", attention_selection="measured")
    assert prune.plan.to_dict()["layers"] == measured.to_dict()["layers"]
    assert prune.plan.settings["attention_selection"] == "measured"


def test_a_failed_sharded_install_puts_the_dense_model_back():
    from types import SimpleNamespace

    from pruner.callbacks.distributed import install_sharded
    from pruner.distributed.gather import meta_copy
    from pruner.structure import discover
    from pruner.testing import tiny_causal_lm
    from tests.structure.test_exactness import PLANS

    class Holder(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def shard_model(self):  # the module's own sharding (none here: one process)
            pass

    dense = tiny_causal_lm("llama")
    holder = Holder(dense)
    plan = PLANS["block"](discover(dense))
    other = discover(tiny_causal_lm("llama", num_hidden_layers=2))  # writing the shards fails: the plan does not fit
    trainer = SimpleNamespace(strategy=SimpleNamespace(model_to_device=lambda: None))
    with pytest.raises(PrunerError, match="the plan has 3 layers but the model has 2"):
        install_sharded(trainer, holder, "model", meta_copy(dense), dense, (plan, other, None))
    assert holder.model is dense


@pytest.mark.parametrize("criterion", ["activation", "element1"])
def test_a_module_that_checkpoints_its_layers_gets_the_plan_and_refit_of_one_forward(criterion, tiny_dir, tmp_path):
    # the module's own activation checkpointing recomputes each layer in the backward, running the
    # importance hooks' forwards twice: the plan and the refit are still those of one forward
    import pruner
    from pruner.lightning_modules.causal_lm import CausalLMModule
    from pruner.lightning_modules.data import PruneDataModule

    class Checkpointing(CausalLMModule):
        def configure_model(self) -> None:
            super().configure_model()
            self.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    L.seed_everything(0, verbose=False)
    module = Checkpointing(str(tiny_dir))
    data = PruneDataModule(calibration_samples=4, calibration_seq_len=32, micro_batch_size=2, recovery_epochs=1,
                           recovery_source=_alpaca(tmp_path / "alpaca.json"))
    common = dict(criterion=criterion, pruning_ratio=0.5, reconstruct=True, reconstruct_damping=0.1,
                  mlp_selection="obs")
    prune = StructuralPruneCallback(lora_dropout=0.0, attach_lora=False, verbose=False, **common)
    _trainer(tmp_path, [prune], max_steps=4).fit(module, data)
    assert module.lm.is_activation_checkpointing
    dense, _ = pruner.load_model(str(tiny_dir))
    reference = pruner.prune(dense, [w.unsqueeze(0) for w in data.calibration], **common)
    assert prune.plan.to_dict()["layers"] == reference.to_dict()["layers"]
    assert prune.plan.calibration["samples"] == 4
    assert_close(module.hf_model.state_dict(), dense.state_dict(), rtol=1e-5, atol=1e-6)


def test_activation_checkpointing_of_the_module_changes_neither_plan_nor_training(tiny_dir, tmp_path):
    # CausalLMModule(activation_checkpointing=True): calibration, the prune step with LoRA and
    # distillation from the kept dense model, recovery and the export, each as without it
    from pruner.lightning_modules.causal_lm import CausalLMModule
    from pruner.lightning_modules.data import PruneDataModule

    runs = {}
    for checkpointing in (False, True):
        L.seed_everything(0, verbose=False)
        module = CausalLMModule(str(tiny_dir), learning_rate=1e-2, distillation_alpha=0.5,
                                activation_checkpointing=checkpointing)
        data = PruneDataModule(calibration_samples=3, calibration_seq_len=32, micro_batch_size=2, recovery_epochs=1,
                               recovery_source=_alpaca(tmp_path / "alpaca.json"))
        prune = StructuralPruneCallback(lora_dropout=0.0, target_sparsity=0.15, verbose=False,
                                        export_dir=str(tmp_path / f"export{checkpointing}"))
        record = Record(calibration=3)
        _trainer(tmp_path, [prune, record], max_steps=7).fit(module, data)
        runs[checkpointing] = (prune.plan.to_dict()["layers"], record.losses, module)
    assert runs[True][1] and runs[True][0] == runs[False][0]
    assert_close(runs[True][1], runs[False][1], rtol=1e-5, atol=1e-6)  # calibration and LoRA steps alike
    import pruner

    ids = torch.randint(3, 120, (2, 16))
    plain, checkpointed = (pruner.load_pretrained(tmp_path / f"export{c}") for c in (False, True))
    with torch.no_grad():
        assert_close(checkpointed(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    assert runs[True][2].hf_model.is_activation_checkpointing and not runs[False][2].hf_model.is_activation_checkpointing


def test_activation_checkpointing_takes_a_boolean(tiny_dir):
    from pruner.lightning_modules.causal_lm import CausalLMModule

    with pytest.raises(PrunerError, match=r"activation_checkpointing='yes'\)` must be true or false"):
        CausalLMModule(str(tiny_dir), activation_checkpointing="yes")
