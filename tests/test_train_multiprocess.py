"""Two processes (`jax.distributed` over gloo, one CPU device each) train on the same global batch with
the same loss as one process, and save one Orbax checkpoint together."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np

from hyjax.config import load_config
from hyjax.training import train
from test_train_run import _losses, tiny_run_overrides

COMMON = ["method.name=lora", "train.steps=3", "checkpoint.every_steps=0", "eval.num_examples=4",
          "eval.generation_samples=0", "eval.before_training=false"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_give_the_loss_of_one(tiny_checkpoint, sentiment_data, tmp_path):
    single = tmp_path / "single"
    train(load_config(None, tiny_run_overrides(tiny_checkpoint, sentiment_data, single, *COMMON)),
          log=lambda text: None)
    double = tmp_path / "double"
    overrides = tiny_run_overrides(tiny_checkpoint, sentiment_data, double, *COMMON)
    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    processes = [subprocess.Popen([sys.executable, "-m", "hyjax.train", "base", *overrides, f"--coordinator=localhost:{port}",
                                   "--num-processes=2", f"--process-id={i}"], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], "\n\n".join(o[-3000:] for o in outputs)
    ours, theirs = _losses(double), _losses(single)
    assert sorted(ours) == [1, 2, 3]
    np.testing.assert_allclose([ours[s] for s in sorted(ours)], [theirs[s] for s in sorted(theirs)], rtol=2e-6)
    assert (double / "checkpoints" / "3").is_dir()
