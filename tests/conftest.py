"""Fixtures shared by the whole suite (plain helpers and markers: ``tests/helpers.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny LLaMA folder with a byte-level tokenizer (``pruner.testing.save_tiny_llama``), shared
    read-only by every test that loads a model by path."""
    from pruner.testing import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny"))
