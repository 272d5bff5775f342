"""An installed wheel works outside the repository (issue 33, item 7).

Build the wheel from a copy of the sources (no network, no build isolation), install it into a
fresh virtual environment, and from an empty folder elsewhere list the data sets and fit yacht:
the shipped data come from the wheel, the record and checkpoint land in that folder.
"""

import json
import math
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _run(cmd, **kw):
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=900, **kw)
    assert out.returncode == 0, (f"{cmd}\n--- stdout:\n{out.stdout[-3000:]}\n--- stderr:\n"
                                 f"{out.stderr[-3000:]}")
    return out.stdout


def _inside(path, folder) -> bool:
    return Path(path).resolve().is_relative_to(Path(folder).resolve())


def _build_wheel(tmp: Path) -> Path:
    # from a copy, so that the build leaves no build/ or egg-info in the checkout (a stale
    # build/lib would otherwise leak deleted modules into later wheels)
    src = tmp / "src"
    src.mkdir()
    for f in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / f, src / f)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for d in ("gpadjoint", "datasets"):
        shutil.copytree(ROOT / d, src / d, ignore=ignore)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
          "--no-index", "--quiet", "-w", tmp / "dist", src])
    (wheel,) = (tmp / "dist").glob("gpadjoint-*.whl")
    return wheel


def _fresh_venv(tmp: Path) -> tuple[Path, Path]:
    """A new virtual environment that sees this interpreter's packages (jax, ...) but not its
    gpadjoint: a ``.pth`` lists this process's package folders, after the venv's own.

    ``venv --system-site-packages`` would not do: run from a virtual environment (as CI's
    ``.venv``) it exposes the base interpreter's packages, not the environment's.
    """
    env_dir = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", env_dir])
    python = env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    purelib = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                        env=_clean_env()).strip())
    # Plain folders, not site dirs: their .pth files (the editable install's finder among
    # them) are not run, and no folder that holds a gpadjoint package is listed. (CI's .venv
    # lies inside the checkout, so "inside the repo" cannot be the test.)
    dirs = [p for p in sys.path if p and Path(p).is_dir()
            and not (Path(p) / "gpadjoint").exists()]
    (purelib / "_parent_env.pth").write_text("\n".join(dirs) + "\n")
    return env_dir, python


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return {**env, **extra}


def test_wheel_installs_and_fits_yacht_outside_the_repo(tmp_path):
    assert not _inside(tmp_path, ROOT)
    wheel = _build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    assert "gpadjoint/default.toml" in names and "gpadjoint/_data/MANIFEST.tsv" in names
    assert {"gpadjoint/_data/yacht/data.csv.gz", "gpadjoint/_data/kin8nm/data.txt"} <= set(names)
    assert not any(n.startswith(("tests/", "scripts/", "results/")) for n in names)

    env_dir, python = _fresh_venv(tmp_path)
    env = _clean_env(GPADJOINT_DATA=str(tmp_path / "data_home"))
    _run([python, "-m", "pip", "install", "--no-deps", "--force-reinstall", "--no-index",
          "--quiet", wheel], env=env)

    work = tmp_path / "elsewhere"
    work.mkdir()
    where = _run([python, "-c", "import gpadjoint, gpadjoint.datasets as d; "
                  "print(gpadjoint.__file__); print(d.SHIPPED_DATA_DIR)"], cwd=work, env=env)
    module, data_dir = where.split()
    assert _inside(module, env_dir) and _inside(data_dir, env_dir), where  # the wheel's copy

    exe = env_dir / ("Scripts/gpadjoint.exe" if os.name == "nt" else "bin/gpadjoint")
    listing = _run([exe, "datasets"], cwd=work, env=env)
    rows = {line.split()[0]: line for line in listing.splitlines()[3:]}
    assert len(rows) == 22 and data_dir in listing and str(tmp_path / "data_home") in listing
    assert rows["yacht"].rstrip().endswith("shipped")
    assert "to download: gpadjoint.datasets.download_dataset('song')" in rows["song"]

    _run([exe, "fit", "--dataset", "yacht", "--epochs", "3", "--random-state", "1", "--quiet"],
         cwd=work, env=env)
    (record,) = (work / "results" / "runs").glob("yacht-split0-seed1-*.json")
    assert (work / "results" / "checkpoints" / "yacht-split0-seed1.ckpt").is_file()
    rec = json.loads(record.read_text())
    assert rec["complete"] and math.isfinite(rec["test_rmse"]) and rec["n_train"] == 278
    assert rec["seed"] == 1 and rec["config"]["train"]["random_state"] == 1
    assert rec["commit"] == "unknown"  # an installed wheel is no git checkout
    assert rec["versions"]["gpadjoint"] == "0.1.0"
    assert not (tmp_path / "data_home").exists()  # shipped data: nothing downloaded
