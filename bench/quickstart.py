"""The quickstart as a newcomer runs it, over several seeds: dev accuracy before and after, and wall time.

    python bench/quickstart.py [--seeds 0,1,2] [key=value ...] [--out bench/results] [--work runs/bench-quickstart]

Each seed is `python -m hyjax.train quickstart train.seed=S data.shuffle_seed=S` (plus the overrides, for
sizing candidates) in its own process, as the README's command runs it; the numbers the README states come
from here. Writes quickstart.{json,md} under `--out` after every seed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import shlex
import statistics
import subprocess
import sys
import time

from machine import cores, cpu_model

PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_seed(seed: int, overrides: list[str], work: pathlib.Path) -> dict:
    folder = work / f"seed-{seed}"
    command = [sys.executable, "-m", "hyjax.train", "quickstart", f"train.seed={seed}", f"data.shuffle_seed={seed}",
               f"logging.output_dir={folder}", "logging.progress_bar=false", *overrides]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        return {"seed": seed, "error": done.stderr.strip().splitlines()[-1:]}
    summary = json.loads((folder / "summary.json").read_text())
    return {"seed": seed, "before": summary["eval_before"].get("accuracy"),
            "after": summary["eval_after"].get("accuracy"), "examples": summary["eval_after"].get("examples"),
            "process_seconds": wall, "train_seconds": summary["wall_time_seconds"]}


def markdown(report: dict) -> str:
    runs = [r for r in report["runs"] if "error" not in r]
    lines = [f"# The quickstart over {len(report['runs'])} seeds ({report['date']})", "",
             f"{report['machine']['cpu_model']}, {report['machine']['cores']} cores. Command: "
             f"`{report['command']}`. Dev accuracy on the first `eval.num_examples` rows of the bundled dev "
             "sample, before and after training; wall time of the whole command (model and data loading, "
             "compiling, evaluations, export).", "",
             "| seed | before | after | dev rows | wall minutes |", "| ---: | ---: | ---: | ---: | ---: |"]
    for r in report["runs"]:
        if "error" in r:
            lines.append(f"| {r['seed']} | failed: {r['error']} | | | |")
        else:
            lines.append(f"| {r['seed']} | {r['before']:.3f} | {r['after']:.3f} | {r['examples']} | "
                         f"{r['process_seconds'] / 60:.1f} |")
    if len(runs) > 1:
        after = [r["after"] for r in runs]
        minutes = [r["process_seconds"] / 60 for r in runs]
        lines.append(f"| mean (min-max) | {statistics.mean(r['before'] for r in runs):.3f} | "
                     f"{statistics.mean(after):.3f} ({min(after):.3f}-{max(after):.3f}) | | "
                     f"{statistics.mean(minutes):.1f} ({min(minutes):.1f}-{max(minutes):.1f}) |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--work", default="runs/bench-quickstart")
    args = parser.parse_args()
    report = {"command": "python bench/quickstart.py " + shlex.join(sys.argv[1:]), "overrides": args.overrides,
              "runs": [], "machine": {"cpu_model": cpu_model(), "cores": cores()}}
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for seed in (int(s) for s in args.seeds.split(",")):
        print(f"seed {seed} ...", flush=True)
        report["runs"].append(run_seed(seed, args.overrides, (PROJECT_ROOT / args.work).resolve()))
        print(f"    {report['runs'][-1]}", flush=True)
        report["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        (out / "quickstart.json").write_text(json.dumps(report, indent=1) + "\n")
        (out / "quickstart.md").write_text(markdown(report))
    print((out / "quickstart.md").read_text())


if __name__ == "__main__":
    main()
