"""Damaged checkpoints (a cut file, flipped bytes, a missing array file) are found by their digests, named
with their step and file, passed over for the newest intact one, and never deleted; a resumed run moves
them aside and continues exactly as the uninterrupted run did. A save that cannot be written (a full
disk) stops the run with a clear message, the earlier checkpoints intact, and the run resumes once
space is back. A run killed at any point of a save resumes from its newest complete checkpoint as if
uninterrupted."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from hyjax.config import load_config
from hyjax.training import CheckpointDamagedError, integrity, restore, train
from test_train_run import _losses, tiny_run_overrides

STEPS, EVERY = 6, 2


def _overrides(tiny_checkpoint, sentiment_data, output, *extra):
    return tiny_run_overrides(tiny_checkpoint, sentiment_data, output, "method.name=lora", f"train.steps={STEPS}",
                              f"checkpoint.every_steps={EVERY}", "checkpoint.keep=null", "eval.num_examples=4",
                              "eval.generation_samples=0", "eval.before_training=false", *extra)


@pytest.fixture(scope="module")
def run(tiny_checkpoint, sentiment_data, tmp_path_factory):
    """An uninterrupted LoRA run with checkpoints at steps 2, 4 and 6 (saved in the background)."""
    output = tmp_path_factory.mktemp("intact") / "run"
    result = train(load_config(None, _overrides(tiny_checkpoint, sentiment_data, output)), log=lambda text: None)
    return output, result


def _largest_array_file(step_dir: pathlib.Path) -> pathlib.Path:
    return max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _damage(path: pathlib.Path, how: str) -> str:
    """Damages `path` as `how` says; returns the problem `integrity.problems` must report."""
    size = path.stat().st_size
    if how == "cut":
        os.truncate(path, size // 2)
        return f"{size // 2:,} bytes, written with {size:,}"
    if how == "flipped":
        data = bytearray(path.read_bytes())
        data[size // 2] ^= 0xFF
        path.write_bytes(bytes(data))
        return "contents changed since it was written (SHA-256 differs)"
    path.unlink()
    return "missing"


def _contents(folder: pathlib.Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_every_checkpoint_records_the_digest_of_each_of_its_files(run):
    output, _ = run
    for step in (2, 4, 6):
        step_dir = output / "checkpoints" / str(step)
        listed = json.loads(integrity.digest_path(step_dir, 0).read_text())["files"]
        written = {p.relative_to(step_dir).as_posix() for p in step_dir.rglob("*")
                   if p.is_file() and not p.name.startswith(integrity.DIGEST_PREFIX)}
        assert set(listed) == written and any(name.startswith("state/") for name in listed)
        assert integrity.problems(step_dir) == []


@pytest.mark.parametrize("how", ["cut", "flipped", "missing"])
def test_a_damaged_checkpoint_is_named_and_passed_over_untouched(run, tmp_path, how):
    output, _ = run
    copy = tmp_path / "run"
    shutil.copytree(output, copy)
    damaged_file = _largest_array_file(copy / "checkpoints" / "6")
    name = damaged_file.relative_to(copy / "checkpoints" / "6").as_posix()
    problem = f"{name}: {_damage(damaged_file, how)}"
    before = _contents(copy)

    assert integrity.problems(copy / "checkpoints" / "6") == [problem]
    with pytest.raises(CheckpointDamagedError, match=rf"checkpoint step 6 .* is damaged: {re.escape(problem)}"):
        restore(copy, step=6)
    with pytest.warns(UserWarning, match=rf"checkpoint step 6 .* is damaged \({re.escape(problem)}\)"):
        restored = restore(copy)
    assert restored.step == 4
    intact = restore(output, step=4)
    for a, b in zip(jax.tree.leaves(intact.state), jax.tree.leaves(restored.state)):
        np.testing.assert_array_equal(a, b)
    assert _contents(copy) == before


def test_a_resumed_run_moves_damaged_checkpoints_aside_and_continues_exactly(run, tiny_checkpoint, sentiment_data,
                                                                             tmp_path):
    """Flipped bytes restore silently as other numbers without the digests: here step 6 is found damaged,
    moved to checkpoints/damaged/6 byte for byte, and the run resumes at 4 and saves 6 again; with
    `checkpoint.keep=1` retention counts the new intact checkpoint only."""
    output, uninterrupted = run
    copy = tmp_path / "run"
    shutil.copytree(output, copy)
    _damage(_largest_array_file(copy / "checkpoints" / "6"), "flipped")
    damaged = _contents(copy / "checkpoints" / "6")
    lines = []
    result = train(load_config(None, _overrides(tiny_checkpoint, sentiment_data, copy, "checkpoint.keep=1")),
                   log=lines.append)
    log = "\n".join(lines)
    assert "warning: checkpoint step 6" in log and "is damaged (state/" in log
    assert f"resumed from {copy / 'checkpoints'}/4" in log
    assert _contents(copy / "checkpoints" / "damaged" / "6") == damaged
    assert sorted(p.name for p in (copy / "checkpoints").iterdir()) == ["6", "damaged"]
    assert integrity.problems(copy / "checkpoints" / "6") == []
    assert _losses(copy) == _losses(output)
    for a, b in zip(jax.tree.leaves(uninterrupted.state.trainable), jax.tree.leaves(result.state.trainable)):
        np.testing.assert_array_equal(a, b)


def test_a_folder_of_damaged_checkpoints_only_is_refused_untouched(run, tiny_checkpoint, sentiment_data, tmp_path):
    output, _ = run
    copy = tmp_path / "run"
    shutil.copytree(output, copy)
    for step in (2, 4, 6):
        _damage(_largest_array_file(copy / "checkpoints" / str(step)), "cut")
    before = _contents(copy)
    with pytest.raises(CheckpointDamagedError, match=r"every checkpoint in .* is damaged \(steps \[2, 4, 6\]; "
                                                     r"step 6: state/.*bytes, written with"):
        train(load_config(None, _overrides(tiny_checkpoint, sentiment_data, copy)), log=lambda text: None)
    assert _contents(copy) == before


def test_a_full_disk_stops_the_run_clearly_and_it_resumes_once_space_is_back(run, tiny_checkpoint, sentiment_data,
                                                                              tmp_path):
    """The run stopped after its checkpoint at step 4 (step 6's removed from a copy of the uninterrupted
    run); started again under a 4 KiB file-size limit (RLIMIT_FSIZE; Python ignores SIGXFSZ, so writes past
    it fail as on a full disk), its save of step 6 fails; started again without it, it resumes exactly."""
    output, uninterrupted = run
    copy = tmp_path / "run"
    shutil.copytree(output, copy)
    shutil.rmtree(copy / "checkpoints" / "6")
    kept = {step: _contents(copy / "checkpoints" / step) for step in ("2", "4")}
    overrides = _overrides(tiny_checkpoint, sentiment_data, copy)
    limited = ("import resource, runpy, sys; "
               "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY)); "
               f"sys.argv = ['hyjax.train', 'base', *{overrides!r}]; "
               "runpy.run_module('hyjax.train', run_name='__main__')")
    full = subprocess.run([sys.executable, "-c", limited], capture_output=True, text=True, timeout=600)
    assert full.returncode == 2, full.stdout[-2000:] + full.stderr[-3000:]
    assert [line for line in full.stderr.splitlines() if line.startswith("error:")] == [  # after Orbax's own log
        f"error: checkpoint step 6 could not be written to {copy / 'checkpoints'}: File too large (errno 27). The "
        "checkpoints already there (steps [2, 4]) are intact: free space (or lift the limit), then run the same "
        "command again to resume from step 4"]
    assert {step: _contents(copy / "checkpoints" / step) for step in ("2", "4")} == kept
    assert sorted(p.name for p in (copy / "checkpoints").iterdir()) == ["2", "4", "6.orbax-checkpoint-tmp"]

    lines = []
    result = train(load_config(None, overrides), log=lines.append)
    assert f"resumed from {copy / 'checkpoints'}/4" in "\n".join(lines)
    assert sorted(p.name for p in (copy / "checkpoints").iterdir()) == ["2", "4", "6"]
    assert _losses(copy) == _losses(output)
    for a, b in zip(jax.tree.leaves(uninterrupted.state.trainable), jax.tree.leaves(result.state.trainable)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("point, resumes_at, digests_of_4", [
    ("before-commit", 2, None), ("before-digest", 4, []), ("in-digest", 4, ["hyjax_digest.process_0.partial"])])
def test_a_run_killed_during_a_save_resumes_from_the_newest_complete_checkpoint(run, tiny_checkpoint, sentiment_data,
                                                                                tmp_path, point, resumes_at,
                                                                                digests_of_4):
    """SIGKILL during the save of step 4 (tests/kill_points.py): before Orbax commits it, the half-written
    folder is invisible and the run resumes at 2; after the commit, with its digest missing or half
    written, step 4 is complete (Orbax's commit says so) and the run resumes there, unchecked."""
    output, uninterrupted = run
    copy = tmp_path / "run"
    overrides = _overrides(tiny_checkpoint, sentiment_data, copy)
    killed = subprocess.run([sys.executable, str(pathlib.Path(__file__).parent / "kill_points.py"), point, "4", "base",
                             *overrides], capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stdout[-2000:] + killed.stderr[-3000:]
    assert max(int(p.name) for p in (copy / "checkpoints").iterdir() if p.name.isdigit()) == resumes_at
    if digests_of_4 is not None:
        assert sorted(p.name for p in (copy / "checkpoints" / "4").glob("hyjax_digest*")) == digests_of_4

    lines = []
    result = train(load_config(None, overrides), log=lines.append)
    assert f"resumed from {copy / 'checkpoints'}/{resumes_at}" in "\n".join(lines)
    assert _losses(copy) == _losses(output)
    for a, b in zip(jax.tree.leaves(uninterrupted.state.trainable), jax.tree.leaves(result.state.trainable)):
        np.testing.assert_array_equal(a, b)
    assert sorted(p.name for p in (copy / "checkpoints").iterdir()) == ["2", "4", "6"]
    for step in (2, 4, 6):  # every checkpoint left is readable
        assert restore(copy, step=step).step == step
