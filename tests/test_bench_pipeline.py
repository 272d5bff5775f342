"""The benchmark pipeline end to end on a tiny data set, so that it cannot silently rot.

``scripts/bench_uci.py`` runs gpadjoint and GPyTorch for two epochs on yacht (n = 278) with the
dense backend, scores both with the common evaluator, and ``scripts/make_table.py`` turns the
records into the table. Also checks that the two methods really start from the same
hyperparameters and see the same data, and that a finished record is skipped on a rerun.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
# bench_uci with a fault injected by monkeypatching (a kill, a segfault): tests/_bench_faults.py
FAULTS = str(Path(__file__).with_name("_bench_faults.py"))
pytest.importorskip("gpytorch", reason="needs the bench extra: pip install -e '.[bench]'")

pytestmark = [pytest.mark.gpytorch, pytest.mark.slow]


def _run(*args):
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    out = tmp_path_factory.mktemp("uci")
    _run("scripts/bench_uci.py", "--datasets", "yacht", "--splits", "0", "--epochs", "2",
         "--methods", "gpadjoint-paper", "gpytorch", "--backends", "dense", "--out-dir", out)
    recs = {p.name: json.loads(p.read_text()) for p in out.glob("*.json")}
    return out, recs


def test_both_methods_write_complete_records(records):
    _, recs = records
    assert set(recs) == {"yacht-split0-gpadjoint-paper-dense-2ep.json",
                         "yacht-split0-gpytorch-dense-2ep.json"}
    for r in recs.values():
        assert r["status"] == "ok", r["status"]
        for key in ("test_rmse", "test_nll", "final_train_loss", "final_train_loss_common",
                    "seconds_per_epoch", "commit", "machine", "versions", "settings"):
            assert r[key] is not None, key
        assert len(r["loss_curve"]) == len(r["seconds_curve"]) == 2
        assert math.isfinite(r["final_train_loss_common"])
        assert r["common_evaluator"]["method"] == "cholesky"
    g = recs["yacht-split0-gpytorch-dense-2ep.json"]
    assert g["settings"]["gpytorch"]["max_cholesky_size"] == 0


def test_same_start_same_data(records):
    _, recs = records
    a = recs["yacht-split0-gpadjoint-paper-dense-2ep.json"]
    g = recs["yacht-split0-gpytorch-dense-2ep.json"]
    h_a, h_g = a["hyper_curve"][0], g["hyper_curve"][0]
    for k in ("outputscale", "noise", "mean"):
        assert h_a[k] == pytest.approx(h_g[k], rel=1e-5, abs=1e-6), k
    np.testing.assert_allclose(h_a["lengthscale"], h_g["lengthscale"], rtol=1e-5)
    # two stochastic estimates of the same loss at the same parameters: close, not equal
    assert a["loss_curve"][0] == pytest.approx(g["loss_curve"][0], rel=0.05)
    assert a["n_train"] == g["n_train"] == 278


def test_rerun_skips_finished_records_and_table_is_built(records, tmp_path):
    out, recs = records
    stdout = _run("scripts/bench_uci.py", "--datasets", "yacht", "--splits", "0", "--epochs",
                  "2", "--backends", "dense", "--out-dir", out)
    assert stdout.count("skip (done)") == 2
    _run("scripts/make_table.py", "--records", out, "--out", tmp_path)
    table = (tmp_path / "table.md").read_text()
    assert "| yacht | gpadjoint-paper | dense | 2 | 0 |" in table
    assert "| yacht | gpytorch | dense | 2 | 0 |" in table
    assert "Like-for-like" in table
    assert (tmp_path / "figures" / "race_yacht.png").stat().st_size > 1000
    rows = (tmp_path / "table.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[0].startswith("dataset,method,backend")


def test_bench_epoch_rows_from_the_records(records, tmp_path):
    import csv

    out, _ = records
    _run("scripts/bench_epoch.py", "--records", out, "--out", tmp_path / "be.csv")
    rows = list(csv.DictReader(open(tmp_path / "be.csv")))
    assert len(rows) == 1 and rows[0]["method"] == "gpadjoint-paper"
    r = rows[0]
    assert float(r["seconds_per_epoch_ratio"]) > 0
    assert [c for c in r if "ratio" in c] == ["seconds_per_epoch_ratio", "time_to_quality_ratio"]
    # dense, depth 10, CG warm-started (+1 pass) sharing the Lanczos passes, then 10 adjoint
    # passes, one fused VJP and the build of K
    rec = json.loads(next(Path(out).glob("*-gpadjoint-paper-dense-*.json")).read_text())
    expected = np.median([max(10, c + 1) + 10 + 1 + 1 for c in rec["cg_iterations_curve"]])
    assert float(r["passes_per_epoch"]) == expected and int(r["passes_min_design"]) == 22
    assert r["time_to_quality_ratio"] == "" or float(r["time_to_quality_ratio"]) > 0


def test_blocked_backend_is_paired_with_gpytorch_keops(records, tmp_path):
    """gpadjoint's blocked backend has no GPyTorch twin: GPyTorch is skipped with a reason, and
    bench_epoch / make_table pair the blocked run with GPyTorch's KeOps record, saying so."""
    import csv
    import shutil

    src, recs = records
    out = tmp_path / "uci"
    out.mkdir()
    # GPyTorch's dense yacht record stands in for its KeOps one (the pairing is what is tested)
    g = dict(recs["yacht-split0-gpytorch-dense-2ep.json"], backend="keops")
    (out / "yacht-split0-gpytorch-keops-2ep.json").write_text(json.dumps(g))
    shutil.copy(src / "yacht-split0-gpadjoint-paper-dense-2ep.json", out)
    stdout = _run("scripts/bench_uci.py", "--datasets", "yacht", "--splits", "0", "--epochs",
                  "2", "--methods", "gpadjoint-paper", "gpytorch", "--backends", "blocked",
                  "--out-dir", out)
    assert "GPyTorch has no 'blocked' backend" in stdout
    assert not (out / "yacht-split0-gpytorch-blocked-2ep.json").exists()
    b = json.loads((out / "yacht-split0-gpadjoint-paper-blocked-2ep.json").read_text())
    d = recs["yacht-split0-gpadjoint-paper-dense-2ep.json"]
    assert b["status"] == "ok" and b["settings"]["backend_reason"] == "requested"
    # same probes and start: the blocked and dense matvecs differ by float32 rounding only
    np.testing.assert_allclose(b["loss_curve"], d["loss_curve"], rtol=1e-3)
    _run("scripts/bench_epoch.py", "--records", out, "--out", tmp_path / "be.csv")
    rows = {r["backend"]: r for r in csv.DictReader(open(tmp_path / "be.csv"))}
    assert set(rows) == {"blocked"}  # the dense gpadjoint run has no dense GPyTorch peer here
    assert rows["blocked"]["gpytorch_backend"] == "keops"
    assert rows["blocked"]["gpytorch_record"] == "yacht-split0-gpytorch-keops-2ep.json"
    assert int(rows["blocked"]["passes_min_design"]) == 21  # no build of K on the fly
    _run("scripts/make_table.py", "--records", out, "--out", tmp_path)
    table = (tmp_path / "table.md").read_text()
    assert "yacht, blocked, 2 epochs, gpadjoint-paper vs GPyTorch keops" in table


def test_a_crash_in_prediction_keeps_the_fit_and_scores_it(records, tmp_path):
    """GPyTorch's KeOps prediction segfaulted on kin40k after 50 minutes of training: the
    training curves and the common loss survive, and the final hyperparameters are scored by
    gpadjoint's predictor, labelled as such."""

    _, recs = records
    out = tmp_path / "uci"
    proc = subprocess.run(
        [sys.executable, FAULTS, "crash-in-predict", "--datasets", "yacht", "--splits", "0",
         "--epochs", "2", "--methods", "gpytorch", "--backends", "dense", "--out-dir", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    r = json.loads((out / "yacht-split0-gpytorch-dense-2ep.json").read_text())
    ref = recs["yacht-split0-gpytorch-dense-2ep.json"]
    assert r["status"] == "ok" and "rc=-11" in r["own_predict_status"]
    assert r["predict_method"].startswith("gpadjoint's predictor")
    assert len(r["loss_curve"]) == 2 and math.isfinite(r["final_train_loss_common"])
    # same start and settings as the undisturbed run: same fit, and both predictors agree
    assert r["final_train_loss_common"] == pytest.approx(ref["final_train_loss_common"],
                                                         rel=1e-4)
    assert r["test_rmse"] == pytest.approx(ref["test_rmse"], rel=2e-2)
    assert not list(out.glob("*.progress"))


@pytest.mark.parametrize("method", ["gpadjoint-paper", "gpytorch"])
def test_killed_run_resumes_on_the_same_trajectory(records, tmp_path, method):
    """A run killed after its first epoch (as a session's end kills it) continues from its
    checkpoint when the same command is run again: same losses as the uninterrupted run, the
    pieces listed in ``segments``, and no checkpoint left behind."""

    _, recs = records
    out = tmp_path / "uci"
    cmd = [sys.executable, "scripts/bench_uci.py", "--datasets", "yacht", "--splits", "0",
           "--epochs", "2", "--methods", method, "--backends", "dense", "--out-dir", str(out)]
    proc = subprocess.run([cmd[0], FAULTS, "die-after-epoch-1", *cmd[2:]], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]  # the run failed
    name = f"yacht-split0-{method}-dense-2ep"
    ckpt = out / (name + (".ckpt.pt" if method == "gpytorch" else ".ckpt.npz"))
    assert ckpt.exists()
    assert json.loads((out / f"{name}.json").read_text())["status"] != "ok"
    # what a resumable run leaves beside its record is not taken for a record (*.json)
    assert [p.name for p in out.glob("*.json")] == [f"{name}.json"]
    stdout = _run(*cmd[1:])
    assert "resuming from" in stdout
    r = json.loads((out / f"{name}.json").read_text())
    ref = recs[f"{name}.json"]
    assert r["status"] == "ok" and r["resumed_from_epoch"] == 1
    assert [s["from_epoch"] for s in r["segments"]] == [0, 1]
    # the record counts both processes (the killed one's seconds, kept every clock tick, may
    # be none on this tiny set: tests/test_bench_table.py checks they are summed)
    assert r["sessions"] == 2 and len(r["session_seconds"]) == 2
    assert r["session_seconds"][1]["seconds"]["run"] > 0
    assert r["total_seconds"] == pytest.approx(r["fit_seconds"] + r["predict_seconds"])
    assert len(r["loss_curve"]) == len(r["seconds_curve"]) == 2
    np.testing.assert_allclose(r["loss_curve"], ref["loss_curve"], rtol=1e-6)
    assert r["final_train_loss_common"] == pytest.approx(ref["final_train_loss_common"],
                                                         rel=1e-6)
    assert not ckpt.exists() and not list(out.glob("*.segments"))
    assert not list(out.glob("*.sessions"))


def test_run_killed_in_prediction_reuses_its_common_loss(records, tmp_path):
    """A session's end kills the batch and its child together after the common evaluator (over
    an hour on keggundirected) has finished: the rerun resumes from the complete checkpoint,
    takes the saved common loss instead of computing it again, says so, and then predicts."""

    _, recs = records
    out = tmp_path / "uci"
    cmd = [sys.executable, "scripts/bench_uci.py", "--datasets", "yacht", "--splits", "0",
           "--epochs", "2", "--methods", "gpytorch", "--backends", "dense", "--out-dir", str(out)]
    proc = subprocess.run([cmd[0], FAULTS, "kill-all-in-predict", *cmd[2:]], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == -9, proc.stdout[-2000:] + proc.stderr[-2000:]
    name = "yacht-split0-gpytorch-dense-2ep"
    assert not (out / f"{name}.json").exists()  # nobody was left to write the record
    saved = json.loads((out / f"{name}.progress").read_text())
    assert saved["stage"] == "predict" and "reused_from_progress" not in saved["common_evaluator"]
    _run(*cmd[1:])
    r = json.loads((out / f"{name}.json").read_text())
    ref = recs[f"{name}.json"]
    assert r["status"] == "ok" and r["resumed_from_epoch"] == 2
    assert r["common_evaluator"]["reused_from_progress"] is True
    assert r["common_evaluator"]["seconds"] == saved["common_evaluator"]["seconds"]
    assert r["final_train_loss_common"] == pytest.approx(ref["final_train_loss_common"],
                                                         rel=1e-6)
    assert r["test_rmse"] == pytest.approx(ref["test_rmse"], rel=1e-5)
    assert not list(out.glob("*.progress")) and not list(out.glob("*.ckpt.*"))


def test_gpytorch_keops_run_counts_its_passes(tmp_path):
    """GPyTorch's KeOps run counts its passes per epoch (every pykeops reduction over n x n) as
    it trains."""
    out = tmp_path / "uci"
    _run("scripts/bench_uci.py", "--datasets", "yacht", "--splits", "0", "--epochs", "2",
         "--methods", "gpytorch", "--backends", "keops", "--no-common",
         "--skip-gpytorch-predict", "test: training passes only", "--out-dir", out)
    r = json.loads((out / "yacht-split0-gpytorch-keops-2ep.json").read_text())
    assert r["status"] == "ok" and r["settings"]["keops_used_in_training"]
    passes = r["passes_curve"]
    assert len(passes) == 2
    # one reduction per mBCG iteration (at least 10 here: the paper's Lanczos depth), plus the
    # backward's gradient reductions
    assert all(p >= 10 for p in passes), passes



def test_matched_variant_runs_the_matched_estimator(records, tmp_path):
    """gpadjoint-matched is the paper's config with the preconditioned log det and CG to 1e-2,
    nothing else changed, and its record shows each epoch's solve met that tolerance."""
    _, recs = records
    out = tmp_path / "uci"
    _run("scripts/bench_uci.py", "--datasets", "yacht", "--splits", "0", "--epochs", "2",
         "--methods", "gpadjoint-matched", "--backends", "dense", "--no-common",
         "--out-dir", out)
    m = json.loads((out / "yacht-split0-gpadjoint-matched-dense-2ep.json").read_text())
    p = recs["yacht-split0-gpadjoint-paper-dense-2ep.json"]
    mll_m, mll_p = m["settings"]["config"]["mll"], p["settings"]["config"]["mll"]
    changed = {k for k in mll_p if mll_m[k] != mll_p[k]}
    assert changed == {"precond_logdet", "cg_tol"}, changed
    assert mll_m["precond_logdet"] is True and mll_m["cg_tol"] == 1e-2
    assert m["settings"]["config"]["optim"] == p["settings"]["config"]["optim"]
    assert len(m["cg_residual_curve"]) == 2
    assert all(r <= 1e-2 for r in m["cg_residual_curve"]), m["cg_residual_curve"]
    assert len(p["cg_residual_curve"]) == 2 and all(r >= 0 for r in p["cg_residual_curve"])


def test_record_settings_are_the_resolved_config_of_the_run(records):
    """A record states what ran: its settings equal the method's RunConfig (base file plus
    overrides, with the batch's epochs and seed) as the fitted model resolved it, not
    constants; GPyTorch's record states its own dtype."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_uci

    _, recs = records
    r = recs["yacht-split0-gpadjoint-paper-dense-2ep.json"]
    cfg = bench_uci.method_config("gpadjoint-paper").with_overrides(
        train__epochs=2, train__random_state=1, model__backend="dense")
    s = r["settings"]
    assert s["config"] == cfg.to_dict()
    assert s["config_source"] == "configs/paper.toml"
    assert s["dtype"] == cfg.model.dtype == "float32"
    assert s["optimizer"]["name"] == cfg.optim.optimizer == "adam"
    assert s["optimizer"]["lr"] == cfg.optim.lr
    assert s["estimator"] == "slq"  # configs/paper.toml asks for it at every n
    for key in ("num_probes", "lanczos_depth", "precond_rank", "cg_tol", "precond_logdet"):
        assert s[key] == getattr(cfg.mll, key), key
    assert s["start"]["init"] == cfg.train.init and s["full_fit"] == cfg.train.full_fit
    assert s["epochs"] == 2 and "lr" not in r and "dtype" not in r
    g = recs["yacht-split0-gpytorch-dense-2ep.json"]
    assert g["settings"]["dtype"] == "float32"
