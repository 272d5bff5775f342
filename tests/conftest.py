"""Shared pytest setup.

KeOps compiles each distinct formula once (~10 s of g++) and caches the shared library on disk;
pin that cache to one folder inside the repository (ignored by git) so that every test session
reuses it. This must happen before pykeops is first imported.
"""

import os
from pathlib import Path

os.environ.setdefault(
    "KEOPS_CACHE_FOLDER", str(Path(__file__).resolve().parents[1] / ".keops_cache")
)
