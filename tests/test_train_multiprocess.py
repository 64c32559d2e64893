"""Two processes (`jax.distributed` over gloo, one CPU device each) train on the same global batch with
the same loss as one process and save one Orbax checkpoint together, which one process with another
mesh resumes; launch/local.sh starts such runs."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

from hyjax.config import load_config
from hyjax.training import integrity, train
from test_train_run import _losses, tiny_run_overrides

COMMON = ["method.name=lora", "train.steps=3", "checkpoint.every_steps=0", "eval.num_examples=4",
          "eval.generation_samples=0", "eval.before_training=false"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("method", [[], ["method.name=zo_fo", "method.zo_fo.learning_rate=1e-3"],
                                    ["method.name=boft", "method.boft.n_factors=2"]],
                         ids=["lora", "zo_fo", "boft"])
def test_two_processes_give_the_loss_of_one(method, tiny_checkpoint, sentiment_data, tmp_path):
    """zo_fo: each process draws the SPSA directions of its own shards; steps 2 and 3 see base weights
    moved by them, so equal losses mean both processes drew what one process draws. The hybrid is not
    here: LoRA-GA's factors come from a gradient that two processes sum in another order, and where the
    gradient's singular values nearly tie (as in this tiny random model) that picks other singular
    vectors (step 2's loss 10.2858 against 10.2886). Its two-process run is checked against two
    processes in the resume test below."""
    single = tmp_path / "single"
    train(load_config(None, tiny_run_overrides(tiny_checkpoint, sentiment_data, single, *COMMON, *method)),
          log=lambda text: None)
    double = tmp_path / "double"
    _two_processes(tiny_run_overrides(tiny_checkpoint, sentiment_data, double, *COMMON, *method))
    ours, theirs = _losses(double), _losses(single)
    assert sorted(ours) == [1, 2, 3]
    np.testing.assert_allclose([ours[s] for s in sorted(ours)], [theirs[s] for s in sorted(theirs)], rtol=2e-6)
    assert (double / "checkpoints" / "3").is_dir()


def _two_processes(overrides: list[str]) -> list[str]:
    """Runs `python -m hyjax.train base *overrides` as two processes of one CPU device each; their outputs."""
    port = _free_port()
    # a loaded 2-core CI machine once stalled both processes' heartbeats past the 60 s default; these tests
    # check results (tests/test_train_multiprocess_faults.py checks the timeout)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "HYJAX_HEARTBEAT_TIMEOUT": "300"}
    command = [sys.executable, "-m", "hyjax.train", "base", *overrides, f"--coordinator=localhost:{port}",
               "--num-processes=2"]
    processes = [subprocess.Popen([*command, f"--process-id={i}"], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], "\n\n".join(o[-3000:] for o in outputs)
    return outputs


def test_two_process_checkpoint_resumes_on_one_process_with_another_mesh(tiny_checkpoint, sentiment_data, tmp_path):
    """2 processes (data parallel) train 3 steps of the hybrid (BOFT and LoRA-GA) and save; 1 process with 4
    devices split fsdp 2 x tensor 2 (the rotations, factors and their moments split over both) restores
    that checkpoint (checking the digests both processes wrote) and continues: steps 4 and 5 have the loss of
    2 processes training 5 steps uninterrupted. LoRA-GA's initial factors come from the checkpoint: drawn
    again from a gradient summed over another mesh, they would differ (its singular values nearly tie) and so
    would the model."""
    steps = ["method.name=hybrid", "method.boft.n_factors=2", "checkpoint.every_steps=0",
             "eval.num_examples=4", "eval.generation_samples=0", "eval.before_training=false"]
    reference = tmp_path / "reference"
    _two_processes(tiny_run_overrides(tiny_checkpoint, sentiment_data, reference, *steps, "train.steps=5"))
    run = tmp_path / "run"
    outputs = _two_processes(tiny_run_overrides(tiny_checkpoint, sentiment_data, run, *steps, "train.steps=3"))
    assert "data 2 x fsdp 1 x tensor 1 (2 devices, 2 processes)" in outputs[0]
    saved = run / "checkpoints" / "3"  # each process recorded the digest of the files it wrote
    for process in (0, 1):
        listed = json.loads(integrity.digest_path(saved, process).read_text())["files"]
        assert listed and {integrity.owner(pathlib.PurePath(name)) for name in listed} == {process}
    assert integrity.problems(saved) == []

    second = tiny_run_overrides(tiny_checkpoint, sentiment_data, run, *steps, "train.steps=5", "mesh.data=1",
                                "mesh.fsdp=2", "mesh.tensor=2")
    resumed = subprocess.run([sys.executable, "-m", "hyjax.train", "base", *second], capture_output=True, text=True,
                             env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "data 1 x fsdp 2 x tensor 2 (4 devices, 1 process)" in resumed.stdout
    assert "resumed from" in resumed.stdout
    ours, theirs = _losses(run), _losses(reference)
    assert sorted(ours) == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([ours[s] for s in range(1, 6)], [theirs[s] for s in range(1, 6)], rtol=1e-5)
    assert ours[5] < ours[1]


def test_local_launch_script_runs_two_processes(tiny_checkpoint, sentiment_data, tmp_path):
    """launch/local.sh starts the processes, prefixes their output, and returns their exit code."""
    script = pathlib.Path(__file__).resolve().parents[1] / "launch" / "local.sh"
    overrides = tiny_run_overrides(tiny_checkpoint, sentiment_data, tmp_path / "run", *COMMON, "train.steps=2")
    done = subprocess.run(["bash", str(script), "--processes", "2", "--", "base", *overrides], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "[p0] " in done.stdout and "[p1] " in done.stdout
    assert (tmp_path / "run" / "checkpoints" / "2").is_dir()
    bad = subprocess.run(["bash", str(script), "--processes", "2", "--", "base", "train.no_such_key=1"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "no_such_key" in bad.stdout + bad.stderr
