"""Benchmark: what each fine-tuning method learns in a fixed budget, on SST-2 and GSM8K.

    python bench/quality.py [--methods a,b] [--tasks sst2,gsm8k] [--seeds 0,1,2] [--gsm8k-seeds 0]
                            [--steps N] [--gsm8k-steps N] [--eval-examples N] [--gsm8k-eval-examples N]
                            [--out bench/results] [--work DIR] [--resume]

Every method (full, lora, lora_ga, oft, boft, unitary, hybrid, zo_fo, hybrid_lora) fine-tunes the real
SmolLM2-135M-Instruct as a job does (`python -m hyjax.train methods/<name> key=value ...`), each run in its
own process, under one budget per task that is the same for every method (steps, batch, max_length,
packing, warmup, training rows, evaluation examples); only the learning rate is each method's own
(its config's, unless `--lr`). LoRA-GA's, the hybrid's and Hybrid-LoRA's start-up gradient is averaged
over `--gradient-batches` batches of 2 (their configs say 64 and 16; too slow for this CPU budget).

- SST-2: train on `sst2/train.tsv` (the first `--sst2-rows` rows), accuracy (answer log-likelihood of
  " negative" / " positive") on the first `--eval-examples` rows of `dev.tsv`; seeds `--seeds`
  (`train.seed` and `data.shuffle_seed`), reported as mean, sample std and [min, max].
- GSM8K: train on `gsm8k/train.jsonl` less a held-out slice of `--gsm8k-eval-examples` rows
  (the config's own `data.eval_count`, drawn by `data.shuffle_seed`, so each seed has its own slice
  and every method sees the same one), exact match of the final number after greedy generation of at
  most `--max-new-tokens` tokens; seeds `--gsm8k-seeds`.

The pretrained model's score comes from the before-training evaluation of the first run of each task
(only that run evaluates before training; its wall time is reported without it). Per run: the final
evaluation, wall time and peak host memory (the run's `summary.json`), the training loss of every step
(`metrics.jsonl`). Writes `quality.json`, `quality.md` and `quality_loss_curves.png` (training loss of
every method, seed 0, one panel per task) under `--out`; runs live under `--work`, and `--resume`
keeps every run whose `summary.json` there says finished, so a stopped benchmark continues where it was
(an unfinished run starts again from scratch, so that its time and memory are whole).

Duration of the defaults: 49 minutes on this quiet 2-core CPU (AMD EPYC, jax 0.10.2, one run at a time;
about 32 for the 27 SST-2 runs, 17 for the 9 GSM8K runs); each run's wall time, step time and peak memory are
in `results/quality.md`. At these budgets the SST-2 comparison resolves differences of roughly 10 accuracy
points (64 dev rows: a standard error of about 6 points), and GSM8K exact match stays near 0 (SmolLM2-135M
scores 0 before training; about half the worked solutions are longer than 128 tokens): its held-out loss is
the finer signal. For larger budgets raise `--steps`, `--eval-examples` (872: all of dev), `--gsm8k-steps`,
`--gsm8k-eval-examples` and `--max-new-tokens`. Run it when nothing else uses the CPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import shutil
import statistics
import subprocess
import sys
import time

from machine import cores, cpu_model

PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = PROJECT_ROOT.parent / "shared" / "data"
SST2_TRAIN, SST2_DEV = DATA / "sst2" / "train.tsv", DATA / "sst2" / "dev.tsv"
GSM8K_TRAIN = DATA / "gsm8k" / "train.jsonl"
METHODS = ("full", "lora", "lora_ga", "oft", "boft", "unitary", "hybrid", "zo_fo", "hybrid_lora")
TASKS = ("sst2", "gsm8k")
METRIC = {"sst2": "accuracy", "gsm8k": "exact_match"}
GRADIENT_METHODS = {"lora_ga": "lora_ga", "hybrid": "lora_ga", "hybrid_lora": "hybrid_lora"}


# ------------------------------------------------------------------------------------------- runs


def budget(task: str, args) -> dict:
    """The fixed budget of `task`, the same for every method."""
    if task == "sst2":
        steps = args.steps
        return {"data": str(SST2_TRAIN), "eval_data": f"{SST2_DEV} (first {args.eval_examples} rows)",
                "steps": steps, "batch": args.batch, "max_length": args.max_length, "packing": True,
                "warmup_steps": steps // 10, "train_rows": args.sst2_rows, "eval_examples": args.eval_examples,
                "metric": "accuracy (answer log-likelihood of the two verbalized labels)", "chat": False,
                "seeds": args.seeds}
    steps = args.gsm8k_steps
    return {"data": str(GSM8K_TRAIN), "eval_data": f"{args.gsm8k_eval_examples} rows held out of the training "
            "file (data.eval_count, drawn by data.shuffle_seed = seed)", "steps": steps, "batch": args.gsm8k_batch,
            "max_length": args.gsm8k_max_length, "packing": False, "warmup_steps": steps // 10,
            "train_rows": "all less the held-out slice", "eval_examples": args.gsm8k_eval_examples,
            "max_new_tokens": args.max_new_tokens, "metric": "exact match of the final number (greedy generation)",
            "chat": "auto", "seeds": args.gsm8k_seeds}


def overrides(method: str, task: str, seed: int, args, run_dir: pathlib.Path, eval_before: bool) -> list[str]:
    """The run's config overrides on top of `methods/<method>`."""
    b = budget(task, args)
    items = [
        "model.path=smollm2-135m-instruct",
        f"train.steps={b['steps']}", f"train.global_batch_size={b['batch']}", f"train.warmup_steps={b['warmup_steps']}",
        f"train.seed={seed}", f"data.shuffle_seed={seed}",
        f"data.max_length={b['max_length']}", f"data.packing={str(b['packing']).lower()}",
        f"eval.num_examples={b['eval_examples']}", "eval.generation_samples=0",
        f"eval.before_training={str(eval_before).lower()}",
        f"logging.output_dir={run_dir}", "logging.every_steps=1", "logging.progress_bar=false",
        "checkpoint.every_steps=0", "checkpoint.keep=1",
        "export.peft_adapter=false", "export.merged_model=false",
        f"method.lora_ga.n_batches={args.gradient_batches}", f"method.hybrid_lora.n_batches={args.gradient_batches}",
    ]
    if task == "sst2":
        items += [f"data.path={SST2_TRAIN}", f"data.eval_path={SST2_DEV}", "data.task=classification",
                  "data.chat=false", "data.bucket=16", f"data.max_rows={args.sst2_rows}"]
    else:
        items += [f"data.path={GSM8K_TRAIN}", "data.task=math", f"data.eval_count={args.gsm8k_eval_examples}",
                  "data.bucket=32", f"eval.max_new_tokens={args.max_new_tokens}"]
    if args.lr is not None:
        items.append(f"train.learning_rate={args.lr}")
    return items + list(args.set)


def run_dir(args, task: str, method: str, seed: int) -> pathlib.Path:
    return pathlib.Path(args.work).resolve() / task / method / f"seed{seed}"


def launch(method: str, task: str, seed: int, args, eval_before: bool) -> dict:
    """Runs one job in its own process (its log in `train.log`) unless `--resume` finds it finished."""
    folder = run_dir(args, task, method, seed)
    summary = folder / "summary.json"
    if args.resume and summary.is_file() and json.loads(summary.read_text()).get("status") == "finished":
        return {"reused": True, **collect(folder)}
    if folder.exists():  # a fresh measurement: hyjax would otherwise resume from the old checkpoint
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    command = [sys.executable, "-m", "hyjax.train", f"methods/{method}",
               *overrides(method, task, seed, args, folder, eval_before)]
    (folder / "command.txt").write_text(" ".join(command) + "\n")
    with open(folder / "train.log", "w") as log:
        code = subprocess.run(command, cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
    if not args.keep_checkpoints:
        shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    result = collect(folder)
    if code != 0 and "error" not in result:
        result["error"] = f"exit code {code}"
    if "error" in result:
        tail = (folder / "train.log").read_text(errors="replace").strip().splitlines()[-6:]
        result["error"] += ": " + " | ".join(tail)
    return {"reused": False, **result}


def collect(folder: pathlib.Path) -> dict:
    """What a finished run left: its summary, the loss of every step and its evaluations' durations."""
    summary_file = folder / "summary.json"
    if not summary_file.is_file():
        return {"error": f"no summary.json in {folder}"}
    summary = json.loads(summary_file.read_text())
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_seconds" in r]
    before = summary.get("eval_before", {})
    after = summary.get("eval_after", {})
    before_s = evals[0]["eval_seconds"] if before and evals else 0.0
    result = {
        "status": summary.get("status"), "steps": summary.get("steps"), "skipped_steps": summary.get("skipped_steps"),
        "trainable_parameters": summary.get("trainable_parameters"),
        "zeroth_order_parameters": summary.get("zeroth_order_parameters"),
        "accuracy": after.get("accuracy"), "exact_match": after.get("exact_match"), "eval_loss": after.get("loss"),
        "eval_examples": after.get("examples"), "eval_before": before or None,
        "wall_time_seconds": summary["wall_time_seconds"],
        "wall_time_without_eval_before_seconds": summary["wall_time_seconds"] - before_s,
        "eval_before_seconds": before_s if before else None,
        "eval_after_seconds": evals[-1]["eval_seconds"] if evals and after else None,
        "train_seconds": sum(r["step_seconds"] for r in steps),
        "first_step_seconds": steps[0]["step_seconds"] if steps else None,
        "median_step_seconds": statistics.median(r["step_seconds"] for r in steps[1:]) if len(steps) > 1 else None,
        "peak_host_memory_mib": summary["peak_host_memory_mib"],
        "loss_curve": [[r["step"], r["loss"]] for r in steps],
        "run_dir": str(folder),
    }
    if summary.get("status") != "finished":
        result["error"] = f"run status {summary.get('status')!r}"
    return result


# --------------------------------------------------------------------------------------- reporting


def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def aggregate(runs: list[dict], task: str, methods: list[str]) -> dict:
    """Per method: the metric's mean, std and range over seeds, and the mean cost of a run."""
    table = {}
    for method in methods:
        rows = [r for r in runs if r["task"] == task and r["method"] == method]
        good = [r for r in rows if "error" not in r and r.get(METRIC[task]) is not None]
        entry = {"runs": len(rows), "failed": len(rows) - len(good)}
        if good:
            entry[METRIC[task]] = spread([r[METRIC[task]] for r in good])
            entry["eval_loss"] = spread([r["eval_loss"] for r in good])
            for key in ("wall_time_without_eval_before_seconds", "train_seconds", "median_step_seconds"):
                values = [r[key] for r in good if r.get(key) is not None]
                entry[key] = statistics.fmean(values) if values else None
            entry["peak_host_memory_mib"] = max(r["peak_host_memory_mib"] for r in good)
            entry["trainable_parameters"] = good[0]["trainable_parameters"]
        table[method] = entry
    return table


def pretrained_scores(runs: list[dict]) -> dict:
    scores = {}
    for run in runs:
        if run.get("eval_before") and run["task"] not in scores:
            scores[run["task"]] = {**run["eval_before"], "from_run": f"{run['method']} seed {run['seed']}"}
    return scores


def plot_curves(runs: list[dict], tasks: list[str], path: pathlib.Path) -> pathlib.Path | None:
    """Training loss per step of every method's lowest-seed run, one panel per task (moving average)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    panels = []
    for task in tasks:
        chosen = {}
        for run in sorted((r for r in runs if r["task"] == task and r.get("loss_curve")), key=lambda r: r["seed"]):
            chosen.setdefault(run["method"], run)
        if chosen:
            panels.append((task, chosen))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.5), squeeze=False)
    for ax, (task, chosen) in zip(axes[0], panels):
        window = 1
        for method, run in chosen.items():
            steps, losses = (np.asarray(v, float) for v in zip(*run["loss_curve"]))
            window = max(1, len(losses) // 12)
            smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
            ax.plot(steps[window - 1:], smooth, label=method, linewidth=1.4)
        seeds = sorted({run["seed"] for run in chosen.values()})
        smoothing = f"moving average of {window} steps" if window > 1 else "every step"
        ax.set_title(f"{task}: training loss, seed {', '.join(map(str, seeds))} ({smoothing})", fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("answer-token cross-entropy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _fmt(value, spec: str) -> str:
    return "-" if value is None else f"{value:{spec}}"


def markdown(report: dict) -> str:
    m, s = report["machine"], report["settings"]
    lines = [
        "# Fine-tuning quality per method in a fixed budget: SmolLM2-135M-Instruct on SST-2 and GSM8K", "",
        f"{m['cpu_model']}, {m['cores_used']} cores, jax {m['jax']} ({m['backend']}); {report['date']}; load "
        f"average {m['loadavg_start'][0]:.1f} at start, {m['loadavg_end'][0]:.1f} at end; "
        f"{report['total_minutes']:.0f} minutes. Command: `{report['command']}`.", "",
        "Each run is `python -m hyjax.train methods/<method>` in its own process with the same budget per task; "
        "the learning rate is each method's config's (" + ", ".join(f"{k} {v:g}" for k, v in s["learning_rates"]
                                                                 .items()) + "). LoRA-GA's, the hybrid's and "
        f"Hybrid-LoRA's start-up gradient: {s['gradient_batches']} batches of 2 (configs: 64 and 16). Wall time: "
        "the whole run (start-up, model load, tokenization, start-up gradient, compilation, steps, final "
        "evaluation, checkpoint), the before-training evaluation excluded; train s: the steps (the first "
        "includes compilation); peak MiB: the run process's resident high-water mark (ru_maxrss), largest "
        "over seeds.", "",
    ]
    pretrained = report["pretrained"]
    for task in report["tasks"]:
        b = s["tasks"][task]
        metric = METRIC[task]
        table = report["summary"][task]
        if task == "sst2":
            lines += [f"## SST-2: dev accuracy after {b['steps']} steps of {b['batch']} packed rows x "
                      f"{b['max_length']} tokens, seeds {', '.join(map(str, b['seeds']))}", "",
                      f"Training: the first {b['train_rows']} rows of train.tsv; evaluation: {b['eval_data']}; cosine "
                      f"schedule, {b['warmup_steps']} warm-up steps."]
        else:
            lines += [f"## GSM8K: held-out exact match after {b['steps']} steps of {b['batch']} rows x "
                      f"{b['max_length']} tokens, seeds {', '.join(map(str, b['seeds']))}", "",
                      f"Evaluation: {b['eval_data']}; greedy generation of at most {b['max_new_tokens']} new "
                      "tokens, the number after `####` compared; cosine schedule, "
                      f"{b['warmup_steps']} warm-up steps. Eval loss: answer-token cross-entropy of the worked "
                      "solutions of the held-out slice."]
        if task in pretrained:
            p = pretrained[task]
            lines += ["", f"Pretrained (before training, {p['from_run']}'s evaluation): {metric.replace('_', ' ')} "
                          f"{p.get(metric, float('nan')):.3f}, eval loss {p.get('loss', float('nan')):.3f}."]
        lines += ["", f"| method | {metric.replace('_', ' ')} mean ± std | [min, max] | eval loss | wall s | train s "
                      "| s/step | peak MiB | trainable params |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for method, e in table.items():
            if metric not in e:
                lines.append(f"| {method} | failed ({e['failed']} of {e['runs']} runs) |" + " |" * 7)
                continue
            v, loss = e[metric], e["eval_loss"]
            failed = f" ({e['failed']} failed)" if e["failed"] else ""
            lines.append(
                f"| {method} | {v['mean']:.3f} ± {v['std']:.3f} (n={v['n']}){failed} | [{v['min']:.3f}, {v['max']:.3f}]"
                f" | {loss['mean']:.3f} | {_fmt(e['wall_time_without_eval_before_seconds'], '.0f')} | "
                f"{_fmt(e['train_seconds'], '.0f')} | {_fmt(e['median_step_seconds'], '.2f')} | "
                f"{e['peak_host_memory_mib']:,.0f} | {e['trainable_parameters']:,} |")
        lines.append("")
    errors = [r for r in report["runs"] if "error" in r]
    if errors:
        lines += ["Failed runs:", ""] + [f"- {r['task']} {r['method']} seed {r['seed']}: {r['error'][:300]}"
                                         for r in errors] + [""]
    if report.get("loss_curves"):
        lines += [f"Training loss curves: `{pathlib.Path(report['loss_curves']).name}`.", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- main


def run_all(args) -> dict:
    import jax

    from hyjax.config import load_config

    start = time.perf_counter()
    machine = {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "cores_used": cores(),
               "loadavg_start": os.getloadavg()}
    rates = {m: load_config(f"methods/{m}", [f"train.learning_rate={args.lr}"] if args.lr else []).train.learning_rate
             for m in args.methods}
    plan = [(task, method, seed) for task in args.tasks for method in args.methods
            for seed in (args.seeds if task == "sst2" else args.gsm8k_seeds)]
    first = {task: next((p for p in plan if p[0] == task), None) for task in args.tasks}
    print(f"{len(plan)} runs ({', '.join(args.methods)} on {', '.join(args.tasks)}); work folder {args.work}", flush=True)
    runs = []
    for i, (task, method, seed) in enumerate(plan, 1):
        tick = time.perf_counter()
        print(f"[{i}/{len(plan)}] {task} {method} seed {seed} ...", flush=True)
        result = launch(method, task, seed, args, eval_before=first[task] == (task, method, seed))
        runs.append({"task": task, "method": method, "seed": seed, **result})
        if "error" in result:
            print(f"    FAILED after {time.perf_counter() - tick:.0f} s: {result['error'][:400]}", flush=True)
            continue
        before = result["eval_before"]
        before = f" (before training {before[METRIC[task]]:.3f})" if before else ""
        print(f"    {METRIC[task]} {result[METRIC[task]]:.3f}{before}, eval loss {result['eval_loss']:.3f}, "
              f"last loss {result['loss_curve'][-1][1]:.3f}, wall {result['wall_time_seconds']:.0f} s, "
              f"peak {result['peak_host_memory_mib']:,.0f} MiB" + (" (reused)" if result["reused"] else ""),
              flush=True)
    machine.update(loadavg_end=os.getloadavg(), python=platform.python_version(), jax=jax.__version__,
                   backend=jax.default_backend())
    return {
        "benchmark": "quality: each method's fine-tuning result in a fixed budget (SST-2 accuracy, GSM8K exact match)",
        "command": "python bench/quality.py " + " ".join(args.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "total_minutes": (time.perf_counter() - start) / 60,
        "tasks": args.tasks,
        "settings": {"model": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to float32)",
                     "methods": args.methods, "tasks": {t: budget(t, args) for t in args.tasks},
                     "learning_rates": rates, "lr_override": args.lr, "gradient_batches": args.gradient_batches,
                     "gradient_batch_size": 2, "gradient_methods": {m: GRADIENT_METHODS[m] for m in args.methods
                                                                    if m in GRADIENT_METHODS},
                     "optimizer": "AdamW (weight decay 0, clip 1.0), cosine schedule", "extra_overrides": args.set,
                     "work": str(pathlib.Path(args.work).resolve())},
        "machine": machine,
        "pretrained": pretrained_scores(runs),
        "summary": {task: aggregate(runs, task, args.methods) for task in args.tasks},
        "runs": runs,
    }


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {','.join(METHODS)}")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated, of sst2,gsm8k")
    parser.add_argument("--seeds", default="0,1,2", help="SST-2 seeds (train.seed and data.shuffle_seed)")
    parser.add_argument("--gsm8k-seeds", default="0", help="GSM8K seeds")
    parser.add_argument("--steps", type=int, default=12, help="SST-2 optimizer steps")
    parser.add_argument("--gsm8k-steps", type=int, default=10, help="GSM8K optimizer steps")
    parser.add_argument("--batch", type=int, default=8, help="SST-2 packed rows per step")
    parser.add_argument("--gsm8k-batch", type=int, default=4, help="GSM8K rows (one problem each) per step")
    parser.add_argument("--max-length", type=int, default=64, help="SST-2 tokens per packed row")
    parser.add_argument("--gsm8k-max-length", type=int, default=256, help="GSM8K tokens per row (no packing)")
    parser.add_argument("--sst2-rows", type=int, default=4000, help="SST-2 training rows read (the file's first)")
    parser.add_argument("--eval-examples", type=int, default=64, help="SST-2 dev rows evaluated (872: all)")
    parser.add_argument("--gsm8k-eval-examples", type=int, default=16, help="GSM8K rows held out and evaluated")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="GSM8K greedy generation budget")
    parser.add_argument("--gradient-batches", type=int, default=8,
                        help="batches of 2 for LoRA-GA's, the hybrid's and Hybrid-LoRA's start-up gradient")
    parser.add_argument("--lr", type=float, help="learning rate of every method (default: each config's own)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override for every run (repeatable)")
    parser.add_argument("--out", default="bench/results", help="folder of quality.json, .md and the loss-curve PNG")
    parser.add_argument("--work", default="runs/bench-quality", help="folder of the runs")
    parser.add_argument("--resume", action="store_true", help="keep the runs of --work that have a summary.json")
    parser.add_argument("--keep-checkpoints", action="store_true", help="keep each run's final checkpoint")
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    args.tasks = [t for t in args.tasks.split(",") if t]
    args.seeds, args.gsm8k_seeds = _ints(args.seeds), _ints(args.gsm8k_seeds)
    unknown = [m for m in args.methods if m not in METHODS] + [t for t in args.tasks if t not in TASKS]
    if unknown:
        parser.error(f"unknown {unknown}; methods: {list(METHODS)}, tasks: {list(TASKS)}")
    small = {k: v for k, v in (("--steps", args.steps), ("--gsm8k-steps", args.gsm8k_steps), ("--batch", args.batch),
                               ("--gsm8k-batch", args.gsm8k_batch),
                               ("--eval-examples", args.eval_examples), ("--gradient-batches", args.gradient_batches),
                               ("--gsm8k-eval-examples", args.gsm8k_eval_examples),
                               ("--max-new-tokens", args.max_new_tokens)) if v < 1}
    if small or not args.seeds or not args.gsm8k_seeds:
        parser.error(f"need positive values and at least one seed (got {small or 'no seeds'})")
    return args


def main() -> None:
    args = parse_args()
    for path in (SST2_TRAIN, SST2_DEV, GSM8K_TRAIN):
        if not path.is_file():
            raise SystemExit(f"{path} is missing (see ../shared/data/README.md)")
    report = run_all(args)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    png = plot_curves(report["runs"], args.tasks, out / "quality_loss_curves.png")
    report["loss_curves"] = str(png) if png else None
    (out / "quality.json").write_text(json.dumps(report, indent=1) + "\n")
    text = markdown(report)
    (out / "quality.md").write_text(text)
    print(text)
    failed = [f"{r['task']} {r['method']} seed {r['seed']}" for r in report["runs"] if "error" in r]
    if failed:
        raise SystemExit(f"failed: {failed} (see {out / 'quality.json'})")


if __name__ == "__main__":
    main()
