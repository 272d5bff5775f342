"""Shared pytest setup.

KeOps compiles each distinct formula once (~10 s of g++) and caches the shared library on disk;
pin that cache to one folder inside the repository (ignored by git) so that every test session
reuses it. This must happen before pykeops is first imported.

The tests call the low-level functions with float64 arrays, so they opt in to JAX's 64-bit mode
once here, explicitly (``import gpadjoint`` does not change it; see gpadjoint/__init__.py).
tests/test_x64.py checks the package without this opt-in, in a fresh interpreter.
"""

import os
from pathlib import Path

import jax

os.environ.setdefault(
    "KEOPS_CACHE_FOLDER", str(Path(__file__).resolve().parents[1] / ".keops_cache")
)
jax.config.update("jax_enable_x64", True)
