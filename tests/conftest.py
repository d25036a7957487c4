"""Shared fixtures. Tiny generated models come from tests/tinymodels.py.

Session-scoped model fixtures are shared by every test: treat them as read-only
and copy them (``shutil.copy``) before changing anything.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from tinymodels import write_tiny_gguf, write_tiny_hf_dir

pytest_plugins = ["server_helpers"]


@pytest.fixture
def herd_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh, empty HERD_HOME; every other HERD_* setting is cleared so the
    developer's environment (API keys, a custom host) cannot leak into tests.
    HERD_TEST_* variables configure the test run itself and are kept."""
    for name in list(os.environ):
        if name.startswith("HERD_") and not name.startswith("HERD_TEST_"):
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


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """The real default model (SmolLM2-135M-Instruct Q4_1), pulled once into the
    user's store (HERD_TEST_STORE, default ~/.openherd) and reused by later runs.
    HERD_TEST_DEFAULT_GGUF points at an already-extracted copy instead."""
    override = os.environ.get("HERD_TEST_DEFAULT_GGUF")
    if override:
        return Path(override)
    from openherd.settings import get_settings
    from openherd.store import Store

    home = os.environ.get("HERD_TEST_STORE") or str(Path.home() / ".openherd")
    mp = pytest.MonkeyPatch()
    mp.setenv("HERD_HOME", home)
    try:
        manifest = Store(get_settings()).ensure("smollm2")
    finally:
        mp.undo()
    return Path(manifest.path)
