"""Sweep: the hybrid's rule and rates, its branches alone and LoRA, scored on SST-2 whole sentences held out
of the training file (bench/decision_set.py), never on dev, over paired seeds.

    python bench/hybrid_sweep.py [--only "NAME;..."] [--seeds 0,1,2] [--steps 150] [--batch 16]
                                 [--rows 1000] [--gradient-batches 64] [--workers 1] [--out bench/results]
                                 [--work runs/bench-hybrid-sweep] [--resume]

The budget is the SST-2 exam's (bench/quality.py): SmolLM2-135M-Instruct, each step 16 rows drawn from the
training pool, prompt "Review: {text}\\nSentiment:", loss on the answer tokens, AdamW, clipping at 1.0,
cosine schedule with 10% warm-up; the start-up gradient of LoRA-GA and the hybrid from 64 batches of 2 (its
authors' recipe). The pool is the training file less the decision set and every row that is a phrase of a
held-out sentence (or holds one), so nothing of a scored sentence is trained on, as with dev. Each (setting,
seed) is `python -m hyjax.train methods/<method>` with its overrides in its own process; the seed is
`train.seed` and `data.shuffle_seed`, so the same seed gives every setting the same rows in the same order.
Every setting names its learning rates and the options it tests, and the hybrid's other options are pinned
to what the sweep began with (`ASSUMED`), so a setting means the same whatever the YAMLs ship.

Per setting: the decision-set accuracy (answer log-likelihood of the two labels) per seed, mean and std;
the paired difference to LoRA (the shipped 1e-3) over the seeds both ran, with a 95% interval from
resampling the held-out rows; the decision-set answer loss; the mean training loss of the last 10 steps;
for the hybrid, lambda (the BOFT branch's share) averaged over the run's steps and all weights and layers
(what a frozen-lambda control freezes it at), at the end, and its spread over the 210 projections at the
end (std, and min-max); wall time. `PAIRS` names the comparisons that decide (a rule against its
frozen-mean control, the hybrid against each branch), reported the same way. Writes
hybrid_sweep.{json,md} under `--out` after every run. `--resume` keeps every run recorded there or
finished in `--work` with this budget and the setting's overrides, so the sweep continues across sittings.

`--workers N` runs N runs at a time, each pinned to its own core (`taskset`; XLA:CPU sizes its thread pool
by the cores it may use): on the 2-core machine two one-core runs take 5.1 s a step each where one two-core
run takes 3.7 s, 1.45x the runs an hour. Only accuracies are compared here; step times are not.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import pathlib
import platform
import queue
import shlex
import shutil
import statistics
import subprocess
import sys
import threading

import numpy as np

import decision_set
from machine import cores, cpu_model
from quality import bootstrap_difference

PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[1]
TEMPLATE = "Review: {text}\nSentiment:"
BASELINE = "lora lr 1e-3"


def hybrid(lora_ga_lr: float, boft_lr: float, *extra: str, mix: str = "update") -> list[str]:
    """A hybrid setting: its LoRA-GA branch at `lora_ga_lr` (the run's learning rate) and its BOFT branch
    (rotation and scale) at `boft_lr` through one `lr_multipliers` group."""
    return [f"method.hybrid.mix={mix}", f"train.learning_rate={lora_ga_lr:g}",
            f'train.lr_multipliers=[[".*/boft_(r|s)$",{boft_lr / lora_ga_lr:g}]]', *extra]


RAW_SUM = ("method.hybrid.lambdas.rule=raw", "method.hybrid.lambdas.shares=sum")
NORMALIZED_UNIT = ("method.hybrid.lambdas.rule=normalized", "method.hybrid.lambdas.shares=unit")


def frozen(lam: float) -> tuple[str, ...]:
    """lambda held at `lam` from the first step (the raw rule's computation, clipped to one value)."""
    return ("method.hybrid.lambdas.rule=raw", "method.hybrid.lambdas.warmup_steps=0",
            f"method.hybrid.lambdas.clip=[{lam:g},{lam:g}]", "method.hybrid.lambdas.shares=unit")


# name -> (method, overrides).
SETTINGS = {
    BASELINE: ("lora", ["train.learning_rate=1e-3"]),
    # LoRA-GA alone: under Adam its first steps move the weight by about eta * c * lr per factor entry
    # (eta = alpha / sqrt(r), c = d_out^(1/4) / sqrt(gamma)), so the rate is the first knob; gamma and
    # alpha also set how far the factors move relative to their start (lr / c).
    "lora_ga lr 2e-4 (shipped)": ("lora_ga", ["train.learning_rate=2e-4"]),
    "lora_ga lr 1e-4": ("lora_ga", ["train.learning_rate=1e-4"]),
    "lora_ga lr 5e-5": ("lora_ga", ["train.learning_rate=5e-5"]),
    "lora_ga lr 2e-5": ("lora_ga", ["train.learning_rate=2e-5"]),
    "lora_ga lr 1e-4 gamma 64": ("lora_ga", ["train.learning_rate=1e-4", "method.lora_ga.gamma=64"]),
    "lora_ga lr 2e-4 gamma 64": ("lora_ga", ["train.learning_rate=2e-4", "method.lora_ga.gamma=64"]),
    "boft lr 1e-3 (shipped)": ("boft", ["train.learning_rate=1e-3"]),
    "boft lr 2e-3": ("boft", ["train.learning_rate=2e-3"]),
    "boft lr 5e-4": ("boft", ["train.learning_rate=5e-4"]),
    "boft lr 2e-4": ("boft", ["train.learning_rate=2e-4"]),
    "boft lr 1e-4": ("boft", ["train.learning_rate=1e-4"]),
    "hybrid as shipped before (raw, sum; LoRA-GA 2e-4, BOFT rotation 1e-3)": (
        "hybrid", ["method.hybrid.mix=update", "train.learning_rate=2e-4", 'train.lr_multipliers=[[".*/boft_r$",5]]',
                   *RAW_SUM]),
}


def rate(value: float) -> str:
    """A learning rate as the settings' names write it: 1e-4, 5e-5."""
    return f"{value:.0e}".replace("e-0", "e-")


def hybrid_settings(lora_ga_lr: float, boft_lr: float) -> dict:
    """The hybrid (mix update: lambda scales the branches' Adam updates) with its LoRA-GA branch at
    `lora_ga_lr` and its BOFT branch at `boft_lr`, under each rule and share, and its controls: lambda
    fixed at 0.5 (with unit shares both branches at their own rates, no rule) and plain LoRA (B = 0, at
    LoRA's 1e-3) in place of LoRA-GA under the normalized rule."""
    rates = f"LoRA-GA {rate(lora_ga_lr)}, BOFT {rate(boft_lr)}"
    return {
        f"hybrid raw, sum ({rates})": ("hybrid", hybrid(lora_ga_lr, boft_lr, *RAW_SUM)),
        f"hybrid normalized, unit ({rates})": ("hybrid", hybrid(lora_ga_lr, boft_lr, *NORMALIZED_UNIT)),
        f"hybrid normalized, sum ({rates})": (
            "hybrid", hybrid(lora_ga_lr, boft_lr, "method.hybrid.lambdas.rule=normalized",
                             "method.hybrid.lambdas.shares=sum")),
        f"hybrid handover 0.2-0.8, normalized, unit ({rates})": (
            "hybrid", hybrid(lora_ga_lr, boft_lr, *NORMALIZED_UNIT, "method.hybrid.lambdas.handover=[0.2,0.8]")),
        f"hybrid fixed 0.5, unit ({rates})": ("hybrid", hybrid(lora_ga_lr, boft_lr, *frozen(0.5))),
        f"BOFT + plain LoRA, normalized, unit (LoRA 1e-3, BOFT {rate(boft_lr)})": (
            "hybrid", hybrid(1e-3, boft_lr, *NORMALIZED_UNIT, "method.hybrid.lora_start=zero")),
    }


SETTINGS.update(hybrid_settings(1e-4, 1e-3))
BEST_RATES = hybrid_settings(5e-5, 2e-4)  # each branch at its best rate on seeds 0-1
SETTINGS.update(BEST_RATES)
# The normalized rule's own control: lambda frozen at its run mean at these rates (seed 0: 0.54).
FROZEN_MEAN = "hybrid frozen 0.54 (the normalized rule's run mean), unit (LoRA-GA 5e-5, BOFT 2e-4)"
SETTINGS[FROZEN_MEAN] = ("hybrid", hybrid(5e-5, 2e-4, *frozen(0.54)))
# Every hybrid at its branches' best rates trails BOFT alone (seed 0): the LoRA-GA branch slowed below its own
# best rate, BOFT's kept, so the hybrid is BOFT with a LoRA-GA correction.
SLOW_LORA_GA = {**hybrid_settings(2e-5, 2e-4), **hybrid_settings(1e-5, 2e-4)}
SETTINGS.update(SLOW_LORA_GA)
# One clipping norm over both branches lets LoRA-GA's gradient (5-10x BOFT's) set the scale of BOFT's steps;
# clipped per branch (each its own learning-rate group), BOFT's branch is clipped as BOFT alone is.
PER_BRANCH = "hybrid fixed 0.5, unit, clipped per branch (LoRA-GA 5e-5, BOFT 2e-4)"
SETTINGS[PER_BRANCH] = ("hybrid", hybrid(5e-5, 2e-4, *frozen(0.5), "train.grad_clip_per_group=true"))
# The normalized rule under per-branch clipping (which comes after the rule: it reads unclipped norms).
PER_BRANCH_RULE = "hybrid normalized, unit, clipped per branch (LoRA-GA 5e-5, BOFT 2e-4)"
SETTINGS[PER_BRANCH_RULE] = ("hybrid", hybrid(5e-5, 2e-4, *NORMALIZED_UNIT, "train.grad_clip_per_group=true"))

# (a, b): a's difference to b, reported when both ran on a seed: each hybrid (plain LoRA's start aside)
# against the better branch alone, the rule against its frozen-mean and fixed controls, plain LoRA's start
# against LoRA-GA's, the recalibrated branches against their shipped rates.
_NORMALIZED, _FIXED, _PLAIN = (next(name for name in BEST_RATES if name.startswith(start))
                               for start in ("hybrid normalized, unit", "hybrid fixed 0.5", "BOFT + plain LoRA"))
PAIRS: list[tuple[str, str]] = [
    *[(name, "boft lr 2e-4") for name in [*BEST_RATES, *SLOW_LORA_GA, PER_BRANCH, PER_BRANCH_RULE]
      if name.startswith("hybrid")],
    (PER_BRANCH, _FIXED),
    (PER_BRANCH_RULE, PER_BRANCH),
    (_NORMALIZED, FROZEN_MEAN),
    (_NORMALIZED, _FIXED),
    (_PLAIN, _NORMALIZED),
    ("lora_ga lr 5e-5", "lora_ga lr 2e-4 (shipped)"),
    ("boft lr 2e-4", "boft lr 1e-3 (shipped)"),
]
assert all(a in SETTINGS and b in SETTINGS for a, b in PAIRS), "PAIRS names a setting SETTINGS lacks"


def budget(args, data: pathlib.Path, folder: pathlib.Path) -> list[str]:
    """The overrides every setting shares."""
    return ["model.path=smollm2-135m-instruct", f"data.path={data / 'pool.tsv'}",
            f"data.eval_path={data / 'decision.tsv'}", "data.chat=false", f"data.template={TEMPLATE}",
            "data.task=classification", "data.bucket=16", "data.max_length=128", "eval.num_examples=null",
            "eval.every_steps=0", "eval.batch_size=32", "eval.generation_samples=0", "eval.before_training=false",
            f"train.steps={args.steps}", f"train.global_batch_size={args.batch}",
            f"train.warmup_steps={args.steps // 10}", "train.schedule=cosine",
            f"method.lora_ga.n_batches={args.gradient_batches}", "method.lora_ga.batch_size=2",
            f"logging.output_dir={folder}", "logging.every_steps=1", "logging.progress_bar=false",
            "checkpoint.every_steps=0", "checkpoint.keep=1", "export.peft_adapter=false", "export.merged_model=false"]


# What every setting of a method assumes unless it names it: the hybrid's YAML as the sweep began (raw rule,
# summed shares, lambda within [0.05, 0.95] after 10 warm-up steps, one clipping norm), so the settings
# keep their meaning now that configs/methods/hybrid.yaml ships the sweep's winner.
ASSUMED = {"hybrid": ("train.grad_clip_per_group=false", "method.hybrid.lambdas.rule=raw",
                      "method.hybrid.lambdas.shares=sum", "method.hybrid.lambdas.clip=[0.05,0.95]",
                      "method.hybrid.lambdas.warmup_steps=10")}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def run(name: str, seed: int, args, data: pathlib.Path, core: int | None = None) -> dict:
    """One setting and seed in its own process (on `core` alone when given), unless `--resume` finds it
    finished in `--work`."""
    method, extra = SETTINGS[name]
    folder = pathlib.Path(args.work).resolve() / slug(name) / f"seed{seed}"
    summary = folder / "summary.json"
    command = [sys.executable, "-m", "hyjax.train", f"methods/{method}", *budget(args, data, folder),
               *ASSUMED.get(method, ()), f"train.seed={seed}", f"data.shuffle_seed={seed}", *extra]
    recorded = (folder / "command.txt").read_text().split("\n")[0] if (folder / "command.txt").is_file() else None
    finished = summary.is_file() and json.loads(summary.read_text()).get("status") == "finished"
    if not (args.resume and finished and recorded == shlex.join(command[1:])):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        (folder / "command.txt").write_text(shlex.join(command[1:]) + "\n")
        pinned = ["taskset", "-c", str(core)] if core is not None else []
        with open(folder / "train.log", "w") as log:
            subprocess.run([*pinned, *command], cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT)
        shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    record = {"name": name, "seed": seed, "method": method, "overrides": extra}
    if not summary.is_file():
        tail = (folder / "train.log").read_text(errors="replace").strip().splitlines()[-5:]
        return {**record, "error": " | ".join(tail)}
    done = json.loads(summary.read_text())
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in records if "loss" in r]
    final_eval = next(r for r in reversed(records) if "eval_seconds" in r)
    return {**record, "accuracy": done["eval_after"]["accuracy"], "held_out_loss": done["eval_after"]["loss"],
            "examples": done["eval_after"].get("examples"),
            "final_train_loss": statistics.fmean(r["loss"] for r in steps[-10:]),
            "median_step_seconds": statistics.median(r["step_seconds"] for r in steps[1:] if "step_seconds" in r),
            "wall_seconds": done["wall_time_seconds"], "correct_rows": final_eval.get("eval_correct_rows"),
            "loss_curve": [r["loss"] for r in steps], **lambda_summary(steps)}


def lambda_summary(steps: list[dict]) -> dict:
    """The hybrid's lambdas over a run: mean over every logged step, weight and layer; the last step's
    mean, std and range over every weight and layer; the last step's mean per weight. Empty without them."""
    logged = [r["lambda"] for r in steps if isinstance(r.get("lambda"), dict)]
    if not logged:
        return {}
    every = lambda record: np.concatenate([np.ravel(v) for v in record.values()])  # noqa: E731
    last = every(logged[-1])
    return {"lambda_run_mean": float(np.mean([every(r).mean() for r in logged])),
            "lambda_end_mean": float(last.mean()), "lambda_end_std": float(last.std()),
            "lambda_end_range": [float(last.min()), float(last.max())],
            "lambda_end_per_weight": {path: float(np.mean(v)) for path, v in logged[-1].items()}}


# ------------------------------------------------------------------------------------------ report


def by_setting(runs: list[dict]) -> dict[str, dict[int, dict]]:
    out: dict[str, dict[int, dict]] = {}
    for r in runs:
        if "error" not in r:
            out.setdefault(r["name"], {})[r["seed"]] = r
    return out


def paired(ours: dict[int, dict], theirs: dict[int, dict]) -> str:
    """`+0.4 [-0.1, +0.8] (seeds 0,1,2)`: the mean over shared seeds of ours - theirs, in points."""
    seeds = sorted(s for s in ours if s in theirs and ours[s].get("correct_rows") and theirs[s].get("correct_rows"))
    if not seeds:
        return ""
    mean, low, high = bootstrap_difference([ours[s]["correct_rows"] for s in seeds],
                                           [theirs[s]["correct_rows"] for s in seeds])
    return f"{100 * mean:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}] ({','.join(map(str, seeds))})"


def markdown(report: dict) -> str:
    s, d = report["settings"], report["decision_set"]
    runs = by_setting(report["runs"])
    baseline = runs.get(BASELINE, {})
    lines = [f"# The hybrid's rule and rates, its branches and LoRA on SST-2 sentences held out of train "
             f"({report['date']})", "",
             f"{report['machine']['cpu_model']}, {report['machine']['cores']} cores; "
             f"{sum(r.get('wall_seconds', 0) for r in report['runs']) / 60:.0f} minutes of runs. "
             f"Last command: `{report['command']}`.", "",
             f"Decision set (`bench/decision_set.py`, seed {d['settings']['seed']}): {d['held_out']} whole "
             f"sentences of train.tsv (8+ words ending in . ! ?; median {d['decision']['median_words']:.0f} words, "
             f"{100 * d['decision']['positive']:.0f}% positive), never dev. Training pool: the other "
             f"{d['pool']:,} rows, after removing {d['removed'].get('phrase_of_held_out', 0):,} phrases of "
             f"held-out sentences and {d['removed'].get('contains_held_out', 0):,} rows containing one.", "",
             f"Each run: {s['steps']} steps of {s['batch']} rows drawn from the pool, prompt {TEMPLATE!r}, AdamW, "
             f"cosine schedule with {s['steps'] // 10} warm-up steps; start-up gradients of LoRA-GA and the hybrid "
             f"from {s['gradient_batches']} batches of 2. Seed: `train.seed` and `data.shuffle_seed`. "
             f"Δ vs {BASELINE}: the mean over the seeds both ran of the paired accuracy difference, [95% interval] "
             "from resampling the held-out rows. Train loss: mean of the last 10 steps. lambda (the BOFT branch's "
             "share): mean over the run's steps and every weight and layer; at the end, mean ± std over the "
             "210 projections [min, max].", "",
             f"| setting | accuracy mean ± std | seed: accuracy | Δ vs {BASELINE} [95%] (seeds) | held-out loss "
             "| train loss | lambda run mean | lambda at the end | wall s |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | --- | ---: |"]
    for name in report["order"]:
        mine = runs.get(name)
        if not mine:
            continue
        values = [r["accuracy"] for r in mine.values()]
        spread = f"± {statistics.stdev(values):.3f}" if len(values) > 1 else "(1 seed)"
        seeds = ", ".join(f"{seed}: {r['accuracy']:.3f}" for seed, r in sorted(mine.items()))
        versus = "-" if name == BASELINE else paired(mine, baseline)
        first = next(iter(mine.values()))
        lam_run = lam_end = ""
        if "lambda_run_mean" in first:
            lam_run = f"{statistics.fmean(r['lambda_run_mean'] for r in mine.values()):.2f}"
            lam_end = "; ".join(f"{r['lambda_end_mean']:.2f} ± {r['lambda_end_std']:.2f} "
                                f"[{r['lambda_end_range'][0]:.2f}, {r['lambda_end_range'][1]:.2f}]"
                                for _, r in sorted(mine.items()))
        lines.append(f"| {name} | {statistics.fmean(values):.3f} {spread} | {seeds} | {versus} | "
                     f"{statistics.fmean(r['held_out_loss'] for r in mine.values()):.3f} | "
                     f"{statistics.fmean(r['final_train_loss'] for r in mine.values()):.3f} | {lam_run} | {lam_end} | "
                     f"{statistics.fmean(r['wall_seconds'] for r in mine.values()):.0f} |")
    shown = [(a, b) for a, b in PAIRS if runs.get(a) and runs.get(b) and paired(runs[a], runs[b])]
    if shown:
        lines += ["", "Paired comparisons (accuracy points, [95% interval], seeds):", "",
                  "| setting | against | difference |", "| --- | --- | ---: |"]
        lines += [f"| {a} | {b} | {paired(runs[a], runs[b])} |" for a, b in shown]
    failed = [r for r in report["runs"] if "error" in r]
    if failed:
        lines += ["", "Failed runs:", ""] + [f"- {r['name']} seed {r['seed']}: {r['error'][:300]}" for r in failed]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="setting names or their folder names, separated by ';' (default: all)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds, each a run of every setting")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rows", type=int, default=1000, help="whole sentences held out (the decision set)")
    parser.add_argument("--gradient-batches", type=int, default=64, help="batches of 2 of the start-up gradient")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--work", default="runs/bench-hybrid-sweep")
    parser.add_argument("--workers", type=int, default=1, help="runs at a time, each on a core of its own")
    parser.add_argument("--resume", action="store_true", help="keep the runs recorded in --out or finished in --work")
    args = parser.parse_args()
    by_slug = {slug(name): name for name in SETTINGS}
    names = [by_slug.get(n.strip(), n.strip()) for n in args.only.split(";")] if args.only else list(SETTINGS)
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        parser.error(f"unknown settings {unknown}; known: {list(SETTINGS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    data = decision_set.ensure(pathlib.Path(args.work).resolve() / "decision_set", args.rows)
    settings = {"steps": args.steps, "batch": args.batch, "rows": args.rows,
                "gradient_batches": args.gradient_batches}
    out = pathlib.Path(args.out)
    previous = json.loads((out / "hybrid_sweep.json").read_text()) \
        if args.resume and (out / "hybrid_sweep.json").is_file() else {}
    kept = [r for r in previous.get("runs", []) if previous.get("settings") == settings and "error" not in r
            and r["name"] in SETTINGS and r["overrides"] == SETTINGS[r["name"]][1]]
    report = {"command": "python bench/hybrid_sweep.py " + shlex.join(sys.argv[1:]), "settings": settings,
              "decision_set": json.loads((data / "decision_set.json").read_text()), "order": list(SETTINGS),
              "runs": kept}
    todo = [(name, seed) for seed in seeds for name in names
            if not any(r["name"] == name and r["seed"] == seed for r in kept)]
    print(f"{len(todo)} runs ({len(seeds) * len(names) - len(todo)} kept), {args.workers} at a time", flush=True)
    cores = queue.Queue()
    for core in (sorted(os.sched_getaffinity(0))[:args.workers] if args.workers > 1 else [None]):
        cores.put(core)
    lock = threading.Lock()

    def one(name: str, seed: int) -> None:
        core = cores.get()
        print(f"{name} seed {seed} ..." + (f" (core {core})" if core is not None else ""), flush=True)
        try:
            result = run(name, seed, args, data, core)
        finally:
            cores.put(core)
        result["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        result["loadavg_end"] = os.getloadavg()
        with lock:
            report["runs"] = [r for r in report["runs"] if (r["name"], r["seed"]) != (name, seed)] + [result]
            shown = {k: v for k, v in result.items() if k not in ("overrides", "correct_rows", "loss_curve",
                                                                   "lambda_end_per_weight")}
            print(f"    {json.dumps(shown)}", flush=True)
            write(out, report)

    with concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
        for future in [pool.submit(one, name, seed) for name, seed in todo]:
            future.result()
    write(out, report)
    print((out / "hybrid_sweep.md").read_text())


def write(out: pathlib.Path, report: dict) -> None:
    report = {**report, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": {"cpu_model": cpu_model(), "cores": cores(), "python": platform.python_version()}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "hybrid_sweep.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "hybrid_sweep.md").write_text(markdown(report))


if __name__ == "__main__":
    main()
