"""The overfit alarm rule: it fires once the validation loss rose at K evaluations in a row."""

from __future__ import annotations

from services.training.trainers.overfit import ValidationTracker


def feed(tracker: ValidationTracker, losses: list[float]) -> list[bool]:
    return [tracker.observe(4 * (i + 1), loss).alarm for i, loss in enumerate(losses)]


def test_fires_after_k_consecutive_rises_and_only_once() -> None:
    tracker = ValidationTracker(patience=3)
    alarms = feed(tracker, [0.5, 0.4, 0.3, 0.31, 0.32, 0.33, 0.34, 0.35])
    assert alarms == [False] * 5 + [True, False, False]
    assert tracker.overfit_step == 24
    assert (tracker.best_loss, tracker.best_step) == (0.3, 12)
    assert "3 evaluations" in tracker.warning() and "by step 24" in tracker.warning() and "step 12" in tracker.warning()


def test_a_drop_resets_the_count() -> None:
    tracker = ValidationTracker(patience=3)
    assert not any(feed(tracker, [0.5, 0.6, 0.7, 0.65, 0.7, 0.8, 0.75]))
    assert tracker.overfit_step == 0 and tracker.best_step == 4


def test_equal_losses_are_not_rises_and_patience_zero_is_off() -> None:
    assert not any(feed(ValidationTracker(patience=2), [0.5, 0.5, 0.5, 0.5]))
    assert not any(feed(ValidationTracker(patience=0), [0.1, 0.2, 0.3, 0.4, 0.5]))
    assert feed(ValidationTracker(patience=1), [0.5, 0.6]) == [False, True]


def test_state_round_trips_so_a_resumed_run_keeps_counting() -> None:
    first = ValidationTracker(patience=3)
    feed(first, [0.5, 0.4, 0.41, 0.42])
    resumed = ValidationTracker.from_state(first.state(), patience=3)
    assert resumed == first
    assert resumed.observe(20, 0.43).alarm
    assert resumed.metrics() == {"best_validation_loss": 0.4, "best_validation_step": 8.0, "overfit_step": 20.0}
