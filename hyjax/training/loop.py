"""`train(config)`: the whole fine-tuning run behind `python -m hyjax.train`, and `fit`, its plain loop.

Order of work: checks that need nothing loaded (`preflight`, the checkpoint folder's owner), then the
model, data, the method's start-up work and the run's plan (`prepare_run`), restore or a fresh state,
evaluation before training, the steps (`fit`, with the callbacks of hyjax.training.callbacks:
progress, metrics, checkpoints, periodic evaluation, stop signals), and at the end evaluation, plots,
exports and the summary.

A run stopped by SIGTERM (TPU VM preemption) or Ctrl-C saves a checkpoint of the last finished step
and returns cleanly; running the same command again resumes from it exactly: the restored state
(adapters, optimizer state with the method's state in it, step, rng, the method's own weights) and data
position make every later step identical to an uninterrupted run's.
"""

from __future__ import annotations

import dataclasses
import json
import time
from functools import partial
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np

from hyjax.config import ConfigError, RunConfig
from hyjax.model import abstract_params, count_params
from hyjax.rl.prompts import PromptBatches
from hyjax.sharding import describe
from hyjax.training import distributed, plots, reporting
from hyjax.training.callbacks import (
    Callback,
    Checkpoints,
    MetricsLogging,
    PeriodicEvaluation,
    ProgressBar,
    SkippedSteps,
    StepEnd,
    StopSignals,
)
from hyjax.training.checkpointing import RunCheckpointer
from hyjax.evaluation.held_out import Evaluator
from hyjax.training.export import export_run
from hyjax.training.grpo import GRPOStep, ReferencePolicy
from hyjax.training.restore import saved_selection
from hyjax.training.run_plan import run_layout
from hyjax.training.setup import RunSetup, comparable_fingerprint, fingerprint, preflight, prepare_run
from hyjax.training.step import TrainState

@dataclasses.dataclass
class RunResult:
    """What `train` returns: the final state and setup, and what the summary reports."""

    setup: RunSetup
    state: TrainState
    frozen: dict
    summary: dict[str, Any]
    eval_before: dict[str, Any]
    eval_after: dict[str, Any]
    interrupted: bool

    @property
    def adapted(self) -> dict:
        """The adapted parameter tree at the end (the method's forward state set)."""
        return self.setup.plan.params(self.state, self.frozen)


def fit(step_fn, state: TrainState, frozen: dict, batches: Iterator[tuple[dict, int]], steps: range, total: int,
        callbacks: Sequence[Callback], stop_check_every: int = 1) -> tuple[TrainState, str | None]:
    """Runs `step_fn(state, frozen, batch)` for `steps`, each on `next(batches)` (a global batch and
    its real-token count), telling `callbacks` after each step. Returns the last state and why the
    run stopped early (a callback's `stop_requested`, on any process), or None.

    Two steps are in flight: step k+1 is dispatched before the loop waits for step k's metrics, so the
    device never idles while the host reads them. Dispatching k+1 takes step k's state (the step donates
    it), so the loop first finishes step k wherever a callback reads that state (`Callback.needs_state`),
    and the callbacks are otherwise told `state=None`. Stop requests are read before each dispatch; with
    several processes they are agreed on (a collective) every `stop_check_every` steps, so every process
    stops after the same step.
    """
    in_flight = None  # the step dispatched last, not yet told to the callbacks
    finished_at = time.perf_counter()
    for step in steps:
        if in_flight is not None:
            reason = _stop_reason(callbacks, in_flight.step, stop_check_every)
            if reason is not None:
                _tell_callbacks(in_flight, callbacks, finished_at, stop=True)
                return in_flight.state, reason
            if any(c.needs_state(in_flight.step, total) for c in callbacks):
                finished_at = _tell_callbacks(in_flight, callbacks, finished_at)
                in_flight = None
        batch, tokens = next(batches)
        state, metrics = step_fn(state, frozen, batch)
        if in_flight is not None:
            finished_at = _tell_callbacks(in_flight.without_state(), callbacks, finished_at)
        in_flight = _InFlight(step=step + 1, total=total, state=state, metrics=metrics, tokens=tokens)
    if in_flight is None:
        return state, None
    reason = _stop_reason(callbacks, in_flight.step, stop_check_every, last=True)
    _tell_callbacks(in_flight, callbacks, finished_at, stop=reason is not None)
    return state, reason


@dataclasses.dataclass(frozen=True)
class _InFlight:
    """A dispatched step: its number, the state it returns (None once the next step has taken it), its
    metrics on the device."""

    step: int
    total: int
    state: TrainState | None
    metrics: dict
    tokens: int

    def without_state(self) -> "_InFlight":
        return dataclasses.replace(self, state=None)


def _tell_callbacks(done: _InFlight, callbacks: Sequence[Callback], previous_finish: float,
                    stop: bool = False) -> float:
    """Waits for `done`'s metrics and tells the callbacks; returns when it finished. A step's seconds run
    from the previous step's finish (the device's time per step while two are in flight)."""
    metrics = {key: value.item() for key, value in jax.device_get(done.metrics).items()}
    finished = time.perf_counter()
    event = StepEnd(step=done.step, total=done.total, state=done.state, metrics=metrics,
                    seconds=finished - previous_finish, tokens=done.tokens, stop=stop)
    for callback in callbacks:
        callback.on_step(event)
    return finished


def _stop_reason(callbacks: Sequence[Callback], step: int, every: int, last: bool = False) -> str | None:
    """Why the run stops after `step`: a callback's request on this process, or "another process".
    With several processes the requests are only read at steps that are multiples of `every` (and after
    the last step), where every process reads them together."""
    if jax.process_count() > 1 and step % every and not last:
        return None
    reasons = [reason for reason in (c.stop_requested() for c in callbacks) if reason]
    if distributed.any_process(bool(reasons)):
        return reasons[0] if reasons else "another process"
    return None


def open_checkpoints(config: RunConfig, log: Callable[[str], None]) -> tuple[RunCheckpointer, int | None]:
    """The run's checkpointer and the step to resume from (None: fresh; damaged checkpoints passed over
    with a warning to `log`), refusing foreign folders and a checkpoint past `train.steps`."""
    checkpointer = RunCheckpointer(config.checkpoint_dir, keep=config.checkpoint.keep,
                                   async_save=config.checkpoint.async_save, fingerprint=fingerprint(config),
                                   comparable=comparable_fingerprint)
    step = checkpointer.check_compatible(config.checkpoint.resume, lambda text: log(f"warning: {text}"))
    if step is not None and config.train.steps is not None and step > config.train.steps:
        raise ConfigError(f"checkpoint.dir {checkpointer.directory} holds step {step}, past train.steps="
                          f"{config.train.steps}: that run is already further than asked. Raise train.steps to "
                          "continue it, or choose a new logging.output_dir (the checkpoints are left untouched)")
    return checkpointer, step


def _global_batches(setup: RunSetup) -> Iterator[tuple[dict, int]]:
    """This process's training batches, placed as global arrays, with the global batch's real tokens."""
    train = setup.config.train
    while True:
        local = next(setup.data.train)
        batch = distributed.global_batch(local, setup.plan.shardings.batch, train.grad_accum_steps,
                                         train.global_batch_size)
        yield batch, int(np.sum(local["segment_ids"] > 0)) * setup.rows[1]


def grpo_parts(setup: RunSetup, state: TrainState, position: dict | None):
    """GRPO's step for `fit`, its batches (the prompts of each step) and their position (for checkpoints);
    call with the fresh `state`, before restoring: the model at step 0 is the reference policy."""
    config = setup.config
    prompts = PromptBatches.of_run(config, setup.tokenizer, seed=config.data.shuffle_seed, position=position,
                                   count=config.train.global_batch_size // config.grpo.group_size)
    step = GRPOStep(setup, ReferencePolicy.at_start(setup, state) if config.grpo.beta > 0 else None)
    return step, ((batch, config.train.global_batch_size) for batch in prompts), lambda: prompts.position


def train(config: RunConfig, log: Callable[[str], None] | None = None) -> RunResult:
    """Runs (or resumes) the fine-tuning job of `config`; see the module docstring."""
    wall_start = time.perf_counter()
    main_process = jax.process_index() == 0
    log = log or (lambda text: print(text, flush=True) if main_process else None)
    preflight(config)
    layout = run_layout(config.mesh)
    log(f"mesh: {describe(layout.mesh)}")
    checkpointer, resume_step = open_checkpoints(config, log)
    meta = checkpointer.read_meta(resume_step) if resume_step is not None else None
    grpo = config.train.objective == "grpo"
    setup = prepare_run(config, layout=layout, data_position=meta["data_position"] if meta else None,
                        selection=saved_selection(config, meta) if meta else None,
                        read_start=partial(checkpointer.restore_start, resume_step) if meta else None, log=log)
    plan = setup.plan
    record = _record_run(setup, main_process)
    state, frozen = setup.initial_state(), setup.frozen
    if grpo:  # before the restore: the reference policy is the model at step 0
        step_fn, batches, data_position = grpo_parts(setup, state, meta["data_position"] if meta else None)
    else:
        step_fn, batches = plan.train_step(), _global_batches(setup)
        data_position = lambda: setup.data.train.position  # noqa: E731
    # The step-0 values live on in `state` (and GRPO's reference): kept here too, they would hold one more
    # copy of whatever is trained (the whole model in full fine-tuning, the base weights in zo_fo) all run.
    setup.trainable = setup.base = None
    if resume_step is not None:
        state, _ = checkpointer.restore(resume_step, state)
        position = data_position()
        log(f"resumed from {checkpointer.directory}/{resume_step} (step {int(state.step)}, data epoch "
            f"{position['epoch']} step {position['step']})")
    start_step = int(state.step)
    trainable = setup.trainable_counts["total"]
    share = trainable / count_params(abstract_params(setup.model_config))
    own = f", and {count_params(state.base):,} weights it trains itself" if state.base is not None else ""
    log(f"{config.method.name}: {trainable:,} trainable parameters ({share:.3%} of the model){own}; "
        f"{setup.total_steps} steps of {config.train.global_batch_size} sequences")

    evaluator = Evaluator(setup)
    metrics_log = reporting.MetricsLog(config.logging.output_dir, tensorboard=config.logging.tensorboard,
                                       resume_step=resume_step, enabled=main_process)

    def evaluate(state: TrainState, step: int, when: str) -> dict[str, Any]:
        return _evaluate(evaluator, state, frozen, step, metrics_log, log, when)

    eval_before = {}
    if evaluator.enabled and config.eval.before_training and resume_step is None:
        eval_before = evaluate(state, 0, "before training")
    skipped = SkippedSteps(config.train.max_skipped_steps, log)
    progress = ProgressBar(setup.total_steps, start_step, config.logging.progress_bar and main_process)
    checkpoints = Checkpoints(checkpointer, config.checkpoint.every_steps, data_position, record, setup.start)
    periodic = PeriodicEvaluation(config.eval.every_steps if evaluator.enabled else 0,
                                  lambda state, step: evaluate(state, step, f"step {step}"))
    metrics = MetricsLogging(metrics_log, config.logging.every_steps, plan.method)
    try:  # whatever stops the loop, checkpoints already started are finished, never abandoned
        with StopSignals() as signals:
            state, interrupted = fit(step_fn, state, frozen, batches,
                                     range(start_step, setup.total_steps), setup.total_steps,
                                     [signals, skipped, progress, metrics, checkpoints, periodic],
                                     stop_check_every=config.checkpoint.stop_check_every)
    finally:
        progress.close()
        checkpoints.close()
    steps_done = int(state.step)
    if interrupted:
        log(f"stopped by {interrupted} after step {steps_done}: checkpoint saved in {checkpointer.directory}; "
            "run the same command again to resume")
        eval_after = {}
    else:
        eval_after = evaluate(state, steps_done, "after training") if evaluator.enabled else periodic.last
    result = RunResult(setup=setup, state=state, frozen=frozen, summary={}, eval_before=eval_before,
                       eval_after=eval_after, interrupted=interrupted is not None)
    exports = not result.interrupted and config.export.requested
    adapted_on_host = distributed.to_host(result.adapted) if exports else None  # every process takes part
    if main_process:
        result.summary = _finish(result, adapted_on_host, steps_done, start_step, skipped.total, wall_start, log)
    metrics_log.close()
    checkpointer.close()
    return result


def _record_run(setup: RunSetup, main_process: bool) -> dict:
    """What every checkpoint's metadata carries besides the step's own: the resolved config, the run's
    length in steps and the method's start-up choice (all `restore` needs besides the model); process 0
    also writes the config and the choice beside the checkpoints."""
    config = setup.config
    record = {"config": config.to_dict(), "total_steps": setup.total_steps}
    if main_process:
        config.save(f"{config.logging.output_dir}/config.yaml")
    if setup.selection is not None:
        record[setup.plan.method.SELECTION_KEY] = setup.selection.to_json()
        if main_process:
            with open(f"{config.logging.output_dir}/{selection_file(setup)}", "w") as f:
                json.dump(record[setup.plan.method.SELECTION_KEY], f, indent=1)
    return record


def selection_file(setup: RunSetup) -> str:
    """The file name of the method's start-up choice in the run folder (`module_selection.json`)."""
    return f"{setup.plan.method.SELECTION_KEY}.json"


def _evaluate(evaluator: Evaluator, state, frozen, step: int, metrics_log, log, when: str) -> dict:
    start = time.perf_counter()
    metrics = evaluator(state, frozen)
    samples = metrics.pop("samples", [])
    correct_rows = metrics.pop("correct_rows", None)
    rows = {"eval_correct_rows": correct_rows} if correct_rows is not None else {}
    metrics_log.write(step, {**metrics, "eval_seconds": time.perf_counter() - start, **rows})
    log(f"eval {when}: {reporting.format_eval(metrics)}")
    for sample in samples:
        log(f"  sample: {sample['prompt'][-80:]!r} -> {sample['generated']!r} (reference {sample['reference']!r})")
    return {**metrics, "samples": samples}


def _finish(result: RunResult, adapted_on_host, steps_done: int, start_step: int, skipped: int, wall_start: float,
            log) -> dict:
    """Plots, exports and the summary (process 0)."""
    setup = result.setup
    config = setup.config
    output = config.logging.output_dir
    records = reporting.read_metrics(f"{output}/{reporting.METRICS_FILE}")
    files = {"metrics": f"{output}/{reporting.METRICS_FILE}", "checkpoints": str(config.checkpoint_dir)}
    if any("reward" in r for r in records):
        files["reward_curve"] = str(plots.reward_curve(records, f"{output}/reward_curve.png"))
    elif any("loss" in r for r in records):
        files["loss_curve"] = str(plots.loss_curve(records, f"{output}/loss_curve.png"))
    method = setup.plan.method
    files.update(method.figures(jax.device_get(method.forward_state(result.state.opt_state)), output))
    if setup.selection is not None:
        files[setup.plan.method.SELECTION_KEY] = f"{output}/{selection_file(setup)}"
    if adapted_on_host is not None:
        files.update(export_run(setup, adapted_on_host, log))
    summary = {
        "status": "interrupted" if result.interrupted else "finished",
        "method": config.method.name,
        "steps": f"{steps_done} of {setup.total_steps}" + (f" (resumed at {start_step})" if start_step else ""),
        "skipped_steps": skipped,
        "trainable_parameters": setup.trainable_counts["total"],
        **({"own_weight_parameters": count_params(result.state.base)} if result.state.base is not None else {}),
        "wall_time_seconds": time.perf_counter() - wall_start,
        "peak_host_memory_mib": reporting.peak_host_memory_mib(),
    }
    device_peak = reporting.peak_device_memory_mib()
    if device_peak is not None:
        summary["peak_device_memory_mib"] = device_peak
    for label, results in (("eval_before", result.eval_before), ("eval_after", result.eval_after)):
        numbers = {k.split("/")[1]: v for k, v in results.items() if k.startswith("eval/")}
        if numbers:
            summary[label] = numbers
    summary["files"] = files
    log(reporting.format_summary(summary))
    with open(f"{output}/summary.json", "w") as f:
        json.dump(summary, f, indent=2)
    return summary
