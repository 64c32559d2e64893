"""What a run shows and leaves behind: metrics as JSON lines and TensorBoard events, the progress bar,
and the final summary. Only process 0 writes or prints."""

from __future__ import annotations

import json
import math
import pathlib
import resource
import sys
from typing import Any

import jax
from tqdm.auto import tqdm

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """`<output_dir>/metrics.jsonl` (one JSON object per logged step or evaluation) and optional
    TensorBoard events in `<output_dir>/tensorboard`.

    Resuming at step k drops the lines of steps after k first, so the file reads as one
    uninterrupted run.
    """

    def __init__(self, output_dir: str | pathlib.Path, *, tensorboard: bool, resume_step: int | None,
                 enabled: bool = True):
        self.enabled = enabled
        self.path = pathlib.Path(output_dir) / METRICS_FILE
        self.writer = None
        if not enabled:
            return
        if resume_step is None:
            self.path.write_text("")
        else:
            kept = [line for line in read_metrics(self.path) if line.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(line) + "\n" for line in kept))
        if tensorboard:
            from tensorboardX import SummaryWriter  # deferred: only runs with logging.tensorboard load it

            self.writer = SummaryWriter(str(pathlib.Path(output_dir) / "tensorboard"), purge_step=resume_step)

    def write(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **values}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(key, value, step)
                elif isinstance(value, dict):
                    for name, number in value.items():
                        if isinstance(number, (int, float)):
                            self.writer.add_scalar(f"{key}/{name}", number, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: str | pathlib.Path) -> list[dict]:
    """The records of a metrics.jsonl file (a missing file: none)."""
    path = pathlib.Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def progress_bar(total: int, initial: int, enabled: bool):
    """A tqdm bar over optimizer steps (ETA included); a disabled bar when not on a terminal's process 0."""
    return tqdm(total=total, initial=initial, desc="train", unit="step", disable=not enabled, dynamic_ncols=True,
                file=sys.stderr)


def peak_host_memory_mib() -> float:
    """Peak resident memory of this process (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_device_memory_mib() -> float | None:
    """Peak bytes in use on the first local accelerator (None where the backend does not say, e.g. CPU)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**20


def format_eval(metrics: dict[str, Any]) -> str:
    """`accuracy 0.812, loss 0.431, perplexity 1.54 (200 examples)`."""
    parts = []
    for key in ("eval/accuracy", "eval/exact_match", "eval/answer_format", "eval/loss", "eval/perplexity"):
        if key in metrics:
            parts.append(f"{key.split('/')[1].replace('_', ' ')} {metrics[key]:.4g}")
    text = ", ".join(parts)
    if "eval/examples" in metrics:
        text += f" ({metrics['eval/examples']} examples)"
    return text


def format_summary(summary: dict[str, Any]) -> str:
    """The end-of-run summary as aligned lines."""
    lines = ["", "run summary"]
    for key, value in summary.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}" for k, v in value.items())
        elif isinstance(value, float):
            value = f"{value:.4g}"
        lines.append(f"  {key:<24} {value}")
    return "\n".join(lines)
