"""Benchmark: what each fine-tuning method learns at a real budget, beside HF PEFT LoRA at the same one.

    python bench/quality.py [--methods a,b] [--seeds 0,1,2] [--tasks sst2,gsm8k] [--gsm8k-methods a,b]
                            [--steps 150] [--batch 16] [--eval-every 50] [--gsm8k-steps 200]
                            [--out bench/results] [--work runs/bench-quality] [--resume] [--rerun a,b]
                            [--workers 1]

SmolLM2-135M-Instruct, fine-tuned as a user's job does (`python -m hyjax.train methods/<method>` with the
budget's overrides, each run in its own process), every setting not in the budget from the method's YAML
(its learning rate too).

- **SST-2** (every method, `--seeds`): each step 16 rows drawn from the whole training file, prompt
  "Review: {text}\\nSentiment:", loss on the answer tokens, AdamW with cosine schedule and 10% warm-up,
  150 steps; accuracy (answer log-likelihood of " negative" / " positive") on the whole dev set (872
  rows), every `--eval-every` steps and at the end. `train.seed` and `data.shuffle_seed` are the seed,
  so a seed changes the initialisation, the data order and what is drawn from data (start-up gradients).
  Beside ours: `peft_lora`, HF PEFT LoRA (r 8, alpha 16, the seven projections, LoRA's learning rate and
  schedule) on the very rows of each seed's hyjax run, its merged model scored by hyjax's evaluation
  (`bench/peft_reference.py`); and `hybrid_lora_random`, Hybrid-LoRA with the same number of fully
  trained modules drawn at random (`method.hybrid_lora.score=random`, a new draw per seed), paired against
  Hybrid-LoRA's scored choice as well as against LoRA.
- **GSM8K** (`--gsm8k-methods`, `--gsm8k-seeds`): 200 steps of 4 problems (256 tokens), answer loss and
  exact match of the final number (greedy, `--max-new-tokens`) on 200 problems held out of the training
  file. The answer loss is the main metric: a 135M model solves almost none.

Reported per method: mean, sample std and each seed's score; the paired difference to hyjax LoRA per
seed and its mean, with a 95% bootstrap interval over dev rows (the rows resampled, the same draw for
both methods and every seed: the runs share the dev set, so the pairing removes the rows' difficulty);
the train seconds (sum of step times) and steps until the periodic evaluation first reaches PEFT LoRA's
mean final accuracy; wall time, peak host memory. Curves (training loss, dev accuracy per evaluation):
`quality_curves.png`.

`--resume` keeps every run recorded in `--out`/quality.json whose settings (the resolved config less paths and
logging, or PEFT's budget) equal this invocation's (options added to the config since, at their defaults,
aside), so the benchmark continues across sittings and machines from its committed JSON (`--rerun` runs the
named ones again all the same, e.g. for step times on this machine); the JSON and table are rewritten after
every run, and a run that finished in `--work` without being recorded (the script stopped first) is read from
its folder rather than run again. Run it when nothing else uses the CPU: one run takes 11-50 minutes on the
2-core machine (HF PEFT LoRA 11 and the hybrid 24 minutes on a quiet day, the sweep's LoRA 41 beside other
work and hybrid 38 on a slow day; step times there vary up to 4x from day to day), so the whole default set
(30 SST-2 runs, 3 GSM8K runs) takes 10-25 hours, over several sittings; `--methods` and `--seeds` choose a
part. `--workers 2` runs two at a time, each on a core of its own (1.45x the runs an hour on 2 cores): their
accuracies and losses are those of a one-at-a-time run, their step times compare only with other one-core runs
(each record says its cores).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import hashlib
import json
import os
import pathlib
import platform
import queue
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from machine import cores, cpu_model

PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = PROJECT_ROOT.parent / "shared" / "data"
SST2_TRAIN, SST2_DEV = DATA / "sst2" / "train.tsv", DATA / "sst2" / "dev.tsv"
GSM8K_TRAIN = DATA / "gsm8k" / "train.jsonl"
TEMPLATE = "Review: {text}\nSentiment:"
METHODS = ("full", "lora", "lora_ga", "oft", "boft", "unitary", "hybrid", "zo_fo", "hybrid_lora")
# name -> (runner, method YAML, extra overrides)
VARIANTS = {**{m: ("hyjax", m, ()) for m in METHODS},
            "hybrid_lora_random": ("hyjax", "hybrid_lora", ("method.hybrid_lora.score=random",)),
            "peft_lora": ("peft", "lora", ())}
TASKS = ("sst2", "gsm8k")
METRIC = {"sst2": "accuracy", "gsm8k": "eval_loss"}
BASELINE, REFERENCE, FULL = "lora", "peft_lora", "full"
SCORED, RANDOM_DRAWS = "hybrid_lora", "hybrid_lora_random"
BOOTSTRAP_DRAWS = 4000


# ------------------------------------------------------------------------------------------ budget


def overrides(task: str, seed: int, args, output: pathlib.Path, eval_before: bool) -> list[str]:
    """The budget of `task` as config overrides, the same for every method and seed but the seed."""
    common = ["model.path=smollm2-135m-instruct", f"train.seed={seed}", f"data.shuffle_seed={seed}",
              "train.schedule=cosine", "eval.generation_samples=0", f"eval.before_training={str(eval_before).lower()}",
              f"logging.output_dir={output}", "logging.every_steps=1", "logging.progress_bar=false",
              "checkpoint.every_steps=0", "checkpoint.keep=1", "export.peft_adapter=false",
              "export.merged_model=false", f"method.lora_ga.n_batches={args.gradient_batches}",
              f"method.hybrid_lora.n_batches={args.selection_batches}"]
    if task == "sst2":
        return common + [
            f"data.path={SST2_TRAIN}", f"data.eval_path={SST2_DEV}", "data.task=classification", "data.chat=false",
            f"data.template={TEMPLATE}", "data.bucket=16", "data.max_length=128", f"train.steps={args.steps}",
            f"train.global_batch_size={args.batch}", f"train.warmup_steps={args.steps // 10}",
            f"eval.num_examples={args.dev_rows or 'null'}", f"eval.every_steps={args.eval_every}",
            "eval.batch_size=32"]
    return common + [
        f"data.path={GSM8K_TRAIN}", "data.task=math", f"data.eval_count={args.gsm8k_eval_examples}", "data.bucket=32",
        "data.max_length=256", f"train.steps={args.gsm8k_steps}", f"train.global_batch_size={args.gsm8k_batch}",
        f"train.warmup_steps={args.gsm8k_steps // 10}", "eval.num_examples=null", "eval.every_steps=0",
        f"eval.max_new_tokens={args.max_new_tokens}"]


def run_config(name: str, task: str, seed: int, args, output: pathlib.Path, eval_before: bool):
    from hyjax.config import load_config

    _, method, extra = VARIANTS[name]
    return load_config(f"methods/{method}", [*overrides(task, seed, args, output, eval_before), *extra])


def settings(name: str, task: str, seed: int, args) -> dict:
    """What decides a run's result, as flat `{dotted key: value}`: its resolved config less paths, logging,
    checkpointing and export, and the runner."""
    return _flat({"runner": VARIANTS[name][0],
                  "config": _deciding(run_config(name, task, seed, args, pathlib.Path("run"), eval_before=False))})


def fingerprint(name: str, task: str, seed: int, args) -> str:
    """The hash of the settings as the first sittings recorded them (records without `settings`)."""
    config = _deciding(run_config(name, task, seed, args, pathlib.Path("run"), eval_before=False))
    text = json.dumps({"runner": VARIANTS[name][0], "config": config}, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


# Options added with a default other than what ran before them: a record without the key ran with this value.
BEFORE_THE_OPTION = {"config.method.hybrid.lambdas.rule": "raw", "config.method.hybrid.lambdas.shares": "sum"}


def still_valid(record: dict, args) -> bool:
    """Whether an earlier sitting's run stands for this invocation: its settings equal today's, keys the
    config gained since (new options) aside when they hold their defaults, so a new feature does not
    send the benchmark's hours back to the start (or hold what ran before them, `BEFORE_THE_OPTION`). A
    changed value anywhere, or a key no longer there, makes the record stale. Records of the first sittings,
    which kept only a hash, must match it."""
    name, task, seed = record["name"], record["task"], record["seed"]
    if "settings" not in record:
        return record.get("fingerprint") == fingerprint(name, task, seed, args)
    from hyjax.config import RunConfig

    now, then = settings(name, task, seed, args), _relevant(record["settings"])
    then = {**{key: value for key, value in BEFORE_THE_OPTION.items() if key in now}, **then}
    defaults = _flat({"config": RunConfig().to_dict()})
    return all(key in now and now[key] == value for key, value in then.items()) and all(
        key in then or (key in defaults and defaults[key] == value) for key, value in now.items())


# The method sub-sections each method reads (the others cannot change its result).
SECTIONS = {"full": (), "lora": ("lora",), "lora_ga": ("lora_ga",), "oft": ("boft",), "boft": ("boft",),
            "unitary": ("unitary",), "hybrid": ("boft", "lora_ga", "lora", "hybrid"), "zo_fo": ("zo_fo", "lora"),
            "hybrid_lora": ("hybrid_lora", "lora")}


def _relevant(flat: dict) -> dict:
    """Recorded settings (flat) less the keys `_deciding` leaves out today (records kept more), keys of
    sections that moved since at their new names."""
    from hyjax.config.loading import MOVED

    method = flat.get("config.method.name")
    moved = {f"config.{old}.": f"config.{new}." for old, new in MOVED.items()}  # as flat record keys
    out = {}
    for key, value in flat.items():
        for before, now in moved.items():
            key = now + key[len(before):] if key.startswith(before) else key
        parts = key.split(".")
        if parts[:3] == ["config", "eval", "every_steps"]:
            continue
        if method in SECTIONS and parts[:2] == ["config", "method"] and len(parts) > 3 \
                and parts[2] not in SECTIONS[method]:
            continue
        out[key] = value
    return out


def _deciding(config) -> dict:
    """The resolved config less what cannot change a run's result: paths, logging, checkpointing, export,
    when evaluations happen, and the method sub-sections its method does not read."""
    method = config.method.name
    config = config.to_dict()
    for section in ("logging", "checkpoint", "export"):
        config.pop(section, None)
    config["eval"].pop("before_training", None)
    config["eval"].pop("every_steps", None)
    for name in [k for k, v in config["method"].items() if isinstance(v, dict) and k not in SECTIONS[method]]:
        config["method"].pop(name)
    for key in ("path", "eval_path"):
        if config["data"].get(key):
            config["data"][key] = pathlib.Path(config["data"][key]).name
    return config


def _flat(tree: dict, prefix: str = "") -> dict:
    """Nested dicts as `{dotted key: leaf}`, leaves as JSON keeps them (tuples as lists)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.loads(json.dumps(value))
    return out


# -------------------------------------------------------------------------------------------- runs


def pinned(core: int | None) -> list[str]:
    """The command prefix that runs a process on `core` alone (nothing for None)."""
    return [] if core is None else ["taskset", "-c", str(core)]


def hyjax_command(name: str, task: str, seed: int, args, folder: pathlib.Path, eval_before: bool) -> list[str]:
    """The `python -m hyjax.train` command of one run."""
    _, method, extra = VARIANTS[name]
    return [sys.executable, "-m", "hyjax.train", f"methods/{method}", *overrides(task, seed, args, folder, eval_before),
            *extra]


def finished_in(folder: pathlib.Path, command: list[str]) -> bool:
    """Whether `folder` holds a finished run of `command` (on whichever core): with `--resume`, a run that
    finished but was not recorded (this script stopped first) is read instead of run again."""
    recorded, summary = folder / "command.txt", folder / "summary.json"
    if not (recorded.is_file() and summary.is_file()):
        return False
    text = re.sub(r"^taskset -c \d+ ", "", recorded.read_text().strip())
    return text == " ".join(command) and json.loads(summary.read_text()).get("status") == "finished"


def run_hyjax(name: str, task: str, seed: int, args, folder: pathlib.Path, eval_before: bool,
              core: int | None = None) -> dict:
    """`python -m hyjax.train` in its own process (on `core` alone when given); what its folder holds
    afterwards."""
    command = [*pinned(core), *hyjax_command(name, task, seed, args, folder, eval_before)]
    (folder / "command.txt").write_text(" ".join(command) + "\n")
    with open(folder / "train.log", "w") as log:
        code = subprocess.run(command, cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
    if code or not (folder / "summary.json").is_file():
        tail = (folder / "train.log").read_text(errors="replace").strip().splitlines()[-6:]
        return {"error": f"exit code {code}: " + " | ".join(tail)}
    return read_run(folder, eval_before)


def read_run(folder: pathlib.Path, eval_before: bool) -> dict:
    """What a finished `hyjax.train` run's folder holds: the final and periodic evaluations, times, memory."""
    summary = json.loads((folder / "summary.json").read_text())
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in records if "loss" in r]
    elapsed = {}
    for r in steps:
        elapsed[r["step"]] = elapsed.get(r["step"] - 1, 0.0) + r["step_seconds"]
    eval_records = [r for r in records if "eval_seconds" in r]
    evals = [{"step": r["step"], "accuracy": r.get("eval/accuracy"), "exact_match": r.get("eval/exact_match"),
              "eval_loss": r["eval/loss"], "train_seconds": elapsed.get(r["step"], 0.0),
              "eval_seconds": r["eval_seconds"], "generated_tokens": r.get("eval/generated_tokens"),
              "decode_steps": r.get("eval/decode_steps")} for r in eval_records]
    final = evals[-1]
    before = evals[0] if eval_before and evals and evals[0]["step"] == 0 else None
    return {"accuracy": final["accuracy"], "exact_match": final["exact_match"], "eval_loss": final["eval_loss"],
            "correct_rows": eval_records[-1].get("eval_correct_rows"),
            "evals": [e for e in evals if e["step"] > 0], "eval_before": before,
            "wall_seconds": summary["wall_time_seconds"] - (before["eval_seconds"] if before else 0.0),
            "train_seconds": elapsed[max(elapsed)], "median_step_seconds": statistics.median(
                r["step_seconds"] for r in steps[1:]), "peak_host_memory_mib": summary["peak_host_memory_mib"],
            "trainable_parameters": summary["trainable_parameters"], "skipped_steps": summary["skipped_steps"],
            "loss_curve": [r["loss"] for r in steps]}


def run_peft(name: str, task: str, seed: int, args, folder: pathlib.Path, core: int | None = None) -> dict:
    """PEFT LoRA on the rows of this seed's hyjax LoRA run, scored by hyjax (`bench/peft_reference.py`),
    in a child process of this script."""
    out = folder / "result.json"
    command = [*pinned(core), sys.executable, __file__, *args.argv, "--peft-child", str(out), "--child-seed",
               str(seed)]
    with open(folder / "train.log", "w") as log:
        code = subprocess.run(command, cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
    if code or not out.is_file():
        tail = (folder / "train.log").read_text(errors="replace").strip().splitlines()[-6:]
        return {"error": f"exit code {code}: " + " | ".join(tail)}
    return json.loads(out.read_text())


def peft_child(args) -> None:
    """The `--peft-child` process: trains, merges, scores; writes the record to `args.peft_child`."""
    import resource

    from peft_reference import hf_copy, job_rows, merged_folder, score_classification, train_peft_lora

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        config = run_config("lora", "sst2", args.child_seed, args, pathlib.Path(tmp), eval_before=False)
        steps, pad_id = job_rows(config, config.train.steps)
        hf = hf_copy(config, pathlib.Path(tempfile.gettempdir()) / "hyjax-bench-methods" / "smollm2-135m-instruct-hf")
        model, losses, seconds = train_peft_lora(hf, steps, pad_id, train=config.train, seed=args.child_seed,
                                                 threads=cores())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        eval_start = time.perf_counter()
        result = score_classification(config, merged_folder(model, pathlib.Path(tmp) / "merged"))
        eval_seconds = time.perf_counter() - eval_start
    import peft
    import torch
    import transformers

    record = {"accuracy": result.accuracy, "exact_match": None, "eval_loss": result.gold_loss,
              "correct_rows": result.correct_rows,
              "evals": [{"step": len(steps), "accuracy": result.accuracy, "exact_match": None,
                         "eval_loss": result.gold_loss, "train_seconds": sum(seconds), "eval_seconds": eval_seconds}],
              "eval_before": None, "wall_seconds": time.perf_counter() - start, "train_seconds": sum(seconds),
              "median_step_seconds": statistics.median(seconds[1:]),
              "peak_host_memory_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "trainable_parameters": trainable,
              "skipped_steps": 0, "loss_curve": losses,
              "versions": {"peft": peft.__version__, "transformers": transformers.__version__,
                           "torch": torch.__version__}}
    pathlib.Path(args.peft_child).write_text(json.dumps(record))


def launch(name: str, task: str, seed: int, args, eval_before: bool, core: int | None = None) -> dict:
    folder = pathlib.Path(args.work).resolve() / task / name / f"seed{seed}"
    if args.resume and VARIANTS[name][0] == "hyjax" and \
            finished_in(folder, hyjax_command(name, task, seed, args, folder, eval_before)):
        finished = datetime.datetime.fromtimestamp((folder / "summary.json").stat().st_mtime, datetime.timezone.utc)
        return {**read_run(folder, eval_before), "finished": finished.isoformat(timespec="seconds"),
                "loadavg_end": None, "read_from": str(folder)}
    shutil.rmtree(folder, ignore_errors=True)  # a fresh measurement: hyjax would resume an old checkpoint
    folder.mkdir(parents=True)
    if VARIANTS[name][0] == "peft":
        return run_peft(name, task, seed, args, folder, core)
    result = run_hyjax(name, task, seed, args, folder, eval_before, core)
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    return result


# ----------------------------------------------------------------------------------------- analysis


def bootstrap_difference(ours: list[str], theirs: list[str], draws: int = BOOTSTRAP_DRAWS, seed: int = 0):
    """Mean over seeds of accuracy(ours) - accuracy(theirs), and its 95% percentile interval when the dev
    rows are resampled with replacement (one resample of row indices for every seed of both).
    `ours[i]`, `theirs[i]`: seed i's `correct_rows` strings (`1` right) over the same rows."""
    a = np.array([[c == "1" for c in rows] for rows in ours], np.float64)
    b = np.array([[c == "1" for c in rows] for rows in theirs], np.float64)
    diff = (a - b).mean(axis=0)  # per row, averaged over seeds
    rng = np.random.default_rng(seed)
    samples = diff[rng.integers(0, diff.size, size=(draws, diff.size))].mean(axis=1)
    return float(diff.mean()), float(np.percentile(samples, 2.5)), float(np.percentile(samples, 97.5))


def first_reaching(run: dict, target: float):
    """`(step, train seconds)` of the first evaluation of `run` at or above `target` accuracy, else None."""
    for e in run["evals"]:
        if e["accuracy"] is not None and e["accuracy"] >= target:
            return e["step"], e["train_seconds"]
    return None


def paired_difference(rows: list[dict], others: list[dict]) -> dict | None:
    """SST-2 accuracy of `rows` minus `others` on the seeds both ran: mean over those seeds with its 95%
    interval over dev rows, and each seed's; None when no seed pairs."""
    theirs = {r["seed"]: r for r in others if r.get("correct_rows")}
    paired = [(r, theirs[r["seed"]]) for r in rows if r["seed"] in theirs and r.get("correct_rows")]
    if not paired:
        return None
    mean, lo, hi = bootstrap_difference([r["correct_rows"] for r, _ in paired], [t["correct_rows"] for _, t in paired])
    per_seed = {r["seed"]: bootstrap_difference([r["correct_rows"]], [t["correct_rows"]]) for r, t in paired}
    return {"mean": mean, "low": lo, "high": hi, "seeds": per_seed}


def to_full(rows: list[dict], full: list[dict]) -> dict | None:
    """Time to full fine-tuning's final accuracy, per seed both ran: the first evaluation of a run at or
    above full's final accuracy on the same seed, and that step times the run's median step time over
    full's whole training (its steps times its median step time); None when no seed pairs."""
    theirs = {r["seed"]: r for r in full}
    seeds = {}
    for r in rows:
        if r["seed"] not in theirs:
            continue
        f = theirs[r["seed"]]
        hit = first_reaching(r, f["accuracy"])
        full_time = f["evals"][-1]["step"] * f["median_step_seconds"]
        seeds[r["seed"]] = None if hit is None else {
            "step": hit[0], "time_ratio": hit[0] * r["median_step_seconds"] / full_time,
            "same_cpu": r.get("cpu_model") is not None and (r.get("cpu_model"), r.get("cores")) == (
                f.get("cpu_model"), f.get("cores"))}
    return {"seeds": seeds} if seeds else None


def summarize(runs: list[dict], task: str, names: list[str]) -> dict:
    """Per variant: the metric's mean, std and per-seed values; paired difference to LoRA; time to PEFT."""
    metric = METRIC[task]
    done = [r for r in runs if r["task"] == task and "error" not in r]
    by_name = {n: sorted((r for r in done if r["name"] == n), key=lambda r: r["seed"]) for n in names}
    reference = [r["accuracy"] for r in by_name.get(REFERENCE, [])]
    target = statistics.fmean(reference) if reference and task == "sst2" else None
    table = {}
    for name in names:
        rows = by_name[name]
        failed = sum(1 for r in runs if r["task"] == task and r["name"] == name and "error" in r)
        entry = {"failed": failed, "n": len(rows)}
        if rows:
            values = [r[metric] for r in rows]
            entry.update(seeds={r["seed"]: r[metric] for r in rows}, mean=statistics.fmean(values),
                         std=statistics.stdev(values) if len(values) > 1 else None,  # undefined for one seed
                         eval_loss=statistics.fmean(r["eval_loss"] for r in rows),
                         wall_seconds=statistics.fmean(r["wall_seconds"] for r in rows),
                         train_seconds=statistics.fmean(r["train_seconds"] for r in rows),
                         median_step_seconds=statistics.fmean(r["median_step_seconds"] for r in rows),
                         peak_host_memory_mib=max(r["peak_host_memory_mib"] for r in rows),
                         trainable_parameters=[min(r["trainable_parameters"] for r in rows),
                                               max(r["trainable_parameters"] for r in rows)])
            if task == "gsm8k":
                entry["exact_match"] = statistics.fmean(r["exact_match"] for r in rows)
            if task == "sst2" and name != BASELINE and (versus := paired_difference(rows, by_name.get(BASELINE, []))):
                entry["vs_lora"] = versus
            if task == "sst2" and name == RANDOM_DRAWS and (versus := paired_difference(rows, by_name.get(SCORED, []))):
                entry["vs_scored"] = versus
            if task == "sst2" and name != FULL and (reach := to_full(rows, by_name.get(FULL, []))):
                entry["to_full"] = reach
            if target is not None and name != REFERENCE:
                reached = [first_reaching(r, target) for r in rows]
                hits = [x for x in reached if x is not None]
                entry["to_peft_accuracy"] = {"target": target, "reached": len(hits), "of": len(rows),
                                             "steps": statistics.fmean(s for s, _ in hits) if hits else None,
                                             "train_seconds": statistics.fmean(t for _, t in hits) if hits else None}
        table[name] = entry
    return table


# ------------------------------------------------------------------------------------------ report


def plot(report: dict, path: pathlib.Path) -> pathlib.Path | None:
    """Training loss (moving average over 10 steps) of every method's lowest seed, and SST-2 dev accuracy
    at each evaluation (mean over seeds), PEFT LoRA's final as a line; a method keeps its colour across panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in report["runs"] if "error" not in r]
    tasks = [task for task in report["tasks"] if any(r["task"] == task for r in runs)]
    panels = [(task, "loss") for task in tasks] + [("sst2", "accuracy")] * ("sst2" in tasks)
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    every_name = list(dict.fromkeys(n for task in tasks for n in report["settings"]["names"][task]))
    palette = plt.get_cmap("tab20").colors
    color = dict(zip(every_name, palette[::2] + palette[1::2]))  # one colour per method in every panel
    for ax, (task, kind) in zip(axes[0], panels):
        names = [n for n in report["settings"]["names"][task]
                 if any(r["name"] == n and r["task"] == task for r in runs)]
        for name in names:
            mine = sorted((r for r in runs if r["task"] == task and r["name"] == name), key=lambda r: r["seed"])
            if kind == "loss":
                losses = np.asarray(mine[0]["loss_curve"], float)
                window = min(10, len(losses))
                smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
                ax.plot(np.arange(window, len(losses) + 1), smooth, label=name, linewidth=1.2,
                        color=color[name])
            elif name == REFERENCE:
                ax.axhline(statistics.fmean(r["accuracy"] for r in mine), color="black", linestyle="--",
                           linewidth=1, label="PEFT LoRA (final)")
            else:
                steps = sorted({e["step"] for r in mine for e in r["evals"]})
                means = [statistics.fmean(e["accuracy"] for r in mine for e in r["evals"] if e["step"] == s)
                         for s in steps]
                ax.plot(steps, means, marker="o", label=name, linewidth=1.2, color=color[name])
        title = {"loss": f"{task}: training loss (answer tokens), lowest seed, 10-step mean",
                 "accuracy": "sst2: dev accuracy at each evaluation, mean over seeds"}[kind]
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def points(difference: dict) -> str:
    """A `paired_difference` in accuracy points: `+0.4 [-0.1, +0.8]`."""
    return (f"{100 * difference['mean']:+.1f} [{100 * difference['low']:+.1f}, "
            f"{100 * difference['high']:+.1f}]")


def markdown(report: dict) -> str:
    m, s = report["machine"], report["settings"]
    lines = ["# Fine-tuning quality at a real budget: SmolLM2-135M-Instruct, every method and HF PEFT LoRA", "",
             f"{m['cpu_model']}, {m['cores']} cores, jax {m['jax']}; runs from {report['first_run']} to "
             f"{report['last_run']}; {report['minutes']:.0f} minutes of runs. Command: `{report['command']}`.", "",
             "Every run: `python -m hyjax.train methods/<method>` with the budget below, every other setting "
             "(learning rate included) from the method's YAML; `peft_lora`: HF PEFT LoRA (r 8, alpha 16, the "
             "seven projections, LoRA's learning rate and schedule) on the same rows of each seed, its merged "
             "model scored by hyjax's evaluation; `hybrid_lora_random`: Hybrid-LoRA's module count drawn at "
             f"random (a new draw per seed). Start-up gradients of LoRA-GA and the hybrid: {s['gradient_batches']} "
             f"batches of 2 (runs before 2026-12-05: 8); Hybrid-LoRA's scores: {s.get('selection_batches', 8)} "
             "batches of 2.", ""]
    for task in report["tasks"]:
        b, table = s["tasks"][task], report["summary"][task]
        recorded = ", ".join(map(str, sorted({r["seed"] for r in report["runs"] if r["task"] == task
                                              and "error" not in r})))  # this and earlier sittings' seeds
        if task == "sst2":
            lines += [f"## SST-2: dev accuracy ({b['eval_rows']} rows) after {b['steps']} steps of {b['batch']} "
                      f"rows, seeds {recorded}", "",
                      f"Each step {b['batch']} rows drawn from the whole training file, prompt {TEMPLATE!r}, loss on "
                      f"the answer tokens, cosine schedule with {b['steps'] // 10} warm-up steps; evaluation every "
                      f"{b['eval_every']} steps and at the end. Δ vs LoRA: mean over seeds of the paired accuracy "
                      f"difference to hyjax LoRA, [95% interval] from {BOOTSTRAP_DRAWS} resamples of the dev rows. "
                      "To PEFT: steps and train seconds (sum of step times) until an evaluation first reaches PEFT "
                      "LoRA's mean final accuracy (seeds that reach it / seeds). To full: per seed, the step of the "
                      "first evaluation at or above full fine-tuning's final accuracy on that seed, and that step "
                      "times the method's median step time over full fine-tuning's steps times its median step time "
                      "(`*`: the two ran on different CPUs or core counts, so the time ratio compares machines too)."]
        else:
            lines += [f"## GSM8K: answer loss on {b['eval_rows']} problems held out of the training file, after "
                      f"{b['steps']} steps of {b['batch']} problems, seeds {recorded}", "",
                      f"Exact match: the final number of a greedy generation of at most {b['max_new_tokens']} tokens."]
        before = next((r["eval_before"] for r in report["runs"] if r["task"] == task and r.get("eval_before")), None)
        if before:
            score = f"accuracy {before['accuracy']:.3f}" if task == "sst2" else \
                f"exact match {before['exact_match']:.3f}"
            lines += ["", f"Pretrained model: {score}, answer loss {before['eval_loss']:.3f}."]
        if task == "sst2":
            lines += ["", "| method | accuracy mean ± std | seed: accuracy | Δ vs LoRA [95%] | "
                          "to PEFT: steps, train s | to full: seed: step, time / full's | answer loss | wall s | s/step | "
                          "peak MiB | trainable |",
                      "| --- | ---: | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
        else:
            lines += ["", "| method | answer loss | seed: answer loss | exact match | wall s | s/step | peak MiB | "
                          "trainable |",
                      "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
        for name, e in table.items():
            if not e["n"]:
                lines.append(f"| {name} | " + (f"failed ({e['failed']})" if e["failed"] else "not run") + " |")
                continue
            low, high = e["trainable_parameters"]  # Hybrid-LoRA's chosen modules differ by seed
            trainable = f"{low:,}" if low == high else f"{low:,}-{high:,}"
            cost = (f"{e['wall_seconds']:.0f} | {e['median_step_seconds']:.2f} | {e['peak_host_memory_mib']:,.0f} | "
                    f"{trainable} |")
            seeds = ", ".join(f"{seed}: {v:.3f}" for seed, v in e["seeds"].items())
            if task == "gsm8k":
                lines.append(f"| {name} | {e['mean']:.3f} | {seeds} | {e['exact_match']:.3f} | {cost}")
                continue
            delta = points(e["vs_lora"]) if "vs_lora" in e else "-"
            t = e.get("to_peft_accuracy")
            reach = "-" if not t else (f"{t['steps']:.0f}, {t['train_seconds']:.0f} ({t['reached']}/{t['of']})"
                                       if t["reached"] else f"not reached (0/{t['of']})")
            spread = f"± {e['std']:.3f}" if e["std"] is not None else "(1 seed)"
            full = "; ".join(f"{seed}: " + ("not reached" if x is None else
                                            f"{x['step']}, {x['time_ratio']:.2f}{'' if x['same_cpu'] else '*'}")
                             for seed, x in e["to_full"]["seeds"].items()) if "to_full" in e else "-"
            lines.append(f"| {name} | {e['mean']:.3f} {spread} | {seeds} | {delta} | {reach} | {full} | "
                         f"{e['eval_loss']:.3f} | {cost}")
        if task == "sst2" and (d := table.get(RANDOM_DRAWS, {}).get("vs_scored")):
            lines += ["", f"{RANDOM_DRAWS} against {SCORED}, paired on seeds {', '.join(map(str, d['seeds']))} "
                          f"(the same seeds' data order and LoRA initialisation): {points(d)} points."]
        lines.append("")
    errors = [r for r in report["runs"] if "error" in r]
    if errors:
        lines += ["Failed runs:", ""] + [f"- {r['task']} {r['name']} seed {r['seed']}: {r['error'][:300]}"
                                         for r in errors] + [""]
    lines += ["Curves: `quality_curves.png`.", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main


def plan(args) -> list[tuple[str, str, int]]:
    out = []
    if "sst2" in args.tasks:
        out += [("sst2", name, seed) for seed in args.seeds for name in args.methods]
    if "gsm8k" in args.tasks:
        out += [("gsm8k", name, seed) for seed in args.gsm8k_seeds for name in args.gsm8k_methods]
    return out


def write(report: dict, out: pathlib.Path) -> None:
    report["summary"] = {task: summarize(report["runs"], task, report["settings"]["names"][task])
                         for task in report["tasks"]}
    finished = [r["finished"] for r in report["runs"] if "finished" in r]
    report["first_run"], report["last_run"] = (min(finished), max(finished)) if finished else ("-", "-")
    report["minutes"] = sum(r.get("wall_seconds", 0.0) for r in report["runs"]) / 60
    out.mkdir(parents=True, exist_ok=True)
    png = plot(report, out / "quality_curves.png")
    report["curves"] = str(png.name) if png else None
    (out / "quality.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "quality.md").write_text(markdown(report))


def main() -> None:
    args = parse_args()
    if args.peft_child:
        peft_child(args)
        return
    for path in (SST2_TRAIN, SST2_DEV, GSM8K_TRAIN):
        if not path.is_file():
            raise SystemExit(f"{path} is missing (see ../shared/data/README.md)")
    import jax

    out = pathlib.Path(args.out)
    previous = json.loads((out / "quality.json").read_text()) if args.resume and (out / "quality.json").is_file() \
        else {"runs": []}
    todo = plan(args)
    kept = {(r["task"], r["name"], r["seed"]): r for r in previous.get("runs", []) if "error" not in r
            and r["task"] in TASKS and r["name"] in VARIANTS and r["name"] not in args.rerun and still_valid(r, args)}
    for (task, name, seed), record in kept.items():  # a hash-only record that matched: today's settings are its
        record.setdefault("settings", settings(name, task, seed, args))
    tasks = [t for t in TASKS if t in args.tasks or any(k[0] == t for k in kept)]
    names = {t: [n for n in VARIANTS if (t, n) in {(k[0], k[1]) for k in [*todo, *kept]}] for t in TASKS}
    report = {"benchmark": "quality at a real budget: every method and HF PEFT LoRA",
              "command": "python bench/quality.py " + " ".join(args.argv), "tasks": tasks,
              "machine": {"cpu_model": cpu_model(), "cores": cores(), "python": platform.python_version(),
                          "jax": jax.__version__},
              "settings": {"gradient_batches": args.gradient_batches, "selection_batches": args.selection_batches,
                           "names": names,
                           "tasks": {"sst2": {"steps": args.steps, "batch": args.batch, "eval_every": args.eval_every,
                                              "eval_rows": args.dev_rows or 872, "seeds": args.seeds},
                                     "gsm8k": {"steps": args.gsm8k_steps, "batch": args.gsm8k_batch,
                                               "eval_rows": args.gsm8k_eval_examples, "seeds": args.gsm8k_seeds,
                                               "max_new_tokens": args.max_new_tokens}}},
              "runs": [r for k, r in kept.items() if k not in todo]}  # earlier sittings' other runs
    # The pretrained model's row is the same for every method and seed: measured once, by the first hyjax run of
    # a task, unless a kept run of the same settings already holds it.
    measured = {task for (task, _, _), record in kept.items() if record.get("eval_before")}
    first_of_task = {task: None if task in measured else next(
        ((t, n, s) for t, n, s in todo if t == task and VARIANTS[n][0] == "hyjax"), None) for task in args.tasks}
    print(f"{len(todo)} runs; work folder {args.work}", flush=True)
    free_cores = queue.Queue()
    for core in (sorted(os.sched_getaffinity(0))[:args.workers] if args.workers > 1 else [None]):
        free_cores.put(core)
    lock = threading.Lock()

    def one(i: int, task: str, name: str, seed: int) -> None:
        core = free_cores.get()
        print(f"[{i}/{len(todo)}] {task} {name} seed {seed} ..." + (f" (core {core})" if core is not None else ""),
              flush=True)
        try:
            result = launch(name, task, seed, args, eval_before=first_of_task[task] == (task, name, seed), core=core)
        finally:
            free_cores.put(core)
        record = {"task": task, "name": name, "seed": seed, "settings": settings(name, task, seed, args),
                  "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "loadavg_end": os.getloadavg(), "cpu_model": cpu_model(), "cores": 1 if core is not None else cores(),
                  **result}
        with lock:
            report["runs"].append(record)
            shown = {k: record.get(k) for k in ("accuracy", "exact_match", "eval_loss", "wall_seconds", "error")
                     if record.get(k) is not None}
            print(f"    {task} {name} seed {seed}: {json.dumps(shown)[:400]}", flush=True)
            write(report, out)

    with concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
        futures = []
        for i, (task, name, seed) in enumerate(todo, 1):
            if (task, name, seed) in kept:
                report["runs"].append(kept[(task, name, seed)])
                print(f"[{i}/{len(todo)}] {task} {name} seed {seed}: kept from {out / 'quality.json'}", flush=True)
            else:
                futures.append(pool.submit(one, i, task, name, seed))
        for future in futures:
            future.result()
    write(report, out)
    print(markdown(report))


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(VARIANTS), help=f"SST-2 runs, of {','.join(VARIANTS)}")
    parser.add_argument("--gsm8k-methods", default="lora,hybrid,full", help="GSM8K runs (hyjax methods)")
    parser.add_argument("--tasks", default="sst2,gsm8k", help="comma-separated, of sst2,gsm8k")
    parser.add_argument("--seeds", default="0,1,2", help="SST-2 seeds (train.seed and data.shuffle_seed)")
    parser.add_argument("--gsm8k-seeds", default="0")
    parser.add_argument("--steps", type=int, default=150, help="SST-2 optimizer steps")
    parser.add_argument("--batch", type=int, default=16, help="SST-2 rows per step")
    parser.add_argument("--eval-every", type=int, default=25, help="SST-2 steps between dev evaluations")
    parser.add_argument("--dev-rows", type=int, help="SST-2 dev rows evaluated (default: all 872)")
    parser.add_argument("--gsm8k-steps", type=int, default=200)
    parser.add_argument("--gsm8k-batch", type=int, default=4)
    parser.add_argument("--gsm8k-eval-examples", type=int, default=200, help="problems held out and evaluated")
    parser.add_argument("--max-new-tokens", type=int, default=192, help="GSM8K greedy generation budget")
    parser.add_argument("--selection-batches", type=int, default=8,
                        help="batches of 2 for Hybrid-LoRA's module scores")
    parser.add_argument("--gradient-batches", type=int, default=64,
                        help="batches of 2 for LoRA-GA's and the hybrid's start-up gradient (the authors' 64)")
    parser.add_argument("--out", default="bench/results", help="folder of quality.json, .md and the curves PNG")
    parser.add_argument("--work", default="runs/bench-quality", help="folder of the runs")
    parser.add_argument("--resume", action="store_true",
                        help="keep the runs of --out/quality.json whose settings equal this invocation's")
    parser.add_argument("--rerun", default="", help="names whose recorded runs are run again all the same")
    parser.add_argument("--workers", type=int, default=1,
                        help="runs at a time, each pinned to a core of its own (step times then compare only "
                             "with runs of the same kind)")
    parser.add_argument("--peft-child", help=argparse.SUPPRESS)
    parser.add_argument("--child-seed", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--peft-child" in argv:
        argv = argv[:argv.index("--peft-child")]
    args.argv = argv
    args.methods = [m for m in args.methods.split(",") if m]
    args.gsm8k_methods = [m for m in args.gsm8k_methods.split(",") if m]
    args.tasks = [t for t in args.tasks.split(",") if t]
    args.rerun = [n for n in args.rerun.split(",") if n]
    args.seeds, args.gsm8k_seeds = _ints(args.seeds), _ints(args.gsm8k_seeds)
    unknown = [m for m in args.methods if m not in VARIANTS] + \
        [m for m in args.gsm8k_methods if VARIANTS.get(m, ("peft",))[0] != "hyjax"] + \
        [t for t in args.tasks if t not in TASKS]
    if unknown:
        parser.error(f"unknown {unknown}; SST-2: {list(VARIANTS)}, GSM8K: {list(METHODS)}, tasks: {list(TASKS)}")
    small = [f for f, v in (("--steps", args.steps), ("--batch", args.batch), ("--eval-every", args.eval_every),
                            ("--gsm8k-steps", args.gsm8k_steps), ("--gsm8k-batch", args.gsm8k_batch),
                            ("--gsm8k-eval-examples", args.gsm8k_eval_examples),
                            ("--max-new-tokens", args.max_new_tokens),
                            ("--gradient-batches", args.gradient_batches),
                            ("--selection-batches", args.selection_batches)) if v < 1]
    if small or not args.seeds or not args.gsm8k_seeds:
        parser.error(f"need positive values and at least one seed (got {small or 'no seeds'})")
    return args


if __name__ == "__main__":
    main()
