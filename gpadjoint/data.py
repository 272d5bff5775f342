"""Data stage: UCI regression benchmarks and user data as standardised train/test splits.

Stage 0 of the pipeline (**data** -> kernels -> matvec -> lanczos -> logdet/solve -> mll).

Every loader returns a :class:`Split`: inputs standardised with the *training* mean and std
(constant columns get std 1), targets centred on the training mean (and divided by the training
std only with ``scale_y=True``).  ``Split.unscale_y`` maps predictions back to the original units,
in which RMSE and NLL are reported.

The shipped targets are those of the treforevans files, already transformed where the paper
(Krämer et al. 2024) transforms them: protein's is log(RMSD + 1) and keggundirected's is log(y),
both centred (``tests/test_data.py`` checks this from the values).  No loader transforms them again.

Shipped data live in ``<repo>/datasets`` (formats in its ``README.md``; every file's sha256 in
``MANIFEST.tsv`` is checked on first load in each process).  The five large treforevans sets are
not shipped; :func:`download_dataset` fetches them into ``$GPADJOINT_DATA`` (default
``~/.cache/gpadjoint``).
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import numbers
import os
import tempfile
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

REPO_DATA_DIR = Path(__file__).resolve().parent.parent / "datasets"
TREFOREVANS_COMMIT = "f0737523712fe66a1640e4b980b927e8490b58eb"
# Pinned to the commit the shipped files came from, so a download gives the same splits.
DEFAULT_BASE_URL = (
    f"https://raw.githubusercontent.com/treforevans/uci_datasets/{TREFOREVANS_COMMIT}/uci_datasets"
)
_SUMS_FILE = "SHA256SUMS"  # written next to downloaded files, checked on every later load


@dataclass(frozen=True)
class DatasetInfo:
    """Registry entry.  ``files`` maps file name -> sha256 (None where no hash is known)."""

    name: str
    n: int
    d: int
    shipped: bool
    kind: str  # "mask10": data.csv.gz + test_mask.csv.gz (n, 10); "index20": kin8nm index files
    files: Mapping[str, str | None]

    @property
    def n_splits(self) -> int:
        """Number of fixed train/test splits (10 CV folds, or 20 random 90/10 splits)."""
        return 20 if self.kind == "index20" else 10


# (name, n, d, shipped); n and d are the upstream numbers, checked against the files by the tests.
_TABLE = [
    ("airfoil", 1503, 5, True), ("bike", 17379, 17, True), ("concrete", 1030, 8, True),
    ("elevators", 16599, 18, True), ("energy", 768, 8, True), ("keggdirected", 48827, 20, True),
    ("keggundirected", 63608, 27, True), ("kin40k", 40000, 8, True), ("kin8nm", 8192, 8, True),
    ("parkinsons", 5875, 20, True), ("pol", 15000, 26, True), ("protein", 45730, 9, True),
    ("pumadyn32nm", 8192, 32, True), ("skillcraft", 3338, 19, True), ("sml", 4137, 26, True),
    ("tamielectric", 45781, 3, True), ("yacht", 308, 6, True),
    ("3droad", 434874, 3, False), ("slice", 53500, 385, False), ("buzz", 583250, 77, False),
    ("houseelectric", 2049280, 11, False), ("song", 515345, 90, False),
]


def _read_manifest(path: Path) -> dict[str, dict[str, str]]:
    """``MANIFEST.tsv`` as {dataset: {file: sha256}}; empty if the file is absent."""
    if not path.is_file():
        return {}
    table = pd.read_csv(path, sep="\t", dtype=str)
    out: dict[str, dict[str, str]] = {}
    for ds, fname, sha in zip(table["dataset"], table["file"], table["sha256"], strict=True):
        out.setdefault(ds, {})[fname] = sha
    return out


def _build_registry() -> dict[str, DatasetInfo]:
    manifest = _read_manifest(REPO_DATA_DIR / "MANIFEST.tsv")
    reg = {}
    for name, n, d, shipped in _TABLE:
        kind = "index20" if name == "kin8nm" else "mask10"
        if shipped:
            files = manifest.get(name, {})
        else:  # upstream splits song's data in two to stay under GitHub's 100 MB file limit
            extra = ("data1.csv.gz",) if name == "song" else ()
            files = dict.fromkeys(("data.csv.gz", *extra, "test_mask.csv.gz"))
        reg[name] = DatasetInfo(name, n, d, shipped, kind, files)
    return reg


DATASETS: dict[str, DatasetInfo] = _build_registry()


class ChecksumError(RuntimeError):
    """A data file's sha256 differs from the recorded one."""


def list_datasets() -> list[dict]:
    """One dict per registered data set: name, n, d, shipped, n_splits, available (found here)."""
    return [
        dict(name=i.name, n=i.n, d=i.d, shipped=i.shipped, n_splits=i.n_splits,
             available=bool(i.files) and all((_folder(i, None) / f).is_file() for f in i.files))
        for i in DATASETS.values()
    ]


def default_cache_dir() -> Path:
    """Where downloads go: ``$GPADJOINT_DATA`` if set, else ``~/.cache/gpadjoint``."""
    env = os.environ.get("GPADJOINT_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gpadjoint"


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


def _standardise(X, y, train, test, name, split, scale_y, dtype) -> Split:
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
# Benchmark data sets


def _info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        close = difflib.get_close_matches(str(name), DATASETS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"Unknown data set {name!r}.{hint} Known: {', '.join(DATASETS)}.")
    return DATASETS[name]


def _folder(info: DatasetInfo, data_dir) -> Path:
    if data_dir is not None:
        return Path(data_dir) / info.name
    return (REPO_DATA_DIR if info.shipped else default_cache_dir()) / info.name


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_VERIFIED: set[tuple] = set()  # (path, size, mtime_ns, sha256) already checked in this process


def _verify(path: Path, expected: str | None, fix: str) -> tuple:
    """Check one file's sha256 (once per process per file version); return its stat signature."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if expected is not None and (*key, expected) not in _VERIFIED:
        actual = _sha256(path)
        if actual != expected:
            raise ChecksumError(
                f"Checksum mismatch for {path}:\n  expected sha256 {expected}\n"
                f"  actual   sha256 {actual}\nThe file is corrupted or was modified. {fix}")
        _VERIFIED.add((*key, expected))
    return key


def _expected_hashes(info: DatasetInfo, folder: Path) -> tuple[dict, str]:
    """File -> expected sha256 for a load, and the advice to print if one does not match."""
    if info.shipped:
        files = dict(info.files) or _read_manifest(folder.parent / "MANIFEST.tsv").get(info.name)
        if not files:
            raise FileNotFoundError(
                f"No MANIFEST.tsv with checksums for {info.name!r} (looked in {REPO_DATA_DIR} and "
                f"{folder.parent}); refusing to load unverified data.")
        return files, (f"Restore it from the repository (git checkout -- datasets/{info.name}) "
                       f"or re-copy {REPO_DATA_DIR / info.name} over {folder}.")
    files = dict(info.files)
    sums = folder / _SUMS_FILE
    if sums.is_file():  # hashes recorded when the files were downloaded
        for line in sums.read_text().splitlines():
            sha, fname = line.split()
            if files.get(fname) is None:
                files[fname] = sha
    return files, f"Delete {folder} and run gpadjoint.data.download_dataset({info.name!r}) again."


@functools.lru_cache(maxsize=8)
def _parse(name: str, folder: Path, signature: tuple):
    """Parse a data set's files: data (n, d+1) float64, target last; and k -> (train, test) rows.

    Cached on the files' stat signature, so files that change on disk are re-read.
    """
    del signature  # only part of the cache key
    info = DATASETS[name]
    if info.kind == "index20":
        data = pd.read_csv(folder / "data.txt", sep=r"\s+", header=None, dtype=np.float64)
        data = data.to_numpy()
        feats = np.loadtxt(folder / "index_features.txt", dtype=np.int64, ndmin=1)
        target = int(np.loadtxt(folder / "index_target.txt", dtype=np.int64))
        data = np.column_stack([data[:, feats], data[:, target]])
        idx = {}
        for k in range(info.n_splits):
            idx[k] = tuple(np.loadtxt(folder / f"index_{part}_{k}.txt", dtype=np.int64, ndmin=1)
                           for part in ("train", "test"))
        splits = idx.__getitem__
    else:
        parts = sorted(f for f in info.files if f.startswith("data"))  # data, then data1 (song)
        data = np.concatenate([
            pd.read_csv(folder / f, header=None, dtype=np.float64).to_numpy() for f in parts])
        mask = pd.read_csv(folder / "test_mask.csv.gz", header=None).to_numpy()
        if mask.shape != (data.shape[0], 10) or not np.isin(mask, (0, 1)).all():
            raise ValueError(f"{folder / 'test_mask.csv.gz'}: expected an ({data.shape[0]}, 10) "
                             f"0/1 mask, got shape {mask.shape}")
        mask = mask.astype(bool)

        def splits(k):
            return np.flatnonzero(~mask[:, k]), np.flatnonzero(mask[:, k])

    if data.shape != (info.n, info.d + 1):
        raise ValueError(f"{folder}: expected {info.n} rows x {info.d + 1} columns "
                         f"(d={info.d} + target), got {data.shape}; the files are incomplete.")
    data.setflags(write=False)  # shared between calls through the cache
    return data, splits


def load_dataset(name: str, split: int = 0, *, data_dir=None, scale_y: bool = False,
                 dtype=np.float64) -> Split:
    """Load fixed split ``split`` of a benchmark data set, standardised (see :class:`Split`).

    ``data_dir`` holds one folder per data set; default: the repo's ``datasets/`` for shipped
    sets and :func:`default_cache_dir` for downloaded ones.  Each file's sha256 is checked against
    ``MANIFEST.tsv`` (or the hashes recorded at download) the first time it is read.
    """
    info = _info(name)
    if isinstance(split, bool) or not isinstance(split, numbers.Integral):
        raise TypeError(f"split must be an int, got {split!r}")
    if not 0 <= split < info.n_splits:
        raise ValueError(f"split {split} out of range for {name!r}: it has {info.n_splits} "
                         f"splits, numbered 0..{info.n_splits - 1}")
    folder = _folder(info, data_dir)
    files, fix = _expected_hashes(info, folder)
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        if info.shipped:
            raise FileNotFoundError(f"{name!r}: missing {', '.join(missing)} in {folder}. "
                                    f"Re-copy {REPO_DATA_DIR / name} there or fix data_dir.")
        raise FileNotFoundError(
            f"{name!r} ({info.n} x {info.d}) is not shipped with the repository and was not "
            f"found in {folder}. Download it first: gpadjoint.data.download_dataset({name!r}"
            f"{'' if data_dir is None else f', cache_dir={str(data_dir)!r}'}).")
    signature = tuple(_verify(folder / f, sha, fix) for f, sha in sorted(files.items()))
    data, splits = _parse(name, folder, signature)
    train, test = splits(int(split))
    return _standardise(data[:, :-1], data[:, -1], train, test, name, int(split), scale_y, dtype)


def download_dataset(name: str, *, cache_dir=None, base_url: str = DEFAULT_BASE_URL,
                     sha256: Mapping[str, str] | None = None, force: bool = False,
                     timeout: float = 60.0) -> Path:
    """Fetch a treforevans data set's files from ``{base_url}/{name}/{file}`` into the cache.

    ``sha256`` maps file name -> expected hex digest, overriding the registry (which knows no
    hashes for the five large sets).  Every file is downloaded to a temporary name and only
    renamed into place once all files have arrived and matched their known hashes, so a failure
    leaves nothing behind.  The hashes of what was stored are written to ``SHA256SUMS`` and
    checked by later loads.  Returns the data set's folder.
    """
    info = _info(name)
    if info.kind != "mask10":
        raise ValueError(f"{name!r} is not a treforevans/uci_datasets set; nothing to download.")
    folder = Path(cache_dir if cache_dir is not None else default_cache_dir()) / name
    expected = {**info.files, **(sha256 or {})}
    if not force and all((folder / f).is_file() for f in info.files):
        fix = f"Pass force=True to download {name!r} again."
        for fname, sha in expected.items():
            _verify(folder / fname, sha, fix)
        return folder
    made_dir = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    tmp: dict[str, Path] = {}
    try:
        digests = {}
        for fname in info.files:
            fd, path = tempfile.mkstemp(dir=folder, prefix=f".{fname}.", suffix=".part")
            tmp[fname] = Path(path)
            h = hashlib.sha256()
            url = f"{base_url.rstrip('/')}/{name}/{fname}"
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as r:
                while block := r.read(1 << 20):
                    h.update(block)
                    out.write(block)
            digests[fname] = h.hexdigest()
            if expected.get(fname) not in (None, digests[fname]):
                raise ChecksumError(f"Checksum mismatch for {url}:\n  expected sha256 "
                                    f"{expected[fname]}\n  actual   sha256 {digests[fname]}\n"
                                    f"Nothing was stored; check base_url or the expected hash.")
        sums = "".join(f"{digests[f]}  {f}\n" for f in info.files)
        fd, path = tempfile.mkstemp(dir=folder, prefix=f".{_SUMS_FILE}.", suffix=".part")
        tmp[_SUMS_FILE] = Path(path)
        with os.fdopen(fd, "w") as out:
            out.write(sums)
        for fname, path in tmp.items():  # same folder, so each rename is atomic
            os.replace(path, folder / fname)
        tmp.clear()
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)
        if made_dir and not any(folder.iterdir()):
            folder.rmdir()
    return folder


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
    return _standardise(X, y, train, test, name, 0, scale_y, dtype)


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
