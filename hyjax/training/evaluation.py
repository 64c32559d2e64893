"""Evaluation of a run on its held-out rows: answer-token loss and perplexity, the task's own metric
(classification accuracy by answer log-likelihood, math exact match by greedy generation), and a few
generated samples to read.

Classification reads each prompt once (`hyjax.likelihood`), and its loss comes from the same scores
(the right answer's log-likelihood); other tasks' loss runs the eval step over padded batches."""

from __future__ import annotations

import math
from typing import Any


from hyjax.data import (
    BatchIterator,
    Classification,
    MathWordProblems,
    build_examples,
    classification_accuracy,
    math_exact_match,
)
from hyjax.data.report import BadRowLimit, MalformedRow
from hyjax.likelihood import candidate_log_likelihoods
from hyjax.sampling import SamplingConfig, generate


class Evaluator:
    """Evaluates states of one run on `setup.eval_rows` (built once: examples, compiled functions)."""

    def __init__(self, setup):
        self.setup = setup
        self.eval_step = setup.plan.eval_step()
        config = setup.config
        self.rows = setup.eval_rows
        self.task = setup.eval_task
        self.examples = None
        if self.rows is not None:
            no_limit = BadRowLimit(max_fraction=None, max_rows=None)  # evaluation skips and counts bad rows
            self.examples, _ = build_examples(self.rows, self.task, setup.tokenizer, limit=no_limit)
        self.max_length = config.data.max_length
        self.bucket = config.data.bucket

    @property
    def enabled(self) -> bool:
        return bool(self.examples)

    def __call__(self, state, frozen) -> dict[str, Any]:
        """Metrics (`eval/loss`, `eval/perplexity`, `eval/accuracy` or `eval/exact_match`, `eval/examples`),
        `correct_rows` (classification and math: `EvalResult.correct_rows`, one `0`/`1` per scored row) and
        `samples`: generated answers of the first `eval.generation_samples` rows."""
        if not self.enabled:
            return {}
        setup, config = self.setup, self.setup.config
        params = setup.plan.params(state, frozen)
        metrics: dict[str, Any] = {"eval/examples": len(self.examples)}
        if isinstance(self.task, Classification):
            result = classification_accuracy(self.rows, self.task, setup.tokenizer, self._scorer(params))
            loss = result.gold_loss
            metrics["eval/accuracy"] = result.accuracy
            metrics["correct_rows"] = result.correct_rows
        else:
            loss = self._answer_loss(state, frozen)
            if isinstance(self.task, MathWordProblems):
                result = math_exact_match(self.rows, self.task, setup.tokenizer, self._generator(params),
                                          batch_size=config.eval.batch_size)
                metrics["eval/exact_match"] = result.accuracy
                metrics["correct_rows"] = result.correct_rows
        metrics.update({"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 700.0))})
        metrics["samples"] = self.samples(params)
        return metrics

    def _answer_loss(self, state, frozen) -> float:
        """Mean answer-token loss of the held-out examples, by the eval step over padded batches."""
        config = self.setup.config
        batches = BatchIterator(self.examples, global_batch_size=config.eval.batch_size, max_length=self.max_length,
                                pad_id=self.setup.tokenizer.pad_id, bucket=self.bucket, shuffle=False,
                                drop_remainder=False, process_index=0, process_count=1)
        total = count = 0.0
        for step in range(batches.steps_per_epoch(0)):
            nll, tokens = self.eval_step(state, frozen, batches.global_batch(0, step))
            total, count = total + float(nll), count + float(tokens)
        return total / max(count, 1.0)

    def _scorer(self, params):
        setup = self.setup
        return lambda groups: candidate_log_likelihoods(
            setup.model_config, params, groups, pad_id=setup.tokenizer.pad_id, max_length=self.max_length,
            batch_size=setup.config.eval.batch_size, bucket=self.bucket)

    def _generator(self, params):
        setup, config = self.setup, self.setup.config
        sampling = SamplingConfig(max_new_tokens=config.eval.max_new_tokens)

        def generate_text(prompts):
            outputs = generate(setup.model_config, params, [list(p) for p in prompts], sorted(setup.tokenizer.stop_ids),
                               sampling, pad_id=setup.tokenizer.pad_id)
            return [setup.tokenizer.decode(tokens) for tokens in outputs]

        return generate_text

    def samples(self, params) -> list[dict[str, str]]:
        """`{prompt, generated, reference}` for the first `eval.generation_samples` usable rows."""
        wanted = self.setup.config.eval.generation_samples
        tokenizer = self.setup.tokenizer
        prompts, references = [], []
        for row in self.rows:
            if len(prompts) == wanted:
                break
            try:
                example = self.task.example(row, tokenizer)
            except MalformedRow:
                continue
            prompts.append(example.prompt_ids[-self.max_length:])
            references.append(tokenizer.decode(example.answer_ids))
        if not prompts:
            return []
        generated = self._generator(params)(prompts)
        return [{"prompt": tokenizer.decode(p), "generated": g, "reference": r}
                for p, g, r in zip(prompts, generated, references)]

