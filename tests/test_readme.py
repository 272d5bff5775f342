"""The README is short, its Python runs as written, and CI runs the test command it gives."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_readme_is_short():
    assert len(README.splitlines()) <= 250


def test_ci_runs_the_readme_test_command():
    install, tests = _blocks("bash")[:2]
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests.strip() in ci.splitlines()
    assert "gpadjoint fit --dataset elevators" in install


@pytest.mark.slow
def test_python_blocks_run_as_written(tmp_path):
    # in a fresh interpreter without the test session's x64 opt-in, as a new user runs them
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    blocks = _blocks("python")
    assert len(blocks) >= 2
    for code in blocks:
        out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, f"{code}\n--- stderr:\n{out.stderr[-3000:]}"
    assert (tmp_path / "yacht.gp").exists()


def test_headline_table_is_the_generated_one():
    sys.path.insert(0, str(ROOT / "scripts"))
    import make_table

    recs = make_table.load_records(ROOT / "results" / "uci")
    unfinished = make_table.load_unfinished(ROOT / "results" / "uci")
    table = "\n".join(make_table.headline(make_table.headline_rows(recs), unfinished))
    start, end = make_table.HEADLINE
    assert README.split(start, 1)[1].split(end, 1)[0].strip() == table.strip()
