"""End-of-run figures: the loss curve (GRPO runs: the reward curve); a method's own figures come from
`Method.figures`."""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

from hyjax.figures import pyplot, save


def smoothed(values: np.ndarray, window: int) -> np.ndarray:
    """Exponential moving average with the span of `window` values, debiased at the start (as
    TensorBoard's smoothing), so the first values are not pulled towards zero."""
    decay = 1.0 - 2.0 / (window + 1)
    out = np.empty(len(values))
    average = weight = 0.0
    for i, value in enumerate(values):
        average = decay * average + (1 - decay) * value
        weight = decay * weight + (1 - decay)
        out[i] = average / weight
    return out


def smoothing_window(n_steps: int) -> int:
    """The span the loss curve smooths over: a twentieth of the run, and at least 5 steps when the run has
    20 or more (a short run is noisy step to step too); 1 (no smoothing) below 8 steps."""
    return max(1, n_steps // 20, min(5, n_steps // 4))


@dataclasses.dataclass(frozen=True)
class StepSeries:
    """What a step curve draws: one value per step (a resumed run's redone steps: the last record), its
    smoothing over `window` steps (None when the run is too short to smooth), and the held-out metric at
    each evaluation."""

    steps: np.ndarray
    values: np.ndarray
    smoothed: np.ndarray | None
    window: int
    eval_steps: np.ndarray
    eval_values: np.ndarray


def step_series(records: list[dict], key: str, eval_key: str) -> StepSeries:
    """The `StepSeries` of `key` (the training records) and `eval_key` (the evaluations) of metrics.jsonl's
    records."""
    by_step = {r["step"]: r[key] for r in records if key in r}  # a resumed run's redone steps: the last
    evaluations = sorted({r["step"]: r[eval_key] for r in records if eval_key in r}.items())
    steps, values = (np.asarray(column, float) for column in zip(*sorted(by_step.items()))) if by_step else (
        np.zeros(0), np.zeros(0))
    window = smoothing_window(len(steps))
    eval_steps, eval_values = (np.asarray(column, float) for column in zip(*evaluations)) if evaluations else (
        np.zeros(0), np.zeros(0))
    return StepSeries(steps, values, smoothed(values, window) if window > 1 else None, window, eval_steps,
                      eval_values)


def loss_curve(records: list[dict], path: str | pathlib.Path) -> pathlib.Path:
    """Training loss at every step (raw, and smoothed over `smoothing_window` steps) and the held-out
    loss at each evaluation (step 0: before training), as a PNG."""
    return save(step_figure(step_series(records, "loss", "eval/loss"), what="train loss", held_out="held-out loss",
                             ylabel="answer-token cross-entropy", color="tab:blue"), path)


def reward_curve(records: list[dict], path: str | pathlib.Path) -> pathlib.Path:
    """GRPO: the mean reward of each step's completions (raw, and smoothed over `smoothing_window` steps)
    and the held-out exact match at each evaluation (step 0: before training), as a PNG."""
    return save(step_figure(step_series(records, "reward", "eval/exact_match"), what="mean reward",
                             held_out="held-out exact match (greedy)", ylabel="reward / exact match",
                             color="tab:green"), path)


def step_figure(series: StepSeries, *, what: str, held_out: str, ylabel: str, color: str):
    """A matplotlib figure of `series`: each step's value, its smoothing, and the evaluations as dotted
    points (lines in that order, those that exist)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    if len(series.steps):
        ax.plot(series.steps, series.values, color=color, alpha=0.3, linewidth=0.8, label=f"{what} (each step)")
        if series.smoothed is not None:
            ax.plot(series.steps, series.smoothed, color=color, linewidth=1.6,
                    label=f"{what} (smoothed, {series.window} steps)")
    if len(series.eval_steps):
        ax.plot(series.eval_steps, series.eval_values, "o:", color="tab:orange",
                label=f"{held_out} (at each evaluation)")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig
