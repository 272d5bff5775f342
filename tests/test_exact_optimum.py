"""scripts/exact_optimum.py: its value and gradient (gpadjoint.exact) equal neg_mll_exact and
jax.grad of it (and finite differences); L-BFGS reaches |grad| <= 1e-6 at a minimum; a rerun
resumes from the best recorded point; an interrupt leaves whole records; too large n is refused."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpadjoint.data import Split
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


def _reference(eo, X, y):
    def f(t):
        return neg_mll_exact(eo.unflatten_jax(t), jnp.asarray(X), jnp.asarray(y),
                             kernel="matern32")
    return jax.value_and_grad(f)


@pytest.mark.parametrize("seed", [0, 1])
def test_value_and_gradient_match_neg_mll_exact_and_finite_differences(eo, seed):
    sp = _data(n=200, d=4, seed=seed)
    rng = np.random.default_rng(10 + seed)
    theta = np.concatenate([rng.normal(0.3, 0.5, 4), [rng.normal(), -1.5 + rng.normal(), 0.2]])
    # blocks of 64 rows: 200 = 3 x 64 + 8, so the doubled off-diagonal columns and a ragged
    # last block are exercised
    fg = eo.make_value_and_grad(sp.X_train, sp.y_train, block=64)
    f, g = fg(theta)
    f1, g1 = eo.make_value_and_grad(sp.X_train, sp.y_train)(theta)  # one block
    np.testing.assert_allclose(g1, g, rtol=1e-10, atol=1e-14)
    ref_f, ref_g = _reference(eo, sp.X_train, sp.y_train)(jnp.asarray(theta))
    np.testing.assert_allclose(f, float(ref_f), rtol=1e-10)
    np.testing.assert_allclose(g, np.asarray(ref_g), rtol=1e-8, atol=1e-12)
    assert g.shape == (4 + 3,) and np.all(g != 0)
    eps = 1e-5
    fd = np.array([(fg(theta + eps * e)[0] - fg(theta - eps * e)[0]) / (2 * eps)
                   for e in np.eye(len(theta))])
    np.testing.assert_allclose(g, fd, rtol=1e-5, atol=1e-8)


def test_optimum_reaches_gradient_tolerance_and_resumes_from_best(eo, tmp_path):
    sp = _data()
    rec = eo.run("synthetic", 0, out_dir=tmp_path, subset=60, data=sp, argv="test",
                 agreement=False, log=_quiet)
    assert rec["converged"] and rec["grad_norm"] <= 1e-6
    theta = np.asarray(rec["raw"])
    fg = eo.make_value_and_grad(sp.X_train, sp.y_train)
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

    # resume: a second run starts the full stage at the best full-n point recorded, no subset
    prog = tmp_path / "synthetic-split0.progress.jsonl"
    before = eo.read_progress(prog)
    # plant a better-looking "best" record at a known, non-optimal point: the rerun must start
    # there (the resume uses the recorded best, it does not recompute it)
    planted = theta + 0.1
    eo.append_record(prog, {"stage": "full", "n": sp.n_train, "eval": 0, "loss": f - 1.0,
                            "grad_norm": 1.0, "seconds": 0.0, "raw": list(planted)})
    eo.run("synthetic", 0, out_dir=tmp_path, subset=60, data=sp, argv="test", agreement=False,
           log=_quiet)
    new = eo.read_progress(prog)[len(before) + 1:]
    evals = [r for r in new if r.get("stage") == "full"]
    np.testing.assert_array_equal(evals[0]["raw"], planted)
    # the preconditioner's Hessian is taken there too; nothing of the subset stage is redone
    np.testing.assert_array_equal(
        next(r for r in new if r.get("stage") == "full:hessian")["raw"], planted)
    assert not [r for r in new if str(r.get("stage")).startswith("subset")]

    # --write-best: the record at the best full-n point recorded, no evaluation, marked honestly
    n_before = len(eo.read_progress(prog))
    eo.append_record(prog, {"stage": "full", "n": sp.n_train, "eval": 0, "loss": f - 2.0,
                            "grad_norm": 0.5, "seconds": 0.0, "raw": list(theta + 0.2),
                            "grad": list(np.full(theta.size, 0.1))})
    rec = eo.run("synthetic", 0, out_dir=tmp_path, subset=60, data=sp, argv="test",
                 agreement=False, write_best=True, log=_quiet)
    added = eo.read_progress(prog)[n_before + 1:]
    assert [r for r in added if "loss" in r and "event" not in r] == []  # nothing evaluated
    assert rec["loss"] == f - 2.0 and not rec["converged"] and "NOT converged" in rec["message"]
    np.testing.assert_array_equal(rec["raw"], theta + 0.2)
    assert np.isfinite(rec["test_rmse"])


def test_write_best_needs_a_full_evaluation(eo, tmp_path):
    with pytest.raises(SystemExit, match="no full-n evaluation"):
        eo.run("synthetic", 0, out_dir=tmp_path, subset=60, data=_data(), argv="test",
               agreement=False, write_best=True, log=_quiet)


def _quiet(*args, **kw):
    pass


def test_interrupt_leaves_whole_records(eo, tmp_path):
    sp = _data(n=80)
    fg = eo.make_value_and_grad(sp.X_train, sp.y_train)
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
                 argv="test", agreement=False, log=_quiet)
    assert rec["converged"] and "subset" not in rec["stages"]
    prog = eo.read_progress(tmp_path / "synthetic-split0.progress.jsonl")
    evals = [r for r in prog if "loss" in r and "event" not in r]
    assert not [r for r in evals if r["stage"] == "subset"]
    first = eo.hypers_of(evals[0]["raw"])  # the --init point, evaluated first at full n
    np.testing.assert_allclose(first["lengthscale"], [1.0, 2.0, 3.0], rtol=1e-10)
    assert first["noise"] == pytest.approx(0.05, rel=1e-10)
    # the same command again evaluates nothing new before writing its (converged) record
    again = eo.run("synthetic", 0, out_dir=tmp_path, init=str(init), subset=60, data=sp,
                   argv="test", agreement=False, log=_quiet)
    assert again["loss"] <= rec["loss"] + 1e-12
    assert not [r for r in eo.read_progress(tmp_path / "synthetic-split0.progress.jsonl")[
        len(prog):] if r.get("eval") == 0]
