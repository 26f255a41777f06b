"""train.py / search.py: bad input is one line "error: ..." on stderr and exit status 2, before
any training; --traceback shows the traceback; a bug elsewhere keeps its traceback."""

import os
import subprocess
import sys
import time

import pytest
from absl import app

from ofajax import errors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, *args):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  t0 = time.time()
  out = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
  return out, time.time() - t0


def _assert_one_line_error(out, seconds, *expected):
  assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("error: "), out.stderr[-3000:]
  for text in expected:
    assert text in last, last
  assert seconds < 30, f"took {seconds:.0f}s: not before training"


def test_train_unknown_dataset(tmp_path):
  workdir = str(tmp_path / "w")
  out, seconds = _run("train.py", "--config", "configs/default.py", "--workdir", workdir,
                      "--config.dataset=nope")
  _assert_one_line_error(out, seconds, "config.dataset 'nope'")
  assert not os.path.exists(os.path.join(workdir, "checkpoints"))


@pytest.mark.parametrize("config", [[], ["--config", "configs/default.py"]],
                         ids=["default_config", "explicit_config"])
def test_train_typo_in_config_key(tmp_path, config):
  # Without --config, ml_collections applies the override at import, with it during flag parsing.
  out, seconds = _run("train.py", *config, "--config.batchsize=8", "--workdir", str(tmp_path))
  _assert_one_line_error(out, seconds, "batchsize", "batch_size")


def test_train_missing_config_file_and_unknown_flag(tmp_path):
  out, seconds = _run("train.py", "--config", "configs/nope.py", "--workdir", str(tmp_path))
  _assert_one_line_error(out, seconds, "configs/nope.py")
  out, seconds = _run("train.py", "--no_such_flag", "--workdir", str(tmp_path))
  _assert_one_line_error(out, seconds, "no_such_flag")


def test_search_missing_workdir(tmp_path):
  missing = str(tmp_path / "missing")
  out, seconds = _run("search.py", "--workdir", missing)
  _assert_one_line_error(out, seconds, missing, "does not exist")


def test_traceback_flag_shows_the_traceback(tmp_path):
  missing = str(tmp_path / "missing")
  out, _ = _run("search.py", "--workdir", missing, "--traceback")
  assert out.returncode == 1, out.stderr[-3000:]
  assert "Traceback (most recent call last)" in out.stderr
  assert out.stderr.strip().splitlines()[-1].startswith("FileNotFoundError: ")


def test_messages_are_one_line():
  assert errors.message(ValueError("a\n  b")) == "a b"
  assert errors.message(KeyError("x")) == "KeyError: x"
  assert errors.message(AttributeError(KeyError("'k', did you mean 'j'?"))) == (
      "KeyError: 'k', did you mean 'j'?")
  assert errors.message(FileNotFoundError()) == "FileNotFoundError"
  assert ValueError in errors.USER_ERRORS and app.UsageError in errors.USER_ERRORS
  assert RuntimeError not in errors.USER_ERRORS and TypeError not in errors.USER_ERRORS


def test_run_main_outside_a_command_line_reraises():
  def bad():
    raise ValueError("x")
  with pytest.raises(ValueError):  # flags not parsed: a library call, not the CLI
    errors.run_main(bad)


def test_search_refuses_a_validation_split_training_saw(tmp_path):
  """The workdir trained on all of digits' train split: validating on its last 360 images would
  score subnets on images they trained on. One line naming both splits and the right pair,
  before any checkpoint is read (the workdir has none)."""
  from configs import default  # pylint: disable=g-import-not-at-top
  from ofajax.workdir import write_config  # pylint: disable=g-import-not-at-top

  train = default.get_config()
  train.dataset, train.data_dir, train.resolution = "digits", str(tmp_path / "tfds"), 8
  train.train_split, train.holdout = "train", 0
  workdir = str(tmp_path / "w")
  write_config(workdir, train)
  out, seconds = _run("search.py", "--workdir", workdir, "--config.valid_split=train[-360:]")
  _assert_one_line_error(out, seconds, "valid_split 'train[-360:]'", "train_split 'train'",
                         "in 360 examples",
                         "Train on train[:-360] and validate on train[-360:]")
