"""The package leaves JAX's 64-bit flag alone, and still runs float64 where it is asked for.

Each check runs in a fresh interpreter: the test session itself opts in to x64 (conftest.py).
"""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_import_leaves_x64_as_it_found_it_and_exports_the_estimator():
    out = _run("""
        import jax
        before = jax.config.jax_enable_x64
        import gpadjoint
        from gpadjoint import GPRegressor
        import gpadjoint.model, gpadjoint.cli, gpadjoint.train, gpadjoint.mll
        print(before, jax.config.jax_enable_x64, GPRegressor is gpadjoint.model.GPRegressor)
    """)
    assert out == "False False True"


@pytest.mark.slow
def test_float64_estimator_without_global_x64_matches_the_opted_in_process():
    # the same fit with and without the process-wide opt-in: identical predictions in float64
    code = """
        import sys
        import jax
        if sys.argv[-1] == "on":
            jax.config.update("jax_enable_x64", True)
        import numpy as np
        from gpadjoint import GPRegressor
        rng = np.random.default_rng(0)
        X = rng.standard_normal((60, 2)); y = np.sin(X[:, 0]) + 0.1 * rng.standard_normal(60)
        m = GPRegressor(dtype="float64", estimator="slq", epochs=3, random_state=0).fit(X, y)
        mean, std = m.predict(X[:5], return_std=True)
        print(jax.config.jax_enable_x64, m.alpha_.dtype, repr(mean.tolist()), repr(std.tolist()))
    """
    outs = []
    for flag in ("off", "on"):
        res = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code), flag], cwd=ROOT, capture_output=True,
            text=True, timeout=600,
        )
        assert res.returncode == 0, res.stderr
        assert "truncated to dtype float32" not in res.stderr
        outs.append(res.stdout.split())
    off, on = outs
    assert off[0] == "False" and on[0] == "True"  # the estimator restored the flag it found
    assert off[1] == "float64"
    assert off[2:] == on[2:]
