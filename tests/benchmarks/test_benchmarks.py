"""The benchmark scripts' named allocations mean what their names say, whatever the library's
defaults: ``global_ranking``/``head_granularity`` default to None and resolve by the target, which
once turned every "local" row of ``benchmarks/prune_quality.py`` into a global one unnoticed."""

import importlib.util
import re
from pathlib import Path

import pytest
import torch

from pruner.config import PruneConfig

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


prune_quality = _load("prune_quality")


@pytest.mark.parametrize("name", sorted(prune_quality.ALLOCATIONS))
def test_prune_quality_allocations_resolve_as_named(name):
    # the script's base: the target and the layers, the allocation's fields on top
    base = PruneConfig(criterion="element1", target_sparsity=0.2, attention_layers=(4, 28), mlp_layers=(4, 28))
    cfg = prune_quality.allocation_config(base, name)
    kind = name.split("-")[0]
    assert cfg.global_ranking is (kind == "global")
    if name.endswith("-query"):
        assert cfg.head_granularity == "query" and cfg.prune_attention
    if "-kv" in name:
        assert cfg.head_granularity == "kv" and cfg.prune_attention
    if name.endswith("-mlp"):
        assert not cfg.prune_attention and cfg.prune_mlp
    if kind == "ratio":
        assert (cfg.target_sparsity, cfg.pruning_ratio) == (None, 0.33)


@pytest.mark.parametrize("allocation, attention_selection, mlp_selection, regional_epochs", [
    ("local-mlp", "score", "score", 0), ("local-mlp", "score", "obs-fisher", 0), ("local-kv", "obs", "obs", 0),
    ("local-mlp", "score", "obs", 2)])
def test_prune_quality_prunes_as_pruner_prune_does(allocation, attention_selection, mlp_selection, regional_epochs):
    """The script scores once and prunes a copy per allocation; each copy must be the model
    ``pruner.prune`` makes with the same settings, windows and refit text."""
    import copy

    import torch
    from torch.testing import assert_close

    import pruner
    from pruner.loop import estimate_importance
    from pruner.refit import GramCollector, collect_inputs, collect_output_fisher, consumers
    from pruner.testing import tiny_causal_lm

    torch.manual_seed(0)
    dense = tiny_causal_lm("llama")
    batches = [torch.randint(3, 120, (1, 16)) for _ in range(4)]
    text = [torch.randint(3, 120, (4, 24)) for _ in range(3)]
    structure, total = pruner.discover(dense), pruner.count_parameters(dense)
    base = PruneConfig(criterion="element1", target_sparsity=0.2)
    cfg = prune_quality.selection_config(prune_quality.allocation_config(base, allocation), attention_selection,
                                         mlp_selection, damping=0.01, fisher_samples=4,
                                         regional_epochs=regional_epochs)
    outputs = [info.path for info in structure.layers] if regional_epochs else None  # the dense layer outputs
    collector = GramCollector(dense, consumers(structure), outputs)  # as the script: every layer, once
    collect_inputs(dense, text, collector)
    if mlp_selection == "obs-fisher":
        collect_output_fisher(dense, text, collector, cfg.fisher_samples)
    vectors = estimate_importance(copy.deepcopy(dense), batches, structure, base)
    before = copy.deepcopy(dense.state_dict())
    model, plan = prune_quality.prune_copy(dense, structure, vectors, cfg, total, collector, batches, text=text)
    assert_close(dense.state_dict(), before, rtol=0, atol=0)  # a copy was pruned
    reference = copy.deepcopy(dense)
    expected = pruner.prune(reference, batches, reconstruction_batches=text, **cfg.to_dict())
    assert plan.to_dict()["layers"] == expected.to_dict()["layers"]
    assert plan.calibration.get("regional", {}).get("error_after") == expected.calibration.get("regional", {}).get(
        "error_after")
    assert pruner.count_parameters(model) < total
    assert_close(model.state_dict(), reference.state_dict(), rtol=1e-6, atol=1e-7)


recovery_trainable = _load("recovery_trainable")


def test_recovery_trainable_variants_parse_or_name_the_fix():
    assert recovery_trainable.parse_variants("lora:3e-4, full:1e-4,mlp:2") == [
        ("lora", 3e-4), ("full", 1e-4), ("mlp", 2.0)]
    for bad in ("adapter:1e-4", "full", "full:-1", "full:abc"):
        with pytest.raises(SystemExit, match="KIND:LEARNING_RATE"):
            recovery_trainable.parse_variants(bad)


def test_recovery_trainable_kinds_train_what_they_name():
    from pruner.recovery import LoraSettings, attach_lora
    from pruner.testing import tiny_causal_lm

    model = tiny_causal_lm(num_hidden_layers=6)
    every = recovery_trainable.trainable_parameters(model, "all")
    assert len(every) == len(list(model.parameters())) and model.get_input_embeddings().weight.requires_grad
    full = recovery_trainable.trainable_parameters(model, "full")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(full) == len(names) and not any("embed_tokens" in n or "lm_head" in n for n in names)
    assert any("self_attn" in n for n in names) and any("layers.0." in n for n in names)
    recovery_trainable.trainable_parameters(model, "mlp")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(".mlp." in n and int(n.split("layers.")[1].split(".")[0]) >= 4 for n in names)
    assert any("layers.5.mlp" in n for n in names)
    attach_lora(model, LoraSettings())
    lora = recovery_trainable.trainable_parameters(model, "lora")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(lora) == len(names) > 0 and all("lora_" in n for n in names)


generation_speed = _load("generation_speed")


@pytest.mark.parametrize("top_p", [0.95, 1.0])
@pytest.mark.parametrize("sampler", generation_speed.SAMPLERS)
def test_generation_speed_samplers_write_the_requested_tokens(sampler, top_p, tmp_path):
    from pruner.io import load_tokenizer
    from pruner.testing import save_tiny_llama, tiny_causal_lm

    tokenizer = load_tokenizer(str(save_tiny_llama(tmp_path)))
    model = tiny_causal_lm(vocab_size=len(tokenizer)).eval()
    out = generation_speed.write_chunk(model, tokenizer, sampler, size=3, tokens=5, top_p=top_p)
    assert out.shape == (3, 5)
    assert not (out == tokenizer.eos_token_id).any()  # min_new_tokens held under both samplers


gpu_recipe = _load("gpu_recipe")


def test_gpu_recipe_writes_a_model_of_the_shape_it_names(tmp_path):
    from transformers import AutoModelForCausalLM

    gpu_recipe.write_model(tmp_path, "tiny", "cpu")
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    shape = gpu_recipe.SHAPES["tiny"]
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert attn.q_proj.weight.shape == (shape["hidden_size"], shape["hidden_size"])  # head_dim follows the shape
    assert mlp.up_proj.weight.shape == (shape["intermediate_size"], shape["hidden_size"])
    assert len(model.model.layers) == shape["num_hidden_layers"] and model.config.vocab_size == shape["vocab_size"]
    assert model.dtype == torch.bfloat16


def test_gpu_recipe_writes_alpaca_records_the_data_module_reads(tmp_path):
    from pruner.data import alpaca_records

    gpu_recipe.write_alpaca(tmp_path / "alpaca.json", 40)
    records = alpaca_records(str(tmp_path / "alpaca.json"))
    assert len(records) == 40
    assert all(r["instruction"] and r["output"] and not r["input"] for r in records)
    # consecutive sentences: each answer goes on with the next record's instruction
    assert all(a["output"].startswith(b["instruction"]) for a, b in zip(records, records[1:]))


def test_gpu_recipe_stage_marks_are_lines_the_callback_prints_in_order(tmp_path, caplog):
    # the benchmark times its stages by these lines: a reworded message would silently drop a stage
    import lightning as L
    from torch.utils.data import DataLoader

    from pruner.callbacks import StructuralPruneCallback
    from pruner.testing import save_tiny_llama
    from tests.callbacks.plain_modules import MyFinetune

    folder = save_tiny_llama(tmp_path / "model")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 300, (12, 16), generator=g)
    rows = [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()} for x in ids]

    class Data(L.LightningDataModule):  # the callback reports perplexities on a datamodule's val batches
        def train_dataloader(self):
            return DataLoader(rows, batch_size=2)

        def val_dataloader(self):
            return DataLoader(rows[:2], batch_size=2)

    callback = StructuralPruneCallback(pruning_ratio=0.5, calibration_batches=2, export_dir=str(tmp_path / "export"))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[callback])
    with caplog.at_level("INFO"):
        trainer.fit(MyFinetune(str(folder)), datamodule=Data())
    lines = [r.getMessage() for r in caplog.records]
    found = [next((i for i, line in enumerate(lines) if re.search(pattern, line)), None)
             for _, pattern in gpu_recipe.STAGES]
    assert None not in found, list(zip(gpu_recipe.STAGES, found, strict=True))
    assert found == sorted(found)
