"""Per-chip memory of LLaMA-3.1 8B / 70B / 405B training steps on v5p pods, for full fine-tuning, LoRA,
BOFT and the hybrid (and, at 8B, the ZO + FO hybrid, Hybrid-LoRA and a GRPO run with LoRA), compiled for
the TPU topology on this CPU machine (`python -m hyjax.plan`, libtpu), with each step's roofline time bound.

    python bench/plans.py [--only 405b] [--methods boft,hybrid --update [--resume]] [--out bench/results/plans]

Writes `plans.json` (the golden file tests/test_plan.py compares against) and `plans.md`. Each row is
the same `jax.jit` step `python -m hyjax.train` runs, with bfloat16 weights, full rematerialisation,
AdamW, and sequences of 2048 tokens. The Markdown compares each method with full fine-tuning on the same
mesh and batch, and lists the largest arrays of the 405B steps.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import subprocess
import tempfile

import jax

from hyjax.config import load_config
from hyjax.planning.planner import plan

# (name, model yaml, topology, mesh and batch overrides): FSDP over most chips, tensor parallel inside.
SCALES = {
    "8b": ("models/llama3.1-8b.yaml", "v5p:2x2x2",
           ["mesh.data=1", "mesh.fsdp=8", "mesh.tensor=1", "train.global_batch_size=16", "train.micro_batch_size=8"]),
    "70b": ("models/llama3.1-70b.yaml", "v5p:4x4x4",
            ["mesh.data=1", "mesh.fsdp=16", "mesh.tensor=4", "train.global_batch_size=64",
             "train.micro_batch_size=16"]),
    "405b": ("models/llama3.1-405b.yaml", "v5p:8x8x8",
             ["mesh.data=1", "mesh.fsdp=64", "mesh.tensor=8", "train.global_batch_size=256",
              "train.micro_batch_size=64"]),
}
METHODS = {"full": "methods/full.yaml", "lora": "methods/lora.yaml", "boft": "methods/boft.yaml",
           "hybrid": "methods/hybrid.yaml", "zo_fo": "methods/zo_fo.yaml", "hybrid_lora": "methods/hybrid_lora.yaml"}
# The methods of each scale's rows.
SCALE_METHODS = {"8b": list(METHODS), "70b": ["full", "lora", "boft", "hybrid"],
                 "405b": ["full", "lora", "boft", "hybrid"]}
COMMON = ["model.path=/checkpoint", "model.param_dtype=bfloat16", "model.dtype=bfloat16", "model.remat=full",
          "data.max_length=2048", "export.peft_adapter=false", "method.boft.block_size=16"]
# A GRPO run at 8B (its own update on rollout batches of 2 prompts x 8 completions, its sampler, its
# reference policy), LoRA on the 8B row's mesh and batch.
GRPO_ROW = ("llama3.1-8b grpo", "8b", "lora", ["train.objective=grpo", "data.task=math", "grpo.group_size=8",
                                              "grpo.max_new_tokens=512", "grpo.beta=0.04"])
# The smallest row, recompiled by the default test suite (tests/test_plan.py) on every CI run.
CI_ROW = ("smollm2-135m", "models/smollm2-135m.yaml", "v5p:2x2x1", "hybrid",
          ["mesh.data=1", "mesh.fsdp=4", "mesh.tensor=1", "train.global_batch_size=8", "data.max_length=256",
           "model.path=/checkpoint", "export.peft_adapter=false"])
# The shipped pod configuration, recompiled by the slow test suite.
SHIPPED = ("llama3.1-405b-hybrid", "v5p:8x8x8")


def row_config(model_yaml: str, method: str, overrides: list[str]):
    """The run config of one row: the model's and the method's YAML files, then `overrides`."""
    with tempfile.TemporaryDirectory() as folder:
        path = pathlib.Path(folder) / "row.yaml"
        path.write_text(f"include: [{model_yaml}, {METHODS[method]}]\n")
        return load_config(path, overrides)


def planned_rows(scales, methods):
    """`(model name, config, topology)` of every row, the CI row and the shipped config first, limited to
    `scales` and `methods` (None: all)."""
    name, ci_yaml, ci_topology, ci_method, ci_overrides = CI_ROW
    config_name, shipped_topology = SHIPPED
    rows = [(name, lambda: row_config(ci_yaml, ci_method, ci_overrides), ci_topology, ci_method),
            (f"configs/{config_name}.yaml", lambda: load_config(config_name), shipped_topology, "hybrid")]
    for scale, (model_yaml, topology, mesh) in SCALES.items():
        if scales and scale not in scales:
            continue
        for method in SCALE_METHODS[scale]:
            rows.append((f"llama3.1-{scale}", lambda m=method, y=model_yaml, o=mesh: row_config(y, m, COMMON + o),
                         topology, method))
        grpo_name, grpo_scale, grpo_method, grpo_overrides = GRPO_ROW
        if scale == grpo_scale:
            rows.append((grpo_name, lambda y=model_yaml, o=mesh: row_config(y, grpo_method,
                                                                             COMMON + o + grpo_overrides),
                         topology, grpo_method))
    return [row for row in rows if not methods or row[3] in methods]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=sorted(SCALES), action="append", help="just these model sizes")
    parser.add_argument("--methods", help="just these methods (comma-separated)")
    parser.add_argument("--update", action="store_true",
                        help="replace these rows in the existing results, keeping the others")
    parser.add_argument("--resume", action="store_true",
                        help="with --update: keep the rows already planned with this commit's code (an interrupted "
                             "sitting goes on where it stopped)")
    parser.add_argument("--out", default="bench/results/plans")
    args = parser.parse_args()
    if args.resume and not args.update:
        parser.error("--resume goes with --update (without it every row is planned again)")
    out = pathlib.Path(args.out)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    rows = json.loads(out.with_suffix(".json").read_text())["rows"] if args.update else []
    for model, config, topology, method in planned_rows(args.only, args.methods and args.methods.split(",")):
        done = next((r for r in rows if _key(r) == (model, method, topology)), None)
        if args.resume and done is not None and done.get("commit") == commit:
            print(f"{model} {method} on {topology}: kept (planned with {commit})", flush=True)
            continue
        result = plan(config(), topology)
        row = {"model": model, **result.to_json(), "commit": commit}
        rows = [r for r in rows if _key(r) != _key(row)] + [row]
        print(result.report(), flush=True)
        write(rows, out)  # after every row: hours of compiling are never lost
    write(rows, out)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


def _key(row: dict) -> tuple[str, str, str]:
    return row["model"], row["method"], row["topology"]


def write(rows: list[dict], out: pathlib.Path) -> None:
    """`plans.json` and `plans.md` of `rows`, in the order of `planned_rows`."""
    order = [(model, method, topology) for model, _, topology, method in planned_rows(None, None)]
    rows = sorted(rows, key=lambda r: order.index(_key(r)) if _key(r) in order else len(order))
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = {"platform": platform.platform(), "jax": jax.__version__, "compiled_on": "CPU host, libtpu topology"}
    out.with_suffix(".json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    lines = [f"# Training-step plans on TPU v5p (`python bench/plans.py`; jax {jax.__version__}, compiled on a CPU "
             "host through libtpu)", "",
             "Per-chip memory from XLA's `memory_analysis()` of the compiled step (arguments + temporaries + "
             "outputs - donated), against 95 GiB of v5p HBM, with the kernels a TPU run picks (`impl=auto`: "
             "Pallas for BOFT, the unitary adapter and attention, splash attention); bfloat16 weights, remat full, AdamW, sequences of "
             "2048 tokens (the CI row: 256). Hybrid-LoRA is planned at its largest: its budget (10% of the modules) "
             "filled with the largest modules, the MLP projections (`python -m hyjax.plan --selection "
             "module_selection.json` plans the modules a run chose). The GRPO row compiles GRPO's own update and "
             "its sampler (2 prompts of up to 1,536 tokens, 8 completions of 512 each: KV cache, logits, "
             "completions); its total holds the larger of the two beside the state, plus the reference policy.", "",
             "| model | method | topology | mesh (data x fsdp x tensor) | batch (micro) | trainable | arguments GiB "
             "| temporaries GiB | total GiB/chip | vs full | fits | Pallas calls | compile s |",
             "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |"]
    full = {r["model"]: r["memory_gib"]["total"] for r in rows if r["method"] == "full"}
    for r in rows:
        m = r["memory_gib"]
        mesh = " x ".join(str(v) for v in r["mesh"].values())
        ratio = f"{m['total'] / full[r['model']]:.2f}x" if r["model"] in full else ""
        lines.append(f"| {r['model']} | {r['method']} | {r['topology']} | {mesh} | {r['batch']['global_batch']} "
                     f"({r['batch']['micro_batch']}) | {r['trainable_parameters']:,} | {m['arguments']:.2f} | "
                     f"{m['temporaries']:.2f} | {m['total']:.2f} | {ratio} | {'yes' if r['fits'] else 'no'} | "
                     f"{r.get('pallas_calls', '')} | {r['compile_seconds']:.0f} |")
    lines += ["", "## Step time bound (roofline)", "",
              "Per chip per step, from the compiled step's own HLO with every loop iteration counted "
              "(`hyjax.planning.cost`: XLA's `cost_analysis()` counts a scanned layer once): its FLOPs at v5p's "
              "459 TFLOP/s bfloat16 peak and its HBM traffic (tile-padded arrays read and written) at 2,765 GB/s, "
              "whichever is longer. A lower bound: it assumes perfect overlap and ignores collectives' links; "
              "a Pallas kernel counts its own cost estimate. The 8B and 70B rows were planned before commit bc8afff: "
              "their kernels counted only their operands' and results' traffic and no FLOPs, and their attention "
              "was XLA's, its [seq, seq] scores in HBM; the others run splash attention (flash attention, O(seq) "
              "memory). FLOPs busy: compute time / bound.", "",
              "| model | method | TFLOP | HBM GB | compute ms | memory ms | step >= ms | vs full | FLOPs busy |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    full_step = {r["model"]: r["roofline"]["step_s"] for r in rows if r["method"] == "full" and "roofline" in r}
    for r in rows:
        if "roofline" not in r:
            continue
        t = r["roofline"]
        ratio = f"{t['step_s'] / full_step[r['model']]:.2f}x" if r["model"] in full_step else ""
        lines.append(f"| {r['model']} | {r['method']} | {t['flops'] / 1e12:.1f} | {t['hbm_bytes'] / 1e9:.0f} | "
                     f"{t['compute_s'] * 1e3:.0f} | {t['memory_s'] * 1e3:.0f} | {t['step_s'] * 1e3:.0f} | {ratio} | "
                     f"{t['flop_utilization']:.0%} |")
    lines += ["", "## Largest arrays of the 405B steps", "",
              "Per chip, with TPU tile padding (`hyjax.planning.buffers`: distinct arrays of the optimized HLO by "
              "shape and origin, not XLA's buffer assignment); `like`: the step argument whose shard has that shape.",
              ""]
    for r in rows:
        if r["model"] != "llama3.1-405b":
            continue
        lines += [f"**{r['method']}**", "", "| GiB | unpadded GiB | array | op | from | like |",
                  "| ---: | ---: | --- | --- | --- | --- |"]
        lines += [f"| {b['gib']:.3f} | {b['unpadded_gib']:.3f} | `{b['array']}` | {b['op']} | `{b['source'][-60:]}` | "
                  f"{b['like']} |" for b in r.get("largest_buffers", [])[:5]]
        lines.append("")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
