"""Evaluation of a run on its held-out rows: answer-token loss and perplexity, the task's own metric
(classification accuracy by answer log-likelihood, math exact match by greedy generation), and a few
generated samples to read.

Classification reads each prompt once (`hyjax.evaluation.likelihood`), and its loss comes from the same scores
(the right answer's log-likelihood); other tasks' loss runs the eval step over padded batches."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from hyjax import adapters
from hyjax.data import BatchIterator, Classification, MathWordProblems, build_examples
from hyjax.data.report import BadRowLimit, MalformedRow
from hyjax.evaluation.likelihood import candidate_log_likelihoods
from hyjax.evaluation.scoring import classification_accuracy, math_exact_match
from hyjax.sampling import SamplingConfig, generate


def generation_cost(lengths: list[list[int]], max_new_tokens: int) -> dict[str, float]:
    """`eval/generated_tokens` (mean new tokens per answer) and `eval/decode_steps` of greedy generation
    in batches (`lengths`: each batch's answer lengths, stop token excluded). A batch decodes until its
    longest answer has emitted its stop token (one step past its length) or for `max_new_tokens` steps."""
    answers = [n for batch in lengths for n in batch]
    steps = sum(min(max(batch) + 1, max_new_tokens) for batch in lengths if batch)
    return {"eval/generated_tokens": float(np.mean(answers)) if answers else 0.0, "eval/decode_steps": steps}


class HeldOutEvaluation:
    """A model's metrics on held-out rows (examples built once): answer-token loss and perplexity, the
    task's own metric, and generated samples. Used by a run's `Evaluator` and by `python -m hyjax.eval`.

    Args:
      model_config, tokenizer: the model's.
      rows, task: the held-out `Rows` and the task (resolved against their columns) that reads them.
      eval_config: the `eval:` section (batch size, generation samples, max new tokens).
      max_length, bucket: the data section's row length and padding bucket.
      progress: show a progress bar per pass over the rows (scoring, generation, loss).
    """

    def __init__(self, model_config, tokenizer, rows, task, *, eval_config, max_length: int, bucket: int,
                 progress: bool = False):
        self.model_config, self.tokenizer, self.rows, self.task = model_config, tokenizer, rows, task
        self.eval_config, self.max_length, self.bucket = eval_config, max_length, bucket
        self.progress = progress
        self.examples = None
        if rows is not None:
            no_limit = BadRowLimit(max_fraction=None, max_rows=None)  # evaluation skips and counts bad rows
            self.examples, _ = build_examples(rows, task, tokenizer, limit=no_limit)

    @property
    def enabled(self) -> bool:
        return bool(self.examples)

    def metrics(self, params, batch_loss: Callable[[dict], tuple[Any, Any]]) -> dict[str, Any]:
        """Metrics (`eval/loss`, `eval/perplexity`, `eval/accuracy` or `eval/exact_match` and
        `eval/answer_format` (the share of generated answers that end in `#### <number>`),
        `eval/generated_tokens` (new tokens per answer) and `eval/decode_steps` (the steps the generation
        batches ran: a batch decodes until its longest answer stops, so this sets generation's cost),
        `eval/examples`),
        `correct_rows` (classification and math: `EvalResult.correct_rows`, one `0`/`1` per scored row) and
        `samples`: generated answers of the first `eval.generation_samples` rows.

        params: the (adapted) parameter tree; batch_loss: `batch -> (answer-token nll sum, answer tokens)`
        of the same model, for tasks whose loss is not the classification scores'.

        Scoring and generation run the merged model (`adapters.merge`: each adapted weight as one plain
        array, made once per evaluation): an adapter applied to the activations at every decoding step
        costs more than its one-off merge (BOFT's butterfly factors, the hybrid's two branches). The merged
        copy adds the adapted weights' size once more (on the v5p plans of bench/results/plans.md, about the
        1.5-2 GiB of arguments per chip of a PEFT step), less than the temporaries of a training step, which
        evaluation does not hold."""
        if not self.enabled:
            return {}
        params = adapters.merge(params)
        metrics: dict[str, Any] = {"eval/examples": len(self.examples)}
        if isinstance(self.task, Classification):
            with self._bar("scoring answers") as bar:
                result = classification_accuracy(self.rows, self.task, self.tokenizer, self._scorer(params, bar))
            loss = result.gold_loss
            metrics["eval/accuracy"] = result.accuracy
            metrics["correct_rows"] = result.correct_rows
        else:
            loss = self._answer_loss(batch_loss)
            if isinstance(self.task, MathWordProblems):
                lengths: list[list[int]] = []
                with self._bar("generating answers") as bar:
                    result = math_exact_match(self.rows, self.task, self.tokenizer,
                                              self._generator(params, bar, lengths),
                                              batch_size=self.eval_config.batch_size)
                metrics["eval/exact_match"] = result.accuracy
                metrics["eval/answer_format"] = result.answered
                metrics.update(generation_cost(lengths, self.eval_config.max_new_tokens))
                metrics["correct_rows"] = result.correct_rows
        metrics.update({"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 700.0))})
        metrics["samples"] = self.samples(params)
        return metrics

    def _answer_loss(self, batch_loss) -> float:
        """Mean answer-token loss of the held-out examples over padded batches."""
        batches = BatchIterator(self.examples, global_batch_size=self.eval_config.batch_size,
                                max_length=self.max_length, pad_id=self.tokenizer.pad_id, bucket=self.bucket,
                                shuffle=False, drop_remainder=False, process_index=0, process_count=1)
        total = count = 0.0
        with self._bar("answer loss") as bar:
            for step in range(batches.steps_per_epoch(0)):
                batch = batches.global_batch(0, step)
                nll, tokens = batch_loss(batch)
                total, count = total + float(nll), count + float(tokens)
                bar.update(int(np.sum(np.any(batch["loss_mask"], axis=-1))))
        return total / max(count, 1.0)

    def _bar(self, description: str) -> tqdm:
        return tqdm(total=len(self.rows), desc=description, unit="row", leave=False, disable=not self.progress)

    def _scorer(self, params, bar=None):
        return lambda groups: candidate_log_likelihoods(
            self.model_config, params, groups, pad_id=self.tokenizer.pad_id, max_length=self.max_length,
            batch_size=self.eval_config.batch_size, bucket=self.bucket, progress=bar.update if bar else None)

    def _generator(self, params, bar=None, lengths: list[list[int]] | None = None):
        """`prompts -> generated texts`; appends each batch's answer lengths (new tokens) to `lengths`."""
        sampling = SamplingConfig(max_new_tokens=self.eval_config.max_new_tokens)

        def generate_text(prompts):
            outputs = generate(self.model_config, params, [list(p) for p in prompts], sorted(self.tokenizer.stop_ids),
                               sampling, pad_id=self.tokenizer.pad_id)
            if bar is not None:
                bar.update(len(prompts))
            if lengths is not None:
                lengths.append([len(tokens) for tokens in outputs])
            return [self.tokenizer.decode(tokens) for tokens in outputs]

        return generate_text

    def samples(self, params) -> list[dict[str, str]]:
        """`{prompt, generated, reference}` for the first `eval.generation_samples` usable rows."""
        wanted = self.eval_config.generation_samples
        tokenizer = self.tokenizer
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


class Evaluator:
    """Evaluates states of one run on `setup.eval_rows` (built once: examples, compiled functions)."""

    def __init__(self, setup):
        self.setup = setup
        self.eval_step = setup.plan.eval_step()
        config = setup.config
        self.held_out = HeldOutEvaluation(setup.model_config, setup.tokenizer, setup.eval_rows, setup.eval_task,
                                          eval_config=config.eval, max_length=config.data.max_length,
                                          bucket=config.data.bucket)

    @property
    def enabled(self) -> bool:
        return self.held_out.enabled

    def __call__(self, state, frozen) -> dict[str, Any]:
        """`HeldOutEvaluation.metrics` of the state's model (the loss by the run's sharded eval step)."""
        if not self.enabled:
            return {}
        params = self.setup.plan.params(state, frozen)
        return self.held_out.metrics(params, lambda batch: self.eval_step(state, frozen, batch))
