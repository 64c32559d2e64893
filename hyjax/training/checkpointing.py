"""`RunCheckpointer`: Orbax checkpoints of a training run, and the check that a folder belongs to it.

One checkpoint per saved step, in `<dir>/<step>/`, with two or three items:
  * `state`: the `TrainState` pytree (trainable adapters, optimizer state with the hybrid lambdas,
    step, rng), written by every process through tensorstore;
  * `meta`: JSON with the run's fingerprint (model and method), resolved config, data position and the
    metrics of the step;
  * `start` (LoRA-GA and the hybrid): the frozen values the adapters drew from data at start-up
    (`hyjax.adapters.starting_values`), so a restore rebuilds the same model on any mesh.
Orbax writes each checkpoint into a temporary folder and renames it when complete, so a run killed
during a save leaves the earlier checkpoints intact and the half-written one invisible.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import orbax.checkpoint as ocp


START = "start"  # the item of the adapters' starting values


class CheckpointMismatchError(ValueError):
    """The checkpoint folder belongs to another run (another model or method), or cannot be reused."""


class RunCheckpointer:
    """Saves and restores one run's checkpoints in `directory`.

    Args:
      directory: the checkpoint folder (created when missing).
      keep: how many of the latest checkpoints to keep (None: all).
      async_save: write in the background; `wait()` blocks until written.
      fingerprint: what identifies the run (model and method); a folder written with another one is
        refused by `check_compatible`.
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int | None, async_save: bool, fingerprint: dict):
        self.directory = pathlib.Path(directory).absolute()
        self.fingerprint = _jsonable(fingerprint)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta", START))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def read_meta(self, step: int | None = None) -> dict:
        """The JSON item of checkpoint `step` (default: the latest)."""
        step = self.latest_step() if step is None else step
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def check_compatible(self, resume: bool) -> int | None:
        """The step to resume from (None: start fresh), after checking the folder's latest checkpoint.

        Raises `CheckpointMismatchError` when the folder holds checkpoints of another model or method,
        or holds checkpoints while `resume` is False (they would be overwritten): nothing is touched.
        """
        step = self.latest_step()
        if step is None:
            return None
        if not resume:
            raise CheckpointMismatchError(
                f"checkpoint.dir {self.directory} already holds checkpoints (latest step {step}) and "
                "checkpoint.resume=false; set checkpoint.resume=true to continue that run, or choose a new "
                "logging.output_dir / checkpoint.dir (the existing checkpoints are left untouched)")
        theirs = self.read_meta(step).get("fingerprint", {})
        check_form(self.directory, step, theirs, self.fingerprint)
        if theirs != self.fingerprint:
            differences = [f"{key}: checkpoint {theirs.get(key)!r}, this run {self.fingerprint.get(key)!r}"
                           for key in sorted(set(theirs) | set(self.fingerprint))
                           if theirs.get(key) != self.fingerprint.get(key)]
            raise CheckpointMismatchError(
                f"checkpoint.dir {self.directory} holds checkpoints of another run (step {step}); they differ "
                f"in {'; '.join(differences)}. Choose a new logging.output_dir or checkpoint.dir for this run "
                "(the existing checkpoints are left untouched)")
        return step

    def save(self, step: int, state: Any, meta: dict, start: Any = None, force: bool = False) -> bool:
        """Starts saving checkpoint `step` (in the background with async_save); True if a save began.
        `start`: the adapters' starting values (`hyjax.adapters.starting_values`), kept when not empty."""
        meta = {**_jsonable(meta), "fingerprint": self.fingerprint}
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        if start:
            items[START] = ocp.args.StandardSave(start)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """`(state, meta)` of checkpoint `step`, with `abstract_state`'s structure, dtypes and shardings."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return restored.state, restored.meta

    def restore_start(self, step: int, abstract_start: Any) -> Any:
        """The adapters' starting values kept in checkpoint `step`, with `abstract_start`'s structure,
        dtypes and shardings; None when the checkpoint has none (saved before they were kept)."""
        if not (self.directory / str(step) / START).is_dir():
            return None
        restored = self.manager.restore(step, args=ocp.args.Composite(**{START: ocp.args.StandardRestore(
            abstract_start)}))
        return restored[START]

    def wait(self) -> None:
        """Blocks until every started save is on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def check_form(directory: pathlib.Path, step: int, theirs: dict, ours: dict) -> None:
    """Raises `CheckpointMismatchError` when checkpoint `step` was saved with another form of the method's
    forward pass than this version computes (fingerprint key `form`, see `Method.form`): restoring its
    parameters into the new form would silently change the model."""
    ours = _jsonable(ours)
    same_method = theirs.get("method", {}).get("name") == ours["method"].get("name")
    if theirs.get("form") == ours.get("form") or not same_method:
        return
    saved = theirs.get("form") or "the earlier form (no form recorded)"
    raise CheckpointMismatchError(
        f"{directory} holds checkpoints (step {step}) of method {ours['method'].get('name')!r} saved with "
        f"another form of its parameters or forward pass: saved {saved!r}, this version {ours.get('form')!r}. "
        "Its parameters would mean another model or not fit this version's, so the run cannot be resumed or "
        "restored with this version: train it again in a new logging.output_dir, or use the hyjax version that "
        "saved it (the folder is left untouched)")


def _jsonable(value: Any) -> Any:
    """`value` as JSON would give it back (tuples become lists), so fingerprints compare equal."""
    return json.loads(json.dumps(value))
