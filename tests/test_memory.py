"""glibc keeps freed memory for reuse when asked (``pruner.memory.keep_freed_memory``), and the
command line asks for it only when run as a program on a machine without a GPU."""

import subprocess
import sys

import pytest
import torch

import pruner.__main__ as entry
from tests.helpers import SUBPROCESS_TIMEOUT

# Allocate, touch and free the same 96 MiB block 6 times (a training step's logits, in small);
# print the minor page faults of each of the last 5 rounds. Each run in a fresh process: the
# setting is the whole process's.
FAULTS = """
import resource, sys, torch
from pruner.memory import keep_freed_memory
if sys.argv[1] == "keep" and not keep_freed_memory():
    sys.exit(print(-1))  # not glibc
def round_trip():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.empty(24 * 2**20)  # 96 MiB of float32
    x.fill_(1.0)  # touch every page
    assert float(x[-1]) == 1.0
    del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
round_trip()
print(*(round_trip() for _ in range(5)))
"""
BLOCK_PAGES = 96 * 2**20 // 4096


def minor_faults(mode: str) -> list[int]:
    out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True,
                         timeout=SUBPROCESS_TIMEOUT)
    assert out.returncode == 0, out.stderr[-1000:]
    return [int(n) for n in out.stdout.split()]


def test_keep_freed_memory_reuses_a_freed_large_block_instead_of_paging_it_in_again():
    kept = minor_faults("keep")
    if kept == [-1]:
        pytest.skip("mallopt is glibc's: this C library keeps its own defaults")
    default = minor_faults("default")
    # glibc maps each block afresh: every round pages the whole block in again
    assert sorted(default)[2] > BLOCK_PAGES // 2
    # kept: most rounds reuse the freed block, already resident (the heap may grow once more
    # while small objects settle next to it)
    assert sorted(kept)[2] < BLOCK_PAGES // 10


def test_allocator_setting_is_skipped_when_asked(monkeypatch):
    monkeypatch.setenv("PRUNER_KEEP_FREED_MEMORY", "0")
    assert entry.tune_allocator_for_cpu_steps() is False


@pytest.mark.parametrize("as_program", [True, False])
def test_command_line_tunes_the_allocator_only_when_run_as_a_program(monkeypatch, as_program):
    """`python -m pruner fit ...` (main() reading sys.argv) sets it; main([...]) called from Python
    (tests, notebooks) leaves the caller's process as it is."""
    calls = []
    monkeypatch.setattr(entry, "tune_allocator_for_cpu_steps", lambda: calls.append(1) or True)
    args = ["fit", "--config", "no_such_config.yaml"]
    monkeypatch.setattr(sys, "argv", ["pruner", *args])
    status = entry.main() if as_program else entry.main(args)
    assert status == 2  # the missing config is still reported as before
    assert calls == ([1] if as_program else [])


def test_release_freed_memory_keeps_live_tensors_intact():
    from pruner.memory import release_freed_memory

    kept = torch.arange(1_000_000, dtype=torch.float32)
    expected = kept.clone()
    garbage = [torch.ones(2_000_000) for _ in range(4)]
    del garbage
    released = release_freed_memory()
    assert released in (True, False)
    assert torch.equal(kept, expected)
