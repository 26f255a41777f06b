"""Train a supernet: python train.py --config configs/default.py --workdir /tmp/ofa [--config.x=y]"""

from absl import app, flags, logging
from ml_collections import config_flags

from ofajax.train import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "training config file")
_WORKDIR = flags.DEFINE_string("workdir", "workdir/default", "where checkpoints and results go")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; use --config.key=value overrides")
  logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
  train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
