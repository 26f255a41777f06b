"""int8 subnets (ofajax.quantize, ofajax.search.int8): int8 kernels and ops in the StableHLO
artifact, a round trip that reproduces the in-process int8 model, int8 top-1 within a stated
bound of float on the shipped digits, the artifact's per-weight size, bad input, and the
search's int8 re-choice and export."""

import json
import os
import re
import shutil

import flax.linen as nn
from flax import errors
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix

from configs.search import autoslim
from ofajax import evaluation, export, qat, quantize, serve
from ofajax.search import int8
from ofajax.search.run import run_search, search_evaluator
from ofajax.workdir import load_supernet

RES = 8
# int8 top-1 may fall this far below float on the 360 test digits: 3 points, 10 images. The
# session's tiny supernet (8x8 digits, 60 steps) is weak, its largest subnet 55% accurate with
# small logit margins, so rounding flips more predictions than on the default workdir (where
# the drop is 0.1-0.4 points, docs/deployment.md). Measured here: 1.7 points (6 images).
MAX_DROP = 0.03
# Cosine of QAT's straight-through gradients with the float model's, per top-level module:
# (lowest, median) must exceed these. Measured on the session's tiny supernet (8x8 digits,
# coarse roundings): 0.71 and 0.87; on the default workdir 0.985 and 0.99.
COSINE_MIN = (0.5, 0.8)


@pytest.fixture(scope="module")
def setup(trained_workdir, data_dir):
  """(supernet, engine on the test digits, calibration inputs): the engine has test_search's
  shapes (1 x 32 calibration images, batches of 120, chunks of 4) so compilations are shared."""
  sup = load_supernet(trained_workdir[0])  # only reads the workdir
  config = autoslim.get_config()
  config.calib_batches, config.calib_batch_size, config.valid_batch_size = 1, 32, 120
  config.engine.chunk_size = 4
  engine = search_evaluator(config, sup, "test", RES)
  calib = evaluation.calibration_inputs("digits", sup.config.train_split, data_dir, 32, 4,
                                        seed=1, resolution=RES)
  return sup, engine, calib


def _dense(setup, arch):
  sup, engine, _ = setup
  arch = sup.space.validate(arch)
  return export.extract_subnet(sup.model, engine.calibrated_variables(arch), arch, sup.space)


@pytest.fixture(scope="module")
def largest(setup):
  """(dense model, float variables, Int8Model) of the largest subnet."""
  sup, _, calib = setup
  model, variables = _dense(setup, sup.space.largest())
  return model, variables, quantize.quantize(model, variables, calib)


@pytest.fixture(scope="module")
def folded(largest, setup):
  """(float variables with the BatchNorms folded in, folded BN paths) of the largest subnet,
  as quantize folds them (on the first calibration batch)."""
  model, variables, _ = largest
  return quantize.fold_batchnorm(model, variables, setup[2][0])


def _test_batches(setup):
  engine = setup[1]
  return engine.eval_batches() if callable(engine.eval_batches) else engine.eval_batches


def _first_inputs(setup):
  """The first test batch (120 digits): the shape every compiled function here already has."""
  return jnp.asarray(next(iter(_test_batches(setup)))["inputs"])


def test_int8_round_trip_gives_the_in_process_logits(largest, setup, tmp_path):
  model, _, qmodel = largest
  path = str(tmp_path / "int8.stablehlo")
  exported = quantize.save_stablehlo(qmodel, path, RES)
  served = export.load_stablehlo(path)  # plain jax.export
  x = _first_inputs(setup)
  want = qmodel.logits_fn(x)
  got = served(x)
  assert got.shape == want.shape == (120, 10)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0,
                             atol=1e-5 * float(jnp.max(jnp.abs(want))))
  assert served(x[:3]).shape == (3, 10)  # any batch size
  # Every conv and dot of a kernel-owning module but the depthwise ones (float ops by default)
  # runs on int8 operands; every kernel, depthwise too, is an int8 constant.
  text = exported.mlir_module()
  ops = re.findall(r"stablehlo\.(convolution|dot_general)[^\n]*?\(tensor<([^>]*)>, "
                   r"tensor<([^>]*)>\)", text)
  int8_ops = [op for op in ops if op[1].endswith("xi8") and op[2].endswith("xi8")]
  params = largest[1]["params"]
  owners = quantize.kernel_owners(params, depthwise=False)
  assert len(quantize.kernel_owners(params)) > len(owners)  # the tiny MBv3 has depthwise convs
  assert len(int8_ops) == len(owners) == len(qmodel.ranges), (len(int8_ops), len(owners))
  assert len(re.findall(r"stablehlo\.constant dense<[^>]*> : tensor<[^>]*xi8>", text)) == len(
      quantize.kernel_owners(params))


def test_kernels_are_int8_per_channel(largest, folded):
  _, _, qmodel = largest
  # what is quantized: the kernels with their BatchNorms folded in
  folded, paths = folded
  assert paths == qmodel.folded
  flat = dict(jax.tree_util.tree_leaves_with_path(
      qmodel.variables["params"], is_leaf=lambda v: isinstance(v, qwix.QArray)))
  floats = dict(jax.tree_util.tree_leaves_with_path(folded["params"]))
  kernels = [p for p in floats if p[-1].key == "kernel"]
  assert kernels
  for path in kernels:
    q, w = flat[path], np.asarray(floats[path])
    assert isinstance(q, qwix.QArray) and q.qvalue.dtype == jnp.int8, jax.tree_util.keystr(path)
    assert q.scale.shape == (1,) * (w.ndim - 1) + (w.shape[-1],)  # one scale per out channel
    # symmetric absmax: each channel's largest weight is +-127 steps, every weight within half
    # a step of its float value
    assert np.all(np.max(np.abs(np.asarray(q.qvalue, np.int32)), axis=tuple(range(w.ndim - 1)))
                  == 127)
    assert np.min(np.asarray(q.qvalue)) >= -127  # symmetric: -128 unused
    step = np.asarray(q.scale)
    assert np.all(np.abs(np.asarray(qwix.dequantize(q)) - w) <= 0.5 * step + 1e-7)
    # Qwix's in-graph re-quantization of the dequantized kernel gives back the stored values
    again = qwix.quantize(qwix.dequantize(q), jnp.int8, channelwise_axes=(w.ndim - 1,),
                          calibration_method=quantize._WEIGHT_CALIBRATION)
    np.testing.assert_array_equal(np.asarray(again.qvalue), np.asarray(q.qvalue))
  # biases (folded BN ones too) stay float32, untouched
  others = [p for p in floats if p[-1].key != "kernel"]
  assert others and all(np.array_equal(np.asarray(flat[p]), np.asarray(floats[p]))
                        for p in others)


def test_int8_top1_is_within_the_bound_of_float(largest, setup):
  model, variables, qmodel = largest
  sup, engine, _ = setup
  float_top1 = engine([sup.space.largest()])[0]["top1"]
  float_fn = jax.jit(lambda x: model.apply(variables, x, train=False))
  assert int8.top1(float_fn, _test_batches(setup)) == pytest.approx(float_top1, abs=1e-9)
  int8_top1 = int8.top1(qmodel.logits_fn, _test_batches(setup))
  assert float_top1 > 0.4  # a trained subnet, not chance (10 classes); measured 0.48
  assert float_top1 - int8_top1 <= MAX_DROP, (float_top1, int8_top1)
  same = np.concatenate([(np.argmax(float_fn(b["inputs"]), -1)
                          == np.argmax(qmodel.logits_fn(b["inputs"]), -1))[np.asarray(b["mask"]) > 0]
                         for b in _test_batches(setup)])
  # the same prediction, digit by digit (measured: 92.8%)
  assert len(same) == 360 and same.mean() >= 0.9, same.mean()
  # and quantization did change the numbers (not a float model in disguise)
  x = _first_inputs(setup)
  assert float(jnp.max(jnp.abs(float_fn(x) - qmodel.logits_fn(x)))) > 1e-3


def _bn_count(variables) -> int:
  return len(jax.tree.leaves(variables["batch_stats"])) // 2  # mean and var per BN


def test_folding_batchnorm_keeps_the_float_logits(largest, folded, setup):
  model, variables, qmodel = largest
  x = _first_inputs(setup)
  folded, paths = folded
  # every BN of the MobileNet follows a conv (stem, expand, depthwise, project, head): all fold,
  # and the folded model has no BN statistics or scales left
  assert len(paths) == _bn_count(variables) > 10 and "batch_stats" not in folded
  assert not any(p[-1].key == "scale" for p, _ in jax.tree_util.tree_leaves_with_path(
      folded["params"]))
  @jax.jit  # eager, the model takes ~20 s per call here
  def both(x):
    want = model.apply(variables, x, train=False)
    with quantize.folded_batchnorm(paths):
      return want, model.apply(folded, x, train=False)

  want, got = both(x)
  assert float(jnp.max(jnp.abs(got - want))) <= 1e-5 * float(jnp.max(jnp.abs(want)))
  # the statistics were not trivial: the kernels did change
  k = ("stage0_block0", "depthwise", "kernel")
  assert not np.allclose(folded["params"][k[0]][k[1]][k[2]], variables["params"][k[0]][k[1]][k[2]])
  # without folded_batchnorm the folded variables are not a model: the BN statistics are gone
  with pytest.raises(errors.ScopeCollectionNotFound):
    jax.eval_shape(lambda x: model.apply(folded, x, train=False), x)
  # folding leaves the int8 kernels as they were (per-channel absmax absorbs a per-channel
  # factor; a negative BN scale flips the signs), only the scales change
  kernels = [(path, w) for path, w in jax.tree_util.tree_leaves_with_path(variables["params"])
             if path[-1].key == "kernel"]
  assert len(kernels) > 10
  for path, w in kernels:
    diff = np.abs(np.abs(_int8(_at(folded["params"], path))) - np.abs(_int8(w)))
    # float32 round-off may move a weight lying on a rounding boundary by one step
    assert diff.max() <= 1 and diff.mean() < 1e-3, (jax.tree_util.keystr(path), diff.mean())


def _int8(kernel):
  """Symmetric per-output-channel int8 values of ``kernel``, as quantize_kernels stores them
  (in numpy: eager Qwix takes seconds per kernel here)."""
  w = np.asarray(kernel, np.float64)
  step = np.max(np.abs(w), axis=tuple(range(w.ndim - 1))) / 127
  return np.round(w / np.where(step > 0, step, 1)).astype(np.int32)


def _at(tree, path):
  for k in path:
    tree = tree[k.key]
  return tree


class _ConvBias(nn.Module):
  """A conv with a bias, then BN; with ``reuse`` the conv's output also skips the BN."""
  reuse: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    y = nn.Conv(4, (3, 3))(x)
    out = nn.BatchNorm(use_running_average=not train)(y)
    return out + y if self.reuse else out


def test_folding_scales_a_conv_bias_and_refuses_a_reused_output(perturb):
  x = jax.random.normal(jax.random.key(0), (2, 5, 5, 3))
  for reuse in (False, True):
    model = _ConvBias(reuse)
    variables = perturb(model.init(jax.random.key(1), x), jax.random.key(2))
    if reuse:  # the conv's output feeds the sum too: folding would change it
      with pytest.raises(ValueError, match="changed its float outputs.*fold_bn=False"):
        quantize.fold_batchnorm(model, variables, x)
      continue
    folded, paths = quantize.fold_batchnorm(model, variables, x)
    assert paths == {"BatchNorm_0"}
    with quantize.folded_batchnorm(paths):
      got = model.apply(folded, x)
    want = model.apply(variables, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0,
                               atol=1e-5 * float(jnp.max(jnp.abs(want))))


def test_compact_keeps_the_logits_and_drops_locations(largest, setup, tmp_path):
  """export.compact (what save_stablehlo writes): no source locations, duplicate ops merged,
  the same numbers; and an artifact written as before it (uncompacted) still loads."""
  model, variables, _ = largest
  batch = jax.export.symbolic_shape("batch")[0]
  raw = jax.export.export(jax.jit(lambda x: model.apply(variables, x, train=False)))(
      model.input_spec.struct(RES, batch))
  small = export.compact(raw)
  stripped = export.run_passes(raw, "strip-debuginfo")
  sizes = [len(e.mlir_module_serialized) for e in (raw, stripped, small)]
  # measured: 0.94x without locations, 0.90x with duplicate ops merged too
  assert sizes[2] < sizes[1] < 0.97 * sizes[0], sizes
  # the traceback locations name this repository's files (the bytecode stores them as plain
  # strings); compacted, none remain
  assert b"mobilenet.py" in raw.mlir_module_serialized
  assert b"mobilenet.py" not in small.mlir_module_serialized
  old = tmp_path / "old.stablehlo"
  old.write_bytes(raw.serialize())  # the format save_stablehlo wrote before compact
  x = _first_inputs(setup)
  got = np.asarray(small.call(x))
  np.testing.assert_array_equal(np.asarray(export.load_stablehlo(str(old))(x)), got)
  want = jax.jit(lambda x: model.apply(variables, x, train=False))(x)
  np.testing.assert_allclose(got, np.asarray(want), rtol=0,
                             atol=1e-5 * float(jnp.max(jnp.abs(want))))


def _bytes(tree) -> int:
  return sum(np.asarray(leaf).nbytes for leaf in jax.tree.leaves(tree))


def test_int8_artifact_size(largest, tmp_path):
  """The issue's target is <= 0.3x the float artifact. With the BatchNorms folded (one float per
  channel instead of four, no BN ops) and export.compact (no source locations, duplicate ops
  merged) this tiny subnet's int8 artifact is 0.34x (0.51x before both). The rest: the float
  per-channel biases and weight scales, and the program, which is a larger share of a file the
  smaller its weights are (docs/deployment.md has the breakdown). Bounds: measured plus a
  margin."""
  model, variables, qmodel = largest
  export.save_stablehlo(model, variables, str(tmp_path / "f32"), RES)
  quantize.save_stablehlo(qmodel, str(tmp_path / "i8"), RES)
  sizes = {k: os.path.getsize(tmp_path / k) for k in ("f32", "i8")}
  payload = _bytes(qmodel.variables) / _bytes(variables)
  kernels = {"float": 0, "int8": 0}
  for v in jax.tree.leaves(qmodel.variables, is_leaf=lambda v: isinstance(v, qwix.QArray)):
    if isinstance(v, qwix.QArray):
      kernels["int8"] += v.qvalue.nbytes
      kernels["float"] += 4 * v.qvalue.size
  assert kernels["int8"] == kernels["float"] // 4  # one byte per weight
  assert payload <= 0.30, (payload, sizes)  # measured 0.28 (0.33 without folding)
  assert sizes["i8"] <= 0.37 * sizes["f32"], sizes  # measured 0.34


def test_bad_input_is_named(setup, largest):
  sup, _, calib = setup
  model, variables, _ = largest
  with pytest.raises(ValueError, match="activations must be one of"):
    quantize.quantize(model, variables, calib, activations="minmax")
  with pytest.raises(ValueError, match=r"depthwise must be one of \('float', 'int8'\), got 'int4'"):
    quantize.quantize(model, variables, calib, depthwise="int4")
  with pytest.raises(ValueError, match="need calib_inputs"):
    quantize.quantize(model, variables)
  with pytest.raises(ValueError, match=r"\[num_batches, batch, height, width, channels\].*"
                                       r"1 channels; got float32 \(32, 8, 8, 1\)"):
    quantize.quantize(model, variables, calib[0])  # one batch, not a stack of them
  with pytest.raises(ValueError, match="with 1 channels; got float32 .*3\\)"):
    quantize.quantize(model, variables, np.repeat(calib, 3, axis=-1))
  with pytest.raises(ValueError, match="is a supernet: quantize its dense subnet"):
    quantize.quantize(sup.model, sup.variables, calib)
  with pytest.raises(ValueError, match="must be a dict with 'params'"):
    quantize.quantize(model, variables["params"], calib)
  qmodel = quantize.quantize(model, variables, calib, activations="dynamic", fold_bn=False)
  with pytest.raises(ValueError, match="already quantized"):
    quantize.quantize(model, qmodel.variables, calib)
  with pytest.raises(ValueError, match="only runs inference"):
    qmodel.apply(qmodel.variables, jnp.asarray(calib[0]), train=True)


def _first_batch(setup):
  b = next(iter(_test_batches(setup)))
  return jnp.asarray(b["inputs"]), jnp.asarray(b["label"], jnp.int32)


def _cross_entropy(logits, labels):
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], -1))


def test_qat_simulates_the_int8_model_with_gradients_that_follow_the_float_ones(largest, setup):
  _, _, qmodel = largest
  x, labels = _first_batch(setup)
  deq = quantize.dequantize_kernels(qmodel.variables)
  simulated = jax.jit(lambda v: qat.simulated_logits(qmodel, v, x))(deq)
  real = qmodel.logits_fn(x)
  # the same roundings in float32: the same predictions but where a rounding boundary differs
  assert np.mean(np.argmax(simulated, -1) == np.argmax(real, -1)) >= 0.97
  assert float(jnp.max(jnp.abs(simulated - real))) < 0.1 * float(jnp.max(jnp.abs(real)))

  def float_loss(params):  # the folded float model, no rounding
    with quantize.folded_batchnorm(qmodel.folded):
      return _cross_entropy(qmodel.model.apply({**deq, "params": params}, x, train=False), labels)

  int8_loss = lambda p: _cross_entropy(qat.simulated_logits(qmodel, {**deq, "params": p}, x),
                                       labels)
  got, want = (jax.jit(jax.grad(f))(deq["params"]) for f in (int8_loss, float_loss))
  # straight through the roundings: every module's gradient points where the float one does
  # (Qwix's own QT ops with fixed activation ranges gave cosines down to -0.6 in early layers)
  cosines = {}
  for name in want:
    a, b = (np.concatenate([np.ravel(v) for v in jax.tree.leaves(g[name])]) for g in (got, want))
    cosines[name] = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
  assert min(cosines.values()) > COSINE_MIN[0], cosines
  assert np.median(list(cosines.values())) > COSINE_MIN[1], cosines


def test_qat_lowers_the_int8_loss_and_keeps_int8_kernels(largest, setup, tmp_path):
  _, _, qmodel = largest
  x, labels = _first_batch(setup)
  tuned, losses = qat.finetune(qmodel, [{"inputs": x, "label": labels}] * 20, steps=20,
                               learning_rate=1e-3)
  assert len(losses) == 20 and losses[-1] < 0.8 * losses[0]
  # what the served int8 model computes fell too
  before, after = (float(_cross_entropy(m.logits_fn(x), labels)) for m in (qmodel, tuned))
  assert after < 0.8 * before
  for path, leaf in jax.tree_util.tree_leaves_with_path(
      tuned.variables["params"], is_leaf=lambda v: isinstance(v, qwix.QArray)):
    if path[-1].key == "kernel":
      assert isinstance(leaf, qwix.QArray) and leaf.qvalue.dtype == jnp.int8
  path = str(tmp_path / "qat.stablehlo")
  quantize.save_stablehlo(tuned, path, RES)
  np.testing.assert_allclose(export.load_stablehlo(path)(x), tuned.logits_fn(x), atol=1e-5)


def test_qat_bad_input_is_named(largest, setup):
  model, variables, qmodel = largest
  x, labels = _first_batch(setup)
  batch = {"inputs": x, "label": labels}
  with pytest.raises(ValueError, match="steps .* must be >= 1, got 0"):
    qat.finetune(qmodel, [batch], steps=0)
  with pytest.raises(ValueError, match="ran out after 1 of 2 QAT steps"):
    qat.finetune(qmodel, [batch], steps=2)
  with pytest.raises(FloatingPointError, match="loss became nan at step 0"):
    # (NaN inputs would not do: int8 rounding turns them into zeros; a NaN teacher does)
    qat.finetune(qmodel, [batch], steps=1, teacher=lambda x: jnp.full((len(x), 10), jnp.nan))
  dynamic = quantize.quantize(model, variables, setup[2], activations="dynamic")
  with pytest.raises(ValueError, match="static activation ranges"):
    qat.finetune(dynamic, [batch], steps=1)


def test_search_rechooses_by_int8_and_exports_a_servable_int8_subnet(tmp_path, trained_workdir):
  workdir = str(tmp_path / "workdir")
  shutil.copytree(trained_workdir[0], workdir)
  config = autoslim.get_config()
  config.calib_batches, config.calib_batch_size, config.valid_batch_size = 1, 32, 120
  config.engine.chunk_size = 4
  config.target_fractions, config.quantize, config.quantize_candidates = (0.55, 0.8), "int8", 1
  config.qat_steps, config.qat_batch_size = 2, 32  # QAT before testing and export
  result = run_search(config, workdir)
  small, row = result["chosen"]
  for chosen in (small, row):
    compared = chosen["int8_candidates"]
    assert len(compared) >= 1
    assert chosen["int8_top1"] == max(c["int8_top1"] for c in compared)
    assert all(c["macs"] <= chosen["target_macs"] for c in compared)
    assert chosen["name"] in [c["name"] for c in compared]
  # the larger budget compared the smaller one's candidates too: never worse in int8
  assert ({c["name"] for c in small["int8_candidates"]}
          <= {c["name"] for c in row["int8_candidates"]})
  assert row["int8_top1"] >= small["int8_top1"]
  assert 0.3 < row["int8_test_top1"] <= 1.0  # chance is 0.1; the tiny supernet is weak (~55%)
  summary = json.load(open(os.path.join(row["export_dir"], "summary.json")))
  assert summary["int8"]["bytes"] < summary["int8"]["float_bytes"]
  qat_report = summary["int8"]["qat"]
  assert qat_report["steps"] == 2 and qat_report == row["int8_qat"]
  assert qat_report["val_top1_before"] == row["int8_top1"] and row["int8_qat_top1"] == qat_report[
      "val_top1"] and qat_report["first_loss"] > 0
  # serve.py loads the int8 artifact like a float one (summary.json lies next to it)
  classifier = serve.load(row["int8_export"])
  images, labels = serve_inputs(workdir)
  served = classifier.logits(images).argmax(-1)
  direct = np.asarray(export.load_stablehlo(row["int8_export"])(jnp.asarray(images))).argmax(-1)
  np.testing.assert_array_equal(served, direct)
  assert np.mean(served == labels) > 0.3
  with pytest.raises(ValueError, match=r"config.quantize must be '' \(float only\) or 'int8', "
                                       "got 'int4'"):
    run_search(_with(config, quantize="int4"), workdir)
  with pytest.raises(ValueError, match="config.qat_steps fine-tunes int8 subnets: set "
                                       "config.quantize=int8 too"):
    run_search(_with(config, quantize=""), workdir)
  with pytest.raises(ValueError, match="qat_loss must be one of .*got 'kl'"):
    run_search(_with(config, qat_loss="kl"), workdir)


def _with(config, **overrides):
  c = config.copy_and_resolve_references()
  for k, v in overrides.items():
    c[k] = v
  return c


def serve_inputs(workdir):
  """The first 120 test digits as the engine feeds them, and their labels."""
  sup = load_supernet(workdir)
  _, batches = evaluation.eval_batches("digits", "test[:120]", sup.config.data_dir, 120, RES)
  b = next(batches)
  return np.asarray(b["inputs"]), np.asarray(b["label"])
