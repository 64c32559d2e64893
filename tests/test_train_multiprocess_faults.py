"""One process of a 2-process run killed: the survivor ends at once (its next collective fails) or at the
latest after the heartbeat timeout, with one message saying what to do, and both processes started again
resume from the last checkpoint with the losses of an uninterrupted run."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from hyjax.config import load_config
from hyjax.training import train
from test_train_multiprocess import _free_port, _two_processes
from test_train_run import _losses, tiny_run_overrides

STEPS = ["method.name=lora", "train.steps=8", "checkpoint.every_steps=2", "eval.num_examples=4",
         "eval.generation_samples=0", "eval.before_training=false"]
HEARTBEAT_TIMEOUT = 20


def _start_two_processes(overrides, tmp_path, heartbeat_timeout):
    """Both processes of a run as `python -m hyjax.train` commands (each a supervising parent and its
    training child); returns them and their log files once the checkpoint of step 2 is on disk."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "hyjax.train", "base", *overrides, f"--coordinator=localhost:{_free_port()}",
               "--num-processes=2", f"--heartbeat-timeout={heartbeat_timeout}"]
    logs = [tmp_path / f"process_{i}.log" for i in range(2)]
    processes = [subprocess.Popen([*command, f"--process-id={i}"], env=env, stdout=open(logs[i], "w"),
                                  stderr=subprocess.STDOUT) for i in range(2)]
    output = next(pathlib.Path(o.split("=", 1)[1]) for o in overrides if o.startswith("logging.output_dir="))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (output / "checkpoints" / "2").is_dir():
        time.sleep(0.05)
    return processes, logs


def _children(pid: int) -> list[int]:
    return [int(c) for c in pathlib.Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _alive(pid: int, wait: float = 10.0) -> bool:
    """Whether process `pid` still runs after up to `wait` seconds (a zombie no longer runs)."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return False
        if state in "ZX":
            return False
        time.sleep(0.05)
    return True


def test_a_killed_process_ends_the_other_and_both_resume(tiny_checkpoint, sentiment_data, tmp_path):
    output = tmp_path / "run"
    overrides = tiny_run_overrides(tiny_checkpoint, sentiment_data, output, *STEPS)
    processes, logs = _start_two_processes(overrides, tmp_path, HEARTBEAT_TIMEOUT)
    training = _children(processes[1].pid)
    processes[1].send_signal(signal.SIGKILL)  # the parent: its training child dies with it
    killed_at = time.monotonic()
    code = processes[0].wait(timeout=120)
    assert time.monotonic() - killed_at < HEARTBEAT_TIMEOUT + 10
    log = logs[0].read_text()
    assert code == 3, log[-3000:]
    assert log.splitlines()[-1].startswith("error: process 0 of 2 lost contact with the others (")
    assert log.splitlines()[-1].endswith(f"The checkpoints in {output / 'checkpoints'} are intact: start every "
                                         "process again with the same command to resume")
    assert training and not any(_alive(pid) for pid in training), "a training child outlived its parent"
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


def test_sigterm_reaches_the_training_children(tiny_checkpoint, sentiment_data, tmp_path):
    """Preemption: SIGTERM to each command (the supervising parent) reaches its training child once, so
    both save a checkpoint of the same finished step and exit 0."""
    output = tmp_path / "run"
    # agreed on after every step, as a run whose steps are seconds long would want (the default, every 4
    # steps, would leave 8 steps of milliseconds no step but 4 to stop at before the end)
    overrides = tiny_run_overrides(tiny_checkpoint, sentiment_data, output, *STEPS, "checkpoint.stop_check_every=1")
    processes, logs = _start_two_processes(overrides, tmp_path, HEARTBEAT_TIMEOUT)
    for process in processes:
        process.send_signal(signal.SIGTERM)
    codes = [process.wait(timeout=120) for process in processes]
    log = logs[0].read_text()
    assert codes == [0, 0], log[-3000:]
    stopped = [line for line in log.splitlines() if "stopped by SIGTERM after step" in line]
    assert stopped, log[-3000:]
    step = int(stopped[-1].split("after step ")[1].split()[0].rstrip(".:,;"))
    assert step < 8 and (output / "checkpoints" / str(step)).is_dir()


@pytest.mark.parametrize("silent", [1, 0], ids=["worker silent", "coordinator silent"])
def test_a_silent_process_ends_the_other_with_the_same_message(silent, tiny_checkpoint, sentiment_data, tmp_path):
    """A process that stops (SIGSTOP: its sockets stay open, so no collective fails at once) is declared
    dead after the heartbeat timeout (by the coordination service, or by the survivor's client when the
    stopped process hosts the service), and JAX's client then aborts the survivor from C++ (SIGABRT): the
    survivor's parent ends it with the one-line message and exit 3 all the same."""
    output = tmp_path / "run"
    heartbeat_timeout = 10
    overrides = tiny_run_overrides(tiny_checkpoint, sentiment_data, output, *STEPS)
    processes, logs = _start_two_processes(overrides, tmp_path, heartbeat_timeout)
    survivor = 1 - silent
    (stopped,) = _children(processes[silent].pid)
    os.kill(stopped, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        code = processes[survivor].wait(timeout=120)
        ended_after = time.monotonic() - stopped_at
    finally:
        processes[silent].kill()
    log = logs[survivor].read_text()
    assert code == 3, log[-3000:]
    # JAX counts the silence from the last heartbeat it got, which may precede the stop by a beat: no lower bound
    assert ended_after < heartbeat_timeout + 15
    assert "Terminating process because the JAX distributed service detected fatal errors" in log
    # the silence surfaces in a step (JAX aborts the child) or, when it hits a checkpoint save, in the save's barrier
    last = log.splitlines()[-1]
    assert last.startswith(f"error: process {survivor} of 2 lost contact with the others ("), last
    assert last.endswith(
        f"): another process most likely died. The checkpoints in {output / 'checkpoints'} are intact: start every "
        f"process again with the same command to resume"), last
    assert "SIGABRT" in last or "heartbeat timeout" in last, last
    assert "free space" not in last, last
    processes[silent].wait(timeout=10)
    assert not _alive(stopped), "the stopped child outlived its parent"


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
        assert distributed.peer_failure(error) is error.__cause__  # the peer's failure, not the wrapper
    full_disk = CheckpointWriteError("checkpoint step 4 could not be written: File too large")
    assert distributed.peer_failure(full_disk) is None
    assert distributed.peer_failure(ValueError("no connection column in data.tsv")) is None
