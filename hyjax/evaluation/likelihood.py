"""Log-likelihood of candidate answers under the model, each prompt read once.

For a prompt p and candidates a_1..a_C (token ids), the score of a_c is

    log p(a_c | p) = sum_j log p(a_c[j] | p, a_c[:j])

computed as the per-candidate forward pass would, but with one pass over the prompt: the prompt fills
the KV cache (logits at its last position only give every candidate's first token), the cache is
repeated C times, and all candidates' remaining tokens run in one batched cached step. SST-2's answers
(" positive" / " negative" + EOS) cost one prompt pass and a one-token step per candidate, where scoring
each candidate alone costs C prompt passes with logits at every position.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hyjax.evaluation.scoring import Group
from hyjax.model.config import LlamaConfig
from hyjax.model.llama import KVCache
from hyjax.model.params import Params, decode
from hyjax.sampling import left_pad


@functools.partial(jax.jit, static_argnames=("config",))
def _scores(config: LlamaConfig, params: Params, prompts, prompt_valid, answers, answer_valid):
    """`[B, C]` log-likelihoods of `answers [B, C, L]` (`answer_valid` False past each one's end) after
    the left-padded `prompts [B, T]`."""
    batch, choices, length = answers.shape
    cache = KVCache.empty(config, batch, prompts.shape[1] + length - 1)
    positions = jnp.maximum(jnp.cumsum(prompt_valid, axis=1) - 1, 0)
    logits, cache = decode(config, params, prompts, positions, prompt_valid, cache, last_only=True)
    first = jax.nn.log_softmax(logits[:, 0].astype(jnp.float32), axis=-1)  # [B, V]
    scores = jnp.take_along_axis(first, answers[:, :, 0], axis=-1)  # [B, C]
    if length == 1:
        return scores
    repeat = lambda x, axis: jnp.repeat(x, choices, axis=axis)  # noqa: E731  row b -> rows b*C .. b*C + C - 1
    tiled = KVCache(k=repeat(cache.k, 1), v=repeat(cache.v, 1), valid=repeat(cache.valid, 0), index=cache.index)
    rest = answers[:, :, :-1].reshape(batch * choices, length - 1)
    rest_positions = repeat(positions[:, -1], 0)[:, None] + 1 + jnp.arange(length - 1)
    rest_valid = answer_valid[:, :, :-1].reshape(batch * choices, length - 1)
    logits, _ = decode(config, params, rest, rest_positions, rest_valid, tiled)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    targets = answers[:, :, 1:].reshape(batch * choices, length - 1)
    picked = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    picked = picked * answer_valid[:, :, 1:].reshape(batch * choices, length - 1)
    return scores + jnp.sum(picked.reshape(batch, choices, length - 1), axis=-1)


def candidate_log_likelihoods(config: LlamaConfig, params: Params, groups: Sequence[Group], *, pad_id: int,
                              max_length: int, batch_size: int = 64, bucket: int = 16,
                              progress: Callable[[int], Any] | None = None) -> list[list[float]]:
    """`log p(answer | prompt)` of every candidate of every group, in order.

    Prompts lose tokens from the left so that prompt + longest candidate fits `max_length` positions
    (as `hyjax.data.batching.truncate` does to one example). Groups are scored longest prompts first, in
    batches of `batch_size` rows padded to a multiple of `bucket` (few shapes, few compilations); every
    group must have the same number of candidates. `progress(n)` is called with the number of groups
    each batch scored (a progress bar's `update`).
    """
    if not groups:
        return []
    choices = {len(answers) for _, answers in groups}
    if len(choices) != 1:
        raise ValueError(f"every group needs the same number of candidate answers, got {sorted(choices)}")
    n_choices = choices.pop()
    longest_answer = max(len(a) for _, answers in groups for a in answers)
    if any(len(a) == 0 for _, answers in groups for a in answers) or any(len(p) == 0 for p, _ in groups):
        raise ValueError("every prompt and candidate answer needs at least one token")
    room = max(max_length + 1 - longest_answer, 1)  # prompt tokens that fit beside the longest answer
    prompts = [list(prompt)[-room:] for prompt, _ in groups]
    order = sorted(range(len(groups)), key=lambda i: -len(prompts[i]))
    out: list[list[float]] = [[] for _ in groups]
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        # filler rows up to batch_size (one shape per length): a single pad token keeps their attention finite
        tokens, valid = left_pad([prompts[i] for i in rows] + [[pad_id]] * (batch_size - len(rows)), pad_id, bucket)
        answers = np.full((batch_size, n_choices, longest_answer), pad_id, np.int32)
        answer_valid = np.zeros(answers.shape, bool)
        for row, i in enumerate(rows):
            for c, answer in enumerate(groups[i][1]):
                answers[row, c, : len(answer)] = answer
                answer_valid[row, c, : len(answer)] = True
        scores = np.asarray(_scores(config, params, tokens, valid, answers, answer_valid))
        for row, i in enumerate(rows):
            out[i] = [float(x) for x in scores[row]]
        if progress is not None:
            progress(len(rows))
    return out
