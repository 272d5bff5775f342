"""Settings as data: the validated, frozen dataclasses every stage shares.

:class:`Section` is the base of every settings table: exact types (an int is accepted where a
float is expected), then the section's own range checks, with errors that name the section,
the key and the value (``[mll] num_probes = 0: must be positive``). :class:`MLLConfig`, the
estimator's settings, is defined here once and used as is by :mod:`gpadjoint.mll` (static
under jit), by :mod:`gpadjoint.config` (the ``[mll]`` table of a run) and by
:class:`gpadjoint.model.GPRegressor`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from .kernels import NOISE_FLOOR

ESTIMATORS = ("auto", "slq", "exact")
PIVOTS = ("greedy", "random")  # MLLConfig.precond_pivot
# Up to this n the float64 Cholesky estimator (O(n^3), exact and deterministic) costs about what
# an SLQ step does, so "auto" prefers it there.
EXACT_MAX_N = 2000

# Names users reach for from other libraries, mapped to ours (for "did you mean").
ALIASES = {
    "learning_rate": "lr", "probes": "num_probes", "n_probes": "num_probes",
    "num_samples": "num_probes", "depth": "lanczos_depth", "num_lanczos": "lanczos_depth",
    "max_iter": "cg_max_iter", "tol": "cg_tol", "rank": "precond_rank",
    "preconditioner_rank": "precond_rank", "iterations": "epochs", "n_epochs": "epochs",
    "seed": "random_state", "nu": "kernel", "device": "backend",
}
# Keys renamed to scikit-learn's names: an old file or keyword fails, naming the new key, rather
# than silently taking the default.
RENAMED = {"seed": "random_state", "scale_y": "normalize_y"}


def unknown_key_hint(key: str, valid) -> str:
    """Return " (renamed ...)" or " (did you mean ...?)" for a key not in ``valid``, or ""."""
    if RENAMED.get(key) in valid:
        return f" (renamed {RENAMED[key]!r}, scikit-learn's name for it)"
    close = [ALIASES[key]] if ALIASES.get(key) in valid else difflib.get_close_matches(
        key, list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _type_name(t) -> str:
    return t.__name__ if isinstance(t, type) else str(t)


class Section:
    """Shared checks of a config section: exact types, then the section's own ``_validate``."""

    SECTION: ClassVar[str] = ""
    # per-field value types; an int is accepted (and converted) where a float is expected
    _TYPES: ClassVar[dict[str, type]] = {}

    def __post_init__(self):
        for f in fields(self):
            want = self._TYPES[f.name]
            v = getattr(self, f.name)
            if want is float and isinstance(v, int) and not isinstance(v, bool):
                object.__setattr__(self, f.name, float(v))
                continue
            ok = isinstance(v, want) and not (want is int and isinstance(v, bool))
            if not ok:
                raise ValueError(
                    f"[{self.SECTION}] {f.name}: expected {_type_name(want)}, "
                    f"got {type(v).__name__} ({v!r})"
                )
        self._validate()

    def _validate(self):
        pass

    def _fail(self, name: str, msg: str):
        raise ValueError(f"[{self.SECTION}] {name} = {getattr(self, name)!r}: {msg}")

    def _positive(self, *names: str):
        for name in names:
            if not getattr(self, name) > 0:
                self._fail(name, "must be positive")

    def _non_negative(self, *names: str):
        for name in names:
            if not getattr(self, name) >= 0:
                self._fail(name, "must be >= 0")

    def _choice(self, name: str, choices):
        if getattr(self, name) not in choices:
            self._fail(name, f"choose one of {', '.join(map(repr, choices))}")

    # fields that are set from another section, not written in this one's table
    _NOT_IN_TABLE: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """Names of this section's keys (as written in its TOML table)."""
        return tuple(f.name for f in fields(cls) if f.name not in cls._NOT_IN_TABLE)

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        """Build the section from a TOML table, rejecting unknown keys."""
        if not isinstance(d, dict):
            raise ValueError(f"[{cls.SECTION}] must be a table, got {type(d).__name__}")
        valid = cls.keys()
        for k in d:
            if k not in valid:
                raise ValueError(
                    f"unknown key {k!r} in section [{cls.SECTION}]{unknown_key_hint(k, valid)}; "
                    f"valid keys: {', '.join(valid)}"
                )
        return cls(**d)


@dataclass(frozen=True)
class MLLConfig(Section):
    """Settings of the estimator (all explicit, hashable, static under jit).

    Attributes:
        num_probes: Rademacher probes for SLQ (p).
        lanczos_depth: Lanczos steps per probe (k).
        precond_rank: pivoted-Cholesky rank of the CG preconditioner (0 = none).
        precond_pivot: its pivots, ``"greedy"`` (largest residual diagonal) or ``"random"``
            (drawn in proportion to it, from a fixed key: randomly pivoted Cholesky;
            :func:`gpadjoint.solve.pivoted_cholesky`).
        cg_tol: CG stops when |y - K x| / |y| <= cg_tol ...
        cg_min_iter: ... and at least this many iterations ran ...
        cg_max_iter: ... or after this many.
        estimator: ``"slq"`` (SLQ + CG above, any n), ``"exact"`` (float64 dense Cholesky,
            O(n^3): deterministic and exact, for n up to a few thousand) or ``"auto"``
            (exact when n <= ``exact_max_n``; :func:`gpadjoint.mll.choose_estimator` says
            which and why).
        exact_max_n: the largest n for which ``"auto"`` takes the exact estimator.
        precond_logdet: split log det K = log det P + log det(P^{-1/2} K P^{-1/2}) with the
            CG preconditioner P and run SLQ on the second term only
            (:func:`gpadjoint.logdet.preconditioned_slq_logdet`): same expectation, far less
            variance and quadrature error. Needs ``precond_rank`` > 0. The paper did not.
        noise_floor: lower bound added to the softplus noise (variance units); in a run
            configuration it is the ``[model]`` key, not one of the ``[mll]`` table.
        depth_tol: the L-BFGS trainer doubles ``lanczos_depth`` (up to ``max_lanczos_depth``)
            while the SLQ log det still moves by more than this (per datum, the loss's units)
            over the second half of the Lanczos steps (``depth_change`` of
            :func:`gpadjoint.mll.neg_mll`); 0 keeps the depth fixed.
        max_lanczos_depth: the most Lanczos steps that deepening may reach.

    """

    SECTION: ClassVar[str] = "mll"
    _TYPES: ClassVar[dict[str, type]] = {
        "num_probes": int, "lanczos_depth": int, "precond_rank": int, "cg_tol": float,
        "cg_min_iter": int, "cg_max_iter": int, "estimator": str, "exact_max_n": int,
        "precond_logdet": bool, "noise_floor": float, "depth_tol": float,
        "max_lanczos_depth": int, "precond_pivot": str,
    }
    _NOT_IN_TABLE: ClassVar[tuple[str, ...]] = ("noise_floor",)

    num_probes: int = 10
    lanczos_depth: int = 10
    precond_rank: int = 15
    cg_tol: float = 1e-2
    cg_min_iter: int = 10
    cg_max_iter: int = 1000
    estimator: str = "slq"
    exact_max_n: int = EXACT_MAX_N
    precond_logdet: bool = False
    noise_floor: float = NOISE_FLOOR
    depth_tol: float = 0.0
    max_lanczos_depth: int = 0
    precond_pivot: str = "greedy"

    def _validate(self):
        self._choice("estimator", ESTIMATORS)
        self._choice("precond_pivot", PIVOTS)
        self._positive("num_probes", "lanczos_depth", "cg_tol", "cg_max_iter", "exact_max_n")
        self._non_negative("precond_rank", "cg_min_iter", "noise_floor", "depth_tol",
                           "max_lanczos_depth")
        if self.cg_min_iter > self.cg_max_iter:
            self._fail("cg_min_iter", f"must not exceed cg_max_iter = {self.cg_max_iter}")
