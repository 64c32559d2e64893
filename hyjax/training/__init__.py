"""The fine-tuning job: the run's plan, setup, the jitted step, the loop with its callbacks,
checkpoints and restore.

    from hyjax.config import load_config
    from hyjax.training import restore, train
    result = train(load_config("quickstart", ["train.steps=20"]))
    result.summary["eval_after"]          # e.g. {"accuracy": 0.85, "loss": 0.36, ...}
    run = restore("runs/quickstart")      # the run at its latest checkpoint
"""

from hyjax.training.callbacks import NonFiniteError
from hyjax.training.checkpointing import (CheckpointDamagedError, CheckpointMismatchError, CheckpointWriteError,
                                         RunCheckpointer)
from hyjax.training.loop import RunResult, fit, train
from hyjax.training.restore import RestoredRun, restore
from hyjax.training.run_plan import RunPlan, plan_run, run_layout
from hyjax.training.setup import RunSetup, fingerprint, preflight, prepare_run
from hyjax.training.step import AnswerLoss, TrainState, make_eval_step, make_train_step

__all__ = ["AnswerLoss", "CheckpointDamagedError", "CheckpointMismatchError", "CheckpointWriteError", "NonFiniteError",
           "RestoredRun", "RunCheckpointer", "RunPlan", "RunResult", "RunSetup", "TrainState", "fingerprint", "fit",
           "make_eval_step", "make_train_step", "plan_run", "preflight", "prepare_run", "restore", "run_layout",
           "train"]
