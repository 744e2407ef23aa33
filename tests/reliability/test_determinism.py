"""The same inputs give the same plan in every process, hash seed and run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import torch

import pruner
from pruner.testing import tiny_causal_lm
from tests.helpers import SUBPROCESS_TIMEOUT


def _batches(n: int = 2, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 120, (1, 12), generator=g) for _ in range(n)]


def test_plan_records_what_reapplying_needs_and_is_bit_identical_across_runs(tmp_path):
    plans = []
    for run in range(2):
        model = tiny_causal_lm("llama")
        plan = pruner.prune(model, _batches(3), target_sparsity=0.2, global_ranking=True)
        plan.save(tmp_path / f"plan{run}.json")
        plans.append((tmp_path / f"plan{run}.json").read_bytes())
    assert plans[0] == plans[1]
    data = json.loads(plans[0])
    assert data["pruner_version"] and data["model"]["fingerprint"] and data["settings"]["target_sparsity"] == 0.2
    reapplied = tiny_causal_lm("llama")
    pruner.apply_plan(pruner.Plan.load(tmp_path / "plan0.json"), reapplied)
    assert pruner.count_parameters(reapplied) == data["params"]["after"]


def test_every_criterion_gives_the_same_plan_in_every_process_and_hash_seed():
    code = textwrap.dedent('''
        import hashlib, torch, pruner
        from pruner.testing import tiny_causal_lm
        g = torch.Generator().manual_seed(0)
        batches = [torch.randint(3, 120, (1, 12), generator=g) for _ in range(2)]
        for criterion in ("random", "element1", "l2"):
            plan = pruner.prune(tiny_causal_lm("llama"), batches, criterion=criterion, target_sparsity=0.2,
                                global_ranking=True)
            print(hashlib.sha256(plan.to_json().encode()).hexdigest())
    ''')
    outs = []
    for seed in ("0", "1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                             timeout=SUBPROCESS_TIMEOUT)
        assert out.returncode == 0, out.stderr[-2000:]
        outs.append(out.stdout)
    assert outs[0] == outs[1] == outs[2] and len(outs[0].split()) == 3
