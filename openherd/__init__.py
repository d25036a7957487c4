"""openherd: pull, run, serve, customise, evaluate and export open Llama-family models."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load_torch_model"]


def load_torch_model(path_or_name: str, **kwargs):
    """Load the PyTorch Llama-family model and tokenizer (needs the `tune` extra)."""
    from .model import load_torch_model as _load

    return _load(path_or_name, **kwargs)
