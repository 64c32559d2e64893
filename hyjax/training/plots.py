"""End-of-run figures: the loss curve, and for hybrid runs the per-layer lambda heatmap."""

from __future__ import annotations

import pathlib

import numpy as np


def _pyplot():
    # deferred: matplotlib loads only when a plot is drawn, its headless backend chosen first
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loss_curve(records: list[dict], path: str | pathlib.Path) -> pathlib.Path:
    """Training loss per step (and held-out loss where evaluated) as a PNG."""
    plt = _pyplot()
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    held_out = [(r["step"], r["eval/loss"]) for r in records if "eval/loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if held_out:
        ax.plot(*zip(*held_out), "o-", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("answer-token cross-entropy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return pathlib.Path(path)


def lambda_heatmap(lambdas: dict[str, np.ndarray], path: str | pathlib.Path) -> pathlib.Path:
    """lambda (the BOFT branch's share) per target weight (rows) and layer (columns) as a PNG."""
    plt = _pyplot()
    names = sorted(lambdas)
    grid = np.stack([np.atleast_1d(np.asarray(lambdas[name], np.float32)).reshape(-1) for name in names])
    fig, ax = plt.subplots(figsize=(max(6, grid.shape[1] * 0.3 + 3), 0.4 * len(names) + 1.5))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_yticks(range(len(names)), [name.replace("layers/", "") for name in names])
    ax.set_xlabel("layer")
    ax.set_title("hybrid lambda (BOFT share; LoRA-GA gets 1 - lambda)")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return pathlib.Path(path)
