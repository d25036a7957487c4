"""Shared fixtures. Tiny generated models come from tests/tinymodels.py.

Session-scoped model fixtures are shared by every test: treat them as read-only
and copy them (``shutil.copy``) before changing anything.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from tinymodels import write_tiny_gguf, write_tiny_hf_dir


@pytest.fixture
def herd_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh, empty HERD_HOME; every other HERD_* variable is cleared so the
    developer's environment (API keys, a custom host) cannot leak into tests."""
    for name in list(os.environ):
        if name.startswith("HERD_"):
            monkeypatch.delenv(name)
    home = tmp_path / "herd-home"
    home.mkdir()
    monkeypatch.setenv("HERD_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random f32 llama GGUF (2 layers, 64 dims, 512-token byte-level BPE, ChatML template)."""
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny-gguf") / "tiny-llama-f32.gguf")


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same model as ``tiny_gguf`` as a Hugging Face directory (float32 safetensors, tokenizer.json)."""
    return write_tiny_hf_dir(tmp_path_factory.mktemp("tiny-hf") / "tiny-llama")
