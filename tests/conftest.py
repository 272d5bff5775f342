"""Shared pytest setup.

KeOps compiles each distinct formula once (~10 s of g++) and caches the shared library on disk;
pin that cache to one folder inside the repository (ignored by git) so that every test session
reuses it. This must happen before pykeops is first imported.

The tests call the low-level functions with float64 arrays, so they opt in to JAX's 64-bit mode
once here, explicitly (``import gpadjoint`` does not change it; see gpadjoint/__init__.py).
tests/test_x64.py checks the package without this opt-in, in a fresh interpreter.
"""

import importlib.util
import os
from pathlib import Path

import jax
import pytest

os.environ.setdefault(
    "KEOPS_CACHE_FOLDER", str(Path(__file__).resolve().parents[1] / ".keops_cache")
)
jax.config.update("jax_enable_x64", True)


@pytest.fixture(scope="session")
def load_script():
    """Return ``load(name)``: the module ``scripts/<name>.py``, imported by path (scripts/ is
    not a package); each call imports it afresh."""

    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    return load
