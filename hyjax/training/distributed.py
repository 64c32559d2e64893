"""Processes of a run: `jax.distributed` start-up, batches assembled from every process's rows, and
arrays gathered back to the host (the mesh and shardings live in `hyjax.sharding`)."""

from __future__ import annotations

import glob
import os
import re
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding


HEARTBEAT_TIMEOUT = 60  # seconds without a sign of life after which a process counts as dead


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, heartbeat_timeout: int | None = None) -> None:
    """Starts `jax.distributed` when this is one process of several.

    Explicit arguments (or `HYJAX_COORDINATOR`, `HYJAX_NUM_PROCESSES`, `HYJAX_PROCESS_ID`) start it with
    that layout; on CPU the processes talk through gloo. Without them, cluster environments JAX
    recognises (TPU VM pods, SLURM) start it by auto-detection, and a single process does nothing.
    When a process dies, the others end (JAX's coordination service names the lost process) once it has
    been silent for `heartbeat_timeout` seconds (or `HYJAX_HEARTBEAT_TIMEOUT`; default 60), instead of
    waiting forever in the next collective.
    """
    coordinator = _coordinator(coordinator)
    num_processes, process_id = process_layout(num_processes, process_id)
    heartbeat_timeout = heartbeat_timeout or _int_env("HYJAX_HEARTBEAT_TIMEOUT") or HEARTBEAT_TIMEOUT
    if coordinator is not None:
        if num_processes is None or process_id is None:
            raise ValueError("a coordinator address needs the process count and this process's id "
                             "(--num-processes and --process-id, or HYJAX_NUM_PROCESSES and HYJAX_PROCESS_ID)")
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id,
                                   heartbeat_timeout_seconds=heartbeat_timeout)
    elif _cluster_detected():
        jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_timeout)


def is_multi_process_launch(coordinator: str | None = None) -> bool:
    """Whether `initialize` with this coordinator argument starts a multi-process run (a coordinator
    given, or a cluster JAX detects), judged without starting anything."""
    return _coordinator(coordinator) is not None or _cluster_detected()


def process_layout(num_processes: int | None = None, process_id: int | None = None) -> tuple[int | None, int | None]:
    """`(process count, this process's id)` as given, else from HYJAX_NUM_PROCESSES and HYJAX_PROCESS_ID
    (None where neither says: a single process, or a cluster JAX detects)."""
    return (num_processes or _int_env("HYJAX_NUM_PROCESSES"),
            process_id if process_id is not None else _int_env("HYJAX_PROCESS_ID"))


def _coordinator(coordinator: str | None) -> str | None:
    return coordinator or os.environ.get("HYJAX_COORDINATOR")


def _int_env(name: str) -> int | None:
    value = os.environ.get(name)
    return None if value in (None, "") else int(value)


def _cluster_detected() -> bool:
    """A SLURM job with several tasks, or a TPU VM: JAX reads the VM's metadata to find the pod's other
    workers (`TPU_WORKER_HOSTNAMES` is only set on GKE)."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
        return True
    return os.path.exists("/dev/accel0") or bool(glob.glob("/dev/vfio/[0-9]*"))


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding, accumulation: int,
                 global_rows: int) -> dict[str, jax.Array]:
    """This process's rows `[rows, T]` as its part of one global `[accumulation, micro_batch, T]` batch of
    `global_rows` rows split by `sharding` (processes holding the same rows pass the same data)."""

    def put(array):
        rows = array.shape[0]
        local_batch = array.reshape(accumulation, rows // accumulation, *array.shape[1:])
        shape = (accumulation, global_rows // accumulation, *array.shape[1:])
        return jax.make_array_from_process_local_data(sharding, local_batch, shape)

    return {key: put(value) for key, value in local.items()}


def to_host(tree: Any) -> Any:
    """Every array of `tree` as a full numpy array on this process, gathered from every process's
    shards (every process must call this at the same point in a multi-process run)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def any_process(flag: bool) -> bool:
    """Whether `flag` is set on any process (every process must call this at the same point)."""
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


def wait_for_every_process(name: str) -> None:
    """Returns once every process has reached this point (`name` tells the barriers apart)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


_LOST_CONTACT = re.compile(r"gloo|connection|unavailable|heartbeat|barrier|coordination|deadline", re.IGNORECASE)
# What the multi-process runtime's own failures say when another library passes them on in its own
# exception type (Orbax raises a ValueError from a failed Gloo all-gather).
_PEER_RUNTIME = re.compile(r"gloo .*failed|heartbeat timeout|coordination ?service", re.IGNORECASE)


def peer_failure(error: BaseException) -> BaseException | None:
    """The error that shows a multi-process run losing contact with another process (a collective or
    barrier that failed because a peer died), or None when `error` is this process's own work's. Looks at
    `error` and what caused it (a checkpoint save whose barrier failed raises `CheckpointWriteError` from
    it) and returns the innermost match: the peer's failure itself, not a wrapper's account of it."""
    if jax.process_count() == 1:
        return None
    found = None
    while error is not None:
        words = _LOST_CONTACT if isinstance(error, jax.errors.JaxRuntimeError) else _PEER_RUNTIME
        if words.search(str(error)):
            found = error
        error = error.__cause__ or error.__context__
    return found
