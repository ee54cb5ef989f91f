"""Shared fixtures: tiny seeded models (nothing downloads), the bundled model, a saved checkpoint."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from kvviz.testing import tiny_model
from scripts.browser import CHROMIUM

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def bundled():
    """The committed Austen model (issue 3), loaded once for the whole run."""
    import kvviz

    return kvviz.load_model("bundled")


@pytest.fixture(scope="session")
def tiny_llama():
    return tiny_model("llama_gqa")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny GQA Llama + tokenizer saved with save_pretrained: a 'local checkpoint directory'."""
    lm = tiny_model("llama_gqa", seed=1)
    path = tmp_path_factory.mktemp("tiny-llama")
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def chromium() -> str:
    """Path to Debian's chromium. Skipped locally without it; CI (CI=true) must have it."""
    if Path(CHROMIUM).exists() or shutil.which(CHROMIUM):
        return CHROMIUM
    if os.environ.get("CI"):
        pytest.fail(f"chromium not found at {CHROMIUM}: .ci/run must `apt-get install -y chromium`")
    pytest.skip(f"no browser at {CHROMIUM}: run `apt-get install -y chromium` (or set KVVIZ_CHROMIUM) for browser tests")
