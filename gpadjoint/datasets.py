"""The benchmark data sets: registry, shipped files, checksums and downloads.

Data flow: data -> **datasets**. :func:`load_dataset` returns a fixed split of a UCI set as a
:class:`gpadjoint.data.Split`.

The shipped targets are those of the treforevans files, already transformed where the paper
(Krämer et al. 2024) transforms them: protein's is log(RMSD + 1) and keggundirected's is log(y),
both centred (``tests/test_data.py`` checks this from the values).  No loader transforms them again.

Shipped data live in the repository's ``datasets/`` folder (formats in its ``README.md``; every
file's sha256 in ``MANIFEST.tsv`` is checked on first load in each process).  A wheel carries the
same folder as the package data ``gpadjoint/_data`` (pyproject.toml maps one onto the other), so
an installed gpadjoint loads them from any working folder: :data:`SHIPPED_DATA_DIR` is whichever
of the two this copy of the package has.  They ship rather than download because they are the
project's own copies (protein's and keggundirected's targets transformed as above), not the
upstream files, and a fit of a shipped set then needs no network.

The five large treforevans sets are not shipped; :func:`download_dataset` fetches them with pooch
(retries, hash checks, optional progress bar) into the data home :func:`default_cache_dir`:
``$GPADJOINT_DATA``, else the user cache folder platformdirs names (``~/.cache/gpadjoint`` on
Linux), as scikit-learn's data home does.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import numbers
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .data import Split, standardise

_PACKAGE_DATA_DIR = Path(__file__).resolve().parent / "_data"  # in an installed wheel
_SOURCE_DATA_DIR = Path(__file__).resolve().parent.parent / "datasets"  # in a source checkout
# The shipped files of this copy of the package: a wheel's package data, else the checkout's.
SHIPPED_DATA_DIR = (_PACKAGE_DATA_DIR if (_PACKAGE_DATA_DIR / "MANIFEST.tsv").is_file()
                    else _SOURCE_DATA_DIR)
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
    manifest = _read_manifest(SHIPPED_DATA_DIR / "MANIFEST.tsv")
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
    """Where downloads go: ``$GPADJOINT_DATA`` if set, else the user cache folder.

    The user cache folder is platformdirs' ``user_cache_dir("gpadjoint")``:
    ``~/.cache/gpadjoint`` on Linux (``$XDG_CACHE_HOME`` respected), ``~/Library/Caches`` on
    macOS, ``%LOCALAPPDATA%`` on Windows.  The downloaded sets can always be fetched again.
    """
    env = os.environ.get("GPADJOINT_DATA")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("gpadjoint", appauthor=False))


def _info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        close = difflib.get_close_matches(str(name), DATASETS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"Unknown data set {name!r}.{hint} Known: {', '.join(DATASETS)}.")
    return DATASETS[name]


def _folder(info: DatasetInfo, data_dir) -> Path:
    if data_dir is not None:
        return Path(data_dir) / info.name
    return (SHIPPED_DATA_DIR if info.shipped else default_cache_dir()) / info.name


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
                f"No MANIFEST.tsv with checksums for {info.name!r} (looked in {folder.parent}, "
                f"{_PACKAGE_DATA_DIR} (an installed wheel's) and {_SOURCE_DATA_DIR} (a source "
                "checkout's)); refusing to load unverified data. Reinstall gpadjoint, or pass "
                "data_dir= a folder holding MANIFEST.tsv and the data set's folder.")
        return files, (f"Restore it from the repository (git checkout -- datasets/{info.name}) "
                       f"or re-copy {SHIPPED_DATA_DIR / info.name} over {folder}.")
    files = dict(info.files)
    sums = folder / _SUMS_FILE
    fix = f"Delete {folder} and run gpadjoint.datasets.download_dataset({info.name!r}) again."
    if sums.is_file():  # hashes recorded when the files were downloaded
        try:
            pairs = [line.split() for line in sums.read_text().splitlines() if line.strip()]
        except UnicodeDecodeError:
            pairs = [[]]
        for pair in pairs:
            if len(pair) != 2 or len(pair[0]) != 64 or pair[1] not in info.files or any(
                    c not in "0123456789abcdef" for c in pair[0]):
                raise ChecksumError(f"{sums} is damaged (expected lines '<sha256>  <file>' "
                                    f"naming {', '.join(info.files)}). {fix}")
            if files.get(pair[1]) is None:
                files[pair[1]] = pair[0]
    return files, fix


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

    ``data_dir`` holds one folder per data set; default: :data:`SHIPPED_DATA_DIR` for shipped
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
                                    f"Re-copy {SHIPPED_DATA_DIR / name} there or fix data_dir.")
        raise FileNotFoundError(
            f"{name!r} ({info.n} x {info.d}) is not shipped with the repository and was not "
            f"found in {folder}. Download it first: gpadjoint.datasets.download_dataset({name!r}"
            f"{'' if data_dir is None else f', cache_dir={str(data_dir)!r}'}).")
    signature = tuple(_verify(folder / f, sha, fix) for f, sha in sorted(files.items()))
    data, splits = _parse(name, folder, signature)
    train, test = splits(int(split))
    return standardise(data[:, :-1], data[:, -1], train, test, name, int(split), scale_y, dtype)


def download_dataset(name: str, *, cache_dir=None, base_url: str = DEFAULT_BASE_URL,
                     sha256: Mapping[str, str] | None = None, force: bool = False,
                     retries: int = 2, progress: bool | None = None) -> Path:
    """Fetch a treforevans data set's files from ``{base_url}/{name}/{file}`` into the cache.

    The download is pooch's (each file to a temporary name, checked against its known hash,
    ``retries`` more tries after a failed request or a hash mismatch; ``progress``: a progress
    bar, which needs tqdm; None: one when tqdm is installed and stderr is a terminal).
    ``sha256`` maps file name -> expected hex digest, overriding the registry (which knows no
    hashes for the five large sets).  All files of the set go to a staging folder first and are
    moved into place only once all have arrived and matched, so a failure leaves nothing behind.
    The hashes of what was stored are written to ``SHA256SUMS`` and checked by later loads.
    Returns the data set's folder (``cache_dir``, default :func:`default_cache_dir`, / name).
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
    import pooch

    if progress is None:
        try:
            import tqdm  # noqa: F401  (pooch's progress bar)
        except ImportError:
            progress = False
        else:
            progress = sys.stderr.isatty()
    made_dir = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder, prefix=".download-"))
    url = f"{base_url.rstrip('/')}/{name}/"
    try:
        fetcher = pooch.create(path=staging, base_url=url, registry=dict(expected),
                               retry_if_failed=retries)
        for fname in info.files:
            try:
                fetcher.fetch(fname, progressbar=progress)
            except ValueError as e:
                if "hash" not in str(e):  # pooch says "... does not match the known hash ..."
                    raise
                raise ChecksumError(
                    f"Checksum mismatch for {url}{fname}:\n  expected sha256 {expected[fname]}\n"
                    f"  {e}\nNothing was stored; check base_url or the expected hash.") from None
        sums = "".join(f"{pooch.file_hash(str(staging / f))}  {f}\n" for f in info.files)
        (staging / _SUMS_FILE).write_text(sums)
        for fname in (*info.files, _SUMS_FILE):  # same file system, so each move is a rename
            os.replace(staging / fname, folder / fname)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if made_dir and not any(folder.iterdir()):
            folder.rmdir()
    return folder
