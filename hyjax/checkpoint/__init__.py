"""Former home of a run's Orbax checkpoints, kept so that `hyjax.checkpoint.restore(...)` written
against older releases still works; they live in `hyjax.training` now."""

from hyjax.training.checkpointing import CheckpointMismatchError, RunCheckpointer
from hyjax.training.restore import RestoredRun, checkpoint_folder, restore

__all__ = ["CheckpointMismatchError", "RestoredRun", "RunCheckpointer", "checkpoint_folder", "restore"]
