"""Benchmark: faults injected into real training runs, and whether each run survived them.

    python bench/reliability.py [--kills 20] [--damages 3] [--full-disks 2] [--process-kills 5] [--seed 0]
                                [--kinds kill,damage,...] [--out bench/results] [--work runs/bench-reliability]

Every trial trains LoRA on a tiny randomly initialised LLaMA (SmolLM2-135M-Instruct's tokenizer) on the
bundled SST-2 sample, 24 steps with a checkpoint every 2 saved in the background, through
`python -m hyjax.train` in its own process, and compares the run with one uninterrupted run:

* **kill**: SIGKILL at a random moment of the run (uniform over the time the uninterrupted run took from
  its first checkpoint to its last), whether or not a save is under way, then the same command again;
* **damage** (cut / flipped / missing): the run stopped after step 8, one random file of checkpoint 8
  damaged, then the same command again (it must pass over 8 and resume at 6);
* **full disk**: the run stopped after step 8 is started again under a 4 KiB file-size limit (its next
  save fails), then again without it;
* **process killed**: the same run as 2 processes (`--num-processes 2`, one CPU device each); the training
  process under one command SIGKILLed at a random moment after the first checkpoint (process 1 and process
  0, the coordinator, in turn); the other must end with its one-line message and exit code 3 within the
  heartbeat timeout (20 s here), and both started again must finish as an uninterrupted 2-process run did.

A trial survived when the finished run's losses (every step) and final adapters equal the uninterrupted
run's bitwise, every checkpoint left restores, and no damaged checkpoint was deleted. Last, the generated
bad inputs of tests/bad_inputs.py are tried (through tests/test_bad_inputs.py) and counted per kind.
Writes `reliability.{json,md}` under `--out`; `--kinds` runs some kinds again and keeps the others'
results from the JSON there (each sitting's command listed).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree

import numpy as np

from machine import cores, cpu_model

PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
            tie_embeddings=True, max_position_embeddings=256)
STEPS, EVERY, STOPPED_AT = 24, 2, 8
HEARTBEAT_TIMEOUT = 20
KINDS = ("kill", "damage", "full disk", "process killed", "bad inputs")


def lay_out_model(work: pathlib.Path) -> pathlib.Path:
    """The tiny model's Hugging Face folder in `work` (made once)."""
    import jax

    from hyjax import model, pretrained
    from hyjax.tokenization import load_tokenizer
    from hyjax.weights import save_hf_checkpoint

    folder = work / "model"
    if not (folder / "config.json").is_file():
        tokenizer = load_tokenizer(pretrained.smollm2_135m_instruct())
        config = model.LlamaConfig(**TINY, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
        save_hf_checkpoint(folder, config, model.init_params(config, jax.random.key(0)), tokenizer=tokenizer)
    return folder


def command(model: pathlib.Path, output: pathlib.Path, process: int | None = None, port: int = 0) -> list[str]:
    """The run's command line; with `process`, that process's of a 2-process run coordinated on `port`."""
    processes = [] if process is None else [f"--coordinator=localhost:{port}", "--num-processes=2",
                                            f"--process-id={process}", f"--heartbeat-timeout={HEARTBEAT_TIMEOUT}"]
    return [sys.executable, "-m", "hyjax.train", "base", "model.preset=null", f"model.path={model}",
            "data.path=bundled:sst2/train.tsv", "data.eval_path=bundled:sst2/dev.tsv", "data.chat=false",
            "data.max_length=48", "data.bucket=16", f"train.steps={STEPS}", "train.global_batch_size=4",
            "train.learning_rate=1e-2", "train.schedule=constant", "method.name=lora",
            f"checkpoint.every_steps={EVERY}", "checkpoint.keep=null", "eval.num_examples=8",
            "eval.generation_samples=0", "eval.before_training=false",
            f"logging.output_dir={output}", "logging.every_steps=1", "logging.progress_bar=false",
            "export.peft_adapter=false", *processes]


def two_processes(model: pathlib.Path, output: pathlib.Path, logs: pathlib.Path) -> list[subprocess.Popen]:
    """Starts both processes of the 2-process run (one CPU device each), their output in `logs`/process_<i>.log."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "PYTHONUNBUFFERED": "1"}
    logs.mkdir(parents=True, exist_ok=True)
    return [subprocess.Popen(command(model, output, i, port), env=env, stdout=open(logs / f"process_{i}.log", "w"),
                             stderr=subprocess.STDOUT) for i in range(2)]


def losses(output: pathlib.Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return {line["step"]: line["loss"] for line in lines if "loss" in line}


def final_adapters(output: pathlib.Path) -> list[np.ndarray]:
    import jax

    from hyjax.training import restore

    return [np.asarray(leaf) for leaf in jax.tree.leaves(jax.device_get(restore(output).state.trainable))]


def checkpoint_steps(output: pathlib.Path) -> list[int]:
    return sorted(int(p.name) for p in (output / "checkpoints").iterdir() if p.name.isdigit())


def unreadable(output: pathlib.Path) -> list[int]:
    """The checkpoints left in the run's folder that fail their digests or do not restore."""
    from hyjax.training import integrity, restore

    bad = []
    for step in checkpoint_steps(output):
        try:
            if integrity.problems(output / "checkpoints" / str(step)) or restore(output, step=step).step != step:
                bad.append(step)
        except Exception:  # a checkpoint that does not restore, whatever the reason, is what this counts
            bad.append(step)
    return bad


def outcome(output: pathlib.Path, reference: dict, finished: subprocess.CompletedProcess) -> dict:
    """Whether the finished run equals the uninterrupted one, and what its folder holds."""
    if finished.returncode != 0:
        return {"survived": False, "error": finished.stderr.strip().splitlines()[-1:]}
    same_losses = losses(output) == reference["losses"]
    same_adapters = all(np.array_equal(a, b) for a, b in zip(final_adapters(output), reference["adapters"]))
    bad = unreadable(output)
    return {"survived": same_losses and same_adapters and not bad, "same_losses": same_losses,
            "same_adapters": same_adapters, "unreadable_checkpoints": bad,
            "resumed_from": next((line.split("/")[-1].split()[0] for line in finished.stdout.splitlines()
                                  if line.startswith("resumed from")), None)}


def stopped_copy(reference: dict, folder: pathlib.Path) -> pathlib.Path:
    """The uninterrupted run as it was after its checkpoint of step 8 (later checkpoints removed)."""
    shutil.copytree(reference["output"], folder)
    for step in checkpoint_steps(folder):
        if step > STOPPED_AT:
            shutil.rmtree(folder / "checkpoints" / str(step))
    return folder


def kill_trial(model, reference, folder, rng) -> dict:
    process = subprocess.Popen(command(model, folder), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while process.poll() is None and not any(p.name.isdigit() for p in (folder / "checkpoints").glob("*")):
        time.sleep(0.01)
    delay = rng.uniform(0, reference["seconds_between_checkpoints"])
    time.sleep(delay)
    finished_first = process.poll() is not None
    process.send_signal(signal.SIGKILL)
    process.wait()
    during_save = any(p.name.endswith("orbax-checkpoint-tmp") for p in (folder / "checkpoints").iterdir())
    before = checkpoint_steps(folder)
    finished = subprocess.run(command(model, folder), capture_output=True, text=True)
    return {"kind": "kill", "delay_seconds": round(delay, 2), "killed_during_a_save": during_save,
            "ended_before_the_kill": finished_first, "checkpoints_at_kill": before,
            **outcome(folder, reference, finished)}


def damage_trial(model, reference, folder, kind, rng) -> dict:
    from hyjax.training import integrity

    stopped_copy(reference, folder)
    step_dir = folder / "checkpoints" / str(STOPPED_AT)
    listed = json.loads(integrity.digest_path(step_dir, 0).read_text())["files"]
    name = rng.choice(sorted(n for n in listed if listed[n]["bytes"] > 0))
    path = step_dir / name
    if kind == "cut":
        os.truncate(path, rng.randrange(path.stat().st_size))
    elif kind == "flipped":
        data = bytearray(path.read_bytes())
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(data))
    else:
        path.unlink()
    damaged = {p.relative_to(step_dir): p.read_bytes() for p in step_dir.rglob("*") if p.is_file()}
    finished = subprocess.run(command(model, folder), capture_output=True, text=True)
    kept = folder / "checkpoints" / "damaged" / str(STOPPED_AT)
    kept_untouched = kept.is_dir() and damaged == {p.relative_to(kept): p.read_bytes()
                                                   for p in kept.rglob("*") if p.is_file()}
    result = outcome(folder, reference, finished)
    return {"kind": f"damage ({kind})", "file": name, **result, "damaged_checkpoint_kept": kept_untouched,
            "survived": result["survived"] and kept_untouched and result["resumed_from"] == str(STOPPED_AT - EVERY)}


def full_disk_trial(model, reference, folder) -> dict:
    stopped_copy(reference, folder)
    limited = subprocess.run(["prlimit", "--fsize=4096", *command(model, folder)], capture_output=True, text=True)
    message = [line for line in limited.stderr.splitlines() if line.startswith("error:")]
    intact_after_failure = checkpoint_steps(folder) == [s for s in reference["checkpoints"] if s <= STOPPED_AT]
    finished = subprocess.run(command(model, folder), capture_output=True, text=True)
    result = outcome(folder, reference, finished)
    clear = limited.returncode == 2 and len(message) == 1 and "could not be written" in message[0]
    return {"kind": "full disk", "message": message, **result, "earlier_checkpoints_intact": intact_after_failure,
            "survived": result["survived"] and clear and intact_after_failure}


def process_kill_trial(model, reference, folder, rng, victim: int) -> dict:
    logs = folder.with_name(folder.name + "-logs")
    processes = two_processes(model, folder, logs)
    survivor = 1 - victim
    while processes[0].poll() is None and not any(p.name.isdigit() for p in (folder / "checkpoints").glob("*")):
        time.sleep(0.01)
    delay = rng.uniform(0, reference["seconds_between_checkpoints"])
    time.sleep(delay)
    finished_first = processes[survivor].poll() is not None
    # the training process under the command (as the kernel's OOM killer would pick it), not the command
    training = [int(pid) for pid in pathlib.Path(f"/proc/{processes[victim].pid}/task/{processes[victim].pid}"
                                                 "/children").read_text().split()]
    for pid in training:
        os.kill(pid, signal.SIGKILL)
    processes[victim].wait()
    killed_at = time.perf_counter()
    try:
        code = processes[survivor].wait(timeout=120)
    except subprocess.TimeoutExpired:
        processes[survivor].kill()
        code = None
    ended_after = time.perf_counter() - killed_at
    last_line = ((logs / f"process_{survivor}.log").read_text().strip().splitlines() or [""])[-1]
    clear = finished_first or (code == 3 and last_line.startswith(f"error: process {survivor} of 2 lost contact"))
    before = checkpoint_steps(folder)
    processes = two_processes(model, folder, logs)
    codes = [p.wait(timeout=900) for p in processes]
    log = (logs / "process_0.log").read_text()
    result = outcome(folder, reference, subprocess.CompletedProcess([], max(codes), log, log))
    shutil.rmtree(logs, ignore_errors=True)
    return {"kind": "process killed", "killed_process": victim, "delay_seconds": round(delay, 2),
            "ended_before_the_kill": finished_first,
            "survivor_exit_code": code, "survivor_ended_after_seconds": round(ended_after, 1),
            "survivor_message": last_line, "checkpoints_at_kill": before, **result,
            "survived": result["survived"] and clear}


def bad_inputs(work: pathlib.Path) -> dict:
    """tests/test_bad_inputs.py run once: per kind of input, how many were tried and answered clearly."""
    report = work / "bad_inputs.xml"
    subprocess.run([sys.executable, "-m", "pytest", "tests/test_bad_inputs.py", "-q", "-n", "0", "-p",
                    "no:cacheprovider", f"--junit-xml={report}"], cwd=PROJECT_ROOT, capture_output=True)
    kinds: dict[str, dict[str, int]] = {}
    for case in ElementTree.parse(report).iter("testcase"):
        name = case.get("name")
        kind = name.split("[")[1].split(":")[0] if "one_clear_line" in name else (
            "through the command line" if "real_command_line" in name else None)
        if kind is None:
            continue
        counts = kinds.setdefault(kind, {"tried": 0, "answered_clearly": 0})
        counts["tried"] += 1
        counts["answered_clearly"] += not any(child.tag in ("failure", "error") for child in case)
    return kinds


def earlier_results(path: pathlib.Path, kinds: list[str]) -> dict:
    """The report at `path` less the trials (and bad inputs) of `kinds`, which this sitting runs again; an
    empty report when there is none."""
    report = json.loads(path.read_text()) if path.is_file() else {}
    if "sittings" not in report:  # the first sittings wrote one date and command, and ran every kind
        report = {"sittings": [{"date": report["date"], "command": report["command"], "kinds": list(KINDS)}],
                  **{k: v for k, v in report.items() if k not in ("date", "command")}} if report else {}
    report.setdefault("sittings", [])
    report["trials"] = [t for t in report.get("trials", []) if t["kind"].split(" (")[0] not in kinds]
    if "bad inputs" in kinds:
        report.pop("bad_inputs", None)
    return report


def markdown(report: dict) -> str:
    trials = report["trials"]
    kinds = list(dict.fromkeys(t["kind"] for t in trials))
    sittings = "; ".join(f"`{s['command']}` ({s['date']}: {', '.join(s['kinds'])})" for s in report["sittings"])
    lines = [f"# Faults injected into training runs ({report['sittings'][-1]['date']})", "",
             f"{report['machine']['cpu_model']}, {report['machine']['cores']} cores. Commands: {sittings}.",
             "", f"LoRA on a tiny LLaMA, {STEPS} steps, a checkpoint every {EVERY} saved in the background. "
             "Survived: the finished run's losses and final adapters equal the uninterrupted run's bitwise, "
             "every checkpoint left restores, and a damaged checkpoint is kept (moved to checkpoints/damaged/) "
             "and passed over.", "",
             "| fault | trials | survived | checkpoints unreadable or lost | notes |",
             "| --- | ---: | ---: | ---: | --- |"]
    for kind in kinds:
        group = [t for t in trials if t["kind"] == kind]
        lost = sum(len(t.get("unreadable_checkpoints", [])) + (t.get("damaged_checkpoint_kept") is False)
                   for t in group)
        notes = ""
        resumed = sorted({int(t["resumed_from"]) for t in group if t.get("resumed_from")})
        if kind == "kill":
            notes = (f"{sum(t['killed_during_a_save'] for t in group)} killed during a save; resumed from "
                     f"steps {resumed}")
        elif kind == "process killed":
            clear = [t for t in group if t["survived"]]
            seconds = [t["survivor_ended_after_seconds"] for t in clear]
            notes = (f"killed: process 1 {sum(t['killed_process'] == 1 for t in group)} times, process 0 (the "
                     f"coordinator) {sum(t['killed_process'] == 0 for t in group)}; {len(clear)} survivors printed the "
                     f"one-line message and exited 3 after {min(seconds, default=0)}-{max(seconds, default=0)} s")
            if len(clear) < len(group):
                notes += (f"; {len(group) - len(clear)} did not (exit codes "
                          f"{sorted({t['survivor_exit_code'] for t in group if not t['survived']})})")
            relaunched = sum(t.get("same_losses", False) and t.get("same_adapters", False) for t in group)
            notes += f"; {relaunched} relaunches finished bitwise equal; resumed from steps {resumed}"
        lines.append(f"| {kind} | {len(group)} | {sum(t['survived'] for t in group)} | {lost} | {notes} |")
    if report.get("bad_inputs"):
        lines += ["", "Generated bad inputs (tests/bad_inputs.py): answered clearly means exit code 2 and one line "
                  "on stderr naming what is wrong, before any compile or download, no traceback, and checkpoints "
                  "unchanged.", "", "| input | tried | answered clearly |", "| --- | ---: | ---: |"]
        lines += [f"| {kind} | {c['tried']} | {c['answered_clearly']} |" for kind, c in report["bad_inputs"].items()]
    return "\n".join(lines) + "\n"


def uninterrupted(processes: list[subprocess.Popen], output: pathlib.Path) -> dict:
    """Waits for the uninterrupted run `processes` train into `output`; its losses, adapters, checkpoints and
    the seconds from its first checkpoint to its last (the window the kills fall in)."""
    start = time.perf_counter()
    while processes[0].poll() is None and not any(p.name.isdigit() for p in (output / "checkpoints").glob("*")):
        time.sleep(0.01)
    first_checkpoint = time.perf_counter()
    while processes[0].poll() is None and not (output / "checkpoints" / str(STEPS)).is_dir():
        time.sleep(0.01)
    last_checkpoint = time.perf_counter()
    if any(process.wait() != 0 for process in processes):
        sys.exit(f"the uninterrupted run in {output} failed")
    reference = {"output": output, "losses": losses(output), "adapters": final_adapters(output),
                 "checkpoints": checkpoint_steps(output),
                 "seconds_between_checkpoints": last_checkpoint - first_checkpoint}
    print(f"uninterrupted ({len(processes)} process{'es' if len(processes) > 1 else ''}): "
          f"{time.perf_counter() - start:.0f} s, {reference['seconds_between_checkpoints']:.1f} s from the first "
          f"checkpoint to the last, checkpoints {reference['checkpoints']}", flush=True)
    return reference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--damages", type=int, default=3, help="trials of each damage kind")
    parser.add_argument("--full-disks", type=int, default=2)
    parser.add_argument("--process-kills", type=int, default=5, help="2-process runs with one process killed")
    parser.add_argument("--kinds", default=",".join(KINDS),
                        help=f"comma-separated, of {', '.join(KINDS)}; the other kinds' results are kept from "
                             "--out/reliability.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, default=PROJECT_ROOT / "bench" / "results")
    parser.add_argument("--work", type=pathlib.Path, default=PROJECT_ROOT / "runs" / "bench-reliability")
    args = parser.parse_args()
    kinds = args.kinds.split(",")
    if unknown := set(kinds) - set(KINDS):
        parser.error(f"unknown --kinds {sorted(unknown)}; choose from {', '.join(KINDS)}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    rng = random.Random(args.seed)
    shutil.rmtree(args.work / "trials", ignore_errors=True)
    args.work.mkdir(parents=True, exist_ok=True)
    model = lay_out_model(args.work)

    if {"kill", "damage", "full disk"} & set(kinds):
        reference = uninterrupted([subprocess.Popen(command(model, args.work / "trials" / "uninterrupted"),
                                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)],
                                  args.work / "trials" / "uninterrupted")
    if args.process_kills and "process killed" in kinds:
        output = args.work / "trials" / "uninterrupted-2-processes"
        reference_2 = uninterrupted(two_processes(model, output, output.with_name(output.name + "-logs")), output)

    plan = ([("kill", None)] * args.kills + [("damage", kind) for kind in ("cut", "flipped", "missing")
                                             for _ in range(args.damages)] + [("full disk", None)] * args.full_disks
            + [("process killed", victim % 2) for victim in range(1, args.process_kills + 1)])
    plan = [(kind, detail) for kind, detail in plan if kind in kinds]
    report = earlier_results(args.out / "reliability.json", kinds)
    report["machine"] = {"cpu_model": cpu_model(), "cores": cores()}
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    report["sittings"].append({"date": now, "command": shlex.join(["python", "bench/reliability.py", *sys.argv[1:]]),
                               "kinds": kinds})
    for index, (kind, detail) in enumerate(plan):
        folder = args.work / "trials" / f"{index:03d}"
        if kind == "kill":
            trial = kill_trial(model, reference, folder, rng)
        elif kind == "damage":
            trial = damage_trial(model, reference, folder, detail, rng)
        elif kind == "full disk":
            trial = full_disk_trial(model, reference, folder)
        else:
            trial = process_kill_trial(model, reference_2, folder, rng, victim=detail)
        report["trials"].append(trial)
        print(f"[{index + 1}/{len(plan)}] {trial['kind']}: {'survived' if trial['survived'] else 'LOST'} {trial}",
              flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "reliability.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
        (args.out / "reliability.md").write_text(markdown(report))
        shutil.rmtree(folder, ignore_errors=True)
    if "bad inputs" in kinds:
        report["bad_inputs"] = bad_inputs(args.work)
        print(f"bad inputs: {report['bad_inputs']}", flush=True)
    (args.out / "reliability.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (args.out / "reliability.md").write_text(markdown(report))


if __name__ == "__main__":
    main()
