"""`hyjax.training.loop.fit` and the training loop's callbacks, each alone, with a step function of plain
arithmetic: which steps run, what each callback is told, when a run stops, and what each callback writes
or saves."""

from __future__ import annotations

import os
import signal

import jax.numpy as jnp
import numpy as np
import pytest

from hyjax.training.callbacks import (
    Callback,
    Checkpoints,
    MetricsLogging,
    ProgressBar,
    NonFiniteError,
    PeriodicEvaluation,
    SkippedSteps,
    StepEnd,
    StopSignals,
)
from hyjax.training.loop import fit
from hyjax.training.reporting import MetricsLog, read_metrics


def counting_step(state, frozen, batch):
    """state + the batch's value; its metrics as the real step returns them (device scalars)."""
    state = state + batch["value"]
    return state, {"loss": jnp.float32(10.0 / state), "skipped": jnp.bool_(False), "learning_rate": jnp.float32(1e-3)}


def batches(tokens: int = 7):
    value = 1
    while True:
        yield {"value": value}, tokens
        value += 1


class Recorder(Callback):
    """Keeps every event; asks to stop after step `stop_at`."""

    def __init__(self, stop_at: int | None = None):
        self.events: list[StepEnd] = []
        self.stop_at = stop_at

    def stop_requested(self):
        return "asked" if self.stop_at is not None and len(self.events) + 1 >= self.stop_at else None

    def on_step(self, event):
        self.events.append(event)


def event(step: int, total: int = 5, stop: bool = False, **metrics) -> StepEnd:
    return StepEnd(step=step, total=total, state=None, metrics={"loss": 1.0, "skipped": False, **metrics},
                   seconds=0.5, tokens=100, stop=stop)


def test_fit_runs_the_steps_asked_and_tells_every_callback_after_each():
    first, second = Recorder(), Recorder()
    state, stopped = fit(counting_step, 0, {}, batches(), range(2, 5), total=5, callbacks=[first, second])
    assert stopped is None and state == 1 + 2 + 3  # three batches, in order
    assert [e.step for e in first.events] == [3, 4, 5] and [e.step for e in second.events] == [3, 4, 5]
    # the state of a step whose successor took it is not passed on (no callback asked for it)
    assert [e.state for e in first.events] == [None, None, 6] and [e.final for e in first.events] == [False, False, True]
    assert first.events[1].metrics == {"loss": pytest.approx(10.0 / 3), "skipped": False,
                                       "learning_rate": pytest.approx(1e-3)}
    assert all(type(value) in (float, bool) for value in first.events[1].metrics.values())  # host values
    assert all(e.tokens == 7 and e.seconds > 0 and not e.stop for e in first.events)


def test_fit_stops_after_the_step_a_callback_asks_to_stop_at_and_says_why():
    asking, other = Recorder(stop_at=2), Recorder()
    state, stopped = fit(counting_step, 0, {}, batches(), range(0, 5), total=5, callbacks=[asking, other])
    assert stopped == "asked" and state == 1 + 2
    assert [e.step for e in other.events] == [1, 2] and [e.stop for e in other.events] == [False, True]


class TracedValue:
    """A metric whose reading by the host (`jax.device_get`) is written to `trace`."""

    def __init__(self, step: int, trace: list):
        self.step, self.trace = step, trace

    def __array__(self, dtype=None, copy=None):
        self.trace.append(("read", self.step))
        return np.asarray(float(self.step), dtype=np.float32)


class StateReader(Recorder):
    """Reads the state after every `every`-th step."""

    def __init__(self, every: int):
        super().__init__()
        self.every = every

    def needs_state(self, step, total):
        return step % self.every == 0


@pytest.mark.parametrize("every", [None, 2])
def test_next_step_is_dispatched_before_the_loop_waits_for_a_steps_metrics(every):
    """Step k+1 is dispatched before step k's metrics are read, except after a step whose state a callback
    reads (step k+1 would take it): there step k is finished first, and the callback gets its state."""
    trace = []

    def traced_step(state, frozen, batch):
        state = state + batch["value"]
        trace.append(("dispatch", batch["value"]))
        return state, {"loss": TracedValue(batch["value"], trace)}

    reader = StateReader(every) if every else Recorder()
    state, stopped = fit(traced_step, 0, {}, batches(), range(0, 5), total=5, callbacks=[reader])
    assert stopped is None and state == 15
    if every is None:
        assert trace == [("dispatch", 1), ("dispatch", 2), ("read", 1), ("dispatch", 3), ("read", 2),
                         ("dispatch", 4), ("read", 3), ("dispatch", 5), ("read", 4), ("read", 5)]
        assert [e.state for e in reader.events] == [None, None, None, None, 15]
    else:
        assert trace == [("dispatch", 1), ("dispatch", 2), ("read", 1), ("read", 2), ("dispatch", 3),
                         ("dispatch", 4), ("read", 3), ("read", 4), ("dispatch", 5), ("read", 5)]
        assert [e.state for e in reader.events] == [None, 3, None, 10, 15]


def test_several_processes_agree_on_a_stop_only_every_few_steps(monkeypatch):
    """With several processes a stop request is read (a collective) only at multiples of stop_check_every:
    asked from step 1 on, the run stops after step 3."""
    from hyjax.training import distributed

    agreed = []
    monkeypatch.setattr("jax.process_count", lambda: 2)
    monkeypatch.setattr(distributed, "any_process", lambda flag: agreed.append(flag) or flag)
    asking = Recorder(stop_at=1)
    state, stopped = fit(counting_step, 0, {}, batches(), range(0, 8), total=8, callbacks=[asking],
                         stop_check_every=3)
    assert stopped == "asked" and state == 1 + 2 + 3
    assert agreed == [True] and [e.stop for e in asking.events] == [False, False, True]


def test_skipped_steps_are_counted_reset_by_a_good_step_and_stop_the_run_at_the_limit():
    lines = []
    skipped = SkippedSteps(limit=2, log=lines.append)
    skipped.on_step(event(1, skipped=True, grad_norm=float("nan")))
    skipped.on_step(event(2))
    skipped.on_step(event(3, skipped=True, grad_norm=float("inf")))
    assert (skipped.total, skipped.in_a_row) == (2, 1)
    assert lines[0] == "step 1: non-finite loss or gradient (loss 1.0, grad norm nan); the update was skipped"
    with pytest.raises(NonFiniteError, match="2 steps in a row had a non-finite gradient \\(last: step 4\\)"):
        skipped.on_step(event(4, skipped=True, grad_norm=float("nan")))


def test_metrics_are_logged_whole_every_few_steps_and_at_the_end_and_the_loss_at_every_step(tmp_path):
    log = MetricsLog(tmp_path, tensorboard=False, resume_step=None)
    logging = MetricsLogging(log, every=3)
    for step in range(1, 8):
        logging.on_step(event(step, total=7, grad_norm=0.25 * step))
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 8))
    whole = {r["step"]: r for r in records if len(r) > 2}
    assert sorted(whole) == [3, 6, 7]
    assert whole[6] == {"step": 6, "loss": 1.0, "skipped": False, "grad_norm": 1.5, "tokens_per_second": 200.0,
                        "step_seconds": 0.5}
    assert records[0] == {"step": 1, "loss": 1.0}


class SavingCheckpointer:
    def __init__(self):
        self.saved, self.waited = [], False

    def save(self, step, state, meta, start, force):
        self.saved.append((step, meta, start, force))

    def wait(self):
        self.waited = True


def test_checkpoints_are_saved_every_few_steps_at_the_end_and_before_stopping():
    checkpointer = SavingCheckpointer()
    position = iter([{"epoch": 0, "index": i} for i in range(10)])
    checkpoints = Checkpoints(checkpointer, every=2, position=lambda: next(position), record={"config": "c"},
                              start={"a0": 1})
    for step in (1, 2, 3, 4, 5):
        checkpoints.on_step(event(step, total=5))
    checkpoints.on_step(event(3, total=9, stop=True))  # a stop signal: saved whatever the step
    assert [s[0] for s in checkpointer.saved] == [2, 4, 5, 3]
    step, meta, start, force = checkpointer.saved[0]
    assert meta == {"data_position": {"epoch": 0, "index": 0}, "metrics": {"loss": 1.0, "skipped": False},
                    "config": "c"}
    assert start == {"a0": 1} and force
    checkpoints.close()
    assert checkpointer.waited
    never = SavingCheckpointer()
    for step in (1, 2, 3):
        Checkpoints(never, every=0, position=dict, record={}, start={}).on_step(event(step, total=4))
    assert never.saved == []


def test_periodic_evaluation_skips_the_last_step_and_a_stopping_one():
    evaluated = []
    evaluation = PeriodicEvaluation(every=2, evaluate=lambda state, step: evaluated.append(step) or {"at": step})
    for step in (1, 2, 3, 4, 5, 6):
        evaluation.on_step(event(step, total=6, stop=step == 4))
    assert evaluated == [2] and evaluation.last == {"at": 2}  # 4: stopping; 6: the run's own final evaluation


def test_a_stop_signal_is_requested_and_the_previous_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as signals:
        assert signals.stop_requested() is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.stop_requested() == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before


def test_the_progress_bar_shows_the_loss_or_for_grpo_the_reward_and_the_sampling_speed():
    assert ProgressBar.postfix(event(3, learning_rate=2e-4)) == {"loss": "1.0000", "lr": "2.00e-04", "tok_s": "200"}
    grpo = event(3, learning_rate=2e-4, reward=0.4375, completion_tokens=7.25, sampling_tokens_per_second=1234.5)
    assert ProgressBar.postfix(grpo) == {"reward": "0.438", "completion": "7.2 tok", "sample_tok_s": "1,234"}
