"""The command line end to end on a small shipped data set (runs the real fit and prediction)."""

import json
import math

import numpy as np
import pandas as pd
import pytest
from _util import sklearn_posterior

from gpadjoint.cli import main

KEYS = {
    "dataset", "split", "backend", "dtype", "config", "seed", "versions", "machine", "commit",
    "history", "hyperparameters", "test_rmse", "test_nll", "final_train_loss",
    "seconds_per_epoch",
}


@pytest.fixture(scope="module")
def yacht_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    out, ckpt, model = tmp / "run.json", tmp / "run.ckpt", tmp / "model.gp"
    rc = main(["fit", "--dataset", "yacht", "--epochs", "4", "--dtype", "float64", "--quiet",
               "--out", str(out), "--checkpoint", str(ckpt), "--save-model", str(model)])
    assert rc == 0
    return json.loads(out.read_text()), tmp, model


def test_fit_writes_a_complete_run_record(yacht_run, capsys):
    rec, _, _ = yacht_run
    assert KEYS <= set(rec)
    assert rec["dataset"] == "yacht" and rec["backend"] == "dense"
    assert "auto" in rec["backend_reason"]
    # the plan (every "auto" resolved once) is recorded, and the flat keys agree with it
    assert rec["plan"]["backend"] == {"name": "dense", "reason": rec["backend_reason"]}
    assert rec["plan"]["estimator"]["name"] == rec["estimator"] == "exact"
    assert len(rec["history"]) == 4
    # prediction's automatic choice, with its reason: yacht's K fits, so the exact posterior
    assert rec["posterior"] == "exact" and rec["posterior_reason"].startswith("auto: K needs")
    assert all(math.isfinite(h["loss"]) for h in rec["history"])
    last = rec["history"][-1]  # L-BFGS records the loss at the point it accepted
    assert rec["final_train_loss"] == last.get("new_loss", last["loss"])
    hp = rec["hyperparameters"]
    assert len(hp["lengthscale"]) == 6 and hp["noise"] > 0 and hp["outputscale"] > 0
    # the RMSE and NLL are those of the recorded hyperparameters' posterior, in the target's
    # units (yacht's target has std ~15), checked against scikit-learn's GP with them fixed
    from gpadjoint.datasets import load_dataset

    s = load_dataset("yacht", 0)
    Xtr, Xte = s.unscale_X(s.X_train), s.unscale_X(s.X_test)
    ytr, yte = s.unscale_y(s.y_train), s.unscale_y(s.y_test)
    mu, sd = sklearn_posterior(hp, Xtr, ytr, Xte)
    assert rec["test_rmse"] == pytest.approx(float(np.sqrt(np.mean((mu - yte) ** 2))), rel=1e-6)
    nll = np.mean(0.5 * np.log(2 * math.pi * sd**2) + 0.5 * (yte - mu) ** 2 / sd**2)
    assert rec["test_nll"] == pytest.approx(float(nll), rel=1e-6)


def test_saved_model_predicts_from_csv(yacht_run, tmp_path):
    from gpadjoint.datasets import load_dataset

    rec, _, model = yacht_run
    split = load_dataset("yacht", 0)
    X = split.unscale_X(split.X_test)

    pd.DataFrame(X, columns=[f"x{i}" for i in range(6)]).to_csv(tmp_path / "in.csv", index=False)
    rc = main(["predict", "--model", str(model), "--data", str(tmp_path / "in.csv"),
               "--out", str(tmp_path / "pred.csv")])
    assert rc == 0
    pred = pd.read_csv(tmp_path / "pred.csv")
    y = split.y_test * split.y_std + split.y_mean
    rmse = float(np.sqrt(np.mean((pred["mean"].to_numpy() - y) ** 2)))
    assert rmse == pytest.approx(rec["test_rmse"], rel=1e-3)
    assert (pred["std"] > 0).all()


def test_datasets_lists_shipped_sets(capsys):
    assert main(["datasets"]) == 0
    out = capsys.readouterr().out
    assert "elevators" in out and "16599" in out and "song" in out


def test_bad_arguments_are_clear(tmp_path, capsys):
    assert main(["fit", "--dataset", "nosuchset", "--epochs", "1"]) == 2
    assert "nosuchset" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--target"):
        main(["fit", "--data", str(tmp_path / "x.csv")])
    with pytest.raises(SystemExit, match="no checkpoint"):
        main(["fit", "--dataset", "yacht", "--resume", "--checkpoint", str(tmp_path / "none")])


def test_out_may_name_a_directory(tmp_path):
    from datetime import datetime, timezone

    from gpadjoint.cli import record_path

    t = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    name = "yacht-split0-seed0-20260102T030405Z.json"
    assert record_path(str(tmp_path), "yacht-split0-seed0", t) == tmp_path / name
    assert record_path(str(tmp_path / "new") + "/", "yacht-split0-seed0", t) == (
        tmp_path / "new" / name)
    assert record_path(str(tmp_path / "r.json"), "x", t) == tmp_path / "r.json"
    assert record_path(None, "x", t).parent.name == "runs"


@pytest.mark.filterwarnings("ignore::gpadjoint.start.SubsetStartWarning")
@pytest.mark.slow
def test_fit_that_keeps_the_subset_start_completes_its_record(tmp_path, capsys):
    # noise-free targets: the subset fit interpolates and full_fit = "auto" keeps it
    rng = np.random.default_rng(5)
    X = rng.uniform(-1, 1, (440, 2))
    y = np.sin(2 * X[:, 0]) + X[:, 1] ** 2
    csv = tmp_path / "smooth.csv"
    pd.DataFrame({"a": X[:, 0], "b": X[:, 1], "y": y}).to_csv(csv, index=False)
    cfg = tmp_path / "c.toml"
    cfg.write_text('[mll]\nestimator = "slq"\nexact_max_n = 100\nnum_probes = 4\n'
                   'lanczos_depth = 8\nprecond_rank = 20\n[train]\ninit_subset = 100\n'
                   'epochs = 3\n[predict]\ncg_tol = 1e-9\n')
    out = tmp_path / "run.json"
    rc = main(["fit", "--data", str(csv), "--target", "y", "--test-fraction", "0.1",
               "--config", str(cfg), "--out", str(out), "--quiet"])
    assert rc == 0
    rec = json.loads(out.read_text())
    assert rec["complete"] and rec["history"] == [] and rec["final_train_loss"] is None
    assert rec["full_fit"]["fit"] is False and rec["init_subset"]["interpolating"]
    assert rec["stopped_reason"].startswith("kept the subset start")
    assert rec["test_rmse"] < 0.01  # noise-free data, interpolated from all training rows
    assert "no full-n step (kept the subset start" in capsys.readouterr().out


def test_fit_with_the_stored_backend_records_it(tmp_path):
    # --backend stored reaches the SLQ estimator (the exact one never calls a backend) and the
    # run record and the checkpoint's fingerprint name it
    from gpadjoint.checkpoint import _read

    out, ckpt, cfg = tmp_path / "run.json", tmp_path / "run.ckpt", tmp_path / "slq.toml"
    cfg.write_text('[mll]\nestimator = "slq"\n')
    rc = main(["fit", "--dataset", "yacht", "--epochs", "1", "--dtype", "float64", "--quiet",
               "--backend", "stored", "--config", str(cfg), "--out", str(out),
               "--checkpoint", str(ckpt)])
    assert rc == 0
    rec = json.loads(out.read_text())
    assert (rec["backend"], rec["backend_reason"]) == ("stored", "requested")
    assert rec["plan"]["estimator"]["name"] == "slq"
    assert _read(ckpt)["fingerprint"]["backend"] == "stored"
