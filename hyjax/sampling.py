"""Autoregressive generation with a KV cache: greedy, or temperature with nucleus (top-p) sampling.

Prompts of different lengths are left-padded so that every row writes its next token into the same
cache slot; padding is masked out of attention and rotary positions count real tokens only. The
prefill and the whole decoding loop (`lax.while_loop`, stopping when every row has hit a stop token)
are one compiled program.

Each row draws from its own key (folded with the token's index), so a row samples the same tokens
whatever else is in its batch: RL draws each completion from a key of (step, prompt, sample), and any
number of processes sample what one does. `generate_with_log_probs` also returns each generated token's
log-probability under the sampling distribution, softmax(logits / temperature) (top-p's truncation not
applied; temperature 0 counts as 1), as a training forward pass computes it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hyjax.model.config import LlamaConfig
from hyjax.model.llama import KVCache
from hyjax.model.params import Params, decode


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to pick each next token. `temperature == 0` is greedy; otherwise sample from the smallest
    set of tokens whose probability reaches `top_p`, at the given temperature."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be at least 1")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 means greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")


def sample_token(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_p: jax.Array) -> jax.Array:
    """Next token for each row of `logits [batch, vocab]`: argmax when temperature is 0, else a sample
    of softmax(logits / temperature) drawn with that row's key of `keys [batch]`, restricted when
    top_p < 1 to the nucleus (tokens sorted by probability, kept while the probability before them is
    < top_p).

    Only the branch the scalars pick runs: sorting the vocabulary costs more than the model's own decode
    step on a CPU (about 1 s for 32 rows of 49,152), so greedy decoding and top_p = 1 skip it; top_p = 1
    also keeps the tail tokens that a float32 cumulative sum would round past 1."""
    scaled = logits / jnp.maximum(temperature, 1e-6)

    def greedy():
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def whole_softmax():
        return jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)

    def nucleus():
        order = jnp.argsort(-scaled, axis=-1)
        sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs
        choice = jax.vmap(jax.random.categorical)(keys, jnp.where(before < top_p, sorted_logits, -jnp.inf))
        return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)

    branch = jnp.where(temperature > 0, jnp.where(top_p < 1, 2, 1), 0)
    return jax.lax.switch(branch, [greedy, whole_softmax, nucleus])


def sampling_log_probs(logits: jax.Array, tokens: jax.Array, temperature) -> jax.Array:
    """Log-probabilities of `tokens [...]` under softmax(`logits [..., vocab]` / temperature), the
    distribution a token is sampled from (before top-p); temperature 0 counts as 1. Sampler and learner
    both compute it here, in float32."""
    scale = jnp.where(temperature > 0, temperature, 1.0)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32) / scale, axis=-1)
    return jnp.take_along_axis(log_probs, tokens[..., None], axis=-1)[..., 0]


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, multiple: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """`(tokens, valid)`, each `[batch, length]`, length rounded up to `multiple` to limit recompiles."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    length = -(-max(len(p) for p in prompts) // multiple) * multiple
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    valid = np.zeros((len(prompts), length), bool)
    for row, prompt in enumerate(prompts):
        tokens[row, length - len(prompt):] = prompt
        valid[row, length - len(prompt):] = True
    return tokens, valid


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "copies"))
def sample_tokens(config: LlamaConfig, params: Params, tokens, valid, stop_ids, row_keys, temperature, top_p,
              max_new_tokens: int, copies: int = 1):
    """`(new tokens, their sampling log-probabilities)`, each `[prompts * copies, max_new_tokens]` (after a
    row's first stop token: stop tokens, log-probability 0). Each prompt is prefilled once and its cache
    repeated for its `copies` rows (prompt-major)."""
    prompts, prompt_len = tokens.shape
    batch = prompts * copies
    cache = KVCache.empty(config, prompts, prompt_len + max_new_tokens)
    positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
    logits, cache = decode(config, params, tokens, positions, valid, cache, last_only=True)
    cache = KVCache(k=jnp.repeat(cache.k, copies, axis=1), v=jnp.repeat(cache.v, copies, axis=1),
                    valid=jnp.repeat(cache.valid, copies, axis=0), index=cache.index)
    logits = jnp.repeat(logits, copies, axis=0)
    next_position = jnp.repeat(positions[:, -1] + 1, copies)

    def cond(state):
        step, _, _, done, _, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, last_logits, cache, done, out, log_probs = state
        keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, step)
        token = sample_token(last_logits, keys, temperature, top_p)
        token = jnp.where(done, stop_ids[0], token)
        log_prob = jnp.where(done, 0.0, sampling_log_probs(last_logits, token, temperature))
        out, log_probs = out.at[:, step].set(token), log_probs.at[:, step].set(log_prob)
        done = done | jnp.isin(token, stop_ids)
        logits, cache = decode(config, params, token[:, None], (next_position + step)[:, None],
                               jnp.ones((batch, 1), bool), cache)
        return step + 1, logits[:, -1], cache, done, out, log_probs

    out = jnp.full((batch, max_new_tokens), stop_ids[0], jnp.int32)
    log_probs = jnp.zeros((batch, max_new_tokens), jnp.float32)
    state = (jnp.int32(0), logits[:, -1], cache, jnp.zeros((batch,), bool), out, log_probs)
    return jax.lax.while_loop(cond, body, state)[4:]


def generate(config: LlamaConfig, params: Params, prompts: Sequence[Sequence[int]], stop_ids: Sequence[int],
             sampling: SamplingConfig = SamplingConfig(), pad_id: int | None = None) -> list[list[int]]:
    """Continues each prompt (token ids) until a stop token or `max_new_tokens`; row i draws from
    `fold_in(key(sampling.seed), i)`.

    Returns the new tokens of each prompt, without the stop token.
    """
    row_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(sampling.seed),
                                                                jnp.arange(len(prompts)))
    return generate_with_log_probs(config, params, prompts, stop_ids, row_keys, sampling, pad_id)[0]


def generate_with_log_probs(config: LlamaConfig, params: Params, prompts: Sequence[Sequence[int]],
                            stop_ids: Sequence[int], row_keys: jax.Array, sampling: SamplingConfig = SamplingConfig(),
                            pad_id: int | None = None, keep_stop: bool = False, copies: int = 1
                            ) -> tuple[list[list[int]], list[list[float]]]:
    """Continues each prompt `copies` times as `generate` does (row r, copy r % copies of prompt
    r // copies, drawing from `row_keys[r]`; `sampling.seed` unused). Returns the new tokens of each row
    (without the stop token, or ending in it with `keep_stop`: a sampled action like the others) and
    each one's log-probability under the sampling distribution (`sampling_log_probs`). The copies share
    one prefill of their prompt (RL's groups prefill each prompt once, not `group_size` times)."""
    stop_ids = [int(s) for s in stop_ids]
    if not stop_ids:
        raise ValueError("generation needs at least one stop token id (the tokenizer's eos)")
    if len(row_keys) != len(prompts) * copies:
        raise ValueError(f"{len(row_keys)} keys for {len(prompts)} prompts x {copies} copies: give one key per row")
    tokens, valid = left_pad(prompts, stop_ids[0] if pad_id is None else pad_id)
    out, log_probs = sample_tokens(config, params, jnp.asarray(tokens), jnp.asarray(valid),
                               jnp.asarray(stop_ids, jnp.int32), row_keys, jnp.float32(sampling.temperature),
                               jnp.float32(sampling.top_p), max_new_tokens=sampling.max_new_tokens, copies=copies)
    results, row_log_probs = [], []
    for row, row_log_prob in zip(np.asarray(out).tolist(), np.asarray(log_probs).tolist()):
        ends = [i for i, t in enumerate(row) if t in stop_ids]
        end = (ends[0] + keep_stop) if ends else len(row)
        results.append(row[:end])
        row_log_probs.append(row_log_prob[:end])
    return results, row_log_probs
