"""Evaluation as pure functions of a scoring or generating callable (testable without the model)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from hyjax.data.batching import pad_batch, round_up, truncate
from hyjax.data.classification import Classification
from hyjax.data.examples import Example
from hyjax.data.loss import batch_log_likelihood
from hyjax.data.math_problems import MathWordProblems, extract_final_answer
from hyjax.data.report import MalformedRow


@dataclasses.dataclass(frozen=True)
class EvalResult:
    correct: int
    total: int
    skipped: int  # malformed rows left out
    predictions: tuple[Any, ...]  # per scored row: predicted answer index (classification) or number
    gold_log_likelihood: float = 0.0  # classification: sum over rows of log p(right answer | prompt)
    gold_tokens: int = 0  # classification: tokens of the right answers
    golds: tuple[Any, ...] = ()  # per scored row: the right answer index (classification) or number

    @property
    def correct_rows(self) -> str:
        """One character per scored row, in order: `1` right, `0` wrong (for paired comparisons of two
        models on the same rows, e.g. a bootstrap over rows)."""
        return "".join("1" if p is not None and p == g else "0" for p, g in zip(self.predictions, self.golds,
                                                                                   strict=True))

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    @property
    def answered(self) -> float:
        """The share of scored rows with a prediction (math: a final number after `####`, right or wrong)."""
        return sum(p is not None for p in self.predictions) / self.total if self.total else 0.0

    @property
    def gold_loss(self) -> float:
        """Mean negative log-likelihood per token of the right answers (classification)."""
        return -self.gold_log_likelihood / max(self.gold_tokens, 1)


def _resolved(task, rows):
    return task.resolve(getattr(rows, "column_names", None) or list(next(iter(rows))), getattr(rows, "path", None))


# (prompt ids, candidate answers' ids): one row's question to a `score` callable.
Group = tuple[Sequence[int], Sequence[Sequence[int]]]


def answer_log_likelihood(
    logits_fn: Callable[..., Any], pad_id: int, max_length: int, bucket: int = 64, batch_size: int = 64
) -> Callable[[Sequence[Group]], list[list[float]]]:
    """A `score` for `classification_accuracy` that runs every candidate as an example of its own:
    log p(answer | prompt) by `batch_log_likelihood` of padded batches, with logits at the answer
    positions only. (`hyjax.evaluation.likelihood.candidate_log_likelihoods` reads each prompt once instead.)

    Args:
      logits_fn: `(tokens, positions, segment_ids, logit_positions) -> logits [B, K, V]`, for example
        `functools.partial(hyjax.model.apply, config, params)` (jit it for speed).
      pad_id: padding token id.
      max_length: longest example; longer ones lose prompt tokens from the left.
      bucket: padding granularity (few distinct shapes, few compilations).
      batch_size: examples (candidates) per forward pass.
    """
    def score(groups: Sequence[Group]) -> list[list[float]]:
        examples = [truncate(Example(tuple(prompt), tuple(answer)), max_length)[0]
                    for prompt, answers in groups for answer in answers]
        flat: list[float] = []
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            batch = pad_batch(chunk, round_up(max(len(e) for e in chunk), bucket, max_length), pad_id)
            flat += [float(x) for x in batch_log_likelihood(logits_fn, batch)]
        out, k = [], 0
        for _, answers in groups:
            out.append(flat[k : k + len(answers)])
            k += len(answers)
        return out

    return score


def classification_accuracy(
    rows: Iterable[Mapping[str, Any]],
    task: Classification,
    tokenizer,
    score: Callable[[Sequence[Group]], Sequence[Sequence[float]]],
) -> EvalResult:
    """Accuracy from comparing the log-probability of each answer given the prompt, and the right
    answers' log-likelihood (the evaluation loss, from the same scores).

    Args:
      rows: labelled rows (a `Rows` or dicts).
      task: the classification task (its verbalizer gives the candidate answers).
      tokenizer: the model's tokenizer.
      score: maps every usable row's `(prompt ids, [answer ids of each candidate])` to the candidates'
        log-probabilities given the prompt (`hyjax.evaluation.likelihood.candidate_log_likelihoods` for the model;
        it batches as it likes).
    """
    task = _resolved(task, rows)
    groups: list[Group] = []
    golds: list[int] = []
    skipped = 0
    for row in rows:
        try:
            candidates, gold = task.candidates(row, tokenizer)
        except MalformedRow:
            skipped += 1
            continue
        groups.append((candidates[0].prompt_ids, [c.answer_ids for c in candidates]))
        golds.append(gold)
    scores = list(score(groups)) if groups else []
    predictions = tuple(max(range(len(mine)), key=list(mine).__getitem__) for mine in scores)
    correct = sum(p == g for p, g in zip(predictions, golds))
    gold_log_likelihood = sum(float(mine[g]) for mine, g in zip(scores, golds))
    gold_tokens = sum(len(answers[g]) for (_, answers), g in zip(groups, golds))
    return EvalResult(correct, len(predictions), skipped, predictions, gold_log_likelihood, gold_tokens, tuple(golds))


def math_exact_match(
    rows: Iterable[Mapping[str, Any]],
    task: MathWordProblems,
    tokenizer,
    generate: Callable[[Sequence[Sequence[int]]], Sequence[str]],
    batch_size: int = 16,
) -> EvalResult:
    """Exact match of the final number (`#### <number>`) in generated text against the reference.

    Args:
      rows: question/answer rows.
      task: the math task (gives the prompt ids).
      tokenizer: the model's tokenizer.
      generate: maps prompt ids to generated text (the completion only).
      batch_size: prompts per `generate` call.
    """
    task = _resolved(task, rows)
    pending: list[tuple[tuple[int, ...], str]] = []
    correct = skipped = 0
    predictions, golds = [], []

    def flush():
        nonlocal correct
        texts = list(generate([p for p, _ in pending])) if pending else []
        for text, (_, gold) in zip(texts, pending, strict=True):
            predicted = extract_final_answer(text)
            predictions.append(predicted)
            golds.append(gold)
            correct += predicted is not None and predicted == gold
        pending.clear()

    for row in rows:
        try:
            _, gold = task.target(row)
            pending.append((task.example(row, tokenizer).prompt_ids, gold))
        except MalformedRow:
            skipped += 1
        if len(pending) >= batch_size:
            flush()
    flush()
    return EvalResult(correct, len(predictions), skipped, tuple(predictions), golds=tuple(golds))
