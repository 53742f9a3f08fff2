"""Multi-controller start-up on JAX's own runtime (`jax.distributed`)."""
from __future__ import annotations

import os

import jax
from absl import logging


def _launched_on_cluster() -> bool:
  # Only a task of an srun step with several tasks: the shell of an allocation (salloc -n 4,
  # an sbatch script) has SLURM_NTASKS > 1 too, yet each program it runs is a single process.
  env = os.environ
  if "SLURM_STEP_ID" in env and "SLURM_PROCID" in env:
    try:
      return int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1
    except ValueError:
      return False
  # Multi-host TPU VMs list every worker in this variable.
  return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


MODES = ("auto", "on", "off")


def _check_explicit(coordinator_address, num_processes, process_id) -> None:
  # JAX itself fails on a missing port with an IndexError from deep inside.
  host, sep, port = str(coordinator_address).rpartition(":")
  if not (isinstance(coordinator_address, str) and sep and host and port.isdigit()
          and 0 < int(port) < 65536):
    raise ValueError(f"--coordinator_address must be HOST:PORT (e.g. localhost:1234), "
                     f"got {coordinator_address!r}")
  if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
    raise ValueError(f"--num_processes must be an int >= 1, got {num_processes!r}")
  if (isinstance(process_id, bool) or not isinstance(process_id, int)
      or not 0 <= process_id < num_processes):
    raise ValueError(f"--process_id must be an int in [0, {num_processes}) "
                     f"(--num_processes={num_processes}), got {process_id!r}")


def initialize(mode: str = "auto", coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None) -> None:
  """Calls `jax.distributed.initialize` when this is a multi-process run.

  Explicit arguments win; ``mode="auto"`` initialises in an srun step with several
  tasks or on a multi-host TPU VM, where JAX detects everything itself.
  """
  if mode not in MODES:
    raise ValueError(f"mode (--distributed) must be one of {MODES}, got {mode!r}")
  explicit = [coordinator_address, num_processes, process_id]
  if any(a is not None for a in explicit):
    if any(a is None for a in explicit):
      raise ValueError("--coordinator_address, --num_processes and --process_id must be given "
                       f"together, got {explicit}")
    _check_explicit(coordinator_address, num_processes, process_id)
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  elif mode == "on" or (mode == "auto" and _launched_on_cluster()):
    try:
      jax.distributed.initialize()
    except ValueError as e:  # JAX's own words name none of our flags
      raise ValueError(f"jax.distributed.initialize() could not detect a cluster to join "
                       f"({str(e).rstrip('.')}). "
                       "It detects SLURM (an srun step), Cloud TPU VMs and other managed "
                       "clusters; elsewhere pass --coordinator_address, --num_processes and "
                       "--process_id, or --distributed=auto|off for one process") from e
  else:
    return
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
