"""scripts/bench_pass.py at a small size: every backend's rows are written, and the stored and
blocked variants agree with the float64 blocked pass (the columns the CSV reports)."""

import csv
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import bench_pass as bp  # noqa: E402


def test_stored_row_next_to_dense_and_blocked(tmp_path, monkeypatch):
    monkeypatch.setattr(bp, "roofline", lambda reps: [])  # a 1 GiB copy is no unit test
    monkeypatch.setattr(bp, "VARIANTS", {"float64": dict(symmetric=False),
                                         "symmetric": dict(symmetric=True)})
    monkeypatch.setattr(bp, "CASES_QUICK", [(203, 4, True)])  # tile 64: a padded last tile
    out = tmp_path / "bench_pass.csv"
    bp.main(["--quick", "--reps", "1", "--tile", "64", "--out", str(out)])
    rows = list(csv.DictReader(out.open()))
    by = {(r["backend"], r["variant"]): r for r in rows}
    assert set(by) == {("dense", "float64"), ("blocked", "float64"), ("blocked", "symmetric"),
                       ("stored", "float64")}
    stored = by["stored", "float64"]
    assert float(stored["build_s"]) > 0 and float(stored["fwd_s"]) > 0
    assert float(stored["err_fwd"]) < 1e-12 and float(stored["err_grad"]) < 1e-10
    assert out.with_suffix(".json").exists()
