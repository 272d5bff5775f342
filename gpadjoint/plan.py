"""The plan of a fit: every "auto" setting resolved once, from the config and the data's shape.

A run configuration may leave six choices to the package: the matvec backend, the device mesh,
the estimator, the optimiser, the posterior and its variance engine. :func:`make_plan` resolves
them all once per fit from the :class:`~gpadjoint.config.RunConfig` and the training data's n,
d and working dtype, each with the reason it was taken, into one frozen :class:`Plan`. The
estimator (:class:`~gpadjoint.model.GPRegressor`) prints it, keeps it as ``plan_`` and the
command line writes it into the run record; everything below it receives resolved names (no
"auto" reaches :func:`gpadjoint.mll.neg_mll`).

The rules themselves live beside what they choose between: :func:`gpadjoint.matvec.choose_backend`,
:func:`gpadjoint.mll.choose_estimator`, :func:`gpadjoint.optimizers.resolve_optimizer`,
:func:`gpadjoint.predict.choose_posterior` and :func:`gpadjoint.predict.choose_variance`. Two of
them read the memory available when they run, which is why asking them once matters: the
answers recorded are the answers used.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import jax.numpy as jnp

from .matvec import Backend, choose_backend, make_backend
from .mll import MLLConfig, choose_estimator
from .optimizers import resolve_optimizer
from .predict import choose_posterior, choose_variance
from .sharding import describe_mesh, make_mesh, mesh_record

__all__ = ["Choice", "Plan", "backend_precision", "make_plan", "recheck_prediction",
           "resolve_backend", "resolve_estimator"]

# the plan's choices, in the order they are printed and recorded
CHOICES = ("backend", "mesh", "estimator", "optimizer", "posterior", "variance")


class Choice(NamedTuple):
    """One resolved setting: its ``name`` and, in words, the ``reason`` it was taken."""

    name: str
    reason: str


@dataclass(frozen=True)
class Plan:
    """The resolved choices of one fit (see the module docstring), each a :class:`Choice`.

    ``n``, ``d`` and ``dtype`` (a name, e.g. "float64") are the training data's; ``mesh.name``
    describes the device mesh and ``mesh_record`` is its JSON form for run records (None on a
    single device). ``optimizer.name`` is "given" when an optax transformation was passed.
    """

    n: int
    d: int
    dtype: str
    backend: Choice
    mesh: Choice
    estimator: Choice
    optimizer: Choice
    posterior: Choice
    variance: Choice
    mesh_record: dict | None = field(default=None, compare=False)

    def mll_config(self, mll: MLLConfig) -> MLLConfig:
        """Return the [mll] settings with the planned estimator in place of ``estimator``."""
        return dataclasses.replace(mll, estimator=self.estimator.name)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, for run records and model files (:meth:`from_dict` reads it)."""
        out: dict[str, Any] = {"n": self.n, "d": self.d, "dtype": self.dtype}
        for k in CHOICES:
            c = getattr(self, k)
            out[k] = {"name": c.name, "reason": c.reason}
        out["mesh_record"] = self.mesh_record
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        """Rebuild a plan written by :meth:`to_dict`."""
        return cls(n=int(d["n"]), d=int(d["d"]), dtype=str(d["dtype"]),
                   mesh_record=d.get("mesh_record"),
                   **{k: Choice(d[k]["name"], d[k]["reason"]) for k in CHOICES})

    def lines(self) -> list[str]:
        """Return the plan in words, one line per choice (what a verbose fit prints).

        The mesh line names the mesh only (its reason is whether ``devices`` was given).
        """
        return [f"plan for n = {self.n}, d = {self.d}, {self.dtype}:"] + [
            f"{k}: {c.name}" if k == "mesh" else f"{k}: {c.name} ({c.reason})"
            for k, c in ((k, getattr(self, k)) for k in CHOICES)]


def make_plan(cfg, n: int, d: int, *, devices=None, optimizer=None) -> Plan:
    """Resolve every "auto" of ``cfg`` (a :class:`~gpadjoint.config.RunConfig`) for n x d data.

    ``devices``: the estimator's ``devices`` keyword (None: one device; N or "all": a mesh,
    :func:`gpadjoint.sharding.make_mesh`, which raises ValueError for an impossible request).
    ``optimizer``: an optax transformation given in place of the configured optimiser, or None.
    The working dtype is ``cfg.model.dtype``.
    """
    dtype = jnp.dtype(cfg.model.dtype)
    mesh = make_mesh(devices)
    backend = (Choice(cfg.model.backend, "requested") if cfg.model.backend != "auto"
               else _auto(choose_backend(n, dtype, d=d, tile=cfg.model.tile,
                                         rank=cfg.mll.precond_rank)))
    if backend.name == "stored" and mesh is not None and cfg.model.backend == "auto":
        # stored holds K whole on one device; over a mesh the blocked tiles split the rows
        backend = Choice("blocked", f"{backend.reason}; but stored does not shard, so blocked "
                         "over the mesh")
    if cfg.model.precision != "full":
        used = backend_precision(backend.name, cfg.model)
        note = ("kernel entries in float32 (precision = mixed)" if used == "mixed" else
                f"precision = {cfg.model.precision} applies to the blocked backend only: "
                "kernel entries in the working dtype")
        backend = Choice(backend.name, f"{backend.reason}; {note}")
    estimator = Choice(*choose_estimator(n, cfg.mll))
    if optimizer is not None:
        opt = Choice("given", "an optax transformation")
    else:
        opt = Choice(*resolve_optimizer(cfg.optim.optimizer, estimator.name))
    posterior, variance = _prediction(cfg, n)
    mesh_reason = "requested" if devices is not None else "devices = None: no sharding"
    return Plan(n=int(n), d=int(d), dtype=dtype.name, backend=backend,
                mesh=Choice(describe_mesh(mesh), mesh_reason), estimator=estimator,
                optimizer=opt, posterior=posterior, variance=variance,
                mesh_record=mesh_record(mesh))


def _prediction(cfg, n: int) -> tuple[Choice, Choice]:
    """Return the posterior and variance choices for n points (memory as available now)."""
    posterior = Choice(*choose_posterior(n, cfg.predict.posterior))
    if posterior.name == "exact":
        return posterior, Choice("exact", "the exact posterior's")
    if cfg.predict.variance == "auto":
        return posterior, _auto(choose_variance(n))
    return posterior, Choice(cfg.predict.variance, "requested")


def recheck_prediction(plan: Plan, cfg) -> Plan:
    """Resolve ``posterior = "auto"`` again after training, when prediction starts.

    The plan decides before training, by the memory available then; a long fit may have begun
    beside another job that has since ended (or begun). The answer now is the one that holds;
    a change says so in its reason.
    """
    if cfg.predict.posterior != "auto":
        return plan
    posterior, variance = _prediction(cfg, plan.n)
    if posterior.name == plan.posterior.name:
        return plan
    note = f" (re-checked after training; before it: {plan.posterior.name})"
    return dataclasses.replace(plan, posterior=Choice(posterior.name, posterior.reason + note),
                               variance=variance)


def backend_precision(backend: str, model) -> str:
    """Return the kernel-entry precision backend ``backend`` runs with under ``[model]``.

    ``model.precision = "mixed"`` applies to the blocked backend only (the others hold or stream
    kernel entries in the working dtype), so every other backend runs "full".
    """
    return model.precision if backend == "blocked" else "full"


def resolve_estimator(n: int, mll: MLLConfig) -> tuple[MLLConfig, str]:
    """Return (``mll`` with its estimator resolved for n points, the reason).

    For callers below the estimator that take an [mll] table directly
    (:func:`gpadjoint.train.fit`): they resolve it once, at their start, as the plan does.
    """
    name, reason = choose_estimator(n, mll)
    return dataclasses.replace(mll, estimator=name), reason


def resolve_backend(backend, kernel: str, n: int, dtype, *, d: int = 1,
                    rank: int = 1000) -> tuple[Backend, str]:
    """Return (a :class:`~gpadjoint.matvec.Backend`, the reason) for ``backend``.

    ``backend``: a Backend (used as given; its kernel must be ``kernel``), a backend name, or
    "auto" (:func:`gpadjoint.matvec.choose_backend` for n points of ``dtype`` in ``d``
    dimensions, with a rank-``rank`` preconditioner). For callers
    below the estimator (:func:`gpadjoint.train.fit`), as :func:`resolve_estimator`.
    """
    if isinstance(backend, Backend):
        if backend.kernel != kernel:
            raise ValueError(
                f"backend was built for kernel {backend.kernel!r} but fit got kernel={kernel!r}"
            )
        return backend, "given"
    if backend == "auto":
        name, reason = choose_backend(n, dtype, d=d, rank=rank)
        return make_backend(name, kernel), f"auto: {reason}"
    return make_backend(backend, kernel), "requested"


def _auto(choice: tuple[str, str]) -> Choice:
    return Choice(choice[0], f"auto: {choice[1]}")
