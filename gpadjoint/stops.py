"""Stop rules of the training loop: one protocol, one class per rule.

A rule sees the history records of :func:`gpadjoint.train.fit` one at a time:
``update(record) -> reason | None`` says, in words, why the loop should stop after that
record (None: go on); ``replay(history) -> reason | None`` feeds a resumed run's records
through ``update`` so that the rule's state (and a stop it had already reached) carries over.
The optimiser says which rules apply (:meth:`gpadjoint.optimizers.LBFGS.stop_rules`).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Protocol


class StopRule(Protocol):
    """What the loop asks of a stop rule (see the module docstring)."""

    def update(self, record: dict) -> str | None:
        """Take one record; return why to stop after it, or None."""

    def replay(self, history: list[dict]) -> str | None:
        """Take a resumed run's records; return why it had stopped, or None."""


class _Replay:
    def replay(self, history: list[dict]) -> str | None:
        """Feed ``history`` through :meth:`update`; the reason after its last record, if any."""
        reason = None
        for rec in history:
            reason = self.update(rec)
        return reason


class EarlyStopping(NamedTuple):
    """Early-stopping settings: stop on a loss plateau.

    Stops when the loss has not fallen more than ``min_delta`` (absolute, per datum) below its
    best value for ``patience`` consecutive epochs.

    The loss is a stochastic estimate (new probes each epoch), so ``min_delta`` should exceed
    its epoch-to-epoch noise.
    """

    patience: int = 10
    min_delta: float = 1e-4


class Plateau(_Replay):
    """The :class:`EarlyStopping` rule over ``record["loss"]``."""

    def __init__(self, es: EarlyStopping):
        self.es = es
        self.best, self.wait = math.inf, 0

    def update(self, record: dict) -> str | None:
        """Count epochs without an improvement of more than ``min_delta``."""
        if record["loss"] < self.best - self.es.min_delta:
            self.best, self.wait = record["loss"], 0
        else:
            self.wait += 1
        if self.wait < self.es.patience:
            return None
        return (
            f"early stopping after epoch {record['epoch']}: loss did not improve on "
            f"{self.best:.6g} by more than {self.es.min_delta:g} for {self.es.patience} epochs"
        )


class Converged(_Replay):
    """The L-BFGS stop rule over a step's ``loss`` -> ``new_loss`` and ``new_grad_norm``.

    Stops once the gradient norm at the accepted point is at most ``gtol``, or once the loss
    changed by at most ``rtol * max(1, |loss|)`` for ``patience`` consecutive steps.
    """

    def __init__(self, rtol: float, gtol: float, patience: int):
        self.rtol, self.gtol, self.patience = rtol, gtol, patience
        self.small = 0

    def update(self, record: dict) -> str | None:
        """Check one L-BFGS step's record (records without ``new_loss`` are ignored)."""
        if "new_loss" not in record:
            return None
        change = abs(record["new_loss"] - record["loss"])
        small = change <= self.rtol * max(1.0, abs(record["loss"]))
        self.small = self.small + 1 if small else 0
        if record["new_grad_norm"] <= self.gtol:
            return (f"converged after step {record['epoch']}: gradient norm "
                    f"{record['new_grad_norm']:.3g} <= gtol = {self.gtol:g}")
        if self.small >= self.patience:
            return (f"converged after step {record['epoch']}: the loss changed by less than "
                    f"rtol = {self.rtol:g} (relative) for {self.patience} steps")
        return None


class PredictedDecrease(_Replay):
    """Stop once L-BFGS's model predicts less than ``tol`` (nats/datum) to gain, ``patience`` times.

    Reads a step record's ``predicted_decrease`` (1/2 g^T H^-1 g at the accepted point, with
    the curvature memory's inverse Hessian): on a quadratic that is exactly the gap to the
    minimum, and near an optimum L-BFGS's model approaches it. Records without it are ignored.
    """

    def __init__(self, tol: float, patience: int = 2):
        self.tol, self.patience = tol, patience
        self.small = 0

    def update(self, record: dict) -> str | None:
        """Check one step's predicted decrease."""
        pred = record.get("predicted_decrease")
        if pred is None:
            return None
        self.small = self.small + 1 if pred <= self.tol else 0
        if self.small >= self.patience:
            return (f"converged after step {record['epoch']}: L-BFGS predicts a decrease of "
                    f"{pred:.2g} <= ptol = {self.tol:g} nats/datum, {self.patience} steps running")
        return None
