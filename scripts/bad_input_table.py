"""Run the bad-input cases and the fault rows, and write what the user sees.

Writes ``results/bad_inputs.md``: first the bad-input table of tests/test_bad_input.py (entry
point, the bad input, the exception type and its message, one row per case), then the faults
table of tests/test_faults.py (the fault, how it is made, the exit code, whether the earlier
checkpoint was kept, and the error line). The test modules assert the messages and, asked by
this script (environment ``GPADJ_BAD_INPUT_TABLE`` and ``GPADJ_FAULT_TABLE``), write the tables
themselves, so they show exactly what the passing tests saw; a failing case or row fails this
script and leaves the file as it was.

    python scripts/bad_input_table.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402


def main(argv=None) -> int:
    out = bu.ROOT / "results" / "bad_inputs.md"
    with tempfile.TemporaryDirectory() as tmp:
        bad, faults = Path(tmp) / "bad.md", Path(tmp) / "faults.md"
        env = os.environ | {"GPADJ_BAD_INPUT_TABLE": str(bad), "GPADJ_FAULT_TABLE": str(faults),
                            "GPADJ_COMMIT": bu.git_commit()}
        tests = ["tests/test_bad_input.py", "tests/test_faults.py"]
        rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                              *tests], cwd=bu.ROOT, env=env)
        if rc != 0:
            print(f"{' or '.join(tests)} failed: the tables were not written", file=sys.stderr)
            return rc
        out.write_text(bad.read_text() + "\n" + faults.read_text())
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
