"""Benchmark: the real SST-2 fine-tuning job, hyjax against HF PEFT, step by step.

    python bench/job.py [--steps 150] [--batch 16] [--methods lora,hybrid] [--no-peft] [--out bench/results]

What a new user runs on one machine: SmolLM2-135M-Instruct, SST-2's whole training file, each step 16 rows
drawn at random, prompt "Review: {text}\\nSentiment:", answer " positive" / " negative" (+ EOS), loss on the
answer tokens, AdamW at the method's configured learning rate (constant), gradient clipping at 1.0.

* hyjax: `python -m hyjax.train configs/methods/<method>.yaml` with those settings (`data.bucket` 16,
  `data.max_length` 128, no evaluation, one checkpoint at the end), timed by the run itself: each step's
  `step_seconds` in metrics.jsonl is the wall time from fetching its batch to having its metrics on the
  host (compilations of new batch shapes included).
* PEFT LoRA (r 8, alpha 16, the seven projections), transformers' LLaMA in float32 on the same weights
  and the same rows of every step (taken from the hyjax run's data pipeline), each batch left-padded to
  its longest row, as a PEFT user's collator does; timed the same way (batch building to `loss.item()`).

Reports, per run: median and mean step time, the job's total step time, padded positions per step and
final loss; ratios of hyjax to PEFT (the target: hyjax LoRA <= 0.8x PEFT LoRA's median step). Each run
in its own process, one after the other. Writes job.json and job.md under `--out`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

from machine import cores, cpu_model
from methods import SST2, hf_folder, matmul_peak
from peft_reference import hf_copy, job_rows, train_peft_lora

os.environ.setdefault("JAX_PLATFORMS", "cpu")

PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[1]
TEMPLATE = "Review: {text}\nSentiment:"


def job_overrides(args, output_dir: str) -> list[str]:
    """The job's settings on top of configs/methods/<method>.yaml."""
    return [
        "model.preset=smollm2-135m", f"data.path={args.data}", "data.chat=false", f"data.template={TEMPLATE}",
        f"data.bucket={args.bucket}", f"data.max_length={args.max_length}", f"train.global_batch_size={args.batch}",
        f"train.steps={args.steps}", "train.schedule=constant", "train.warmup_steps=0",
        "eval.before_training=false", f"logging.output_dir={output_dir}", "logging.every_steps=1",
        "logging.progress_bar=false", "checkpoint.every_steps=0", "export.peft_adapter=false",
        "export.merged_model=false",
    ]


def run_ours(method: str, args) -> dict:
    """`python -m hyjax.train` of the job; step times from its metrics.jsonl."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "hyjax.train", f"configs/methods/{method}.yaml", *job_overrides(args, tmp)]
        start = time.perf_counter()
        done = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode:
            return {"error": done.stderr[-3000:]}
        records = [json.loads(line) for line in (pathlib.Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "step_seconds" in r]
    return {"step_s": [r["step_seconds"] for r in steps], "final_loss": steps[-1]["loss"], "process_wall_s": wall}


def run_peft(method: str, args) -> dict:
    """The same job in HF PEFT (`peft_reference.train_peft_lora`): LoRA r 8, alpha 16 on the seven
    projections, the same rows, learning rate and AdamW, left-padded batches."""
    import peft
    import torch
    import transformers

    from hyjax.config import load_config

    with tempfile.TemporaryDirectory() as tmp:
        config = load_config("methods/lora", job_overrides(args, tmp))
    steps, pad_id = job_rows(config, args.steps)
    _, losses, times = train_peft_lora(hf_copy(config, hf_folder(args)), steps, pad_id, train=config.train, seed=0,
                                       threads=cores())
    positions = [len(rows) * max(len(tokens) for tokens, _ in rows) for rows in steps]
    return {"step_s": times, "final_loss": losses[-1], "positions_per_step": statistics.mean(positions),
            "peft": peft.__version__, "transformers": transformers.__version__, "torch": torch.__version__}


def child(flag: str, name: str, args, extra=()) -> dict:
    """Runs this script with `flag name` in a fresh process and returns the JSON it writes."""
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "result.json"
        command = [sys.executable, __file__, flag, name, "--json-out", str(out), *args.argv, *extra]
        subprocess.run(command, cwd=PROJECT_ROOT)
        return json.loads(out.read_text()) if out.is_file() else {"error": "the subprocess wrote no result"}


def summarize(row: dict) -> dict:
    if "error" not in row:
        row.update(median_step_s=statistics.median(row["step_s"]), mean_step_s=statistics.mean(row["step_s"]),
                   total_step_s=sum(row["step_s"]))
    return row


def run_all(args) -> dict:
    machine = {"cpu_model": cpu_model(), "cores_used": cores(), "loadavg_start": os.getloadavg()}
    peaks = [matmul_peak() / 1e9]
    ours = {}
    for method in args.methods:
        print(f"hyjax {method}: {args.steps} steps", flush=True)
        ours[method] = summarize(child("--one", method, args))
    theirs = {}
    if args.peft:
        print(f"PEFT lora: {args.steps} steps", flush=True)
        theirs["lora"] = summarize(child("--peft-one", "lora", args))
    peaks.append(matmul_peak() / 1e9)
    machine.update(loadavg_end=os.getloadavg(), matmul_peaks_gflop_per_s=peaks)
    for method, row in ours.items():
        peft_row = theirs.get("lora")
        if peft_row and "error" not in peft_row and "error" not in row:
            row["median_vs_peft_lora"] = row["median_step_s"] / peft_row["median_step_s"]
            row["total_vs_peft_lora"] = row["total_step_s"] / peft_row["total_step_s"]
    return {"benchmark": "job: the real SST-2 job, hyjax vs HF PEFT, step by step",
            "command": "python bench/job.py " + " ".join(args.argv),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "settings": {"steps": args.steps, "batch": args.batch, "bucket": args.bucket,
                         "max_length": args.max_length, "data": args.data, "template": TEMPLATE},
            "machine": machine, "hyjax": ours, "peft": theirs}


def markdown(report: dict) -> str:
    s, m = report["settings"], report["machine"]
    lines = [
        f"# The real SST-2 job, step by step: hyjax vs HF PEFT ({s['steps']} steps of {s['batch']} rows)",
        "",
        f"{m['cpu_model']}, {m['cores_used']} cores; {report['date']}; load average {m['loadavg_start'][0]:.1f} at "
        f"start, {m['loadavg_end'][0]:.1f} at end; f32 matmul peak {m['matmul_peaks_gflop_per_s'][0]:.0f} / "
        f"{m['matmul_peaks_gflop_per_s'][1]:.0f} GFLOP/s before / after. Command: `{report['command']}`.",
        "",
        f"Each step: {s['batch']} rows drawn from the whole training file, prompt {s['template']!r}, loss on the "
        f"answer tokens, AdamW (constant learning rate), clipping at 1.0. hyjax pads each batch to a multiple of "
        f"{s['bucket']} (at most {s['max_length']}) and computes logits at the answer positions only; PEFT pads "
        "each batch to its longest row (left) and computes logits everywhere. Step time: from building the "
        "batch to the loss on the host, compilations of new shapes included (in the mean and total, rarely in "
        "the median).",
        "",
        "| run | median s/step | mean s/step | total step s | median / PEFT LoRA | total / PEFT LoRA | final loss |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    rows = [(f"hyjax {k}", v) for k, v in report["hyjax"].items()] + [(f"PEFT {k}", v) for k, v in report["peft"].items()]
    for name, row in rows:
        if "error" in row:
            lines.append(f"| {name} | failed: {row['error'].splitlines()[-1][:120]} | | | | | |")
            continue
        ratio = lambda key: f"{row[key]:.2f}" if key in row else "-"  # noqa: E731
        lines.append(f"| {name} | {row['median_step_s']:.2f} | {row['mean_step_s']:.2f} | {row['total_step_s']:.0f} | "
                     f"{ratio('median_vs_peft_lora')} | {ratio('total_vs_peft_lora')} | {row['final_loss']:.4f} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="lora,hybrid", help="hyjax methods (configs/methods/<name>.yaml)")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--bucket", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--no-peft", dest="peft", action="store_false", help="skip the HF PEFT run")
    parser.add_argument("--out", default="bench/results", help="folder of job.json and job.md")
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "hyjax-bench-methods"),
                        help="folder of the HF copy of the weights for PEFT (shared with bench/methods.py)")
    parser.add_argument("--data", default=str(SST2), help="training file")
    for flag in ("--one", "--peft-one", "--json-out"):
        parser.add_argument(flag, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.methods = [m for m in args.methods.split(",") if m]
    return args


def main() -> None:
    args = parse_args()
    if args.one or args.peft_one:  # a subprocess: one run, written as JSON
        result = run_ours(args.one, args) if args.one else run_peft(args.peft_one, args)
        pathlib.Path(args.json_out).write_text(json.dumps(result, indent=1))
        return
    report = run_all(args)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "job.json").write_text(json.dumps(report, indent=1) + "\n")
    text = markdown(report)
    (out / "job.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
