"""The functional face of the model: parameters as a plain dict of arrays, and pure apply functions.

Checkpoint loaders, adapters and optimizers all work on this plain dict; the NNX module is rebuilt
around it (`nnx.merge`) inside each traced function, which costs nothing at run time.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
from flax import nnx

from hyjax.model.config import LlamaConfig
from hyjax.model.linear import scan_ready
from hyjax.model.llama import KVCache, Llama

Params = dict[str, Any]


@functools.lru_cache(maxsize=64)
def graphdef(config: LlamaConfig) -> nnx.GraphDef:
    """The model's structure without its values (cheap: built abstractly)."""
    return nnx.split(_abstract_model(config))[0]


def _abstract_model(config: LlamaConfig) -> Llama:
    return nnx.eval_shape(lambda: Llama(config, nnx.Rngs(0)))


def init_params(config: LlamaConfig, key: jax.Array) -> Params:
    """Freshly initialised parameters (normal(0.02) projections and embeddings, unit norms)."""
    return nnx.to_pure_dict(nnx.state(Llama(config, nnx.Rngs(params=key))))


def abstract_params(config: LlamaConfig) -> Params:
    """`jax.ShapeDtypeStruct` for every parameter, without allocating any."""
    return nnx.to_pure_dict(nnx.state(_abstract_model(config)))


def logical_axes(config: LlamaConfig) -> Params:
    """Logical axis names of every parameter, e.g. `('layers', 'embed', 'heads')` for q_proj."""
    state = nnx.state(_abstract_model(config))
    return nnx.to_pure_dict(jax.tree.map(lambda v: v.get_metadata()["out_sharding"], state,
                                         is_leaf=lambda v: isinstance(v, nnx.Variable)))


def count_params(params: Params) -> int:
    """Number of scalars in a parameter tree (arrays or ShapeDtypeStructs)."""
    return sum(int(x.size) for x in jax.tree.leaves(params))


def apply(config: LlamaConfig, params: Params, tokens: jax.Array, positions: jax.Array | None = None,
          segment_ids: jax.Array | None = None, logit_positions: jax.Array | None = None) -> jax.Array:
    """Logits `[batch, seq, vocab]`, or `[batch, k, vocab]` at `logit_positions [batch, k]` only (see
    `Llama.__call__`)."""
    return nnx.merge(graphdef(config), scan_ready(params))(tokens, positions, segment_ids, logit_positions)


def decode(config: LlamaConfig, params: Params, tokens: jax.Array, positions: jax.Array,
           token_valid: jax.Array, cache: KVCache, last_only: bool = False) -> tuple[jax.Array, KVCache]:
    """One cached forward pass for generation (see `Llama.decode`)."""
    return nnx.merge(graphdef(config), scan_ready(params)).decode(tokens, positions, token_valid, cache, last_only)
