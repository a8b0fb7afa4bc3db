"""The validation-loss tracker: best-so-far, and the overfit alarm.

The alarm fires when the held-out loss rose at `patience` consecutive evaluations (each one
higher than the one before): a single noisy uptick does not trip it, a sustained climb does.
It fires once per run (the step it fired at is recorded), and it only warns: the job trains
on unless `stop_on_overfit` asks otherwise. The whole state is a small JSON dict that rides in
every checkpoint, so a resumed job keeps counting where it stopped and publishes the true best.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class Observation:
    """What one evaluation changed: a new best, and/or the alarm firing now."""

    is_best: bool
    alarm: bool


@dataclass
class ValidationTracker:
    patience: int  # 0: no alarm
    best_loss: float | None = None
    best_step: int = 0
    last_loss: float | None = None
    rises: int = 0  # consecutive evaluations that were higher than the previous one
    overfit_step: int = 0  # the step the alarm fired at (0: not yet)

    def observe(self, step: int, loss: float) -> Observation:
        """Record the loss evaluated at `step`."""
        self.rises = self.rises + 1 if self.last_loss is not None and loss > self.last_loss else 0
        self.last_loss = loss
        is_best = self.best_loss is None or loss < self.best_loss
        if is_best:
            self.best_loss, self.best_step = loss, step
        alarm = self.patience > 0 and not self.overfit_step and self.rises >= self.patience
        if alarm:
            self.overfit_step = step
        return Observation(is_best, alarm)

    def warning(self) -> str:
        """The human-readable alarm text (events, job record)."""
        return (f"overfitting: validation loss rose at {self.patience} evaluations in a row by step "
                f"{self.overfit_step}; lowest {self.best_loss:.6g} at step {self.best_step}")

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.best_loss is not None:
            out.update(best_validation_loss=self.best_loss, best_validation_step=float(self.best_step))
        if self.overfit_step:
            out["overfit_step"] = float(self.overfit_step)
        return out

    def state(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict[str, Any], patience: int) -> ValidationTracker:
        values = {**state, "patience": patience}
        return cls(**{k: values[k] for k in cls.__dataclass_fields__ if k in values})
