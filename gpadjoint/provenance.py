"""Provenance of a result: the commit, the machine and the library versions.

One module for the command line's run records and the benchmark scripts' rows, so that every
result file describes its origin the same way. Nothing here imports JAX unless asked for the
devices.
"""

from __future__ import annotations

import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

# The source checkout this package may run from: used only to look up its git commit. Outputs
# (run records, checkpoints) go under the current working folder, never here: in an installed
# wheel this is site-packages.
REPO = Path(__file__).resolve().parents[1]

# The distributions a run depends on (package metadata, not imports: importing pykeops would
# print its CUDA notice, importing torch costs seconds).
CORE = ("gpadjoint", "jax", "jaxlib", "optax", "numpy", "pandas", "scikit-learn", "pykeops")
PEERS = ("torch", "gpytorch")

# What runs write into the checkout: changing it does not change the code that ran, so it does
# not make the commit ``+dirty`` (a benchmark that replaces its own record is still clean).
OUTPUTS = ("results",)


def commit(short: bool = False) -> str:
    """Git commit of the checkout this package runs from, ``+dirty`` if tracked files changed.

    Tracked files under :data:`OUTPUTS` do not count: they are what runs write.

    ``"unknown"`` unless :data:`REPO` is the top of a git checkout (an installed wheel's
    site-packages is not, even inside some other repository's virtual environment) or without
    git.
    """
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--show-toplevel"] + (["--short"] if short else []) + ["HEAD"],
            cwd=REPO, capture_output=True, text=True, timeout=10,
        ).stdout.split()
        if len(out) != 2 or Path(out[0]).resolve() != REPO:
            return "unknown"
        sha = out[1]
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
             *(f":(exclude){o}" for o in OUTPUTS)],
            cwd=REPO, capture_output=True, text=True, timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha + ("+dirty" if dirty else "")) if sha else "unknown"


def cpu_name() -> str:
    """Return the CPU model name (``/proc/cpuinfo``), else the machine architecture."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line() -> str:
    """One line: CPU; cores; operating system (the benchmark CSVs' ``machine`` column)."""
    return f"{cpu_name()}; {os.cpu_count()} cores; {platform.system()} {platform.release()}"


def machine() -> dict:
    """CPU, cores, platform and JAX's backend and devices (the run record's ``machine``)."""
    import jax

    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "jax_backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
    }


def versions(dists=CORE, *, keep_missing: bool = True) -> dict:
    """Python's and each distribution's version; a missing one is None (or left out)."""
    out = {"python": platform.python_version()}
    for dist in dists:
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            if keep_missing:
                out[dist] = None
    return out
