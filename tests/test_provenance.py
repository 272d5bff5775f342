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


def test_a_changed_result_does_not_make_the_commit_dirty(tmp_path, monkeypatch):
    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    (tmp_path / "gpadjoint").mkdir()
    (tmp_path / "results").mkdir()
    (tmp_path / "gpadjoint" / "m.py").write_text("x = 1\n")
    (tmp_path / "results" / "r.json").write_text("{}\n")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    monkeypatch.setattr(provenance, "REPO", tmp_path.resolve())
    clean = provenance.commit()
    assert re.fullmatch(r"[0-9a-f]{40}", clean)
    (tmp_path / "results" / "r.json").unlink()  # a benchmark replacing its own record
    assert provenance.commit() == clean
    (tmp_path / "gpadjoint" / "m.py").write_text("x = 2\n")  # the code that runs changed
    assert provenance.commit() == clean + "+dirty"


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
