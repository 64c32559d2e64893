"""Pallas kernels (interpret mode) run per device under `shard_map` on 8 fake CPU devices, against their
one-device XLA references.

Run by tests/test_sharding.py in a subprocess with 8 fake CPU devices; prints one JSON object:
- "butterfly": `{n_factors: {"max_difference", "activation_gathers"}}`, the butterfly on activations whose
  features are split over tensor (o_proj's input on data 1 x fsdp 4 x tensor 2): with windows of 16
  features each device keeps its 32 (no all-gather of the activations); with windows of 64 the features
  are gathered first.
- "attention": `{case: {"max_difference", "max_gradient_difference"}}`, flash attention on each device's
  rows and heads (`on_local_heads`) against `xla_attention`, for key/value heads split with the query
  heads, repeated up to them, and query heads that do not divide (gathered).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from hyjax.adapters.boft import BOFTConfig
from hyjax.model.attention import AttentionMask, attention, xla_attention
from hyjax.sharding import Layout, Rules, activation_sharding, build_mesh
from hyjax.sharding.activations import input_features

# case: (mesh, query heads, key/value heads)
ATTENTION_CASES = {"kv_split": (dict(data=2, fsdp=2, tensor=2), 8, 2),
                   "kv_repeated": (dict(data=2, tensor=4), 8, 2),
                   "heads_gathered": (dict(data=2, tensor=4), 6, 3)}


def butterfly() -> dict:
    layout = Layout(build_mesh(data=1, fsdp=4, tensor=2), Rules())
    x = jax.device_put(jax.random.normal(jax.random.key(2), (8, 4, 64)),
                       NamedSharding(layout.mesh, P(("data", "fsdp"), None, "tensor")))
    results = {}
    for n_factors in (2, 4):
        node = BOFTConfig(block_size=8, n_factors=n_factors, impl="pallas", interpret=True).init(
            jnp.ones((64, 32)), jax.random.key(0))
        node = node.replace(r=0.3 * jax.random.normal(jax.random.key(1), node.r.shape))

        def rotate(node, x):
            with activation_sharding(layout), input_features("heads"):
                return node.rotate(x)

        step = jax.jit(rotate)
        got = step(node, x)
        want = node.replace(impl="xla").rotate(jax.device_get(x))
        hlo = step.lower(node, x).compile().as_text()
        results[n_factors] = {"max_difference": float(jnp.max(jnp.abs(got - want))),
                              "activation_gathers": sum("all-gather(" in line and "[2,4,64]" in line
                                                        for line in hlo.splitlines())}
    return results


def flash_attention_per_device() -> dict:
    batch, seq, head_dim = 4, 40, 16
    segments = np.ones((batch, seq), np.int32)
    segments[1, 25:] = 2  # two sequences packed in a row
    segments[2, 30:] = 0  # right padding
    segments = jnp.asarray(segments)
    results = {}
    for case, (mesh, heads, kv_heads) in ATTENTION_CASES.items():
        layout = Layout(build_mesh(**mesh), Rules())
        keys = jax.random.split(jax.random.key(3), 3)
        q = jax.random.normal(keys[0], (batch, seq, heads, head_dim))
        k, v = (jax.random.normal(key, (batch, seq, kv_heads, head_dim)) for key in keys[1:])

        def loss(q, k, v, impl, sharded):
            mask = AttentionMask.causal(segments)
            if sharded:
                with activation_sharding(layout):
                    out = attention(q, k, v, mask, impl=impl)
            else:
                out = xla_attention(q, k, v, mask)
            real = (segments > 0)[:, :, None, None]
            return jnp.sum(jnp.where(real, out, 0.0) ** 2), out

        grad = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)
        (_, got), got_grads = jax.jit(grad, static_argnums=(3, 4))(q, k, v, "pallas", True)
        (_, want), want_grads = grad(q, k, v, "xla", False)
        real = np.asarray(segments > 0)
        results[case] = {
            "max_difference": float(np.max(np.abs(np.asarray(got - want)[real]))),
            "max_gradient_difference": max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(got_grads, want_grads))}
    return results


if __name__ == "__main__":
    print(json.dumps({"butterfly": butterfly(), "attention": flash_attention_per_device()}))
