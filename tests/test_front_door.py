"""One front door: the command line, a config file and GPRegressor(**settings) fit the same.

``gpadjoint fit`` is GPRegressor plus a record writer, and GPRegressor's keywords are the config
keys, so the three routes must end at the same hyperparameters (float64, 1e-8 relative): on
yacht (exact estimator, optax L-BFGS) and on an elevators subset (SLQ, the fixed-probe L-BFGS,
the exact subset start).
"""

import inspect
import json

import numpy as np
import pytest

from gpadjoint import data as gdata
from gpadjoint import datasets as gdatasets
from gpadjoint.cli import main
from gpadjoint.config import RunConfig, default_config, keywords, load_config
from gpadjoint.model import GPRegressor


def test_one_set_of_defaults():
    """GPRegressor() fits with default.toml's settings, the CLI's defaults without --config."""
    assert GPRegressor().run_config() == default_config() == RunConfig()
    assert RunConfig.from_dict({}) == RunConfig()
    # every setting of a run is a keyword, and nothing else but config, devices and verbose
    params = set(inspect.signature(GPRegressor).parameters)
    assert params == set(keywords()) | {"config", "devices", "verbose"}
    # a keyword overrides the config it is given, whichever way the config comes
    paper = load_config("configs/paper.toml")
    assert GPRegressor(config="configs/paper.toml", epochs=3).run_config() == (
        paper.with_overrides(epochs=3))
    assert GPRegressor(config=paper, predict_cg_tol=1e-4).run_config().predict.cg_tol == 1e-4
    with pytest.raises(ValueError, match=r"\[mll\] num_probes = 0: must be positive"):
        GPRegressor(num_probes=0).run_config()


def _toml(settings: dict) -> str:
    names = keywords()
    tables: dict[str, list[str]] = {}
    for k, v in settings.items():
        section, key = names[k]
        tables.setdefault(section, []).append(f"{key} = {json.dumps(v)}")
    return "\n".join(f"[{s}]\n" + "\n".join(lines) for s, lines in tables.items()) + "\n"


def _cli_fit(tmp_path, tag, args):
    out = tmp_path / f"{tag}.json"
    rc = main(["fit", *args, "--quiet", "--out", str(out),
               "--checkpoint", str(tmp_path / f"{tag}.ckpt")])
    assert rc == 0
    return json.loads(out.read_text())


def _same(rec_hp: dict, hp: dict, rtol=1e-8):
    for k in ("lengthscale", "outputscale", "noise", "mean"):
        np.testing.assert_allclose(np.asarray(rec_hp[k]), np.asarray(hp[k]), rtol=rtol,
                                   err_msg=k)


def _three_routes(tmp_path, settings, cli_data, X, y):
    cfg_file = tmp_path / "run.toml"
    cfg_file.write_text(_toml(settings))
    rec = _cli_fit(tmp_path, "cli", [*cli_data, "--config", str(cfg_file)])
    by_file = GPRegressor(config=cfg_file).fit(X, y)
    by_keywords = GPRegressor(**settings).fit(X, y)
    assert by_keywords.config_ == by_file.config_ == load_config(cfg_file)
    assert rec["config"] == by_keywords.config_.to_dict()
    _same(rec["hyperparameters"], by_file.hyperparameters_)
    _same(rec["hyperparameters"], by_keywords.hyperparameters_)
    assert len(rec["history"]) == by_keywords.n_iter_ > 0
    return rec, by_keywords


def test_cli_config_file_and_keywords_agree_on_yacht(tmp_path):
    split = gdatasets.load_dataset("yacht", 0)
    X, y = split.unscale_X(split.X_train), split.unscale_y(split.y_train)
    settings = dict(epochs=6, random_state=2, init="normal", kernel="matern52",
                    normalize_y=False)
    rec, model = _three_routes(tmp_path, settings, ["--dataset", "yacht"], X, y)
    assert rec["estimator"] == model.estimator_ == "exact"
    # and with no config at all: the CLI's flags are the same keywords on default.toml
    rec0 = _cli_fit(tmp_path, "defaults", ["--dataset", "yacht", "--epochs", "4"])
    _same(rec0["hyperparameters"], GPRegressor(epochs=4).fit(X, y).hyperparameters_)


@pytest.mark.slow
def test_cli_config_file_and_keywords_agree_on_an_elevators_subset(tmp_path):
    s = gdatasets.load_dataset("elevators", 0)
    Xa, ya = s.unscale_X(s.X_train[:300]), s.unscale_y(s.y_train[:300])
    cols = [f"x{i}" for i in range(Xa.shape[1])]
    import pandas as pd

    csv = tmp_path / "elevators300.csv"
    pd.DataFrame(np.column_stack([Xa, ya]), columns=[*cols, "y"]).to_csv(csv, index=False)
    settings = dict(epochs=3, random_state=1, estimator="slq", num_probes=4, lanczos_depth=8,
                    precond_rank=10, init_subset=100, cg_tol=1e-6)
    # the rows the CLI trains on, through the same load (normalize_y as default.toml's, since the
    # unscaled values then round alike; the flat directions of this fit, lengthscales of 1e6,
    # move by 1e-5 when y changes in its last bit)
    split = gdata.load_csv(csv, "y", test_fraction=0.1, seed=1, scale_y=True)
    X, y = split.unscale_X(split.X_train), split.unscale_y(split.y_train)
    rec, model = _three_routes(
        tmp_path, settings, ["--data", str(csv), "--target", "y", "--test-fraction", "0.1"],
        X, y)
    assert rec["estimator"] == model.estimator_ == "slq"
    assert rec["optimizer"] == model.optimizer_ == "lbfgs"
    assert rec["init_subset"]["size"] == model.init_subset_["size"] == 100
