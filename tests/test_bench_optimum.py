"""bench_optimum's choice of reference: the exact optimum, the exact run so far, or a stand-in."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import bench_optimum as bo  # noqa: E402


def _progress(path: Path, losses):
    lines = [{"event": "start"}] + [
        {"stage": "subset", "loss": -5.0, "grad_norm": 1e-7}] + [
        {"stage": "full", "eval": i, "loss": v, "grad_norm": 1e-3} for i, v in enumerate(losses)]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")


def test_reference_order(tmp_path):
    recs = [{"_file": "a.json", "final_train_loss_common": -0.90},
            {"_file": "b.json", "final_train_loss_common": -0.95}]
    # nothing from exact_optimum: the best run stands in, labelled
    ref = bo.reference("ds", 0, recs, tmp_path)
    assert ref["reference_loss"] == -0.95 and ref["reference_kind"].startswith("stand-in")
    # a run in progress whose best full-n loss is lower: it is the reference, gaps lower bounds
    # (the subset stage's losses are of another problem and never count)
    _progress(tmp_path / "ds-split0.progress.jsonl", [-0.93, -0.96, -0.955])
    ref = bo.reference("ds", 0, recs, tmp_path)
    assert ref["reference_loss"] == -0.96 and "lower bound" in ref["reference_kind"]
    # ... unless a run already went lower than the unfinished exact fit
    _progress(tmp_path / "ds-split0.progress.jsonl", [-0.93, -0.94])
    assert bo.reference("ds", 0, recs, tmp_path)["reference_loss"] == -0.95
    # a point scored by exact_point.py below both is the stand-in, with its test RMSE
    pts = tmp_path / "ds-split0.points.jsonl"
    pts.write_text("\n".join(json.dumps({"label": lab, "loss": v, "test_rmse": e}) for lab, v, e
                              in [("subset start, 2000 rows", -0.99, 0.05),
                                  ("subset start, 4000 rows", -1.02, 0.04)]) + "\n")
    ref = bo.reference("ds", 0, recs, tmp_path)
    assert (ref["reference_loss"], ref["reference_rmse"]) == (-1.02, 0.04)
    assert "subset start, 4000 rows" in ref["reference_kind"]
    assert "lower bound" in ref["reference_kind"]
    pts.unlink()
    # the finished optimum always wins
    (tmp_path / "ds-split0.json").write_text(json.dumps(
        {"loss": -0.97, "test_rmse": 0.1, "converged": True, "grad_norm": 5e-7}))
    ref = bo.reference("ds", 0, recs, tmp_path)
    assert (ref["reference_kind"], ref["reference_loss"], ref["reference_rmse"]) == (
        "exact", -0.97, 0.1)
    # a record the script wrote after stopping short of its gradient test says so
    (tmp_path / "ds-split0.json").write_text(json.dumps(
        {"loss": -0.97, "test_rmse": 0.1, "converged": False, "grad_norm": 3e-5,
         "grad_tol": 1e-6}))
    ref = bo.reference("ds", 0, recs, tmp_path)
    assert ref["reference_loss"] == -0.97 and "lower bound" in ref["reference_kind"]
    assert "3.0e-05" in ref["reference_kind"]


def test_results_readme_lists_the_scored_points(tmp_path):
    import make_table

    (tmp_path / "optimum").mkdir()
    e = {"label": "subset start, 4000 rows", "loss": -0.784069, "test_rmse": 0.0644,
         "test_nll": -1.1103, "hyperparameters": {"noise": 2.1e-4, "outputscale": 252.0},
         "wall_seconds": 520.0}
    (tmp_path / "optimum" / "kin40k-split0.points.jsonl").write_text(json.dumps(e) + "\n")
    text = "\n".join(make_table.optimum_lines(tmp_path))
    assert "| subset start, 4000 rows | -0.78407 | 0.06440 | -1.1103 | 0.00021 | 252 | 520 |" \
        in text
    assert "No exact optimum computed yet." not in text
