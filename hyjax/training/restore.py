"""`restore(path)`: a run brought back into Python from its Orbax checkpoints.

    run = hyjax.training.restore("runs/quickstart")       # the run folder or its checkpoints folder
    run.step, run.config.method.name
    logits = hyjax.model.apply(run.model_config, run.adapted, tokens)
    plain = hyjax.adapters.merge(run.adapted)               # a plain parameter tree, for serving
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import warnings
from typing import Any

from hyjax.config import MeshSection, RunConfig, saved_tree
from hyjax.config.typed import build
from hyjax.methods import method_of
from hyjax.model.config import LlamaConfig
from hyjax.tokenization import Tokenizer
from hyjax.training.checkpointing import CheckpointDamagedError, RunCheckpointer, check_form
from hyjax.training.run_plan import run_layout
from hyjax.training.setup import RunSetup, fingerprint, prepare_run, setup_from_checkpoint
from hyjax.training.step import TrainState


@dataclasses.dataclass
class RestoredRun:
    """A run as its checkpoint left it: config, model, tokenizer, the restored state and frozen tree."""

    config: RunConfig
    setup: RunSetup
    state: TrainState
    frozen: dict
    step: int
    meta: dict  # data position, metrics of the step, fingerprint

    @property
    def model_config(self) -> LlamaConfig:
        return self.setup.model_config

    @property
    def tokenizer(self) -> Tokenizer:
        return self.setup.tokenizer

    @property
    def adapted(self) -> dict:
        """The adapted parameter tree at the checkpointed step (the method's forward state set, dropout off)."""
        return self.setup.plan.params(self.state, self.frozen)


def checkpoint_folder(path: str | os.PathLike) -> pathlib.Path:
    """The checkpoint folder of `path`: a run's output folder (holding `checkpoints/`) or the folder itself."""
    path = pathlib.Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a folder: give a run's output folder or its checkpoint folder")
    return path / "checkpoints" if (path / "checkpoints").is_dir() else path


def restore(path: str | os.PathLike, step: int | None = None, mesh: dict | None = None) -> RestoredRun:
    """The run checkpointed in `path` at `step` (default: the newest intact one, passing over damaged
    newer ones with a warning), laid out on this machine's devices.

    Rebuilds the run from the config stored in the checkpoint and the model it names (which must still be
    there; the data files need not be), with the method's start-up choices as the checkpoint kept them
    (LoRA-GA's and the hybrid's initial factors, Hybrid-LoRA's modules), then restores adapters,
    optimizer state, step, rng and the method's own weights into it. Only a checkpoint saved by
    an earlier version that lacks what it needs (the starting values, or the run's length when it was
    set in epochs) reads the training data again, to rebuild them. Each
    array is read straight into its sharding on `mesh` (sizes like the config's mesh section, e.g.
    `{"fsdp": 4, "tensor": 2}`; default: data parallel over every device), whatever mesh saved it.
    Raises `CheckpointDamagedError` when the checkpoint asked for (or every one) has damaged files.
    """
    folder = checkpoint_folder(path)
    checkpointer = RunCheckpointer(folder, keep=None, async_save=False, fingerprint={})  # reads, never saves
    available = checkpointer.manager.all_steps()
    if not available:
        raise FileNotFoundError(f"{folder} holds no checkpoints")
    if step is None:
        step, _ = checkpointer.newest_intact_step(lambda text: warnings.warn(text, stacklevel=2))
    elif step not in available:
        raise FileNotFoundError(f"{folder} has no checkpoint of step {step}; it has steps {sorted(available)}")
    elif problems := checkpointer.problems(step):
        raise CheckpointDamagedError(f"checkpoint step {step} in {folder} is damaged: {'; '.join(problems)} "
                                     f"(the folder has steps {sorted(available)})")
    meta = checkpointer.read_meta(step)
    config = build(RunConfig, saved_tree(meta["config"]))
    check_form(folder, step, meta.get("fingerprint", {}), fingerprint(config))
    config = dataclasses.replace(config, mesh=MeshSection(**{"data": -1, **(mesh or {})}))
    layout, selection = run_layout(config.mesh), saved_selection(config, meta)
    read_start = functools.partial(checkpointer.restore_start, step)
    total_steps = meta.get("total_steps", config.train.steps)
    setup = None if total_steps is None else setup_from_checkpoint(
        config, layout=layout, total_steps=total_steps, selection=selection, read_start=read_start)
    if setup is None:
        setup = prepare_run(config, layout=layout, data_position=meta["data_position"], selection=selection,
                            read_start=read_start, log=lambda text: None)
    state, meta = checkpointer.restore(step, setup.initial_state())
    checkpointer.close()
    return RestoredRun(config=config, setup=setup, state=state, frozen=setup.frozen, step=step, meta=meta)


def saved_selection(config: RunConfig, meta: dict) -> Any:
    """The method's start-up choice as checkpoint metadata recorded it (JSON), or None."""
    key = method_of(config).SELECTION_KEY
    return meta.get(key) if key else None
