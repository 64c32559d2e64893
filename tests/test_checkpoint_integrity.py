"""Damaged checkpoints (a cut file, flipped bytes, a missing array file) are found by their digests, named
with their step and file, passed over for the newest intact one, and never deleted; a resumed run moves
them aside and continues exactly as the uninterrupted run did."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil

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
