"""Devices for data-parallel training: multi-host start, the mesh, shardings, global batches.

The same code runs on one CPU, one GPU, the 8 GPUs of a node and a TPU pod slice of many hosts
(one Python process per host, all running the same program, "multi-controller" JAX):

  initialize(...)          jax.distributed.initialize, once per process, before any computation
  make_mesh(num_devices)   a ("data", "model") mesh over every device of every process
  replicate(tree, mesh)    host values -> global arrays, a full copy on every device (params)
  shard_batch(batch, ...)  each process's slice of the global batch -> one global array

Parameters and optimizer state are replicated; the batch is split over the "data" axis. Under
``jax.jit`` with these shardings XLA inserts the collectives itself: BatchNorm statistics, the
loss and the gradients are computed over the global batch, exactly as on one device (up to the
order of float additions). The "model" axis has size 1 for now; it is where tensor parallelism
would go.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA, MODEL = "data", "model"


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """Joins this process to a multi-process job (``jax.distributed.initialize``).

  Without arguments JAX finds the job from its environment (Cloud TPU, Slurm, Open MPI,
  Kubernetes / GKE). Elsewhere pass all three: the coordinator is process 0's ``host:port``.
  CPU processes exchange collectives over gloo (TCP).
  """
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)


def make_mesh(num_devices: int = 0) -> Mesh:
  """A (num_devices, 1) mesh with axes ("data", "model"); 0 means every device of every process.

  A smaller count takes the first devices of this process (one process only: for tests and
  benchmarks). The axes are Auto (sharding propagation by the compiler), not jax.make_mesh's
  default Explicit: the model code (masks, lax.cond, scans with carries built from zeros) was
  written without sharding-aware types, and with Auto a sharded batch needs no change there.
  """
  devices = jax.devices()
  if num_devices < 0 or num_devices > len(devices):
    raise ValueError(f"config.num_devices={num_devices} but {len(devices)} devices are visible "
                     f"({devices[0].platform}); use 0 (all) or a count up to {len(devices)}")
  if num_devices and num_devices != len(devices) and jax.process_count() > 1:
    raise ValueError(f"config.num_devices={num_devices}: a multi-process job must use all "
                     f"{len(devices)} devices (set config.num_devices=0)")
  n = num_devices or len(devices)
  return jax.make_mesh((n, 1), (DATA, MODEL), axis_types=(AxisType.Auto, AxisType.Auto),
                       devices=devices[:n])


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, batch_axis: int = 0) -> NamedSharding:
  """Splits axis ``batch_axis`` over "data" (1 for stacks of batches: [num_batches, B, ...])."""
  return NamedSharding(mesh, P(*([None] * batch_axis), DATA))


def check_batch_size(batch_size: int, num_shards: int, what: str = "config.batch_size") -> None:
  """A global batch must split evenly over the data axis; the error names sizes that would."""
  if batch_size % num_shards == 0 and batch_size > 0:
    return
  lower = batch_size // num_shards * num_shards
  fits = [b for b in (lower, lower + num_shards) if b > 0]
  per_device = " or ".join(str(b // num_shards) for b in fits)
  raise ValueError(
      f"{what}={batch_size} is the global batch (all devices together) and must be a positive "
      f"multiple of the {num_shards} devices of the mesh's data axis; use e.g. "
      f"{' or '.join(map(str, fits))} ({per_device} examples per device)")


def process_block(mesh: Mesh, global_batch: int) -> tuple[int, int]:
  """(index, count): this process holds the index-th of count contiguous equal blocks of every
  data-sharded global batch. The input pipeline reads exactly that block
  (``data.make_train_iterator(process_index=index, process_count=count)``); it is the
  process index unless the mesh orders devices differently."""
  indices = batch_sharding(mesh).addressable_devices_indices_map((global_batch,)).values()
  starts = sorted({s.start or 0 for (s,) in indices})
  stops = sorted({global_batch if s.stop is None else s.stop for (s,) in indices})
  size = global_batch // jax.process_count()
  if starts[0] % size or stops[-1] - starts[0] != size:
    raise ValueError(f"this process's devices hold rows {starts[0]}..{stops[-1]} of a global "
                     f"batch of {global_batch}: not one contiguous block of {size}")
  return starts[0] // size, jax.process_count()


def replicate(tree, mesh: Mesh):
  """Host (or single-device) values, equal on every process -> replicated global arrays.

  ``make_array_from_process_local_data`` rather than ``device_put`` because the latter
  compares the value across processes first (one collective per leaf)."""
  sharding = replicated(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def shard_batch(batch: dict, mesh: Mesh, global_batch: int, batch_axis: int = 0) -> dict:
  """This process's block of a batch (numpy, from the input pipeline) -> global arrays."""
  sharding = batch_sharding(mesh, batch_axis)

  def one(x):
    x = np.asarray(x)
    shape = x.shape[:batch_axis] + (global_batch,) + x.shape[batch_axis + 1:]
    return jax.make_array_from_process_local_data(sharding, x, shape)

  return {k: one(v) for k, v in batch.items()}


def describe(mesh: Mesh) -> str:
  """One line for the log: devices, processes, mesh axes."""
  d = mesh.devices.flat[0]
  return (f"mesh {dict(mesh.shape)} over {mesh.devices.size} {d.platform} device(s), "
          f"{jax.process_count()} process(es)")
