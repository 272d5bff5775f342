"""Interrupted runs lose nothing: a real `gpadjoint fit` process is killed and resumed.

SIGINT and SIGTERM during training must leave a checkpoint and a partial run record and exit
130; ``--resume`` must then end exactly where an uninterrupted run with the same seed ends.
Checkpoints, model files and run records are written atomically: a failure mid-write leaves
the previous file intact.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gpadjoint import _io

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 30

CONFIG = """
[model]
dtype = "float64"
backend = "dense"
[mll]
estimator = "slq"      # n = 2400 would take the exact estimator; the test wants SLQ + CG
num_probes = 4
lanczos_depth = 8
precond_rank = 10
cg_tol = 1e-2
cg_min_iter = 10
precond_logdet = false
[optim]
optimizer = "adam"     # all {epochs} epochs run (L-BFGS would stop once converged)
lr = 0.05
[train]
epochs = {epochs}
random_state = 7
checkpoint_every = 1
init_subset = 0
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("interrupt")
    rng = np.random.default_rng(0)
    X = rng.uniform(-2, 2, (2400, 3))
    df = pd.DataFrame(X, columns=["a", "b", "c"])
    df["y"] = np.sin(2 * X[:, 0]) * X[:, 1] + 0.1 * rng.standard_normal(len(X))
    data = tmp / "data.csv"
    df.to_csv(data, index=False)
    cfg = tmp / "run.toml"
    cfg.write_text(CONFIG.format(epochs=EPOCHS))
    return tmp, data, cfg


def command(data, cfg, out, ckpt, *extra):
    return [sys.executable, "-m", "gpadjoint.cli", "fit", "--data", str(data), "--target", "y",
            "--config", str(cfg), "--quiet", "--out", str(out), "--checkpoint", str(ckpt),
            *extra]


@pytest.fixture(scope="module")
def uninterrupted(setup):
    tmp, data, cfg = setup
    out = tmp / "full.json"
    proc = subprocess.run(command(data, cfg, out, tmp / "full.ckpt"), cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_kill_then_resume_ends_where_an_uninterrupted_run_ends(setup, uninterrupted, sig):
    tmp, data, cfg = setup
    out, ckpt = tmp / f"run-{sig.name}.json", tmp / f"run-{sig.name}.ckpt"
    proc = subprocess.Popen(command(data, cfg, out, ckpt), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    # Wait until training is under way (a checkpoint exists after the first epoch), then kill.
    deadline = time.time() + 600
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    os.kill(proc.pid, sig)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 130, err[-2000:]
    assert "--resume" in err  # the message says how to continue
    partial = json.loads(out.read_text())
    assert partial["complete"] is False and partial["test_rmse"] is None
    done = len(partial["history"])
    assert 1 <= done < EPOCHS

    proc = subprocess.run(command(data, cfg, out, ckpt, "--resume"), cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    resumed = json.loads(out.read_text())
    assert resumed["complete"] is True and len(resumed["history"]) == EPOCHS
    full = uninterrupted
    np.testing.assert_allclose([h["loss"] for h in resumed["history"]],
                               [h["loss"] for h in full["history"]], rtol=1e-10)
    for k in ("outputscale", "noise", "mean"):
        assert resumed["hyperparameters"][k] == pytest.approx(full["hyperparameters"][k],
                                                              rel=1e-10)
    np.testing.assert_allclose(resumed["hyperparameters"]["lengthscale"],
                               full["hyperparameters"]["lengthscale"], rtol=1e-10)
    assert resumed["test_rmse"] == pytest.approx(full["test_rmse"], rel=1e-8)


def test_failed_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "model.gp"
    _io.atomic_write(path, lambda fh: fh.write(b"good file"))

    def crash(fh):
        fh.write(b"half of a new fi")
        raise OSError("disk full (simulated)")

    with pytest.raises(OSError, match="disk full"):
        _io.atomic_write(path, crash)
    assert path.read_bytes() == b"good file"
    assert [p.name for p in tmp_path.iterdir()] == ["model.gp"]  # no temporary left behind
