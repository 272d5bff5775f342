"""Correct the records in results/ once: the paper-settings method's name and the settings run.

Two defects of the records written by ``scripts/bench_uci.py`` before the harness:

* the method run with configs/paper.toml was called ``gpadjoint``, which reads as the default a
  user gets; it is renamed ``gpadjoint-paper`` in every record (file name and ``method``), in
  every CSV's method column and in every reference to a record's file name in results/;
* every record said ``"dtype": "float32", "lr": 0.05`` whatever ran. Those two constants are
  dropped, and ``settings`` gains the resolved settings (:func:`_benchutil.run_settings`)
  computed from the record's own ``settings.config`` (the config the run loaded, as
  ``gpadjoint fit`` recorded it) and ``n_train``, with "auto" resolved by the package's rules
  (deterministic in those two); GPyTorch's records gain the dtype its baseline trains in.
  ``settings_reconstructed`` says that this was done, by which script and at which commit.

Nothing else changes: every number stays as it was. Running it again changes nothing.

    python scripts/migrate_records.py [--results results]
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402

OLD, NEW = "gpadjoint", "gpadjoint-paper"
# a record's file name with the old method: <data set>-split<k>-gpadjoint-<backend>-<epochs>ep
RECORD_NAME = re.compile(r"(-split\d+-)gpadjoint-(dense|blocked|keops)-(\d+ep)")
METHOD_COLUMNS = ("method", "estimator")


def _rename_refs(text: str) -> str:
    return RECORD_NAME.sub(rf"\1{NEW}-\2-\3", text)


def fix_record(rec: dict, commit: str) -> dict:
    """Return ``rec`` with the method renamed and its resolved settings added (idempotent)."""
    rec = dict(rec)
    if rec.get("method") == OLD:
        rec["method"] = NEW
    settings = dict(rec.get("settings") or {})
    if "settings_reconstructed" in rec:
        return rec
    rec.pop("lr", None)
    rec.pop("dtype", None)
    if rec.get("method") == "gpytorch":
        settings = {"dtype": "float32"} | settings  # gpytorch_baseline trains in torch.float32
        how = "dtype: the GPyTorch baseline's training dtype (torch.float32 in its code)"
    else:
        settings = bu.run_settings(settings["config"], rec["n_train"]) | settings
        how = ("from the record's own settings.config and n_train, 'auto' resolved by "
               "gpadjoint.mll.choose_estimator and gpadjoint.optimizers.resolve_optimizer")
    rec["settings"] = settings
    rec["settings_reconstructed"] = {"by": "scripts/migrate_records.py", "commit": commit,
                                     "how": how}
    return rec


def fix_csv(path: Path) -> bool:
    """Rename the old method in a CSV's method columns and record names; True if it changed."""
    with path.open(newline="") as fh:
        text = fh.read()
    rows = list(csv.reader(io.StringIO(text, newline="")))
    if not rows:
        return False
    cols = [i for i, name in enumerate(rows[0]) if name in METHOD_COLUMNS]
    for row in rows[1:]:
        for i in cols:
            if i < len(row) and row[i] == OLD:
                row[i] = NEW
    out = io.StringIO(newline="")
    csv.writer(out, lineterminator="\r\n" if "\r\n" in text else "\n").writerows(rows)
    new = _rename_refs(out.getvalue())
    if new != text:
        with path.open("w", newline="") as fh:
            fh.write(new)
        return True
    return False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default=str(bu.ROOT / "results"))
    args = ap.parse_args(argv)
    results = Path(args.results)
    commit = bu.git_commit()
    changed = []
    for path in sorted((results / "uci").glob("*.json")):
        rec = json.loads(path.read_text())
        new = fix_record(rec, commit)
        target = path.with_name(_rename_refs(path.name))
        if new != rec or target != path:
            bu.write_record(target, new)
            if target != path:
                path.unlink()
            changed.append(target.name)
    for path in sorted(results.rglob("*.csv")):
        if fix_csv(path):
            changed.append(str(path.relative_to(results)))
    for path in sorted(list(results.rglob("*.jsonl")) + list(results.glob("*/*.json"))):
        if path.parent.name == "uci" and path.suffix == ".json":
            continue
        text = path.read_text()
        if _rename_refs(text) != text:
            path.write_text(_rename_refs(text))
            changed.append(str(path.relative_to(results)))
    print(f"{len(changed)} files changed" + "".join(f"\n  {c}" for c in changed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
