"""The model store: pull, resolve, list and remove models (see docs/ARCHITECTURE.md "Store")."""

from __future__ import annotations

from .blobs import Progress, ProgressFn
from .catalog import CATALOG, CatalogEntry
from .manifest import Manifest, validate_name
from .store import Store

__all__ = ["CATALOG", "CatalogEntry", "Manifest", "Progress", "ProgressFn", "Store", "validate_name"]
