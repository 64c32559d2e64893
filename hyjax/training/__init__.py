"""The fine-tuning job: setup, the jitted step, the loop with checkpoints, evaluation and reporting.

    from hyjax.config import load_config
    from hyjax.training import train
    result = train(load_config("quickstart", ["train.steps=20"]))
    result.summary["eval_after"]          # e.g. {"accuracy": 0.85, "loss": 0.36, ...}
"""

from hyjax.training.loop import NonFiniteError, RunResult, train
from hyjax.training.setup import RunSetup, fingerprint, preflight, prepare_run
from hyjax.training.step import AnswerLoss, TrainState, make_eval_step, make_train_step

__all__ = ["AnswerLoss", "NonFiniteError", "RunResult", "RunSetup", "TrainState", "fingerprint", "make_eval_step",
           "make_train_step", "preflight", "prepare_run", "train"]
