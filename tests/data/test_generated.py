"""Data-free text the dense model writes itself (pruner.data.generated): seeded, cached, rank-independent;
the sampler; teacher states saved while writing; PruneDataModule 'generated' for recovery and the refit."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.testing import assert_close

from pruner.callbacks import StructuralPruneCallback
from pruner.data.generated import NucleusSampler, generate_samples, inverse_cdf_draw
from pruner.errors import PrunerError
from pruner.testing import tiny_causal_lm
from tests.helpers import SUBPROCESS_TIMEOUT
from tests.helpers import cpu_trainer as _trainer


def _tok(tiny_dir):
    from pruner.io import load_tokenizer

    return load_tokenizer(str(tiny_dir))


def test_generated_samples_are_seeded_cached_and_independent_of_rank_count(tiny_dir, tmp_path):
    model, tok = tiny_causal_lm("llama", vocab_size=len(_tok(tiny_dir))), _tok(tiny_dir)
    single = generate_samples(model, tok, 10, 12, seed=3, cache_dir=tmp_path / "a", chunk_size=4)
    assert single.shape == (10, 12)
    # two "ranks" write disjoint chunks into one cache; either then reads the same samples
    for rank in (1, 0):
        generate_samples(model, tok, 10, 12, seed=3, cache_dir=tmp_path / "b", chunk_size=4, rank=rank,
                         world_size=2, read_all=False)
    assert torch.equal(generate_samples(model, tok, 10, 12, seed=3, cache_dir=tmp_path / "b", chunk_size=4,
                                        allow_generation=False), single)
    # resumable: a lost chunk is regenerated identically, the others are read back
    (folder,) = (tmp_path / "a").iterdir()
    (folder / "chunk00001.json").unlink()
    assert torch.equal(generate_samples(model, tok, 10, 12, seed=3, cache_dir=tmp_path / "a", chunk_size=4), single)
    assert not torch.equal(generate_samples(model, tok, 10, 12, seed=4, chunk_size=4), single)
    (folder / "chunk00002.json").unlink()
    with pytest.raises(PrunerError, match="chunk 2 is not in the cache"):
        generate_samples(model, tok, 10, 12, seed=3, cache_dir=tmp_path / "a", chunk_size=4,
                         allow_generation=False)


def test_writing_leaves_the_tokenizer_as_it_was(tiny_dir, tmp_path):
    # padding=True switches a fast tokenizer's backend padding on (left): saved, every later
    # export's tokenizer.json would pad on the left by default
    model, tok = tiny_causal_lm("llama", vocab_size=len(_tok(tiny_dir))), _tok(tiny_dir)
    side, padding = tok.padding_side, tok.backend_tokenizer.padding
    generate_samples(model, tok, 4, 6, seed=0, chunk_size=4)
    assert (tok.padding_side, tok.backend_tokenizer.padding) == (side, padding)
    tok.save_pretrained(tmp_path)
    assert '"padding": null' in (tmp_path / "tokenizer.json").read_text()


SHARDED_SCRIPT = """
import os, sys, torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from pruner.errors import PrunerError
from pruner.data.generated import generate_samples
from pruner.structure import model_fingerprint
from pruner.testing import tiny_causal_lm
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
dist.init_process_group("gloo", rank=0, world_size=1)
model = tiny_causal_lm("llama")
dense = model_fingerprint(model)
for layer in model.model.layers:
    fully_shard(layer, mesh=init_device_mesh("cpu", (1,)))
fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
assert type(model.model.embed_tokens.weight).__name__ == "DTensor"
print("fingerprint", model_fingerprint(model) == dense)
try:
    generate_samples(model, None, 4, 8, cache_dir=sys.argv[1], world_size=2, save_states=True)
except PrunerError as err:
    print("refused", err)
dist.destroy_process_group()
"""


def test_a_sharded_model_keeps_its_fingerprint_and_records_no_states(tmp_path):
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    (tmp_path / "sharded.py").write_text(SHARDED_SCRIPT)
    proc = subprocess.run([sys.executable, str(tmp_path / "sharded.py"), str(tmp_path / "cache"), port],
                          capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the generated text's cache key: a sharded model names the same text as its unsharded copy
    assert "fingerprint True" in proc.stdout, proc.stdout
    assert "refused generate_samples(save_states=True) does not record teacher states through a model sharded" \
        in proc.stdout, proc.stdout


def test_states_saved_while_writing_give_the_teachers_logits(tiny_dir, tmp_path):
    from pruner.data.generated import read_states
    from pruner.structure import model_fingerprint

    model, tok = tiny_causal_lm("llama", vocab_size=len(_tok(tiny_dir))), _tok(tiny_dir)
    settings = dict(seed=3, cache_dir=tmp_path / "a", chunk_size=4)
    ids = generate_samples(model, tok, 10, 12, save_states=True, **settings)
    states = read_states(10, 12, fingerprint=model_fingerprint(model), **settings)
    assert states.shape == (10, 11, 64) and states.dtype == torch.float32
    with torch.no_grad():  # the output layer on the saved states = the logits of a forward pass over the text
        assert_close(model.get_output_embeddings()(states), model(input_ids=ids).logits[:, :-1], rtol=1e-4, atol=1e-4)
    # text cached without states gets them from a forward pass: the same to rounding, the text unchanged
    assert torch.equal(generate_samples(model, tok, 10, 12, **{**settings, "cache_dir": tmp_path / "b"}), ids)
    assert read_states(10, 12, fingerprint=model_fingerprint(model), **{**settings, "cache_dir": tmp_path / "b"}) is None
    assert torch.equal(generate_samples(model, tok, 10, 12, save_states=True, **{**settings, "cache_dir": tmp_path / "b"}),
                       ids)
    assert_close(read_states(10, 12, fingerprint=model_fingerprint(model), **{**settings, "cache_dir": tmp_path / "b"}),
                 states, rtol=1e-4, atol=1e-5)
    # a pruned model (allow_generation=False) never writes states: a chunk without them gives None
    (folder,) = (tmp_path / "b").iterdir()
    (folder / "chunk00001.states.safetensors").unlink()
    generate_samples(model, tok, 10, 12, save_states=True, allow_generation=False, **{**settings, "cache_dir": tmp_path / "b"})
    assert read_states(10, 12, fingerprint=model_fingerprint(model), **{**settings, "cache_dir": tmp_path / "b"}) is None
    with pytest.raises(PrunerError, match="writes the states beside the cached text: give cache_dir"):
        generate_samples(model, tok, 4, 12, save_states=True)


def test_logits_post_processed_after_the_output_layer_are_detected():
    import transformers as tf

    from pruner.data.generated import output_layer_reproduces_logits

    assert output_layer_reproduces_logits(tiny_causal_lm("llama"))
    assert output_layer_reproduces_logits(tiny_causal_lm("qwen2"))
    config = tf.Gemma2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=16, vocab_size=128, final_logit_softcapping=2.0)
    torch.manual_seed(0)
    assert not output_layer_reproduces_logits(tf.Gemma2ForCausalLM(config).eval())  # tanh soft-capping


def _nucleus_frequencies(sampler: NucleusSampler, probs: torch.Tensor, draws: int) -> torch.Tensor:
    torch.manual_seed(0)
    scores = probs.log().expand(draws, -1)  # one row per draw
    return torch.bincount(sampler(None, scores).argmax(-1), minlength=probs.shape[-1]).double() / draws


@pytest.mark.parametrize("candidates", [2, 1024])  # 2: every nucleus reaches past the candidates (full sort)
def test_nucleus_sampler_draws_from_the_renormalised_nucleus(candidates):
    probs = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15])  # by rank: 0.4, 0.3, 0.15 | 0.1, 0.05
    sampler = NucleusSampler(temperature=1.0, top_p=0.8, candidates=candidates)
    freq = _nucleus_frequencies(sampler, probs, 40_000)
    expected = torch.tensor([0.0, 0.4, 0.0, 0.3, 0.15], dtype=torch.float64) / 0.85
    assert_close(freq, expected, atol=0.01, rtol=0)  # 3 binomial standard errors: 0.0075
    # temperature flattens the distribution before the nucleus is taken: at T=4 all five are in it
    hot = _nucleus_frequencies(NucleusSampler(temperature=4.0, top_p=0.99, candidates=candidates), probs, 40_000)
    flat = probs ** 0.25 / (probs ** 0.25).sum()
    assert_close(hot, flat.double(), atol=0.01, rtol=0)


def test_nucleus_sampler_with_top_p_1_draws_the_whole_distribution():
    probs = torch.tensor([0.05, 0.4, 0.0, 0.1, 0.3, 0.15])  # a token the model rules out (score -inf)
    freq = _nucleus_frequencies(NucleusSampler(temperature=1.0, top_p=1.0), probs, 40_000)
    assert freq[2] == 0  # never drawn
    assert_close(freq, probs.double(), atol=0.01, rtol=0)  # the tail (0.05, 0.1) is kept: no truncation
    hot = _nucleus_frequencies(NucleusSampler(temperature=2.0, top_p=1.0), probs, 40_000)
    flat = probs.sqrt() / probs.sqrt().sum()
    assert_close(hot, flat.double(), atol=0.01, rtol=0)


def test_inverse_cdf_draw_never_picks_a_zero_weight_entry():
    weights = torch.tensor([[0.0, 3.0, 0.0, 1.0, 0.0]]).expand(20_000, -1)
    torch.manual_seed(0)
    drawn = torch.bincount(inverse_cdf_draw(weights), minlength=5)
    assert drawn[[0, 2, 4]].sum() == 0
    assert abs(drawn[1].item() / 20_000 - 0.75) < 0.01  # 3 standard errors: 0.009


def test_nucleus_sampler_mixes_narrow_and_wide_rows_in_one_batch():
    narrow, wide = torch.tensor([0.97, 0.01, 0.01, 0.01]), torch.tensor([0.25, 0.25, 0.25, 0.25])
    scores = torch.stack([narrow, wide] * 500).log()  # (1000, 4)
    torch.manual_seed(0)
    out = NucleusSampler(temperature=1.0, top_p=0.9, candidates=2)(None, scores)
    assert torch.isinf(out).sum(-1).eq(3).all()  # exactly one finite score per row
    chosen = out.argmax(-1)
    assert chosen[0::2].eq(0).all()  # the narrow rows' nucleus is their top token
    assert set(chosen[1::2].tolist()) == {0, 1, 2, 3}  # the wide rows draw beyond the 2 candidates


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.7, "top_p": 0.9}])  # {}: the defaults (1.0, 1.0)
def test_datamodule_recovers_on_text_the_dense_model_generated(tiny_dir, tmp_path, sampling):
    import pruner
    from pruner.lightning_modules.causal_lm import CausalLMModule
    from pruner.lightning_modules.data import PruneDataModule

    L.seed_everything(0, verbose=False)
    module = CausalLMModule(str(tiny_dir), learning_rate=1e-2, distillation_alpha=0.5)
    cache = tmp_path / "cache"
    data = PruneDataModule(calibration_samples=2, calibration_seq_len=16, recovery_source="generated",
                           recovery_max_records=8, cutoff_len=24, micro_batch_size=4, generation_cache=str(cache),
                           recovery_epochs=2, **{f"generation_{k}": v for k, v in sampling.items()})
    _trainer(tmp_path, [StructuralPruneCallback(lora_dropout=0.0, pruning_ratio=0.5, verbose=False)]).fit(module, data)
    dense, tok = pruner.load_model(str(tiny_dir))
    # allow_generation=False: the text must be the cache's, written under these sampling settings
    expected = generate_samples(dense, tok, 8, 24, seed=2, cache_dir=cache, chunk_size=16, allow_generation=False,
                                **sampling)
    assert [r["input_ids"] for r in data.recovery] == expected.tolist()
    assert all(r["labels"] == r["input_ids"] for r in data.recovery)  # every generated token is learned
    assert module.global_step == 2 + 2 * 2


def test_callback_refits_on_text_the_dense_model_generated(tiny_dir, tmp_path):
    import pruner
    from pruner.lightning_modules.causal_lm import CausalLMModule
    from pruner.lightning_modules.data import PruneDataModule

    L.seed_everything(0, verbose=False)
    module = CausalLMModule(str(tiny_dir))
    cache = tmp_path / "cache"
    data = PruneDataModule(calibration_samples=2, calibration_seq_len=16, micro_batch_size=4,
                           generation_cache=str(cache), reconstruction_source="generated",
                           reconstruction_samples=8, reconstruction_seq_len=12)
    prune = StructuralPruneCallback(lora_dropout=0.0, pruning_ratio=0.5, reconstruct=True, mlp_selection="obs", attach_lora=False,
                                    verbose=False)
    _trainer(tmp_path, [prune]).fit(module, data)
    dense, tok = pruner.load_model(str(tiny_dir))
    # written by the dense model before calibration, with the reconstruction seed (seed + 3)
    text = generate_samples(dense, tok, 8, 12, seed=3, cache_dir=cache, chunk_size=16, allow_generation=False)
    assert torch.equal(torch.cat(data.reconstruction_batches()), text)
    assert prune.plan.calibration["reconstruction_tokens"] == 8 * 12
    reference = pruner.prune(dense, [w.unsqueeze(0) for w in data.calibration], pruning_ratio=0.5, reconstruct=True,
                             mlp_selection="obs", reconstruction_batches=text.split(4))
    assert prune.plan.to_dict()["layers"] == reference.to_dict()["layers"]
    assert_close(module.hf_model.state_dict(), dense.state_dict(), rtol=1e-5, atol=1e-6)


def test_generated_text_of_the_refit_is_the_recovery_text_when_windows_match(tiny_dir, tmp_path):
    """Refit and distillation both on generated windows of one length: written once (the same
    cached chunks), so the recovery windows are the refit's first ones, and more come after."""
    import pruner
    from pruner.lightning_modules.causal_lm import CausalLMModule
    from pruner.lightning_modules.data import PruneDataModule

    L.seed_everything(0, verbose=False)
    module = CausalLMModule(str(tiny_dir), distillation_alpha=1.0)
    data = PruneDataModule(calibration_samples=2, calibration_seq_len=16, micro_batch_size=4,
                           generation_cache=str(tmp_path / "cache"), reconstruction_source="generated",
                           reconstruction_samples=8, reconstruction_seq_len=12, recovery_source="generated",
                           recovery_max_records=20, cutoff_len=12, recovery_epochs=1)
    prune = StructuralPruneCallback(lora_dropout=0.0, pruning_ratio=0.5, reconstruct=True, verbose=False)
    _trainer(tmp_path, [prune]).fit(module, data)
    refit = torch.cat(data.reconstruction_batches()).tolist()
    recovery = [r["input_ids"] for r in data.recovery]
    assert len(recovery) == 20 and recovery[:8] == refit
    dense, tok = pruner.load_model(str(tiny_dir))  # all 20 from the refit's cached stream (seed + 3)
    cached = generate_samples(dense, tok, 20, 12, seed=3, cache_dir=tmp_path / "cache", chunk_size=16,
                              allow_generation=False)
    assert recovery == cached.tolist()
