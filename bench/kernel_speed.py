"""Benchmark: BOFT butterfly and unitary operators, Pallas kernel vs XLA path vs dense matrix.

For each shape it times the forward (`x -> y`) and the training step's work (`value_and_grad`
with respect to x and the parameters) of: `pallas` (the kernel; skipped on CPU, where interpret
mode is for correctness only), `xla` (`impl="xla"`: for the butterfly one matmul over windows
where m <= 4, else factor by factor), `factors` (butterfly only: `butterfly_reference`, factor by
factor as PEFT does) and `dense` (build the d x d matrix from the parameters, then `x @ R`). It
reports the median time, a model of the bytes moved and the useful FLOPs, and the roofline
fraction: the time the better of the two limits allows (FLOPs at the measured matmul peak, bytes at
the measured copy bandwidth) over the measured time.

    python bench/kernel_speed.py --tokens 2048 --out bench/results/kernels_cpu      # writes .json and .md
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from machine import cpu_model
from pallas_kernels import butterfly as bf
from pallas_kernels import unitary as un


def _timeit(fn, *args, min_reps=5, budget_s=1.0):
    jax.block_until_ready(fn(*args))  # compile
    jax.block_until_ready(fn(*args))
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < budget_s and len(times) < 50):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measured_peaks(dtype):
    """Matmul FLOP/s and copy bandwidth (bytes read + written per second) on this device."""
    on_cpu = jax.default_backend() == "cpu"
    n = 2048 if on_cpu else 8192
    a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), dtype)
    flops = 2 * n**3 / _timeit(jax.jit(lambda a: a @ a), a)
    big = jnp.ones(((64 if on_cpu else 1024) * 1024 * 1024 // 4,), jnp.float32)
    bandwidth = 2 * big.nbytes / _timeit(jax.jit(lambda v: v * 2), big)
    return flops, bandwidth


def _butterfly_cases(d, b, m, dtype, t, block_sizes=None):
    rng = np.random.default_rng(0)
    blocks = jnp.asarray(np.linalg.qr(rng.normal(size=(m, d // b, b, b)))[0], jnp.float32)
    x = jnp.asarray(rng.normal(size=(t, d)), dtype)

    def dense(x, q):
        rotation = bf.butterfly_reference(jnp.eye(d, dtype=jnp.float32), q)  # [d, d]
        return (x @ rotation.astype(x.dtype)).astype(x.dtype)

    ops = {
        "pallas": lambda x, q: bf.butterfly_apply(x, q, impl="pallas", block_sizes=block_sizes),
        "xla": lambda x, q: bf.butterfly_apply(x, q, impl="xla"),
        "factors": bf.butterfly_reference,
        "dense": dense,
    }
    item = x.dtype.itemsize
    act = t * d * item
    model = {
        "pallas": (2 * t * d * b * m, 2 * act + blocks.nbytes),
        "xla": (2 * t * d * b * m, 2 * act + blocks.nbytes),
        "factors": (2 * t * d * b * m, 2 * act + blocks.nbytes),
        "dense": (2 * t * d * d + 2 * d * d * b * m, 2 * act + blocks.nbytes + d * d * (4 + item)),
    }
    return ops, (x, blocks), model


def _unitary_cases(d, dtype, t):
    rng = np.random.default_rng(0)
    h = d // 2
    theta = jnp.asarray(rng.normal(size=(3, h)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(2, 2, h)), jnp.float32)
    perm = rng.permutation(h)
    x = jnp.asarray(rng.normal(size=(t, d)), dtype)

    def dense(x, th, v):
        matrix = un.unitary_reference(jnp.eye(d, dtype=jnp.float32), th, v, perm)  # rows: U e_i
        return (x @ matrix.astype(x.dtype)).astype(x.dtype)

    ops = {
        "pallas": lambda x, th, v: un.unitary_apply(x, th, v, perm, impl="pallas"),
        "xla": lambda x, th, v: un.unitary_apply(x, th, v, perm, impl="xla"),
        "dense": dense,
    }
    fft_flops = 2 * 5 * h * math.log2(h)  # two complex FFTs per token
    structured = t * (fft_flops + 2 * 20 * h + 12 * h)
    act = t * d * x.dtype.itemsize
    model = {
        "pallas": (structured, 2 * act),
        "xla": (structured, 2 * act),
        "dense": (2 * t * d * d + d * (fft_flops + 52 * h), 2 * act + d * d * (4 + x.dtype.itemsize)),
    }
    return ops, (x, theta, v), model


def _loss(fn):
    """A loss whose parameter gradients are not zero: sum(y^2) is invariant under orthogonal maps."""

    def loss(*args):
        y = fn(*args).astype(jnp.float32)
        return jnp.sum(y * jnp.sin(jax.lax.broadcasted_iota(jnp.float32, y.shape, 1)))

    return loss


def _grads(fn, inputs):
    grads = jax.jit(jax.grad(_loss(fn), argnums=tuple(range(len(inputs)))))(*inputs)
    return [np.float32(g) for g in grads]


def _rel_err(got, want):
    return float(np.max(np.abs(np.float32(got) - want)) / np.max(np.abs(want)))


def _measure(op_name, shape, t, args, impl, op, inputs, model, want, want_grads, peak_flops, peak_bw):
    fwd = jax.jit(op)
    train = jax.jit(jax.value_and_grad(_loss(op), argnums=tuple(range(len(inputs)))))
    err = _rel_err(fwd(*inputs), want)
    grad_err = max(_rel_err(g, w) for g, w in zip(_grads(op, inputs), want_grads))
    flops, nbytes = model
    rows = []
    for mode, fn, scale in (("fwd", fwd, 1), ("fwd+bwd", train, 3)):
        seconds = _timeit(fn, *inputs, budget_s=args.budget)
        bound = max(scale * flops / peak_flops, scale * nbytes / peak_bw)
        rows.append(
            dict(op=op_name, **shape, tokens=t, dtype=args.dtype, impl=impl, mode=mode,
                 time_ms=seconds * 1e3, gflops=scale * flops / 1e9, mbytes=scale * nbytes / 1e6,
                 gflop_per_s=scale * flops / seconds / 1e9, roofline=bound / seconds,
                 rel_err_vs_xla=err if mode == "fwd" else grad_err)
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def run(args):
    on_cpu = jax.default_backend() == "cpu"
    impls = args.impls or (["xla", "factors", "dense"] if on_cpu else ["pallas", "xla", "factors", "dense"])
    tiles = None
    if args.block_tokens:
        tiles = bf.BlockSizes(args.block_tokens, args.block_d, args.bwd_block_tokens)
    dtype = jnp.dtype(args.dtype)
    peak_flops, peak_bw = measured_peaks(dtype)
    rows = []
    cases = [("butterfly", dict(d=d, b=b, m=m)) for d in args.d for b in args.b for m in args.m
             if d % (b * 2 ** (m - 1)) == 0]
    cases += [("unitary", dict(d=d)) for d in args.d if args.unitary]
    for op_name, shape in cases:
        for t in args.tokens:
            if op_name == "butterfly":
                ops, inputs, model = _butterfly_cases(shape["d"], shape["b"], shape["m"], dtype, t, tiles)
            else:
                ops, inputs, model = _unitary_cases(shape["d"], dtype, t)
            want = np.float32(jax.jit(ops["xla"])(*inputs))
            want_grads = _grads(ops["xla"], inputs)
            for impl in (impl for impl in impls if impl in ops):
                try:
                    rows.extend(_measure(op_name, shape, t, args, impl, ops[impl], inputs, model[impl],
                                         want, want_grads, peak_flops, peak_bw))
                except Exception as e:  # a backend that cannot lower this shape: record why
                    rows.append(dict(op=op_name, **shape, tokens=t, dtype=args.dtype, impl=impl,
                                     error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"))
                    print(json.dumps(rows[-1]), flush=True)
    device = jax.devices()[0]
    machine = dict(
        backend=jax.default_backend(),
        device=getattr(device, "device_kind", str(device)),
        host=cpu_model(),
        cpu_count=__import__("os").cpu_count(),
        jax=jax.__version__,
        peak_matmul_gflop_per_s=peak_flops / 1e9,
        peak_copy_gbyte_per_s=peak_bw / 1e9,
    )
    return machine, rows


def write(out, machine, rows, note):
    with open(out + ".json", "w") as f:
        json.dump(dict(machine=machine, rows=rows), f, indent=1)
    lines = [
        f"# Kernel benchmark: {machine['device']} ({machine['backend']})",
        "",
        f"Machine: {machine['device']}, host {machine['host']} with {machine['cpu_count']} cores, "
        f"jax {machine['jax']}. "
        f"Measured peaks: matmul {machine['peak_matmul_gflop_per_s']:.0f} GFLOP/s, "
        f"copy {machine['peak_copy_gbyte_per_s']:.1f} GB/s. {note}",
        "",
        "Bytes and FLOPs are models (useful work, not the kernel's padded MXU work); "
        "fwd+bwd counts 3x; the error column compares forward outputs (fwd rows) and gradients "
        "(fwd+bwd rows) with the XLA path's. Roofline = max(FLOPs/peak, bytes/bandwidth) / time.",
        "",
        "| op | d | b | m | tokens | impl | mode | ms | GFLOP | MB | GFLOP/s | roofline | max err / max abs vs xla |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['op']} | {r['d']} | {r.get('b', '')} | {r.get('m', '')} | {r['tokens']} | "
                         f"{r['impl']} | failed: {r['error']} |")
            continue
        lines.append(
            f"| {r['op']} | {r['d']} | {r.get('b', '')} | {r.get('m', '')} | {r['tokens']} | {r['impl']} | "
            f"{r['mode']} | {r['time_ms']:.3f} | {r['gflops']:.3f} | {r['mbytes']:.1f} | "
            f"{r['gflop_per_s']:.1f} | {r['roofline']:.1%} | {r['rel_err_vs_xla']:.1e} |"
        )
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, nargs="+", default=[576, 2048])
    parser.add_argument("--b", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--m", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--note", default="")
    parser.add_argument("--budget", type=float, default=1.0, help="seconds of timed repetitions per row")
    parser.add_argument("--impls", nargs="+", choices=["pallas", "xla", "factors", "dense"],
                        help="default: all that run here")
    parser.add_argument("--no-unitary", dest="unitary", action="store_false", help="butterfly only")
    parser.add_argument("--block-tokens", type=int, help="butterfly kernel tiling (default: per platform)")
    parser.add_argument("--block-d", type=int, default=128)
    parser.add_argument("--bwd-block-tokens", type=int, default=1024)
    parser.add_argument("--out", required=True, help="path without extension")
    args = parser.parse_args()
    machine, rows = run(args)
    write(args.out, machine, rows, args.note)


if __name__ == "__main__":
    main()
