"""What the training loop does around each step, one callback per concern: stop signals, skipped
steps, the progress bar, metrics, periodic evaluation and checkpoints.

`hyjax.training.loop.fit` calls, for every callback in order, `on_step(event)` after each step, and
asks `stop_requested()` before it dispatches the next (on every process; one process asking stops them
all after the same step). The next step is usually dispatched before a step's callbacks run, and takes
that step's state: a callback that reads `event.state` says at which steps in `needs_state`. `train`
composes them; a notebook or benchmark can compose others.
"""

from __future__ import annotations

import dataclasses
import signal
from typing import Any, Callable

from hyjax.methods import Method
from hyjax.training import reporting
from hyjax.training.checkpointing import RunCheckpointer
from hyjax.training.step import TrainState


class NonFiniteError(RuntimeError):
    """Too many consecutive steps had a non-finite gradient."""


@dataclasses.dataclass(frozen=True)
class StepEnd:
    """What the loop tells the callbacks after a step."""

    step: int  # steps done (the one just taken, 1-based)
    total: int  # steps of the run
    state: TrainState | None  # after the step; None where no callback `needs_state` (the next step took it)
    metrics: dict[str, float]  # the step's metrics (loss, grad_norm, learning_rate, skipped, ...)
    seconds: float  # wall time of the step
    tokens: int  # real tokens of the step's global batch
    stop: bool  # the run stops after this step (a stop signal on some process)

    @property
    def final(self) -> bool:
        return self.step == self.total


class Callback:
    """A hook of the training loop; every method does nothing by default."""

    def stop_requested(self) -> str | None:
        """Why the run should stop after the current step (e.g. "SIGTERM"), or None."""
        return None

    def needs_state(self, step: int, total: int) -> bool:
        """Whether `on_step` reads `event.state` after `step` (besides the last step and a stop, where the
        state is always given): the loop then waits for that step before it dispatches the next."""
        return False

    def on_step(self, event: StepEnd) -> None:
        pass


class StopSignals(Callback):
    """SIGTERM and SIGINT ask the run to stop after the current step (a second Ctrl-C interrupts at
    once). A context manager: the previous handlers come back on exit."""

    def __init__(self):
        self.requested = None
        self._previous = {}

    def __enter__(self) -> "StopSignals":
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def stop_requested(self) -> str | None:
        return self.requested


class SkippedSteps(Callback):
    """Counts steps whose update was skipped (non-finite loss or gradient), logs each, and stops the run
    with `NonFiniteError` after `limit` in a row (the last checkpoint is untouched)."""

    def __init__(self, limit: int, log: Callable[[str], None]):
        self.limit, self.log = limit, log
        self.in_a_row = self.total = 0

    def on_step(self, event: StepEnd) -> None:
        metrics = event.metrics
        if not metrics["skipped"]:
            self.in_a_row = 0
            return
        self.in_a_row, self.total = self.in_a_row + 1, self.total + 1
        self.log(f"step {event.step}: non-finite loss or gradient (loss {metrics['loss']}, grad norm "
                 f"{metrics['grad_norm']}); the update was skipped")
        if self.in_a_row >= self.limit:
            raise NonFiniteError(f"{self.in_a_row} steps in a row had a non-finite gradient (last: step "
                                 f"{event.step}); lower train.learning_rate or check the data. The last "
                                 "checkpoint is untouched")


class ProgressBar(Callback):
    """A tqdm bar with what moves: the loss, learning rate and tokens per second; for GRPO (a step whose
    metrics hold a reward) the mean reward, the completions' length and the tokens sampled per second."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = reporting.progress_bar(total, initial, enabled)

    def on_step(self, event: StepEnd) -> None:
        self.bar.update(1)
        self.bar.set_postfix(self.postfix(event))

    @staticmethod
    def postfix(event: StepEnd) -> dict[str, str]:
        """The bar's fields after `event`."""
        m = event.metrics
        if "reward" in m:
            return {"reward": f"{m['reward']:.3f}", "completion": f"{m['completion_tokens']:.1f} tok",
                    "sample_tok_s": f"{m['sampling_tokens_per_second']:,.0f}"}
        return {"loss": f"{m['loss']:.4f}", "lr": f"{m['learning_rate']:.2e}",
                "tok_s": f"{event.tokens / event.seconds:,.0f}"}

    def close(self) -> None:
        self.bar.close()


class MetricsLogging(Callback):
    """Every `every` steps (and the last): the step's metrics, throughput and what the method logs of
    its state (`Method.logged`: the hybrid's lambda of every layer of every weight), into the run's
    `MetricsLog`; every other step its loss alone, so the loss curve has every step."""

    def __init__(self, metrics_log: reporting.MetricsLog, every: int, method: Method | None = None):
        self.metrics_log, self.every, self.method = metrics_log, every, method

    def needs_state(self, step: int, total: int) -> bool:
        return self.method is not None and step % self.every == 0

    def on_step(self, event: StepEnd) -> None:
        if event.step % self.every and not event.final:
            self.metrics_log.write(event.step, {"loss": event.metrics["loss"]})
            return
        record = {**event.metrics, "tokens_per_second": event.tokens / event.seconds, "step_seconds": event.seconds}
        if self.method is not None:
            record.update(self.method.logged(self.method.forward_state(event.state.opt_state)))
        self.metrics_log.write(event.step, record)


class Checkpoints(Callback):
    """Saves a checkpoint every `every` steps (0: never), after the last step and before stopping; its
    metadata: the data position (`position()`), the step's metrics and `record` (config, the method's
    start-up choice); beside the state, the adapters' starting values `start`. `close` waits for every
    started save, whatever stopped the loop."""

    def __init__(self, checkpointer: RunCheckpointer, every: int, position: Callable[[], dict], record: dict,
                 start: dict):
        self.checkpointer, self.every, self.position, self.record = checkpointer, every, position, record
        self.start = start

    def needs_state(self, step: int, total: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def on_step(self, event: StepEnd) -> None:
        if event.stop or event.final or self.needs_state(event.step, event.total):
            meta = {"data_position": self.position(), "metrics": event.metrics, **self.record}
            self.checkpointer.save(event.step, event.state, meta, start=self.start, force=True)

    def close(self) -> None:
        self.checkpointer.wait()


class PeriodicEvaluation(Callback):
    """Every `every` steps (0: never), but not after the last step or before stopping (the run
    evaluates at its end): `evaluate(state, step)`; the latest result is kept in `last`."""

    def __init__(self, every: int, evaluate: Callable[[TrainState, int], dict[str, Any]]):
        self.every, self.evaluate = every, evaluate
        self.last: dict[str, Any] = {}

    def needs_state(self, step: int, total: int) -> bool:
        return bool(self.every) and step % self.every == 0 and step != total

    def on_step(self, event: StepEnd) -> None:
        if self.needs_state(event.step, event.total) and not event.stop:
            self.last = self.evaluate(event.state, event.step)
