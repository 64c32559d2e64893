"""What the hybrid's runs record of its lambdas: every layer's value in the metrics log, and the
end-of-run heatmap (`Hybrid.logged`, `Hybrid.figures`)."""

from __future__ import annotations

import pathlib

import numpy as np

from hyjax.adapters.targets import iter_paths
from hyjax.figures import pyplot, save


def lambda_metrics(lambdas: dict) -> dict[str, dict]:
    """The hybrid's lambdas for the metrics: `lambda`, every layer's value per hybrid weight path (a list
    in layer order, 4 decimals); `lambda_mean` and `lambda_std`, their mean and spread over the layers."""
    values = {path: np.asarray(value, np.float64).reshape(-1) for path, value in iter_paths(lambdas)}
    return {"lambda": {path: [round(float(v), 4) for v in layer] for path, layer in values.items()},
            "lambda_mean": {path: float(layer.mean()) for path, layer in values.items()},
            "lambda_std": {path: float(layer.std()) for path, layer in values.items()}}


def lambda_grid(lambdas: dict) -> tuple[list[str], np.ndarray]:
    """The heatmap's rows (target weight paths, sorted) and its grid `[weights, layers]` of lambda, from
    lambdas by path or nested like the parameters."""
    values = dict(iter_paths(lambdas))
    names = sorted(values)
    return names, np.stack([np.atleast_1d(np.asarray(values[name], np.float32)).reshape(-1) for name in names])


def lambda_heatmap(lambdas: dict, path: str | pathlib.Path) -> pathlib.Path:
    """lambda (the BOFT branch's share) per target weight (rows) and layer (columns) as a PNG."""
    return save(lambda_figure(lambdas), path)


def lambda_figure(lambdas: dict):
    """The matplotlib figure of `lambda_heatmap`: `lambda_grid` drawn as an image."""
    plt = pyplot()
    names, grid = lambda_grid(lambdas)
    fig, ax = plt.subplots(figsize=(max(6, grid.shape[1] * 0.3 + 3), 0.4 * len(names) + 1.5))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_yticks(range(len(names)), [name.replace("layers/", "") for name in names])
    ax.set_xlabel("layer")
    ax.set_title("hybrid lambda (BOFT share; LoRA-GA gets 1 - lambda)")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return fig
