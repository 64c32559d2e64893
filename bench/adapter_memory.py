"""Compiled memory of one training step per adapter method on SmolLM2-135M, against full fine-tuning.

    python bench/adapter_memory.py [--batch 8 --seq 128] [--out bench/results/adapter_memory]

Compiles (never runs) `loss -> grads of the trainable leaves -> AdamW update` for each method with
abstract inputs, and reads XLA's `memory_analysis()`: argument, output and temporary bytes of the
step. Writes a markdown table and JSON.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform

import jax
import jax.numpy as jnp
import optax

from hyjax import adapters as A
from hyjax import model as M


def methods() -> dict[str, object]:
    """The method configs compared, by display name."""
    return {
        "full": A.FullConfig(),
        "lora r=8": A.LoRAConfig(rank=8),
        "lora-ga r=8": A.LoRAGAConfig(rank=8),
        "oft b=32": A.BOFTConfig(block_size=32, n_factors=1),
        "boft b=8 m=2": A.BOFTConfig(block_size=8, n_factors=2),
        "unitary": A.UnitaryConfig(),
        "hybrid boft+lora-ga": A.HybridConfig(),
    }


def step_memory(config: M.LlamaConfig, method, batch: int, seq: int) -> dict[str, int]:
    """Bytes of one compiled AdamW training step for `method` on abstract SmolLM2 weights."""
    base = M.abstract_params(config)
    spec = A.AdapterSpec.for_method(method)
    gradients = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32), base)
    adapted = jax.eval_shape(lambda p, g: A.apply(spec, p, jax.random.key(0), gradients=g), base, gradients)
    trainable, frozen = A.split_trainable(adapted)
    optimizer = optax.adamw(1e-4)
    opt_state = jax.eval_shape(optimizer.init, trainable)
    tokens = jax.ShapeDtypeStruct((batch, seq + 1), jnp.int32)

    def train_step(trainable, frozen, opt_state, tokens):
        def loss_fn(trainable):
            logits = M.apply(config, A.combine(trainable, frozen), tokens[:, :-1])
            logp = jax.nn.log_softmax(logits)
            return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))

        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    compiled = jax.jit(train_step, donate_argnums=(0, 2)).lower(trainable, frozen, opt_state, tokens).compile()
    stats = compiled.memory_analysis()
    counts = A.count_trainable(adapted)
    return {
        "trainable_params": counts["total"],
        "argument_bytes": stats.argument_size_in_bytes,
        "output_bytes": stats.output_size_in_bytes,
        "alias_bytes": stats.alias_size_in_bytes,
        "temp_bytes": stats.temp_size_in_bytes,
        "total_bytes": stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
        + stats.temp_size_in_bytes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--remat", default="none")
    parser.add_argument("--out", default="bench/results/adapter_memory")
    args = parser.parse_args()
    config = M.preset("smollm2-135m", remat=args.remat)
    rows = {}
    for name, method in methods().items():
        rows[name] = step_memory(config, method, args.batch, args.seq)
        print(name, rows[name], flush=True)
    full = rows["full"]["total_bytes"]
    lines = [
        f"# Compiled training-step memory, SmolLM2-135M, batch {args.batch} x {args.seq} tokens, AdamW, "
        f"remat={args.remat}",
        "",
        f"jax {jax.__version__}, backend {jax.default_backend()}, {platform.machine()}. "
        f"Command: `python bench/adapter_memory.py --batch {args.batch} --seq {args.seq} --remat {args.remat}`.",
        "",
        "| method | trainable params | arguments MiB | temporaries MiB | total MiB | vs full |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    mib = 2**20
    for name, row in rows.items():
        lines.append(f"| {name} | {row['trainable_params']:,} | {row['argument_bytes'] / mib:.1f} | "
                     f"{row['temp_bytes'] / mib:.1f} | {row['total_bytes'] / mib:.1f} | "
                     f"{row['total_bytes'] / full:.2f} |")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"batch": args.batch, "seq": args.seq, "remat": args.remat,
                                                    "jax": jax.__version__, "rows": rows}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
