"""Multi-process start-up and global batches.

Call :func:`initialize` first thing in a training script, before anything touches a JAX backend
(``jax.devices()``, creating an array): ``jax.distributed.initialize`` refuses to run afterwards.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from titans_jax import sharding

log = logging.getLogger(__name__)

# Set to "1"/"auto" to force jax.distributed auto-detection (e.g. a GCE TPU pod, which JAX detects through the
# metadata server rather than environment variables), or to "0"/"off" to force a single process.
ENV_OVERRIDE = "TITANS_DISTRIBUTED"


def _int_env(env: Mapping[str, str], name: str, default: int = 1) -> int:
    try:
        return int(env.get(name, default))
    except ValueError:
        return default


def detect_cluster(env: Mapping[str, str] | None = None) -> str | None:
    """Names the multi-process launcher found in ``env`` (default ``os.environ``), or None for a single process.

    The rule, checked in this order:

    * ``TITANS_DISTRIBUTED`` is ``0``/``off``/``false`` -> None; ``1``/``auto``/``true`` -> ``"forced"``.
    * ``"slurm"``: ``SLURM_JOB_ID`` and ``SLURM_PROCID`` are set and ``SLURM_NTASKS`` > 1 (launched by ``srun``
      with several tasks; a single-task allocation is a plain process).
    * ``"tpu"``: ``MEGASCALE_COORDINATOR_ADDRESS`` is set (multi-slice), or ``TPU_WORKER_HOSTNAMES`` /
      ``TPU_PROCESS_ADDRESSES`` lists more than one host (a multi-host slice on GKE or a TPU VM).
    * ``"mpi"``: ``OMPI_MCA_orte_hnp_uri`` is set and ``OMPI_COMM_WORLD_SIZE`` > 1 (``mpirun``).
    """
    env = os.environ if env is None else env
    override = env.get(ENV_OVERRIDE, "").strip().lower()
    if override in ("0", "off", "false", "no"):
        return None
    if override in ("1", "auto", "true", "yes"):
        return "forced"
    if "SLURM_JOB_ID" in env and "SLURM_PROCID" in env and _int_env(env, "SLURM_NTASKS") > 1:
        return "slurm"
    hosts = env.get("TPU_WORKER_HOSTNAMES") or env.get("TPU_PROCESS_ADDRESSES") or ""
    if env.get("MEGASCALE_COORDINATOR_ADDRESS") or len([h for h in hosts.split(",") if h.strip()]) > 1:
        return "tpu"
    if "OMPI_MCA_orte_hnp_uri" in env and _int_env(env, "OMPI_COMM_WORLD_SIZE") > 1:
        return "mpi"
    return None


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    cpu_collectives: str | None = "gloo",
    env: Mapping[str, str] | None = None,
) -> bool:
    """Joins the processes of a multi-host run; a no-op for a single process.

    * All of ``coordinator`` (``host:port``), ``num_processes`` and ``process_id`` given: explicit start-up, the way
      to run several processes on one machine or on hosts without a known launcher.
    * None given: ``jax.distributed.initialize()`` with auto-detection when :func:`detect_cluster` finds a
      multi-process launcher (SLURM, a TPU pod, MPI), else nothing (single process).

    ``cpu_collectives`` (default ``"gloo"``) is set as ``jax_cpu_collectives_implementation`` before starting, so that
    cross-process collectives work on CPU devices; it only concerns the CPU backend, so it is harmless on GPU/TPU.
    Pass None to leave the setting alone.

    Returns:
      True when ``jax.distributed.initialize`` was called (or had already been), False for a single process.

    Raises:
      ValueError: when only some of the three flags are given (naming the missing ones), or they are invalid.
    """
    if jax.distributed.is_initialized():
        return True
    flags = {"--coordinator": coordinator, "--num_processes": num_processes, "--process_id": process_id}
    given = [k for k, v in flags.items() if v is not None]
    if given and len(given) < len(flags):
        missing = ", ".join(k for k in flags if k not in given)
        raise ValueError(
            f"{', '.join(given)} given without {missing}: pass all three for a multi-process run, "
            "or none to auto-detect the launcher (SLURM, TPU pod, MPI)."
        )
    if given:
        if int(num_processes) < 1 or not 0 <= int(process_id) < int(num_processes):
            raise ValueError(f"--process_id {process_id} must lie in [0, --num_processes={num_processes}).")
        if ":" not in coordinator:
            raise ValueError(f"--coordinator {coordinator!r} must be host:port.")
        _set_cpu_collectives(cpu_collectives)
        jax.distributed.initialize(
            coordinator_address=coordinator, num_processes=int(num_processes), process_id=int(process_id)
        )
        return True
    cluster = detect_cluster(env)
    if cluster is None:
        return False
    log.info("multi-process launcher detected (%s): jax.distributed.initialize() with auto-detection", cluster)
    _set_cpu_collectives(cpu_collectives)
    jax.distributed.initialize()
    return True


def _set_cpu_collectives(impl: str | None) -> None:
    if impl is not None:
        jax.config.update("jax_cpu_collectives_implementation", impl)


def global_batch_from_local(
    local_np_batch: Mapping[str, Any], mesh: Mesh, spec: PartitionSpec | None = None
) -> dict[str, jax.Array]:
    """Assembles each process's slice of the batch into global ``jax.Array``s sharded by ``spec`` on ``mesh``.

    Every process passes its own rows (leading axis = global batch / process count); the global batch is the
    concatenation in process order. ``spec`` defaults to :func:`titans_jax.sharding.batch_spec`, the leading (batch)
    axis as the logical rules map ``"batch"``; trailing axes it does not name are replicated.
    """
    target = NamedSharding(mesh, sharding.batch_spec() if spec is None else spec)
    return {k: jax.make_array_from_process_local_data(target, np.asarray(v)) for k, v in local_np_batch.items()}


def any_process(flag: bool) -> bool:
    """True when ``flag`` is true on any process (e.g. a SIGTERM seen by one host), so all processes act alike."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag, dtype=np.int32))))
