"""scripts/exact_optimum.py: its value and gradient (gpadjoint.exact) equal neg_mll_exact and
jax.grad of it (and finite differences); the driver reaches |grad| <= 1e-6 at scipy's minimum of
the same loss; a rerun resumes from the best recorded point, also from a progress file written
by the scipy-based driver before it; a converged record is kept; an interrupt leaves whole
records; too large n is refused."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _util import slow

from gpadjoint.data import Split
from gpadjoint.exact import make_value_and_grad
from gpadjoint.kernels import Params
from gpadjoint.mll import neg_mll_exact


@pytest.fixture(scope="module")
def eo(load_script):
    return load_script("exact_optimum")


def _data(n=160, d=3, seed=0, n_test=40):
    rng = np.random.default_rng(seed)
    X = rng.uniform(-2, 2, (n + n_test, d))
    y = np.sin(1.5 * X[:, 0]) + 0.5 * np.cos(X[:, 1]) * X[:, 2] + 0.1 * rng.standard_normal(
        n + n_test)
    Xtr, ytr = X[:n], y[:n]
    xm, xs, ym = Xtr.mean(0), Xtr.std(0), float(ytr.mean())
    return Split("synthetic", 0, (Xtr - xm) / xs, ytr - ym, (X[n:] - xm) / xs, y[n:] - ym,
                 xm, xs, ym, 1.0)


def _fg(X, y, **kw):
    return make_value_and_grad(X, y, kernel="matern32", **kw)


def _reference(X, y):
    def f(t):
        return neg_mll_exact(Params(t[:-3], t[-3], t[-2], t[-1]), jnp.asarray(X), jnp.asarray(y),
                             kernel="matern32")
    return jax.value_and_grad(f)


@pytest.mark.parametrize("seed", [slow(0), 1])
def test_value_and_gradient_match_neg_mll_exact_and_finite_differences(seed):
    sp = _data(n=200, d=4, seed=seed)
    rng = np.random.default_rng(10 + seed)
    theta = np.concatenate([rng.normal(0.3, 0.5, 4), [rng.normal(), -1.5 + rng.normal(), 0.2]])
    # blocks of 64 rows: 200 = 3 x 64 + 8, so the doubled off-diagonal columns and a ragged
    # last block are exercised
    fg = _fg(sp.X_train, sp.y_train, block=64)
    f, g = fg(theta)
    f1, g1 = _fg(sp.X_train, sp.y_train)(theta)  # one block
    np.testing.assert_allclose(g1, g, rtol=1e-10, atol=1e-14)
    ref_f, ref_g = _reference(sp.X_train, sp.y_train)(jnp.asarray(theta))
    np.testing.assert_allclose(f, float(ref_f), rtol=1e-10)
    np.testing.assert_allclose(g, np.asarray(ref_g), rtol=1e-8, atol=1e-12)
    assert g.shape == (4 + 3,) and np.all(g != 0)
    eps = 1e-5
    fd = np.array([(fg(theta + eps * e)[0] - fg(theta - eps * e)[0]) / (2 * eps)
                   for e in np.eye(len(theta))])
    np.testing.assert_allclose(g, fd, rtol=1e-5, atol=1e-8)


def test_optimum_reaches_gradient_tolerance_and_resumes_from_best(eo, tmp_path):
    sp = _data()
    rec = eo.run("synthetic", 0, out_dir=tmp_path, subset=60, data=sp, argv="test", log=_quiet)
    assert rec["converged"] and rec["grad_norm"] <= 1e-6
    theta = np.asarray(rec["raw"])
    fg = _fg(sp.X_train, sp.y_train)
    f, g = fg(theta)  # recomputed independently of the record
    assert f == pytest.approx(rec["loss"], abs=1e-12)
    assert np.linalg.norm(g) <= 1e-6
    rng = np.random.default_rng(3)
    for _ in range(5):
        assert f <= fg(theta + 0.05 * rng.standard_normal(theta.size))[0]
    assert np.isfinite(rec["test_rmse"]) and np.isfinite(rec["test_nll"])
    assert rec["stages"]["subset"]["n"] == 60 and rec["stages"]["subset"]["evaluations"] > 1
    assert set(rec["stages"]["full"]["parts_seconds_median"]) == {
        "build", "potrf", "potri", "pullback"}
    on_disk = json.loads((tmp_path / "synthetic-split0.json").read_text())
    assert on_disk["loss"] == rec["loss"] and on_disk["hyperparameters"] == rec["hyperparameters"]
    assert len(on_disk["sessions"]) == 1 and on_disk["sessions"][0]["command"] == "test"

    # a converged record is kept: the same command again evaluates and writes nothing
    prog = tmp_path / "synthetic-split0.progress.jsonl"
    text, record_text = prog.read_text(), (tmp_path / "synthetic-split0.json").read_text()
    assert eo.run("synthetic", 0, out_dir=tmp_path, subset=60, data=sp, argv="again",
                  log=_quiet) == on_disk
    assert prog.read_text() == text
    assert (tmp_path / "synthetic-split0.json").read_text() == record_text

    # resume: with the record moved away, a rerun starts the full stage at the best full-n
    # point recorded. A planted better-looking "best" at a known, non-optimal point (no
    # gradient recorded, so it is evaluated again): the rerun starts there
    (tmp_path / "synthetic-split0.json").unlink()
    before = eo.read_progress(prog)
    planted = theta + 0.1
    eo.append_record(prog, {"stage": "full", "n": sp.n_train, "eval": 0, "loss": f - 1.0,
                            "grad_norm": 1.0, "seconds": 0.0, "raw": list(planted)})
    again = eo.run("synthetic", 0, out_dir=tmp_path, subset=60, data=sp, argv="test",
                   log=_quiet)
    new = eo.read_progress(prog)[len(before) + 1:]
    evals = [r for r in new if r.get("stage") == "full"]
    np.testing.assert_array_equal(evals[0]["raw"], planted)
    # the metric's Hessian is taken there too; nothing of the subset stage is redone
    np.testing.assert_array_equal(
        next(r for r in new if r.get("stage") == "full:hessian")["raw"], planted)
    assert not [r for r in new if str(r.get("stage")).startswith("subset")]
    assert again["converged"] and again["loss"] == pytest.approx(rec["loss"], abs=1e-10)
    assert len(again["sessions"]) == 2

    # --write-best: the record at the best full-n point recorded, no evaluation, marked honestly
    (tmp_path / "synthetic-split0.json").unlink()
    n_before = len(eo.read_progress(prog))
    eo.append_record(prog, {"stage": "full", "n": sp.n_train, "eval": 0, "loss": f - 2.0,
                            "grad_norm": 0.5, "seconds": 0.0, "raw": list(theta + 0.2),
                            "grad": list(np.full(theta.size, 0.1))})
    rec = eo.run("synthetic", 0, out_dir=tmp_path, subset=60, data=sp, argv="test",
                 write_best=True, log=_quiet)
    added = eo.read_progress(prog)[n_before + 1:]
    assert [r for r in added if "loss" in r and "event" not in r] == []  # nothing evaluated
    assert rec["loss"] == f - 2.0 and not rec["converged"] and "NOT converged" in rec["message"]
    np.testing.assert_array_equal(rec["raw"], theta + 0.2)
    assert np.isfinite(rec["test_rmse"])


@pytest.mark.slow
def test_reaches_scipys_minimum_of_the_exact_loss(eo, tmp_path):
    from scipy.optimize import minimize

    sp = _data(n=120, d=3, seed=5)
    fg = _fg(sp.X_train, sp.y_train)
    ref = minimize(fg, np.zeros(6), jac=True, method="L-BFGS-B",
                   options={"gtol": 1e-10, "ftol": 0.0, "maxiter": 2000, "maxcor": 20})
    assert np.linalg.norm(ref.jac) <= 1e-6  # scipy itself got there
    rec = eo.run("synthetic", 0, out_dir=tmp_path, subset=40, data=sp, argv="test", log=_quiet)
    assert rec["converged"] and rec["grad_norm"] <= 1e-6
    f, g = fg(np.asarray(rec["raw"]))
    assert np.linalg.norm(g) <= 1e-6
    assert f == pytest.approx(ref.fun, abs=1e-10)
    # at a minimum with |g| <= 1e-6 both are within |g| / lambda_min of the same point
    np.testing.assert_allclose(rec["raw"], ref.x, atol=1e-4)


@pytest.mark.slow
def test_converges_where_a_lengthscale_runs_off(eo, tmp_path):
    # input 3 barely matters: its lengthscale runs to ~1e6, 1/l to ~0, and L-BFGS steps in
    # 1/l cross 0. The loss is even in 1/l (from_opt reads |u|), so the gradient there must
    # carry sign(u); without it this run stalled at |g| ~ 1e-5 after ~500 evaluations
    sp = _data(n=200, d=5, seed=2)
    rec = eo.run("synthetic", 0, out_dir=tmp_path, subset=66, data=sp, argv="test", log=_quiet)
    assert rec["converged"] and max(rec["hyperparameters"]["lengthscale"]) > 1e5
    f, g = _fg(sp.X_train, sp.y_train)(np.asarray(rec["raw"]))
    assert np.linalg.norm(g) <= 1e-6 and f == pytest.approx(rec["loss"], abs=1e-12)


def _old_format_progress(sp, path):
    """A progress file as the scipy-based driver wrote it: subset stage done, two full-n
    evaluations (the --init point and one step), Hessian lines, a torn last line."""
    fg_sub, fg = _fg(sp.X_train[:60], sp.y_train[:60]), _fg(sp.X_train, sp.y_train)
    lines = [{"event": "start", "dataset": "synthetic", "split": 0, "n": sp.n_train, "d": 3,
              "subset": 60, "kernel": "matern32", "noise_floor": 1e-4,
              "command": "python scripts/exact_optimum.py synthetic 0", "commit": "d1873ac",
              "started": "2026-12-04T13:33:50+00:00"}]
    t = np.zeros(6)

    def line(stage, fgx, theta, **kw):
        f, g = fgx(theta)
        return {"stage": stage, "n": 60 if fgx is fg_sub else sp.n_train, **kw,
                "loss": float(f), "grad_norm": float(np.linalg.norm(g)), "seconds": 0.01,
                "raw": [float(v) for v in theta], "grad": [float(v) for v in g],
                "time": "2026-12-04T13:34:20+00:00"}

    lines += [line("subset", fg_sub, t, eval=1), line("subset:hessian", fg_sub, t)]
    lines.append({"event": "stage_end", "stage": "subset", "loss": lines[1]["loss"],
                  "grad_norm": lines[1]["grad_norm"], "message": "converged"})
    lines.append(line("full", fg, t + 0.3, eval=0, origin="--init fit.json"))
    lines.append(line("full:hessian", fg_sub, t + 0.3))
    lines.append(line("full", fg, t + np.array([0.3, 0.4, 0.3, 0.4, -1.5, 0.0]), eval=1))
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"stage": "full", "n')
    return lines


def test_resumes_from_a_progress_file_of_the_old_format(eo, tmp_path):
    sp = _data()
    prog = tmp_path / "synthetic-split0.progress.jsonl"
    old = _old_format_progress(sp, prog)
    old_text = prog.read_text()
    best = min((r for r in old if r.get("stage") == "full"), key=lambda r: r["loss"])
    assert best is old[-1] and best["grad_norm"] > 1e-3  # the last step is the best, far out
    rec = eo.run("synthetic", 0, out_dir=tmp_path, subset=60, data=sp, argv="resume",
                 log=_quiet)
    assert prog.read_text().startswith(old_text)  # the old lines are left as they were
    new = eo.read_progress(prog)[len(old):]
    assert new[0]["event"] == "start" and new[0]["command"] == "resume"
    # the full stage resumes at the best full-n point: its metric is taken there, and it is
    # not evaluated again (its loss and gradient are recorded)
    first_hessian = next(r for r in new if r.get("stage") == "full:hessian")
    np.testing.assert_array_equal(first_hessian["raw"], best["raw"])
    assert not [r for r in new if r.get("stage") == "full" and r.get("raw") == best["raw"]]
    assert not [r for r in new if str(r.get("stage")).startswith("subset")]
    assert rec["converged"] and rec["grad_norm"] <= 1e-6 and rec["loss"] < best["loss"]
    assert rec["stages"]["full"]["origin"].startswith("resumed from the best full-n point")
    full_new = [r for r in new if r.get("stage") == "full" and "event" not in r]
    assert rec["stages"]["full"]["evaluations"] == 2 + len(full_new)
    assert [s["command"] for s in rec["sessions"]] == [old[0]["command"], "resume"]
    assert rec["stages"]["subset"]["evaluations"] == 1


def test_write_best_needs_a_full_evaluation(eo, tmp_path):
    with pytest.raises(SystemExit, match="no full-n evaluation"):
        eo.run("synthetic", 0, out_dir=tmp_path, subset=60, data=_data(), argv="test",
               write_best=True, log=_quiet)


def _quiet(*args, **kw):
    pass


def test_interrupt_leaves_whole_records(eo, tmp_path):
    sp = _data(n=80)
    fg = _fg(sp.X_train, sp.y_train)
    intr = eo._Interrupt()
    calls = []

    def counting(theta):
        calls.append(1)
        if len(calls) == 3:
            intr.flag = True  # as the SIGINT handler would
        return fg(theta)

    prog = tmp_path / "p.jsonl"
    with pytest.raises(KeyboardInterrupt):
        eo.optimise(counting, np.zeros(6), progress=prog, stage="full", n=80, interrupt=intr,
                    log=_quiet)
    recs = eo.read_progress(prog)
    assert len(recs) == 3 and len(prog.read_text().splitlines()) == 3
    assert all(np.isfinite(r["loss"]) and len(r["raw"]) == 6 for r in recs)


def test_refuses_when_the_arrays_do_not_fit(eo, tmp_path, monkeypatch):
    import gpadjoint.matvec as mv

    monkeypatch.setattr(mv, "available_memory_bytes", lambda: 64 * 2**30)
    assert eo.memory_check(15000)[0] and eo.memory_check(36000)[0]  # no cap by default
    ok, msg = eo.memory_check(25000, max_n=20000)  # fits, but beyond --max-n
    assert not ok and "--max-n" in msg
    monkeypatch.setattr(mv, "available_memory_bytes", lambda: 2**30)
    ok, msg = eo.memory_check(36000)
    assert not ok and "GiB" in msg and "--max-n" not in msg
    with pytest.raises(SystemExit, match="refusing"):
        eo.run("synthetic", 0, out_dir=tmp_path, data=_data(n=12000, n_test=1), log=_quiet)
    assert not list(tmp_path.iterdir())


def test_init_file_goes_straight_to_the_full_stage(eo, tmp_path):
    sp = _data()
    init = tmp_path / "fit.json"
    init.write_text(json.dumps({"final_hyperparameters": {
        "lengthscale": [1.0, 2.0, 3.0], "outputscale": 0.8, "noise": 0.05, "mean": 0.1}}))
    rec = eo.run("synthetic", 0, out_dir=tmp_path, init=str(init), subset=60, data=sp,
                 argv="test", log=_quiet)
    assert rec["converged"] and "subset" not in rec["stages"]
    prog = eo.read_progress(tmp_path / "synthetic-split0.progress.jsonl")
    evals = [r for r in prog if "loss" in r and "event" not in r]
    assert not [r for r in evals if r["stage"] == "subset"]
    first = eo.hypers_of(evals[0]["raw"])  # the --init point, evaluated first at full n
    np.testing.assert_allclose(first["lengthscale"], [1.0, 2.0, 3.0], rtol=1e-10)
    assert first["noise"] == pytest.approx(0.05, rel=1e-10)
    # the same command again evaluates nothing new before writing its (converged) record
    again = eo.run("synthetic", 0, out_dir=tmp_path, init=str(init), subset=60, data=sp,
                   argv="test", log=_quiet)
    assert again["loss"] <= rec["loss"] + 1e-12
    assert not [r for r in eo.read_progress(tmp_path / "synthetic-split0.progress.jsonl")[
        len(prog):] if r.get("eval") == 0]


def test_init_theta_takes_each_record_in_its_units(eo, tmp_path):
    sp = _data(d=3)
    sp = Split(sp.name, 0, sp.X_train, sp.y_train, sp.X_test, sp.y_test, sp.x_mean,
               np.array([2.0, 0.5, 4.0]), 3.0, 1.0)
    paper = {"lengthscale": [1.0, 2.0, 3.0], "outputscale": 0.8, "noise": 0.05, "mean": 0.1}
    data_units = {"lengthscale": [2.0, 1.0, 12.0], "outputscale": 0.8, "noise": 0.05,
                  "mean": 3.1}  # a gpadjoint fit record: x_std times, y_mean added
    for i, rec in enumerate([{"final_hyperparameters": paper}, paper,
                             {"hyperparameters": data_units}]):
        path = tmp_path / f"init{i}.json"
        path.write_text(json.dumps(rec))
        theta, origin = eo.init_theta(3, str(path), 1e-4, sp)
        h = eo.hypers_of(theta)
        np.testing.assert_allclose(h["lengthscale"], paper["lengthscale"], rtol=1e-10)
        assert h["noise"] == pytest.approx(0.05, rel=1e-10) and origin == f"--init {path}"
        assert h["mean"] == pytest.approx(0.1, rel=1e-10)
