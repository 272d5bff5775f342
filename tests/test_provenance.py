"""Provenance: one description of commit, machine and versions for run records and benchmarks."""

import re
import subprocess
import sys
from pathlib import Path

import jax

from gpadjoint import provenance

ROOT = Path(__file__).resolve().parents[1]


def test_commit_is_this_checkouts_head():
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip()
    if not head:  # not a git checkout (e.g. an unpacked sdist)
        assert provenance.commit() == "unknown"
        return
    full, short = provenance.commit(), provenance.commit(short=True)
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", full) and full.startswith(head)
    assert head.startswith(short.removesuffix("+dirty"))


def test_commit_is_unknown_outside_a_checkouts_top(monkeypatch):
    # an installed wheel: the package's parent folder (site-packages) is no checkout's top, even
    # when it lies inside one (a virtual environment in a repository)
    monkeypatch.setattr(provenance, "REPO", ROOT / "gpadjoint")
    assert provenance.commit() == "unknown"


def test_versions_and_machine_describe_this_process():
    v = provenance.versions()
    assert v["jax"] == jax.__version__ and set(provenance.CORE) <= set(v)
    assert "nosuchdist" not in provenance.versions(("nosuchdist",), keep_missing=False)
    assert provenance.versions(("nosuchdist",))["nosuchdist"] is None
    m = provenance.machine()
    assert m["jax_backend"] == jax.default_backend() and m["cores"] >= 1
    assert provenance.machine_line().startswith(provenance.cpu_name())


def test_the_benchmarks_use_the_same_provenance():
    sys.path.insert(0, str(ROOT / "scripts"))
    import _benchutil as bu

    assert bu.machine() == provenance.machine_line()
    assert bu.git_commit() == provenance.commit(short=True)
