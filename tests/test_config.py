import math
import sys
from pathlib import Path

import numpy as np
import optax
import pytest

from gpadjoint.config import (
    DEFAULT_CONFIG,
    OptimConfig,
    RunConfig,
    load_config,
)
from gpadjoint.mll import MLLConfig
from gpadjoint.optimizers import make_optimizer
from gpadjoint.train import LBFGS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SECTIONS = ("model", "mll", "optim", "train", "predict")


@pytest.mark.parametrize("name", ["default.toml", "paper.toml"])
def test_shipped_configs_load_and_every_key_is_a_field(name):
    path = DEFAULT_CONFIG if name == "default.toml" else CONFIGS / name
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    raw = tomllib.loads(path.read_text())
    assert set(raw) <= set(SECTIONS)
    for section, table in raw.items():
        fields = set(getattr(cfg, section).keys())
        assert set(table) <= fields, (section, set(table) - fields)
        for k, v in table.items():
            assert getattr(getattr(cfg, section), k) == v
    # the shipped files spell out every key, so nothing silently takes a code default
    for section in SECTIONS:
        fields = set(getattr(cfg, section).keys())
        assert set(raw.get(section, {})) == fields, (name, section)
    assert isinstance(cfg.mll_config(), MLLConfig)
    assert isinstance(make_optimizer(cfg.optim, epochs=cfg.train.epochs),
                      (optax.GradientTransformation, LBFGS))


def test_paper_config_is_the_papers_setup():
    cfg = load_config(CONFIGS / "paper.toml")
    assert cfg.model.kernel == "matern32" and cfg.model.dtype == "float32"
    assert cfg.model.noise_floor == 1e-4
    assert cfg.mll_config() == MLLConfig(
        num_probes=10, lanczos_depth=10, precond_rank=15, cg_tol=1.0, cg_min_iter=10,
        cg_max_iter=1000, noise_floor=1e-4,
    )
    assert (cfg.optim.optimizer, cfg.optim.lr, cfg.optim.schedule) == ("adam", 0.05, "constant")
    assert cfg.train.epochs == 75 and cfg.train.init == "normal"
    assert cfg.train.early_stopping is False
    assert cfg.train.random_state == 1 and cfg.model.normalize_y is False


def test_mll_section_is_the_estimators_own_settings():
    # one dataclass: the [mll] table is MLLConfig, its noise floor the [model] key
    cfg = RunConfig().with_overrides(model__noise_floor=1e-3, mll__num_probes=7)
    assert type(cfg.mll) is MLLConfig and cfg.mll_config() is cfg.mll
    assert (cfg.mll.noise_floor, cfg.mll.num_probes) == (1e-3, 7)
    assert "noise_floor" not in cfg.to_dict()["mll"] and "noise_floor" not in MLLConfig.keys()
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"unknown key 'noise_floor' in section \[mll\]"):
        RunConfig.from_dict({"mll": {"noise_floor": 1e-3}})


def test_roundtrip_and_overrides():
    cfg = RunConfig()
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    new = cfg.with_overrides(lr=0.1, epochs=5, mll__cg_tol=1e-3, predict={"batch_size": 64},
                             random_state=None)
    assert new.optim.lr == 0.1 and new.train.epochs == 5 and new.mll.cg_tol == 1e-3
    assert new.predict.batch_size == 64 and new.train.random_state == cfg.train.random_state
    with pytest.raises(ValueError, match="mll__cg_tol or predict__cg_tol"):
        cfg.with_overrides(cg_tol=1.0)
    with pytest.raises(ValueError, match="'nope'"):
        cfg.with_overrides(nope=1)
    with pytest.raises(ValueError, match=r"\[train\] epochs"):
        cfg.with_overrides(epochs=-1)


def _write(tmp_path, text):
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_unknown_key_names_key_section_and_valid_keys(tmp_path):
    with pytest.raises(ValueError) as e:
        load_config(_write(tmp_path, "[mll]\nnum_probe = 3\n"))
    msg = str(e.value)
    assert "'num_probe'" in msg and "[mll]" in msg and "num_probes" in msg
    assert "lanczos_depth" in msg and "c.toml" in msg


@pytest.mark.parametrize("section, old, new, value", [
    ("train", "seed", "random_state", "3"), ("model", "scale_y", "normalize_y", "false")])
def test_old_key_names_fail_naming_the_new_one(tmp_path, section, old, new, value):
    """A file written before the scikit-learn names does not silently take the default."""
    with pytest.raises(ValueError, match=rf"c.toml: unknown key '{old}' in section "
                       rf"\[{section}\] \(renamed '{new}'"):
        load_config(_write(tmp_path, f"[{section}]\n{old} = {value}\n"))
    assert load_config(_write(tmp_path, f"[{section}]\n{new} = {value}\n")).to_dict()[
        section][new] == {"3": 3, "false": False}[value]
    for over in ({old: 1}, {f"{section}__{old}": 1}):  # RunConfig.with_overrides too
        with pytest.raises(ValueError, match=f"renamed '{new}'"):
            RunConfig().with_overrides(**over)


def test_unknown_section(tmp_path):
    with pytest.raises(ValueError, match=r"unknown section \[optimizer\].*optim"):
        load_config(_write(tmp_path, "[optimizer]\nlr = 0.1\n"))


@pytest.mark.parametrize(
    "text, match",
    [
        ("[train]\nepochs = 75.0\n", r"\[train\] epochs: expected int, got float"),
        ("[train]\nearly_stopping = 1\n", r"early_stopping: expected bool, got int"),
        ("[optim]\nlr = \"0.1\"\n", r"lr: expected float, got str"),
        ("[mll]\nnum_probes = true\n", r"num_probes: expected int, got bool"),
        ("[model]\ndtype = 64\n", r"dtype: expected str, got int"),
    ],
)
def test_wrong_type_names_key_expected_and_got(tmp_path, text, match):
    with pytest.raises(ValueError, match=match):
        load_config(_write(tmp_path, text))


def test_int_accepted_for_float(tmp_path):
    cfg = load_config(_write(tmp_path, "[optim]\nlr = 1\n[mll]\ncg_tol = 1\n"))
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert isinstance(cfg.mll.cg_tol, float)


@pytest.mark.parametrize(
    "text, key",
    [
        ("[train]\nepochs = -1\n", "epochs"),
        ("[mll]\nnum_probes = 0\n", "num_probes"),
        ("[mll]\nlanczos_depth = -1\n", "lanczos_depth"),
        ("[optim]\nlr = 0.0\n", "lr"),
        ("[mll]\ncg_tol = -1.0\n", "cg_tol"),
        ("[model]\ndtype = \"float16\"\n", "dtype"),
        ("[model]\nkernel = \"matern\"\n", "kernel"),
        ("[model]\nbackend = \"gpu\"\n", "backend"),
        ("[model]\nprecision = \"half\"\n", "precision"),
        ("[optim]\nschedule = \"step\"\n", "schedule"),
        ("[train]\ninit = \"zeros\"\n", "init"),
        ("[predict]\nvariance = \"none\"\n", "variance"),
        ("[mll]\ncg_min_iter = 20\ncg_max_iter = 10\n", "cg_min_iter"),
    ],
)
def test_bad_values_are_named(tmp_path, text, key):
    with pytest.raises(ValueError, match=rf"\] {key} = "):
        load_config(_write(tmp_path, text))


def test_bad_toml_names_file(tmp_path):
    with pytest.raises(ValueError, match="not valid TOML"):
        load_config(_write(tmp_path, "[mll\n"))


def _lr(t, *, lr=0.1, schedule="constant", decay_epochs=10, final_lr_fraction=0.1,
        decay_rate=0.97, warmup_epochs=0, **_):
    """The learning rate of step t, written out from the schedules' definitions."""
    if t < warmup_epochs:
        return lr * t / warmup_epochs
    t -= warmup_epochs
    if schedule == "cosine":
        c = 0.5 * (1 + math.cos(math.pi * min(t, decay_epochs) / decay_epochs))
        return lr * (final_lr_fraction + (1 - final_lr_fraction) * c)
    if schedule == "exponential":
        return lr * decay_rate**t
    return lr


@pytest.mark.parametrize(
    "kw",
    [
        {"optimizer": "adam"},
        {"optimizer": "adam", "schedule": "cosine"},
        {"optimizer": "adam", "schedule": "exponential", "decay_rate": 0.9},
        {"optimizer": "adam", "schedule": "cosine", "decay_epochs": 7, "warmup_epochs": 2},
        {"optimizer": "sgd", "momentum": 0.9},
        {"optimizer": "adamw", "weight_decay": 1e-3, "clip_norm": 1.0},
    ],
)
def test_make_optimizer(kw):
    # A constant gradient g = 1 at fixed parameters p = 1 makes each update a closed form in
    # the step's learning rate lr_t: Adam's bias-corrected moments are exactly g and g^2, so
    # its update is -lr_t g / (|g| + eps); SGD with momentum m accumulates sum_i m^i g;
    # AdamW adds -lr_t wd p; clipping to norm 1 scales g, which Adam's ratio then cancels.
    import jax.numpy as jnp

    kw = {"lr": 0.1, **kw}
    cfg = OptimConfig(**kw)
    opt = make_optimizer(cfg, epochs=10)
    p = {"a": jnp.ones(3, jnp.float64)}
    state = opt.init(p)
    spec = {**kw, "decay_epochs": kw.get("decay_epochs") or 10}
    velocity = 0.0
    for t in range(10):
        up, state = opt.update({"a": jnp.ones(3, jnp.float64)}, state, p)
        lr_t = _lr(t, **spec)
        if cfg.optimizer == "sgd":
            velocity = 1.0 + cfg.momentum * velocity
            want = -lr_t * velocity
        else:
            g = 1 / math.sqrt(3) if cfg.clip_norm else 1.0
            want = -lr_t * (g / (g + cfg.eps) + cfg.weight_decay * 1.0)
        np.testing.assert_allclose(np.asarray(up["a"]), want, rtol=1e-6, atol=1e-12,
                                   err_msg=f"step {t}")


def test_cosine_without_length_is_an_error():
    with pytest.raises(ValueError, match="decay_epochs"):
        make_optimizer(OptimConfig(optimizer="adam", schedule="cosine"))


def test_auto_optimizer_follows_the_estimator():

    from gpadjoint.config import OptimConfig
    from gpadjoint.optimizers import make_optimizer, resolve_optimizer

    assert resolve_optimizer("auto", "exact")[0] == "lbfgs"
    assert resolve_optimizer("auto", "slq")[0] == "lbfgs"
    assert resolve_optimizer("sgd", "exact") == ("sgd", "requested")
    # one L-BFGS for both estimators (its pure parts are tested in test_lbfgs_host.py)
    assert isinstance(make_optimizer(OptimConfig(optimizer="auto"), estimator="exact"), LBFGS)


def test_estimator_key_is_validated(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[mll]\nestimator = "cholesky"\n')
    with pytest.raises(ValueError, match=r"\[mll\] estimator.*auto"):
        load_config(path)


def test_defaults_are_one_packaged_file():
    # the CLI and default_config() read gpadjoint/default.toml, declared as package data, so a
    # wheel installed away from this repository has the very same defaults
    from importlib.resources import files

    from gpadjoint import cli
    from gpadjoint.config import default_config

    assert DEFAULT_CONFIG.parent == Path(cli.__file__).parent
    assert files("gpadjoint").joinpath("default.toml").read_text() == DEFAULT_CONFIG.read_text()
    pyproject = tomllib.loads((CONFIGS.parent / "pyproject.toml").read_text())
    assert "default.toml" in pyproject["tool"]["setuptools"]["package-data"]["gpadjoint"]
    assert cli._load_run_config(None) == (default_config(), cli._load_run_config(None)[1])
    assert "packaged" in cli._load_run_config(None)[1]


def test_mixed_precision_is_planned_for_the_blocked_backend_only():
    # "mixed" reaches the blocked backend and the plan says so; any other backend runs full and
    # the plan says that too (never silent)
    from gpadjoint.config import default_config
    from gpadjoint.plan import backend_precision, make_plan

    cfg = default_config().with_overrides(model__precision="mixed", model__backend="blocked")
    p = make_plan(cfg, 500, 3)
    assert backend_precision(p.backend.name, cfg.model) == "mixed"
    assert "float32" in p.backend.reason
    dense = make_plan(cfg.with_overrides(model__backend="dense"), 500, 3)
    assert backend_precision(dense.backend.name, cfg.model) == "full"
    assert "blocked backend only" in dense.backend.reason
    full = make_plan(cfg.with_overrides(model__precision="full"), 500, 3)
    assert full.backend.reason == "requested"


def test_stored_backend_is_planned_on_one_device_only(monkeypatch):
    # auto may choose stored (K held whole on one device); with a mesh the plan takes the
    # blocked tiles instead and says why, and a requested stored with a mesh is refused
    import gpadjoint.plan as gplan
    from gpadjoint.config import default_config
    from gpadjoint.model import GPRegressor

    cfg = default_config()
    assert default_config().with_overrides(model__backend="stored").model.backend == "stored"
    monkeypatch.setattr(gplan, "choose_backend", lambda n, dtype, **kw: ("stored", "K fits"))
    assert gplan.make_plan(cfg, 500, 3).backend == ("stored", "auto: K fits")
    p = gplan.make_plan(cfg, 500, 3, devices=1)
    assert p.backend.name == "blocked" and "stored does not shard" in p.backend.reason
    X = np.random.default_rng(0).standard_normal((30, 2))
    with pytest.raises(ValueError, match="'stored' holds K on one device"):
        GPRegressor(backend="stored", devices=1, epochs=0).fit(X, X[:, 0])
