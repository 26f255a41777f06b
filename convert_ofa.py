"""Import a published once-for-all supernet into an ofajax workdir.

  python convert_ofa.py --checkpoint ofa_mbv3_d234_e346_k357_w1.0 --model ofa_mbv3_w1.0 \
      --workdir workdir/ofa_mbv3_w1.0

Reads the PyTorch file (torch is needed only for this; a .npz of the state dict works without
it), maps every tensor onto the ofajax supernet and writes ``config.json`` +
``checkpoints/`` as a finished training run (configs/ofa_pretrained.py). ``--net_config`` also
translates a specialised subnet's ``net.config`` into an arch of the space (printed, and saved
as ``<workdir>/specialized_arch.json`` when a workdir is written).
"""

import os

from absl import app, flags

from configs import ofa_pretrained
from ofajax import cost, errors, models
from ofajax.convert import net_config as net_config_lib
from ofajax.convert import ofa_torch
from ofajax.convert.workdir import write_workdir

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "once-for-all supernet file (torch.load-able"
                                  " with a 'state_dict'), or a .npz of the state dict")
_MODEL = flags.DEFINE_string("model", None, f"one of {sorted(ofa_torch.PUBLISHED)} (or once-for-"
                             "all's id, e.g. ofa_mbv3_d234_e346_k357_w1.0)")
_WORKDIR = flags.DEFINE_string("workdir", None, "new directory for config.json and checkpoints")
_NET_CONFIG = flags.DEFINE_string("net_config", None, "a specialised subnet's net.config")
_RESOLUTION = flags.DEFINE_integer("resolution", 224, "input size for the printed MACs")
_ALLOW_PICKLE = flags.DEFINE_bool("allow_pickle", False, "torch.load(weights_only=False): only "
                                  "for files from a source you trust")


def _model_id(name: str | None) -> str:
  name = ofa_torch.OFA_NET_IDS.get(name, name)
  if name not in ofa_torch.PUBLISHED:
    raise app.UsageError(f"--model must be one of {sorted(ofa_torch.PUBLISHED)}, got {name!r}")
  return name


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if not _CHECKPOINT.value and not _NET_CONFIG.value:
    raise app.UsageError("pass --checkpoint (with --model and --workdir) and/or --net_config")
  if _CHECKPOINT.value and (not _MODEL.value or not _WORKDIR.value):
    raise app.UsageError("--checkpoint needs --model and --workdir")
  if _CHECKPOINT.value:
    model_id = _model_id(_MODEL.value)
    config = ofa_pretrained.get_config(model_id)
    name, options = config.model, dict(config.model_options)
  else:
    name, options = net_config_lib.model_for_net_config(_NET_CONFIG.value)
  model, space = models.get(name, **options)
  arch = None
  if _NET_CONFIG.value:  # checked against the checkpoint's supernet before anything is written
    arch = net_config_lib.arch_from_net_config(_NET_CONFIG.value, model)
    c = cost.count(model, arch, _RESOLUTION.value)
    print(f"{_NET_CONFIG.value}: subnet {space.name(arch)} of {name} {options}: "
          f"{c['macs'] / 1e6:.1f}M MACs at {_RESOLUTION.value}, {c['params'] / 1e6:.2f}M params")
    print(space.to_json(arch))
  if not _CHECKPOINT.value:
    return
  state_dict = ofa_torch.load_state_dict(_CHECKPOINT.value, _ALLOW_PICKLE.value)
  variables = ofa_torch.from_state_dict(state_dict, model, expected=model_id)
  step = write_workdir(_WORKDIR.value, config, variables,
                       {"imported_from": os.path.abspath(_CHECKPOINT.value)})
  if arch is not None:
    with open(os.path.join(_WORKDIR.value, "specialized_arch.json"), "w") as f:
      f.write(space.to_json(arch))
  big = cost.count(model, space.largest(), _RESOLUTION.value)
  print(f"imported {len(state_dict)} tensors of {model_id} into {_WORKDIR.value} (step {step}); "
        f"largest subnet {big['macs'] / 1e6:.1f}M MACs at {_RESOLUTION.value}, "
        f"{big['params'] / 1e6:.3f}M params")


if __name__ == "__main__":
  errors.run(main)
