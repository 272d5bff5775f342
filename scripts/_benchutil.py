"""The benchmark harness: provenance, records, child runs, settings, units and scores.

What every benchmark script shares, written once: the provenance columns of a row or record
(commit, machine, versions, load), JSON records and resumable CSV rows (read, write, upsert),
child runs (:func:`run_child`: a fresh process per configuration, with a timeout), the settings
a gpadjoint run resolved (:func:`run_settings`), a config as TOML (:func:`config_toml`), the
unit conversion of a record's hyperparameters (:func:`split_units`) and the test scores
(:func:`predictive_scores`). ``scripts/bench.py`` is the one entry point.

Each configuration runs in a fresh child process so that its peak resident memory
(``ru_maxrss``) belongs to that configuration alone, and so a crash or an out-of-memory kill
loses one row, not the batch. Rows already in the CSV are skipped: a stopped batch resumes.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import jax
import numpy as np

from gpadjoint import provenance

# The benchmarks are programs, so they take the package's one-line opt-in to float64 for the
# whole process (importing gpadjoint no longer does it; every array carries its dtype).
jax.config.update("jax_enable_x64", True)

ROOT = provenance.REPO


def git_commit() -> str:
    """Short commit of the checkout (``+dirty`` when tracked files changed)."""
    return provenance.commit(short=True)


def machine() -> str:
    return provenance.machine_line()


def versions() -> dict:
    """Versions of Python, the numerical stack and the GPyTorch peer, as far as installed."""
    return provenance.versions(
        ("jax", "jaxlib", "pykeops", "numpy", "optax") + provenance.PEERS, keep_missing=False)


def provenance_columns() -> dict:
    """Return the commit, machine and versions (JSON) columns of a benchmark CSV row."""
    return {"commit": git_commit(), "machine": machine(), "versions": json.dumps(versions())}


def done_keys(path: Path, key_fields: list[str]) -> set[tuple]:
    """Keys of rows that finished (ok or deliberately skipped); failed rows are retried."""
    if not path.exists():
        return set()
    with open(path) as fh:
        return {
            tuple(row[k] for k in key_fields)
            for row in csv.DictReader(fh)
            if row.get("status") == "ok" or str(row.get("status", "")).startswith("skipped")
        }


def append_row(path: Path, row: dict, fields: list[str]) -> None:
    new = not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow(row)
        fh.flush()
        os.fsync(fh.fileno())


def replace_rows(path: Path, rows: list[dict], fields: list[str], replaced) -> None:
    """Rewrite the CSV at ``path``: its rows for which ``replaced(row)`` is false, then ``rows``."""
    old = []
    if path.exists():
        with path.open() as f:
            old = [r for r in csv.DictReader(f) if not replaced(r)]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(old + rows)


def upsert_row(path: Path, row: dict, fields: list[str], key_fields: list[str]) -> None:
    """Write ``row`` to the CSV at ``path``, replacing any row with the same key (a re-measure)."""
    key = tuple(str(row[k]) for k in key_fields)
    replace_rows(path, [row], fields, lambda r: tuple(r[k] for k in key_fields) == key)


def run_child(script: Path, spec: dict, timeout: float, env: dict | None = None) -> dict:
    """Run ``script --child JSON`` in a fresh process; return its last JSON line plus peak RSS.

    ``env``: the child's environment (default: this process's), e.g. with XLA_FLAGS set.
    """
    t0 = time.time()
    try:
        proc = subprocess.run(
            [sys.executable, str(script), "--child", json.dumps(spec)],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return {"status": f"timeout>{timeout:.0f}s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or "").strip().splitlines()[-1:] or ["?"]
        return {"status": f"failed rc={proc.returncode}: {tail[0][:160]}"}
    out = json.loads(lines[-1])
    out.setdefault("status", "ok")
    out["child_wall_s"] = round(time.time() - t0, 2)
    return out


def peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def time_calls(f, args: tuple, reps: int) -> dict:
    """Time ``f(*args)`` (a jitted JAX function): one warm-up call (compile), then ``reps``.

    Returns seconds_median, seconds_min, reps and this process's peak RSS (MiB) so far.
    """
    import jax
    import numpy as np

    jax.block_until_ready(f(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t0)
    return {
        "seconds_median": float(np.median(times)),
        "seconds_min": float(np.min(times)),
        "reps": len(times),
        "peak_rss_mib": round(peak_rss_mib(), 1),
    }


# --- shared by bench_uci, the GPyTorch baseline and the scripts built on them ----------------


def seed_for(split: int) -> int:
    """Return split + 1: the paper averages seeds 1-3 (initial values and probes)."""
    return split + 1


def load_split(ds: str, split: int):
    """Split ``split`` of data set ``ds`` in the benchmarks' units: z-scored X, centred y."""
    from gpadjoint.datasets import load_dataset

    return load_dataset(ds, split, scale_y=False)


def initial_raw(d: int, seed: int) -> dict:
    """Return the paper's raw N(0, 1) start for ``seed`` as plain floats (for any framework)."""
    import jax.numpy as jnp

    from gpadjoint.start import initial_params

    p = initial_params("normal", d, jnp.float32, seed)
    return {
        "raw_lengthscale": np.asarray(p.raw_lengthscale, np.float64).tolist(),
        "raw_outputscale": float(p.raw_outputscale),
        "raw_noise": float(p.raw_noise),
        "mean": float(p.mean),
    }


def split_units(hp: dict, split) -> dict:
    """Return a run record's hyperparameters (the data's units) in ``split``'s scaled units."""
    from gpadjoint.data import hyperparameters_in_split_units

    return hyperparameters_in_split_units(hp, split)


def predictive_scores(y_test, mean, var) -> tuple[float, float]:
    """Return test RMSE and mean Gaussian NLL of predictions ``mean``, ``var``."""
    from gpadjoint.predict import scores

    return scores(y_test, mean, var)


def save_progress(spec: dict, res: dict) -> None:
    """Write what a run has so far next to its record, so that a crash loses nothing."""
    if not spec.get("progress"):
        return
    from gpadjoint._io import atomic_write

    text = json.dumps(res, default=float)
    atomic_write(Path(spec["progress"]), lambda fh, t=text: fh.write(t), binary=False)


def load_avg() -> list[float]:
    """Return the 1, 5 and 15 minute load averages (empty where the OS has none)."""
    try:
        return list(os.getloadavg())
    except OSError:
        return []


def segments_path(ckpt: Path) -> Path:
    """Return the side file listing the process pieces of a checkpointed run."""
    return ckpt.parent / (ckpt.name + ".segments")  # not *.json: the records are globbed


def begin_segment(ckpt: Path | None, from_epoch: int) -> list[dict]:
    """Append this process's piece of a run (first epoch, start, load) to the checkpoint's list."""
    side = segments_path(ckpt) if ckpt is not None else None
    segs = (json.loads(side.read_text()) if side is not None and side.exists() and from_epoch > 0
            else [])
    segs.append({"from_epoch": from_epoch, "started": datetime.now(timezone.utc).isoformat(),
                 "load_avg": load_avg(), "commit": git_commit()})
    if side is not None:
        _write_json(side, segs)
    return segs


def sessions_path(ckpt: Path) -> Path:
    """Return the side file holding the wall-clock seconds of each process a run took."""
    return ckpt.parent / (ckpt.name + ".sessions")


def _write_json(path: Path, obj) -> None:
    from gpadjoint._io import atomic_write

    text = json.dumps(obj)
    atomic_write(path, lambda fh, t=text: fh.write(t), binary=False)


class SessionClock:
    """Wall-clock seconds of one process's share of a run, per stage, kept in a side file.

    A run longer than a working session is killed at the session's end and continues from its
    checkpoint in the next command; its record must still sum the time of every session.
    Each process appends one entry (start, load, commit, ``seconds`` per stage) to the side
    file ``sessions_path(ckpt)`` (none when ``ckpt`` is None) and a daemon thread writes the
    running totals every ``tick`` seconds, so that a killed process loses at most one tick.
    The file outlives a killed process and is removed with the checkpoint once the record is
    written; a process killed before its first checkpoint is kept in it too (its seconds were
    spent on this run). ``stage(name)`` starts a stage ("run": the method's fit and prediction;
    "common": the common evaluator); :meth:`stop` ends the last one.
    """

    def __init__(self, ckpt: Path | None, tick: float = 20.0):
        import threading

        self.side = sessions_path(Path(ckpt)) if ckpt is not None else None
        self.entries = (json.loads(self.side.read_text())
                        if self.side is not None and self.side.exists() else [])
        self.entries.append({"started": datetime.now(timezone.utc).isoformat(),
                             "load_avg": load_avg(), "commit": git_commit(), "seconds": {}})
        self.tick = tick
        self._name, self._t0 = None, None
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._update()
        if self.side is not None:
            threading.Thread(target=self._beat, daemon=True).start()

    def _update(self) -> None:
        with self._lock:
            if self._name is not None:
                now = time.perf_counter()
                sec = self.entries[-1]["seconds"]
                sec[self._name] = sec.get(self._name, 0.0) + now - self._t0
                self._t0 = now
            if self.side is not None:
                _write_json(self.side, self.entries)

    def _beat(self) -> None:
        while not self._done.wait(self.tick):
            self._update()

    def stage(self, name: str) -> None:
        """End the current stage (if any) and start ``name``."""
        self._update()
        with self._lock:
            self._name, self._t0 = name, time.perf_counter()

    def stop(self) -> list[dict]:
        """End the last stage; return every process's entry, this one last."""
        self._update()
        with self._lock:
            self._name = None
        self._done.set()
        return self.entries

    def earlier(self) -> dict:
        """Seconds per stage summed over the earlier processes (all entries but this one)."""
        out: dict = {}
        for e in self.entries[:-1]:
            for k, v in e["seconds"].items():
                out[k] = out.get(k, 0.0) + v
        return out


def evaluations_path(ckpt: Path) -> Path:
    """Return the side file of a run's per-evaluation log (JSON lines, beside its checkpoint)."""
    return ckpt.parent / (ckpt.name + ".evals.jsonl")  # not *.json: the records are globbed


class _JsonLines(logging.Handler):
    """Append each "gpadjoint" record that carries ``evaluation`` fields as one JSON line."""

    def __init__(self, path: Path):
        super().__init__(logging.DEBUG)
        self.path = path

    def emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, "evaluation", None)
        if fields is None:
            return
        line = json.dumps({"time": record.created, **fields}, default=float)
        with open(self.path, "a") as fh:  # opened per line: a killed process loses nothing
            fh.write(line + "\n")


def log_evaluations(path: Path) -> None:
    """Log every loss evaluation and preconditioner build of this process's fits to ``path``.

    The records are the DEBUG records of :mod:`gpadjoint.optimizers`; the file outlives a killed
    process, so that a run stopped inside an L-BFGS step still says what its time went to
    (:func:`evaluations_summary`).
    """
    log = logging.getLogger("gpadjoint")
    log.addHandler(_JsonLines(Path(path)))
    log.setLevel(logging.DEBUG)


def evaluations_summary(path: Path) -> dict | None:
    """Return what a run's evaluations cost, per training-set size n (None without a log).

    Per n (the subset start's stages and the full fit): ``evaluations``, ``seconds`` (their sum),
    the mean ``seconds_per_evaluation``, ``passes_per_evaluation`` and
    ``cg_iterations_per_evaluation``, the largest ``depth``, the ``last_loss`` and its CG
    residual; and the preconditioner builds (count and seconds). A run that ran out of time
    is bounded by these: evaluations x passes x seconds per pass. ``unfinished``: per n, the
    evaluation a kill cut short (its last reported CG iteration and residual, and the seconds
    it had run), from the CG progress records (:mod:`gpadjoint.fused`).
    """
    path = Path(path)
    if not path.exists():
        return None
    by_n: dict[int, dict] = {}
    builds = {"count": 0, "seconds": 0.0}
    pending: dict[int, dict] = {}  # CG progress of an evaluation not finished (yet)
    last = None  # when the last finished thing (evaluation, build) ended
    for line in path.read_text().splitlines():
        try:
            e = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
        if e.get("kind") == "cg_progress":
            started = pending.get(e["n"], {}).get("started", last)
            pending[e["n"]] = {"cg_iteration": e["iteration"], "residual": e["residual"],
                               "started": started, "wall": e["wall"]}
            continue
        last = e.get("time", last)
        if e.get("kind") == "precond":
            builds["count"] += 1
            builds["seconds"] += e["seconds"]
            continue
        pending.pop(int(e["n"]), None)
        s = by_n.setdefault(int(e["n"]), {"estimator": e["estimator"], "evaluations": 0,
                                         "seconds": 0.0, "passes": 0, "cg_iterations": 0,
                                         "depth": 0})
        s["evaluations"] += 1
        s["seconds"] += e["seconds"] + e.get("prepare_seconds", 0.0)
        s["passes"] += e["passes"]
        s["cg_iterations"] += e["cg_iterations"]
        s["depth"] = max(s["depth"], e["depth"])
        s["last_loss"], s["last_cg_residual"] = e["loss"], e["cg_residual"]
    for s in by_n.values():
        k = s["evaluations"]
        s["seconds_per_evaluation"] = s["seconds"] / k
        s["passes_per_evaluation"] = s.pop("passes") / k
        s["cg_iterations_per_evaluation"] = s.pop("cg_iterations") / k
    out = {"by_n": {str(n): by_n[n] for n in sorted(by_n)}, "precond_builds": builds}
    # the evaluation a kill cut short: how far its CG had got, and after how many seconds
    out["unfinished"] = {
        str(n): {"cg_iteration": p["cg_iteration"], "residual": p["residual"],
                 "seconds": None if p["started"] is None else p["wall"] - p["started"]}
        for n, p in sorted(pending.items())}
    return out


def run_cost(rec: dict) -> dict | None:
    """Return what a gpadjoint run's fit cost, from its per-step curves (None without steps).

    ``evaluations``: loss-and-gradient evaluations at all n (L-BFGS's line search included;
    one per epoch for Adam); ``passes_per_evaluation`` / ``cg_iterations_per_evaluation``:
    kernel passes over the n x n pairs and CG iterations, averaged over those evaluations;
    ``steps``: optimiser steps. What bounds a run's time is these three numbers times the
    seconds of one pass.
    """
    passes = [p for p in rec.get("passes_curve") or [] if p is not None]
    cg = [c for c in rec.get("cg_iterations_curve") or [] if c is not None]
    if not passes:
        return None
    ev = [e if e is not None else 1 for e in rec.get("evaluations_curve") or [None] * len(passes)]
    n_ev = sum(ev)
    return {"steps": len(passes), "evaluations": n_ev,
            "passes_per_evaluation": sum(passes) / n_ev,
            "cg_iterations_per_evaluation": sum(cg) / n_ev if cg else None}


# --- records --------------------------------------------------------------------------------


def write_record(path: Path, rec: dict) -> None:
    """Write one JSON record atomically (a killed writer leaves the old file or none)."""
    from gpadjoint._io import atomic_write

    text = json.dumps(rec, indent=1, default=float)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda fh, t=text: fh.write(t), binary=False)


def read_records(folder: Path, ok_only: bool = True) -> list[dict]:
    """Return the JSON records in ``folder`` (only finished ones by default), with ``_file``."""
    recs = []
    for path in sorted(Path(folder).glob("*.json")):
        rec = json.loads(path.read_text())
        if not ok_only or rec.get("status") == "ok":
            recs.append(rec | {"_file": path.name})
    return recs


# --- the settings a run resolved -------------------------------------------------------------

# the optimiser keys that matter for each optimiser (the others are not read by it)
_OPTIM_KEYS = {
    "lbfgs": ("lbfgs_memory", "lbfgs_rtol", "lbfgs_gtol", "lbfgs_ptol"),
    "adam": ("lr", "schedule", "b1", "b2", "eps", "clip_norm", "warmup_epochs"),
    "adamw": ("lr", "schedule", "b1", "b2", "eps", "weight_decay", "clip_norm", "warmup_epochs"),
    "sgd": ("lr", "schedule", "momentum", "clip_norm", "warmup_epochs"),
}


def run_settings(config: dict, n: int, *, estimator: str | None = None,
                 optimizer: str | None = None) -> dict:
    """Return the settings a gpadjoint run used, flat: what its record and table must state.

    ``config``: the run's resolved :class:`gpadjoint.config.RunConfig` as a dict (``to_dict``);
    ``n``: training rows. ``estimator`` / ``optimizer``: what the fitted model resolved "auto"
    to (``GPRegressor.estimator_`` / ``optimizer_``); when not given (a record written before
    they were recorded) they are resolved here by the package's own rules, which are
    deterministic in the config and n. A key absent from an older config is absent here.
    """
    from types import SimpleNamespace

    from gpadjoint.mll import choose_estimator
    from gpadjoint.optimizers import resolve_optimizer

    model, mll, optim, train = (config.get(k, {}) for k in ("model", "mll", "optim", "train"))
    if estimator is None:  # configs before the exact estimator existed had SLQ only
        estimator = choose_estimator(n, SimpleNamespace(
            estimator=mll.get("estimator", "slq"), exact_max_n=mll.get("exact_max_n", 0)))[0]
    if optimizer is None:
        optimizer = resolve_optimizer(optim.get("optimizer", "adam"), estimator)[0]
    out = {
        "dtype": model.get("dtype"),
        # normalize_y since the scikit-learn names; older records' configs say scale_y
        "normalize_y": model.get("normalize_y", model.get("scale_y")),
        "optimizer": {"name": optimizer} | {k: optim[k] for k in _OPTIM_KEYS.get(optimizer, ())
                                             if k in optim},
        "estimator": estimator,
        "epochs": train.get("epochs"),
    }
    if estimator == "slq":
        out |= {k: mll[k] for k in ("num_probes", "lanczos_depth", "precond_rank",
                                     "precond_logdet", "cg_tol", "cg_min_iter", "cg_max_iter")
                if k in mll}
    out["start"] = {k: train[k] for k in ("init", "init_subset", "init_subset_max")
                    if k in train}
    out["full_fit"] = train.get("full_fit", "always")  # before the key: every run fitted all n
    return out


def config_toml(config: dict) -> str:
    """Return a :meth:`RunConfig.to_dict` dict as TOML text (every key is a scalar)."""

    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, float) and not math.isfinite(v):
            return ("-inf" if v < 0 else "inf") if not math.isnan(v) else "nan"
        if isinstance(v, (int, float, str)):
            return json.dumps(v)  # a JSON number or plain string is valid TOML
        raise TypeError(f"config_toml: {type(v).__name__} values are not supported ({v!r})")

    lines = []
    for section, keys in config.items():
        lines += [f"[{section}]"] + [f"{k} = {value(v)}" for k, v in keys.items()] + [""]
    return "\n".join(lines)
