"""Bad input at every entry point gets a clear error naming what is wrong and how to fix it.

One table, :data:`CASES`, covers the Python API (``GPRegressor``, ``fit``), the loader
(``load_dataset``, ``from_arrays``, ``load_csv``), config files and the command line. Each case
names the entry point, the input, the exception expected and a pattern its message must
contain. ``scripts/bad_input_table.py`` runs the same table and writes what the user sees to
``results/bad_inputs.md``.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import gpadjoint.data as D
import gpadjoint.datasets as DS
from gpadjoint.cli import main as cli_main
from gpadjoint.config import load_config
from gpadjoint.model import GPRegressor

FAST = dict(epochs=1, num_probes=2, lanczos_depth=3, precond_rank=2, random_state=0)


class CLIError(Exception):
    """A command line that exited non-zero; the message is what it printed on stderr."""


def cli(*argv: str) -> None:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = cli_main([str(a) for a in argv])
        except SystemExit as e:  # argparse errors and explicit SystemExit messages
            rc = e.code if isinstance(e.code, int) else 2
            if not isinstance(e.code, int):
                err.write(str(e.code))
    if rc:
        raise CLIError(err.getvalue().strip())


def xy(n=10, d=2, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.uniform(-2, 2, (n, d))
    return X, np.sin(X[:, 0]) + 0.1 * rng.standard_normal(n)


def with_nan(where):
    X, y = xy()
    if where == "X":
        X[3, 1] = np.nan
        X[7, 0] = np.inf
    else:
        y[5] = np.nan
    return X, y


def write(tmp: Path, name: str, text: str) -> Path:
    p = tmp / name
    p.write_text(text)
    return p


def corrupted_yacht(tmp: Path) -> Path:
    shutil.copytree(DS.SHIPPED_DATA_DIR / "yacht", tmp / "yacht")
    f = tmp / "yacht" / "data.csv.gz"
    raw = bytearray(f.read_bytes())
    raw[100] ^= 0x01
    f.write_bytes(bytes(raw))
    return tmp


def truncated_yacht(tmp: Path) -> Path:
    shutil.copytree(DS.SHIPPED_DATA_DIR / "yacht", tmp / "yacht")
    f = tmp / "yacht" / "data.csv.gz"
    f.write_bytes(f.read_bytes()[:200])
    return tmp


def fitted():
    return GPRegressor(**FAST).fit(*xy())


CSV = "a,b,colour,price\n1,2,red,3\n2,3,blue,4\n3,1,red,5\n4,4,green,6\n"
NUM_CSV = "a,b,price\n" + "".join(f"{i},{(i * 7) % 5},{i % 3}\n" for i in range(20))

# (entry point, bad input, action(tmp_path), exception, pattern the message must contain)
CASES = [
    ("GPRegressor.fit", "NaN/inf in X", lambda t: GPRegressor(**FAST).fit(*with_nan("X")),
     ValueError, r"X contains 2 NaN/inf .*rows \[3, 7\], columns \[0, 1\]"),
    ("GPRegressor.fit", "NaN in y", lambda t: GPRegressor(**FAST).fit(*with_nan("y")),
     ValueError, r"y contains 1 NaN/inf .*rows \[5\]"),
    ("from_arrays", "NaN/inf in X", lambda t: D.from_arrays(*with_nan("X")),
     ValueError, r"rows \[3, 7\], columns \[0, 1\]"),
    ("GPRegressor.fit", "X and y of different lengths",
     lambda t: GPRegressor(**FAST).fit(xy()[0], xy()[1][:-1]),
     ValueError, "inconsistent numbers of samples"),
    ("from_arrays", "X and y of different lengths",
     lambda t: D.from_arrays(np.ones((5, 2)), np.ones(4)), ValueError, "5 rows but y has 4"),
    ("GPRegressor.fit", "1-D X", lambda t: GPRegressor(**FAST).fit(xy()[0][:, 0], xy()[1]),
     ValueError, r"Expected 2D array, got 1D array"),
    ("from_arrays", "1-D X", lambda t: D.from_arrays(np.ones(5), np.ones(5)),
     ValueError, r"2-D \(n, d\).*reshape\(-1, 1\)"),
    ("GPRegressor.fit", "3-D X",
     lambda t: GPRegressor(**FAST).fit(np.ones((5, 2, 2)), np.ones(5)),
     ValueError, "dim 3"),
    ("from_arrays", "3-D X", lambda t: D.from_arrays(np.ones((5, 2, 2)), np.ones(5)),
     ValueError, r"got shape \(5, 2, 2\)"),
    ("GPRegressor.fit", "empty data",
     lambda t: GPRegressor(**FAST).fit(np.ones((0, 2)), np.ones(0)),
     ValueError, "0 sample"),
    ("from_arrays", "empty data", lambda t: D.from_arrays(np.ones((0, 2)), np.ones(0)),
     ValueError, "empty"),
    ("GPRegressor.fit", "a single point",
     lambda t: GPRegressor(**FAST).fit(np.ones((1, 2)), np.ones(1)), ValueError, "1 sample"),
    ("from_arrays", "a single point", lambda t: D.from_arrays(np.ones((1, 2)), np.ones(1)),
     ValueError, "at least 2 training points"),
    ("GPRegressor.fit", "zero features",
     lambda t: GPRegressor(**FAST).fit(np.ones((5, 0)), np.ones(5)), ValueError, "0 feature"),
    ("from_arrays", "zero features", lambda t: D.from_arrays(np.ones((5, 0)), np.ones(5)),
     ValueError, "zero features"),
    ("load_csv", "non-numeric column", lambda t: D.load_csv(write(t, "h.csv", CSV), "price"),
     ValueError, r"non-numeric column\(s\).*\['colour'\]; encode or drop"),
    ("gpadjoint fit --data", "non-numeric column",
     lambda t: cli("fit", "--data", write(t, "h.csv", CSV), "--target", "price"),
     CLIError, r"non-numeric column\(s\).*colour"),
    ("load_csv", "target column that does not exist",
     lambda t: D.load_csv(write(t, "n.csv", NUM_CSV), "cost"),
     ValueError, r"target column 'cost' not in .*columns present: \['a', 'b', 'price'\]"),
    ("gpadjoint fit --data", "target column that does not exist",
     lambda t: cli("fit", "--data", write(t, "n.csv", NUM_CSV), "--target", "cost"),
     CLIError, "target column 'cost' not in"),
    ("load_dataset", "unknown data set name", lambda t: DS.load_dataset("elevator"),
     ValueError, r"Unknown data set 'elevator'.*'elevators'.*yacht"),
    ("gpadjoint fit --dataset", "unknown data set name",
     lambda t: cli("fit", "--dataset", "elevator"), CLIError, r"elevator.*elevators"),
    ("GPRegressor", "unknown kernel", lambda t: GPRegressor(kernel="sqexp").fit(*xy()),
     ValueError, r"\[model\] kernel = 'sqexp': choose one of .*matern32"),
    ("GPRegressor", "unknown backend", lambda t: GPRegressor(backend="cuda").fit(*xy()),
     ValueError,
     r"\[model\] backend = 'cuda': choose one of 'auto', 'dense', 'stored', 'blocked', 'keops'"),
    ("gpadjoint fit", "unknown kernel",
     lambda t: cli("fit", "--dataset", "yacht", "--kernel", "sqexp"),
     CLIError, r"invalid choice: 'sqexp'"),
    ("gpadjoint fit", "unknown backend",
     lambda t: cli("fit", "--dataset", "yacht", "--backend", "cuda"),
     CLIError, r"invalid choice: 'cuda'"),
    ("load_dataset", "corrupted data file (one flipped bit)",
     lambda t: DS.load_dataset("yacht", data_dir=corrupted_yacht(t)),
     DS.ChecksumError, r"Checksum mismatch for .*yacht/data.csv.gz"),
    ("load_dataset", "truncated data file",
     lambda t: DS.load_dataset("yacht", data_dir=truncated_yacht(t)),
     DS.ChecksumError, r"Checksum mismatch for .*yacht/data.csv.gz"),
    ("config file", "unknown key",
     lambda t: load_config(write(t, "c.toml", "[optim]\nlearning_rate = 0.1\n")),
     ValueError, r"unknown key 'learning_rate' in section \[optim\] \(did you mean 'lr'\?\)"),
    ("config file", "wrong type",
     lambda t: load_config(write(t, "c.toml", '[train]\nepochs = "100"\n')),
     ValueError, r"\[train\] epochs.*int.*str"),
    ("gpadjoint fit --config", "unknown key",
     lambda t: cli("fit", "--dataset", "yacht", "--config",
                   write(t, "c.toml", "[mll]\nprobes = 4\n")),
     CLIError, r"unknown key 'probes' in section \[mll\] \(did you mean 'num_probes'\?\)"),
    ("GPRegressor", "epochs = -1", lambda t: GPRegressor(epochs=-1).fit(*xy()),
     ValueError, r"\[train\] epochs = -1: must be >= 0"),
    ("GPRegressor", "num_probes = 0", lambda t: GPRegressor(num_probes=0).fit(*xy()),
     ValueError, r"\[mll\] num_probes = 0: must be positive"),
    ("GPRegressor", "lanczos_depth = 0", lambda t: GPRegressor(lanczos_depth=0).fit(*xy()),
     ValueError, r"\[mll\] lanczos_depth = 0: must be positive"),
    ("GPRegressor", "lr = 0", lambda t: GPRegressor(lr=0.0).fit(*xy()),
     ValueError, r"\[optim\] lr = 0.0: must be positive"),
    ("gpadjoint fit", "--epochs -1", lambda t: cli("fit", "--dataset", "yacht", "--epochs", "-1"),
     CLIError, r"\[train\] epochs = -1: must be >= 0"),
    ("gpadjoint fit", "--lr -0.1", lambda t: cli("fit", "--dataset", "yacht", "--lr", "-0.1"),
     CLIError, r"\[optim\] lr.*positive"),
    ("config file", "num_probes = 0",
     lambda t: load_config(write(t, "c.toml", "[mll]\nnum_probes = 0\n")),
     ValueError, r"\[mll\] num_probes.*positive"),
    ("config file", "lanczos_depth = -3",
     lambda t: load_config(write(t, "c.toml", "[mll]\nlanczos_depth = -3\n")),
     ValueError, r"\[mll\] lanczos_depth.*positive"),
    ("GPRegressor.predict", "different number of features than fit",
     lambda t: fitted().predict(np.zeros((4, 3))),
     ValueError, "X has 3 features, but GPRegressor is expecting 2"),
    ("make_backend / --backend keops", "explicitly requested keops without pykeops/g++ (simulated)",
     None, RuntimeError, r"backend 'keops' was requested but pykeops cannot run here: g\+\+ not "
     r"found \(simulated\)\. Install a C\+\+ compiler"),
]


def _keops_unavailable(monkeypatch):
    import gpadjoint.keops_bridge as kb

    monkeypatch.setattr(kb, "keops_available", lambda: (False, "g++ not found (simulated)"))
    from gpadjoint.matvec import make_backend

    make_backend("keops", "matern32")


# What the user saw in each case, in CASES order: (entry point, bad input, error, message).
SEEN: list[tuple[str, str, str, str]] = []


@pytest.mark.parametrize(
    "entry,what,action,exc,pattern", CASES, ids=[f"{c[0]}: {c[1]}" for c in CASES]
)
def test_bad_input_is_named(entry, what, action, exc, pattern, tmp_path, monkeypatch):
    with pytest.raises(exc, match=pattern) as info:
        if action is None:
            _keops_unavailable(monkeypatch)
        else:
            action(tmp_path)
    SEEN.append((entry, what, type(info.value).__name__,
                 str(info.value).replace(str(tmp_path), "…")))


@pytest.fixture(scope="module", autouse=True)
def _table_of_messages():
    """With GPADJ_BAD_INPUT_TABLE=PATH set, write what the user saw as a Markdown table there.

    ``scripts/bad_input_table.py`` sets it (and GPADJ_COMMIT) to write results/bad_inputs.md.
    """
    yield
    out = os.environ.get("GPADJ_BAD_INPUT_TABLE")
    if not out:
        return
    lines = [
        "# What the user sees for bad input",
        "",
        f"Written by `scripts/bad_input_table.py` (commit {os.environ.get('GPADJ_COMMIT', '?')}) "
        "from the cases of `tests/test_bad_input.py`, which asserts these messages. Paths "
        "shortened to `…/`.",
        "",
        "| entry point | bad input | error | message |",
        "|---|---|---|---|",
    ]
    for entry, what, name, msg in SEEN:
        msg = " ".join(msg.split())
        msg = msg if len(msg) <= 300 else msg[:297] + "..."
        msg = msg.replace("|", "\\|")
        lines.append(f"| {entry} | {what} | {name} | {msg} |")
    Path(out).write_text("\n".join(lines) + "\n")
