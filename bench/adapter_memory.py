"""Compiled memory of one training step per method on SmolLM2-135M, against full fine-tuning.

    python bench/adapter_memory.py [--batch 8 --seq 128 --remat none] [--out bench/results/adapter_memory]

Each method as its YAML ships it (configs/methods/<name>.yaml), on this machine's devices: the run's own
step (`plan_run(...).train_step()`, the program `python -m hyjax.train` executes, with its optimizer,
gradient accumulation and the method's state), lowered with abstract arguments (`RunPlan.abstract_arguments`:
no weight is read, batches `--seq` long with logits at every position) and compiled, never run. Reads
XLA's `memory_analysis()`: argument, output, donated and temporary bytes of the step. Writes a markdown
table and JSON.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform

import jax

from hyjax.config import load_config
from hyjax.methods import METHODS
from hyjax.training import plan_run, run_layout


def step_memory(method: str, batch: int, seq: int, remat: str) -> dict[str, int]:
    """Bytes of the compiled training step of `method` (its shipped YAML) on abstract SmolLM2-135M weights."""
    config = load_config(f"methods/{method}", [
        "model.preset=smollm2-135m", "model.path=/checkpoint", f"model.remat={remat}", f"data.max_length={seq}",
        f"train.global_batch_size={batch}", "train.micro_batch_size=null", "export.peft_adapter=false"])
    plan = plan_run(config, config.model.preset_config(), run_layout(config.mesh), total_steps=100)
    stats = plan.train_step().lower(*plan.abstract_arguments()).compile().memory_analysis()
    return {
        "trainable_params": plan.trainable_counts["total"],
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
    rows = {}
    for method in METHODS:
        rows[method] = step_memory(method, args.batch, args.seq, args.remat)
        print(method, rows[method], flush=True)
    full = rows["full"]["total_bytes"]
    lines = [
        f"# Compiled training-step memory, SmolLM2-135M, batch {args.batch} x {args.seq} tokens, each method's "
        f"YAML, remat={args.remat}",
        "",
        f"jax {jax.__version__}, backend {jax.default_backend()}, {platform.machine()}. The run's own step "
        "(`plan_run(...).train_step()`), compiled with abstract arguments. "
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
