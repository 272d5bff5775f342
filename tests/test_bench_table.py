"""The benchmark bookkeeping without fitting: settings, the time account and the headline.

Fast checks of ``scripts/_benchutil.py``, ``scripts/bench_uci.py`` and
``scripts/make_table.py`` on fake records and configs; the end-to-end runs are in
``tests/test_bench_pipeline.py`` (slow).
"""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import _benchutil as bu  # noqa: E402
import bench_uci  # noqa: E402
import make_table  # noqa: E402

# --- a record's settings are its run's resolved config ----------------------------------------


@pytest.mark.parametrize("method,base", [("gpadjoint-default", "gpadjoint/default.toml"),
                                         ("gpadjoint-paper", "configs/paper.toml")])
def test_settings_are_the_resolved_config_of_the_method(method, base):
    """The settings a record states come from the method's RunConfig (its base file read here
    independently, plus the batch's epochs), resolved as the package resolves 'auto'."""
    from gpadjoint.mll import choose_estimator
    from gpadjoint.optimizers import resolve_optimizer

    toml = tomllib.loads((ROOT / base).read_text())
    cfg = bench_uci.method_config(method, epochs=3).with_overrides(train__random_state=1)
    n = 20_000  # beyond any exact-estimator threshold of either file: the SLQ path
    s = bu.run_settings(cfg.to_dict(), n)
    assert s["dtype"] == toml.get("model", {}).get("dtype", cfg.model.dtype) == cfg.model.dtype
    est = choose_estimator(n, cfg.mll)[0]
    opt = resolve_optimizer(cfg.optim.optimizer, est)[0]
    assert s["estimator"] == est and s["optimizer"]["name"] == opt
    for key in bu._OPTIM_KEYS[opt]:
        assert s["optimizer"][key] == getattr(cfg.optim, key), key
    if est == "slq":
        for key in ("num_probes", "lanczos_depth", "precond_rank", "precond_logdet", "cg_tol",
                    "cg_min_iter", "cg_max_iter"):
            assert s[key] == getattr(cfg.mll, key), key
            if key in toml.get("mll", {}):
                assert s[key] == toml["mll"][key], key
    assert s["epochs"] == 3 and s["full_fit"] == cfg.train.full_fit
    assert s["start"] == {k: getattr(cfg.train, k) for k in s["start"]}
    if method == "gpadjoint-paper":  # what configs/paper.toml says, not a constant
        assert (s["dtype"], opt, s["optimizer"]["lr"]) == ("float32", "adam", toml["optim"]["lr"])
    else:
        assert s["dtype"] == "float64" and opt == "lbfgs"


# --- the time account of a run that took several sessions -------------------------------------

_KILLED = """
import os, signal, sys, time
sys.path.insert(0, {scripts!r})
import _benchutil as bu
clock = bu.SessionClock({ckpt!r}, tick=0.05)
clock.stage("run")
time.sleep(0.6)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_resumed_run_sums_the_seconds_of_every_session(tmp_path):
    """A process killed mid-run (a session's end) leaves its seconds beside the checkpoint;
    the next process's record adds them to its own fit seconds and counts the sessions."""
    ckpt = tmp_path / "run.ckpt.npz"
    env = os.environ | {"PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", _KILLED.format(scripts=str(ROOT / "scripts"),
                                                                ckpt=str(ckpt))],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    first = json.loads(bu.sessions_path(ckpt).read_text())
    assert len(first) == 1 and 0.3 <= first[0]["seconds"]["run"] <= 0.7, first

    clock = bu.SessionClock(ckpt)
    clock.stage("run")
    clock.stage("common")
    earlier = clock.earlier()
    sessions = clock.stop()
    assert earlier == first[0]["seconds"] and len(sessions) == 2
    res = {"total_wall_seconds": 100.0, "predict_seconds": 30.0, "train_seconds": 60.0,
           "passes_curve": [10, 4], "evaluations_curve": [2, 1], "cg_iterations_curve": [8, 4]}
    out = bench_uci.run_seconds("gpadjoint-default", res, earlier, sessions)
    assert out["fit_seconds"] == pytest.approx(first[0]["seconds"]["run"] + 70.0)
    assert out["total_seconds"] == pytest.approx(out["fit_seconds"] + 30.0)
    assert out["predict_seconds"] == 30.0 and out["sessions"] == 2
    assert out["common_seconds"] == pytest.approx(sessions[-1]["seconds"]["common"])
    assert out["cost"] == {"steps": 2, "evaluations": 3, "passes_per_evaluation": 14 / 3,
                           "cg_iterations_per_evaluation": 4.0}
    # the file is the record's account too: the same numbers, this process last
    assert json.loads(bu.sessions_path(ckpt).read_text()) == sessions
    # GPyTorch's checkpoint already sums its epochs' seconds over the sessions
    g = bench_uci.run_seconds("gpytorch", res, earlier, sessions)
    assert g["fit_seconds"] == 60.0 and g["total_seconds"] == 90.0 and g["cost"] is None


@pytest.mark.parametrize("saved", ["none", "start", "fit"])
def test_a_run_resumes_from_whichever_checkpoint_it_left(saved, tmp_path, monkeypatch):
    """Killed during the subset start, a run leaves only the start's file: the next command
    must resume that (--resume), not start over and throw the start's stages away."""
    import numpy as np

    from gpadjoint import cli

    ckpt = tmp_path / "run.ckpt.npz"
    if saved == "start":
        ckpt.with_name(ckpt.name + ".start").write_bytes(b"x")
    if saved == "fit":
        np.savez(ckpt, epoch=np.asarray(3))
    seen = {}

    def fake_main(argv):
        seen["argv"] = argv
        raise KeyboardInterrupt  # stop before the record is read

    import logging

    monkeypatch.setattr(cli, "main", fake_main)
    spec = {"dataset": "yacht", "split": 0, "method": "gpadjoint-default", "backend": "dense",
            "epochs": 2, "checkpoint": str(ckpt)}
    log = logging.getLogger("gpadjoint")
    handlers, level = list(log.handlers), log.level
    try:  # the run's evaluation log is this process's here, not a child's: undo it after
        with pytest.raises(KeyboardInterrupt):
            bench_uci.run_gpadjoint(spec)
    finally:
        for h in set(log.handlers) - set(handlers):
            log.removeHandler(h)
            h.close()
        log.setLevel(level)
    assert ("--resume" in seen["argv"]) == (saved != "none")
    segs = json.loads(bu.segments_path(ckpt).read_text())
    assert segs[-1]["from_epoch"] == (3 if saved == "fit" else 0)


# --- the headline: mean ± sd over the splits there are, labelled ------------------------------


def _rec(ds, split, method="gpadjoint-default", **kw):
    r = {"dataset": ds, "split": split, "method": method, "backend": "blocked", "epochs": 200,
         "n_train": 1000, "started": f"2026-01-0{split + 1}", "test_rmse": None,
         "test_nll": None, "final_train_loss_common": None, "fit_seconds": None,
         "predict_seconds": None, "common_evaluator": {"method": "cholesky"}}
    return r | kw


def _ms(vals):
    m = sum(vals) / len(vals)
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))


def test_headline_mean_sd_and_split_counts():
    """Three, two and one splits: mean ± sample sd, and a count on every cell with fewer
    than 3; the paper's bar, GPyTorch's runs with their epochs, an over-an-hour run's cost."""
    recs = [_rec("elevators", s, test_rmse=r, test_nll=n, final_train_loss_common=c,
                 fit_seconds=f, predict_seconds=10.0, sessions=1)
            for s, r, n, c, f in [(0, 0.09, -1.0, -0.97, 300.0), (1, 0.088, -0.98, -0.96, 500.0),
                                  (2, 0.091, -0.96, -0.95, 400.0)]]
    recs += [_rec("protein", s, test_rmse=r, final_train_loss_common=0.5, fit_seconds=4000.0,
                  predict_seconds=100.0, sessions=2, passes_curve=[30, 30],
                  evaluations_curve=[1, 2], cg_iterations_curve=[20, 40],
                  common_evaluator={"method": "slq", "loss_se": 2e-4})
             for s, r in [(0, 0.41), (2, 0.38)]]
    recs += [_rec("kin40k", 1, test_rmse=0.07, test_nll=-1.2, final_train_loss_common=-0.8,
                  train_seconds=500.0, predict_seconds=300.0,  # an older record: train_seconds
                  full_fit={"fit": False, "mode": "auto", "reason": "auto: ..."},
                  init_subset={"size": 8000, "interpolating": True, "noise": 1e-4})]
    recs[3]["full_fit"] = {"fit": False, "mode": "auto", "reason": "auto: ..."}  # protein 0
    recs[3]["init_subset"] = {"size": 8000, "interpolating": False, "noise": 0.0136,
                              "cg_hard": True, "precond_ratio": 1.61e6}
    recs += [_rec("elevators", s, method="gpytorch", epochs=75, backend="dense",
                  test_rmse=0.1 + s / 100, final_train_loss_common=-0.7) for s in (0, 1)]
    # a second, older default record of split 0 on another backend: the latest one counts
    recs += [_rec("elevators", 0, backend="dense", started="2025-01-01", test_rmse=5.0)]
    rows = {h["dataset"]: h for h in make_table.headline_rows(recs)}
    assert list(rows) == make_table.DATASETS  # every data set has its row, run or not

    e = rows["elevators"]
    assert e["splits"] == [0, 1, 2]
    m, sd = _ms([0.09, 0.088, 0.091])
    assert make_table._cell_ms(e["rmse"], 4) == f"{m:.4f} ± {sd:.4f}"
    assert make_table._cell_ms(e["total"], 0) == "410 ± 100"  # 310, 510, 410
    p = rows["protein"]
    assert p["splits"] == [0, 2] and p["loss_se"] == 2e-4
    assert make_table._cell_ms(p["rmse"], 4) == f"0.3950 ± {_ms([0.41, 0.38])[1]:.4f} (2 splits)"
    k = rows["kin40k"]
    assert make_table._cell_ms(k["rmse"], 4) == "0.0700 (1 split)"
    assert k["total"] == [800.0]
    assert rows["keggdirected"]["splits"] == []

    text = "\n".join(make_table.headline(list(rows.values())))
    line = {ln.split(" | ")[0][2:]: ln for ln in text.splitlines() if ln.startswith("| ")}
    assert "yes (0.093)" in line["elevators"] and "(split" not in line["elevators"].split("|")[4]
    assert "75 ep dense, splits 0 1 → 0.1050 ± 0.0071; -0.7000 ± 0.0000" in line["elevators"]
    assert "127 |" in line["elevators"]  # the paper's 1.69 s/epoch x 75 epochs
    assert "NO (0.390) so far" in line["protein"] and "(SLQ, se ≤ 2.0e-04)" in line["protein"]
    assert "yes (0.116) so far" in line["kin40k"] and "800 (1 split)" in line["kin40k"]
    assert "none yet" in line["keggdirected"]
    assert ("protein split 0 took 4100 s, over one hour: 3 evaluations at all n over 2 steps, "
            "20 kernel passes and 20 CG iterations per evaluation") in text
    assert "protein: total s summed over 2 sessions (split 0), 2 sessions (split 2)" in text
    # a kept subset start says so, and why
    assert ("protein: the fit kept its exact subset start "
            "(`full_fit = \"auto\"`, see *Hard starts* above) on split 0: 8000 rows, "
            "CG ill-conditioned at all n (trace(K - LLᵀ)/σ² = 1.6e+06)."
            ) in text
    assert "kin40k: the fit kept its exact subset start" in text
    assert "split 1: 8000 rows, interpolated (noise 1.0e-04)" in text
    assert "elevators: the fit kept" not in text
    assert "differ from the paper's random 80/20" in text


def test_races_pair_splits_only():
    """The races table averages each method over the splits both ran, nothing else."""
    recs = [_rec("kin40k", s, method="gpadjoint-paper", epochs=10, test_rmse=0.1 * (s + 1),
                 final_train_loss_common=float(s), seconds_per_epoch=30.0) for s in (0, 1, 2)]
    recs += [_rec("kin40k", s, method="gpytorch", epochs=10, backend="keops",
                  test_rmse=0.2, final_train_loss_common=1.0, seconds_per_epoch=160.0)
             for s in (1, 2)]
    recs += [_rec("kin40k", 0, method="gpadjoint-paper", epochs=120, test_rmse=0.08)]  # no peer
    rows = make_table.race_rows(recs)
    assert len(rows) == 1
    r = rows[0]
    assert (r["splits"], r["backend"], r["peer_backend"]) == ([1, 2], "blocked", "keops")
    assert r["paper_rmse"] == [0.2, 0.30000000000000004] and r["gpytorch_rmse"] == [0.2, 0.2]
    line = make_table.race_lines(rows)[-2]
    assert line.startswith(
        "| kin40k | 10 | blocked / keops | 1 2 | 0.2500 ± 0.0707 | 0.2000 ± 0.0000 |")


def test_an_unfinished_run_is_noted_with_what_bounded_it(tmp_path):
    # a default run stopped at its time limit: the headline says how far it got and what each
    # evaluation cost, from the record's evaluation log (written by the child as it ran)
    log = tmp_path / "run.ckpt.npz.evals.jsonl"
    lines = [{"kind": "precond", "n": 41157, "rank": 1000, "seconds": 30.0}]
    lines += [{"kind": "evaluation", "n": 2000, "estimator": "exact", "loss": 0.1 - i / 100,
               "cg_iterations": 0, "cg_residual": 0.0, "passes": 0, "depth": 15,
               "seconds": 1.0, "prepare_seconds": 0.0} for i in range(3)]
    lines += [{"kind": "evaluation", "n": 41157, "estimator": "slq", "loss": 0.5,
               "cg_iterations": 300, "cg_residual": 9e-6, "passes": 400, "depth": d,
               "seconds": 1200.0, "prepare_seconds": 0.0} for d in (15, 30)]
    # the third full-n evaluation was killed while its CG was at iteration 50
    t0 = 1e9
    lines[-1]["time"] = t0
    lines += [{"kind": "cg_progress", "n": 41157, "iteration": it, "residual": r,
               "wall": t0 + s} for it, r, s in ((25, 1e-2, 300.0), (50, 1e-3, 600.0))]
    log.write_text("\n".join(map(json.dumps, lines)) + "\n{\"kind\": \"eval")  # cut by a kill
    summary = bu.evaluations_summary(log)
    assert summary["precond_builds"] == {"count": 1, "seconds": 30.0}
    full = summary["by_n"]["41157"]
    assert (full["evaluations"], full["depth"], full["seconds_per_evaluation"]) == (2, 30, 1200)
    assert summary["by_n"]["2000"]["evaluations"] == 3
    assert summary["unfinished"] == {"41157": {"cg_iteration": 50, "residual": 1e-3,
                                               "seconds": 600.0}}
    rec = _rec("protein", 0) | {"status": "timeout>3600s", "evaluations_log": summary,
                                "session_seconds": [{"seconds": {"run": 3600.0}}]}
    for k in ("test_rmse", "total_seconds", "fit_seconds", "predict_seconds"):
        rec.pop(k, None)
    note = make_table.unfinished_note(rec)
    assert note.startswith(f"- protein split 0 ({rec['backend']} backend): unfinished "
                           "(timeout>3600s, 3600 s so far)")
    assert "2 evaluations at n = 41157 (slq, 1200 s each, 400 passes and 300 CG" in note
    assert "Lanczos depth up to 30" in note
    assert "cut short at CG iteration 50 (relative residual 1.0e-03, after 600 s)" in note
    rows = make_table.headline_rows([])
    assert note in make_table.headline(rows, [rec])


def test_kept_start_says_why_and_what_the_heldout_rows_did():
    kept = {"full_fit": {"fit": False, "reason": "auto: ..."}}
    interp = {"size": 8000, "interpolating": True, "noise": 1.0e-4}
    assert make_table.kept_start({"full_fit": {"fit": True}, "init_subset": interp}) is None
    assert make_table.kept_start({**kept, "init_subset": interp}) == (
        "8000 rows, interpolated (noise 1.0e-04)")
    held = {"rows": 4000, "replaced": True, "noise": 2.43e-2}
    assert make_table.kept_start({**kept, "init_subset": {**interp, "heldout_noise": held}}) == (
        "8000 rows, interpolated (noise 1.0e-04; 4000 held-out rows raised it to 2.4e-02)")
    held = {"rows": 4000, "replaced": False, "noise": 1.0e-4}
    assert make_table.kept_start({**kept, "init_subset": {**interp, "heldout_noise": held}}) == (
        "8000 rows, interpolated (noise 1.0e-04; held-out rows kept it)")
    hard = {"size": 8000, "interpolating": False, "cg_hard": True, "noise": 1e-2,
            "precond_ratio": 1.6e6}
    assert "CG ill-conditioned" in make_table.kept_start({**kept, "init_subset": hard})


def test_an_unfinished_split_gets_one_line_naming_its_earlier_runs():
    old = _rec("keggdirected", 0) | {"status": "timeout>3500s", "started": "2026-12-07T10:00",
                                     "_file": "old.json", "evaluations_log": {"by_n": {}}}
    new = old | {"backend": "stored", "started": "2026-12-07T20:00", "_file": "new.json"}
    for k in ("test_rmse", "total_seconds", "fit_seconds", "predict_seconds"):
        old.pop(k, None)
        new.pop(k, None)
    lines = [ln for ln in make_table.headline([], [new, old]) if "unfinished" in ln]
    assert len(lines) == 1 and lines[0].startswith("- keggdirected split 0 (stored backend)")
    assert lines[0].endswith("An earlier run (blocked backend, timeout>3500s) is old.json.")
