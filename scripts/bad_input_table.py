"""Run every bad-input case of tests/test_bad_input.py and write what the user sees.

Writes ``results/bad_inputs.md``: entry point, the bad input, the exception type and its
message (first line, shortened), one row per case; the test module asserts the same messages.

    python scripts/bad_input_table.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _benchutil as bu  # noqa: E402
import pytest  # noqa: E402
import test_bad_input as T  # noqa: E402


def run_case(action, tmp: Path) -> tuple[str, str]:
    with pytest.MonkeyPatch.context() as mp:
        try:
            if action is None:
                T._keops_unavailable(mp)
            else:
                action(tmp)
        except Exception as e:  # noqa: BLE001 - the table reports whatever the user would see
            return type(e).__name__, str(e)
    return "(no error)", ""


def main() -> int:
    lines = [
        "# What the user sees for bad input",
        "",
        f"Written by `scripts/bad_input_table.py` (commit {bu.git_commit()}) from the cases of "
        "`tests/test_bad_input.py`, which asserts these messages. Paths shortened to `…/`.",
        "",
        "| entry point | bad input | error | message |",
        "|---|---|---|---|",
    ]
    for entry, what, action, _exc, _pattern in T.CASES:
        with tempfile.TemporaryDirectory(prefix="gpadj_bad_") as tmp:
            name, msg = run_case(action, Path(tmp))
            msg = msg.replace(tmp, "…")
        msg = " ".join(msg.split())
        msg = msg if len(msg) <= 300 else msg[:297] + "..."
        msg = msg.replace("|", "\\|")
        lines.append(f"| {entry} | {what} | {name} | {msg} |")
    out = ROOT / "results" / "bad_inputs.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out} ({len(T.CASES)} cases)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
