"""MetricsWriter: metrics.jsonl lines as before, and TensorBoard event files read back."""

import glob
import json
import os
import struct

import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from ofajax.metrics_writer import MetricsWriter


def _events(logdir):
  """(step, tag, value) of every scalar in the TFRecord event files under ``logdir``."""
  out = []
  for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
    with open(path, "rb") as f:
      data = f.read()
    pos = 0
    while pos < len(data):  # record: u64 length, u32 crc, payload, u32 crc
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      out += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
  return out


def _lines(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_scalars_go_to_jsonl_and_tensorboard(tmp_path):
  workdir = str(tmp_path)
  with MetricsWriter(workdir, enabled=True) as writer:
    for step in (1, 2, 3):
      writer.write(step, {"phase": "full", "learning_rate": 0.1 / step,
                          "loss": np.float32(2.0 - 0.5 * step), "stage": {"acc": 0.25 * step}})
    writer.write_records(3, "eval", [
        {"name": "largest", "arch": [3, 5], "macs": 1000, "top1": 0.9},
        {"name": "smallest", "arch": [3, 3], "macs": 400, "top1": 0.7}])

  lines = _lines(workdir)
  assert lines[:3] == [{"step": s, "phase": "full", "learning_rate": 0.1 / s,
                        "loss": 2.0 - 0.5 * s, "stage": {"acc": 0.25 * s}} for s in (1, 2, 3)]
  assert list(lines[0]) == ["step", "phase", "learning_rate", "loss", "stage"]  # order kept
  assert lines[3] == {"step": 3, "eval": [
      {"name": "largest", "arch": [3, 5], "macs": 1000, "top1": 0.9},
      {"name": "smallest", "arch": [3, 3], "macs": 400, "top1": 0.7}]}

  events = _events(os.path.join(workdir, "tensorboard"))
  tags = {tag for _, tag, _ in events}
  assert tags == {"learning_rate", "loss", "stage/acc", "eval/largest/macs", "eval/largest/top1",
                  "eval/smallest/macs", "eval/smallest/top1"}  # no strings, names or lists
  by_tag = {}
  for step, tag, value in events:
    by_tag.setdefault(tag, []).append((step, value))
  assert by_tag["loss"] == [(1, 1.5), (2, 1.0), (3, 0.5)]
  np.testing.assert_allclose([v for _, v in by_tag["learning_rate"]], [0.1, 0.05, 0.1 / 3],
                             rtol=1e-6)
  assert [s for s, _ in by_tag["learning_rate"]] == [1, 2, 3]
  assert by_tag["eval/smallest/top1"] == [(3, pytest.approx(0.7))]
  assert by_tag["eval/largest/macs"] == [(3, 1000.0)]


def test_appends_to_an_existing_metrics_file(tmp_path):
  workdir = str(tmp_path)
  with MetricsWriter(workdir) as writer:
    writer.write(1, {"loss": 1.0})
  with MetricsWriter(workdir, purge_step=2) as writer:  # a resumed run
    writer.write(2, {"loss": 0.5})
  assert _lines(workdir) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]
  assert sorted(_events(os.path.join(workdir, "tensorboard"))) == [(1, "loss", 1.0),
                                                                   (2, "loss", 0.5)]


def test_disabled_writes_nothing(tmp_path):
  workdir = str(tmp_path / "w")
  writer = MetricsWriter(workdir, enabled=False)
  writer.write(1, {"loss": 1.0})
  writer.write_records(1, "eval", [{"name": "a", "top1": 0.5}])
  writer.close()
  assert not os.path.exists(workdir)


def test_step_is_not_a_value(tmp_path):
  with MetricsWriter(str(tmp_path), tensorboard=False) as writer:
    with pytest.raises(ValueError, match="step"):
      writer.write(1, {"step": 1})
  assert not os.path.exists(tmp_path / "tensorboard")
