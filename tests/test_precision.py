"""bf16 on hardware that emulates it: which devices have bf16 units, and the one warning each entry
point gives (pruner.prune on a bf16 model, the callback under a bf16 trainer precision, the
evaluation CLI), once per process, with the fix."""

import warnings

import pytest
import torch

import pruner
from pruner import precision
from pruner.precision import bf16_units, warn_if_bf16_is_emulated


@pytest.fixture
def cpu_units(monkeypatch):
    """Sets what the x86 CPU probes answer: ``cpu_units(amx=..., avx512_bf16=...)``; forgets the
    warnings already given."""
    monkeypatch.setattr(precision.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(precision, "_warned", set())

    def set_units(amx: bool = False, avx512_bf16: bool = False) -> None:
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)

    return set_units


def test_x86_units_are_named_and_their_absence_is_empty(cpu_units):
    cpu_units(amx=True, avx512_bf16=True)
    assert bf16_units("cpu") == "AMX, AVX512-BF16"
    cpu_units(avx512_bf16=True)
    assert bf16_units("cpu") == "AVX512-BF16"
    cpu_units()
    assert bf16_units("cpu") == ""
    assert bf16_units("meta") is None  # not a device we can tell about


def test_arm_units_come_from_the_cpu_features(monkeypatch, tmp_path):
    monkeypatch.setattr(precision.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(precision, "_arm_cpu_has_bf16", lambda: True)
    assert bf16_units("cpu") == "Arm BF16"
    monkeypatch.setattr(precision, "_arm_cpu_has_bf16", lambda: False)
    assert bf16_units("cpu") == ""
    monkeypatch.setattr(precision, "_arm_cpu_has_bf16", lambda: None)  # no /proc/cpuinfo (macOS)
    assert bf16_units("cpu") is None


def test_the_warning_names_the_cause_and_the_fix_once_per_process(cpu_units):
    cpu_units()
    with pytest.warns(UserWarning, match=r"a bf16 thing computes in bfloat16, but this CPU has no AMX, "
                                         r"AVX512-BF16 or Arm BF16 units.*several times slower.*; do this instead"):
        assert warn_if_bf16_is_emulated("cpu", "a bf16 thing", "do this instead")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_if_bf16_is_emulated("cpu", "a bf16 thing", "do this instead")  # told once already
        assert warn_if_bf16_is_emulated("cpu", "another bf16 thing", "fix")  # the same cause, on the same device
        cpu_units(amx=True)
        assert not warn_if_bf16_is_emulated("cpu", "a third bf16 thing", "fix")


def test_pruner_prune_warns_on_a_bf16_model_only_where_bf16_is_emulated(cpu_units):
    from pruner.testing import tiny_causal_lm
    from tests.helpers import tiny_batches

    cpu_units()
    model = tiny_causal_lm().to(torch.bfloat16)
    with pytest.warns(UserWarning, match=r"a model in bfloat16 computes in bfloat16.*load it in float32"):
        pruner.prune(model, tiny_batches(), pruning_ratio=0.25)
    cpu_units(amx=True)
    precision._warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruner.prune(tiny_causal_lm().to(torch.bfloat16), tiny_batches(), pruning_ratio=0.25)
    assert not [w for w in caught if "bfloat16" in str(w.message)]


@pytest.mark.parametrize("units", [False, True])
@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_the_callback_warns_on_a_bf16_trainer_precision_where_bf16_is_emulated(precision, units, cpu_units, tiny_dir,
                                                                               tmp_path):
    from pruner.callbacks import StructuralPruneCallback
    from pruner.lightning_modules.causal_lm import CausalLMModule
    from pruner.lightning_modules.data import PruneDataModule
    from tests.helpers import cpu_trainer

    cpu_units(amx=units)
    callback = StructuralPruneCallback(lora_dropout=0.0, pruning_ratio=0.25, verbose=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cpu_trainer(tmp_path, [callback], max_steps=3, precision=precision).fit(
            CausalLMModule(str(tiny_dir)), PruneDataModule(calibration_samples=2, calibration_seq_len=16))
    told = [str(w.message) for w in caught if "computes in bfloat16" in str(w.message)]
    assert callback.plan is not None and not callback.plan.is_identity  # the fit pruned either way
    # one warning, naming the trainer's precision (bf16-true also hands the session a bf16 model)
    assert len(told) == (0 if units else 1), told
    assert units or f"trainer precision {precision!r} computes in bfloat16" in told[0]
    if told:
        assert "use precision 32-true (null) here" in told[0]


def test_evaluate_warns_before_loading_a_model_in_bf16_on_such_a_cpu(cpu_units, tiny_dir, tmp_path):
    from pruner.eval.cli import main

    cpu_units()
    with pytest.warns(UserWarning, match=r"--dtype bfloat16 computes in bfloat16.*evaluate with --dtype float32"):
        status = main(["--model", str(tiny_dir), "--dtype", "bfloat16", "--tasks", "piqa", "--zeroshot-dir",
                       str(tmp_path / "none"), "--output", str(tmp_path / "report")])
    assert status != 0  # the missing task file is still refused (the warning does not stop the checks)
