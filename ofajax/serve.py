"""Classifying images with a subnet that search.py exported: ``load(path)`` and a local HTTP
endpoint (``make_server``), behind ``python serve.py``.

An export directory (``<workdir>/search/<name>/subnets/<label>/``) holds ``model.stablehlo``
(``x -> logits``, see :func:`ofajax.export.save_stablehlo`) and ``summary.json``, whose
``"input"`` entry (:func:`ofajax.data.eval_input`) says what the evaluation engine fed the
model. An image is decoded with Pillow, its channels converted to the model's (grayscale <-> RGB;
8-bit only, no transparency), and turned into the model input by
:func:`ofajax.data.eval_preprocess`, the evaluation reader's own transform and normalisation:
a served image gets the logits the engine computed for it. Probabilities are the softmax of
the logits.

A bad image is an :class:`InputError` for that image alone (files: a failed :class:`Result`;
HTTP: status 400); a missing or corrupt artifact or summary is a ``ValueError`` /
``FileNotFoundError`` naming the file, raised by :func:`load`.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from collections.abc import Callable, Iterator, Sequence
from http import server as http_server
from urllib import parse

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, UnidentifiedImageError

from ofajax import data, export

ARTIFACT, SUMMARY = "model.stablehlo", "summary.json"
BATCH_SIZE = 32             # files per model call; the last call is padded, so one compile
MAX_BODY_BYTES = 32 << 20   # the largest HTTP body read
# Pillow modes of 8-bit pixels: the 0..255 range the data sets' mean / std were computed in.
EIGHT_BIT_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr")


class InputError(ValueError):
  """One input cannot be classified (not an image, corrupt, unconvertible pixels)."""


@dataclasses.dataclass(frozen=True)
class Result:
  """What one input got: ``top`` [(class, probability)], most probable first, or ``error``."""
  source: str
  top: list[tuple[int, float]] | None = None
  error: str | None = None

  @property
  def ok(self) -> bool:
    return self.error is None

  def text(self) -> str:
    """One line: ``source: 3 (0.912), 8 (0.050)`` or ``source: error: <why>``."""
    if not self.ok:
      return f"{self.source}: error: {self.error}"
    return f"{self.source}: " + ", ".join(f"{c} ({p:.3f})" for c, p in self.top)


# --------------------------------------------------------------------------- images


def decode(blob: bytes) -> Image.Image:
  """The image in ``blob``, fully decoded now: a truncated file fails here, not later."""
  try:
    image = Image.open(io.BytesIO(blob))
    image.load()
  except UnidentifiedImageError:
    raise InputError("not an image (Pillow recognises no image format in it)") from None
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise InputError(f"corrupt or truncated image: {e}") from None
  return image


def pixels(image: Image.Image, channels: int) -> np.ndarray:
  """uint8 [H, W, channels] pixels of ``image``. Grayscale, palette and RGB images convert to the
  model's 1 or 3 channels (Pillow's ITU-R 601 luma for RGB -> gray); an opaque alpha channel
  is dropped. Refused: more than 8 bits per pixel (the model's normalisation is for 0..255)
  and transparency (what lies behind it is unknown)."""
  if image.mode not in EIGHT_BIT_MODES:
    raise InputError(f"{image.mode} pixels (more than 8 bits per channel); the model reads 8-bit "
                     "images: convert it to 8-bit first")
  if image.has_transparency_data and np.asarray(image.convert("RGBA"))[..., 3].min() < 255:
    raise InputError("the image has transparent pixels; flatten it onto a background first")
  if channels == 1:
    image = image if image.mode == "L" else image.convert("RGB").convert("L")
  elif channels == 3:
    image = image if image.mode == "RGB" else image.convert("RGB")
  elif len(image.getbands()) != channels:
    raise InputError(f"the model reads {channels}-channel images, got {len(image.getbands())} "
                     f"channels ({image.mode}); only 1 <-> 3 channels are converted")
  x = np.asarray(image, np.uint8)
  return x[..., None] if x.ndim == 2 else x


# --------------------------------------------------------------------------- the classifier


class Classifier:
  """An exported subnet and its input contract. ``path``: the export directory or its
  ``model.stablehlo`` (``summary.json`` must lie next to it)."""

  def __init__(self, path: str, batch_size: int = BATCH_SIZE):
    self.artifact, summary_path = _paths(path)
    self._fn = export.load_stablehlo(self.artifact)  # ValueError naming a corrupt artifact
    self.summary = _read_summary(summary_path)
    self.contract = self.summary["input"]
    self.num_classes = _check_signature(self._fn, self.contract, self.artifact, summary_path)
    if batch_size < 1:
      raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    self.batch_size = batch_size

  def warm_up(self) -> None:
    """Compiles the one-image call (an HTTP request) now rather than on the first request."""
    r, c = self.contract["resolution"], self.contract["channels"]
    self.logits(np.zeros((1, r, r, c), np.float32))

  def preprocess(self, blob: bytes) -> np.ndarray:
    """An encoded image -> the float32 [R, R, C] model input; InputError if it is bad."""
    x = pixels(decode(blob), self.contract["channels"])
    try:
      return data.eval_preprocess(x, self.contract)
    except ValueError as e:  # pixels() converted the channels: not expected, but per image
      raise InputError(str(e)) from None

  def logits(self, inputs: np.ndarray) -> np.ndarray:
    """float32 [n, classes] logits of [n, R, R, C] inputs. Several inputs run in batches of
    ``batch_size``, the last padded with zeros (one compiled shape); one input alone runs as a
    batch of one (an HTTP request)."""
    b = 1 if len(inputs) == 1 else self.batch_size
    out = []
    for i in range(0, len(inputs), b):
      chunk = inputs[i:i + b]
      padded = np.concatenate([chunk, np.zeros((b - len(chunk),) + chunk.shape[1:], chunk.dtype)])
      out.append(np.asarray(self._fn(padded))[:len(chunk)])
    return np.concatenate(out) if out else np.zeros((0, self.num_classes), np.float32)

  def check_top_k(self, top_k: int) -> int:
    if not 1 <= top_k <= self.num_classes:
      raise ValueError(f"top_k must lie in 1..{self.num_classes} (the model's classes), got "
                       f"{top_k}")
    return top_k

  def classify(self, named: Sequence[tuple[str, Callable[[], bytes]]],
               top_k: int = 3) -> list[Result]:
    """A Result per (name, read) pair, in order; ``read()`` returns the encoded image or raises
    InputError. The good inputs share the model calls; a bad one fails alone."""
    self.check_top_k(top_k)
    inputs, errors = [], {}
    for i, (_, read) in enumerate(named):
      try:
        inputs.append(self.preprocess(read()))
      except InputError as e:
        errors[i] = str(e)
    probs = iter(_softmax(self.logits(np.stack(inputs)))) if inputs else iter(())
    return [Result(name, error=errors[i]) if i in errors
            else Result(name, top=_top(next(probs), top_k)) for i, (name, _) in enumerate(named)]

  def classify_files(self, paths: Sequence[str], top_k: int = 3) -> Iterator[Result]:
    """A Result per file, in order, ``batch_size`` files at a time (a large directory is not
    held in memory)."""
    self.check_top_k(top_k)
    for i in range(0, len(paths), self.batch_size):
      chunk = paths[i:i + self.batch_size]
      yield from self.classify([(p, lambda p=p: _read(p)) for p in chunk], top_k)

  def classify_bytes(self, blob: bytes, top_k: int = 3) -> list[tuple[int, float]]:
    """[(class, probability)] of one encoded image; InputError if it is bad."""
    self.check_top_k(top_k)
    return _top(_softmax(self.logits(self.preprocess(blob)[None]))[0], top_k)


def load(path: str, batch_size: int = BATCH_SIZE) -> Classifier:
  """The :class:`Classifier` of an export directory or of its ``model.stablehlo``."""
  return Classifier(path, batch_size)


def _paths(path: str) -> tuple[str, str]:
  """(model.stablehlo, summary.json) of an export directory or of its artifact."""
  artifact = os.path.join(path, ARTIFACT) if os.path.isdir(path) else path
  if not os.path.isfile(artifact):
    raise FileNotFoundError(f"{artifact} not found: --subnet takes a directory that search.py "
                            "exported (<workdir>/search/<name>/subnets/<label>/) or its "
                            f"{ARTIFACT}")
  return artifact, os.path.join(os.path.dirname(os.path.abspath(artifact)), SUMMARY)


def _read_summary(path: str) -> dict:
  """summary.json with an image "input" contract, or an error saying what is missing."""
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"{path} is missing: serving reads how to preprocess images (data set, resolution, "
        f"channels, normalisation) from the {SUMMARY} that search.py writes next to {ARTIFACT}; "
        "serve the whole exported directory")
  try:
    with open(path) as f:
      summary = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"{path} is not a readable summary.json: {e}") from None
  contract = summary.get("input") if isinstance(summary, dict) else None
  if not isinstance(contract, dict):
    raise ValueError(f"{path} has no \"input\" entry (the model's input contract; exports "
                     "written before it was recorded lack it): export the subnet again with "
                     "search.py")
  if contract.get("kind") != "image":
    raise ValueError(f"{path}: this subnet reads {contract.get('kind')!r} inputs; serving "
                     "classifies images only")
  missing = sorted({"resolution", "channels", "crop_fraction", "mean", "std"} - set(contract))
  if missing:
    raise ValueError(f"{path}: its \"input\" entry lacks {missing}: export the subnet again")
  return summary


def _check_signature(fn, contract: dict, artifact: str, summary_path: str) -> int:
  """The number of classes; a ValueError if the artifact does not take the float32
  [batch, R, R, C] images that summary.json describes (a summary of another export)."""
  r, c = contract["resolution"], contract["channels"]
  try:
    out = jax.eval_shape(fn, jax.ShapeDtypeStruct((1, r, r, c), jnp.float32))
  except Exception as e:  # pylint: disable=broad-except  # jax's shape errors vary by version
    raise ValueError(f"{artifact} does not take float32 [batch, {r}, {r}, {c}] images as "
                     f"{summary_path} says: {str(e).splitlines()[0]}") from None
  if len(out.shape) != 2:
    raise ValueError(f"{artifact} returns {out.shape}, not [batch, classes] logits")
  return int(out.shape[1])


def _read(path: str) -> bytes:
  try:
    with open(path, "rb") as f:
      return f.read()
  except OSError as e:
    raise InputError(f"cannot read it: {e.strerror or e}") from None


def _softmax(logits: np.ndarray) -> np.ndarray:
  z = np.asarray(logits, np.float64)
  e = np.exp(z - z.max(axis=-1, keepdims=True))  # shifted: no overflow
  return e / e.sum(axis=-1, keepdims=True)


def _top(probs: np.ndarray, k: int) -> list[tuple[int, float]]:
  order = np.argsort(-probs, kind="stable")[:k]  # ties: the lower class first
  return [(int(i), float(probs[i])) for i in order]


def expand(paths: Sequence[str]) -> list[str]:
  """Files to classify: each file as given, each directory's files (sorted, not recursive,
  hidden ones skipped). A missing path stays in the list: it is reported like a bad image."""
  out = []
  for path in paths:
    if os.path.isdir(path):
      names = sorted(n for n in os.listdir(path) if not n.startswith("."))
      out += [os.path.join(path, n) for n in names if os.path.isfile(os.path.join(path, n))]
    else:
      out.append(path)
  return out


# --------------------------------------------------------------------------- HTTP


def make_server(classifier: Classifier, host: str = "127.0.0.1", port: int = 8080,
                top_k: int = 3) -> http_server.ThreadingHTTPServer:
  """A stdlib HTTP server (not started: call ``serve_forever``; port 0 picks a free one):
  ``POST /classify`` with an image as the body (``?top_k=N`` optional) answers
  ``{"top_k": [{"class", "probability"}, ...]}``, a bad image status 400 ``{"error"}``;
  ``GET /health`` answers the model's name and input contract."""
  classifier.check_top_k(top_k)
  handler = type("Handler", (_Handler,), {"classifier": classifier, "top_k": top_k})
  return http_server.ThreadingHTTPServer((host, port), handler)


class _Handler(http_server.BaseHTTPRequestHandler):
  classifier: Classifier
  top_k: int

  def _reply(self, status: int, body: dict) -> None:
    payload = json.dumps(body).encode()
    self.send_response(status)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(payload)))
    self.end_headers()
    self.wfile.write(payload)

  def do_GET(self):  # pylint: disable=invalid-name
    if parse.urlsplit(self.path).path != "/health":
      return self._reply(404, {"error": "GET /health, or POST an image to /classify"})
    s = self.classifier.summary
    self._reply(200, {"status": "ok", "artifact": self.classifier.artifact,
                      "model": s.get("model"), "name": s.get("name"),
                      "num_classes": self.classifier.num_classes, "input": s["input"]})

  def do_POST(self):  # pylint: disable=invalid-name
    url = parse.urlsplit(self.path)
    if url.path != "/classify":
      return self._reply(404, {"error": "POST an image to /classify"})
    length = int(self.headers.get("Content-Length") or 0)
    if not 0 < length <= MAX_BODY_BYTES:
      return self._reply(413 if length else 411, {
          "error": f"send the image as the body, with a Content-Length of 1..{MAX_BODY_BYTES}"})
    blob = self.rfile.read(length)
    top_k = parse.parse_qs(url.query).get("top_k", [str(self.top_k)])[0]
    if not top_k.isdigit():
      return self._reply(400, {"error": f"top_k must be a positive integer, got {top_k!r}"})
    try:
      top = self.classifier.classify_bytes(blob, int(top_k))
    except ValueError as e:  # InputError, or a bad top_k
      return self._reply(400, {"error": str(e)})
    self._reply(200, {"top_k": [{"class": c, "probability": p} for c, p in top]})
