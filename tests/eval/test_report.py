"""compare() on two tiny models and write_report(): files, tables, plan plots as valid PNGs."""

import json

import pytest

from pruner.eval.report import compare, format_tables, generate_samples, plot_plan, write_report
from pruner.testing import CORPUS, shrink_layer, tiny_llama, tiny_tokenizer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_plan():
    layers = [
        {"index": 0, "removed": False, "attention_heads_kept": [0, 1, 2, 3], "kv_heads_kept": [0, 1],
         "mlp_channels_kept": list(range(96))},
        {"index": 1, "removed": False, "attention_heads_kept": [0, 1], "kv_heads_kept": [0],
         "mlp_channels_kept": list(range(40))},
        {"index": 2, "removed": True},  # defensive: a removed layer with no lists
    ]
    groups = [{"kind": "attention_head", "layer": 1, "scores": [0.1 * h for h in range(4)],
               "removed": [h >= 2 for h in range(4)]},
              {"kind": "mlp_channel", "layer": 1, "scores": [c / 96 for c in range(96)],
               "removed": [c < 56 for c in range(96)]},
              {"kind": "layer", "layer": 2, "scores": [float("nan")], "removed": [True]}]
    return {"model": {"num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96,
                      "num_hidden_layers": 3}, "layers": layers, "groups": groups}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tok = tiny_tokenizer()
    dense = tiny_llama(vocab_size=len(tok))
    pruned = tiny_llama(vocab_size=len(tok))
    shrink_layer(pruned, 1, keep_heads=2, keep_kv_heads=1, keep_mlp=40)
    folder = tmp_path_factory.mktemp("zs")
    items = [{"query": "Question : the cat ?", "choices": ["yes", "no the dog"], "gold": k % 2}
             for k in range(6)]
    (folder / "toy.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    return compare(
        {"dense": (dense, tok), "pruned": (pruned, tok)},
        wikitext=[s + "\n" for s in CORPUS] * 4,
        zeroshot_dir=folder,
        tasks=["toy"],
        seq_len=16,
        max_tokens=None,
        prompts=["the cat sat", "one two"],
        new_tokens=4,
        latency={"seq_len": 8, "new_tokens": 3, "repeats": 1},
        backend="builtin",
    )


def test_compare_collects_every_metric(results):
    dense, pruned = results["models"]["dense"], results["models"]["pruned"]
    assert pruned["parameters"] < dense["parameters"]
    assert pruned["efficiency"]["macs_per_token"] < dense["efficiency"]["macs_per_token"]
    assert dense["wikitext2_ppl"] > 1 and pruned["wikitext2_ppl"] != dense["wikitext2_ppl"]
    assert dense["zeroshot"]["toy"]["n"] == 6
    assert len(dense["generations"]) == 2 and set(dense["generations"][0]) == {"prompt", "greedy", "sampled"}


def test_generations_are_reproducible():
    tok = tiny_tokenizer()
    model = tiny_llama(vocab_size=len(tok))
    first = generate_samples(model, tok, ["the cat sat", "one two"], new_tokens=6, seed=3)
    second = generate_samples(model, tok, ["one two"], new_tokens=6, seed=3)
    # Seeded per prompt: the sample of "one two" does not depend on the prompts before it.
    assert first[1] == second[0]
    assert len(first[0]["greedy"].split()) >= 1


def test_tables(results):
    text = format_tables(results)
    assert "| dense |" in text and "| pruned |" in text
    assert "WikiText-2 PPL" in text and "toy acc" in text and "prefill tok/s" in text
    removed = 1 - results["models"]["pruned"]["parameters"] / results["models"]["dense"]["parameters"]
    assert f"{removed:.1%}" in text


def test_the_speed_caption_names_the_device_and_warns_of_a_shared_cpu_only_there(results):
    def caption(device):
        text = format_tables({**results, "meta": {**results.get("meta", {}), "device": device}})
        (line,) = [row for row in text.splitlines() if row.startswith("On ")]
        return line

    assert caption("cpu").startswith("On cpu: batch 1") and "shared CPU" in caption("cpu")
    assert caption("cuda").startswith("On cuda: batch 1") and "shared CPU" not in caption("cuda")


def test_a_model_alone_shows_no_removed_fraction(results):
    alone = {**results, "models": {"pruned": results["models"]["pruned"]}}
    quality = format_tables(alone).split("Perplexity:")[0]  # the quality table
    (row,) = [line for line in quality.splitlines() if line.startswith("| pruned |")]
    assert row.split(" | ")[2] == "–"  # not "0.0%": there is no dense model to compare with


def test_write_report_files(results, tmp_path):
    written = write_report(results, tmp_path / "out", plan=make_plan())
    assert set(written) == {"results.json", "report.md", "plan_heads.png", "plan_mlp.png", "plan_scores.png"}
    loaded = json.loads((tmp_path / "out" / "results.json").read_text())
    assert loaded["models"]["pruned"]["parameters"] == results["models"]["pruned"]["parameters"]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Generations" in md and "the cat sat" in md and "![plan_heads.png](plan_heads.png)" in md
    import matplotlib.image

    for name in ("plan_heads.png", "plan_mlp.png", "plan_scores.png"):
        data = written[name].read_bytes()
        assert data[:8] == PNG_MAGIC
        image = matplotlib.image.imread(written[name])
        assert image.shape[0] > 100 and image.shape[1] > 100


def test_report_without_plan_has_no_pngs(results, tmp_path):
    written = write_report(results, tmp_path)
    assert set(written) == {"results.json", "report.md"}
    assert not list(tmp_path.glob("*.png"))


def test_plot_plan_tolerates_partial_plans(tmp_path):
    assert plot_plan({}, tmp_path) == {}
    written = plot_plan({"groups": [{"kind": "kv_group", "scores": [1.0], "removed": [False]}]}, tmp_path)
    assert list(written) == ["plan_scores.png"]
