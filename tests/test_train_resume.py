"""A run killed (SIGKILL) or preempted (SIGTERM) and started again continues exactly as an uninterrupted
run: the same loss at every later step, bitwise on CPU, and the same final adapters and lambdas."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from hyjax.config import load_config
from hyjax.optim import current_lambdas
from hyjax.training import restore, train
from test_train_run import _losses, tiny_run_overrides

STEPS = 40
# The hybrid method carries the most state: LoRA-GA factors from a gradient estimate, BOFT with dropout
# (the rng), lambdas in the optimizer state.
HYBRID = ["method.name=hybrid", "method.boft.dropout=0.1", "method.lora_ga.rank=2", "method.lora_ga.n_batches=2",
          f"train.steps={STEPS}", "checkpoint.every_steps=3", "eval.num_examples=4", "eval.before_training=false",
          "eval.generation_samples=0", "method.hybrid.lambdas.warmup_steps=2"]


@pytest.fixture(scope="module")
def uninterrupted(tiny_checkpoint, sentiment_data, tmp_path_factory):
    output = tmp_path_factory.mktemp("uninterrupted")
    result = train(load_config(None, tiny_run_overrides(tiny_checkpoint, sentiment_data, output, *HYBRID)),
                   log=lambda text: None)
    return _losses(output), result, output


def _start(overrides, log_path):
    return subprocess.Popen([sys.executable, "-m", "hyjax.train", "base", *overrides], stdout=open(log_path, "w"),
                            stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _wait_for_checkpoint_and_step(process, output, step, timeout=240):
    """Blocks until the run has a finished checkpoint and has logged `step` (or ended, or timed out)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        saved = (output / "checkpoints").is_dir() and any(p.name.isdigit() for p in (output / "checkpoints").iterdir())
        if saved and max(_losses(output), default=0) >= step:
            return
        time.sleep(0.01)


def _assert_same_run(output, reference):
    losses, result, _ = reference
    assert _losses(output) == losses  # bitwise: JSON keeps every float exactly
    final = restore(output)
    assert final.step == STEPS
    for a, b in zip(jax.tree.leaves(result.state.trainable), jax.tree.leaves(final.state.trainable)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(current_lambdas(result.state.opt_state)),
                    jax.tree.leaves(current_lambdas(final.state.opt_state))):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_interrupted_run_resumes_as_if_uninterrupted(how, uninterrupted, tiny_checkpoint, sentiment_data, tmp_path):
    output = tmp_path / "run"
    overrides = tiny_run_overrides(tiny_checkpoint, sentiment_data, output, *HYBRID)
    process = _start(overrides, tmp_path / "first.log")
    _wait_for_checkpoint_and_step(process, output, 5)
    process.send_signal(getattr(signal, how))
    code = process.wait(timeout=120)
    log = (tmp_path / "first.log").read_text()
    reached = max(_losses(output))
    assert reached < STEPS, "the run finished before it was interrupted; the test proves nothing"
    if how == "SIGTERM":
        assert code == 0 and f"stopped by SIGTERM after step {reached}" in log, log[-2000:]
    else:
        assert code == -signal.SIGKILL
    resumed = subprocess.run([sys.executable, "-m", "hyjax.train", "base", *overrides], capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    _assert_same_run(output, uninterrupted)


def test_a_checkpoint_saved_without_starting_values_draws_them_again(uninterrupted, tmp_path):
    """Checkpoints saved before they kept the adapters' starting values (here: that item removed, and the
    digests, which came later) restore on the mesh that saved them: the factors are drawn again from the
    same start-up gradient."""
    _, result, output = uninterrupted
    shutil.copytree(output / "checkpoints", tmp_path / "checkpoints")
    kept = tmp_path / "checkpoints" / str(STEPS) / "start"
    assert kept.is_dir()
    shutil.rmtree(kept)
    for digest in kept.parent.glob("hyjax_digest.*"):
        digest.unlink()
    restored = restore(tmp_path)
    for a, b in zip(jax.tree.leaves(result.adapted), jax.tree.leaves(restored.adapted)):
        np.testing.assert_array_equal(a, b)
