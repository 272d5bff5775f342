"""Shared pytest setup.

KeOps compiles each distinct formula once (~10 s of g++) and caches the shared library on disk;
pin that cache to one folder inside the repository (ignored by git) so that every test session
reuses it. This must happen before pykeops is first imported.

JAX's persistent compilation cache does the same for XLA: every jitted function compiled in one
session is written to ``.jax_cache/`` in the repository (ignored by git), so a later session, and
the child interpreters the slow tests start (they inherit the environment variables set here),
load it instead of compiling again. ``.ci/run`` shares the folder between its two steps.

``python -m pytest -q`` runs the fast suite: pyproject.toml's addopts deselect the tests marked
``slow``, and every test marked ``keops`` (a g++ compile per formula on a fresh cache) or
``gpytorch`` (the peer's fits) is marked ``slow`` here too, so ``-m slow`` runs all the rest.

The tests call the low-level functions with float64 arrays, so they opt in to JAX's 64-bit mode
once here, explicitly (``import gpadjoint`` does not change it; see gpadjoint/__init__.py).
tests/test_x64.py checks the package without this opt-in, in a fresh interpreter.
"""

import importlib.util
import os
from pathlib import Path

import jax
import pytest

ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("KEOPS_CACHE_FOLDER", str(ROOT / ".keops_cache"))
# as environment variables, so that child interpreters use the same cache; the default
# threshold (cache only what took 1 s or more to compile) would skip most of the suite's small
# functions, so cache every one of them
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(ROOT / ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
jax.config.update("jax_enable_x64", True)


def pytest_collection_modifyitems(config, items):
    """KeOps and GPyTorch tests are slow tests (see the module docstring)."""
    for item in items:
        if item.get_closest_marker("keops") or item.get_closest_marker("gpytorch"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def load_script():
    """Return ``load(name)``: the module ``scripts/<name>.py``, imported by path (scripts/ is
    not a package); each call imports it afresh."""

    def load(name: str):
        path = ROOT / "scripts" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    return load
