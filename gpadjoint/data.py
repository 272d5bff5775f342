"""Data stage: standardised train/test splits, and the user's own data as one.

Data flow: **data** -> kernels -> matvec -> lanczos -> logdet/solve -> mll.

Every loader returns a :class:`Split`: inputs standardised with the *training* mean and std
(constant columns get std 1), targets centred on the training mean (and divided by the training
std only with ``scale_y=True``).  ``Split.unscale_y`` maps predictions back to the original units,
in which RMSE and NLL are reported. :func:`from_arrays` and :func:`load_csv` make one from the
user's arrays or CSV file; the benchmark data sets (registry, shipped files, downloads) are
:mod:`gpadjoint.datasets`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

# --------------------------------------------------------------------------------------------
# Split


@dataclass(frozen=True, eq=False)
class Split:
    """One train/test split in normalised units.

    ``X_* = (X_raw - x_mean) / x_std``, shapes (n_train, d) and (n_test, d);
    ``y_* = (y_raw - y_mean) / y_std``, shapes (n_train,) and (n_test,).
    ``x_mean``, ``x_std``: float64, shape (d,); ``y_mean``, ``y_std``: floats (``y_std`` is 1.0
    unless the split was made with ``scale_y=True``).  All statistics come from the training rows.
    """

    name: str
    split: int
    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    x_mean: np.ndarray
    x_std: np.ndarray
    y_mean: float
    y_std: float

    @property
    def n_train(self) -> int:
        """Number of training rows."""
        return self.X_train.shape[0]

    @property
    def n_test(self) -> int:
        """Number of test rows."""
        return self.X_test.shape[0]

    @property
    def d(self) -> int:
        """Number of input features."""
        return self.X_train.shape[1]

    def unscale_y(self, y):
        """Targets or predictive means, any shape: normalised -> original units."""
        return y * self.y_std + self.y_mean

    def unscale_y_std(self, s):
        """Predictive standard deviations: normalised -> original units (no shift)."""
        return s * self.y_std

    def unscale_y_var(self, v):
        """Predictive variances: normalised -> original units squared."""
        return v * self.y_std**2

    def scale_X(self, X):
        """Normalise new raw inputs (m, d) with this split's training statistics."""
        return ((X - self.x_mean) / self.x_std).astype(self.X_train.dtype)

    def unscale_X(self, X):
        """Normalised inputs (m, d) -> original units."""
        return X * self.x_std + self.x_mean

    def __repr__(self) -> str:
        return (f"Split({self.name!r}, split={self.split}, n_train={self.n_train}, "
                f"n_test={self.n_test}, d={self.d}, dtype={self.X_train.dtype}, "
                f"y_mean={self.y_mean:.4g}, y_std={self.y_std:.4g})")


def normalisation(X_tr, y_tr, scale_y: bool):
    """Training statistics (x_mean (d,), x_std (d,), y_mean, y_std); constant columns get std 1.

    y_std is 1 unless ``scale_y`` (and y is not constant).
    """
    x_mean = X_tr.mean(axis=0)
    x_std = X_tr.std(axis=0)
    # Exact constancy test, not std == 0: the std of a constant column can come out as ~1e-21
    # from rounding in the mean (keggdirected split 2, column 7), and dividing by it would blow
    # a differing test value up to ~1e20.
    const = X_tr.max(axis=0) == X_tr.min(axis=0)
    x_mean[const] = X_tr[0, const]
    x_std[const] = 1.0
    y_mean = float(y_tr.mean())
    y_std = float(y_tr.std()) if scale_y and np.ptp(y_tr) > 0 else 1.0
    return x_mean, x_std, y_mean, y_std


def hyperparameters_in_data_units(h: dict, x_std, y_mean: float, y_std: float) -> dict:
    """Map hyperparameters fitted on standardised data to the data's original units.

    ``h``: lengthscale (d,), outputscale, noise, mean for inputs ``(X - x_mean) / x_std`` and
    targets ``(y - y_mean) / y_std``. A lengthscale scales with x_std, the variances with
    y_std**2, the constant mean as y does. :func:`hyperparameters_in_split_units` inverts it.
    """
    return {
        "lengthscale": np.asarray(h["lengthscale"], np.float64) * np.asarray(x_std, np.float64),
        "outputscale": float(h["outputscale"]) * y_std**2,
        "noise": float(h["noise"]) * y_std**2,
        "mean": float(h["mean"]) * y_std + y_mean,
    }


def hyperparameters_in_split_units(h: dict, split: Split) -> dict:
    """Map original-unit hyperparameters (a run record's) to ``split``'s standardised units."""
    ys = float(split.y_std)
    return {
        "lengthscale": (np.asarray(h["lengthscale"], np.float64)
                        / np.asarray(split.x_std, np.float64)).tolist(),
        "outputscale": float(h["outputscale"]) / ys**2,
        "noise": float(h["noise"]) / ys**2,
        "mean": (float(h["mean"]) - float(split.y_mean)) / ys,
    }

def standardise(X, y, train, test, name, split, scale_y, dtype) -> Split:
    """Normalise with training statistics; ``train``/``test`` are row-index arrays into X, y."""
    X_tr, y_tr = X[train], y[train]
    x_mean, x_std, y_mean, y_std = normalisation(X_tr, y_tr, scale_y)

    def norm_x(rows):
        return ((X[rows] - x_mean) / x_std).astype(dtype)

    def norm_y(rows):
        return ((y[rows] - y_mean) / y_std).astype(dtype)

    return Split(name, split, norm_x(train), norm_y(train), norm_x(test), norm_y(test),
                 x_mean, x_std, y_mean, y_std)



# --------------------------------------------------------------------------------------------
# User data


def _check_finite(A: np.ndarray, what: str, columns=None) -> None:
    bad = ~np.isfinite(A)
    if bad.any():
        A2 = bad.reshape(len(A), -1)
        rows = np.flatnonzero(A2.any(axis=1))
        cols = np.flatnonzero(A2.any(axis=0))
        col_names = [columns[c] for c in cols] if columns is not None else cols.tolist()
        more = f" (first 10 of {len(rows)})" if len(rows) > 10 else ""
        raise ValueError(
            f"{what} has {int(bad.sum())} NaN/inf value(s) in rows {rows[:10].tolist()}{more}"
            f"{'' if A.ndim == 1 else f', columns {col_names}'} (0-based); drop or impute them.")


def _as_xy(X, y, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert one (X, y) pair to float64 arrays of shapes (n, d) and (n,)."""
    X, y = np.asarray(X), np.asarray(y)
    for arr, label in ((X, "X"), (y, "y")):
        if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
            raise TypeError(f"{label}{what} must be numeric, got dtype {arr.dtype}")
    if X.ndim != 2:
        hint = " (for a single feature use X.reshape(-1, 1))" if X.ndim == 1 else ""
        raise ValueError(f"X{what} must be 2-D (n, d); got shape {X.shape}{hint}")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise ValueError(f"y{what} must be 1-D (n,) or (n, 1); got shape {y.shape}")
    if X.shape[0] == 0:
        raise ValueError(f"X{what} is empty (0 rows)")
    if X.shape[1] == 0:
        raise ValueError(f"X{what} has zero features (shape {X.shape})")
    if X.shape[0] != y.shape[0]:
        raise ValueError(f"X{what} has {X.shape[0]} rows but y{what} has {y.shape[0]}")
    X, y = X.astype(np.float64), y.astype(np.float64)
    _check_finite(X, f"X{what}")
    _check_finite(y, f"y{what}")
    return X, y


def from_arrays(X, y, *, X_test=None, y_test=None, test_fraction: float | None = None,
                seed: int = 0, scale_y: bool = False, dtype=np.float64,
                name: str = "user") -> Split:
    """Make a :class:`Split` from user arrays X (n, d) and y (n,), in any units.

    Give either an explicit test set (``X_test``, ``y_test``), or ``test_fraction`` to hold out
    a random ``round(test_fraction * n)`` rows (``np.random.default_rng(seed)``), or neither to
    train on everything (empty test set).  For prediction at new inputs use ``Split.scale_X``.
    """
    X, y = _as_xy(X, y, "")
    if (X_test is None) != (y_test is None):
        raise ValueError("give both X_test and y_test, or neither")
    if X_test is not None and test_fraction is not None:
        raise ValueError("give either X_test/y_test or test_fraction, not both")
    if X_test is not None:
        Xt, yt = _as_xy(X_test, y_test, "_test")
        if Xt.shape[1] != X.shape[1]:
            raise ValueError(f"X_test has {Xt.shape[1]} features but X has {X.shape[1]}")
        n = len(X)
        X, y = np.concatenate([X, Xt]), np.concatenate([y, yt])
        train, test = np.arange(n), np.arange(n, len(X))
    elif test_fraction is not None:
        if not 0 < test_fraction < 1:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        n_test = max(1, round(test_fraction * len(X)))
        perm = np.random.default_rng(seed).permutation(len(X))
        test, train = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    else:
        train, test = np.arange(len(X)), np.arange(0)
    if len(train) < 2:
        raise ValueError(f"need at least 2 training points to standardise, got {len(train)} "
                         f"(n={len(X)}, test rows={len(test)})")
    return standardise(X, y, train, test, name, 0, scale_y, dtype)


def load_csv(path, target: str, *, features=None, test_fraction: float | None = 0.1,
             seed: int = 0, scale_y: bool = False, dtype=np.float64, **read_csv_kwargs) -> Split:
    """Read a CSV with a header row and return a :class:`Split` (see :func:`from_arrays`).

    ``target`` names the target column; ``features`` (default: all other columns) the inputs.
    Extra keyword arguments go to :func:`pandas.read_csv` (e.g. ``sep=";"``).
    """
    path = Path(path)
    try:
        df = pd.read_csv(path, **read_csv_kwargs)
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path} is empty (no header, no rows)") from None
    if target not in df.columns:
        raise ValueError(f"target column {target!r} not in {path}; columns present: "
                         f"{list(df.columns)}")
    features = [c for c in df.columns if c != target] if features is None else list(features)
    absent = [c for c in features if c not in df.columns]
    if absent:
        raise ValueError(f"feature columns {absent} not in {path}; columns present: "
                         f"{list(df.columns)}")
    if not features:
        raise ValueError(f"{path} has no feature columns besides the target {target!r}")
    if len(df) == 0:  # before the dtype check: the columns of a header-only file read as text
        raise ValueError(f"{path} has a header but no data rows")
    non_numeric = [c for c in [*features, target] if not pd.api.types.is_numeric_dtype(df[c])]
    if non_numeric:
        raise ValueError(f"non-numeric column(s) in {path}: {non_numeric}; encode or drop them")
    X = df[features].to_numpy(dtype=np.float64)
    y = df[target].to_numpy(dtype=np.float64)
    _check_finite(X, f"{path.name} features", features)  # report column names, not numbers
    _check_finite(y, f"{path.name} target {target!r}")
    return from_arrays(X, y, test_fraction=test_fraction, seed=seed, scale_y=scale_y,
                       dtype=dtype, name=path.stem)
