"""The run's figures, checked by what they draw (the series handed to matplotlib, line by line): the
smoothed training loss against pandas' exponential moving average, the loss curve from every step's
record (a resumed run's redone steps once) and the held-out evaluations, and the lambda heatmap."""

from __future__ import annotations

import numpy as np
import pandas as pd

from hyjax.methods import hybrid_report
from hyjax.training import plots


def test_smoothing_is_the_debiased_exponential_moving_average():
    values = np.random.default_rng(0).normal(2.0, 0.5, 200)
    for window in (1, 5, 20):
        expected = pd.Series(values).ewm(span=window, adjust=True).mean().to_numpy()
        np.testing.assert_allclose(plots.smoothed(values, window), expected, rtol=1e-12)
    np.testing.assert_allclose(plots.smoothed(np.array([3.0, 3.0, 3.0]), 10), 3.0, rtol=1e-12)  # no pull to 0


def test_short_runs_are_smoothed_too():
    assert [plots.smoothing_window(n) for n in (4, 7, 8, 12, 36, 100, 1000)] == [1, 1, 2, 3, 5, 5, 50]


def test_the_loss_curve_draws_every_step_once_and_each_evaluation(tmp_path):
    records = [{"step": 0, "eval/loss": 2.5}]
    records += [{"step": s, "loss": 3.0 / s} for s in range(1, 41)]
    records += [{"step": s, "loss": 9.0} for s in (39, 40)]  # redone after a resume: these count
    records += [{"step": 40, "eval/loss": 0.4, "eval/accuracy": 0.9}]
    series = plots.step_series(records, "loss", "eval/loss")
    expected = [3.0 / s for s in range(1, 39)] + [9.0, 9.0]
    np.testing.assert_array_equal(series.steps, np.arange(1, 41))
    np.testing.assert_array_equal(series.values, expected)
    assert series.window == 5  # 40 steps: at least 5
    np.testing.assert_allclose(series.smoothed, pd.Series(expected).ewm(span=5).mean(), rtol=1e-12)
    assert list(series.eval_steps) == [0, 40] and list(series.eval_values) == [2.5, 0.4]

    fig = plots.step_figure(series, what="train loss", held_out="held-out loss", ylabel="loss", color="tab:blue")
    raw, smooth, held_out = fig.axes[0].lines  # what the PNG shows, line by line
    np.testing.assert_array_equal(raw.get_xydata(), np.column_stack([series.steps, series.values]))
    np.testing.assert_array_equal(smooth.get_xydata(), np.column_stack([series.steps, series.smoothed]))
    np.testing.assert_array_equal(held_out.get_xydata(), [[0, 2.5], [40, 0.4]])
    assert [line.get_label() for line in fig.axes[0].lines] == [
        "train loss (each step)", "train loss (smoothed, 5 steps)", "held-out loss (at each evaluation)"]
    path = plots.loss_curve(records, tmp_path / "loss_curve.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_short_run_is_drawn_unsmoothed_and_a_run_without_evaluations_without_points():
    series = plots.step_series([{"step": s, "reward": float(s)} for s in (1, 2, 3)], "reward", "eval/exact_match")
    assert series.smoothed is None and len(series.eval_steps) == 0
    fig = plots.step_figure(series, what="mean reward", held_out="exact match", ylabel="reward", color="tab:green")
    (line,) = fig.axes[0].lines
    np.testing.assert_array_equal(line.get_xydata(), [[1, 1.0], [2, 2.0], [3, 3.0]])


def test_the_lambda_heatmap_draws_each_weight_a_row_and_each_layer_a_column():
    lambdas = {"layers/mlp/up_proj": np.array([0.2, 0.4]), "layers/attn/q_proj": np.array([0.5, 0.9])}
    names, grid = hybrid_report.lambda_grid(lambdas)
    assert names == ["layers/attn/q_proj", "layers/mlp/up_proj"]
    fig = hybrid_report.lambda_figure(lambdas)
    (image,) = fig.axes[0].images
    np.testing.assert_allclose(image.get_array(), [[0.5, 0.9], [0.2, 0.4]])
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["attn/q_proj", "mlp/up_proj"]
    assert image.get_clim() == (0.0, 1.0)  # lambda's whole range, whatever the run's values
