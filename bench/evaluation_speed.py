"""Benchmark: greedy generation (GSM8K evaluation's cost) of each method's adapted tree, adapters applied
to the activations at every decoding step, against the same tree merged into plain weights first.

    python bench/evaluation_speed.py [--methods full,lora,boft,hybrid,unitary] [--prompts 16]
                                     [--new-tokens 64] [--out bench/results]

Each method is built as `hyjax.train` builds it (`load_config("methods/<name>")` + `prepare_run` on the
real SmolLM2-135M-Instruct weights and GSM8K's training file; start-up gradients from 2 batches), and the
tree a run's evaluation receives (`setup.plan.params(state, frozen)`) continues the first `--prompts`
GSM8K problems (one batch) for exactly `--new-tokens` greedy steps (no stop token, so every method
decodes as many steps): once to compile, then timed. Then the same from `adapters.merge` of that tree,
the merge's time included. Full fine-tuning has no adapters: its two rows are the plain model. The
adapters hold their starting values (speed does not depend on them). Writes `evaluation_speed.json`
and `evaluation_speed.md` under `--out`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import sys
import tempfile
import time

from machine import cores, cpu_model

os.environ.setdefault("JAX_PLATFORMS", "cpu")

PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[1]
GSM8K_TRAIN = PROJECT_ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"


def build(method: str, args, output_dir: str):
    """`(model_config, adapted tree as evaluation receives it, prompt ids of the first --prompts problems,
    the tokenizer's pad id)`."""
    import jax

    from hyjax.config import load_config
    from hyjax.training.run_plan import run_layout
    from hyjax.training.setup import prepare_run

    config = load_config(f"methods/{method}", [
        "model.path=smollm2-135m-instruct", f"data.path={GSM8K_TRAIN}", "data.task=math", "data.max_length=256",
        f"data.eval_count={args.prompts}", "train.global_batch_size=4", "train.steps=10",
        f"logging.output_dir={output_dir}", "logging.progress_bar=false", "method.lora_ga.n_batches=2",
        "method.hybrid_lora.n_batches=2"])
    setup = prepare_run(config, layout=run_layout(config.mesh), log=lambda text: None)
    params = jax.block_until_ready(setup.plan.params(setup.initial_state(), setup.frozen))
    prompts = [list(setup.eval_task.example(row, setup.tokenizer).prompt_ids) for row in setup.eval_rows]
    return setup.model_config, params, prompts, setup.tokenizer.pad_id


def timed_generation(model_config, make_params, prompts, pad_id: int, new_tokens: int) -> tuple[float, float, list]:
    """`(first call s, timed call s, tokens)`: `make_params()` then greedy generation, twice."""
    from hyjax.sampling import SamplingConfig, generate

    never = [model_config.vocab_size]  # an id the model cannot emit: every row decodes `new_tokens` steps
    seconds, tokens = [], None
    for _ in range(2):
        start = time.perf_counter()
        tokens = generate(model_config, make_params(), prompts, never, SamplingConfig(max_new_tokens=new_tokens),
                          pad_id=pad_id)
        seconds.append(time.perf_counter() - start)
    return seconds[0], seconds[1], tokens


def measure(method: str, args) -> dict:
    import jax

    from hyjax import adapters

    with tempfile.TemporaryDirectory() as tmp:
        model_config, params, prompts, pad_id = build(method, args, tmp)
    on_activations = timed_generation(model_config, lambda: params, prompts, pad_id, args.new_tokens)
    merged = timed_generation(model_config, lambda: jax.block_until_ready(adapters.merge(params)), prompts, pad_id,
                              args.new_tokens)
    same = sum(a == b for a, b in zip(on_activations[2], merged[2]))
    return {"method": method, "prompts": len(prompts), "adapted_first_s": on_activations[0],
            "adapted_s": on_activations[1], "merged_first_s": merged[0], "merged_s": merged[1],
            "speedup": on_activations[1] / merged[1], "same_tokens_rows": same}


def markdown(report: dict) -> str:
    rows = report["rows"]
    full = next((r for r in rows if r["method"] == "full"), None)
    lines = ["# Evaluation's greedy generation: adapters on the activations vs merged weights", "",
             f"{report['cpu_model']}, {report['cores']} cores, jax {report['jax']}, {report['date']}. Command: "
             f"`{report['command']}`.", "",
             f"SmolLM2-135M-Instruct, {report['prompts']} GSM8K prompts in one batch, {report['new_tokens']} "
             "greedy steps each; seconds of the second call (the first compiles), merged including the merge. "
             "Same tokens: rows whose greedy tokens agree between the two forms.", "",
             "| method | adapters on activations s | merged s | speedup | vs full (merged) | first call s "
             "(adapted / merged) | same tokens |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        versus = f"{r['merged_s'] / full['merged_s']:.2f}x" if full else "-"
        lines.append(f"| {r['method']} | {r['adapted_s']:.2f} | {r['merged_s']:.2f} | {r['speedup']:.2f}x | "
                     f"{versus} | {r['adapted_first_s']:.1f} / {r['merged_first_s']:.1f} | "
                     f"{r['same_tokens_rows']}/{r['prompts']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="full,lora,boft,hybrid,unitary")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--out", type=pathlib.Path, default=PROJECT_ROOT / "bench" / "results")
    args = parser.parse_args()
    import jax

    rows = []
    for method in args.methods.split(","):
        rows.append(measure(method, args))
        r = rows[-1]
        print(f"{method}: adapted {r['adapted_s']:.2f} s, merged {r['merged_s']:.2f} s ({r['speedup']:.2f}x), "
              f"same tokens {r['same_tokens_rows']}/{r['prompts']}", flush=True)
    report = {"command": " ".join(["python bench/evaluation_speed.py", *sys.argv[1:]]), "rows": rows,
              "prompts": args.prompts, "new_tokens": args.new_tokens, "cpu_model": cpu_model(), "cores": cores(),
              "jax": jax.__version__, "python": platform.python_version(),
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "evaluation_speed.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "evaluation_speed.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
