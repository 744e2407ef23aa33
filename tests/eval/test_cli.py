"""The `evaluate` command: end to end on tiny saved models, and one-line errors for bad paths."""

import json

import pytest
import torch

from pruner.eval.cli import main
from pruner.testing import CORPUS, tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tok = tiny_tokenizer()
    for name, seed in [("dense", 0), ("pruned", 1)]:
        tiny_llama(vocab_size=len(tok), seed=seed).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    (root / "wiki.test.raw").write_text("".join(f" {s} \n \n" for s in CORPUS * 4))
    (root / "zs").mkdir()
    items = [{"query": "Question : the cat ?", "choices": ["yes", "no the dog"], "gold": k % 2} for k in range(4)]
    (root / "zs" / "toy.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    from pruner.structure import LayerPlan, Plan

    Plan([LayerPlan(0, heads_kept=[0, 1])], model={"num_attention_heads": 4}).save(root / "pruned" / "plan.json")
    return root


def test_end_to_end(workspace, capsys):
    out = workspace / "report"
    code = main([
        "evaluate", "--model", str(workspace / "dense"), "--compare", str(workspace / "pruned"),
        "--wikitext", str(workspace / "wiki.test.raw"), "--zeroshot-dir", str(workspace / "zs"),
        "--tasks", "toy", "--seq-len", "16", "--max-tokens", "256", "--new-tokens", "3",
        "--backend", "builtin", "--output", str(out),
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| dense |" in printed and "| pruned |" in printed and "toy acc" in printed
    results = json.loads((out / "results.json").read_text())
    assert set(results["models"]) == {"dense", "pruned"}
    assert results["models"]["dense"]["zeroshot"]["toy"]["n"] == 4
    assert results["models"]["dense"]["wikitext2_ppl"] > 1
    assert (out / "report.md").is_file()
    assert (out / "plan_heads.png").is_file()  # plan.json found next to the pruned model
    # --device auto: the CPU on a machine without a GPU, said in the results and under the speed table
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert results["meta"]["device"] == expected and f"On {expected}: batch 1" in printed


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a GPU")
def test_a_gpu_asked_for_on_a_machine_without_one_is_refused_before_loading(workspace, capsys):
    code = main(["--model", str(workspace / "dense"), "--device", "cuda", "--output", str(workspace / "never")])
    err = capsys.readouterr().err
    assert code == 2 and "sees no GPU" in err and "use 'cpu'" in err
    assert not (workspace / "never").exists()


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--wikitext", "/nonexistent/wiki.test.raw"], "/nonexistent/wiki.test.raw"),
        (["--zeroshot-dir", "/nonexistent", "--tasks", "piqa"], "piqa.jsonl"),
        (["--plan", "/nonexistent/plan.json"], "plan.json"),
        (["--zeroshot-dir", "hub", "--tasks", "nosuchtask"], "nosuchtask"),
        (["--device", "gpu0"], "'gpu0' is not a device"),
        (["--device", "mps"], "on the CPU or a CUDA GPU"),
    ],
)
def test_bad_inputs_one_line_exit_2(workspace, capsys, extra, needle):
    code = main(["--model", str(workspace / "dense"), *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert needle in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_missing_model_folder(capsys, tmp_path):
    assert main(["--model", str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err


def test_help_and_usage_errors_return_codes(capsys):
    assert main(["--help"]) == 0
    assert "--zeroshot-dir" in capsys.readouterr().out
    assert main([]) == 2  # --model is required
