"""scripts/bench_epoch.py's time to quality: the bisection finds the first epoch a linear scan
finds, and an interrupted run resumes from the evaluations it stored."""

import json

import numpy as np
import pytest

from gpadjoint.evaluate import exact_loss


@pytest.fixture(scope="module")
def bench_epoch(load_script):
    return load_script("bench_epoch")


def _record(X, y, epochs):
    """A fake run whose hyperparameters walk from a poor start to a good fit, geometrically."""
    start = np.array([0.05, 0.05, 0.05]), 0.2, 0.5
    end = np.array([1.0, 2.0, 4.0]), 1.0, 0.01
    curve = []
    for j in range(epochs + 1):
        t = j / epochs
        curve.append({"lengthscale": list(start[0] ** (1 - t) * end[0] ** t),
                      "outputscale": start[1] ** (1 - t) * end[1] ** t,
                      "noise": start[2] ** (1 - t) * end[2] ** t, "mean": 0.0})
    exact = [exact_loss(X, y, kernel="matern32", **h)["loss"] for h in curve]
    rec = {"_file": "fake.json", "started": "2026-01-01T00:00:00", "hyper_curve": curve[:-1],
           "final_hyperparameters": curve[-1], "final_train_loss_common": exact[-1],
           "seconds_curve": list(np.linspace(1.0, 2.0, epochs)),
           # the run's own estimate: the exact loss plus a constant bias and noise
           "loss_curve": list(np.asarray(exact[1:]) + 0.03 + 0.01 * np.sin(np.arange(epochs))),
           "final_train_loss": exact[-1] + 0.03}
    return rec, np.asarray(exact)


@pytest.mark.parametrize("frac", [0.0, 0.3, 0.77, 1.0])
def test_bisection_matches_a_linear_scan_and_resumes(bench_epoch, tmp_path, frac):
    rng = np.random.default_rng(0)
    X = rng.uniform(0, 4, (150, 3))
    y = np.sin(X[:, 0]) + 0.5 * np.cos(2 * X[:, 1]) + 0.05 * rng.standard_normal(150)
    rec, exact = _record(X, y, epochs=24)
    assert np.all(np.diff(exact) < 0)  # the premise of the bisection
    target = exact[-1] if frac == 1.0 else exact[0] + frac * (exact[-1] - exact[0])
    first = int(np.nonzero(exact <= target)[0][0])
    store = tmp_path / "evals.jsonl"
    got = bench_epoch.time_to_quality(rec, target, X, y, store)
    assert got["epochs_to_quality"] == first
    secs = np.concatenate([[0.0], np.cumsum(rec["seconds_curve"])])
    assert got["time_to_quality_s"] == pytest.approx(secs[first])
    assert got["evaluations"] <= 2 + int(np.ceil(np.log2(24)))  # bisection, not a scan
    lines = store.read_text().splitlines() if store.exists() else []
    assert len(lines) == got["new_evaluations"]
    for line in lines:  # what was stored is what the evaluator gives
        e = json.loads(line)
        assert e["record"] == "fake.json" and e["loss"] == pytest.approx(exact[e["epoch"]])
    again = bench_epoch.time_to_quality(rec, target, X, y, store)
    assert again["new_evaluations"] == 0 and again["epochs_to_quality"] == first
    # a rerun record (new start time) does not reuse the old one's evaluations
    other = bench_epoch.time_to_quality(rec | {"started": "later"}, target, X, y, None)
    assert other["new_evaluations"] == got["new_evaluations"]


def test_target_never_reached(bench_epoch, tmp_path):
    rng = np.random.default_rng(1)
    X = rng.uniform(0, 4, (80, 3))
    y = np.sin(X[:, 0]) + 0.05 * rng.standard_normal(80)
    rec, exact = _record(X, y, epochs=6)
    got = bench_epoch.time_to_quality(rec, exact[-1] - 1.0, X, y, tmp_path / "e.jsonl")
    assert got["time_to_quality_s"] is None and got["epochs_to_quality"] is None
    assert got["new_evaluations"] == 0  # the final loss is the record's own


@pytest.mark.parametrize("first", [10, 40, 82, 119])
def test_search_needs_few_choleskys_when_the_own_curve_misleads(bench_epoch, monkeypatch, first):
    """kin40k-like: 120 epochs, a smooth exact-loss curve, and an own-estimate curve whose offset
    from it drifts (so the first guess misses by up to ~15 epochs). Regula falsi on the exact
    losses finds the linear scan's epoch in at most 7 evaluations; plain bisection took 8-10."""
    import gpadjoint.evaluate as ev

    E = 120
    exact = np.array([1.414 - 1.95 * (1 - np.exp(-j / 140.0)) ** 1.3 for j in range(E + 1)])
    calls = []

    def fake_exact_loss(X, y, kernel, lengthscale, **kw):
        calls.append(int(lengthscale[0]))
        return {"loss": float(exact[int(lengthscale[0])])}

    monkeypatch.setattr(ev, "exact_loss", fake_exact_loss)
    curve = [{"lengthscale": [j], "outputscale": 1.0, "noise": 0.1, "mean": 0.0}
             for j in range(E + 1)]
    own = exact[1:] + 0.09 - 0.001 * np.arange(E)
    rec = {"_file": "f.json", "started": "s", "hyper_curve": curve[:-1],
           "final_hyperparameters": curve[-1], "final_train_loss_common": exact[-1],
           "seconds_curve": [1.0] * E, "loss_curve": list(own), "final_train_loss": own[-1]}
    target = (exact[first] + exact[first - 1]) / 2
    got = bench_epoch.time_to_quality(rec, target, None, None, None)
    assert got["epochs_to_quality"] == first
    assert len(calls) == len(set(calls)) <= 7, calls


@pytest.mark.parametrize("reached", [True, False])
def test_slq_scored_run_gets_an_upper_bound_without_evaluations(bench_epoch, monkeypatch,
                                                                 reached):
    """keggundirected-like: the common evaluator had to be SLQ (no Cholesky fits), so no earlier
    epoch is scored; a run whose final loss reaches the target reports its whole training time
    as an upper bound, and one that does not reports nothing."""
    import gpadjoint.evaluate as ev

    def no_evaluations(*a, **kw):
        raise AssertionError("an SLQ-scored record must not trigger an evaluation")

    monkeypatch.setattr(ev, "exact_loss", no_evaluations)
    E = 10
    curve = [{"lengthscale": [1.0], "outputscale": 1.0, "noise": 0.1, "mean": 0.0}] * (E + 1)
    own = list(np.linspace(1.0, 0.83, E))
    rec = {"_file": "k.json", "started": "s", "hyper_curve": curve[:-1],
           "final_hyperparameters": curve[-1], "final_train_loss_common": 0.8123,
           "common_evaluator": {"method": "slq", "loss_se": 1.1e-4},
           "seconds_curve": list(np.linspace(100.0, 110.0, E)), "loss_curve": own,
           "final_train_loss": own[-1]}
    target = 0.8136 if reached else 0.8100
    got = bench_epoch.time_to_quality(rec, target, None, None, None)
    if reached:
        assert got["time_to_quality_kind"] == "upper bound" and got["epochs_to_quality"] == E
        assert got["time_to_quality_s"] == pytest.approx(sum(rec["seconds_curve"]))
    else:
        assert got["time_to_quality_s"] is None and got["time_to_quality_kind"] is None
    assert got["new_evaluations"] == 0
