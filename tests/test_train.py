"""Training loop tests on a small synthetic problem (n = 200, d = 2).

Compiling the value-and-gradient step takes seconds, so the tests share a few (settings,
shapes) combinations: the trainer reuses one executable per combination.
"""

import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _util import problem

from gpadjoint.kernels import Params, constrain, init_params
from gpadjoint.matvec import make_backend
from gpadjoint.mll import MLLConfig, neg_mll_exact
from gpadjoint.start import initial_params
from gpadjoint.train import (
    LBFGS,
    CGConvergenceWarning,
    EarlyStopping,
    FitResult,
    fit,
    load_checkpoint,
    make_trainer,
)

N, D = 200, 2
CFG = MLLConfig(num_probes=10, lanczos_depth=15, precond_rank=10, cg_tol=1e-6, cg_min_iter=10,
                cg_max_iter=200)
OPT = optax.adam(0.05)  # one object, so every test with it shares the compiled step
DENSE = make_backend("dense", "matern32")


@pytest.fixture(scope="module")
def data64():
    X, y, _ = problem(n=N, d=D, seed=3, dtype=jnp.float64)
    return X, y


def _fit(X, y, **kw):
    kw.setdefault("backend", DENSE)
    kw.setdefault("mll_config", CFG)
    kw.setdefault("optimizer", OPT)
    kw.setdefault("progress", False)
    return fit(X, y, **kw)


def _exact_fit(X, y):
    """L-BFGS on the dense Cholesky loss from the same start: the reference optimum."""
    from jax.flatten_util import ravel_pytree
    from scipy.optimize import minimize

    flat0, unravel = ravel_pytree(init_params(D, jnp.float64))
    vg = jax.jit(jax.value_and_grad(
        lambda f: neg_mll_exact(unravel(f), X, y, kernel="matern32")))

    def fun(f):
        v, g = vg(jnp.asarray(f))
        return float(v), np.asarray(g, np.float64)

    opt = minimize(fun, np.asarray(flat0), jac=True, method="L-BFGS-B",
                   options={"gtol": 1e-8, "maxiter": 500})
    return unravel(jnp.asarray(opt.x)), float(opt.fun)


@pytest.mark.slow
def test_loss_decreases_and_approaches_exact_fit(data64):
    X, y = data64
    res = _fit(X, y, epochs=150, backend="auto")
    assert isinstance(res, FitResult)
    assert res.stopped_reason == "completed 150 epochs"
    assert res.info["backend"] == "dense" and res.info["backend_reason"].startswith("auto:")
    h = res.history
    assert [r["epoch"] for r in h] == list(range(1, 151))
    assert h[-1]["loss"] < h[0]["loss"] - 0.5
    assert all(r["cg_converged"] for r in h)
    keys = {"epoch", "loss", "grad_norm", "lengthscale", "outputscale", "noise", "mean",
            "cg_iterations", "cg_residual", "cg_converged", "passes", "seconds"}
    assert keys <= set(h[0])
    # CG (warm-started: +1 pass for the start residual) shares the Lanczos passes; then the
    # adjoint's passes, one fused VJP and the dense build of K
    k = CFG.lanczos_depth
    assert all(r["passes"] == max(k, r["cg_iterations"] + 1) + k + 1 + 1 for r in h)
    assert len(h[0]["lengthscale"]) == D

    p_ref, best = _exact_fit(X, y)
    ours = float(neg_mll_exact(res.params, X, y, kernel="matern32"))
    assert -0.005 < ours - best < 0.02, (ours, best)
    h_ours, h_ref = constrain(res.params), constrain(p_ref)
    np.testing.assert_allclose(h_ours.noise, h_ref.noise, rtol=0.1)
    np.testing.assert_allclose(h_ours.outputscale, h_ref.outputscale, rtol=0.5)
    np.testing.assert_allclose(h_ours.lengthscale, h_ref.lengthscale, rtol=0.4)
    # the SLQ estimate of the loss at the end tracks the exact loss
    assert abs(h[-1]["loss"] - float(neg_mll_exact(res.state.params, X, y,
                                                   kernel="matern32"))) < 0.1


def test_step_traced_once_and_pure(data64):
    X, y = data64
    trainer = make_trainer(X, y, backend=DENSE, mll_config=CFG, optimizer=OPT)
    state = trainer.init(init_params(D, jnp.float64), jax.random.PRNGKey(0))
    s1, m1 = trainer.step(state)
    after_first = trainer.trace_count()
    assert after_first == 1
    s2, m2 = trainer.step(state)  # same input state -> identical output
    assert float(m1["loss"]) == float(m2["loss"])
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), s1, s2))
    s = s1
    for _ in range(4):
        s, m = trainer.step(s)
    assert int(s.epoch) == 5
    assert trainer.trace_count() == after_first  # no retracing after the first epoch
    # no module-level cache: a second trainer traces (and compiles) its own step, once
    other = make_trainer(X, y, backend=DENSE, mll_config=CFG, optimizer=OPT)
    assert other.trace_count() == 0
    s3, m3 = other.step(state)
    assert other.trace_count() == 1 and trainer.trace_count() == after_first
    assert float(m3["loss"]) == float(m1["loss"])


def test_resume_ends_where_an_uninterrupted_run_ends(data64, tmp_path):
    X, y = data64
    full = _fit(X, y, epochs=6, seed=7)
    ck = tmp_path / "run.ckpt"
    first = _fit(X, y, epochs=3, seed=7, checkpoint_path=ck, checkpoint_every=2)
    assert len(first.history) == 3
    state, hist = load_checkpoint(ck, first.state)
    assert int(state.epoch) == 3 and len(hist) == 3
    resumed = _fit(X, y, epochs=6, seed=7, checkpoint_path=ck, resume=True)
    assert resumed.info["resumed_from_epoch"] == 3
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in full.history]
    for a, b in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(full.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-12)
    assert [f for f in os.listdir(tmp_path) if f != "run.ckpt"] == []  # no temp files left


def test_resume_refuses_a_mismatched_checkpoint(data64, tmp_path):
    X, y = data64
    ck = tmp_path / "run.ckpt"
    _fit(X, y, epochs=2, checkpoint_path=ck)
    with pytest.raises(ValueError, match="data_sha256"):
        _fit(X, y + 1.0, epochs=4, checkpoint_path=ck, resume=True)
    with pytest.raises(ValueError, match="seed"):
        _fit(X, y, epochs=4, seed=1, checkpoint_path=ck, resume=True)
    with pytest.raises(ValueError, match="mll_config"):
        _fit(X, y, epochs=4, checkpoint_path=ck, resume=True,
             mll_config=MLLConfig(num_probes=3))
    with pytest.raises(FileNotFoundError):
        _fit(X, y, epochs=4, checkpoint_path=tmp_path / "none.ckpt", resume=True)
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable gpadjoint checkpoint"):
        _fit(X, y, epochs=4, checkpoint_path=bad, resume=True)


def test_nan_in_data_keeps_initial_params(data64, tmp_path):
    X, y = data64
    y = y.at[5].set(jnp.nan)
    ck = tmp_path / "nan.ckpt"
    p0 = init_params(D, jnp.float64)
    res = _fit(X, y, epochs=5, params0=p0, checkpoint_path=ck)
    assert res.history == []
    assert "non-finite loss" in res.stopped_reason and "epoch 1" in res.stopped_reason
    for a, b in zip(jax.tree.leaves(res.params), jax.tree.leaves(p0), strict=True):
        np.testing.assert_array_equal(a, b)
    assert ck.is_file()


def _inf_after(k):
    """A well-behaved descent step for k epochs, then an infinite update."""

    def init(params):
        return jnp.zeros((), jnp.int32)

    def update(grads, count, params=None):
        scale = jnp.where(count >= k, jnp.inf, -0.05)
        return jax.tree.map(lambda g: scale * jnp.ones_like(g), grads), count + 1

    return optax.GradientTransformation(init, update)


@pytest.mark.slow
def test_nonfinite_update_keeps_last_good_params(data64, tmp_path):
    X, y = data64
    opt = _inf_after(2)
    two = _fit(X, y, epochs=2, optimizer=opt)
    ck = tmp_path / "inf.ckpt"
    res = _fit(X, y, epochs=10, optimizer=opt, checkpoint_path=ck, checkpoint_every=0)
    assert len(res.history) == 2
    assert "epoch 3" in res.stopped_reason and "update" in res.stopped_reason
    assert int(res.state.epoch) == 2
    for a, b in zip(jax.tree.leaves(res.params), jax.tree.leaves(two.params), strict=True):
        np.testing.assert_array_equal(a, b)
        assert np.all(np.isfinite(a))
    state, hist = load_checkpoint(ck, res.state)
    assert int(state.epoch) == 2 and len(hist) == 2


def test_early_stopping_on_plateau(data64):
    X, y = data64
    res = _fit(X, y, epochs=50, early_stopping=EarlyStopping(patience=3, min_delta=10.0))
    # epoch 1 sets the best loss; no later epoch beats it by 10 nats -> stop after epoch 4
    assert len(res.history) == 4
    assert res.stopped_reason.startswith("early stopping after epoch 4")
    off = _fit(X, y, epochs=6)
    assert len(off.history) == 6


def test_resume_after_early_stop_does_not_continue(data64, tmp_path):
    X, y = data64
    ck = tmp_path / "es.ckpt"
    es = EarlyStopping(patience=2, min_delta=10.0)
    first = _fit(X, y, epochs=20, early_stopping=es, checkpoint_path=ck)
    assert len(first.history) == 3
    again = _fit(X, y, epochs=20, early_stopping=es, checkpoint_path=ck, resume=True)
    assert again.history == first.history and again.stopped_reason == first.stopped_reason
    done = _fit(X, y, epochs=2, checkpoint_path=ck, resume=True)
    assert "already at epoch 3" in done.stopped_reason and len(done.history) == 3


def test_callback_can_stop(data64):
    X, y = data64
    seen = []

    def cb(rec, state):
        seen.append(rec["epoch"])
        return rec["epoch"] == 2

    res = _fit(X, y, epochs=10, callback=cb)
    assert seen == [1, 2] and "callback" in res.stopped_reason


def test_progress_lines(data64, capsys):
    X, y = data64
    _fit(X, y, epochs=4, progress=True, log_every=2)
    err = capsys.readouterr().err
    assert err.count("\n") == 3 and "epoch 2/4" in err and "epoch 4/4" in err
    assert "backend=dense (given)" in err
    _fit(X, y, epochs=2, progress=None)  # pytest's stderr is not a TTY -> silent
    assert capsys.readouterr().err == ""


def test_progress_records_through_logging_off_a_terminal(data64, caplog):
    # progress=None off a terminal: INFO records of the "gpadjoint" logger, every log_every
    # epochs and at the last, and nothing on stderr unless logging is configured to show them
    import logging

    X, y = data64
    with caplog.at_level(logging.INFO, logger="gpadjoint"):
        _fit(X, y, epochs=4, progress=None, log_every=3)
    msgs = [r.getMessage() for r in caplog.records if r.name == "gpadjoint"]
    assert msgs[0].startswith("gpadjoint fit: n=200")
    assert [m.split()[1] for m in msgs[1:]] == ["3/4", "4/4"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="gpadjoint"):
        _fit(X, y, epochs=2, progress=False)
    assert [r for r in caplog.records if r.name == "gpadjoint"] == []
    assert logging.getLogger("gpadjoint").handlers == []  # progress=True's handler is removed


@pytest.mark.slow
def test_cg_cap_warns_once(data64):
    X, y = data64
    capped = MLLConfig(num_probes=4, lanczos_depth=5, precond_rank=0, cg_tol=1e-12,
                       cg_min_iter=0, cg_max_iter=2)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        res = _fit(X, y, epochs=4, mll_config=capped)
    cg = [x for x in w if issubclass(x.category, CGConvergenceWarning)]
    assert len(cg) == 1
    msg = str(cg[0].message)
    assert "cg_max_iter" in msg and "precond_rank" in msg
    assert all(not r["cg_converged"] and r["cg_iterations"] == 2 for r in res.history)


@pytest.mark.slow
def test_float32_with_sgd():
    X, y, _ = problem(n=N, d=D, seed=3, dtype=jnp.float32)
    cfg = MLLConfig(num_probes=10, lanczos_depth=10, precond_rank=10, cg_tol=1e-2)
    res = fit(X, y, backend="dense", mll_config=cfg, optimizer=optax.sgd(0.05), epochs=30,
              progress=False, params0=initial_params("normal", D, jnp.float32, seed=1))
    assert res.stopped_reason == "completed 30 epochs"
    assert res.params.raw_lengthscale.dtype == jnp.float32
    assert res.state.last_alpha.dtype == jnp.float32
    h = res.history
    assert all(np.isfinite(r["loss"]) for r in h)
    assert np.mean([r["loss"] for r in h[-5:]]) < np.mean([r["loss"] for r in h[:5]]) - 0.05


def test_initial_params():
    p = initial_params("softplus0", 3, jnp.float64)
    assert isinstance(p, Params) and float(jnp.sum(jnp.abs(p.raw_lengthscale))) == 0.0
    a = initial_params("normal", 3, jnp.float64, seed=4)
    b = initial_params("normal", 3, jnp.float64, seed=4)
    assert jnp.all(a.raw_lengthscale == b.raw_lengthscale) and jnp.any(a.raw_lengthscale != 0)
    with pytest.raises(ValueError, match="unknown init"):
        initial_params("zeros", 3, jnp.float64)


def test_input_validation(data64):
    X, y = data64
    with pytest.raises(ValueError, match="epochs"):
        _fit(X, y, epochs=0)
    with pytest.raises(ValueError, match="shape"):
        _fit(X, y[:-1], epochs=1)
    with pytest.raises(ValueError, match="dtype"):
        _fit(X, y.astype(jnp.float32), epochs=1)
    with pytest.raises(ValueError, match="kernel"):
        _fit(X, y, epochs=1, kernel="rbf")
    with pytest.raises(ValueError, match="checkpoint_path"):
        _fit(X, y, epochs=1, resume=True)


def test_exact_estimator_with_auto_optimizer_reaches_the_optimum(data64):
    # n = 200 <= exact_max_n: "auto" takes the float64 Cholesky loss and L-BFGS (the same
    # LBFGS as with SLQ), which must land on scipy's L-BFGS-B optimum of the same loss and
    # stop by itself once converged.
    from gpadjoint.config import OptimConfig
    from gpadjoint.optimizers import make_optimizer

    X, y = data64
    _, best = _exact_fit(X, y)
    opt = make_optimizer(OptimConfig(optimizer="auto"), estimator="exact")
    res = _fit(X, y, mll_config=MLLConfig(estimator="auto"), optimizer=opt, epochs=200)
    assert res.info["estimator"] == "exact" and "n = 200" in res.info["estimator_reason"]
    assert isinstance(opt, LBFGS)  # one L-BFGS for both estimators
    assert len(res.history) < 200 and res.stopped_reason.startswith("converged")
    final = float(neg_mll_exact(res.params, X, y, kernel="matern32"))
    assert final <= best + 1e-4
    assert all(h["cg_iterations"] == 0 for h in res.history)


# ---- checkpoints by time, a stop within one evaluation, a resumable subset start

LB = LBFGS()  # one object: the tests below share its compiled evaluation


def test_checkpoint_by_time_whatever_the_epoch_count(data64, tmp_path, monkeypatch):
    import gpadjoint.train as gtrain

    X, y = data64
    written = []
    real = gtrain.save_checkpoint
    monkeypatch.setattr(gtrain, "save_checkpoint",
                        lambda path, state, *a: (written.append(int(state.epoch)),
                                                 real(path, state, *a)))
    ck = tmp_path / "run.ckpt"
    _fit(X, y, epochs=3, checkpoint_path=ck, checkpoint_every=0, checkpoint_seconds=1e-9)
    assert written == [1, 2, 3, 3]  # after every epoch (each takes > 1e-9 s), then the end
    written.clear()
    _fit(X, y, epochs=3, checkpoint_path=ck, checkpoint_every=0, checkpoint_seconds=0)
    assert written == [3]  # off: only the end
    with pytest.raises(ValueError, match="checkpoint_seconds must be a finite number >= 0"):
        _fit(X, y, epochs=3, checkpoint_path=ck, checkpoint_seconds=-1.0)


@pytest.mark.slow
def test_stop_abandons_the_line_search_and_resume_ends_where_a_full_run_ends(data64, tmp_path):
    """A stop asked at the k-th evaluation ends the step in progress with the state of the
    last accepted one (bit for bit), and a resumed run ends where an uninterrupted one does."""
    import gpadjoint.optimizers as gopt

    X, y = data64
    full = _fit(X, y, epochs=10, seed=2, optimizer=LB)
    evals = [r["evaluations"] for r in full.history]
    j = next(i for i in range(1, len(evals)) if evals[i] - full.history[i]["refreshed"] >= 2)
    k = sum(evals[:j]) + full.history[j]["refreshed"] + 1  # step j + 1's first trial
    at_j = _fit(X, y, epochs=j, seed=2, optimizer=LB)  # the state after step j

    calls = []
    real = gopt._Evaluator.run

    def counted(self, *a, **kw):
        calls.append(1)
        return real(self, *a, **kw)

    gopt._Evaluator.run = counted
    try:
        ck = tmp_path / "run.ckpt"
        stopped = _fit(X, y, epochs=10, seed=2, optimizer=LB, checkpoint_path=ck,
                       checkpoint_every=0, stop=lambda: len(calls) >= k)
    finally:
        gopt._Evaluator.run = real
    assert len(calls) == k  # no evaluation after the one in progress when stop said True
    assert stopped.info["stop_requested"] and "abandoned" in stopped.stopped_reason
    assert len(stopped.history) == j
    for a, b in zip(jax.tree.leaves(stopped.state), jax.tree.leaves(at_j.state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # memory, value, anchor...
    state, _ = load_checkpoint(ck, stopped.state)
    assert int(state.epoch) == j
    resumed = _fit(X, y, epochs=10, seed=2, optimizer=LB, checkpoint_path=ck, resume=True)
    assert [r["new_loss"] for r in resumed.history] == [r["new_loss"] for r in full.history]
    for a, b in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(full.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=0)


@pytest.mark.slow
def test_subset_start_resumes_at_its_last_finished_stage(tmp_path):
    from gpadjoint.checkpoint import read_start, start_path
    from gpadjoint.start import subset_start

    rng = np.random.default_rng(0)
    X = jnp.asarray(rng.uniform(-2, 2, (240, 2)))
    y = jnp.sin(2 * X[:, 0]) + 0.3 * X[:, 1] + 0.02 * jnp.asarray(rng.standard_normal(240))
    y = (y - y.mean()) / y.std()
    p0 = init_params(2, jnp.float64)
    kw = dict(kernel="matern32", size=40, seed=1, noise_floor=1e-4, max_size=160,
              metric=True, settings={"run": "a"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the last rung interpolates: not what is tested
        full_p, full = subset_start(X, y, p0, **kw)
    assert len(full["stages"]) >= 2, "the ladder must have two rungs"
    ck = start_path(tmp_path / "run.ckpt")
    _, stopped = subset_start(X, y, p0, **kw, checkpoint=ck, stop=ck.exists)  # after rung 1
    assert stopped["interrupted"] and len(read_start(ck)[1]["stages"]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p, info = subset_start(X, y, p0, **kw, checkpoint=ck, resume=True)
    assert [s["size"] for s in info["stages"]] == [s["size"] for s in full["stages"]]
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(full_p), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=0)
    np.testing.assert_allclose(info["metric"], full["metric"], rtol=1e-10, atol=0)
    assert "metric" in read_start(ck)[1]
    with pytest.raises(ValueError, match="written for a different run.*settings"):
        subset_start(X, y, p0, **(kw | {"settings": {"run": "b"}}), checkpoint=ck, resume=True)
