"""`RunCheckpointer`: Orbax checkpoints of a training run, and the check that a folder belongs to it.

One checkpoint per saved step, in `<dir>/<step>/`, with two or three items:
  * `state`: the `TrainState` pytree (trainable adapters, optimizer state with the method's state in
    it, step, rng, the method's own weights), written by every process through tensorstore;
  * `meta`: JSON with the run's fingerprint (model and method), resolved config, data position and the
    metrics of the step;
  * `start` (LoRA-GA and the hybrid): the frozen values the adapters drew from data at start-up
    (`hyjax.adapters.starting_values`), so a restore rebuilds the same model on any mesh.
Orbax writes each checkpoint into a temporary folder and renames it when complete, so a run killed
during a save leaves the earlier checkpoints intact and the half-written one invisible. Once a checkpoint
is on disk each process records a digest of the files it wrote (`hyjax.training.integrity`); resuming
checks them and resumes from the newest intact one, with a warning for each damaged newer one (cut,
changed or missing files), which is moved, never deleted, to `<dir>/damaged/<step>`: the resumed run can
save that step again, and `checkpoint.keep` counts intact checkpoints only.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

from hyjax.training import distributed, integrity


START = "start"  # the item of the adapters' starting values
DAMAGED = "damaged"  # the subfolder damaged checkpoints are moved to


class CheckpointMismatchError(ValueError):
    """The checkpoint folder belongs to another run (another model or method), or cannot be reused."""


class CheckpointDamagedError(CheckpointMismatchError):
    """The checkpoint asked for, or every checkpoint of the folder, has cut, changed or missing files."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (a full disk, a file-size or quota limit, lost storage); the
    checkpoints already on disk are intact."""


def recorded_only(ours: dict, theirs: dict) -> dict:
    """`ours` less the settings inside its sections that the saved fingerprint `theirs` has no record of
    (options added, or sections moved, since that run was saved): they are not compared, whatever their
    value. Top-level keys stay (a missing model or method section is a difference)."""
    def within(mine, saved):
        if not (isinstance(mine, dict) and isinstance(saved, dict)):
            return mine
        return {key: within(value, saved[key]) for key, value in mine.items() if key in saved}

    return {key: within(value, theirs.get(key)) for key, value in ours.items()}


class RunCheckpointer:
    """Saves and restores one run's checkpoints in `directory`.

    Args:
      directory: the checkpoint folder (created when missing).
      keep: how many of the latest checkpoints to keep (None: all).
      async_save: write in the background; `wait()` blocks until written.
      fingerprint: what identifies the run (model and method); a folder written with another one is
        refused by `check_compatible`.
      comparable: a fingerprint as two are compared (e.g. less the settings at their defaults, so that
        a run saved before an option was added still resumes).
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int | None, async_save: bool, fingerprint: dict,
                 comparable: Callable[[dict], dict] = lambda fingerprint: fingerprint):
        self.directory = pathlib.Path(directory).absolute()
        self.fingerprint = _jsonable(fingerprint)
        self.comparable = comparable
        self._undigested: list[int] = []  # steps this checkpointer saved whose digest is not yet written
        self._write_error: CheckpointWriteError | None = None
        # cleanup_tmp_directories: a save cut short (a full disk, a killed run) leaves a temporary folder,
        # never a checkpoint; it is removed so that the resumed run can save that step again.
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
                                               cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta", START))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def problems(self, step: int) -> list[str]:
        """What is damaged in checkpoint `step`, by the digests this process checks (see `integrity`)."""
        return integrity.problems(self.directory / str(step), jax.process_index(), jax.process_count())

    def newest_intact_step(self, warn: Callable[[str], None]) -> tuple[int | None, list[int]]:
        """The newest checkpoint whose files match their digests on every process (None: no checkpoint),
        and the damaged newer ones, each named to `warn` with its damaged files.

        Raises `CheckpointDamagedError` when every checkpoint is damaged."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        damaged, newest_problems = [], []
        for step in steps:
            found = self.problems(step)
            if not distributed.any_process(bool(found)):
                return step, damaged
            damaged.append(step)
            newest_problems = newest_problems or found
            warn(f"checkpoint step {step} in {self.directory} is damaged ({_listed(found)}); the newest intact "
                 "checkpoint before it is used")
        if steps:
            raise CheckpointDamagedError(
                f"every checkpoint in {self.directory} is damaged (steps {sorted(steps)}; step {steps[0]}: "
                f"{_listed(newest_problems)}). They are left untouched: move them away or choose a new "
                "logging.output_dir / checkpoint.dir to train again")
        return None, damaged

    def read_meta(self, step: int | None = None) -> dict:
        """The JSON item of checkpoint `step` (default: the latest)."""
        step = self.latest_step() if step is None else step
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def _set_aside(self, steps: list[int], warn: Callable[[str], None]) -> None:
        """Moves checkpoints `steps` into `<dir>/damaged/`, never deleting them, so that the resumed run
        saves their steps again (the main process moves; every process then rereads the folder)."""
        if not steps:
            return
        warn(f"damaged checkpoints of steps {sorted(steps)} moved to {self.directory / DAMAGED}")
        if jax.process_index() == 0:
            for step in steps:
                target = self.directory / DAMAGED / str(step)
                copies = 0
                while target.exists():
                    copies += 1
                    target = self.directory / DAMAGED / f"{step}.{copies}"
                target.parent.mkdir(exist_ok=True)
                os.replace(self.directory / str(step), target)
        distributed.wait_for_every_process("damaged checkpoints set aside")
        self.manager.reload()

    def check_compatible(self, resume: bool, warn: Callable[[str], None]) -> int | None:
        """The step to resume from (None: start fresh): the newest intact checkpoint, after checking that
        it belongs to this run. Damaged newer ones are named to `warn` and moved to `<dir>/damaged/`.

        Raises `CheckpointMismatchError` when the folder holds checkpoints of another model or method,
        or holds checkpoints while `resume` is False (they would be overwritten), and
        `CheckpointDamagedError` when all of them are damaged: nothing is touched.
        """
        step = self.latest_step()
        if step is None:
            return None
        if not resume:
            raise CheckpointMismatchError(
                f"checkpoint.dir {self.directory} already holds checkpoints (latest step {step}) and "
                "checkpoint.resume=false; set checkpoint.resume=true to continue that run, or choose a new "
                "logging.output_dir / checkpoint.dir (the existing checkpoints are left untouched)")
        step, damaged = self.newest_intact_step(warn)
        theirs = self.read_meta(step).get("fingerprint", {})
        check_form(self.directory, step, theirs, self.fingerprint)
        theirs, ours = self.comparable(theirs), self.comparable(recorded_only(self.fingerprint, theirs))
        if theirs != ours:
            differences = [f"{key}: checkpoint {theirs.get(key)!r}, this run {ours.get(key)!r}"
                           for key in sorted(set(theirs) | set(ours)) if theirs.get(key) != ours.get(key)]
            raise CheckpointMismatchError(
                f"checkpoint.dir {self.directory} holds checkpoints of another run (step {step}); they differ "
                f"in {'; '.join(differences)}. Choose a new logging.output_dir or checkpoint.dir for this run "
                "(the existing checkpoints are left untouched)")
        self._set_aside(damaged, warn)
        return step

    def save(self, step: int, state: Any, meta: dict, start: Any = None, force: bool = False) -> bool:
        """Starts saving checkpoint `step` (in the background with async_save); True if a save began.
        `start`: the adapters' starting values (`hyjax.adapters.starting_values`), kept when not empty."""
        meta = {**_jsonable(meta), "fingerprint": self.fingerprint}
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        if start:
            items[START] = ocp.args.StandardSave(start)
        self.wait()  # Orbax's save waits for the previous one too
        self._undigested.append(step)
        try:
            started = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
        except Exception as error:  # the storage's error, whatever layer raises it
            raise self._failed(error) from error
        if not started:
            self._undigested.remove(step)
        return started

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """`(state, meta)` of checkpoint `step`, with `abstract_state`'s structure, dtypes and shardings.

        A checkpoint of older code may hold state this code no longer builds (the empty optimizer group
        for full-capacity unitary matrices that every method carried before methods owned their
        groups): every array of `abstract_state` is then read from it and the rest left on disk. A
        checkpoint that lacks any of them raises Orbax's error naming the difference."""
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        except ValueError as mismatch:
            abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                    abstract_state)
            state = ocp.PyTreeCheckpointer().restore(self.directory / str(step) / "state", args=ocp.args.PyTreeRestore(
                abstract, partial_restore=True, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract)))
            if any(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(state)):
                raise mismatch  # the checkpoint lacks part of the state: not a run this code can resume
            return state, self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
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
        """Blocks until every started save is on disk, then records the digests of the finished ones.

        Raises `CheckpointWriteError` when a save failed (again on every later call)."""
        if self._write_error:
            raise self._write_error
        try:
            self.manager.wait_until_finished()
        except Exception as error:  # the storage's error, whatever layer raises it
            raise self._failed(error) from error
        finished = set(self.manager.all_steps())  # less those the retention policy removed
        for step in self._undigested:
            if step in finished:
                integrity.write_digest(self.directory / str(step), jax.process_index())
        self._undigested.clear()

    def close(self) -> None:
        self.wait()
        self.manager.close()

    def _failed(self, error: Exception) -> CheckpointWriteError:
        """The error that says which save failed, why, and what is still on disk."""
        steps = sorted(self._undigested)
        on_disk = sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit() and int(p.name) not in steps)
        code = re.search(r"os_error_code=\D?(\d+)", str(error))
        reason = f"{os.strerror(int(code.group(1)))} (errno {code.group(1)})" if code else str(error).splitlines()[0]
        then = (f"run the same command again to resume from step {on_disk[-1]}" if on_disk else
                "run the same command again to start over")
        self._write_error = CheckpointWriteError(
            f"checkpoint step {', '.join(map(str, steps))} could not be written to {self.directory}: {reason}. "
            f"The checkpoints already there (steps {on_disk}) are intact: free space (or lift the limit), then {then}")
        return self._write_error


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


def _listed(problems: list[str], most: int = 3) -> str:
    """The first `most` problems, and how many more."""
    if not problems:
        return "found by another process"
    more = f"; and {len(problems) - most} more" if len(problems) > most else ""
    return "; ".join(problems[:most]) + more


def _jsonable(value: Any) -> Any:
    """`value` as JSON would give it back (tuples become lists), so fingerprints compare equal."""
    return json.loads(json.dumps(value))
