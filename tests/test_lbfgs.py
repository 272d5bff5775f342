"""L-BFGS on the fixed-probe SLQ objective (:func:`gpadjoint.train.make_lbfgs_trainer`).

The claims checked: with the probes fixed for the run the objective is one deterministic
function, and the trainer reaches *its* minimiser (scipy's L-BFGS-B on the same function is the
independent reference); every evaluation is reused (the loss entering step e+1 is the accepted
value of step e); a resumed run ends where an uninterrupted one ends; settings resolve to it.
"""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _util import problem
from jax.flatten_util import ravel_pytree
from scipy.optimize import minimize

from gpadjoint.config import OptimConfig
from gpadjoint.kernels import constrain, init_params
from gpadjoint.matvec import make_backend
from gpadjoint.mll import MLLConfig, neg_mll, precond_factors
from gpadjoint.optimizers import make_optimizer, resolve_optimizer
from gpadjoint.train import LBFGS, fit, load_checkpoint

N, D = 200, 2
CFG = MLLConfig(num_probes=8, lanczos_depth=12, precond_rank=10, cg_tol=1e-10, cg_min_iter=1,
                cg_max_iter=400, precond_logdet=True)
DENSE = make_backend("dense", "matern32")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data64():
    X, y, _ = problem(n=N, d=D, seed=5, dtype=jnp.float64)
    return X, y


def _fit(X, y, **kw):
    kw.setdefault("backend", DENSE)
    kw.setdefault("mll_config", CFG)
    kw.setdefault("optimizer", LBFGS(gtol=1e-6, rtol=0.0))
    kw.setdefault("progress", False)
    return fit(X, y, **kw)


def _fixed_objective(X, y, seed, anchor):
    """The trainer's objective: its one probe draw, the preconditioner built at ``anchor``."""
    key = jax.random.fold_in(jax.random.PRNGKey(seed), 0)
    flat0, unravel = ravel_pytree(init_params(D, jnp.float64))
    vg = jax.jit(jax.value_and_grad(lambda f: neg_mll(
        unravel(f), X, y, key, backend=DENSE, config=CFG, precond_params=anchor)[0]))
    return flat0, unravel, vg


@pytest.mark.slow
def test_reaches_the_minimum_of_the_fixed_objective(data64):
    X, y = data64
    res = _fit(X, y, epochs=200, seed=3)
    assert res.stopped_reason.startswith("converged"), res.stopped_reason
    flat0, unravel, vg = _fixed_objective(X, y, seed=3, anchor=res.state.opt_state.anchor)

    def fun(f):
        v, g = vg(jnp.asarray(f))
        return float(v), np.asarray(g, np.float64)

    ref = minimize(fun, np.asarray(flat0), jac=True, method="L-BFGS-B",
                   options={"gtol": 1e-9, "ftol": 1e-15, "maxiter": 1000})
    ours_flat = np.asarray(ravel_pytree(res.params)[0])
    v_ours, g_ours = fun(ours_flat)
    assert np.linalg.norm(g_ours) <= 1e-6
    assert abs(v_ours - ref.fun) <= 1e-8, (v_ours, ref.fun)
    np.testing.assert_allclose(ours_flat, ref.x, rtol=1e-3, atol=1e-3)
    # the history's last accepted value is the objective at the returned parameters
    assert res.history[-1]["new_loss"] == pytest.approx(v_ours, abs=1e-10)


def test_every_evaluation_is_reused_and_counted(data64):
    X, y = data64
    res = _fit(X, y, epochs=12, seed=1)
    h = res.history
    assert len(h) == 12
    for a, b in zip(h, h[1:]):
        if not b["refreshed"]:  # no point is evaluated twice (unless P was rebuilt there)
            assert b["loss"] == a["new_loss"]
        assert b["new_loss"] <= b["loss"]  # the line search only accepts decreases
    assert h[0]["evaluations"] >= 2  # the start plus at least one line-search point
    assert all(r["evaluations"] >= 1 and r["cg_iterations"] >= r["evaluations"] for r in h)
    assert all(r["passes"] >= r["evaluations"] * CFG.lanczos_depth for r in h)
    assert all(r["step_size"] > 0 and r["cg_converged"] for r in h)
    # the preconditioner is built once per anchor: at each refresh, and at the first step
    # (or before it, when the trainer compiled its evaluation)
    assert [r["precond_builds"] for r in h[1:]] == [int(r["refreshed"]) for r in h[1:]]
    assert h[0]["precond_builds"] <= 1
    assert any(r["refreshed"] for r in h[1:])  # so the refresh branch was exercised


@pytest.mark.slow
def test_factors_built_once_give_the_objective_rebuilt_at_every_call(data64):
    # neg_mll(precond=precond_factors(anchor)) is neg_mll(precond_params=anchor): same value
    # and gradient, not just close (the trainer's objective must not depend on the cache)
    X, y = data64
    p = init_params(D, jnp.float64)
    anchor = jax.tree.map(lambda a: a + 0.3, p)
    key = jax.random.PRNGKey(4)
    f = precond_factors(X, DENSE.kernel, constrain(anchor, CFG.noise_floor), CFG)
    (v1, _), g1 = jax.jit(jax.value_and_grad(lambda q: neg_mll(
        q, X, y, key, backend=DENSE, config=CFG, precond_params=anchor), has_aux=True))(p)
    (v2, _), g2 = jax.jit(jax.value_and_grad(lambda q: neg_mll(
        q, X, y, key, backend=DENSE, config=CFG, precond=f), has_aux=True))(p)
    assert float(v1) == pytest.approx(float(v2), rel=1e-12, abs=1e-12)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-12)


def test_resume_ends_where_an_uninterrupted_run_ends(data64, tmp_path):
    X, y = data64
    opt = LBFGS(gtol=0.0, rtol=0.0)
    full = _fit(X, y, epochs=8, seed=2, optimizer=opt)
    ck = tmp_path / "run.ckpt"
    _fit(X, y, epochs=3, seed=2, optimizer=opt, checkpoint_path=ck, checkpoint_every=1)
    state, hist = load_checkpoint(ck, _fit(X, y, epochs=1, seed=2, optimizer=opt).state)
    assert int(state.epoch) == 3 and len(hist) == 3
    assert np.isfinite(float(state.opt_state.value))  # the accepted value travels along
    resumed = _fit(X, y, epochs=8, seed=2, optimizer=opt, checkpoint_path=ck, resume=True)
    assert resumed.info["resumed_from_epoch"] == 3
    assert [r["new_loss"] for r in resumed.history] == pytest.approx(
        [r["new_loss"] for r in full.history], rel=1e-9, abs=1e-12)
    for a, b in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(full.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-7, atol=1e-10)


def test_nan_targets_stop_before_any_step(data64):
    X, y = data64
    res = _fit(X, y.at[4].set(jnp.nan), epochs=5)
    assert res.history == []
    assert "non-finite" in res.stopped_reason
    for a, b in zip(jax.tree.leaves(res.params), jax.tree.leaves(init_params(D, jnp.float64))):
        np.testing.assert_array_equal(a, b)


def test_auto_resolves_to_lbfgs_for_slq():
    assert resolve_optimizer("auto", "slq")[0] == "lbfgs"
    opt = make_optimizer(OptimConfig(optimizer="auto", lbfgs_rtol=1e-5, lbfgs_gtol=1e-4),
                         estimator="slq")
    assert isinstance(opt, LBFGS) and (opt.rtol, opt.gtol) == (1e-5, 1e-4)
    with pytest.raises(ValueError, match="clip_norm"):
        make_optimizer(OptimConfig(optimizer="lbfgs", clip_norm=1.0), estimator="slq")


def _exact_loss_in_log_coords(X, y, like):
    """-log p(y)/n with slogdet and solve (no custom VJP), in the trainer's coordinates.

    Those are inverse lengthscales, log output scale, log noise above the floor and the mean:
    an independent reference for the Hessian behind ``LBFGS.metric``.
    """
    from gpadjoint.kernels import NOISE_FLOOR

    d = X.shape[1]

    def f(u):
        s2, noise = jnp.exp(u[d]), jnp.exp(u[d + 1]) + NOISE_FLOOR
        Z = X * u[:d]
        r2 = jnp.maximum(jnp.sum((Z[:, None] - Z[None]) ** 2, -1), 0.0)
        r = jnp.sqrt(3.0 * r2 + 1e-300)
        K = s2 * (1.0 + r) * jnp.exp(-r) + noise * jnp.eye(X.shape[0])
        res = y - u[d + 2]
        logdet = jnp.linalg.slogdet(K)[1]
        n = X.shape[0]
        return 0.5 * (res @ jnp.linalg.solve(K, res) + logdet + n * jnp.log(2 * jnp.pi)) / n

    return f


@pytest.mark.slow
def test_subset_metric_whitens_the_subset_hessian(data64):
    from gpadjoint.start import subset_start
    from gpadjoint.train import _flat, to_opt

    X, y = data64
    p0 = init_params(D, jnp.float64)
    params, info = subset_start(X, y, p0, kernel="matern32", size=150, seed=0,
                                noise_floor=1e-4, metric_floor=1e-12)
    M = np.asarray(info["metric"])
    assert M.shape == (D + 3, D + 3) and info["stopped_reason"].startswith("converged")
    rows = np.sort(np.random.default_rng(0).permutation(N)[:150])
    f = _exact_loss_in_log_coords(X[rows], y[rows], None)
    H = np.asarray(jax.hessian(f)(jnp.asarray(_flat(to_opt(params)))))
    # M^T H M = I: L-BFGS's first step in the metric's coordinates is the Newton step
    np.testing.assert_allclose(M.T @ H @ M, np.eye(D + 3), atol=2e-3)
    # computed later from the fit's info alone (the model does so only when it fits all n)
    from gpadjoint.start import subset_metric

    p2, bare = subset_start(X, y, p0, kernel="matern32", size=150, seed=0, noise_floor=1e-4,
                            metric=False)
    assert "metric" not in bare and bare["evaluations"] < info["evaluations"]
    later = subset_metric(X, y, p2, bare, kernel="matern32", noise_floor=1e-4,
                          metric_floor=1e-12)
    np.testing.assert_allclose(np.asarray(later["metric"]), M, rtol=1e-6, atol=1e-9)
    assert later["evaluations"] == info["evaluations"]


@pytest.mark.slow
def test_metric_reaches_the_same_minimum_and_resumes_in_its_coordinates(data64, tmp_path):
    X, y = data64
    rng = np.random.default_rng(7)
    A = rng.normal(size=(D + 3, D + 3))
    metric = tuple(map(tuple, 0.3 * (np.eye(D + 3) + 0.3 * A)))  # any invertible M
    whitened = _fit(X, y, epochs=200, seed=3, optimizer=LBFGS(gtol=1e-6, rtol=0.0, metric=metric))
    assert whitened.stopped_reason.startswith("converged"), whitened.stopped_reason
    # a minimum of the fixed objective it ended on (preconditioner at its final anchor): scipy
    # started there finds nothing lower (started from raw zeros it may find another minimum)
    _, _, vg = _fixed_objective(X, y, seed=3, anchor=whitened.state.opt_state.anchor)
    end = np.asarray(ravel_pytree(whitened.params)[0])
    ref = minimize(lambda f: tuple(np.asarray(a, np.float64) for a in vg(jnp.asarray(f))),
                   end, jac=True, method="L-BFGS-B",
                   options={"gtol": 1e-9, "ftol": 1e-15, "maxiter": 1000})
    assert ref.fun >= whitened.history[-1]["new_loss"] - 1e-8
    assert np.linalg.norm(np.asarray(vg(jnp.asarray(end))[1])) <= 1e-6
    np.testing.assert_allclose(np.asarray(whitened.state.opt_state.metric), np.asarray(metric))
    # a resumed run takes M from its checkpoint, not from the optimiser it is given
    opt = LBFGS(gtol=0.0, rtol=0.0, metric=metric)
    full = _fit(X, y, epochs=6, seed=2, optimizer=opt)
    ck = tmp_path / "run.ckpt"
    _fit(X, y, epochs=3, seed=2, optimizer=opt, checkpoint_path=ck, checkpoint_every=1)
    resumed = _fit(X, y, epochs=6, seed=2, optimizer=LBFGS(gtol=0.0, rtol=0.0),
                   checkpoint_path=ck, resume=True)
    assert [r["new_loss"] for r in resumed.history] == pytest.approx(
        [r["new_loss"] for r in full.history], rel=1e-9, abs=1e-12)


def test_metric_of_the_wrong_size_is_refused(data64):
    X, y = data64
    with pytest.raises(ValueError, match="LBFGS.metric must be a finite"):
        _fit(X, y, epochs=1, optimizer=LBFGS(metric=((1.0,),)))


@pytest.mark.slow
def test_subset_start_flags_an_interpolating_fit():
    import warnings

    from gpadjoint.start import SubsetStartWarning, subset_start

    rng = np.random.default_rng(5)
    X = rng.uniform(-1, 1, (400, 2))
    smooth = np.sin(2 * X[:, 0]) + X[:, 1] ** 2
    p0 = init_params(2, jnp.float64)
    # noise-free targets: the exact fit of the subset drives the noise to its floor
    with pytest.warns(SubsetStartWarning, match="interpolated"):
        params, info = subset_start(jnp.asarray(X), jnp.asarray(smooth - smooth.mean()), p0,
                                    kernel="matern32", size=100, seed=0, noise_floor=1e-4)
    assert info["interpolating"] and info["noise"] <= 1e-3
    # the same function with noise of variance 0.01: no warning, the noise is found
    noisy = smooth + 0.1 * rng.standard_normal(400)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SubsetStartWarning)
        _, info = subset_start(jnp.asarray(X), jnp.asarray(noisy - noisy.mean()), p0,
                               kernel="matern32", size=100, seed=0, noise_floor=1e-4)
    assert not info["interpolating"] and 1e-3 < info["noise"] < 0.1


def _interpolating_data(noise_sd=0.0, n=400):
    rng = np.random.default_rng(5)
    X = rng.uniform(-1, 1, (n, 2))
    y = np.sin(2 * X[:, 0]) + X[:, 1] ** 2 + noise_sd * rng.standard_normal(n)
    return X, y


@pytest.mark.filterwarnings("ignore::gpadjoint.start.SubsetStartWarning")
@pytest.mark.slow
def test_full_fit_auto_keeps_an_interpolating_subset_start_and_says_why():
    from gpadjoint import GPRegressor
    from gpadjoint.kernels import constrain

    X, y = _interpolating_data()
    kw = dict(estimator="slq", exact_max_n=100, init_subset=100, num_probes=4,
              lanczos_depth=8, precond_rank=20, epochs=3)
    m = GPRegressor(**kw).fit(X, y)
    assert m.init_subset_["interpolating"]
    assert not m.full_fit_["fit"] and m.full_fit_["mode"] == "auto"
    assert m.history_ == [] and m.stopped_reason_.startswith("kept the subset start")
    assert "cond ~" in m.full_fit_["reason"] and "full_fit = 'always'" in m.full_fit_["reason"]
    # the kept start is the subset's exact fit: the noise it found, and it predicts from all n
    # (a tight CG: at this fit, mean 10 and output scale 100, predict_cg_tol = 1e-2 leaves a
    # constant error of ~1e-2 x |y - mean| ~ 0.09 in every prediction)
    h = constrain(m.params_, m.config_.model.noise_floor)
    assert float(h.noise) == pytest.approx(m.init_subset_["noise"], rel=1e-6)
    mu = GPRegressor(**kw, predict_cg_tol=1e-9).fit(X, y).predict(X[:50])
    assert np.sqrt(np.mean((mu - y[:50]) ** 2)) < 0.01
    # 'always' fits all rows from the same start
    m2 = GPRegressor(**kw, full_fit="always").fit(X, y)
    assert m2.full_fit_["fit"] and len(m2.history_) >= 1
    # noisy targets: the subset fit does not interpolate and auto fits all rows
    Xn, yn = _interpolating_data(noise_sd=0.1)
    m3 = GPRegressor(**kw).fit(Xn, yn)
    assert not m3.init_subset_["interpolating"]
    assert m3.full_fit_["fit"] and len(m3.history_) >= 1


def test_full_fit_never_keeps_the_subset_and_needs_one():
    from gpadjoint import GPRegressor

    Xn, yn = _interpolating_data(noise_sd=0.1)
    m = GPRegressor(estimator="slq", exact_max_n=100, init_subset=100, num_probes=4,
                    lanczos_depth=8, precond_rank=20, epochs=3, full_fit="never").fit(Xn, yn)
    assert not m.full_fit_["fit"] and m.history_ == []
    with pytest.raises(ValueError, match="full_fit.*init_subset is 0"):
        GPRegressor(init_subset=0, full_fit="never").fit(Xn, yn)
    with pytest.raises(ValueError, match="full_fit.*choose one of"):
        GPRegressor(full_fit="sometimes").fit(Xn, yn)


@pytest.mark.slow
def test_subset_start_doubles_nested_rows_while_the_fit_interpolates():
    import warnings

    from gpadjoint.start import SubsetStartWarning, subset_start

    X, y = _interpolating_data()
    p0 = init_params(2, jnp.float64)
    with pytest.warns(SubsetStartWarning, match="init_subset_max"):
        params, info = subset_start(jnp.asarray(X), jnp.asarray(y - y.mean()), p0,
                                    kernel="matern32", size=50, seed=0, noise_floor=1e-4,
                                    max_size=300)
    # 50 -> 100 -> 200; 400 would exceed max_size (and be all n)
    assert [st["size"] for st in info["stages"]] == [50, 100, 200] and info["size"] == 200
    assert all(st["interpolating"] for st in info["stages"])
    assert info["steps"] == sum(st["steps"] for st in info["stages"])
    # the last stage is the exact fit of those 200 rows: restarting it there moves nothing
    with pytest.warns(SubsetStartWarning):
        _, again = subset_start(jnp.asarray(X), jnp.asarray(y - y.mean()), params,
                                kernel="matern32", size=200, seed=0, noise_floor=1e-4)
    assert again["loss"] == pytest.approx(info["loss"], abs=1e-6)
    # data with noise: one stage, no warning
    Xn, yn = _interpolating_data(noise_sd=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SubsetStartWarning)
        _, info = subset_start(jnp.asarray(Xn), jnp.asarray(yn - yn.mean()), p0,
                               kernel="matern32", size=50, seed=0, noise_floor=1e-4,
                               max_size=300)
    assert [st["size"] for st in info["stages"]] == [50]


def test_each_evaluation_is_logged_with_its_cost(data64, tmp_path):
    # the benchmark's evaluation log (what a run stopped inside a step reports) counts what the
    # history counts: the same evaluations, passes and CG iterations, and the same losses
    import logging
    import sys

    sys.path.insert(0, str(ROOT / "scripts"))
    import _benchutil as bu

    X, y = data64
    path = tmp_path / "run.ckpt.npz.evals.jsonl"
    log = logging.getLogger("gpadjoint")
    handlers, level = list(log.handlers), log.level
    bu.log_evaluations(path)
    try:
        res = _fit(X, y, epochs=4, seed=3)
    finally:
        for h in log.handlers[len(handlers):]:
            log.removeHandler(h)
        log.setLevel(level)
    s = bu.evaluations_summary(path)["by_n"][str(N)]
    hist = res.history
    # the trainer's first evaluation (at the start point) is counted by no step's history
    evals = sum(h["evaluations"] for h in hist)
    assert s["evaluations"] in (evals, evals + 1)
    first = [json.loads(line) for line in path.read_text().splitlines()]
    first = [e for e in first if e["kind"] == "evaluation"]
    assert len(first) == s["evaluations"]
    assert first[-1]["loss"] == pytest.approx(hist[-1]["new_loss"] if "new_loss" in hist[-1]
                                              else hist[-1]["loss"], rel=1e-12)
    if s["evaluations"] == evals:
        assert s["passes_per_evaluation"] * evals == pytest.approx(sum(h["passes"] for h in hist))
    assert s["estimator"] == CFG.estimator and s["depth"] == CFG.lanczos_depth
    # the CG loop's progress records (DEBUG was on when it was traced): every PROGRESS_EVERY
    # iterations, each below the iteration count its evaluation then reports
    from gpadjoint.fused import PROGRESS_EVERY

    lines = [json.loads(line) for line in path.read_text().splitlines()]
    progress = [(i, e) for i, e in enumerate(lines) if e["kind"] == "cg_progress"]
    assert progress
    for i, e in progress:
        done = next(x for x in lines[i:] if x["kind"] == "evaluation")
        assert e["iteration"] % PROGRESS_EVERY == 0 and e["iteration"] <= done["cg_iterations"]
    assert bu.evaluations_summary(path)["unfinished"] == {}


def test_precond_ratio_is_the_residual_trace_over_the_noise(data64):
    from gpadjoint.kernels import cross_cov
    from gpadjoint.optimizers import _HANDOFF, drop_anchor_factors
    from gpadjoint.start import precond_ratio

    X, _ = data64
    p = init_params(D, jnp.float64)
    h = constrain(p, CFG.noise_floor)
    K = np.asarray(cross_cov("matern32", X, X, h))
    for rank in (0, 10, N):
        cfg = MLLConfig(precond_rank=rank, precond_pivot="random")
        got = precond_ratio(X, p, kernel="matern32", config=cfg)
        if rank == 0:
            assert got == pytest.approx(np.trace(K) / float(h.noise), rel=1e-12)
            continue
        L = np.asarray(precond_factors(X, "matern32", h, cfg).precond.L)
        want = np.trace(K - L @ L.T) / float(h.noise)
        assert got == pytest.approx(want, rel=1e-8, abs=1e-6)
        assert len(_HANDOFF) == 1  # held for a fit anchored there
    # full rank leaves (almost) nothing; rank 10 leaves less than rank 0
    assert precond_ratio(X, p, kernel="matern32", config=MLLConfig(precond_rank=N)) < 1e-6 * N
    drop_anchor_factors()
    assert not _HANDOFF


def test_a_fit_takes_the_preconditioner_built_at_its_anchor(data64, caplog):
    import logging

    from gpadjoint.optimizers import _HANDOFF, anchor_factors

    X, y = data64
    p = init_params(D, jnp.float64)

    def fit_and_count(params0):
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="gpadjoint"):
            res = _fit(X, y, epochs=1, seed=1, params0=params0)
        builds = [r for r in caplog.records
                  if getattr(r, "evaluation", {}).get("kind") == "precond"]
        return res, len(builds)

    anchor_factors(X, "matern32", CFG, p)
    taken, n_taken = fit_and_count(p)
    assert not _HANDOFF and n_taken == 0
    built, n_built = fit_and_count(p)
    assert n_built == 1
    assert taken.history[0]["new_loss"] == built.history[0]["new_loss"]
    # another anchor does not take it: it builds its own, and what was held is freed
    anchor_factors(X, "matern32", CFG, p)
    _, n_other = fit_and_count(p._replace(raw_noise=p.raw_noise + 0.1))
    assert n_other == 1 and not _HANDOFF


@pytest.mark.slow
def test_the_ladder_climbs_while_the_full_fits_cg_would_be_hard():
    import warnings

    from gpadjoint.start import CG_RATIO_LIMIT, SubsetStartWarning, full_fit, subset_start

    Xn, yn = _interpolating_data(noise_sd=0.1)  # noisy: no rung interpolates
    p0 = init_params(2, jnp.float64)
    seen = []

    def check(params):  # hard for the first two rungs' fits, then easy
        seen.append(float(constrain(params, 1e-4).noise))
        return 10 * CG_RATIO_LIMIT if len(seen) <= 2 else CG_RATIO_LIMIT / 10

    kw = dict(kernel="matern32", seed=0, noise_floor=1e-4, max_size=300)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SubsetStartWarning)
        _, info = subset_start(jnp.asarray(Xn), jnp.asarray(yn - yn.mean()), p0, size=50,
                               cg_check=check, **kw)
    assert [st["size"] for st in info["stages"]] == [50, 100, 200]
    assert [st["cg_hard"] for st in info["stages"]] == [True, True, False]
    # each rung was checked at its own fit
    assert seen == pytest.approx([st["noise"] for st in info["stages"]], rel=1e-6)
    assert full_fit("auto", info, "slq", 400)["fit"]
    # hard to the last allowed rung: auto keeps it and says why
    _, info = subset_start(jnp.asarray(Xn), jnp.asarray(yn - yn.mean()), p0, size=50,
                           cg_check=lambda p: 10 * CG_RATIO_LIMIT, **kw)
    assert [st["size"] for st in info["stages"]] == [50, 100, 200] and info["cg_hard"]
    why = full_fit("auto", info, "slq", 400)
    assert not why["fit"]
    assert f"trace(K - L L^T) / noise = {10 * CG_RATIO_LIMIT:.1e}" in why["reason"]
    assert full_fit("auto", info, "exact", 400)["fit"]
    assert full_fit("always", info, "slq", 400)["fit"]


def _matern32_np(A, B, ls, s2):
    r = np.sqrt(np.maximum(((A[:, None, :] - B[None, :, :]) / ls) ** 2, 0).sum(-1))
    return s2 * (1 + np.sqrt(3) * r) * np.exp(-np.sqrt(3) * r)


def test_heldout_noise_replaces_a_floor_noise_on_noisy_data_and_keeps_it_on_clean_data():
    """The held-out check of a kept interpolating start, its NLL against a numpy reference."""
    from gpadjoint.kernels import unconstrain
    from gpadjoint.start import _subset_rows, heldout_noise

    floor, total = 1e-4, 1.0
    ls = np.array([0.5, 0.5])
    # an interpolating fit: the noise just above its floor, the rest of the variance in s2
    p = unconstrain(ls, total - 2e-4, 2e-4, 0.0, noise_floor=floor, dtype=jnp.float64)
    sub = {"size": 150, "seed": 3}
    for noise_sd, replaced in ((0.3, True), (0.0, False)):
        X, y = _interpolating_data(noise_sd=noise_sd, n=450)
        y = (y - y.mean()) / y.std()
        q, rec = heldout_noise(jnp.asarray(X), jnp.asarray(y), p, sub, kernel="matern32",
                               noise_floor=floor, rows=200)
        assert rec["replaced"] is replaced and rec["rows"] == 200
        h = constrain(q, floor)
        if replaced:
            # the noise moves towards the data's (0.09 of y's variance before scaling) and the
            # total variance and lengthscales stay
            assert 0.01 <= float(h.noise) <= 0.3 and rec["noise"] == pytest.approx(float(h.noise))
            assert float(h.outputscale + h.noise) == pytest.approx(total + 0.0, rel=1e-9)
            assert min(rec["shares"].values()) < rec["fitted_nll"] - 1e-3
        else:
            assert float(h.noise) == pytest.approx(2e-4, rel=1e-9)
        np.testing.assert_allclose(np.asarray(h.lengthscale), ls, rtol=1e-12)
        # the fitted noise's held-out NLL, by a dense numpy posterior
        Xs, ys = (np.asarray(a) for a in _subset_rows(X, y, 3, 150))
        hold = np.sort(np.random.default_rng(3).permutation(450)[250:])
        K = _matern32_np(Xs, Xs, ls, total - 2e-4) + 2e-4 * np.eye(150)
        Ks = _matern32_np(X[hold], Xs, ls, total - 2e-4)
        mean = Ks @ np.linalg.solve(K, ys)
        var = total - np.einsum("ij,ji->i", Ks, np.linalg.solve(K, Ks.T))
        ref = np.mean(0.5 * np.log(2 * np.pi * var) + 0.5 * (y[hold] - mean) ** 2 / var)
        assert rec["fitted_nll"] == pytest.approx(ref, rel=1e-8)


def test_a_trial_over_the_cg_bound_is_stopped_and_not_taken(data64, monkeypatch):
    """The line search bounds each trial's CG by the accepted point's; a stopped one is unsolved,
    and a search that found nothing under the bound runs once more without it."""
    import gpadjoint.optimizers as opt

    X, y = data64
    free = _fit(X, y, epochs=2, seed=1).history
    assert all(r["cg_capped"] == 0 for r in free)  # the default bound leaves these steps alone
    # a bound of 1 iteration: every bounded trial stops unsolved (at tolerance 1e-10), and the
    # unbounded search that follows takes the same steps as without a bound
    monkeypatch.setattr(opt, "TRIAL_CG_FACTOR", 0)
    monkeypatch.setattr(opt, "TRIAL_CG_SLACK", 1)
    tight = _fit(X, y, epochs=2, seed=1).history
    for a, b in zip(tight, free, strict=True):
        assert a["cg_capped"] >= 1
        assert a["evaluations"] == b["evaluations"] + a["cg_capped"]
        assert a["new_loss"] == b["new_loss"] and a["step_size"] == b["step_size"]
        assert a["cg_converged"] and a["cg_residual"] == b["cg_residual"]
