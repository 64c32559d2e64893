"""Bad input to `python -m hyjax.train` gets a clear message (exit code 2) before anything heavy runs,
and never touches existing checkpoints."""

from __future__ import annotations

import hashlib

import pytest

from hyjax.cli import train as cli
from test_train_run import tiny_run_overrides


def _run(capsys, *args) -> tuple[int, str]:
    code = cli.main(["base", *args])  # base.yaml alone: no quickstart settings
    return code, capsys.readouterr().err


def test_a_misspelled_key_names_the_closest_valid_one(capsys):
    code, err = _run(capsys, "train.learing_rate=1e-3")
    assert code == 2 and "train.learing_rate" in err and "learning_rate" in err


def test_a_missing_data_file_is_named(capsys, tmp_path):
    code, err = _run(capsys, "data.path=/no/such/train.tsv", f"logging.output_dir={tmp_path}")
    assert code == 2 and "data.path='/no/such/train.tsv' does not exist" in err


def test_an_unwritable_output_folder_is_named(capsys, tmp_path, sentiment_data):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code, err = _run(capsys, f"data.path={sentiment_data['train']}", f"logging.output_dir={blocker}/run")
    assert code == 2 and "logging.output_dir=" in err and "is not writable" in err


def test_too_many_malformed_rows_are_reported_with_their_lines(capsys, tmp_path, tiny_checkpoint, sentiment_data):
    bad = tmp_path / "bad.tsv"
    rows = [f"a fine sentence number {i}\t{'maybe' if i % 3 == 0 else i % 2}" for i in range(30)]
    bad.write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    overrides = tiny_run_overrides(tiny_checkpoint, sentiment_data, tmp_path / "run", f"data.path={bad}")
    code, err = _run(capsys, *overrides)
    assert code == 2 and "10 of 30 rows are malformed" in err and "line 2:" in err and "line 5:" in err


def _digest(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_lora_run(tiny_checkpoint, sentiment_data, tmp_path_factory):
    output = tmp_path_factory.mktemp("finished")
    overrides = tiny_run_overrides(tiny_checkpoint, sentiment_data, output, "method.name=lora", "train.steps=2",
                                   "eval.num_examples=2", "eval.generation_samples=0")
    assert cli.main(["base", *overrides]) == 0
    return output, overrides


def test_a_checkpoint_folder_of_another_method_is_refused_untouched(capsys, finished_lora_run):
    output, overrides = finished_lora_run
    before = _digest(output / "checkpoints")
    code, err = _run(capsys, *overrides, "method.name=boft")
    assert code == 2 and "holds checkpoints of another run" in err and "'lora'" in err and "'boft'" in err
    assert _digest(output / "checkpoints") == before


def test_only_the_methods_own_settings_decide_whether_a_run_resumes(capsys, finished_lora_run):
    """A run is refused for a change of its method's own sub-section (LoRA's rank), not for another
    method's settings, which its checkpoints never depended on."""
    output, overrides = finished_lora_run
    before = _digest(output / "checkpoints")
    code, err = _run(capsys, *overrides, "method.lora.rank=4")
    assert code == 2 and "holds checkpoints of another run" in err and "'rank': 4" in err
    assert _digest(output / "checkpoints") == before
    code, err = _run(capsys, *overrides, "method.boft.block_size=4", "method.hybrid.lora_start=zero")
    assert code == 0, err


def test_existing_checkpoints_without_resume_are_refused_untouched(capsys, finished_lora_run):
    output, overrides = finished_lora_run
    before = _digest(output / "checkpoints")
    code, err = _run(capsys, *overrides, "checkpoint.resume=false")
    assert code == 2 and "already holds checkpoints" in err
    assert _digest(output / "checkpoints") == before


def test_diverging_steps_are_skipped_reported_and_stop_the_run(capsys, tmp_path, tiny_checkpoint, sentiment_data):
    overrides = tiny_run_overrides(tiny_checkpoint, sentiment_data, tmp_path / "run", "method.name=lora",
                                   "train.optimizer=sgd", "train.b1=0", "train.learning_rate=1e30",
                                   "train.grad_clip_norm=null", "train.max_skipped_steps=2",
                                   "eval.before_training=false")
    code = cli.main(["base", *overrides])
    captured = capsys.readouterr()
    assert code == 2 and "2 steps in a row had a non-finite gradient" in captured.err
    assert "the update was skipped" in captured.out
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]
