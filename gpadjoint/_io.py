"""Files we write and read back: atomic writes, pre-flight checks, and one clear error each.

Checkpoints, model files, run records and prediction CSVs are all written by
:func:`atomic_write` (temporary file in the same folder, fsync, rename), so a failed write
leaves the previous file as it was. Every way a write can fail -- no space, a size limit, no
permission, a read-only file system, a file where a folder should be -- comes out as one
:class:`WriteError` that says what was being written, where, why and what to do.
:func:`check_writable` runs the same checks before any work (it creates and removes a probe
file), raising :class:`UnwritablePath`; the command line refuses an unwritable output that way
in its first seconds instead of after hours of training.
"""

from __future__ import annotations

import errno as _errno
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

# errno -> (why, what to do); the first matching entry words the message
_REASONS = {
    _errno.ENOSPC: ("no space left on the device", "free some space or write elsewhere"),
    _errno.EDQUOT: ("disk quota exceeded", "free some space or write elsewhere"),
    _errno.EFBIG: ("file too large for a file-size limit (ulimit -f) or the file system",
                   "raise the limit or write to another file system"),
    _errno.EACCES: ("permission denied", "choose a folder you can write to or fix its "
                    "permissions"),
    _errno.EPERM: ("operation not permitted", "choose a folder you can write to or fix its "
                   "permissions"),
    _errno.EROFS: ("read-only file system", "choose a folder on a writable file system"),
    _errno.ENOTDIR: ("a file is where a folder should be", "move that file or choose another "
                     "path"),
    _errno.EEXIST: ("a file is where a folder should be", "move that file or choose another "
                    "path"),
    _errno.EISDIR: ("it is a folder", "name a file (inside it, if you like)"),
    _errno.ENAMETOOLONG: ("the name is too long", "choose a shorter path"),
    _errno.EIO: ("input/output error of the device", "check the disk, or write elsewhere"),
}


class WriteError(OSError):
    """A file could not be written. ``str()`` is one line: what, where, why, what to do.

    Attributes: ``what`` (e.g. "checkpoint"), ``path``, ``errno``, ``reason`` (why, in words),
    ``fix`` (what to do). An ``OSError``, so ``except OSError`` still catches it.
    """

    def __init__(self, what: str, path, errno: int | None, reason: str, fix: str):
        super().__init__(errno, reason)
        self.what, self.path, self.reason, self.fix = what, Path(path), reason, fix

    def __str__(self) -> str:
        code = _errno.errorcode.get(self.errno, "")
        return (f"cannot write the {self.what} {self.path}: {self.reason}"
                f"{f' ({code})' if code else ''}; {self.fix}")


class UnwritablePath(WriteError):
    """An output path refused before any work by :func:`check_writable`."""


class ReadError(ValueError):
    """A file we wrote (checkpoint, model, run record) is damaged or is not such a file."""


def _blocking_file(path: Path) -> Path | None:
    """Return the first existing non-folder among ``path``'s parents (ENOTDIR/EEXIST)."""
    for p in Path(path).parents:
        if p.exists():
            return None if p.is_dir() else p
    return None


def _explain(err: OSError, what: str, path: Path, cls=WriteError) -> WriteError:
    """Turn an ``OSError`` met while writing ``path`` into a :class:`WriteError` (or ``cls``)."""
    if isinstance(err, WriteError):
        return err
    reason, fix = _REASONS.get(err.errno, (err.strerror or str(err), "write elsewhere"))
    if err.errno in (_errno.ENOTDIR, _errno.EEXIST):
        blocker = _blocking_file(path)
        if blocker is not None:
            reason = f"{blocker} is a file, not a folder"
    return cls(what, path, err.errno, reason, fix)


def _probe(folder: Path) -> None:
    """Create and remove a file in ``folder`` (raises the OSError a real write would meet)."""
    fd, name = tempfile.mkstemp(dir=folder, prefix=".gpadjoint-probe-", suffix=".tmp")
    os.close(fd)
    os.unlink(name)


def check_writable(path, what: str) -> Path:
    """Check, before any work, that a file ``path`` can be written; return it as a Path.

    The path must not be a folder; its folder must exist or be creatable (it is created), and a
    file must be creatable in it (a probe file is created and removed). Raises
    :class:`UnwritablePath` naming the path and the reason otherwise.
    """
    path = Path(path)
    if path.is_dir():
        raise UnwritablePath(what, path, _errno.EISDIR, *_REASONS[_errno.EISDIR])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _probe(path.parent)
    except OSError as e:
        raise _explain(e, what, path, UnwritablePath) from None
    return path


def atomic_write(path, write: Callable, binary: bool = True, what: str = "file") -> Path:
    """Write ``path`` via ``write(fh)`` into a temporary file in the same folder, then rename.

    The data are fsync'ed before the rename and the folder after it, so a crash mid-write leaves
    either the old file or the new one, never a truncated mix. Any ``OSError`` on the way (the
    folder, the data, the rename) is raised as a :class:`WriteError` about ``what``; the
    temporary file is removed and an existing ``path`` is left untouched.
    """
    path = Path(path)
    tmp = None
    try:
        if path.is_dir():
            raise UnwritablePath(what, path, _errno.EISDIR, *_REASONS[_errno.EISDIR])
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb" if binary else "w") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise _explain(e, what, path) from e
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return path


def read_npz(path) -> dict:
    """Return all arrays of an ``.npz`` archive (no pickle); ValueError if it is not a zip.

    Reading every array checks every member's CRC, so a damaged file fails here, not later.
    Raises what numpy and zipfile raise for a damaged file (OSError, ValueError,
    ``zipfile.BadZipFile``, EOFError, KeyError): the callers name the file and what to do.
    """
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic not in (b"PK\x03\x04", b"PK\x05\x06"):  # a zip archive, or an empty one
        raise ValueError("it is not an .npz archive (it does not start as a zip file does)")
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


RECORD_KEYS = ("dataset", "split", "config", "seed", "history", "hyperparameters", "complete")


def read_run_record(path) -> dict:
    """Read a run record written by ``gpadjoint fit`` (JSON), checking that it is one.

    Raises FileNotFoundError if absent and :class:`ReadError` (naming the file and what to do)
    if it is not valid JSON or lacks the keys every record has.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no run record at {path}")
    fix = ("it is damaged or not a gpadjoint run record; rerun the fit (with --resume and its "
           "checkpoint, if it still exists) to write it again")
    try:
        rec = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReadError(f"{path} is not readable JSON ({e}): {fix}") from None
    missing = [k for k in RECORD_KEYS if not isinstance(rec, dict) or k not in rec]
    if missing:
        raise ReadError(f"{path} lacks the run-record keys {', '.join(missing)}: {fix}")
    return rec
