"""The run's figures: the smoothed training loss against pandas' exponential moving average, and the loss
curve drawn from every step's record, a resumed run's redone steps and the held-out evaluations."""

from __future__ import annotations

import numpy as np
import pandas as pd

from hyjax.training import plots


def test_smoothing_is_the_debiased_exponential_moving_average():
    values = np.random.default_rng(0).normal(2.0, 0.5, 200)
    for window in (1, 5, 20):
        expected = pd.Series(values).ewm(span=window, adjust=True).mean().to_numpy()
        np.testing.assert_allclose(plots.smoothed(values, window), expected, rtol=1e-12)
    np.testing.assert_allclose(plots.smoothed(np.array([3.0, 3.0, 3.0]), 10), 3.0, rtol=1e-12)  # no pull to 0


def test_short_runs_are_smoothed_too():
    assert [plots.smoothing_window(n) for n in (4, 7, 8, 12, 36, 100, 1000)] == [1, 1, 2, 3, 5, 5, 50]


def test_the_loss_curve_reads_every_step_and_each_evaluation(tmp_path):
    records = [{"step": 0, "eval/loss": 2.5}]
    records += [{"step": s, "loss": 3.0 / s} for s in range(1, 41)]
    records += [{"step": s, "loss": 9.0} for s in (39, 40)]  # redone after a resume: these count
    records += [{"step": 40, "eval/loss": 0.4, "eval/accuracy": 0.9}]
    path = plots.loss_curve(records, tmp_path / "loss_curve.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
