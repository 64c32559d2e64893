"""Evaluation as pure functions of a scoring or generating callable (testable without the model)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from hyjax.data.batching import pad_batch, round_up, truncate
from hyjax.data.classification import Classification
from hyjax.data.examples import Example
from hyjax.data.loss import masked_log_likelihood
from hyjax.data.math_problems import MathWordProblems, extract_final_answer
from hyjax.data.report import MalformedRow


@dataclasses.dataclass(frozen=True)
class EvalResult:
    correct: int
    total: int
    skipped: int  # malformed rows left out
    predictions: tuple[Any, ...]  # per scored row: predicted answer index (classification) or number

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


def _resolved(task, rows):
    return task.resolve(getattr(rows, "column_names", None) or list(next(iter(rows))), getattr(rows, "path", None))


def answer_log_likelihood(
    logits_fn: Callable[..., Any], pad_id: int, max_length: int, bucket: int = 64
) -> Callable[[Sequence[Example]], list[float]]:
    """A `score` for `classification_accuracy`: log p(answer | prompt) of each example under a model.

    Args:
      logits_fn: `(tokens, positions, segment_ids) -> logits [B, T, V]`, for example
        `functools.partial(hyjax.model.apply, config, params)` (jit it for speed).
      pad_id: padding token id.
      max_length: longest example; longer ones lose prompt tokens from the left.
      bucket: padding granularity (few distinct shapes, few compilations).
    """
    def score(examples: Sequence[Example]) -> list[float]:
        examples = [truncate(e, max_length)[0] for e in examples]
        batch = pad_batch(examples, round_up(max(len(e) for e in examples), bucket, max_length), pad_id)
        logits = logits_fn(batch["tokens"], batch["positions"], batch["segment_ids"])
        return [float(x) for x in masked_log_likelihood(logits, batch["targets"], batch["loss_mask"])]

    return score


def classification_accuracy(
    rows: Iterable[Mapping[str, Any]],
    task: Classification,
    tokenizer,
    score: Callable[[Sequence[Example]], Sequence[float]],
    batch_size: int = 64,
) -> EvalResult:
    """Accuracy from comparing the log-probability of each answer word given the prompt.

    Args:
      rows: labelled rows (a `Rows` or dicts).
      task: the classification task (its verbalizer gives the candidate answers).
      tokenizer: the model's tokenizer.
      score: maps examples to the log-probability of their answer ids given their prompt ids (for
        the model: `masked_log_likelihood` of a batch built with `pad_batch`).
      batch_size: rows scored per `score` call.
    """
    task = _resolved(task, rows)
    pending: list[tuple[list[Example], int]] = []
    correct = skipped = 0
    predictions = []

    def flush():
        nonlocal correct
        flat = [ex for candidates, _ in pending for ex in candidates]
        scores = list(score(flat)) if flat else []
        k = 0
        for candidates, gold in pending:
            mine = scores[k : k + len(candidates)]
            k += len(candidates)
            best = max(range(len(mine)), key=mine.__getitem__)
            predictions.append(best)
            correct += best == gold
        pending.clear()

    for row in rows:
        try:
            pending.append(task.candidates(row, tokenizer))
        except MalformedRow:
            skipped += 1
        if len(pending) >= batch_size:
            flush()
    flush()
    return EvalResult(correct, len(predictions), skipped, tuple(predictions))


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
    predictions = []

    def flush():
        nonlocal correct
        texts = list(generate([p for p, _ in pending])) if pending else []
        for text, (_, gold) in zip(texts, pending, strict=True):
            predicted = extract_final_answer(text)
            predictions.append(predicted)
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
    return EvalResult(correct, len(predictions), skipped, tuple(predictions))
