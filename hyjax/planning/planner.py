"""`plan(config, topology)`: will this run fit a TPU pod? (`python -m hyjax.plan`)

Compiles the real training step (the run's `RunPlan`, the same jitted step `python -m hyjax.train`
runs) ahead of time for a named TPU topology on this machine, without a TPU: libtpu describes the pod's chips
(`jax.experimental.topologies`), every input is abstract (`jax.ShapeDtypeStruct` with its sharding),
and no weight is read. Reports per-chip memory (arguments, temporaries, GRPO's reference policy, total
against HBM), FLOPs per step (the model FLOPs of the MFU convention), whether it fits, how the largest
arguments are split, the largest arrays the compiled step computes, with their TPU tile padding and
the operation behind each (`hyjax.planning.buffers`), and a roofline time bound from the compiled
step's own FLOPs and HBM traffic with every loop iteration counted (`hyjax.planning.cost`; XLA's
`cost_analysis()` counts a scanned layer once) against the chip's peak and bandwidth.

The architecture comes from `model.preset`; `model.path` is never read. A GRPO run's plan compiles its
own update (GRPO's objective on a rollout batch: `RunPlan.train_step`) and its sampling stage (the
sampler of `hyjax.sampling.sample_tokens` for `global_batch_size / group_size` prompts of the longest
prompt `data.max_length - grpo.max_new_tokens` allows, each continued `group_size` times: its KV cache,
logits and completions, counted as the sampler's temporaries and outputs while the state is held), and
counts the reference policy.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import topologies

from hyjax.config import ConfigError, RunConfig
from hyjax.model import abstract_params, count_params
from hyjax.methods import method_of
from hyjax.planning.buffers import largest_buffers, shard_shapes
from hyjax.planning.cost import Cost, program_cost
from hyjax.sampling import sample_tokens
from hyjax.training.optimizer import path_string
from hyjax.training.run_plan import plan_run, run_layout
from pallas_kernels import dispatch



@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation's chip, as Google Cloud publishes it: HBM (GiB), peak bfloat16 matmul FLOP/s
    and HBM bandwidth (bytes/s)."""

    hbm_gib: float
    peak_flops: float
    hbm_bandwidth: float


CHIPS = {"v4": Chip(32, 275e12, 1200e9), "v5e": Chip(16, 197e12, 819e9), "v5litepod": Chip(16, 197e12, 819e9),
         "v5p": Chip(95, 459e12, 2765e9), "v6e": Chip(32, 918e12, 1638e9)}
_ACCELERATOR_NAMES = {"v5e": "v5litepod"}  # generation -> its name in accelerator types (v5litepod-8)
MAX_CHIPS = 16384  # above any TPU pod: libtpu is not asked to describe more
_TOPOLOGY = re.compile(r"^(?P<generation>v4|v5e|v5litepod|v5p|v6e):(?P<shape>\d+(?:x\d+){1,2})$")


class PlanError(ValueError):
    """A topology, mesh or config the planner cannot compile for."""


def parse_topology(name: str) -> tuple[str, int]:
    """`(generation, chips)` of a topology name like `v5p:8x8x8` or `v6e:16x16`."""
    match = _TOPOLOGY.match(name)
    if match is None:
        raise PlanError(f"unknown TPU topology {name!r}: expected GENERATION:AxB[xC] with GENERATION one of "
                        f"{sorted(CHIPS)}, e.g. v5p:8x8x8 (512 chips) or v6e:16x16 (256 chips)")
    generation, shape = match["generation"], [int(n) for n in match["shape"].split("x")]
    if min(shape) < 1 or math.prod(shape) > MAX_CHIPS:
        raise PlanError(f"TPU topology {name!r} has {math.prod(shape)} chips: each dimension must be at least 1 "
                        f"and a slice at most {MAX_CHIPS} chips (v5p's largest pod has 8,960)")
    return generation, math.prod(shape)


def topology_devices(name: str) -> list:
    """The chips of a TPU topology, described by libtpu on a machine without a TPU."""
    generation, _ = parse_topology(name)
    if os.environ.get("TPU_SKIP_MDS_QUERY"):  # jax set it: no TPU chips here, no metadata server to ask
        # Without these libtpu asks for the host's accelerator type and workers anyway, and writes its
        # failure to stderr; a single host of the topology's generation is what it would find there.
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{_ACCELERATOR_NAMES.get(generation, generation)}-8")
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    try:
        return list(topologies.get_topology_desc(name, "tpu").devices)
    except (RuntimeError, ValueError) as err:
        raise PlanError(f"libtpu cannot describe TPU topology {name!r} ({err}); check the chip counts per "
                        "dimension (e.g. v5p:2x2x1, v5p:4x4x4, v5p:8x8x8; v6e:4x4, v6e:16x16) and that "
                        "jax[tpu] is installed") from err


@dataclasses.dataclass
class Plan:
    """What `plan` found: the compiled step's per-chip memory and FLOPs and the layout of its arrays."""

    topology: str
    chips: int
    mesh: dict[str, int]
    preset: str
    method: str
    batch: dict[str, int]  # global_batch, micro_batch, accumulation, seq
    parameters: int
    trainable_parameters: int
    # per chip: arguments, outputs, temporaries, aliased, reference and sampling (GRPO), total
    memory_gib: dict[str, float]
    hbm_gib: float
    fits: bool
    model_flops_per_chip: float  # 6 x parameters x tokens / chips: the MFU convention
    compile_seconds: float
    pallas_calls: int  # Pallas kernel calls in the compiled step (forward and backward; 0: XLA only)
    roofline: dict[str, float]  # per chip per step: flops, hbm_bytes, compute_s, memory_s, step_s, flop_utilization
    largest_arrays: list[dict[str, Any]]
    largest_buffers: list[dict[str, Any]]  # `hyjax.planning.buffers.Buffer.to_json()` of the compiled step
    selection: str | None = None  # what the method's start-up choice was taken to be (Hybrid-LoRA's modules)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def report(self) -> str:
        m, r = self.memory_gib, self.roofline
        mesh = " x ".join(f"{k} {v}" for k, v in self.mesh.items())
        update = m["temporaries"] + m["outputs"] - m["aliased"]
        lines = [
            f"{self.preset} {self.method} on {self.topology} ({self.chips} chips, mesh {mesh})",
            f"  batch {self.batch['global_batch']} x {self.batch['seq']} tokens ({self.batch['accumulation']} "
            f"micro-batches of {self.batch['micro_batch']}); {self.parameters / 1e9:.2f}B parameters, "
            f"{self.trainable_parameters:,} trainable"
            + (f" ({self.selection})" if self.selection else ""),
            f"  per chip: arguments {m['arguments']:.2f} GiB + " + (
                f"the larger of the update's {update:.2f} GiB and GRPO's sampling {m['sampling']:.2f} GiB"
                if m.get("sampling") else f"temporaries {m['temporaries']:.2f} GiB + outputs {m['outputs']:.2f} GiB "
                f"- donated {m['aliased']:.2f} GiB")
            + (f" + GRPO's reference policy {m['reference']:.2f} GiB" if m.get("reference") else "")
            + f" = {m['total']:.2f} GiB of {self.hbm_gib:.0f} GiB HBM: {'fits' if self.fits else 'DOES NOT FIT'}",
            f"  {self.model_flops_per_chip / 1e12:.2f} model TFLOP per chip per step (6 x parameters x tokens); "
            f"compiled in {self.compile_seconds:.0f} s; {self.pallas_calls} Pallas kernel calls",
            f"  roofline: {r['flops'] / 1e12:.2f} TFLOP and {r['hbm_bytes'] / 1e9:.1f} GB of HBM traffic per chip per "
            f"step (every loop iteration counted; Pallas kernels' FLOPs not): compute {r['compute_s'] * 1e3:.0f} ms, "
            f"memory {r['memory_s'] * 1e3:.0f} ms, so at least {r['step_s'] * 1e3:.0f} ms per step "
            f"({'compute' if r['compute_s'] >= r['memory_s'] else 'memory'}-bound; FLOPs busy "
            f"{r['flop_utilization']:.0%} of it)",
            "  largest arrays (global shape -> per-chip shard):",
        ]
        for a in self.largest_arrays:
            lines.append(f"    {a['path']:<44} {a['dtype']:<9} {str(a['shape']):<22} {a['spec']:<28} "
                         f"{a['shard_gib']:.3f} GiB/chip")
        lines.append("  largest arrays the step computes (per chip, with tile padding; shape-alike argument):")
        for b in self.largest_buffers:
            like = f" like {b['like']}" if b["like"] else ""
            lines.append(f"    {b['gib']:7.3f} GiB (unpadded {b['unpadded_gib']:.3f}) {b['array']:<28} {b['op']:<20} "
                         f"{b['source'][-70:]}{like}")
        return "\n".join(lines)


def plan(config: RunConfig, topology: str, largest: int = 8, selection: dict | None = None) -> Plan:
    """Compiles `config`'s training step for `topology` and measures it (see the module docstring).

    `selection`: the method's start-up choice as a run saved it (Hybrid-LoRA's `module_selection.json`);
    None plans the method's worst case (`Method.planned_selection`: the budget filled with the largest
    modules)."""
    generation, chips = parse_topology(topology)
    method = method_of(config)
    if selection is not None and method.SELECTION_KEY is None:
        raise PlanError(f"method {method.name!r} makes no start-up choice: drop the selection file")
    model_config = config.model.preset_config()
    if model_config is None:
        raise ConfigError("the planner needs model.preset (the architecture); model.path is never read")
    layout = run_layout(config.mesh, topology_devices(topology))
    chosen = None if selection is None else method.selection_from_json(selection)
    run = plan_run(config, model_config, layout, total_steps=config.train.steps or 1000, selection=chosen)
    described = None if method.SELECTION_KEY is None else (
        "its saved start-up choice" if chosen is not None else "its start-up choice at its largest")
    arguments = run.abstract_arguments()
    state, frozen = arguments[:2]
    start = time.perf_counter()
    with dispatch.compile_for("tpu"):  # the kernels a TPU run picks (impl="auto": Pallas), not this host's
        compiled = run.train_step().lower(*arguments).compile()
        sampling = sampling_bytes(run, state, frozen) if config.train.objective == "grpo" else 0
    seconds = time.perf_counter() - start
    hlo = compiled.as_text()
    arguments = shard_shapes({"state": state, "frozen": frozen}, {"state": run.shardings.state,
                                                                  "frozen": run.shardings.frozen})
    memory = compiled.memory_analysis()
    gib = 1024.0 ** 3
    sizes = {"arguments": memory.argument_size_in_bytes, "outputs": memory.output_size_in_bytes,
             "temporaries": memory.temp_size_in_bytes, "aliased": memory.alias_size_in_bytes}
    sizes["reference"] = reference_policy_bytes(config, (state.trainable, state.base),
                                                (run.shardings.state.trainable, run.shardings.state.base))
    sizes["sampling"] = sampling
    update = sizes["outputs"] + sizes["temporaries"] - sizes["aliased"]
    # the sampler runs between updates: the state and frozen weights are held through both
    sizes["total"] = sizes["arguments"] + max(update, sampling) + sizes["reference"]
    hbm = CHIPS[generation].hbm_gib
    parameters = count_params(abstract_params(model_config))
    train, seq = config.train, config.data.max_length
    return Plan(
        topology=topology, chips=chips, mesh=dict(layout.mesh.shape), preset=config.model.preset,
        method=config.method.name,
        batch={"global_batch": train.global_batch_size, "micro_batch": train.micro_batch,
               "accumulation": train.grad_accum_steps, "seq": seq},
        parameters=parameters, trainable_parameters=run.trainable_counts["total"],
        memory_gib={k: v / gib for k, v in sizes.items()}, hbm_gib=float(hbm), fits=sizes["total"] / gib <= hbm,
        model_flops_per_chip=6.0 * parameters * train.global_batch_size * seq / chips, compile_seconds=seconds,
        roofline=roofline(program_cost(hlo), CHIPS[generation]),
        largest_arrays=_largest({"state": state, "frozen": frozen},
                                {"state": run.shardings.state, "frozen": run.shardings.frozen}, largest),
        pallas_calls=hlo.count("custom_call_target=\"tpu_custom_call\""),
        largest_buffers=[b.to_json() for b in largest_buffers(hlo, largest, arguments)], selection=described)


def sampling_bytes(run, state, frozen) -> int:
    """Per-chip bytes GRPO's sampling stage adds while the state is held: the sampler's temporaries
    (KV cache of every completion, logits) and outputs (completions, their log-probabilities), compiled
    for the run's devices with the policy's parameters as the trainer hands them
    (`RunPlan.params`), for `global_batch_size / group_size` prompts of `data.max_length -
    grpo.max_new_tokens` tokens continued `group_size` times."""
    config = run.config
    grpo, layout = config.grpo, run.layout
    prompts = config.train.global_batch_size // grpo.group_size
    prompt_len = config.data.max_length - grpo.max_new_tokens
    if prompt_len < 1:
        raise PlanError(f"grpo.max_new_tokens={grpo.max_new_tokens} leaves no room for a prompt in "
                        f"data.max_length={config.data.max_length}")
    replicated = layout.replicated

    def policy_sample(state, frozen, tokens, valid, stop_ids, keys):
        return sample_tokens(run.model_config, run.params(state, frozen), tokens, valid, stop_ids, keys,
                             jnp.float32(grpo.temperature), jnp.float32(grpo.top_p),
                             max_new_tokens=grpo.max_new_tokens, copies=grpo.group_size)

    shape = jax.ShapeDtypeStruct
    keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), prompts * grpo.group_size))
    compiled = jax.jit(policy_sample).lower(
        state, frozen, shape((prompts, prompt_len), jnp.int32, sharding=replicated),
        shape((prompts, prompt_len), jnp.bool_, sharding=replicated), shape((1,), jnp.int32, sharding=replicated),
        shape(keys.shape, keys.dtype, sharding=replicated)).compile()
    memory = compiled.memory_analysis()
    return memory.temp_size_in_bytes + memory.output_size_in_bytes


def reference_policy_bytes(config: RunConfig, trained, shardings) -> int:
    """Per-chip bytes of GRPO's reference policy: a copy of what a run trains (`trained`: the trainable
    values and zo_fo's base weights) at step 0, split as they are (`hyjax.training.grpo.ReferencePolicy`),
    which the compiled step does not see; 0 for other objectives and with `grpo.beta: 0`. (The hybrid's
    step-0 lambdas, a few numbers per layer, are not counted.)"""
    if config.train.objective != "grpo" or config.grpo.beta == 0:
        return 0
    return sum(math.prod(sharding.shard_shape(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
               for leaf, sharding in zip(jax.tree.leaves(trained), jax.tree.leaves(shardings)))


def roofline(cost: Cost, chip: Chip) -> dict[str, float]:
    """The step's time bound on `chip` from its per-chip `cost`: its FLOPs at the chip's peak and its HBM
    traffic at the chip's bandwidth, whichever is longer (a bound: no overlap lost, no collective
    waits), and the share of that time the compiled FLOPs keep the matrix units busy. (Not MFU: the
    6 x parameters x tokens convention overstates an adapter step's work, whose frozen weights get no
    gradient.)"""
    compute, memory = cost.flops / chip.peak_flops, cost.bytes / chip.hbm_bandwidth
    step = max(compute, memory)
    return {"flops": cost.flops, "hbm_bytes": cost.bytes, "compute_s": compute, "memory_s": memory, "step_s": step,
            "flop_utilization": compute / step if step else 0.0}


def _largest(tree, shardings, count: int) -> list[dict[str, Any]]:
    """The `count` largest arrays of `tree`, with their shardings and per-chip shard sizes."""
    rows = []
    for (path, leaf), sharding in zip(jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(shardings)):
        shard = sharding.shard_shape(leaf.shape)
        itemsize = jnp.dtype(leaf.dtype).itemsize
        rows.append({"path": path_string(path), "shape": list(leaf.shape), "dtype": str(leaf.dtype),
                     "spec": str(tuple(sharding.spec)), "global_gib": math.prod(leaf.shape) * itemsize / 1024**3,
                     "shard_gib": math.prod(shard) * itemsize / 1024**3})
    return sorted(rows, key=lambda r: -r["global_gib"])[:count]
