"""The butterfly's Pallas kernel (interpret mode) on each device's tokens of activations whose features are
split over tensor (o_proj's input on data 1 x fsdp 4 x tensor 2), against the one-device XLA rotation.

Run by tests/test_sharding.py in a subprocess with 8 fake CPU devices; prints one JSON object
`{n_factors: {"max_difference", "activation_gathers"}}`: with windows of 16 features each device keeps its
32 (no all-gather of the activations); with windows of 64 the features are gathered first.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from hyjax.adapters.boft import BOFTConfig
from hyjax.sharding import Layout, Rules, activation_sharding, build_mesh
from hyjax.sharding.activations import input_features


def main() -> None:
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
    print(json.dumps(results))


if __name__ == "__main__":
    main()
