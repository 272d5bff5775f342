"""The optimiser factory: an [optim] section -> an ``optax.GradientTransformation``.

Stage 7 (train -> **optimizers** -> model). :func:`make_optimizer` builds what
:func:`gpadjoint.train.fit` steps with from a :class:`gpadjoint.config.OptimConfig`;
:func:`resolve_optimizer` says what ``optimizer = "auto"`` means and why. The configuration
itself (:mod:`gpadjoint.config`) is plain data and builds nothing.
"""

from __future__ import annotations

import optax

from .config import OptimConfig
from .train import LBFGS


def resolve_optimizer(name: str, estimator: str) -> tuple[str, str]:
    """Resolve ``optimizer = "auto"``: L-BFGS with a line search for either estimator.

    The exact loss is deterministic; the SLQ loss is made so by drawing its probes once per run
    (:class:`gpadjoint.train.LBFGS`), so its value and gradient agree and a line search is sound.
    """
    if name != "auto":
        return name, "requested"
    if estimator == "exact":
        return "lbfgs", "auto: the exact loss is deterministic, so L-BFGS with a line search"
    return "lbfgs", (
        "auto: SLQ with its probes fixed for the run is a deterministic objective whose exact "
        "gradient the adjoint gives, so L-BFGS with a line search (it fits to the optimum; Adam "
        "stops wherever its epochs end)"
    )


def lbfgs():
    """L-BFGS (optax) with a zoom line search capped at 10 evaluations per step.

    Near the optimum round-off makes the Wolfe conditions unattainable and optax's default cap
    (20) then spends 20 loss evaluations on one step; 10 loses nothing measurable.
    """
    return optax.lbfgs(linesearch=optax.scale_by_zoom_linesearch(
        max_linesearch_steps=10, initial_guess_strategy="one"))


def make_optimizer(cfg: OptimConfig, epochs: int | None = None, estimator: str = "slq"):
    """Build the ``optax.GradientTransformation`` described by ``cfg`` (one step = one epoch).

    ``optimizer = "auto"`` is resolved by :func:`resolve_optimizer` for the given (resolved)
    estimator. ``lbfgs`` ignores ``lr`` and the schedule (the line search sets the step): with the
    exact estimator it is ``optax.lbfgs`` with its zoom line search; with SLQ it is
    :class:`gpadjoint.train.LBFGS` (probes fixed for the run, CG warm-started from the previous
    evaluation, every evaluation reused; stop rule ``lbfgs_rtol`` / ``lbfgs_gtol``).

    Schedules: ``constant`` (lr); ``cosine`` from lr to ``lr * final_lr_fraction`` over
    ``decay_epochs`` (0 = ``epochs``, which must then be given); ``exponential`` lr *
    decay_rate**epoch. ``warmup_epochs`` > 0 prepends a linear warm-up from 0.
    ``clip_norm`` > 0 clips the gradient's global norm first.
    """
    name, _ = resolve_optimizer(cfg.optimizer, estimator)
    if name == "lbfgs" and estimator != "exact":
        if cfg.clip_norm > 0:
            raise ValueError("[optim] clip_norm does not apply to lbfgs with the slq estimator "
                             "(its line search sets the step); set clip_norm = 0")
        return LBFGS(memory_size=cfg.lbfgs_memory, rtol=cfg.lbfgs_rtol, gtol=cfg.lbfgs_gtol)
    if name == "lbfgs":
        opt = lbfgs()
        if cfg.clip_norm > 0:
            opt = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), opt)
        return opt
    if cfg.schedule == "constant":
        sched = cfg.lr
    elif cfg.schedule == "cosine":
        steps = cfg.decay_epochs or epochs
        if not steps:
            raise ValueError(
                "[optim] schedule = 'cosine' needs decay_epochs > 0 or the number of epochs"
            )
        sched = optax.cosine_decay_schedule(cfg.lr, steps, alpha=cfg.final_lr_fraction)
    else:
        sched = optax.exponential_decay(cfg.lr, transition_steps=1, decay_rate=cfg.decay_rate)
    if cfg.warmup_epochs > 0:
        after = sched if callable(sched) else optax.constant_schedule(sched)
        sched = optax.join_schedules(
            [optax.linear_schedule(0.0, cfg.lr, cfg.warmup_epochs), after], [cfg.warmup_epochs]
        )
    if name == "adam":
        opt = optax.adam(sched, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    elif name == "adamw":
        opt = optax.adamw(sched, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    else:
        opt = optax.sgd(sched, momentum=cfg.momentum or None)
    if cfg.clip_norm > 0:
        opt = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), opt)
    return opt
