"""Train a supernet: python train.py --config configs/default.py --workdir /tmp/ofa [--config.x=y]

The same command runs on one CPU or GPU, on every GPU of a node, and, started once per host,
on several hosts (a TPU pod slice, GPU nodes):

  python train.py --multihost ...                 # Cloud TPU / Slurm / Open MPI / Kubernetes:
                                                  # JAX reads the job from the environment
  python train.py --coordinator_address=10.0.0.1:1234 --num_processes=2 --process_id=0 ...
                                                  # elsewhere: process 0's host:port, on each host

Bad input (a config value, a workdir, a flag) prints one line "error: ..." on stderr and exits
with status 2; --traceback shows where it was raised.
"""

from absl import app, flags, logging

from ofajax import distributed, errors

_CONFIG = errors.define_config_file("config", "configs/default.py", "training config file")
_WORKDIR = flags.DEFINE_string("workdir", "workdir/default", "where checkpoints and results go "
                               "(with several hosts: a directory all of them see)")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "join a multi-process job through "
                               "jax.distributed.initialize() with no arguments (Cloud TPU, "
                               "Slurm, Open MPI, Kubernetes find the job themselves)")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 (implies --multihost)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "processes in the job")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index, 0 .. n-1")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; use --config.key=value overrides")
  explicit = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if any(v is not None for v in explicit) and None in explicit:
    raise app.UsageError("--coordinator_address, --num_processes and --process_id go together; "
                         "give all three, or none with --multihost on a cluster JAX detects")
  logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
  if _MULTIHOST.value or _COORDINATOR.value is not None:
    # Before anything touches a device: the job's devices are only known after this.
    distributed.initialize(*explicit)
  task = _CONFIG.value.get("task", "classify")
  if task not in ("classify", "gan"):
    raise ValueError(f"config.task must be 'classify' or 'gan' (configs/gan_*.py), got {task!r}")
  if task == "gan":   # configs/gan_*.py: a generator against a discriminator (ofajax.gan)
    from ofajax.gan.train import train_and_evaluate  # pylint: disable=g-import-not-at-top
  else:
    from ofajax.train import train_and_evaluate  # pylint: disable=g-import-not-at-top
  train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  errors.run(main)
