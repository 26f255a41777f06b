"""Search a trained supernet: python search.py --config configs/search/autoslim.py --workdir <train workdir>

Bad input (a config value, a missing workdir, an impossible target) prints one line
"error: ..." on stderr and exits with status 2; --traceback shows where it was raised.
"""

from absl import app, flags, logging

from ofajax import errors
from ofajax.search.run import run_search
from ofajax.workdir import read_config

_CONFIG = errors.define_config_file("config", "configs/search/evolution.py",
                                    "search config file")
_WORKDIR = flags.DEFINE_string("workdir", "workdir/default",
                               "the training workdir (config.json + checkpoints); results go to "
                               "<workdir>/search/<config.name>/")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; use --config.key=value overrides")
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  if read_config(_WORKDIR.value).get("task", "classify") == "gan":
    from ofajax.gan.search import run_gan_search  # pylint: disable=g-import-not-at-top
    run_gan_search(_CONFIG.value, _WORKDIR.value)
  else:
    run_search(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  errors.run(main)
