"""`train(config)`: the whole fine-tuning run behind `python -m hyjax.train`.

Order of work: checks that need nothing loaded (`preflight`, the checkpoint folder's owner), then the
model, data, adapters and optimizer (`prepare_run`), restore or a fresh state, evaluation before
training, the steps (with periodic checkpoints and evaluations), and at the end a last checkpoint,
evaluation, plots, exports and the summary.

A run stopped by SIGTERM (TPU VM preemption) or Ctrl-C saves a checkpoint of the last finished step
and returns cleanly; running the same command again resumes from it exactly: the restored state
(adapters, optimizer state and lambdas, step, rng) and data position make every later step identical
to an uninterrupted run's.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import time
from typing import Any, Callable

import jax
import numpy as np

from hyjax.adapters.targets import iter_paths
from hyjax.checkpoint.manager import RunCheckpointer
from hyjax.config import RunConfig
from hyjax.model import abstract_params, count_params
from hyjax.optim import current_lambdas
from hyjax.training import distributed, plots, reporting
from hyjax.training.evaluation import Evaluator
from hyjax.training.export import export_run
from hyjax.sharding import describe
from hyjax.training.layout import create_state, jit_train_step, run_layout
from hyjax.training.module_selection import SELECTION_FILE
from hyjax.training.setup import RunSetup, fingerprint, preflight, prepare_run
from hyjax.training.step import TrainState, make_eval_step, make_train_step


class NonFiniteError(RuntimeError):
    """Too many consecutive steps had a non-finite gradient."""


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
        """The adapted parameter tree at the end (hybrid lambdas set)."""
        from hyjax.training.step import state_params

        return state_params(self.state, self.frozen, self.setup.hybrid)


class _StopRequests:
    """SIGTERM and SIGINT set a flag the loop checks after each step (a second Ctrl-C interrupts)."""

    def __init__(self):
        self.requested = None
        self._previous = {}

    def __enter__(self):
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


def open_checkpoints(config: RunConfig) -> tuple[RunCheckpointer, int | None]:
    """The run's checkpointer and the step to resume from (None: fresh), refusing foreign folders."""
    checkpointer = RunCheckpointer(config.checkpoint_dir, keep=config.checkpoint.keep,
                                   async_save=config.checkpoint.async_save, fingerprint=fingerprint(config))
    return checkpointer, checkpointer.check_compatible(config.checkpoint.resume)


def initial_state(setup: RunSetup) -> TrainState:
    """The fresh state, laid out on the run's devices."""
    return create_state(setup.trainable, setup.optimizer, setup.config.train.seed, setup.shardings, setup.base)


def train(config: RunConfig, log: Callable[[str], None] | None = None) -> RunResult:
    """Runs (or resumes) the fine-tuning job of `config`; see the module docstring."""
    wall_start = time.perf_counter()
    main_process = jax.process_index() == 0
    log = log or (lambda text: print(text, flush=True) if main_process else None)
    preflight(config)
    layout = run_layout(config.mesh)
    log(f"mesh: {describe(layout.mesh)}")
    checkpointer, resume_step = open_checkpoints(config)
    meta = checkpointer.read_meta(resume_step) if resume_step is not None else None
    setup = prepare_run(config, layout=layout, data_position=meta["data_position"] if meta else None,
                        selection=meta.get("module_selection") if meta else None, log=log)
    run_record = {"config": config.to_dict()}  # saved with every checkpoint
    if main_process:
        config.save(f"{config.logging.output_dir}/config.yaml")
    if setup.selection is not None:
        run_record["module_selection"] = setup.selection.to_json()
        if main_process:
            with open(f"{config.logging.output_dir}/{SELECTION_FILE}", "w") as f:
                json.dump(run_record["module_selection"], f, indent=1)
    state, frozen = initial_state(setup), setup.frozen
    if resume_step is not None:
        state, _ = checkpointer.restore(resume_step, state)
        log(f"resumed from {checkpointer.directory}/{resume_step} (step {int(state.step)}, data epoch "
            f"{setup.data.train.epoch} step {setup.data.train.step})")
    start_step = int(state.step)
    trainable = setup.trainable_counts["total"]
    share = trainable / count_params(abstract_params(setup.model_config))
    zeroth_order = f", and {count_params(setup.base):,} base weights by SPSA" if setup.base is not None else ""
    log(f"{config.method.name}: {trainable:,} trainable parameters ({share:.3%} of the model){zeroth_order}; "
        f"{setup.total_steps} steps of {config.train.global_batch_size} sequences")

    train_step = jit_train_step(make_train_step(setup.model_config, setup.optimizer, setup.schedule, setup.hybrid,
                                                setup.zeroth_order), layout, setup.shardings)
    evaluator = Evaluator(setup, jax.jit(make_eval_step(setup.model_config, setup.hybrid)))
    metrics_log = reporting.MetricsLog(config.logging.output_dir, tensorboard=config.logging.tensorboard,
                                       resume_step=resume_step, enabled=main_process)
    eval_before = {}
    if evaluator.enabled and config.eval.before_training and resume_step is None:
        eval_before = _evaluate(evaluator, state, frozen, 0, metrics_log, log, "before training")

    accumulation = config.train.grad_accum_steps
    bar = reporting.progress_bar(setup.total_steps, start_step, config.logging.progress_bar and main_process)
    skipped_in_a_row, skipped_total, last_eval = 0, 0, {}
    interrupted = None
    try:  # whatever stops the loop, checkpoints already started are finished, never abandoned
        with _StopRequests() as stops:
            for step in range(start_step, setup.total_steps):
                tick = time.perf_counter()
                local = next(setup.data.train)
                batch = distributed.global_batch(local, setup.shardings.batch, accumulation,
                                                 config.train.global_batch_size)
                state, metrics = train_step(state, frozen, batch)
                metrics = {key: value.item() for key, value in jax.device_get(metrics).items()}
                seconds = time.perf_counter() - tick
                done = step + 1
                tokens = int(np.sum(local["segment_ids"] > 0)) * setup.rows[1]
                if metrics["skipped"]:
                    skipped_in_a_row, skipped_total = skipped_in_a_row + 1, skipped_total + 1
                    log(f"step {done}: non-finite loss or gradient (loss {metrics['loss']}, grad norm "
                        f"{metrics['grad_norm']}); the update was skipped")
                    if skipped_in_a_row >= config.train.max_skipped_steps:
                        raise NonFiniteError(f"{skipped_in_a_row} steps in a row had a non-finite gradient (last: step "
                                             f"{done}); lower train.learning_rate or check the data. The last "
                                             "checkpoint is untouched")
                else:
                    skipped_in_a_row = 0
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['learning_rate']:.2e}",
                                tok_s=f"{tokens / seconds:,.0f}")
                if done % config.logging.every_steps == 0 or done == setup.total_steps:
                    record = {**metrics, "tokens_per_second": tokens / seconds, "step_seconds": seconds}
                    if setup.hybrid:
                        record["lambda"] = reporting.mean_lambdas(current_lambdas(state.opt_state))
                    metrics_log.write(done, record)
                final = done == setup.total_steps
                every = config.checkpoint.every_steps
                stop = distributed.any_process(stops.requested is not None)
                if stop or final or (every and done % every == 0):
                    checkpointer.save(done, state, {"data_position": setup.data.train.position, "metrics": metrics,
                                                    **run_record}, force=True)
                if config.eval.every_steps and done % config.eval.every_steps == 0 and not final and not stop:
                    last_eval = _evaluate(evaluator, state, frozen, done, metrics_log, log, f"step {done}")
                if stop:
                    interrupted = stops.requested or "another process"
                    break
    finally:
        bar.close()
        checkpointer.wait()
    steps_done = int(state.step)
    if interrupted:
        log(f"stopped by {interrupted} after step {steps_done}: checkpoint saved in {checkpointer.directory}; "
            "run the same command again to resume")
        eval_after = {}
    else:
        eval_after = (_evaluate(evaluator, state, frozen, steps_done, metrics_log, log, "after training")
                      if evaluator.enabled else last_eval)
    result = RunResult(setup=setup, state=state, frozen=frozen, summary={}, eval_before=eval_before,
                       eval_after=eval_after, interrupted=interrupted is not None)
    exports = not result.interrupted and (config.export.peft_adapter or config.export.merged_model)
    adapted_on_host = distributed.to_host(result.adapted) if exports else None  # every process takes part
    if main_process:
        result.summary = _finish(result, adapted_on_host, steps_done, start_step, skipped_total, wall_start, log)
    metrics_log.close()
    checkpointer.close()
    return result


def _evaluate(evaluator: Evaluator, state, frozen, step: int, metrics_log, log, when: str) -> dict:
    start = time.perf_counter()
    metrics = evaluator(state, frozen)
    samples = metrics.pop("samples", [])
    metrics_log.write(step, {**metrics, "eval_seconds": time.perf_counter() - start})
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
    if any("loss" in r for r in records):
        files["loss_curve"] = str(plots.loss_curve(records, f"{output}/loss_curve.png"))
    if setup.hybrid:
        lambdas = {path: np.asarray(value) for path, value in iter_paths(current_lambdas(result.state.opt_state))}
        files["lambda_heatmap"] = str(plots.lambda_heatmap(lambdas, f"{output}/lambda_heatmap.png"))
    if setup.selection is not None:
        files["module_selection"] = f"{output}/{SELECTION_FILE}"
    if adapted_on_host is not None:
        files.update(export_run(setup, adapted_on_host, log))
    summary = {
        "status": "interrupted" if result.interrupted else "finished",
        "method": config.method.name,
        "steps": f"{steps_done} of {setup.total_steps}" + (f" (resumed at {start_step})" if start_step else ""),
        "skipped_steps": skipped,
        "trainable_parameters": setup.trainable_counts["total"],
        **({"zeroth_order_parameters": count_params(setup.base)} if setup.base is not None else {}),
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

