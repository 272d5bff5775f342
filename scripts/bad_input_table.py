"""Run every bad-input case of tests/test_bad_input.py and write what the user sees.

Writes ``results/bad_inputs.md``: entry point, the bad input, the exception type and its
message (first line, shortened), one row per case. The test module asserts the messages and,
asked by this script (environment ``GPADJ_BAD_INPUT_TABLE``), writes the table itself, so the
table shows exactly what the passing tests saw; a failing case fails this script.

    python scripts/bad_input_table.py
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402


def main(argv=None) -> int:
    out = bu.ROOT / "results" / "bad_inputs.md"
    env = os.environ | {"GPADJ_BAD_INPUT_TABLE": str(out), "GPADJ_COMMIT": bu.git_commit()}
    rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "tests/test_bad_input.py"], cwd=bu.ROOT, env=env)
    if rc != 0:
        print("tests/test_bad_input.py failed: the table was not written", file=sys.stderr)
        return rc
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
