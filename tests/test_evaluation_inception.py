"""The Flax FID Inception against torch-fidelity's PyTorch module, TF's resize, and end to end.

The reference is torch-fidelity's `FeatureExtractorInceptionV3` (the PyTorch port of the
2015-12-05 graph), built with random weights and random batch-norm statistics, saved as a .pth
and converted by our converter. Its module file is loaded without the package `__init__`, which
imports torchvision.
"""
import importlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import types
from unittest import mock

import numpy as np
from PIL import Image
import pytest
from threadpoolctl import threadpool_limits
import torch

from dit_jax.evaluation import convert, evaluator, features, inception
from dit_jax.evaluation import reference as reference_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 256  # DiT's sample size: exercises the 256 -> 299 resize; one compilation for all tests


def _torch_fidelity_inception_module():
  spec = importlib.util.find_spec("torch_fidelity")
  if spec is None:
    raise ImportError("tests need torch-fidelity: run README's test command (it installs "
                      "torch-fidelity==0.4.0 with --no-deps: its torchvision would break diffusers)")
  stub = types.ModuleType("torch_fidelity")
  stub.__path__ = [os.path.dirname(spec.origin)]
  with mock.patch.dict(sys.modules, {"torch_fidelity": stub}):
    return importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")


@pytest.fixture(scope="module")
def torch_reference(tmp_path_factory):
  """(torch module with random weights, path of its saved state dict)."""
  module = _torch_fidelity_inception_module()
  with mock.patch.object(module, "load_state_dict_from_url", lambda *a, **k: {}), \
       mock.patch.object(module.FeatureExtractorInceptionV3, "load_state_dict", lambda *_: None):
    net = module.FeatureExtractorInceptionV3("fid", ["2048", "logits_unbiased", "logits"])
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, torch.nn.Conv2d):  # He init keeps activations O(1) through 94 layers
        std = (2.0 / m.weight[0].numel()) ** 0.5
        m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * std)
      elif isinstance(m, torch.nn.BatchNorm2d):
        n = m.num_features
        m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
        m.bias.copy_(torch.randn(n, generator=gen) * 0.2)
        m.running_mean.copy_(torch.randn(n, generator=gen) * 0.2)
        m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
      elif isinstance(m, torch.nn.Linear):
        m.weight.copy_(torch.randn(m.weight.shape, generator=gen) / 2048 ** 0.5)
        m.bias.copy_(torch.randn(m.bias.shape, generator=gen))
  path = str(tmp_path_factory.mktemp("inception") / "random_inception.pth")
  torch.save(net.state_dict(), path)
  return net, path


@pytest.fixture(scope="module")
def variables(torch_reference):
  return convert.load_inception(torch_reference[1])


def test_resize_matches_tensorflow_resize_bilinear():
  tf = pytest.importorskip("tensorflow")
  rng = np.random.default_rng(0)
  for shape, size in (((2, 17, 23, 3), 29), ((1, 40, 50, 3), 29)):  # up- and downsampling
    images = rng.uniform(0, 255, shape).astype(np.float32)
    expected = tf.raw_ops.ResizeBilinear(images=images, size=[size, size], align_corners=False,
                                         half_pixel_centers=False).numpy()
    got = np.asarray(inception.resize_bilinear_tf1(images, size))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-4)


def test_features_match_torch_fidelity(torch_reference, variables):
  net, _ = torch_reference
  spatial = {}
  hook = net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: spatial.update(x=o))
  images = np.random.default_rng(1).integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
  with torch.no_grad():
    pool, unbiased, logits = net(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
  hook.remove()
  expected = {
      "pool": pool.numpy(), "logits_unbiased": unbiased.numpy(), "logits": logits.numpy(),
      # ADM: mixed_6/conv[..., :7] of the NHWC graph, flattened (h, w, c)
      "spatial": spatial["x"][:, :7].permute(0, 2, 3, 1).reshape(2, -1).numpy(),
  }
  # 2 images on 8 devices: also checks the padding of the last batch.
  got = features.extract_features(images, variables, batch_size_per_device=1)
  for key, want in expected.items():
    assert got[key].shape == want.shape, key
    scale = np.abs(want).max()
    assert scale > 1.0, key  # a dead network would compare nothing
    np.testing.assert_allclose(got[key], want, rtol=1e-4, atol=1e-4 * scale, err_msg=key)
  assert expected["pool"].std() > 0.1 * np.abs(expected["pool"]).mean()


def test_converter_names_bad_keys(torch_reference):
  state = convert.load_torch_state_dict(torch_reference[1])
  state.pop("Mixed_6d.branch1x1.conv.weight")
  state["AuxLogits.fc.weight"] = np.zeros((1000, 768), np.float32)
  state["fc.bias"] = np.zeros(1000, np.float32)
  with pytest.raises(ValueError) as err:
    convert.convert_state_dict(state, source="bad.pth")
  message = str(err.value)
  for name in ("bad.pth", "Mixed_6d.branch1x1.conv.weight", "AuxLogits.fc.weight", "fc.bias"):
    assert name in message


def test_converted_npz_round_trip(tmp_path, variables):
  path = str(tmp_path / "inception.npz")
  convert.save_variables(variables, path)
  loaded = convert.load_inception(path)
  np.testing.assert_array_equal(loaded["params"]["fc"]["kernel"],
                                variables["params"]["fc"]["kernel"])
  np.testing.assert_array_equal(loaded["batch_stats"]["Mixed_7c"]["branch_pool"]["bn"]["var"],
                                variables["batch_stats"]["Mixed_7c"]["branch_pool"]["bn"]["var"])
  with pytest.raises(FileNotFoundError, match="missing.pth"):
    convert.load_inception(str(tmp_path / "missing.pth"))


def _crops(image: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
  ys = rng.integers(0, image.shape[0] - SIZE, count)
  xs = rng.integers(0, image.shape[1] - SIZE, count)
  return np.stack([image[y:y + SIZE, x:x + SIZE] for y, x in zip(ys, xs)])


def _jpeg(images: np.ndarray, quality: int = 75) -> np.ndarray:
  out = []
  for image in images:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    out.append(np.asarray(Image.open(buf).convert("RGB")))
  return np.stack(out)


def test_fid_ranks_jpeg_copy_above_other_images_cli_and_library(tmp_path, variables):
  """Reference: 8 crops of one photo. The JPEG copy of them must score far better than 8 crops
  of another photo. The first set goes through the CLI (a subprocess, as users run it), the
  second through `evaluate_samples` with the reference statistics the CLI cached."""
  from sklearn.datasets import load_sample_images  # pylint: disable=g-import-not-at-top
  china, flower = load_sample_images().images
  rng = np.random.default_rng(0)
  real = _crops(china, 8, rng)
  ref_dir = tmp_path / "reference"
  ref_dir.mkdir()
  for i, image in enumerate(real):
    Image.fromarray(image).save(ref_dir / f"{i:02d}.png")
  np.savez(tmp_path / "jpeg.npz", arr_0=_jpeg(real), arr_1=np.zeros(8, np.int64))
  weights = str(tmp_path / "inception.npz")  # the converted form: no torch import in the CLI
  convert.save_variables(variables, weights)
  # One BLAS thread: OpenBLAS threads spin badly on a shared 2-core CI box, making the 2048-d
  # eigendecompositions of FID/sFID several times slower.
  env = dict(os.environ, OPENBLAS_NUM_THREADS="1",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  run = subprocess.run(
      [sys.executable, "-m", "dit_jax.evaluate", f"--samples={tmp_path / 'jpeg.npz'}",
       f"--reference={ref_dir}", f"--inception={weights}", f"--out={tmp_path / 'jpeg.json'}",
       "--fid_method=eigh", "--batch_size_per_device=1"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  jpeg = json.loads((tmp_path / "jpeg.json").read_text())
  assert "fid: " in run.stdout
  cache = tmp_path / "reference.inception_stats.npz"
  ref = reference_lib.ReferenceStats.load(str(cache))
  assert ref.pool.shape == (8, inception.POOL_DIM)
  with threadpool_limits(limits=1, user_api="blas"):
    other = evaluator.evaluate_samples(_crops(flower, 8, rng), variables, ref,
                                       batch_size_per_device=1, fid_method="eigh")
  for result in (jpeg, other):
    assert result["num_samples"] == 8
    assert 0.0 <= result["precision"] <= 1.0 and 0.0 <= result["recall"] <= 1.0
    assert result["inception_score"] >= 1.0
  assert 0.0 < jpeg["fid"] < 0.5 * other["fid"]
  assert jpeg["sfid"] < other["sfid"]
  assert jpeg["precision"] > other["precision"]


def test_reference_from_tfds_is_cached(tmp_path, variables):
  tfds = pytest.importorskip("tensorflow_datasets")
  cache = str(tmp_path / "cifar_stats.npz")
  with tfds.testing.mock_data(num_examples=5):
    stats = reference_lib.compute_reference("tfds:cifar10:train", variables, resolution=SIZE,
                                            max_images=3, batch_size_per_device=1, cache_path=cache)
  assert stats.pool.shape == (3, inception.POOL_DIM)
  assert stats.sigma_s.shape == (inception.SPATIAL_DIM, inception.SPATIAL_DIM)
  with mock.patch.object(features, "extract_features", side_effect=AssertionError("recomputed")), \
       tfds.testing.mock_data(num_examples=5):
    cached = reference_lib.compute_reference("tfds:cifar10:train", variables, resolution=SIZE,
                                             max_images=3, cache_path=cache)
    np.testing.assert_array_equal(cached.mu, stats.mu)
    with pytest.raises(AssertionError, match="recomputed"):  # another source is not a cache hit
      reference_lib.compute_reference("tfds:cifar10:train", variables, resolution=SIZE,
                                      max_images=2, cache_path=cache)
    other_weights = {c: dict(v) for c, v in variables.items()}
    other_weights["params"]["fc"] = {"kernel": variables["params"]["fc"]["kernel"],
                                     "bias": variables["params"]["fc"]["bias"] + 1.0}
    with pytest.raises(AssertionError, match="recomputed"):  # nor are other Inception weights
      reference_lib.compute_reference("tfds:cifar10:train", other_weights, resolution=SIZE,
                                      max_images=3, cache_path=cache)
