"""Evaluation of a model on held-out rows: the task metrics as pure functions of a scoring or generating
callable (`scoring`), candidate answers' log-likelihoods with each prompt read once (`likelihood`), and a
run's held-out evaluation built on both (`held_out`: answer loss, accuracy or exact match, samples).

    evaluation = HeldOutEvaluation(rows, task, tokenizer, config, ...)
    result = classification_accuracy(rows, sst2(), tokenizer, score)    # score: groups -> log-likelihoods
"""

from hyjax.evaluation.held_out import Evaluator, HeldOutEvaluation, generation_cost
from hyjax.evaluation.likelihood import candidate_log_likelihoods
from hyjax.evaluation.scoring import EvalResult, answer_log_likelihood, classification_accuracy, math_exact_match

__all__ = ["EvalResult", "Evaluator", "HeldOutEvaluation", "answer_log_likelihood", "candidate_log_likelihoods",
           "classification_accuracy", "generation_cost", "math_exact_match"]
