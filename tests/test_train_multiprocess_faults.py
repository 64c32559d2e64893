"""One process of a 2-process run killed: the survivor ends at once (its next collective fails) or at the
latest after the heartbeat timeout, with one message saying what to do, and both processes started again
resume from the last checkpoint with the losses of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np

from hyjax.config import load_config
from hyjax.training import train
from test_train_multiprocess import _free_port, _two_processes
from test_train_run import _losses, tiny_run_overrides

STEPS = ["method.name=lora", "train.steps=8", "checkpoint.every_steps=2", "eval.num_examples=4",
         "eval.generation_samples=0", "eval.before_training=false"]
HEARTBEAT_TIMEOUT = 20


def test_a_killed_process_ends_the_other_and_both_resume(tiny_checkpoint, sentiment_data, tmp_path):
    output = tmp_path / "run"
    overrides = tiny_run_overrides(tiny_checkpoint, sentiment_data, output, *STEPS)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "hyjax.train", "base", *overrides, f"--coordinator=localhost:{_free_port()}",
               "--num-processes=2", f"--heartbeat-timeout={HEARTBEAT_TIMEOUT}"]
    logs = [tmp_path / f"process_{i}.log" for i in range(2)]
    processes = [subprocess.Popen([*command, f"--process-id={i}"], env=env, stdout=open(logs[i], "w"),
                                  stderr=subprocess.STDOUT) for i in range(2)]
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (output / "checkpoints" / "2").is_dir():
        time.sleep(0.05)
    processes[1].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    code = processes[0].wait(timeout=120)
    assert time.monotonic() - killed_at < HEARTBEAT_TIMEOUT + 10
    log = logs[0].read_text()
    assert code == 3, log[-3000:]
    assert log.splitlines()[-1].startswith("error: process 0 of 2 lost contact with the others (")
    assert log.splitlines()[-1].endswith(f"The checkpoints in {output / 'checkpoints'} are intact: start every "
                                         "process again with the same command to resume")
    reached = max(int(p.name) for p in (output / "checkpoints").iterdir() if p.name.isdigit())
    assert reached < 8, "the run finished before a process was killed; the test proves nothing"

    outputs = _two_processes(overrides)
    assert f"resumed from {output / 'checkpoints'}/{reached}" in outputs[0]
    single = tmp_path / "single"
    train(load_config(None, tiny_run_overrides(tiny_checkpoint, sentiment_data, single, *STEPS)), log=lambda text: None)
    ours, theirs = _losses(output), _losses(single)
    assert sorted(ours) == list(range(1, 9))
    # 2 processes sum gradients in another order than 1 (tests/test_train_multiprocess.py)
    np.testing.assert_allclose([ours[s] for s in sorted(ours)], [theirs[s] for s in sorted(theirs)], rtol=2e-6)


def test_a_peer_lost_during_a_save_counts_as_lost_contact(monkeypatch):
    """Orbax passes a failed Gloo all-gather on as a ValueError, which the checkpointer wraps: still the
    one-line message and exit code 3, not the full-disk advice (a kill during a save)."""
    import jax

    from hyjax.training import CheckpointWriteError, distributed

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    try:
        try:
            raise ValueError("UNKNOWN: Gloo AllGather failed: [pair.cc:538] Read error: Connection reset by peer")
        except ValueError as error:
            raise CheckpointWriteError("checkpoint step 4 could not be written to run/checkpoints") from error
    except CheckpointWriteError as error:
        assert distributed.lost_contact(error)
    assert not distributed.lost_contact(CheckpointWriteError("checkpoint step 4 could not be written: File too large"))
    assert not distributed.lost_contact(ValueError("no connection column in data.tsv"))
