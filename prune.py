"""Prune a trained supernet to one smaller dense model by channel importance:

  python prune.py --workdir <train workdir> --out <dir> [--keep 0.5] [--criterion l1|bn_scale]

Every elastic channel group keeps its most important ``--keep`` share (``l1``: the filters' L1
norm; ``bn_scale``: |gamma| of its BatchNorms). ``<dir>`` gets ``pruned.msgpack``, the variables
of your own module built at the pruned widths, and ``pruned.json``, those widths per layer, the
arch and the MACs / params before and after; fine-tune the model from there. See ofajax/prune.py.

Bad input (a missing workdir, a keep outside (0, 1], a keep that empties a layer) prints one
line "error: ..." on stderr and exits with status 2; --traceback shows where it was raised.
"""

from absl import app, flags, logging

from ofajax import errors
from ofajax.prune import CRITERIA, prune_workdir

_WORKDIR = flags.DEFINE_string("workdir", None, "the training workdir (config.json + "
                               "checkpoints) of the supernet to prune")
_OUT = flags.DEFINE_string("out", None, "directory for pruned.msgpack and pruned.json")
_KEEP = flags.DEFINE_float("keep", 0.5, "share of every elastic channel group kept, in (0, 1]")
_CRITERION = flags.DEFINE_enum("criterion", "l1", sorted(CRITERIA),
                               "channel importance: l1 (filter L1 norm, Li et al. 2017) or "
                               "bn_scale (|BatchNorm gamma|, Network Slimming)")
_DIVISOR = flags.DEFINE_integer("divisor", 1, "kept widths are multiples of it")
_STEP = flags.DEFINE_integer("step", None, "checkpoint step to prune (default: the latest)")
flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO
  try:
    prune_workdir(_WORKDIR.value, _OUT.value, _KEEP.value, _CRITERION.value, _DIVISOR.value,
                  _STEP.value)
  except NotImplementedError as e:   # a model prune has no ranking for: the user's choice
    raise app.UsageError(str(e)) from e


if __name__ == "__main__":
  errors.run(main)
