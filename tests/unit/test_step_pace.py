"""StepPace: a training attempt's step durations, ETA and progress-event throttling."""

from __future__ import annotations

from services.training.job_run import StepPace
from tests.fixtures.clock import ManualClock


def test_eta_counts_from_the_attempts_first_step() -> None:
    clock = ManualClock()
    pace = StepPace(event_interval=0.0, clock=clock)
    clock.now += 2.0
    took, eta, emit = pace.step(11, 20)  # resumed at step 10: one step done in 2 s, nine to go
    assert (took, eta, emit) == (2.0, 18.0, True)
    clock.now += 1.0
    took, eta, _ = pace.step(12, 20)
    assert (took, eta) == (1.0, 12.0)  # 3 s for two steps, eight to go
    assert pace.elapsed() == 3.0


def test_events_are_throttled_but_the_last_step_always_emits() -> None:
    clock = ManualClock()
    pace = StepPace(event_interval=5.0, clock=clock)
    emitted = []
    for step in range(1, 5):
        clock.now += 1.0
        emitted.append(pace.step(step, 4)[2])
    assert emitted == [True, False, False, True]
