"""Per-epoch cost and time to quality, gpadjoint against GPyTorch, from the bench_uci records.

For every record of a gpadjoint method in ``results/uci/`` that has a GPyTorch record with the
same data set, split and backend (same machine, same harness; GPyTorch's longest run; a
gpadjoint ``blocked`` run is paired with GPyTorch's ``keops`` one, column ``gpytorch_backend``),
one row in ``results/bench_epoch.csv``. Resumable: a row is kept while its two records are
unchanged (same start times); a rerun record gets its row recomputed.

* ``seconds_per_epoch`` (median over epochs) and ``seconds_per_epoch_ratio`` (÷ GPyTorch);
* ``passes_per_epoch``: passes over the n² kernel pairs per training step, counted from the
  run (a batched matvec over many right-hand sides is one pass; with the dense backend building
  K is one pass and each product with it one more). gpadjoint counts them itself
  (``passes`` in its history): max(depth, CG passes) forward, where CG rides on the Lanczos
  passes (gpadjoint.fused), + depth adjoint passes + 1 fused parameter VJP (+ 1 build of K,
  dense). Older records, from before the fused pass, are counted by formula (2 × depth + CG
  iterations + 1 warm-start residual + the VJPs). ``passes_min_design`` = 2 × depth + 1 (+ 1
  dense): the least this design can do. GPyTorch's, by the same rule, are counted during its
  KeOps runs (``passes_curve`` in its record, median over all its epochs) or else come from
  ``results/gpytorch_passes.csv`` (scripts/count_gpytorch_passes.py, its first epochs);
* ``time_to_quality_s``: wall-clock training seconds until gpadjoint's parameters reach, by the
  common float64 evaluator (:func:`gpadjoint.evaluate.exact_loss`), the loss GPyTorch's final
  parameters have after all its epochs; found by bracketing over epochs (the evaluated loss
  falls monotonically along these runs; each probe is one Cholesky): a first guess from the
  run's own loss curve, then regula falsi on the exact losses with bisection steps as a
  safeguard; empty if never reached.
  ``time_to_quality_ratio`` = that ÷ GPyTorch's total training seconds. Every evaluation is
  appended to ``results/uci/exact_evals.jsonl`` (record, its start time, epoch, loss, seconds) as
  it finishes, and read back on the next run, so an interrupted bisection loses at most the
  Cholesky in progress (``--evals`` puts the file elsewhere).
  ``time_to_quality_kind``: ``exact`` for that search; ``upper bound`` where the record's common
  evaluator had to be SLQ (one float64 n x n array does not fit, keggundirected): each
  earlier epoch would then cost an SLQ evaluation of over an hour, so only the final
  parameters are scored and the time is that of the whole run (the target is reached at the
  last epoch or before it).

    python scripts/bench_epoch.py
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402

OUT = bu.ROOT / "results" / "bench_epoch.csv"
KEY = ["dataset", "split", "method", "backend", "epochs"]
FIELDS = KEY + [
    "gpytorch_backend", "gpytorch_epochs", "status", "seconds_per_epoch",
    "gpytorch_seconds_per_epoch", "seconds_per_epoch_ratio",
    "passes_per_epoch", "passes_min_design", "gpytorch_passes_per_epoch", "peak_rss_mib",
    "gpytorch_peak_rss_mib", "final_loss_common", "gpytorch_final_loss_common",
    "time_to_quality_s", "time_to_quality_kind", "gpytorch_train_s", "time_to_quality_ratio",
    "epochs_to_quality",
    "test_rmse", "gpytorch_test_rmse", "load_avg", "gpytorch_load_avg", "evaluations", "record",
    "gpytorch_record", "record_started", "gpytorch_record_started", "machine", "commit",
]
GPT_PASSES = bu.ROOT / "results" / "gpytorch_passes.csv"
# GPyTorch's backend paired with each gpadjoint backend. "blocked" (gpadjoint's O(n)-memory CPU
# path) has no GPyTorch counterpart; GPyTorch's O(n)-memory path is KeOps (see bench_uci).
# "stored" likewise: it holds K where GPyTorch's dense autograd would hold about ten n x n arrays.
PEER_BACKEND = {"dense": "dense", "stored": "keops", "blocked": "keops", "keops": "keops"}


def passes(rec: dict) -> tuple[float, int]:
    """(median passes per epoch, the design's minimum) for a gpadjoint record."""
    depth = rec["settings"]["config"]["mll"]["lanczos_depth"]
    build = 1 if rec["backend"] == "dense" else 0
    counted = [p for p in rec.get("passes_curve") or [] if p is not None]
    if counted:  # counted by the estimator itself (fused Lanczos + CG passes)
        return float(np.median(counted)), 2 * depth + 1 + build
    # records from before the fused pass: Lanczos, CG (+1 for its warm-start residual), the
    # adjoint, and the parameter VJPs of log det and of the solve (one K cotangent with dense)
    cg = float(np.median(rec["cg_iterations_curve"]))
    vjps = 1 + build if build else 2
    return 2 * depth + cg + 1 + vjps, 2 * depth + 1 + build


def load_evals(path: Path | None) -> dict[tuple[str, str, int], float]:
    """{(record file, record start time, epoch): exact loss} from earlier runs' evaluations."""
    out = {}
    if path is not None and path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                e = json.loads(line)
                out[(e["record"], e["record_started"], int(e["epoch"]))] = float(e["loss"])
    return out


def time_to_quality(rec: dict, target: float, X, y, evals_path: Path | None = None) -> dict:
    from gpadjoint.evaluate import exact_loss

    curve = rec["hyper_curve"] + [rec["final_hyperparameters"]]  # params after j epochs
    secs = np.concatenate([[0.0], np.cumsum(rec["seconds_curve"])])
    cache: dict[int, float] = {len(curve) - 1: rec["final_train_loss_common"]}
    stored = load_evals(evals_path)
    name, started = rec.get("_file", ""), rec.get("started", "")
    cache |= {j: v for (f, s, j), v in stored.items() if f == name and s == started}
    evaluated = []

    def loss(j: int) -> float:
        if j not in cache:
            h = curve[j]
            t0 = time.perf_counter()
            cache[j] = exact_loss(X, y, kernel="matern32", lengthscale=h["lengthscale"],
                                  outputscale=h["outputscale"], noise=h["noise"],
                                  mean=h["mean"])["loss"]
            evaluated.append(j)
            if evals_path is not None:  # kept at once: a Cholesky can take minutes
                with evals_path.open("a") as f:
                    f.write(json.dumps({"record": name, "record_started": started, "epoch": j,
                                        "loss": cache[j],
                                        "seconds": time.perf_counter() - t0,
                                        "commit": bu.git_commit()}) + "\n")
        return cache[j]

    hi = len(curve) - 1
    if loss(hi) > target:
        return {"time_to_quality_s": None, "epochs_to_quality": None, "evaluations": len(cache),
                "new_evaluations": len(evaluated), "time_to_quality_kind": None}
    if (rec.get("common_evaluator") or {}).get("method") == "slq":
        # no Cholesky fits: the final parameters reach the target, earlier ones are not scored
        return {"time_to_quality_s": float(secs[hi]), "epochs_to_quality": hi,
                "evaluations": len(cache), "new_evaluations": 0,
                "time_to_quality_kind": "upper bound"}
    lo = 0  # invariant: loss(hi) <= target, and loss(lo) > target (checked lazily)
    # Each evaluation is a float64 Cholesky (~minutes at n = 36 000), so first try the epoch the
    # run's own loss curve points to (shifted by its final offset from the exact loss) and its
    # predecessor (or successor): two evaluations when the guess is within one epoch, bisection
    # within the bracket if not.
    own = np.asarray(rec["loss_curve"], np.float64)
    if len(own) and rec.get("final_train_loss") is not None:
        shifted = own + (rec["final_train_loss_common"] - rec["final_train_loss"])
        below = np.nonzero(shifted <= target)[0]
        if len(below) and 0 < below[0] < hi:
            g = int(below[0])
            if loss(g) <= target:
                hi = g
                if loss(g - 1) > target:
                    lo = g - 1
                else:
                    hi = g - 1
            else:  # the own curve is a little optimistic as a rule: try the next epoch
                lo = g
                if g + 1 < hi:
                    if loss(g + 1) <= target:
                        hi = g + 1
                    else:
                        lo = g + 1
    if lo == 0 and loss(lo) <= target:
        hi = 0
    # Within the bracket, step to where the exact losses at its two ends, joined by a line,
    # cross the target (regula falsi: the loss falls smoothly along a run, so this lands near
    # the crossing); after two steps that moved the same end, bisect once, since a convex
    # stretch makes the line overshoot from one side every time.
    last = same = 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if same < 2 and lo in cache and cache[lo] > cache[hi]:
            f = (cache[lo] - target) / (cache[lo] - cache[hi])
            mid = min(max(lo + int(round(f * (hi - lo))), lo + 1), hi - 1)
        else:
            same = 0
        side = 1 if loss(mid) <= target else -1
        if side == 1:
            hi = mid
        else:
            lo = mid
        same = same + 1 if side == last else 1
        last = side
    return {"time_to_quality_s": float(secs[hi]), "epochs_to_quality": hi,
            "evaluations": len(cache), "new_evaluations": len(evaluated),
            "time_to_quality_kind": "exact"}


def peer_passes(g: dict, fallback):
    """GPyTorch's median passes per epoch as counted in its own run, else ``fallback``."""
    counted = [c for c in g.get("passes_curve") or [] if c is not None]
    return float(np.median(counted)) if counted else fallback


def gpytorch_passes(path: Path) -> dict:
    """{(dataset, backend): passes per epoch} from scripts/count_gpytorch_passes.py."""
    if not path.exists():
        return {}
    with path.open() as f:
        return {(r["dataset"], r["backend"]): float(r["passes_per_epoch"])
                for r in csv.DictReader(f)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", default=str(bu.ROOT / "results" / "uci"))
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--gpytorch-passes", default=str(GPT_PASSES))
    ap.add_argument("--evals", default=None,
                    help="JSON-lines store of exact-loss evaluations, read and appended "
                         "(default: exact_evals.jsonl in --records)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    evals = Path(args.evals) if args.evals else Path(args.records) / "exact_evals.jsonl"
    recs = [json.loads(p.read_text()) | {"_file": p.name}
            for p in sorted(Path(args.records).glob("*.json"))]
    recs = [r for r in recs if r.get("status") == "ok"]
    # the peer of a gpadjoint run: GPyTorch on the same data set, split and backend, its longest
    # run (time to quality asks when gpadjoint reaches the loss GPyTorch ends with; gpadjoint
    # may run more epochs than GPyTorch for that)
    peers: dict[tuple, dict] = {}
    for r in recs:
        k = (r["dataset"], r["split"], r["backend"])
        if r["method"] == "gpytorch" and r["epochs"] >= peers.get(k, {"epochs": -1})["epochs"]:
            peers[k] = r
    gpt_passes = gpytorch_passes(Path(args.gpytorch_passes))
    # rows are kept while their record is unchanged (same file and start time); a rerun record
    # replaces its row, and rows whose records are gone are dropped
    old = []
    if out.exists():
        with out.open() as f:
            old = list(csv.DictReader(f))
    by_key = {tuple(r[k] for k in KEY): r for r in old}
    rows = []
    from gpadjoint.datasets import load_dataset

    for r in recs:
        if r["method"] == "gpytorch":
            continue
        peer_backend = PEER_BACKEND[r["backend"]]
        key = (r["dataset"], r["split"], peer_backend)
        if key not in peers:
            continue
        g = peers[key]
        row_key = tuple(str(v) for v in (r["dataset"], r["split"], r["method"], r["backend"],
                                         r["epochs"]))
        prev = by_key.get(row_key)
        if (prev and prev.get("status") == "ok" and prev.get("record_started") == r["started"]
                and prev.get("gpytorch_record_started") == g["started"]):
            print(f"keep (unchanged): {r['_file']}")
            rows.append(prev | {"gpytorch_passes_per_epoch":
                                peer_passes(g, gpt_passes.get((r["dataset"], peer_backend), ""))})
            continue
        s = load_dataset(r["dataset"], r["split"], scale_y=False)
        print(f"row: {r['_file']} vs {g['_file']}", flush=True)
        tq = time_to_quality(r, g["final_train_loss_common"], s.X_train, s.y_train,
                             evals)
        p, pmin = passes(r)
        row = {
            "dataset": r["dataset"], "split": r["split"], "method": r["method"],
            "backend": r["backend"], "epochs": r["epochs"], "gpytorch_backend": peer_backend,
            "gpytorch_epochs": g["epochs"],
            "status": "ok", "seconds_per_epoch": r["seconds_per_epoch"],
            "gpytorch_seconds_per_epoch": g["seconds_per_epoch"],
            "seconds_per_epoch_ratio": r["seconds_per_epoch"] / g["seconds_per_epoch"],
            "passes_per_epoch": p, "passes_min_design": pmin,
            "gpytorch_passes_per_epoch": peer_passes(
                g, gpt_passes.get((r["dataset"], peer_backend), "")),
            "peak_rss_mib": r.get("peak_rss_mib"), "gpytorch_peak_rss_mib": g.get("peak_rss_mib"),
            "final_loss_common": r["final_train_loss_common"],
            "gpytorch_final_loss_common": g["final_train_loss_common"],
            "gpytorch_train_s": sum(g["seconds_curve"]),
            "test_rmse": r["test_rmse"], "gpytorch_test_rmse": g["test_rmse"],
            "load_avg": max(r["load_avg_before"][0], r["load_avg_after"][0]),
            "gpytorch_load_avg": max(g["load_avg_before"][0], g["load_avg_after"][0]),
            "record": r["_file"], "gpytorch_record": g["_file"],
            "record_started": r["started"], "gpytorch_record_started": g["started"],
            "machine": r.get("machine"), "commit": bu.git_commit(), **tq,
        }
        if tq["time_to_quality_s"] is not None:
            row["time_to_quality_ratio"] = tq["time_to_quality_s"] / row["gpytorch_train_s"]
        rows.append(row)
        # checkpoint: the rows so far, and the old rows not yet revisited
        seen = {tuple(str(x[k]) for k in KEY) for x in rows}
        _write(out, rows + [o for o in old if tuple(o[k] for k in KEY) not in seen])
        print(f"  -> s/epoch ratio {row['seconds_per_epoch_ratio']:.3f}, time-to-quality "
              f"ratio {row.get('time_to_quality_ratio')}", flush=True)
    _write(out, rows)
    return 0


def _write(path: Path, rows: list[dict]) -> None:
    rows = sorted(rows, key=lambda r: tuple(str(r[k]) for k in KEY))
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
