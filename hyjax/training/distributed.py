"""Processes and devices of a run: `jax.distributed` start-up, the data-parallel mesh, and moving host
arrays onto it.

Until the sharding planner arrives, a run is data parallel: one mesh axis `data` over every device of
every process; parameters and optimizer state are replicated, each batch is split along its rows.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Starts `jax.distributed` when this is one process of several.

    Explicit arguments (or `HYJAX_COORDINATOR`, `HYJAX_NUM_PROCESSES`, `HYJAX_PROCESS_ID`) start it with
    that layout; on CPU the processes talk through gloo. Without them, cluster environments JAX
    recognises (TPU VM pods, SLURM) start it by auto-detection, and a single process does nothing.
    """
    coordinator = coordinator or os.environ.get("HYJAX_COORDINATOR")
    num_processes = num_processes or _int_env("HYJAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _int_env("HYJAX_PROCESS_ID")
    if coordinator is not None:
        if num_processes is None or process_id is None:
            raise ValueError("a coordinator address needs the process count and this process's id "
                             "(--num-processes and --process-id, or HYJAX_NUM_PROCESSES and HYJAX_PROCESS_ID)")
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
    elif _cluster_detected():
        jax.distributed.initialize()


def _int_env(name: str) -> int | None:
    value = os.environ.get(name)
    return None if value in (None, "") else int(value)


def _cluster_detected() -> bool:
    """A multi-host TPU VM or a SLURM job with several tasks."""
    return int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def data_mesh() -> Mesh:
    """Every device of every process on one `data` axis."""
    return Mesh(np.asarray(jax.devices()), ("data",))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Every array of `tree` (host or local) as a global array replicated over `mesh`; other leaves as is."""
    sharding = NamedSharding(mesh, P())

    def put(leaf):
        if not hasattr(leaf, "shape") or jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key):
            return leaf
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree)


def global_batch(local: dict[str, np.ndarray], mesh: Mesh, accumulation: int) -> dict[str, jax.Array]:
    """This process's rows `[rows, T]` as one global `[accumulation, micro_batch, T]` batch split over
    the `data` axis (micro-batch rows must divide by the device count)."""
    sharding = NamedSharding(mesh, P(None, "data"))

    def put(array):
        rows = array.shape[0]
        return jax.make_array_from_process_local_data(
            sharding, array.reshape(accumulation, rows // accumulation, *array.shape[1:]))

    return {key: put(value) for key, value in local.items()}


def any_process(flag: bool) -> bool:
    """Whether `flag` is set on any process (every process must call this at the same point)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))
