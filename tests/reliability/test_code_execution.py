"""Nothing we load runs code from its file or folder unless the caller asked by name."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import pruner
from pruner.errors import PrunerError
from pruner.testing import tiny_causal_lm
from tests.helpers import SUBPROCESS_TIMEOUT


def _batches(n: int = 2, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 120, (1, 12), generator=g) for _ in range(n)]


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



def test_the_sharded_resume_reads_the_callback_state_as_plain_data(tmp_path):
    """FSDP2's resume reads the callback state before Lightning loads anything: from a file or a
    sharded checkpoint's meta.pt, tensors mapped, and a file that would run code refused."""
    from pruner.callbacks.resume import callback_state_at

    state = {"pruned": True, "plan": {"layers": []}}
    torch.save({"callbacks": {"StructuralPruneCallback": state}, "weights": torch.zeros(3)}, tmp_path / "a.ckpt")
    folder = tmp_path / "step=4.ckpt"
    folder.mkdir()
    torch.save({"callbacks": {"StructuralPruneCallback": state}}, folder / "meta.pt")
    assert callback_state_at(tmp_path / "a.ckpt", "StructuralPruneCallback") == state
    assert callback_state_at(folder, "StructuralPruneCallback") == state
    assert callback_state_at(folder, "StructuralPruneCallback{'other': 1}") is None
    assert callback_state_at(tmp_path / "missing.ckpt", "StructuralPruneCallback") is None
    marker = tmp_path / "ran"
    torch.save({"callbacks": {"StructuralPruneCallback": state}, "hyper_parameters": _RunsCode(marker)},
               folder / "meta.pt")
    with pytest.raises(PrunerError, match="objects other than tensors"):
        callback_state_at(folder, "StructuralPruneCallback")
    assert not marker.exists()


def test_the_package_loads_nothing_that_can_run_code():
    """Every loader in the package: torch.load only in pruner.io.checkpoint, with weights_only=True;
    no pickle, no eval/exec, no trust_remote_code=True default anywhere."""
    import ast
    import re

    root = Path(pruner.__file__).resolve().parent
    files = [*root.rglob("*.py"), *(root.parent / "callbacks").rglob("*.py"), *(root.parent / "lightning_modules").rglob("*.py")]
    assert len(files) > 40
    for path in files:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                name = ast.unparse(node.func)
                assert name not in ("eval", "exec", "pickle.load", "pickle.loads"), f"{path}: {name}"
                if name == "torch.load":
                    assert path.name == "checkpoint.py" and path.parent.name == "io", path
                    assert any(k.arg == "weights_only" and ast.unparse(k.value) == "True" for k in node.keywords)
                for k in node.keywords:
                    if k.arg == "trust_remote_code":
                        assert ast.unparse(k.value) != "True", f"{path}: trust_remote_code=True"
        defaults = re.findall(r"trust_remote_code: bool = (\w+)", path.read_text())
        assert all(d == "False" for d in defaults), path
