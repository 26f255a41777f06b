"""Reads a state dict saved by ``torch.save`` (the zip format, torch >= 1.6) without torch.

A ``torch.save`` file is a zip archive: ``<name>/data.pkl`` pickles the dict, and each tensor in
it is a call ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`` whose
storage is a *persistent id* ``("storage", <torch.XStorage>, key, device, numel)`` naming the
raw bytes in ``<name>/data/<key>``. This module un-pickles with a whitelist: only those rebuild
functions, the storage types and ``collections.OrderedDict`` resolve, so a file that holds
anything else (code included) is refused instead of run, as ``torch.load(weights_only=True)``
refuses it. Files of torch's older (pre-1.6, non-zip) format are refused with the way out.
"""

from __future__ import annotations

import collections
import pickle
import zipfile
from typing import NamedTuple

import ml_dtypes
import numpy as np

# torch storage class -> numpy dtype of its elements (little-endian unless the file says so).
STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _StorageType(NamedTuple):
  name: str


def _rebuild_tensor(storage, offset, size, stride, *unused):
  """A copy of the strided view torch would make of ``storage`` (offsets count elements)."""
  del unused  # requires_grad, backward hooks, metadata: meaningless for numpy
  item = storage.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                         strides=tuple(s * item for s in stride))
  return np.array(view)


def _rebuild_parameter(data, *unused):
  del unused
  return data


_ALLOWED = {("collections", "OrderedDict"): collections.OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
            ("torch._utils", "_rebuild_parameter"): _rebuild_parameter}


class _Unpickler(pickle.Unpickler):
  """data.pkl's un-pickler: whitelisted globals only; storages read from the archive."""

  def __init__(self, file, archive: zipfile.ZipFile, prefix: str, byteorder: str, path: str):
    super().__init__(file)
    self.archive, self.prefix, self.byteorder, self.path = archive, prefix, byteorder, path
    self.storages = {}   # tensors that share a storage share one array

  def find_class(self, module, name):
    if module == "torch" and name in STORAGE_DTYPES:
      return _StorageType(name)
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    raise pickle.UnpicklingError(
        f"{self.path} holds a {module}.{name}, not only tensors: it is not a plain state dict "
        "(refused rather than run; load it with torch and save it with safetensors)")

  def persistent_load(self, pid):
    kind, storage_type, key, _, numel = pid
    if kind != "storage" or not isinstance(storage_type, _StorageType):
      raise pickle.UnpicklingError(f"{self.path}: unknown persistent id {pid!r}")
    if key not in self.storages:
      dtype = np.dtype(STORAGE_DTYPES[storage_type.name])
      dtype = dtype.newbyteorder("<" if self.byteorder == "little" else ">")
      raw = self.archive.read(f"{self.prefix}/data/{key}")
      self.storages[key] = np.frombuffer(raw, dtype, count=numel).astype(dtype.newbyteorder("="))
    return self.storages[key]


def load(path: str) -> dict[str, np.ndarray]:
  """{name: numpy array} of the state dict that ``torch.save`` wrote to ``path``."""
  if not zipfile.is_zipfile(path):
    raise ValueError(
        f"{path} is not in torch's zip format (it may be a pre-1.6 torch file): convert it "
        "where torch is installed, e.g. safetensors.torch.save_file(torch.load(path), "
        "'model.safetensors')")
  with zipfile.ZipFile(path) as archive:
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
    if len(pickles) != 1:
      raise ValueError(f"{path} is a zip file but not a torch.save archive (no single data.pkl)")
    prefix = pickles[0][:-len("/data.pkl")]
    names = set(archive.namelist())
    byteorder = (archive.read(f"{prefix}/byteorder").decode().strip()
                 if f"{prefix}/byteorder" in names else "little")
    with archive.open(pickles[0]) as f:
      try:
        obj = _Unpickler(f, archive, prefix, byteorder, path).load()
      except pickle.UnpicklingError as e:   # a user's file, not a bug: one clear line
        raise ValueError(str(e)) from None
  if isinstance(obj, dict) and "state_dict" in obj:
    obj = obj["state_dict"]
  if not isinstance(obj, dict):
    raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
  return {k: v for k, v in obj.items() if isinstance(v, np.ndarray)}
