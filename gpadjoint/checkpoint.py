"""Checkpoints of a training run: atomic, resumable, refused when the run differs.

Data flow: mll -> **checkpoint** -> train. A checkpoint is one ``.npz`` (no pickle) holding a
:class:`gpadjoint.train.TrainState` (any NamedTuple of that layout), the history so far and a
fingerprint of the run (:func:`run_fingerprint`: data hash, kernel, backend, estimator
settings, seed, optimiser-state layout and the caller's settings). :func:`load_checkpoint`
refuses a file whose fingerprint differs and names each differing field, and a damaged or
foreign file with one :class:`~gpadjoint._io.ReadError` naming it and what to do.

The subset start (:func:`gpadjoint.start.subset_start`) has its own file beside the run's
checkpoint (:func:`start_path`: ``<checkpoint>.start``), written after each finished rung of
its ladder and when its metric is computed, with the same discipline: one atomic ``.npz``, a
fingerprint a resume must match (:func:`save_start`, :func:`load_start`).
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ._io import ReadError, atomic_write, read_npz

CHECKPOINT_FORMAT = "gpadjoint-checkpoint-v1"
START_FORMAT = "gpadjoint-start-v1"


def run_fingerprint(X, y, kernel, backend, mll_config, seed, state, settings) -> dict:
    """Return what a resumed run must match: data hash, settings, state layout (as JSON)."""
    fp = {
        "n": int(X.shape[0]),
        "d": int(X.shape[1]),
        "dtype": str(X.dtype),
        "data_sha256": data_sha256(X, y),
        "kernel": kernel,
        "backend": backend.name,
        "mll_config": asdict(mll_config),
        "seed": int(seed),
        "warm_start": state.last_alpha is not None,
        "opt_state": [
            [list(np.shape(a)), str(np.asarray(a).dtype)] for a in jax.tree.leaves(state.opt_state)
        ],
        "settings": None if settings is None else dict(settings),
    }
    if getattr(backend, "precision", "full") != "full":  # full: as before the key existed
        fp["precision"] = backend.precision
    return json.loads(json.dumps(fp))  # normalise (tuples -> lists) as it will be read back


def save_checkpoint(path, state: NamedTuple, history: list[dict], fingerprint: dict,
                    stopped_reason: str = "") -> None:
    """Write ``state``, ``history`` and ``fingerprint`` to ``path`` atomically (npz, no pickle).

    The file is written under a temporary name in the same folder, fsync'ed and renamed over
    ``path``, so a crash leaves either the old or the new checkpoint, never a torn one.
    """
    path = Path(path)
    key = state.key
    typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    arrays = {
        "format": np.asarray(CHECKPOINT_FORMAT),
        "fingerprint": np.asarray(json.dumps(fingerprint)),
        "history": np.asarray(json.dumps(history)),
        "stopped_reason": np.asarray(stopped_reason),
        "epoch": np.asarray(state.epoch),
        "key": np.asarray(jax.random.key_data(key) if typed else key),
        "key_impl": np.asarray(str(jax.random.key_impl(key)) if typed else ""),
    }
    for i, a in enumerate(jax.tree.leaves(state.params)):
        arrays[f"params_{i}"] = np.asarray(a)
    for i, a in enumerate(jax.tree.leaves(state.opt_state)):
        arrays[f"opt_{i}"] = np.asarray(a)
    if state.last_alpha is not None:
        arrays["last_alpha"] = np.asarray(state.last_alpha)
    atomic_write(path, lambda fh: np.savez(fh, **arrays), what="checkpoint")


_FIX = ("delete it (or pass another checkpoint path) and start afresh without resuming")


def _open(path: Path, fmt: str, kind: str, fix: str) -> dict:
    """Return the arrays of a file we wrote as ``kind``, its format tag checked (else ReadError)."""
    if not path.is_file():
        raise FileNotFoundError(f"resume: no {kind} at {path}")
    try:
        data = read_npz(path)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError) as e:
        raise ReadError(f"{path} is not a readable gpadjoint {kind} (damaged, or another "
                        f"kind of file: {e}); {fix}") from None
    if "format" not in data or str(data["format"]) != fmt:
        raise ReadError(f"{path} is not a {fmt} file (no such format tag); {fix}")
    return data


def _read(path: Path) -> dict:
    """All arrays of a checkpoint file, after checking it is one (else ReadError)."""
    data = _open(path, CHECKPOINT_FORMAT, "checkpoint", _FIX)
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise ReadError(f"{path} lacks the checkpoint entries {', '.join(missing)}; {_FIX}")
    try:
        for k in ("fingerprint", "history"):
            data[k] = json.loads(str(data[k]))
        data["epoch"] = int(data["epoch"])
        if not isinstance(data["fingerprint"], dict) or not isinstance(data["history"], list):
            raise ValueError("fingerprint or history of the wrong type")
    except (ValueError, TypeError) as e:
        raise ReadError(f"{path}: damaged checkpoint metadata ({e}); {_FIX}") from None
    return data


_REQUIRED = ("fingerprint", "history", "stopped_reason", "epoch", "key", "key_impl")


def checkpoint_epoch(path) -> int:
    """Return the epoch a checkpoint file holds (checking that it is a readable one)."""
    return _read(Path(path))["epoch"]


def load_checkpoint(path, template: NamedTuple, fingerprint: dict | None = None):
    """Read a checkpoint into the structure of ``template`` -> ``(state, history)``.

    Raises FileNotFoundError if absent, :class:`~gpadjoint._io.ReadError` (a ValueError) if
    the file is damaged or not a gpadjoint checkpoint, ValueError if its fingerprint differs
    from ``fingerprint`` (each differing field is named) or if its arrays do not fit the
    template.
    """
    path = Path(path)
    data = _read(path)
    stored = data["fingerprint"]
    if fingerprint is not None and stored != fingerprint:
        diffs = [
            f"{k}: checkpoint {_short(stored.get(k))} vs now {_short(fingerprint.get(k))}"
            for k in sorted(set(stored) | set(fingerprint))
            if stored.get(k) != fingerprint.get(k)
        ]
        raise ValueError(
            f"checkpoint {path} was written for a different run and cannot be resumed: "
            + "; ".join(diffs)
            + ". Use the same data and settings, or resume=False (or another checkpoint path) "
            "to start afresh."
        )

    def restore(prefix, tree):
        leaves, treedef = jax.tree.flatten(tree)
        out = []
        for i, ref in enumerate(leaves):
            k = f"{prefix}_{i}"
            if k not in data:
                raise ValueError(f"{path}: missing {k}; the checkpoint does not fit this run")
            a = data[k]
            if a.shape != np.shape(ref) or a.dtype != np.asarray(ref).dtype:
                raise ValueError(
                    f"{path}: {k} has shape {a.shape} {a.dtype}, expected "
                    f"{np.shape(ref)} {np.asarray(ref).dtype}"
                )
            out.append(jnp.asarray(a))
        if f"{prefix}_{len(leaves)}" in data:
            raise ValueError(f"{path}: more {prefix} arrays than this run has")
        return jax.tree.unflatten(treedef, out)

    key = jnp.asarray(data["key"])
    impl = str(data["key_impl"])
    if impl:
        key = jax.random.wrap_key_data(key, impl=impl)
    last_alpha = None
    if template.last_alpha is not None:
        if "last_alpha" not in data:
            raise ValueError(f"{path}: no CG warm start stored, but warm_start is on")
        last_alpha = jnp.asarray(data["last_alpha"], template.last_alpha.dtype)
    state = template._replace(
        params=restore("params", template.params),
        opt_state=restore("opt", template.opt_state),
        epoch=jnp.asarray(data["epoch"], template.epoch.dtype),
        key=key,
        last_alpha=last_alpha,
    )
    return state, data["history"]


def _short(v, limit=80) -> str:
    s = json.dumps(v)
    return s if len(s) <= limit else s[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------
# The subset start's checkpoint


def start_path(checkpoint) -> Path | None:
    """Return the subset start's checkpoint beside the run's ``checkpoint`` (None for None)."""
    if checkpoint is None:
        return None
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.name + ".start")


def data_sha256(X, y) -> str:
    """Return the SHA-256 of the bytes of ``X`` and ``y`` (C order), as run fingerprints use."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(np.asarray(X)).tobytes())
    h.update(np.ascontiguousarray(np.asarray(y)).tobytes())
    return h.hexdigest()


def save_start(path, params, info: dict, fingerprint: dict) -> None:
    """Write the subset start so far atomically: float64 ``params``, ``info`` and fingerprint.

    ``info`` is JSON (its finished stages, and the metric once computed).
    """
    arrays = {
        "format": np.asarray(START_FORMAT),
        "fingerprint": np.asarray(json.dumps(fingerprint)),
        "info": np.asarray(json.dumps(info)),
    }
    for i, a in enumerate(jax.tree.leaves(params)):
        arrays[f"params_{i}"] = np.asarray(a, np.float64)
    atomic_write(Path(path), lambda fh: np.savez(fh, **arrays), what="subset start checkpoint")


_START_FIX = ("delete it (and the run's checkpoint beside it) and start afresh without resuming")


def read_start(path) -> tuple[list[np.ndarray], dict, dict]:
    """Return ``(params leaves, info, fingerprint)`` of a start file (ReadError if damaged)."""
    path = Path(path)
    data = _open(path, START_FORMAT, "subset start checkpoint", _START_FIX)
    try:
        info, fp = json.loads(str(data["info"])), json.loads(str(data["fingerprint"]))
        leaves = [data[f"params_{i}"]
                  for i in range(sum(k.startswith("params_") for k in data))]
        if not isinstance(info, dict) or not isinstance(fp, dict):
            raise ValueError("info or fingerprint of the wrong type")
    except (ValueError, TypeError, KeyError) as e:
        raise ReadError(f"{path}: damaged subset start checkpoint ({e}); {_START_FIX}") from None
    return leaves, info, fp


def load_start(path, template, fingerprint: dict) -> tuple[object, dict]:
    """Read a start file into the structure of ``template`` (Params) -> ``(params, info)``.

    Raises FileNotFoundError if absent, ReadError if damaged or foreign, ValueError naming each
    differing field if it was written for another run.
    """
    leaves, info, stored = read_start(path)
    if stored != fingerprint:
        diffs = [f"{k}: checkpoint {_short(stored.get(k))} vs now {_short(fingerprint.get(k))}"
                 for k in sorted(set(stored) | set(fingerprint))
                 if stored.get(k) != fingerprint.get(k)]
        raise ValueError(
            f"subset start checkpoint {path} was written for a different run and cannot be "
            "resumed: " + "; ".join(diffs) + ". Use the same data and settings, or run without "
            "resuming (or with another checkpoint path) to start afresh.")
    ref = jax.tree.leaves(template)
    if [np.shape(a) for a in leaves] != [np.shape(r) for r in ref]:
        raise ValueError(f"{path}: its parameters do not fit this run; {_START_FIX}")
    treedef = jax.tree.structure(template)
    return jax.tree.unflatten(treedef, [jnp.asarray(a, jnp.float64) for a in leaves]), info


def add_to_start(path, extra: dict) -> None:
    """Rewrite the start file at ``path`` with ``extra`` merged into its info (atomically)."""
    leaves, info, fp = read_start(path)
    save_start(path, leaves, info | extra, fp)
