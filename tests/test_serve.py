"""Serving an exported subnet (ofajax.serve, serve.py): a served PNG gets the engine's input and
prediction, bad files fail alone with their reason, a corrupt artifact or a missing summary is
one clear error, and the HTTP endpoint answers like the library."""

import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs.search import autoslim
from ofajax import cost, data, evaluation, serve
from ofajax.search.run import _export, search_evaluator
from ofajax.workdir import load_supernet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Test digits served: one engine batch. The engine has the shapes of test_search's (1 x 32
# calibration images, batches of 120, chunks of 4 archs): a full run can reuse its compilations.
N = 120


@pytest.fixture(scope="module")
def exported(tmp_path_factory, trained_workdir):
  """(export dir, engine, arch): the smallest arch of the session's trained supernet, calibrated
  and exported exactly as search.py does, and the engine that scored it on test[:N]."""
  sup = load_supernet(trained_workdir[0])  # only reads the workdir
  config = autoslim.get_config()
  config.calib_batches, config.calib_batch_size, config.valid_batch_size = 1, 32, N
  config.engine.chunk_size = 4
  engine = search_evaluator(config, sup, f"test[:{N}]", 8)
  arch = sup.space.to_host(sup.space.smallest())
  record = dict(arch=arch, resolution=8, **cost.count(sup.model, arch, 8), **engine([arch])[0])
  out = str(tmp_path_factory.mktemp("serve"))
  return _export(out, "smallest", sup, engine, record, 8), engine, arch


def _png(image: np.ndarray, mode: str = "L") -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image[..., 0]).convert(mode).save(buf, format="png")
  return buf.getvalue()


def _test_digits(data_dir):
  """(uint8 [N, 8, 8, 1] images, labels) of test[:N], as the data set stores them."""
  source = data.load("digits", f"test[:{N}]", data_dir)
  records = [source[i] for i in range(N)]
  return (np.stack([np.asarray(r["image"]) for r in records]),
          np.array([int(r["label"]) for r in records]))


def test_served_pngs_get_the_engines_inputs_and_predictions(exported, data_dir, tmp_path):
  path, engine, arch = exported
  summary = json.load(open(os.path.join(path, "summary.json")))
  assert summary["input"] == data.eval_input("digits", 8)
  assert summary["input"]["mean"] == [0.3055] and summary["input"]["crop_fraction"] is None
  images, labels = _test_digits(data_dir)
  files = []
  for i, image in enumerate(images):  # every third one as RGB: converted back to gray exactly
    (tmp_path / f"{i:03d}.png").write_bytes(_png(image, "RGB" if i % 3 == 0 else "L"))
    files.append(str(tmp_path / f"{i:03d}.png"))

  classifier = serve.load(path)
  batch = engine.eval_batches[0]
  served_inputs = np.stack([classifier.preprocess(open(f, "rb").read()) for f in files])
  np.testing.assert_array_equal(served_inputs, np.asarray(batch["inputs"]))
  np.testing.assert_array_equal(labels, np.asarray(batch["label"]))

  results = list(classifier.classify_files(files, top_k=3))
  assert all(r.ok for r in results), [r.error for r in results if not r.ok]
  served = np.array([r.top[0][0] for r in results])
  # The engine scores the served classes as if they were the labels (its own compiled function,
  # no new compile): 100% iff it predicts the served class for every image.
  as_labels = [dict(batch, label=jnp.asarray(served, jnp.int32))]
  agree = evaluation.Evaluator(engine.model, engine.variables, engine.calib_inputs, as_labels, N,
                               engine.chunk_size, engine.archs_per_call)([arch])[0]["top1"]
  assert agree == 1.0, f"{round((1 - agree) * N)} of {N} served classes are not the engine's"
  assert np.mean(served == labels) == summary["top1"] == engine([arch])[0]["top1"]
  assert summary["top1"] > 0.3  # a trained model, not a constant one
  for r in results:
    probs = [p for _, p in r.top]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-9


def test_bad_files_are_reported_and_the_rest_served(exported, data_dir, tmp_path):
  path = exported[0]
  images, _ = _test_digits(data_dir)
  good = _png(images[0])
  folder = tmp_path / "images"
  folder.mkdir()
  (folder / "a_good.png").write_bytes(good)
  (folder / "b_notes.txt").write_text("not an image\n")
  (folder / "c_truncated.png").write_bytes(good[:len(good) // 2])
  (folder / "d_good.png").write_bytes(_png(images[1], "RGB"))
  (folder / "e_sixteen_bit.png").write_bytes(_png(images[2].astype(np.int32) * 256, "I;16"))
  rgba = Image.fromarray(np.zeros((8, 8, 4), np.uint8))  # alpha 0: fully transparent
  rgba.save(folder / "f_transparent.png")

  files = serve.expand([str(folder)])
  results = {os.path.basename(r.source): r for r in serve.load(path).classify_files(files, 2)}
  assert sorted(results) == sorted(os.listdir(folder))
  assert results["a_good.png"].ok and results["d_good.png"].ok
  assert len(results["a_good.png"].top) == 2
  assert "not an image" in results["b_notes.txt"].error
  assert results["c_truncated.png"].error == "corrupt or truncated image: image file is truncated"
  assert "8-bit" in results["e_sixteen_bit.png"].error
  assert "transparent" in results["f_transparent.png"].error

  # The CLI (one subprocess: a JAX import): every file gets its line, the status says "failed".
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, os.path.join(ROOT, "serve.py"), "--subnet", path,
                        "--top_k", "2", str(folder)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 1, out.stderr[-3000:]
  lines = out.stdout.strip().splitlines()
  assert len(lines) == len(results), out.stdout
  for line, name in zip(lines, sorted(results)):  # the library's classes and reasons, in order
    r = results[name]
    assert line.startswith(f"{folder / name}: "), line
    if r.ok:
      assert re.fullmatch(r".*: \d \(0\.\d{3}\), \d \(0\.\d{3}\)", line), line
      assert re.findall(r"(\d+) \(", line) == [str(c) for c, _ in r.top], line
    else:
      assert line.endswith(f": error: {r.error}"), line
  assert "4 of 6 files could not be classified" in out.stderr


def test_a_corrupt_artifact_or_missing_summary_is_one_clear_error(exported, tmp_path):
  path = exported[0]
  corrupt = tmp_path / "corrupt"
  corrupt.mkdir()
  shutil.copy(os.path.join(path, "summary.json"), corrupt)
  (corrupt / "model.stablehlo").write_bytes(b"\x00garbage" * 100)
  with pytest.raises(ValueError, match=re.escape(str(corrupt / "model.stablehlo"))
                     + " is not a StableHLO artifact"):
    serve.load(str(corrupt))

  bare = tmp_path / "bare"
  bare.mkdir()
  shutil.copy(os.path.join(path, "model.stablehlo"), bare)
  with pytest.raises(FileNotFoundError, match=r"summary\.json is missing: serving reads how to "
                     r"preprocess images"):
    serve.load(str(bare / "model.stablehlo"))

  summary = json.load(open(os.path.join(path, "summary.json")))
  del summary["input"]
  (bare / "summary.json").write_text(json.dumps(summary))
  with pytest.raises(ValueError, match='has no "input" entry'):
    serve.load(str(bare))

  with pytest.raises(FileNotFoundError, match="nowhere not found: --subnet takes a directory"):
    serve.load(str(tmp_path / "nowhere"))


def test_http_endpoint_answers_like_the_library(exported, data_dir):
  classifier = serve.load(exported[0])
  images, _ = _test_digits(data_dir)
  png = _png(images[5])
  expected = classifier.classify_bytes(png, top_k=3)
  server = serve.make_server(classifier, "127.0.0.1", 0, top_k=3)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  url = f"http://127.0.0.1:{server.server_address[1]}"
  try:
    post = lambda body: urllib.request.urlopen(urllib.request.Request(
        f"{url}/classify", data=body, method="POST"), timeout=30)
    reply = json.load(post(png))
    assert [(t["class"], t["probability"]) for t in reply["top_k"]] == expected
    health = json.load(urllib.request.urlopen(f"{url}/health", timeout=30))
    assert health["status"] == "ok" and health["input"]["resolution"] == 8
    assert health["num_classes"] == 10
    with pytest.raises(urllib.error.HTTPError) as bad:
      post(b"not an image")
    assert bad.value.code == 400 and "not an image" in json.load(bad.value)["error"]
  finally:
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)
