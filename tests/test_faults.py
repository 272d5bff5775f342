"""Faults around a run: one clear line, never a traceback, and the last checkpoint kept.

One table, :data:`FAULTS`, has a row per fault: output paths that cannot be written (refused
before any work), writes that fail during a run (each errno, injected into the writer or made by
a real file-size limit in a child process), and damaged or foreign files we wrote (checkpoint,
model, run record, data-set cache). Every row asserts the same four things: the exit code (or
the exception, for a library entry point), that the message names the path, that no traceback
was printed, and that the checkpoint an earlier run left is unchanged, byte for byte.
``scripts/bad_input_table.py`` runs this table and writes what the user saw to
``results/bad_inputs.md`` (environment ``GPADJ_FAULT_TABLE``).

A second table, :data:`KILLS`, has a row per interruption of a real ``gpadjoint fit`` child
process on tiny data (float64, SLQ forced): SIGKILL during the subset start, between two
checkpoints of the full fit and during a line search, and SIGTERM / SIGINT during a line
search. The child's own prelude (test code, not the package's) wraps a hook to send the signal
at a known point. Each row asserts the exit code, that a message names the checkpoint (the
interrupted run's line for SIGTERM/SIGINT, the resumed run's "resuming from" line after a
SIGKILL), no traceback, the checkpoint on disk (after a SIGKILL: byte for byte what was there
when the signal was sent; after SIGTERM/SIGINT: the last accepted step, written within one
evaluation of the signal), and that ``--resume`` ends where an uninterrupted run ends, to 1e-8.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import gpadjoint._io as gio
import gpadjoint.checkpoint as gckpt
import gpadjoint.cli as gcli
import gpadjoint.datasets as DS
import gpadjoint.persist as gpersist
from gpadjoint.cli import main as cli_main
from gpadjoint.model import GPRegressor

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = "2"  # the earlier run: yacht, two L-BFGS epochs (exact estimator; a few seconds)


@dataclass
class Outcome:
    code: int | str  # exit code of a command, or the exception a function raised
    stdout: str
    stderr: str


@dataclass
class Ctx:
    """One row's folder: a fresh copy of the earlier run's checkpoint, model and record."""

    tmp: Path
    ckpt: Path
    model: Path
    record: Path
    inputs: Path  # yacht's test inputs as a CSV, for predict
    monkeypatch: pytest.MonkeyPatch

    def fit(self, *extra) -> list[str]:
        """The earlier run's command, continued from its checkpoint to epoch 3."""
        return ["fit", "--dataset", "yacht", "--epochs", "3", "--quiet",
                "--checkpoint", self.ckpt, "--out", self.tmp / "run.json", *extra]

    def blocker(self) -> Path:
        """A regular file where a folder should be."""
        p = self.tmp / "blocker"
        p.write_text("not a folder\n")
        return p


@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory):
    """Checkpoint, model and record of a short yacht fit, which every row starts from."""
    from gpadjoint.datasets import load_dataset

    tmp = tmp_path_factory.mktemp("earlier")
    files = tmp / "run.ckpt", tmp / "model.gp", tmp / "run.json"
    rc = cli_main(["fit", "--dataset", "yacht", "--epochs", EPOCHS, "--quiet", "--checkpoint",
                   str(files[0]), "--save-model", str(files[1]), "--out", str(files[2])])
    assert rc == 0
    s = load_dataset("yacht", 0)
    X = s.unscale_X(s.X_test)
    np.savetxt(tmp / "in.csv", X, delimiter=",", header=",".join(f"x{i}" for i in range(6)),
               comments="")
    return (*files, tmp / "in.csv")


# ---- how rows run: in-process command line, a child process, a library call


def cli(*argv) -> Outcome:
    """Run ``gpadjoint argv`` in-process; an exception that escapes is a printed traceback."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli_main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
            if not isinstance(e.code, int):
                err.write(str(e.code))
        except BaseException:  # what the console script would have shown
            err.write(traceback.format_exc())
            code = "uncaught exception"
    return Outcome(code, out.getvalue(), err.getvalue())


def child(*argv, prelude: str = "") -> Outcome:
    """Run ``gpadjoint argv`` in a fresh interpreter (after ``prelude``), as the console does."""
    code = prelude + "\nimport sys\nfrom gpadjoint.cli import main\nsys.exit(main())\n"
    p = subprocess.run([sys.executable, "-c", code, *map(str, argv)], capture_output=True,
                       text=True, cwd=ROOT, timeout=600,
                       env=os.environ | {"PYTHONPATH": str(ROOT)})
    return Outcome(p.returncode, p.stdout, p.stderr)


def api(fn: Callable) -> Outcome:
    """Call a library entry point; the outcome's code is the exception's class name."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 (the row asserts which)
        return Outcome(type(e).__name__, "", f"{type(e).__name__}: {e}")
    return Outcome("no error", "", "")


# ---- how faults are made


class _FailingFile:
    """A file object that lets ``allow`` bytes through, then fails as a full disk would."""

    def __init__(self, fh, err: int, allow: int = 64):
        self._fh, self._err, self._left = fh, err, allow

    def write(self, b):
        if len(b) > self._left:
            raise OSError(self._err, os.strerror(self._err))
        self._left -= len(b)
        return self._fh.write(b)

    def __getattr__(self, name):
        return getattr(self._fh, name)


def fail_writes(ctx: Ctx, module, err: int) -> None:
    """Make every ``atomic_write`` of ``module`` fail part-way through with ``OSError(err)``."""
    real = gio.atomic_write

    def atomic_write(path, write, *a, **k):
        return real(path, lambda fh: write(_FailingFile(fh, err)), *a, **k)

    ctx.monkeypatch.setattr(module, "atomic_write", atomic_write)


def fail_probe(ctx: Ctx, err: int, folder: Path) -> None:
    """Make the pre-flight probe file in ``folder`` fail as the file system would with ``err``."""
    real = gio._probe

    def probe(where):
        if Path(where) != folder:
            return real(where)
        raise OSError(err, os.strerror(err), str(where))

    ctx.monkeypatch.setattr(gio, "_probe", probe)


def no_training(ctx: Ctx) -> None:
    """A refused output must stop the run before it trains: training fails the row."""
    def fit(*a, **k):
        raise AssertionError("the fit started although an output path cannot be written")

    ctx.monkeypatch.setattr(GPRegressor, "fit", fit)


def truncated(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    return dst


def flipped(src: Path, dst: Path) -> Path:
    raw = bytearray(src.read_bytes())
    raw[len(raw) * 2 // 3] ^= 0x40
    dst.write_bytes(bytes(raw))
    return dst


def fake_download(ctx: Ctx, sums: str | None = None, flip: bool = False) -> Path:
    """A download cache holding 3droad (not shipped) as small files with their SHA256SUMS."""
    import hashlib

    folder = ctx.tmp / "cache" / "3droad"
    folder.mkdir(parents=True)
    (folder / "data.csv.gz").write_bytes(b"1,2,3,4\n")
    (folder / "test_mask.csv.gz").write_bytes(b"0,0,0,0,0,0,0,0,0,1\n")
    lines = "".join(f"{hashlib.sha256((folder / f).read_bytes()).hexdigest()}  {f}\n"
                    for f in ("data.csv.gz", "test_mask.csv.gz"))
    (folder / "SHA256SUMS").write_text(lines if sums is None else sums)
    if flip:
        (folder / "data.csv.gz").write_bytes(b"1,2,3,5\n")
    return ctx.tmp / "cache"


def last_json(o: Outcome) -> dict:
    return json.loads(o.stderr.strip().splitlines()[-1])


# ---- the table


@dataclass(frozen=True)
class Fault:
    fault: str  # what went wrong, as the user would say it
    entry: str  # the command or function that met it
    how: str  # how the test makes the fault
    run: Callable[[Ctx], Outcome]
    code: int | str  # expected exit code, or exception class name
    path: Callable[[Ctx], Path]  # the path the message must name
    pattern: str = ""  # a further phrase the message must contain
    check: Callable[[Ctx, Outcome], None] | None = None  # any further assertion
    slow: bool = False
    # the earlier checkpoint afterwards: "unchanged" (bytes), or "advanced" where the fault
    # comes after this run's training wrote its own (epoch 3) checkpoint, which must be intact
    checkpoint: str = "unchanged"


def _record_json_on_stderr(ctx, o):
    rec = last_json(o)
    assert rec["dataset"] == "yacht" and np.isfinite(rec["test_rmse"])


def _no_temp_files(ctx, o):
    assert not [p.name for p in ctx.tmp.iterdir() if p.name.endswith(".tmp")]


def _record_kept(ctx, o):
    assert json.loads((ctx.tmp / "run.json").read_text())["test_rmse"] > 0
    assert not (ctx.tmp / "m.gp").exists()


UNWRITABLE = gcli.EXIT_UNWRITABLE
FAILED = gcli.EXIT_WRITE_FAILED

FAULTS = [
    # -- output paths refused before any work
    Fault("a file where the record's folder should be", "gpadjoint fit --out",
          "real file", lambda c: (no_training(c), cli(*c.fit("--out", c.blocker() / "r.json")))[1],
          UNWRITABLE, lambda c: c.tmp / "blocker", "is a file, not a folder"),
    Fault("a file where the record's folder should be (console script)", "gpadjoint fit --out",
          "real file, child process",
          lambda c: child(*c.fit("--out", c.blocker() / "r.json")),
          UNWRITABLE, lambda c: c.tmp / "blocker", "is a file, not a folder", slow=True),
    Fault("a file where the checkpoint's folder should be", "gpadjoint fit --checkpoint",
          "real file",
          lambda c: (no_training(c), cli(*c.fit("--checkpoint", c.blocker() / "c.ckpt")))[1],
          UNWRITABLE, lambda c: c.tmp / "blocker", "is a file, not a folder"),
    Fault("the checkpoint path is a folder", "gpadjoint fit --checkpoint", "real folder",
          lambda c: (no_training(c), cli(*c.fit("--checkpoint", c.tmp)))[1],
          UNWRITABLE, lambda c: c.tmp, "it is a folder"),
    Fault("no permission in the model's folder", "gpadjoint fit --save-model",
          "EACCES from the probe file",
          lambda c: (no_training(c), fail_probe(c, errno.EACCES, c.tmp / "out"),
                     cli(*c.fit("--save-model", c.tmp / "out" / "m.gp")))[2],
          UNWRITABLE, lambda c: c.tmp / "out" / "m.gp", "permission denied"),
    Fault("read-only file system", "gpadjoint fit --out", "EROFS from the probe file",
          lambda c: (no_training(c), fail_probe(c, errno.EROFS, c.tmp),
                     cli(*c.fit()))[2],
          UNWRITABLE, lambda c: c.tmp / "run.json", "read-only file system"),
    Fault("a file where the predictions' folder should be", "gpadjoint predict --out",
          "real file", lambda c: cli("predict", "--model", c.model, "--data", c.inputs,
                                     "--out", c.blocker() / "p.csv"),
          UNWRITABLE, lambda c: c.tmp / "blocker", "is a file, not a folder"),
    Fault("a file where the checkpoint's folder should be", "GPRegressor.fit(checkpoint=)",
          "real file", lambda c: api(lambda: GPRegressor(epochs=1).fit(
              np.ones((5, 2)) * np.arange(5)[:, None], np.arange(5.0),
              checkpoint=c.blocker() / "c.ckpt")),
          "UnwritablePath", lambda c: c.tmp / "blocker", "is a file, not a folder"),
    Fault("a file where the model's folder should be", "GPRegressor.save", "real file",
          lambda c: api(lambda: GPRegressor.load(c.model).save(c.blocker() / "m.gp")),
          "WriteError", lambda c: c.tmp / "blocker", "is a file, not a folder"),
    # -- writes that fail during the run; the last good checkpoint and --resume are named
    Fault("no space left while writing a checkpoint", "gpadjoint fit", "ENOSPC in the writer",
          lambda c: (fail_writes(c, gckpt, errno.ENOSPC), cli(*c.fit("--resume")))[1],
          FAILED, lambda c: c.ckpt, "no space left.*epoch 2.*--resume", _no_temp_files),
    Fault("a file-size limit while writing a checkpoint", "gpadjoint fit",
          "RLIMIT_FSIZE 8 KiB in a child process",
          lambda c: child(*c.fit("--resume"), prelude=(
              "import resource, signal\nsignal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))")),
          FAILED, lambda c: c.ckpt, "file too large.*epoch 2.*--resume", _no_temp_files,
          slow=True),
    Fault("permission denied while writing a checkpoint", "gpadjoint fit",
          "EACCES in the writer",
          lambda c: (fail_writes(c, gckpt, errno.EACCES), cli(*c.fit("--resume")))[1],
          FAILED, lambda c: c.ckpt, "permission denied.*epoch 2.*--resume"),
    Fault("the file system turned read-only while writing a checkpoint", "gpadjoint fit",
          "EROFS in the writer",
          lambda c: (fail_writes(c, gckpt, errno.EROFS), cli(*c.fit("--resume")))[1],
          FAILED, lambda c: c.ckpt, "read-only file system.*epoch 2.*--resume"),
    Fault("no space left while writing the run record", "gpadjoint fit",
          "ENOSPC in the writer",
          lambda c: (fail_writes(c, gcli, errno.ENOSPC), cli(*c.fit("--resume")))[1],
          FAILED, lambda c: c.tmp / "run.json", "follows on stderr as one JSON line.*--resume",
          _record_json_on_stderr, checkpoint="advanced"),
    Fault("a file where the record's folder should be, made during the run", "gpadjoint fit",
          "ENOTDIR in the writer",
          lambda c: (fail_writes(c, gcli, errno.ENOTDIR), cli(*c.fit("--resume")))[1],
          FAILED, lambda c: c.tmp / "run.json", "a file is where a folder should be",
          _record_json_on_stderr, checkpoint="advanced"),
    Fault("a file-size limit while saving the model", "gpadjoint fit --save-model",
          "EFBIG in the writer",
          lambda c: (fail_writes(c, gpersist, errno.EFBIG),
                     cli(*c.fit("--resume", "--save-model", c.tmp / "m.gp")))[1],
          FAILED, lambda c: c.tmp / "m.gp", "file too large.*run record .*--resume",
          _record_kept, checkpoint="advanced"),
    Fault("no space left while writing predictions", "gpadjoint predict --out",
          "ENOSPC in the writer",
          lambda c: (fail_writes(c, gcli, errno.ENOSPC),
                     cli("predict", "--model", c.model, "--data", c.inputs,
                         "--out", c.tmp / "p.csv"))[1],
          FAILED, lambda c: c.tmp / "p.csv", "no space left.*run again"),
    # -- damaged or foreign files we wrote
    Fault("truncated checkpoint", "gpadjoint fit --resume", "first half of the file",
          lambda c: cli(*c.fit("--resume", "--checkpoint", truncated(c.ckpt, c.tmp / "t.ckpt"))),
          2, lambda c: c.tmp / "t.ckpt", "not a readable gpadjoint checkpoint.*delete it"),
    Fault("one flipped bit in a checkpoint", "gpadjoint fit --resume", "a byte of the arrays",
          lambda c: cli(*c.fit("--resume", "--checkpoint", flipped(c.ckpt, c.tmp / "f.ckpt"))),
          2, lambda c: c.tmp / "f.ckpt", "not a readable gpadjoint checkpoint"),
    Fault("a model file given as the checkpoint", "gpadjoint fit --resume", "foreign file",
          lambda c: cli(*c.fit("--resume", "--checkpoint", c.model)),
          2, lambda c: c.model, "not a gpadjoint-checkpoint-v1 file"),
    Fault("truncated model file", "gpadjoint predict --model", "first half of the file",
          lambda c: cli("predict", "--model", truncated(c.model, c.tmp / "t.gp"),
                        "--data", c.inputs),
          2, lambda c: c.tmp / "t.gp", "not a readable gpadjoint model file.*save the model"),
    Fault("one flipped bit in a model file", "gpadjoint predict --model", "a byte of the arrays",
          lambda c: cli("predict", "--model", flipped(c.model, c.tmp / "f.gp"),
                        "--data", c.inputs),
          2, lambda c: c.tmp / "f.gp", "not a readable gpadjoint model file"),
    Fault("a checkpoint given as the model", "gpadjoint predict --model", "foreign file",
          lambda c: cli("predict", "--model", c.ckpt, "--data", c.inputs),
          2, lambda c: c.ckpt, "not a gpadjoint-model-v2 file"),
    Fault("a CSV given as the model", "GPRegressor.load", "foreign file",
          lambda c: api(lambda: GPRegressor.load(c.inputs)),
          "ReadError", lambda c: c.inputs, "not a readable gpadjoint model file"),
    Fault("truncated run record", "read_run_record", "first half of the file",
          lambda c: api(lambda: gio.read_run_record(truncated(c.record, c.tmp / "t.json"))),
          "ReadError", lambda c: c.tmp / "t.json", "not readable JSON.*rerun the fit"),
    Fault("a JSON file that is not a run record", "read_run_record", "foreign file",
          lambda c: api(lambda: gio.read_run_record(
              (c.tmp / "x.json", (c.tmp / "x.json").write_text("[1, 2]"))[0])),
          "ReadError", lambda c: c.tmp / "x.json", "lacks the run-record keys"),
    Fault("damaged SHA256SUMS in the download cache", "load_dataset", "garbled line",
          lambda c: api(lambda: DS.load_dataset("3droad", data_dir=fake_download(c, "xyz\n"))),
          "ChecksumError", lambda c: c.tmp / "cache" / "3droad" / "SHA256SUMS",
          "is damaged.*download_dataset"),
    Fault("a cached download that changed", "load_dataset", "one byte of data.csv.gz",
          lambda c: api(lambda: DS.load_dataset("3droad", data_dir=fake_download(c, flip=True))),
          "ChecksumError", lambda c: c.tmp / "cache" / "3droad" / "data.csv.gz",
          "Checksum mismatch.*download_dataset"),
]

# What the user saw in each row, in FAULTS order: (fault, entry, how, code, checkpoint, message).
SEEN: dict[int, tuple[str, ...]] = {}


def _params():
    for i, f in enumerate(FAULTS):
        marks = [pytest.mark.slow] if f.slow else []
        yield pytest.param(i, f, id=f"{f.entry}: {f.fault}", marks=marks)


@pytest.mark.parametrize("i,f", list(_params()))
def test_fault_is_one_clear_line(i, f, earlier_run, tmp_path, monkeypatch):
    ckpt, model, record, inputs = earlier_run
    ctx = Ctx(tmp_path, tmp_path / "run.ckpt", tmp_path / "model.gp", tmp_path / "earlier.json",
              tmp_path / "in.csv", monkeypatch)
    for src, dst in zip((ckpt, model, record, inputs), (ctx.ckpt, ctx.model, ctx.record,
                                                        ctx.inputs)):
        shutil.copy(src, dst)
    before = ctx.ckpt.read_bytes()

    o = f.run(ctx)
    monkeypatch.undo()
    message = o.stderr.strip()

    assert o.code == f.code, message                              # 1. the exit code
    assert str(f.path(ctx)) in message                            # 2. names the path
    assert "Traceback" not in message, message                    # 3. no traceback
    if f.checkpoint == "unchanged":                               # 4. checkpoint unchanged
        assert ctx.ckpt.read_bytes() == before
    else:  # or this run's last good one, intact
        assert gckpt.checkpoint_epoch(ctx.ckpt) == 3
    if isinstance(f.code, int):  # a command: exactly one error line
        errors = [line for line in message.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1, message
        first = errors[0]
    else:
        first = " ".join(message.split())
    assert re.search(f.pattern, first), first
    if f.check is not None:
        f.check(ctx, o)
    SEEN[i] = (f.fault, f.entry, f.how, str(f.code), f.checkpoint,
               first.replace(str(tmp_path), "…"))


@pytest.fixture(scope="module", autouse=True)
def _table_of_faults():
    """With GPADJ_FAULT_TABLE=PATH set, write what the user saw as a Markdown table there.

    ``scripts/bad_input_table.py`` sets it (and GPADJ_COMMIT) and appends the table to
    results/bad_inputs.md.
    """
    yield
    out = os.environ.get("GPADJ_FAULT_TABLE")
    if not out:
        return
    lines = [
        "## Faults around a run",
        "",
        f"Written by `scripts/bad_input_table.py` (commit {os.environ.get('GPADJ_COMMIT', '?')}) "
        "from the rows of `tests/test_faults.py`. Each row asserts the exit code (or the "
        "exception), that the message names the path, that no traceback was printed and that "
        "the checkpoint an earlier run left is unchanged (bytes) -- or, where the fault comes "
        "after this run's training wrote its own checkpoint (\"advanced\"), that this one is "
        "intact. Exit codes: 2 bad input or a damaged "
        f"file, {gcli.EXIT_UNWRITABLE} an output refused before any work, "
        f"{gcli.EXIT_WRITE_FAILED} a write failed during the run, {gcli.EXIT_INTERRUPTED} "
        "stopped by SIGINT/SIGTERM. Paths shortened to `…/`.",
        "",
        "| fault | entry point | how it is made | exit / exception | earlier checkpoint | "
        "message (the error line) |",
        "|---|---|---|---|---|---|",
    ]
    for i in sorted(SEEN):
        fault, entry, how, code, kept, msg = SEEN[i]
        msg = " ".join(msg.split())
        msg = msg if len(msg) <= 400 else msg[:397] + "..."
        msg = msg.replace("|", "\\|")
        lines.append(f"| {fault} | {entry} | {how} | {code} | {kept} | {msg} |")
    if KILL_SEEN:
        lines += [
            "",
            "## Interrupted runs",
            "",
            "Rows of `KILLS` in `tests/test_faults.py`: a `gpadjoint fit` child on 270 rows "
            "(float64, SLQ) gets the signal at a known point, then the same command with "
            "`--resume` runs. Each row asserts the exit code (-9: killed; "
            f"{gcli.EXIT_INTERRUPTED}: stopped by SIGINT/SIGTERM), that the message names the "
            "checkpoint, that no traceback was printed, the checkpoint left (after SIGKILL: the "
            "bytes it held when the signal was sent; after SIGTERM/SIGINT: the last accepted "
            "step, no evaluation after the one in progress), and that the resumed run ends where "
            "an uninterrupted run ends, to 1e-8.",
            "",
            "| interruption | how it is made | exit | checkpoint left | message |",
            "|---|---|---|---|---|",
        ]
        for i in sorted(KILL_SEEN):
            fault, how, code, kept, msg = KILL_SEEN[i]
            msg = " ".join(msg.split()).replace("|", "\\|")
            msg = msg if len(msg) <= 400 else msg[:397] + "..."
            lines.append(f"| {fault} | {how} | {code} | {kept} | {msg} |")
    Path(out).write_text("\n".join(lines) + "\n")


def test_preflight_creates_the_folder_and_leaves_no_probe(tmp_path):
    target = tmp_path / "a" / "b" / "run.json"
    assert gio.check_writable(target, "run record") == target
    assert target.parent.is_dir() and list(target.parent.iterdir()) == []


def test_write_error_is_an_oserror_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "f.bin"
    gio.atomic_write(path, lambda fh: fh.write(b"old"))

    def full(fh):
        fh.write(b"new, half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OSError) as info:
        gio.atomic_write(path, full, what="checkpoint")
    assert isinstance(info.value, gio.WriteError) and info.value.errno == errno.ENOSPC
    assert str(info.value).startswith(f"cannot write the checkpoint {path}: no space left")
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f.bin"]


# ---- interrupted runs: a child is killed at a known point, then resumed

KILL_DATA_ROWS = 300  # 270 train rows: each child run takes seconds

KILL_CONFIG = """
[model]
dtype = "float64"
backend = "dense"
[mll]
estimator = "slq"          # n = 270 would take the exact estimator: the rows want SLQ + CG
num_probes = 4
lanczos_depth = 10
precond_rank = 30
[optim]
lbfgs_ptol = 0.0           # the rows need several steps: no stop on the predicted decrease
[train]
epochs = {epochs}
random_state = 3
checkpoint_every = 2
init_subset = {init_subset}
init_subset_max = 200
full_fit = "always"
"""


@dataclass
class Killed:
    """What the rows compare: the interrupted child, the resumed one, their files."""

    first: Outcome
    resumed: Outcome
    ckpt: Path
    start: Path
    unchanged: bool  # after the interrupted run, the checkpoint (or the start's) holds the
    # bytes it held when the signal was sent
    epoch: int | None  # the epoch the run's checkpoint held after the interrupted run
    start_stages: int | None  # finished rungs in the start's checkpoint then
    evaluations: int  # full-data evaluations the interrupted child made
    record: dict  # the resumed run's record
    partial: dict | None  # the interrupted run's record (SIGTERM / SIGINT)


@dataclass(frozen=True)
class Kill:
    fault: str
    how: str
    config: str  # "start": a subset start then the full fit; "search": the full fit only
    hook: str  # the prelude that sends the signal (formatted with the row's values)
    code: int
    path: Callable[[Killed], Path]  # the checkpoint the message must name
    check: Callable[[Killed, dict], None]  # further assertions, given the uninterrupted record
    watches_start: bool = False  # the snapshot is of the subset start's checkpoint


_SNAP = """
def _snap():
    import shutil
    p = {target!r}
    if os.path.exists(p):
        shutil.copy(p, {snap!r})
"""

# at the k-th evaluation on all n rows: the signal, then that evaluation (in progress) ends
_AT_EVALUATION = """
import os, signal
import gpadjoint.optimizers as _O
_run, _count = _O._Evaluator.run, [0]
def _counted(self, *a, **k):
    if self.X.shape[0] == {n}:
        _count[0] += 1
        with open({count!r}, "a") as fh:
            fh.write("1\\n")
        if _count[0] == {k}:
            _snap()
            os.kill(os.getpid(), signal.{sig})
    return _run(self, *a, **k)
_O._Evaluator.run = _counted
"""

_AFTER_EPOCH = """
import os, signal
import gpadjoint.train as _T
_after = _T._Checkpoints.after_epoch
def _then_kill(self, state, history):
    _after(self, state, history)
    if self.path is not None and int(state.epoch) == {k}:  # the full fit's, not a rung's
        _snap()
        os.kill(os.getpid(), signal.SIGKILL)
_T._Checkpoints.after_epoch = _then_kill
"""

_AT_STAGE = """
import os, signal
import gpadjoint.start as _S
_stage, _stages = _S.subset_stage, [0]
def _kill_at(*a, **k):
    _stages[0] += 1
    if _stages[0] == {k}:
        _snap()
        os.kill(os.getpid(), signal.SIGKILL)
    return _stage(*a, **k)
_S.subset_stage = _kill_at
"""


def _search_point(full: dict) -> tuple[int, int]:
    """(j, K): a step j + 1 whose line search makes >= 2 evaluations, and the number K of its
    first line-search evaluation among the run's evaluations on all rows (1-based).

    j is odd and >= 3, so that a checkpoint by count (every 2) exists before it and the last
    accepted step (epoch j) is not one.
    """
    h = full["history"]
    for j in range(3, len(h), 2):
        base = 1 if h[j]["refreshed"] else 0  # a refreshed step first re-evaluates its start
        if h[j]["evaluations"] - base >= 2:
            return j, sum(r["evaluations"] for r in h[:j]) + base + 1
    raise AssertionError("no step of the uninterrupted run searched twice: change the data")


def _same_records(got: list[dict], want: list[dict]) -> None:
    """Equal records (numbers to 1e-8), wall times aside."""
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert set(a) == set(b)
        for key in set(a) - {"seconds"}:
            if isinstance(b[key], float) or isinstance(b[key], list):
                np.testing.assert_allclose(a[key], b[key], rtol=1e-8, atol=0, err_msg=key)
            else:
                assert a[key] == b[key], key


def _same_end(k: Killed, full: dict) -> None:
    """The resumed run ends where the uninterrupted one ends, to 1e-8 (float64)."""
    r = k.record
    assert r["complete"] is True and len(r["history"]) == len(full["history"])
    np.testing.assert_allclose([h["loss"] for h in r["history"]],
                               [h["loss"] for h in full["history"]], rtol=1e-8, atol=0)
    for key in ("outputscale", "noise", "mean", "lengthscale"):
        np.testing.assert_allclose(r["hyperparameters"][key], full["hyperparameters"][key],
                                   rtol=1e-8, atol=0)
    assert r["final_train_loss"] == pytest.approx(full["final_train_loss"], rel=1e-8, abs=0)
    assert r["test_rmse"] == pytest.approx(full["test_rmse"], rel=1e-8)


def _killed_in_start(k: Killed, full: dict) -> None:
    assert k.unchanged and k.start_stages == 1  # the first rung kept, bytes unchanged
    assert k.epoch is None  # the full fit had not begun: the start's file is resumed
    stages = full["init_subset"]["stages"]
    assert len(stages) >= 2, "the ladder must have two rungs for this row"
    _same_records(k.record["init_subset"]["stages"], stages)
    _same_end(k, full)


def _killed_between(k: Killed, full: dict) -> None:
    assert k.unchanged and k.epoch == 4  # epoch 5 was lost, epoch 4 kept (bytes unchanged)
    _same_end(k, full)


def _killed_in_search(k: Killed, full: dict) -> None:
    j, _ = _search_point(full)
    assert k.unchanged and k.epoch == j - j % 2  # the last one by count, bytes unchanged
    _same_end(k, full)


def _stopped_in_search(k: Killed, full: dict) -> None:
    j, K = _search_point(full)
    # honoured within one evaluation: the one in progress ended, no further one began
    assert k.evaluations == K
    # the step in progress was abandoned; the last accepted point was checkpointed
    assert len(k.partial["history"]) == j and k.partial["complete"] is False
    assert k.epoch == j
    _same_records(k.partial["history"], full["history"][:j])
    _same_end(k, full)


KILLS = [
    Kill("SIGKILL during the subset start (its 2nd rung)", "a wrapped subset_stage", "start",
         _AT_STAGE.replace("{k}", "2"), -signal.SIGKILL, lambda k: k.start, _killed_in_start,
         watches_start=True),
    Kill("SIGKILL between checkpoints of the full fit (after epoch 5, every 2)",
         "a wrapped _Checkpoints.after_epoch", "start", _AFTER_EPOCH.replace("{k}", "5"),
         -signal.SIGKILL, lambda k: k.ckpt, _killed_between),
    Kill("SIGKILL during a line search", "a wrapped evaluator, at its K-th evaluation",
         "search", _AT_EVALUATION.replace("{sig}", "SIGKILL"), -signal.SIGKILL,
         lambda k: k.ckpt, _killed_in_search),
    Kill("SIGTERM during a line search", "a wrapped evaluator, at its K-th evaluation",
         "search", _AT_EVALUATION.replace("{sig}", "SIGTERM"), gcli.EXIT_INTERRUPTED,
         lambda k: k.ckpt, _stopped_in_search),
    Kill("SIGINT (Ctrl-C) during a line search", "a wrapped evaluator, at its K-th evaluation",
         "search", _AT_EVALUATION.replace("{sig}", "SIGINT"), gcli.EXIT_INTERRUPTED,
         lambda k: k.ckpt, _stopped_in_search),
]
KILL_SEEN: dict[int, tuple[str, ...]] = {}


@pytest.fixture(scope="module")
def kill_setup(tmp_path_factory):
    """Tiny data, the two configs and each config's uninterrupted run (its record)."""
    import pandas as pd

    tmp = tmp_path_factory.mktemp("kills")
    rng = np.random.default_rng(0)
    X = rng.uniform(-2, 2, (KILL_DATA_ROWS, 2))
    df = pd.DataFrame(X, columns=["a", "b"])
    # nearly noise-free: the 50-row subset fit interpolates, so the ladder has several rungs
    df["y"] = np.sin(2 * X[:, 0]) + 0.3 * X[:, 1] + 0.02 * rng.standard_normal(len(X))
    data = tmp / "data.csv"
    df.to_csv(data, index=False)
    configs = {"start": (12, 50), "search": (10, 0)}
    out = {}
    for name, (epochs, init_subset) in configs.items():
        cfg = tmp / f"{name}.toml"
        cfg.write_text(KILL_CONFIG.format(epochs=epochs, init_subset=init_subset))
        o = child(*_kill_argv(data, cfg, tmp / f"{name}-full.json", tmp / f"{name}-full.ckpt"))
        assert o.code == 0, o.stderr[-3000:]
        out[name] = (cfg, json.loads((tmp / f"{name}-full.json").read_text()))
    return data, out


def _kill_argv(data, cfg, out, ckpt, *extra):
    return ["fit", "--data", data, "--target", "y", "--config", cfg, "--out", out,
            "--checkpoint", ckpt, *extra]


def _kill_params():
    for i, f in enumerate(KILLS):
        yield pytest.param(i, f, id=f.fault, marks=[pytest.mark.slow])


@pytest.mark.parametrize("i,f", list(_kill_params()))
def test_killed_run_resumes_to_the_same_end(i, f, kill_setup, tmp_path):
    data, configs = kill_setup
    cfg, full = configs[f.config]
    ckpt, out = tmp_path / "run.ckpt", tmp_path / "run.json"
    start, count, snap = gckpt.start_path(ckpt), tmp_path / "count", tmp_path / "snapshot"
    target = start if f.watches_start else ckpt
    j, K = _search_point(full) if f.config == "search" else (0, 0)
    prelude = _SNAP.format(target=str(target), snap=str(snap)) + f.hook.format(
        n=full["n_train"], count=str(count), k=K)
    first = child(*_kill_argv(data, cfg, out, ckpt, "--quiet"), prelude=prelude)
    partial = json.loads(out.read_text()) if f.code == gcli.EXIT_INTERRUPTED else None
    unchanged = snap.exists() and target.exists() and target.read_bytes() == snap.read_bytes()
    epoch = gckpt.checkpoint_epoch(ckpt) if ckpt.exists() else None
    stages = len(gckpt.read_start(start)[1]["stages"]) if start.exists() else None
    no_temp = not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    resumed = child(*_kill_argv(data, cfg, out, ckpt, "--resume"))
    assert resumed.code == 0, resumed.stderr[-3000:]
    k = Killed(first, resumed, ckpt, start, unchanged, epoch, stages,
               len(count.read_text().split()) if count.exists() else 0,
               json.loads(out.read_text()), partial)
    assert no_temp

    assert first.code == f.code, first.stderr[-3000:]                 # 1. the exit code
    if f.code == gcli.EXIT_INTERRUPTED:  # the interrupted run says where and how to go on
        message = first.stderr.strip().splitlines()[-1]
        assert message.startswith("interrupted by SIG") and "--resume" in message, message
    else:  # a SIGKILL'd run says nothing: the resumed run names what it continues from
        message = next(line for line in resumed.stdout.splitlines()
                       if line.startswith("resuming from"))
    assert str(f.path(k)) in message, message                         # 2. names the path
    for o in (first, resumed):                                        # 3. no traceback
        assert "Traceback" not in o.stderr, o.stderr[-3000:]
    f.check(k, full)                          # 4. the checkpoint, 5. the same end as full
    kept = "bytes unchanged" if f.code < 0 else "the last accepted step"
    shown = message.replace(str(tmp_path), "…").replace(str(Path(data).parent), "…")
    KILL_SEEN[i] = (f.fault, f.how, str(f.code), kept, shown)
