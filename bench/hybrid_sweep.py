"""Sweep: the hybrid's settings (and LoRA's learning rate, for a fair comparison) and zo_fo's SPSA learning
rate on SST-2 rows held out of the training file, never on dev.

    python bench/hybrid_sweep.py [--only "NAME;..."] [--steps 150] [--batch 16] [--held-out 500] [--seed 0]
                                 [--out bench/results] [--work runs/bench-hybrid-sweep] [--resume]

The budget is the real SST-2 job's (bench/job.py): SmolLM2-135M-Instruct, each step 16 rows drawn from the
whole training file, prompt "Review: {text}\\nSentiment:", loss on the answer tokens, AdamW, clipping at 1.0,
cosine schedule with 10% warm-up, one seed. Each setting is `python -m hyjax.train methods/<method>` with its
overrides, in its own process; the score is the accuracy (answer log-likelihood of the two labels) on
`--held-out` rows that `data.eval_count` holds out of the training file (the same rows for every setting: they
depend on the seed only). Per setting: held-out accuracy and loss, the final training loss, the hybrid's mean
lambda at the end, zo_fo's summed SPSA decrease, and wall time. Writes hybrid_sweep.{json,md} under `--out`
after every setting; runs live under `--work`. `--resume` keeps every setting that finished in `--work` or is
recorded in `--out`/hybrid_sweep.json with this budget, so the sweep continues across sittings.

The settings: the hybrid shipped before the sweep; its learning rate; the two parameterisations (mix "weight":
lambda weights the branches' outputs; "update": it scales their optimizer updates); the BOFT branch at BOFT's
own learning rate (a 5x `lr_multipliers` group over LoRA-GA's); the lambda rule's direction and temperature
(at 4 the rule keeps its per-layer ranking but moves lambda a quarter as far from 0.5 in log-odds); fixed
lambda 0.5; and each branch alone. LoRA runs at the same learning rates as the hybrid. Then zo_fo (SPSA on
every base weight beside LoRA at LoRA's shipped 1e-3) at SPSA learning rates 1e-6 (shipped before the sweep),
1e-5, 1e-4 and 3e-4: with the same seed its data order and LoRA's initialisation are LoRA's, so its row
against LoRA at 1e-3 is what the zeroth-order updates add at equal steps.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import shlex
import shutil
import subprocess
import sys

from machine import cores, cpu_model
from quality import bootstrap_difference

PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[1]
SST2_TRAIN = PROJECT_ROOT.parent / "shared" / "data" / "sst2" / "train.tsv"
TEMPLATE = "Review: {text}\nSentiment:"
BOFT_AT_ITS_RATE = 'train.lr_multipliers=[[".*/boft_r$",5.0]]'  # 5 x 2e-4 = BOFT's configured 1e-3
FIXED_HALF = "train.hybrid_weights.clip=[0.5,0.5]"
# Each setting names its mix, rate and multipliers, so it means the same whatever the YAMLs ship today.
WEIGHT, UPDATE = "method.hybrid.mix=weight", "method.hybrid.mix=update"
NO_MULTIPLIER = "train.lr_multipliers=[]"

# name -> (method, overrides). The hybrid's settings first (at most 12), then the branches, LoRA and zo_fo.
SETTINGS = {
    "hybrid weight lr 5e-4 (shipped before the sweep)": ("hybrid", [WEIGHT, "train.learning_rate=5e-4", NO_MULTIPLIER]),
    "hybrid weight lr 2e-4": ("hybrid", [WEIGHT, "train.learning_rate=2e-4", NO_MULTIPLIER]),
    "hybrid weight lr 1e-3": ("hybrid", [WEIGHT, "train.learning_rate=1e-3", NO_MULTIPLIER]),
    "hybrid weight lr 2e-4, BOFT 1e-3": ("hybrid", [WEIGHT, "train.learning_rate=2e-4", BOFT_AT_ITS_RATE]),
    "hybrid update lr 2e-4": ("hybrid", [UPDATE, "train.learning_rate=2e-4", NO_MULTIPLIER]),
    "hybrid update lr 5e-4": ("hybrid", [UPDATE, "train.learning_rate=5e-4", NO_MULTIPLIER]),
    "hybrid update lr 1e-3": ("hybrid", [UPDATE, "train.learning_rate=1e-3", NO_MULTIPLIER]),
    "hybrid update lr 2e-4, BOFT 1e-3": ("hybrid", [UPDATE, "train.learning_rate=2e-4", BOFT_AT_ITS_RATE]),
    "hybrid update lr 2e-4, BOFT 1e-3, inverse": ("hybrid", [UPDATE, "train.learning_rate=2e-4", BOFT_AT_ITS_RATE,
                                                             "train.hybrid_weights.direction=inverse"]),
    "hybrid update lr 2e-4, BOFT 1e-3, fixed 0.5": ("hybrid", [UPDATE, "train.learning_rate=2e-4", BOFT_AT_ITS_RATE,
                                                               FIXED_HALF]),
    "hybrid update lr 2e-4, BOFT 1e-3, temperature 4": ("hybrid", [UPDATE, "train.learning_rate=2e-4",
                                                                    BOFT_AT_ITS_RATE,
                                                                    "train.hybrid_weights.temperature=4"]),
    "hybrid weight lr 2e-4, BOFT 1e-3, fixed 0.5": ("hybrid", [WEIGHT, "train.learning_rate=2e-4", BOFT_AT_ITS_RATE,
                                                               FIXED_HALF]),
    "boft alone (lr 1e-3)": ("boft", ["train.learning_rate=1e-3"]),
    "lora_ga alone (lr 2e-4)": ("lora_ga", ["train.learning_rate=2e-4"]),
    "lora lr 2e-4": ("lora", ["train.learning_rate=2e-4"]),
    "lora lr 5e-4": ("lora", ["train.learning_rate=5e-4"]),
    "lora lr 1e-3": ("lora", ["train.learning_rate=1e-3"]),
    "zo_fo SPSA lr 1e-6 (shipped before the sweep)": ("zo_fo", ["method.zo_fo.learning_rate=1e-6"]),
    "zo_fo SPSA lr 1e-5": ("zo_fo", ["method.zo_fo.learning_rate=1e-5"]),
    "zo_fo SPSA lr 1e-4": ("zo_fo", ["method.zo_fo.learning_rate=1e-4"]),
    "zo_fo SPSA lr 3e-4": ("zo_fo", ["method.zo_fo.learning_rate=3e-4"]),
}


def overrides(args, folder: pathlib.Path) -> list[str]:
    """The budget every setting shares."""
    return ["model.path=smollm2-135m-instruct", f"data.path={args.data}", "data.chat=false",
            f"data.template={TEMPLATE}", "data.task=classification", "data.bucket=16", "data.max_length=128",
            f"data.eval_count={args.held_out}", f"eval.num_examples={args.held_out}", "eval.generation_samples=0",
            "eval.before_training=false", f"train.steps={args.steps}", f"train.global_batch_size={args.batch}",
            f"train.warmup_steps={args.steps // 10}", "train.schedule=cosine", f"train.seed={args.seed}",
            f"data.shuffle_seed={args.seed}", f"method.lora_ga.n_batches={args.gradient_batches}",
            f"logging.output_dir={folder}", "logging.every_steps=1", "logging.progress_bar=false",
            "checkpoint.every_steps=0", "checkpoint.keep=1", "export.peft_adapter=false", "export.merged_model=false"]


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def run(name: str, args) -> dict:
    """One setting in its own process, unless `--resume` finds it finished in `--work`."""
    method, extra = SETTINGS[name]
    folder = pathlib.Path(args.work).resolve() / slug(name)
    summary = folder / "summary.json"
    if not (args.resume and summary.is_file() and json.loads(summary.read_text()).get("status") == "finished"):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        command = [sys.executable, "-m", "hyjax.train", f"methods/{method}", *overrides(args, folder), *extra]
        (folder / "command.txt").write_text(" ".join(command) + "\n")
        with open(folder / "train.log", "w") as log:
            subprocess.run(command, cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT)
        shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    if not summary.is_file():
        tail = (folder / "train.log").read_text(errors="replace").strip().splitlines()[-5:]
        return {"name": name, "method": method, "overrides": extra, "error": " | ".join(tail)}
    done = json.loads(summary.read_text())
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in records if "loss" in r]
    lambdas = steps[-1].get("lambda") if steps else None
    tail = steps[-10:]
    return {"name": name, "method": method, "overrides": extra, "accuracy": done["eval_after"].get("accuracy"),
            "held_out_loss": done["eval_after"].get("loss"), "examples": done["eval_after"].get("examples"),
            "final_train_loss": sum(r["loss"] for r in tail) / len(tail),
            "mean_lambda": (sum(lambdas.values()) / len(lambdas)) if isinstance(lambdas, dict) and lambdas else None,
            "spsa_decrease": spsa_decrease(steps),
            "wall_seconds": done["wall_time_seconds"], "run_dir": str(folder),
            "correct_rows": next(r for r in reversed(records) if "eval_seconds" in r).get("eval_correct_rows")}


def spsa_decrease(steps: list[dict]) -> float | None:
    """zo_fo's zeroth-order steps' first-order loss decrease, summed over the run: a step moves the base
    weights by -lr g z (g the projected gradient along the direction z), which lowers the batch's loss by
    lr g^2 to first order. None for a method without SPSA."""
    spsa = [r for r in steps if "zo_projected_grad" in r]
    return sum(r["zo_learning_rate"] * r["zo_projected_grad"] ** 2 for r in spsa) if spsa else None


def best_lora(runs: list[dict]) -> dict | None:
    """The LoRA setting of the highest held-out accuracy among those with per-row results: the baseline
    every other setting is paired against (LoRA at its best learning rate, for a fair comparison)."""
    candidates = [r for r in runs if r["method"] == "lora" and r.get("correct_rows") and "error" not in r]
    return max(candidates, key=lambda r: r["accuracy"], default=None)


def markdown(report: dict) -> str:
    s = report["settings"]
    best = best_lora(report["runs"])
    baseline_name = best["name"] if best else "the best LoRA"
    lines = [f"# The hybrid's and zo_fo's settings on SST-2 rows held out of the training file ({report['date']})",
             "",
             f"{report['machine']['cpu_model']}, {report['machine']['cores']} cores; "
             f"{sum(r.get('wall_seconds', 0) for r in report['runs']) / 60:.0f} minutes of runs. "
             f"Command: `{report['command']}`.", "",
             f"Each setting: {s['steps']} steps of {s['batch']} rows drawn from the whole training file (less the "
             f"held-out rows), prompt {TEMPLATE!r}, AdamW, cosine schedule with {s['steps'] // 10} warm-up steps, "
             f"seed {s['seed']}; the start-up gradient of LoRA-GA and the hybrid over {s['gradient_batches']} "
             f"batches of 2. Score: accuracy on {s['held_out']} rows held out of train.tsv (`data.eval_count`), "
             "never dev. Train loss: mean of the last 10 steps. Lambda: the hybrid's mean BOFT share at the end. "
             "SPSA: zo_fo's zeroth-order steps' first-order loss decrease summed over the run (lr g^2 a step). "
             f"vs {baseline_name} (the best LoRA with per-row results): the paired accuracy difference on the "
             "same held-out rows, [95% interval] from resampling the rows.", "",
             f"| setting | held-out accuracy | vs {baseline_name} [95%] | held-out loss | train loss | lambda "
             "| SPSA | wall s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    baseline = best["correct_rows"] if best else None
    for r in report["runs"]:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error'][:120]} | | | | | | |")
            continue
        lam = f"{r['mean_lambda']:.2f}" if r["mean_lambda"] is not None else ""
        spsa = f"{r['spsa_decrease']:.3f}" if r.get("spsa_decrease") is not None else ""
        versus = "-"
        if baseline and r.get("correct_rows") and r["name"] != baseline_name:
            mean, low, high = bootstrap_difference([r["correct_rows"]], [baseline])
            versus = f"{100 * mean:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]"
        lines.append(f"| {r['name']} | {r['accuracy']:.3f} | {versus} | {r['held_out_loss']:.3f} | "
                     f"{r['final_train_loss']:.3f} | {lam} | {spsa} | {r['wall_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="setting names or their folder names, separated by ';' (default: all)")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--held-out", type=int, default=500, help="training rows held out and scored")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gradient-batches", type=int, default=8)
    parser.add_argument("--data", default=str(SST2_TRAIN))
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--work", default="runs/bench-hybrid-sweep")
    parser.add_argument("--resume", action="store_true", help="keep the settings that finished in --work")
    args = parser.parse_args()
    by_slug = {slug(name): name for name in SETTINGS}
    names = [by_slug.get(n.strip(), n.strip()) for n in args.only.split(";")] if args.only else list(SETTINGS)
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        parser.error(f"unknown settings {unknown}; known: {list(SETTINGS)}")
    if not pathlib.Path(args.data).is_file():
        raise SystemExit(f"{args.data} is missing (see ../shared/data/README.md)")
    settings = {"steps": args.steps, "batch": args.batch, "held_out": args.held_out, "seed": args.seed,
                "gradient_batches": args.gradient_batches}
    out = pathlib.Path(args.out)
    previous = json.loads((out / "hybrid_sweep.json").read_text()) \
        if args.resume and (out / "hybrid_sweep.json").is_file() else {}
    recorded = {r["name"]: r for r in previous.get("runs", []) if previous.get("settings") == settings
                and "error" not in r and r["name"] in SETTINGS and r["overrides"] == SETTINGS[r["name"]][1]}
    report = {"command": "python bench/hybrid_sweep.py " + shlex.join(sys.argv[1:]), "settings": settings, "runs": []}
    for i, name in enumerate(names, 1):
        print(f"[{i}/{len(names)}] {name} ...", flush=True)
        result = recorded.pop(name, None) or run(name, args)
        report["runs"] = [r for r in report["runs"] if r["name"] != name] + [result]
        print(f"    {json.dumps({k: v for k, v in result.items() if k not in ('overrides', 'run_dir')})}", flush=True)
        order = list(SETTINGS)  # the table in SETTINGS' order, earlier sittings' runs included
        rows = sorted([*report["runs"], *recorded.values()], key=lambda r: order.index(r["name"]))
        write(out, {**report, "runs": rows,
                    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "machine": {"cpu_model": cpu_model(), "cores": cores(), "python": platform.python_version(),
                                "loadavg_end": os.getloadavg()}})
    print((out / "hybrid_sweep.md").read_text())


def write(out: pathlib.Path, report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "hybrid_sweep.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "hybrid_sweep.md").write_text(markdown(report))


if __name__ == "__main__":
    main()
