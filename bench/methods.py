"""Benchmark: every fine-tuning method's training step against full fine-tuning and against HF PEFT.

    python bench/methods.py [--methods a,b] [--steps 5] [--batch 8] [--seq 128] [--no-peft] [--out bench/results]

On the real SmolLM2-135M-Instruct weights and one fixed batch of real SST-2 rows (packed into rows of
`--seq` tokens, as `data.packing=true` does), each method is built exactly as a training job builds it
(`load_config("methods/<name>")` + `prepare_run`, LoRA-GA's and Hybrid-LoRA's start-up gradient pass on
`--gradient-batches` batches, not timed) and its jitted step (`setup.plan.train_step()`, the run plan's)
is compiled, run once to warm up and then timed `--steps` times. The same step in HF PEFT (PyTorch CPU,
same weights, batch, loss and AdamW) is timed for LoRA, OFT, BOFT and full fine-tuning.

Every measurement runs in its own subprocess (`--one METHOD` / `--peft-one METHOD`) so that peak
resident memory does not mix between methods. Writes `methods.json` and `methods.md` under `--out`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np

from machine import cores, cpu_model
from peft_reference import PROJECTIONS

os.environ.setdefault("JAX_PLATFORMS", "cpu")

PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[1]
SST2 = PROJECT_ROOT.parent / "shared" / "data" / "sst2" / "train.tsv"
METHODS = ("full", "lora", "lora_ga", "oft", "boft", "unitary", "hybrid", "zo_fo", "hybrid_lora")
PEFT_METHODS = ("lora", "oft", "boft", "full")
FLOPS_FORMULA = ("6 * N * B * T: N = every model parameter (134.5M; the tied embedding counted once, as the "
                 "lm_head matmul), B * T = positions in the batch; the same for every method, so MFU compares "
                 "step times (PEFT methods do less work per token: no weight gradients of frozen layers; "
                 "zo_fo two more forward passes); attention score FLOPs are not counted")
MIB = 2**20


# ------------------------------------------------------------------------------------------ helpers


def reset_peak_rss() -> bool:
    """Resets the kernel's resident-set high-water mark (VmHWM) of this process to its current RSS."""
    try:
        pathlib.Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def proc_status_mib(field: str) -> float | None:
    """`VmHWM` (peak since the last reset) or `VmRSS` of this process, in MiB."""
    try:
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def process_peak_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def matmul_peak(n: int = 2048, reps: int = 10) -> float:
    """Best FLOP/s of a jitted f32 `n x n` matmul on this machine."""
    import jax
    import jax.numpy as jnp

    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def batch_file(args) -> pathlib.Path:
    return pathlib.Path(args.cache) / f"batch_{args.batch}x{args.seq}.npz"


def hf_folder(args) -> pathlib.Path:
    return pathlib.Path(args.cache) / "smollm2-135m-instruct-hf"


def overrides(method: str, args, output_dir: str) -> list[str]:
    """The job's config overrides: the real model, SST-2 packed into `--seq` tokens, `--batch` rows."""
    return [
        "model.path=smollm2-135m-instruct",
        f"data.path={args.data}",
        "data.packing=true",
        f"data.max_length={args.seq}",
        f"data.max_rows={max(512, 64 * args.batch)}",
        f"train.global_batch_size={args.batch}",
        "train.steps=1000",
        f"logging.output_dir={output_dir}",
        "logging.progress_bar=false",
        f"method.lora_ga.n_batches={args.gradient_batches}",
        f"method.hybrid_lora.n_batches={args.gradient_batches}",
    ]


# ----------------------------------------------------------------- subprocess: shared batch + HF folder


def prepare_inputs(args) -> dict:
    """Writes the fixed batch (the job's first packed batch) and, for PEFT, the weights as an HF folder."""
    from hyjax import pretrained
    from hyjax.weights import load_gguf, save_hf_checkpoint
    from hyjax.config import load_config
    from hyjax.data import prepare
    from hyjax.tokenization import load_tokenizer

    gguf = pretrained.smollm2_135m_instruct()
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config("methods/full", overrides("full", args, tmp))
    data = prepare(config.data, load_tokenizer(gguf), global_batch_size=config.train.global_batch_size,
                   process_index=0, process_count=1)
    batch = next(data.train)
    path = batch_file(args)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **batch)
    folder = hf_folder(args)
    if args.with_hf and not (folder / "config.json").is_file():
        model_config, params = load_gguf(gguf)
        save_hf_checkpoint(folder, model_config, params)
    return {"batch_file": str(path), "hf_folder": str(folder), "gguf": str(gguf),
            "real_tokens": int(np.sum(batch["segment_ids"] > 0)), "answer_tokens": int(np.sum(batch["loss_mask"])),
            "sequences": int(sum(len(set(row[row > 0].tolist())) for row in batch["segment_ids"]))}


# -------------------------------------------------------------------------- subprocess: one hyjax step


def run_ours(method: str, args) -> dict:
    """Setup, compile, warm-up and `args.steps` timed steps of `method`, built as `hyjax.train` builds it."""
    import jax

    from hyjax.config import load_config
    from hyjax.model import abstract_params, count_params
    from hyjax.training import distributed
    from hyjax.training.run_plan import run_layout
    from hyjax.training.setup import prepare_run

    def log(text):
        for line in str(text).splitlines():
            print(f"  [{method}] {line}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(f"methods/{method}", overrides(method, args, tmp))
        layout = run_layout(config.mesh)
        start = time.perf_counter()
        setup = prepare_run(config, layout=layout, log=log)
    local = dict(np.load(batch_file(args)))
    batch = distributed.global_batch(local, setup.plan.shardings.batch, 1, args.batch)
    # prepare_run dispatches asynchronously (LoRA-GA's SVDs, the adapters): finish it before measuring
    state, frozen = jax.block_until_ready((setup.initial_state(), setup.frozen))
    setup_s = time.perf_counter() - start
    step_fn = setup.plan.train_step()
    start = time.perf_counter()
    compiled = step_fn.lower(state, frozen, batch).compile()
    compile_s = time.perf_counter() - start
    stats = compiled.memory_analysis()
    memory = {"argument_bytes": stats.argument_size_in_bytes, "output_bytes": stats.output_size_in_bytes,
              "alias_bytes": stats.alias_size_in_bytes, "temp_bytes": stats.temp_size_in_bytes}
    memory["total_bytes"] = (memory["argument_bytes"] + memory["output_bytes"] - memory["alias_bytes"]
                             + memory["temp_bytes"])
    rss_before = proc_status_mib("VmRSS")
    reset = reset_peak_rss()
    start = time.perf_counter()
    state, metrics = jax.block_until_ready(compiled(state, frozen, batch))
    warmup_s = time.perf_counter() - start
    first = {key: float(value) for key, value in jax.device_get(metrics).items()}
    log(f"step 0: loss {first['loss']:.5f} ({warmup_s:.2f} s)")
    times = []
    for i in range(args.steps):
        start = time.perf_counter()
        state, metrics = jax.block_until_ready(compiled(state, frozen, batch))
        times.append(time.perf_counter() - start)
        log(f"step {i + 1}: loss {float(metrics['loss']):.5f} ({times[-1]:.2f} s)")
    result = {
        "trainable_params": setup.trainable_counts["total"],
        "trainable_by_kind": {k: v for k, v in setup.trainable_counts.items() if k != "total"},
        "model_params": count_params(abstract_params(setup.model_config)),
        "setup_s": setup_s, "compile_s": compile_s, "warmup_step_s": warmup_s, "step_s": times,
        "first_step_metrics": first, "first_step_loss": first["loss"],
        "rss_before_steps_mib": rss_before, "peak_rss_mib": proc_status_mib("VmHWM") if reset else None,
        "peak_rss_process_mib": process_peak_mib(), "compiled_memory": memory,
    }
    if setup.base is not None:
        result["zeroth_order_params"] = count_params(setup.base)
    if setup.selection is not None:
        result["module_selection"] = setup.selection.to_json()
    return result


# ------------------------------------------------------------------------- subprocess: one PEFT step


class BlockDiagStandIn:
    """Stands in for PEFT's CUDA extension `fbd_cuda` (needed for BOFT with m > 1): assembles
    `[N, D, b, b]` blocks into `[N, D b, D b]` block-diagonal matrices with `torch.block_diag`, and
    takes the diagonal blocks of the incoming gradient on the way back."""

    @staticmethod
    def forward(blocks):
        import torch

        return (torch.stack([torch.block_diag(*blocks[n]) for n in range(blocks.shape[0])]),)

    @staticmethod
    def backward(grad, blocks):
        import torch

        n, d, b, _ = blocks.shape
        diagonal = torch.diagonal(grad.reshape(n, d, b, d, b), dim1=1, dim2=3)  # [N, b, b, D]
        return (diagonal.permute(0, 3, 1, 2).contiguous(),)


def peft_model(method: str, folder: pathlib.Path):
    """`(model, config description)`: transformers' LLaMA on `folder`, wrapped by PEFT for `method`."""
    import peft
    import torch
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if method == "full":
        return model, {"peft": None}
    if method == "lora":
        config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=PROJECTIONS)
    else:
        if method == "boft":  # m = 2 needs fbd_cuda; PEFT would silently fall back to m = 1 on CPU
            import peft.tuners.boft.layer as boft_layer

            boft_layer._FBD_CUDA = BlockDiagStandIn
        config = peft.BOFTConfig(boft_block_size=8, boft_n_butterfly_factor=2 if method == "boft" else 1,
                                 boft_dropout=0.0, target_modules=PROJECTIONS)
    description = {k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()
                   if isinstance(v, (int, float, str, list, set, type(None)))}
    return peft.get_peft_model(model, config), description


def segment_mask(segment_ids):
    """`[B, 1, T, T]` boolean attention mask of the packed batch: causal, within a segment (as our model's
    `AttentionMask.causal` at real positions); a padding position attends to itself only, so no row is empty."""
    import torch

    seq = segment_ids.shape[1]
    causal = torch.tril(torch.ones(seq, seq, dtype=torch.bool))
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    mask = causal[None] & same & (segment_ids[:, None, :] != 0)
    return (mask | torch.eye(seq, dtype=torch.bool)[None])[:, None]


def run_peft(method: str, args) -> dict:
    """Warm-up and `args.steps` timed AdamW steps of PEFT's `method` on the fixed batch, with our loss:
    mean cross-entropy over the answer tokens (the same as labels of -100 outside the loss mask)."""
    import peft
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    transformers.utils.logging.disable_progress_bar()
    start = time.perf_counter()
    model, description = peft_model(method, hf_folder(args))
    setup_s = time.perf_counter() - start
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    batch = {k: torch.from_numpy(v) for k, v in np.load(batch_file(args)).items()}
    tokens, positions = batch["tokens"].long(), batch["positions"].long()
    targets, loss_mask = batch["targets"].long(), batch["loss_mask"]
    mask = segment_mask(batch["segment_ids"])

    def step() -> float:
        logits = model(input_ids=tokens, attention_mask=mask, position_ids=positions).logits
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
        loss = torch.sum(nll * loss_mask.flatten()) / torch.clamp(loss_mask.sum(), min=1.0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)  # as our step (train.grad_clip_norm 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    rss_before = proc_status_mib("VmRSS")
    reset = reset_peak_rss()
    start = time.perf_counter()
    first_loss = step()
    warmup_s = time.perf_counter() - start
    print(f"  [peft {method}] step 0: loss {first_loss:.5f} ({warmup_s:.2f} s)", flush=True)
    times = []
    for i in range(args.steps):
        start = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - start)
        print(f"  [peft {method}] step {i + 1}: loss {loss:.5f} ({times[-1]:.2f} s)", flush=True)
    peak = proc_status_mib("VmHWM") if reset else None
    a = torch.randn(2048, 2048)
    a @ a
    matmul = min(_time(lambda: a @ a) for _ in range(5))
    return {
        "trainable_params": sum(p.numel() for p in params), "setup_s": setup_s, "warmup_step_s": warmup_s,
        "step_s": times, "first_step_loss": first_loss, "rss_before_steps_mib": rss_before, "peak_rss_mib": peak,
        "peak_rss_process_mib": process_peak_mib(), "config": description, "lr": args.lr,
        "torch_threads": torch.get_num_threads(), "torch_matmul_gflop_per_s": 2 * 2048**3 / matmul / 1e9,
        "block_diag_stand_in": method == "boft", "peft": peft.__version__, "transformers": transformers.__version__,
    }


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ------------------------------------------------------------------------------------------- parent


def child(flag: str, name: str, args, extra=()) -> dict:
    """Runs this script with `flag name` in a fresh process and returns the JSON it writes."""
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "result.json"
        command = [sys.executable, __file__, flag, name, "--json-out", str(out), "--steps", str(args.steps),
                   "--batch", str(args.batch), "--seq", str(args.seq), "--cache", args.cache, "--data", args.data,
                   "--gradient-batches", str(args.gradient_batches), *extra]
        code = subprocess.run(command, cwd=PROJECT_ROOT).returncode
        if out.is_file():
            return json.loads(out.read_text())
        return {"error": f"subprocess exited with code {code} and wrote no result"}


def summarize(row: dict, tokens: int, flops: float, peak: float) -> dict:
    if "error" in row:
        return row
    median = statistics.median(row["step_s"]) if row["step_s"] else row["warmup_step_s"]
    row.update(median_step_s=median, tokens_per_s=tokens / median, model_flops_per_step=flops,
               mfu=flops / median / peak)
    return row


def _ratio(a: dict, b: dict | None, key: str) -> float | None:
    if b is None or "error" in a or "error" in b or a.get(key) is None or b.get(key) is None:
        return None
    return a[key] / b[key]


def run_all(args) -> dict:
    from hyjax.config import load_config
    from hyjax.model import abstract_params, count_params

    machine = {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "cores_used": cores(),
               "loadavg_start": os.getloadavg()}
    print(f"machine: {machine['cpu_model']}, {machine['cores_used']} cores; measuring the matmul peak", flush=True)
    peaks = [matmul_peak()]
    print(f"matmul peak {peaks[0] / 1e9:.1f} GFLOP/s (f32 2048 x 2048, best of 10); preparing the batch", flush=True)
    inputs = child("--prepare", "inputs", args, ["--with-hf"] if args.peft else [])
    if "error" in inputs:
        raise SystemExit(f"preparing the batch failed: {inputs['error']}")
    tokens = args.batch * args.seq
    print(f"batch: {args.batch} x {args.seq} positions, {inputs['real_tokens']} real tokens, "
          f"{inputs['sequences']} SST-2 sequences, {inputs['answer_tokens']} answer tokens", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        model_params = count_params(abstract_params(load_config("methods/full", overrides("full", args, tmp))
                                                    .model.preset_config()))
    flops = 6 * model_params * tokens
    ours, theirs = {}, {}
    for i, method in enumerate(args.methods, 1):
        print(f"[{i}/{len(args.methods)}] {method}", flush=True)
        ours[method] = child("--one", method, args)
    peft_methods = [m for m in PEFT_METHODS if m in args.methods] if args.peft else []
    for i, method in enumerate(peft_methods, 1):
        print(f"[peft {i}/{len(peft_methods)}] {method}", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            lr = load_config(f"methods/{method}", overrides(method, args, tmp)).train.learning_rate
        theirs[method] = child("--peft-one", method, args, ["--lr", str(lr), "--threads", str(cores())])
    peaks.append(matmul_peak())
    peak = max(peaks)
    for table in (ours, theirs):
        for row in table.values():
            summarize(row, tokens, flops, peak)
    for method, row in ours.items():
        row["time_vs_full"] = _ratio(row, ours.get("full"), "median_step_s")
        row["memory_vs_full"] = _ratio(row, ours.get("full"), "peak_rss_mib")
        row["time_vs_peft"] = _ratio(row, theirs.get(method), "median_step_s")
        row["memory_vs_peft"] = _ratio(row, theirs.get(method), "peak_rss_mib")
    for row in theirs.values():
        row["time_vs_full"] = _ratio(row, theirs.get("full"), "median_step_s")
        row["memory_vs_full"] = _ratio(row, theirs.get("full"), "peak_rss_mib")
    import jax
    import peft
    import torch
    import transformers

    machine.update(loadavg_end=os.getloadavg(), python=platform.python_version(), backend=jax.default_backend(),
                   jax=jax.__version__, torch=torch.__version__, peft=peft.__version__,
                   transformers=transformers.__version__, matmul_peaks_gflop_per_s=[p / 1e9 for p in peaks],
                   peak_matmul_gflop_per_s=peak / 1e9)
    return {
        "benchmark": "methods: every method's training step vs full fine-tuning and vs HF PEFT",
        "command": "python bench/methods.py " + " ".join(args.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "settings": {"model": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to float32)", "data": args.data,
                     "batch": args.batch, "seq": args.seq, "positions_per_step": tokens, "steps": args.steps,
                     "optimizer": "AdamW (each method's config learning rate, weight decay 0, clip 1.0)",
                     "gradient_batches": args.gradient_batches, **inputs},
        "machine": machine,
        "flops": {"formula": FLOPS_FORMULA, "model_params": model_params, "per_step": flops,
                  "peak": "best jitted f32 2048 x 2048 matmul (jax), before and after the methods"},
        "memory": ("peak_rss_mib: the process's resident high-water mark (VmHWM) over the warm-up and timed "
                   "steps, reset after setup and compilation; peak_rss_process_mib: the whole process's "
                   "(ru_maxrss, loading and compiling included); compiled_memory: XLA's memory_analysis of the step"),
        "methods": ours,
        "peft": theirs,
        "checks": loss_checks(ours, theirs),
    }


def loss_checks(ours: dict, theirs: dict, tol: float = 1e-3) -> dict:
    """Step-0 losses: every adapter starts as the identity, so each equals PEFT's on the same batch."""
    checks = {}
    for method, row in ours.items():
        other = theirs.get(method)
        if other is None or "error" in row or "error" in other:
            continue
        diff = abs(row["first_step_loss"] - other["first_step_loss"])
        checks[method] = {"ours": row["first_step_loss"], "peft": other["first_step_loss"], "abs_diff": diff,
                          "tol": tol, "passed": diff < tol}
    return checks


def _fmt(value, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def markdown(report: dict) -> str:
    s, m = report["settings"], report["machine"]
    lines = [
        f"# Training step per method vs full fine-tuning and HF PEFT: SmolLM2-135M, batch {s['batch']} x "
        f"{s['seq']} tokens, AdamW",
        "",
        f"{m['cpu_model']}, {m['cores_used']} cores (torch threads = cores), jax {m['jax']} ({m['backend']}), "
        f"torch {m['torch']}, peft {m['peft']}, transformers {m['transformers']}; {report['date']}; load average "
        f"{m['loadavg_start'][0]:.1f} at start, {m['loadavg_end'][0]:.1f} at end. Command: `{report['command']}`.",
        "",
        f"Batch: {s['real_tokens']} real tokens of {s['sequences']} SST-2 sequences packed into "
        f"{s['positions_per_step']} positions ({s['answer_tokens']} answer tokens carry the loss). Median of "
        f"{s['steps']} steps after compilation and one warm-up step. MFU: model FLOPs per step "
        f"{report['flops']['per_step'] / 1e9:.0f} GFLOP = {report['flops']['formula']}; over the measured "
        f"matmul peak {m['peak_matmul_gflop_per_s']:.0f} GFLOP/s. Peak RSS: resident high-water mark over the "
        "steps (after setup and compilation), each method in its own process. Ratios: time and peak RSS over "
        "full fine-tuning's (same framework) and over PEFT's same method.",
        "",
        "| method | trainable params | median s/step | tokens/s | MFU | peak RSS MiB | compiled temp MiB | time/full "
        "| memory/full | time/PEFT | memory/PEFT |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    rows = [(name, row) for name, row in report["methods"].items()]
    rows += [(f"PEFT {name}", row) for name, row in report["peft"].items()]
    for name, row in rows:
        if "error" in row:
            lines.append(f"| {name} | failed: {row['error'].splitlines()[-1][:120]} |" + " |" * 9)
            continue
        trainable = f"{row['trainable_params']:,}"
        if row.get("zeroth_order_params"):
            trainable += f" + {row['zeroth_order_params']:,} SPSA"
        temp = row.get("compiled_memory", {}).get("temp_bytes")
        lines.append(
            f"| {name} | {trainable} | {row['median_step_s']:.2f} | {row['tokens_per_s']:,.0f} | "
            f"{100 * row['mfu']:.1f}% | {_fmt(row['peak_rss_mib'], ',.0f')} | "
            f"{_fmt(temp and temp / MIB, ',.0f')} | {_fmt(row.get('time_vs_full'), '.2f')} | "
            f"{_fmt(row.get('memory_vs_full'), '.2f')} | {_fmt(row.get('time_vs_peft'), '.2f')} | "
            f"{_fmt(row.get('memory_vs_peft'), '.2f')} |")
    losses = ", ".join(f"{name} {row['first_step_loss']:.4f}" for name, row in rows if "error" not in row)
    lines += ["", f"Step-0 loss (every adapter starts as the identity): {losses}."]
    for method, check in report["checks"].items():
        lines.append(f"Check {method}: ours {check['ours']:.5f} vs PEFT {check['peft']:.5f}, |diff| "
                     f"{check['abs_diff']:.1e} ({'passed' if check['passed'] else 'FAILED'}, tol {check['tol']:g}).")
    if "boft" in report["peft"]:
        lines.append("PEFT BOFT (m = 2) needs its CUDA extension `fbd_cuda`; here a `torch.block_diag` stand-in "
                     "(forward and backward) replaces it, as tests/conftest.py's `peft_butterfly` does. PEFT OFT "
                     "(m = 1) runs PEFT's own CPU path.")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {','.join(METHODS)}")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after compilation and one warm-up step")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--no-peft", dest="peft", action="store_false", help="skip the HF PEFT runs")
    parser.add_argument("--out", default="bench/results", help="folder of methods.json and methods.md")
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "hyjax-bench-methods"),
                        help="folder of the fixed batch and the HF copy of the weights for PEFT")
    parser.add_argument("--data", default=str(SST2), help="training file the batch is read from")
    parser.add_argument("--gradient-batches", type=int, default=2,
                        help="batches of LoRA-GA's, the hybrid's and Hybrid-LoRA's start-up gradient (untimed)")
    for flag in ("--one", "--peft-one", "--prepare", "--json-out"):
        parser.add_argument(flag, help=argparse.SUPPRESS)
    parser.add_argument("--with-hf", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--lr", type=float, default=1e-4, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=cores(), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    if args.steps < 0 or args.batch < 1 or args.seq < 2:
        parser.error(f"need --steps >= 0, --batch >= 1, --seq >= 2 (got {args.steps}, {args.batch}, {args.seq})")
    return args


def main() -> None:
    args = parse_args()
    jobs = {"one": run_ours, "peft_one": run_peft, "prepare": lambda _, args: prepare_inputs(args)}
    job = next(((key, getattr(args, key)) for key in jobs if getattr(args, key)), None)
    if job is not None:  # a subprocess: one measurement, written as JSON even when it fails
        key, name = job
        try:
            result = jobs[key](name, args)
        except Exception:
            traceback.print_exc()
            result = {"error": traceback.format_exc(limit=3)}
        pathlib.Path(args.json_out).write_text(json.dumps(result, indent=1))
        raise SystemExit(1 if "error" in result else 0)
    report = run_all(args)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "methods.json").write_text(json.dumps(report, indent=1) + "\n")
    text = markdown(report)
    (out / "methods.md").write_text(text)
    print(text)
    failed = [name for table in ("methods", "peft") for name, row in report[table].items() if "error" in row]
    failed += [f"check {name}" for name, check in report["checks"].items() if not check["passed"]]
    if failed:
        raise SystemExit(f"failed: {failed} (see {out / 'methods.json'})")


if __name__ == "__main__":
    main()
