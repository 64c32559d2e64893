"""One training step of the tiny model on several meshes of 8 CPU devices, against one device (whose step
computes logits at every position; the meshes' at the answer positions only).

Run by tests/test_sharding.py in a subprocess started with 8 fake CPU devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=8`); prints one JSON object:
`{case: {mesh: {"loss", "max_update_difference", "q_proj_shard", "trainable_bytes"}}}` (q_proj_shard: the
shape of one device's shard of the base q_proj, showing that the mesh really split it; trainable_bytes:
the trainable parameters' bytes on one device, against the one-device run's total). Method zo_fo also
reports `max_base_update_difference` (its SPSA update of the base weights, drawn per shard).

A case is `METHOD[:pallas][%OVERRIDE...][@MESH+MESH...]`: ":pallas" runs the butterfly and unitary kernels
as Pallas in interpret mode (one device and meshes alike), each "%key=value" overrides the config, "@..."
limits the meshes (default: all of MESHES).

    python tests/sharded_step_check.py CHECKPOINT TRAIN_TSV OUTPUT_DIR CASE[,CASE...]
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np

from hyjax.config import MeshSection, load_config
from hyjax.training import distributed
from hyjax.training.run_plan import run_layout
from hyjax.training.setup import prepare_run

MESHES = {
    "data8": dict(data=8),
    "fsdp8": dict(data=1, fsdp=8),
    "tensor8": dict(data=1, tensor=8),
    "data2_fsdp2_tensor2": dict(data=2, fsdp=2, tensor=2),
    "fsdp4_tensor2": dict(data=1, fsdp=4, tensor=2),
}


def one_step(checkpoint: str, train_tsv: str, output: str, method: str, mesh: dict, devices, start=None,
             full_logits: bool = False, pallas: bool = False, overrides: tuple[str, ...] = ()) -> dict:
    """One step of `method` on `mesh`; `start` (host `(trainable, frozen)`) replaces the run's own initial
    adapters, so every mesh starts from the same values (LoRA-GA's SVD initialisation turns fp-level
    differences of the gradient into different, equally valid, factors). `full_logits`: the batch without
    its `loss_positions`, so the head runs on every position (the meshes' steps run it at the answers)."""
    config = load_config(None, [
        "model.preset=null", f"model.path={checkpoint}", f"data.path={train_tsv}", "data.chat=false",
        "data.max_length=32", "data.bucket=16", "train.steps=1", "train.global_batch_size=8",
        "train.micro_batch_size=8", "train.optimizer=sgd", "train.b1=0", "train.learning_rate=0.5",
        "train.schedule=constant", "train.grad_clip_norm=null", f"method.name={method}",
        "method.lora_ga.n_batches=2", "method.lora_ga.batch_size=8", "method.lora.rank=4", "method.lora_ga.rank=4",
        "method.zo_fo.learning_rate=1e-3", "method.hybrid_lora.n_batches=2", "method.hybrid_lora.batch_size=8",
        "export.peft_adapter=false",
        "method.hybrid.lambdas.rule=raw", "method.hybrid.lambdas.warmup_steps=0", f"logging.output_dir={output}",
        *(["method.boft.impl=pallas", "method.boft.interpret=true", "method.unitary.impl=pallas"] if pallas else []),
        *overrides])
    layout = run_layout(MeshSection(**mesh), devices=devices)
    setup = prepare_run(config, layout=layout, log=lambda text: None)
    if start is not None:
        setup.trainable = jax.device_put(start[0], setup.plan.shardings.state.trainable)
        setup.frozen = jax.device_put(start[1], setup.plan.shardings.frozen)
    initial = jax.device_get((setup.trainable, setup.frozen))
    base = jax.device_get(setup.base)
    state = setup.initial_state()
    local = next(setup.data.train)
    if full_logits:
        local.pop("loss_positions")
    batch = distributed.global_batch(local, setup.plan.shardings.batch, 1, 8)
    state, metrics = setup.plan.train_step()(state, setup.frozen, batch)
    after = jax.device_get(state.trainable)
    if method == "full":
        q_proj = state.trainable["layers"]["attn"]["q_proj"]["base"]
    elif method == "zo_fo":
        q_proj = state.base["layers"]["attn"]["q_proj"]
    else:
        q_proj = setup.frozen["layers"]["attn"]["q_proj"].base
    base_updates = None if base is None else jax.tree.map(np.subtract, jax.device_get(state.base), base)
    return {"loss": float(metrics["loss"]), "updates": jax.tree.map(np.subtract, after, initial[0]),
            "base_updates": base_updates, "initial": initial,
            "q_proj_shard": list(q_proj.sharding.shard_shape(q_proj.shape)),
            "trainable_bytes": sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(state.trainable))}


def main(checkpoint: str, train_tsv: str, output: str, cases: str) -> None:
    results = {}
    for case in cases.split(","):
        name, _, meshes = case.partition("@")
        method_impl, *overrides = name.split("%")
        method, _, impl = method_impl.partition(":")
        pallas = impl == "pallas"
        folder = f"{output}/{len(results)}"
        reference = one_step(checkpoint, train_tsv, f"{folder}-one", method, dict(data=1), jax.devices()[:1],
                             full_logits=True, pallas=pallas, overrides=tuple(overrides))
        start = reference["initial"]
        scale = _max_difference(reference["updates"], None)
        results[name] = {"one_device": {"loss": reference["loss"], "update_scale": scale,
                                        "trainable_bytes": reference["trainable_bytes"]}}
        for mesh_name in meshes.split("+") if meshes else MESHES:
            run = one_step(checkpoint, train_tsv, f"{folder}-{mesh_name}", method, MESHES[mesh_name], jax.devices(),
                           start, pallas=pallas, overrides=tuple(overrides))
            results[name][mesh_name] = {
                "loss": run["loss"], "q_proj_shard": run["q_proj_shard"], "trainable_bytes": run["trainable_bytes"],
                "max_update_difference": _max_difference(run["updates"], reference["updates"])}
            if run["base_updates"] is not None:
                results[name][mesh_name]["max_base_update_difference"] = _max_difference(run["base_updates"],
                                                                                         reference["base_updates"])
        if reference["base_updates"] is not None:
            results[name]["one_device"]["base_update_scale"] = _max_difference(reference["base_updates"], None)
    print(json.dumps(results))


def _max_difference(a, b) -> float:
    """Largest absolute elementwise difference of two trees of arrays (b None: the largest magnitude)."""
    if b is None:
        return max(float(np.max(np.abs(x))) for x in jax.tree.leaves(a))
    return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


if __name__ == "__main__":
    main(*sys.argv[1:])
