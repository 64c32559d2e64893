"""Every generated bad input (tests/bad_inputs.py) gets one line on stderr and exit code 2, before any
compile or download, without a traceback and without changing a checkpoint. Most run in-process through
the commands' `main`; a few through the real command line."""

from __future__ import annotations

import hashlib
import os
import pathlib
import subprocess
import sys

import jax
import pytest
from huggingface_hub import constants

from bad_inputs import BadInput, Workspace, all_cases, base_overrides
from hyjax import pretrained
from hyjax.cli import plan as plan_cli
from hyjax.cli import train as train_cli

CASES = all_cases()
PROJECT = pathlib.Path(__file__).resolve().parents[1]


class HeavyWorkStarted(BaseException):
    """Raised (past every `except Exception`) when a bad input got as far as a compile or a download."""


_armed = False


def _on_event(event: str, duration: float, **kwargs) -> None:
    if _armed and event == "/jax/core/compile/backend_compile_duration":
        raise HeavyWorkStarted("a program was compiled")


jax.monitoring.register_event_duration_secs_listener(_on_event)


def _refuse_download(*args, **kwargs):
    raise HeavyWorkStarted("a download was started")


@pytest.fixture(scope="module")
def finished_run(tiny_checkpoint, sentiment_data, tmp_path_factory):
    """A finished two-step lora run (checkpoint at step 2), and the overrides that ran it."""
    folder = tmp_path_factory.mktemp("finished")
    ws = Workspace(folder, tiny_checkpoint, sentiment_data["train"], sentiment_data["dev"], folder / "run", ())
    overrides = base_overrides(ws, "method.name=lora")[1:]
    assert train_cli.main(["base", *overrides]) == 0
    return folder / "run", tuple(overrides)


@pytest.fixture
def workspace(tmp_path, tiny_checkpoint, sentiment_data, finished_run, monkeypatch):
    monkeypatch.chdir(tmp_path)  # what a case names relatively lands in its own folder
    monkeypatch.setattr(pretrained, "_download_wheel", _refuse_download)
    monkeypatch.setenv("HYJAX_CACHE", str(tmp_path / "empty_cache"))
    # The Hub client offline over an empty cache: it reads the cache only and never downloads.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_hf_cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_home"))
    return Workspace(tmp_path / "case", tiny_checkpoint, sentiment_data["train"], sentiment_data["dev"], *finished_run)


def _digest(folder: pathlib.Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def check_answer(case: BadInput, code: int, err: str) -> str:
    """The answer to a bad input is exit code 2 and one line on stderr naming what is wrong; returns it."""
    lines = err.strip().splitlines()
    assert code == 2, (case.id, code, err[-3000:])
    assert "Traceback" not in err, (case.id, err[-3000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), (case.id, err[-3000:])
    for mention in case.mentions:
        assert mention in lines[0], (case.id, mention, lines[0])
    return lines[0]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_a_bad_input_gets_one_clear_line_before_any_heavy_work(case, workspace, capfd):
    global _armed
    workspace.folder.mkdir()
    argv = case.build(workspace)
    run_folder = workspace.folder / "run"
    before = _digest(run_folder) if case.run_folder else None
    main = {"train": train_cli.main, "plan": plan_cli.main}[case.command]
    _armed = True
    try:
        code = main(argv)
    except HeavyWorkStarted as err:
        raise AssertionError(f"{case.id}: {err} before the input was refused") from None
    finally:
        _armed = False
    check_answer(case, code, capfd.readouterr().err)  # file descriptor 2: C libraries write there too
    if before is not None:
        assert _digest(run_folder) == before, case.id


def test_the_set_is_large_and_covers_every_kind():
    kinds = {}
    for case in CASES:
        kinds[case.kind] = kinds.get(case.kind, 0) + 1
    assert len(CASES) >= 200 and len({case.id for case in CASES}) == len(CASES), len(CASES)
    assert set(kinds) == {"config", "data", "checkpoint", "resume", "topology"} and min(kinds.values()) >= 5, kinds


COMMAND_LINE = ["config:train.learning_rate of the wrong type", "data:data.path: invalid utf8 (tsv)",
                "checkpoint:a pickle-based pytorch_model.bin only", "resume:another LoRA rank",
                "topology:topology 'v5p:3x5x7'"]


@pytest.mark.parametrize("case_id", COMMAND_LINE)
def test_the_real_command_line_answers_alike(case_id, workspace):
    case = next(c for c in CASES if c.id == case_id)
    workspace.folder.mkdir()
    argv = case.build(workspace)
    run_folder = workspace.folder / "run"
    before = _digest(run_folder) if case.run_folder else None
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-m", f"hyjax.{case.command}", *argv], capture_output=True, text=True,
                            env=env, cwd=PROJECT, timeout=300)
    check_answer(case, result.returncode, result.stderr)
    if before is not None:
        assert _digest(run_folder) == before, case.id
