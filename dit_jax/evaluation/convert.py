"""Loads the FID Inception weights: the PyTorch port's state dict -> Flax variables.

The weights are `pt_inception-2015-12-05-6726825d.pth`, the TF graph's constants ported to
PyTorch by pytorch-fid (torch-fidelity ships the same file as
`weights-inception-2015-12-05-6726825d.pth`). Nothing is downloaded here: pass the file path.

Key mapping (torch -> flax, module names are shared, see inception.py):
  X.conv.weight [O, I, kh, kw]  -> params/X/conv/kernel [kh, kw, I, O]
  X.bn.weight / X.bn.bias       -> params/X/bn/scale / params/X/bn/bias
  X.bn.running_mean / _var      -> batch_stats/X/bn/mean / batch_stats/X/bn/var
  fc.weight [1008, 2048]        -> params/fc/kernel [2048, 1008];  fc.bias -> params/fc/bias
`num_batches_tracked` buffers are ignored. Any other difference is an error naming the keys.

Converted variables can be saved as a flat .npz (keys 'params/Mixed_5b/branch1x1/conv/kernel', ...)
so hosts without PyTorch can load them:
  python -m dit_jax.evaluation.convert pt_inception-2015-12-05-6726825d.pth inception_fid.npz
"""
import hashlib
import os
from typing import Any, Callable, Mapping

from absl import app
from flax import traverse_util
import numpy as np

from dit_jax.evaluation import inception

Variables = dict[str, Any]

_BN_NAMES = {("params", "scale"): "weight", ("params", "bias"): "bias",
             ("batch_stats", "mean"): "running_mean", ("batch_stats", "var"): "running_var"}


def _torch_name(path: tuple[str, ...]) -> tuple[str, Callable[[np.ndarray], np.ndarray]]:
  """Torch key and array transform (torch layout -> flax layout) of one flax variable path."""
  collection, *modules, leaf = path
  prefix = ".".join(modules)
  if modules[-1] == "conv" and leaf == "kernel":
    return prefix + ".weight", lambda w: np.transpose(w, (2, 3, 1, 0))
  if modules[-1] == "bn":
    return f"{prefix}.{_BN_NAMES[(collection, leaf)]}", lambda w: w
  if modules == ["fc"]:
    return ("fc.weight", np.transpose) if leaf == "kernel" else ("fc.bias", lambda w: w)
  raise KeyError(f"no torch name for flax variable {'/'.join(path)}")


def _expected_shapes() -> dict[tuple[str, ...], tuple[int, ...]]:
  flat = traverse_util.flatten_dict(inception.abstract_variables())
  return {k: tuple(v.shape) for k, v in flat.items()}


def convert_state_dict(state_dict: Mapping[str, Any], source: str = "state dict") -> Variables:
  """Converts the PyTorch FID Inception state dict to Flax variables (float32 numpy).

  Args:
    state_dict: torch key -> tensor or array, as saved by pytorch-fid / torch-fidelity.
    source: name of the file, for error messages.
  Raises:
    ValueError: naming every missing key, unexpected key and shape mismatch.
  """
  arrays = {k: _to_numpy(v) for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
  flat, missing, mismatched, used = {}, [], [], set()
  for path, shape in _expected_shapes().items():
    name, transform = _torch_name(path)
    if name not in arrays:
      missing.append(name)
      continue
    used.add(name)
    value = transform(arrays[name]).astype(np.float32)
    if value.shape != shape:
      mismatched.append(f"{name}: got {tuple(arrays[name].shape)} (torch layout), "
                        f"expected {shape} after conversion to {'/'.join(path)}")
      continue
    flat[path] = value
  unexpected = sorted(set(arrays) - used)
  if missing or unexpected or mismatched:
    lines = [f"{source} is not the FID Inception-v3 (pt_inception-2015-12-05) state dict:"]
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                         ("shape mismatches", mismatched)):
      if items:
        lines.append(f"  {title} ({len(items)}): " + ", ".join(sorted(items)))
    raise ValueError("\n".join(lines))
  return traverse_util.unflatten_dict(flat)


def _to_numpy(value: Any) -> np.ndarray:
  if hasattr(value, "detach"):  # torch.Tensor; avoids importing torch here
    value = value.detach().cpu().float().numpy()
  return np.asarray(value)


def load_torch_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a .pth state dict with PyTorch (tensors only, no pickled code)."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"reading {path} needs PyTorch; or convert it once where PyTorch is "
                      "installed: python -m dit_jax.evaluation.convert IN.pth OUT.npz") from e
  state_dict = torch.load(path, map_location="cpu", weights_only=True)
  if not isinstance(state_dict, Mapping):
    raise ValueError(f"{path}: expected a state dict (mapping of tensors), got {type(state_dict)}")
  return {k: _to_numpy(v) for k, v in state_dict.items()}


def fingerprint(variables: Variables) -> str:
  """Short hash of the first conv and the classifier: tells weight files apart in caches."""
  digest = hashlib.sha256()
  for array in (variables["params"]["Conv2d_1a_3x3"]["conv"]["kernel"],
                variables["params"]["fc"]["kernel"], variables["params"]["fc"]["bias"]):
    digest.update(np.ascontiguousarray(array, np.float32).tobytes())
  return digest.hexdigest()[:16]


def save_variables(variables: Variables, path: str) -> None:
  """Writes variables as a flat .npz keyed 'params/Mixed_5b/branch1x1/conv/kernel', ..."""
  flat = traverse_util.flatten_dict(variables, sep="/")
  with open(path, "wb") as f:
    np.savez(f, **{k: np.asarray(v) for k, v in flat.items()})


def load_inception(path: str) -> Variables:
  """Loads FID Inception variables from the .pth state dict or a converted .npz.

  Returns {'params': ..., 'batch_stats': ...} for `FIDInceptionV3().apply`.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"Inception weights not found: {path}. Download pt_inception-2015-12-05-6726825d.pth "
        "(see docs/evaluation.md) and pass its path.")
  if path.endswith(".npz"):
    with np.load(path) as data:
      flat = {tuple(k.split("/")): data[k] for k in data.files}
    expected = _expected_shapes()
    missing = sorted("/".join(k) for k in set(expected) - set(flat))
    unexpected = sorted("/".join(k) for k in set(flat) - set(expected))
    wrong = sorted(f"{'/'.join(k)}: {flat[k].shape} != {expected[k]}"
                   for k in set(flat) & set(expected) if tuple(flat[k].shape) != expected[k])
    if missing or unexpected or wrong:
      raise ValueError(f"{path} does not hold FID Inception variables: missing {missing}, "
                       f"unexpected {unexpected}, shape mismatches {wrong}")
    return traverse_util.unflatten_dict({k: v.astype(np.float32) for k, v in flat.items()})
  return convert_state_dict(load_torch_state_dict(path), source=path)


def main(argv: list[str]) -> None:
  # Positional arguments: absl flags defined here would clash with the importing CLI's flags.
  if len(argv) != 3:
    raise app.UsageError("usage: python -m dit_jax.evaluation.convert IN.pth OUT.npz")
  save_variables(load_inception(argv[1]), argv[2])
  print(f"wrote {argv[2]}")


if __name__ == "__main__":
  app.run(main)
