"""The latent writer on tiny ImageFolder / TFDS datasets made here, read back by records and input_pipeline."""
import hashlib
import json
import os

from diffusers import AutoencoderKL as TorchAutoencoderKL
import jax
import numpy as np
from PIL import Image
import pytest
from sklearn.datasets import load_sample_images
import tensorflow as tf
import tensorflow_datasets as tfds
import torch

from dit_jax import input_pipeline
from dit_jax import prepare_latents
from dit_jax import preprocessing
from dit_jax import records

SIZE = 16
CLASSES = ["n01443537", "n01484850", "n01491361"]


def _make_tree(root) -> list[tuple[str, int]]:
  """Photo crops of assorted sizes in class folders, one corrupt JPEG and one non-image file.

  Returns the readable images as (path, label) in the order the writer must store them.
  """
  photos = load_sample_images().images
  rng = np.random.default_rng(0)
  names = {0: ["a.JPEG", "b.jpg", "broken.jpg", "c.png", "d.jpeg"],
           1: ["a.png", "b.JPEG", "c.jpg", os.path.join("sub", "e.png")],
           2: ["a.jpg", "b.png", "c.png", "d.JPEG", "e.jpg"]}
  good = []
  for label, files in names.items():
    for name in files:
      path = os.path.join(root, CLASSES[label], name)
      os.makedirs(os.path.dirname(path), exist_ok=True)
      h, w = rng.integers(20, 90, size=2)
      y, x = rng.integers(0, 300, size=2)
      Image.fromarray(photos[label % 2][y:y + h, x:x + w]).save(path)
      if name == "broken.jpg":
        data = open(path, "rb").read()
        open(path, "wb").write(data[:len(data) // 3])
      else:
        good.append((path, label))
  open(os.path.join(root, CLASSES[2], "notes.txt"), "w").write("not an image")
  # Labels: classes sorted as torchvision ImageFolder. Writer order: a fixed permutation of the
  # folder order, so that classes mix across shards.
  folder_order = sorted(good + [(os.path.join(root, CLASSES[0], "broken.jpg"), 0)],
                        key=lambda t: (t[1], os.path.dirname(t[0]), os.path.basename(t[0])))
  perm = np.random.default_rng(prepare_latents.ORDER_SEED).permutation(len(folder_order))
  rank = {folder_order[j][0]: i for i, j in enumerate(perm)}
  good.sort(key=lambda t: rank[t[0]])
  assert [t[1] for t in good] != sorted(t[1] for t in good)  # classes are mixed
  return good


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("imagefolder"))
  return root, _make_tree(root)


def _read_all(data_dir: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """A small dataset in manifest order, via decode_fn: labels [N], mean/std [N, 2, h, w, c]."""
  m = records.read_manifest(data_dir)
  records.check_shards(data_dir, m)
  decode = records.decode_fn(m)
  rows = []
  for s in m["shards"]:
    path = os.path.join(data_dir, s["file"])
    rows += [decode(r, tf.constant(path)) for r in tf.data.TFRecordDataset(path)]
  return tuple(np.stack([r[k].numpy() for r in rows]) for k in ("label", "mean", "std"))


def _expected_images(good):
  return np.stack([preprocessing.preprocess(p, SIZE) for p, _ in good])


def test_identity_records_labels_and_flip_pairs(tree, tmp_path):
  root, good = tree
  out = str(tmp_path / "latents")
  manifest = prepare_latents.prepare(root, "identity", out, image_size=SIZE, batch_size=8, shard_size=6)
  assert manifest["count"] == len(good) == 13 and manifest["num_skipped"] == 1
  assert manifest["classes"] == CLASSES and manifest["num_classes"] == 3
  assert manifest["latent_shape"] == [SIZE, SIZE, 3] and manifest["dtype"] == "float16"
  assert [s["file"] for s in manifest["shards"]] == [f"latents-p000-{k:05d}.tfrecord" for k in range(3)]
  side = json.load(open(os.path.join(out, "latents-p000-00000.tfrecord.json")))
  assert side["extra"]["skipped_files"] == [os.path.join(CLASSES[0], "broken.jpg")]

  labels, mean, std = _read_all(out)
  images = _expected_images(good)
  np.testing.assert_array_equal(labels, [label for _, label in good])
  np.testing.assert_allclose(mean[:, 0], images, atol=1e-3)           # float16 storage
  np.testing.assert_allclose(mean[:, 1], images[:, :, ::-1], atol=1e-3)  # horizontal flip
  assert not np.allclose(mean[:, 0], mean[:, 1], atol=0.05)
  assert np.all(std == 0)

  # Through the training pipeline: every record is one of ours, with its own label.
  info = input_pipeline.get_info(out)
  assert (info.count, info.num_classes, info.latent_shape) == (13, 3, (SIZE, SIZE, 3))
  batch = next(input_pipeline.iterate(input_pipeline.create_dataset(info, local_batch_size=8, seed=0)))
  assert batch["mean"].shape == batch["std"].shape == (8, 2, SIZE, SIZE, 3)
  for label, m in zip(batch["label"], batch["mean"].astype(np.float32)):
    i = np.argmin(np.abs(images - m[0]).reshape(len(images), -1).max(axis=1))
    assert np.abs(images[i] - m[0]).max() < 1e-3 and good[i][1] == label
    np.testing.assert_allclose(m[1], images[i][:, ::-1], atol=1e-3)


def test_with_images_stores_each_crop_as_png_beside_its_latent(tree, tmp_path):
  """--with_images (REPA's input): the center crop the VAE saw, as a PNG extra flipped with its
  latent, decoded by the pipeline; resuming refuses shards written without images."""
  root, good = tree
  out = str(tmp_path / "latents")
  manifest = prepare_latents.prepare(root, "identity", out, image_size=SIZE, batch_size=8,
                                     shard_size=6, with_images=True)
  assert manifest["extras"] == {"image": {"shape": [SIZE, SIZE, 3], "dtype": "uint8",
                                          "flip": "width", "encoding": "png"}}
  info = input_pipeline.get_info(out)
  batch = next(input_pipeline.iterate(input_pipeline.create_dataset(info, local_batch_size=8,
                                                                    seed=0)))
  assert batch["image"].shape == (8, SIZE, SIZE, 3) and batch["image"].dtype == np.uint8
  # Each image is its latent's crop (identity VAE: x = u / 127.5 - 1, float16 storage).
  np.testing.assert_allclose(batch["image"] / 127.5 - 1.0, batch["mean"][:, 0].astype(np.float32),
                             atol=2e-3)
  raw = sum(s["bytes"] for s in manifest["shards"])
  assert raw < 13 * (2 * 2 * SIZE * SIZE * 3 * 2 + SIZE * SIZE * 3)  # PNG: below raw uint8
  # A resumed run must not mix shards with and without images.
  plain = str(tmp_path / "plain")
  prepare_latents.prepare(root, "identity", plain, image_size=SIZE, batch_size=8, shard_size=6)
  with pytest.raises(ValueError, match="with_images"):
    prepare_latents.prepare(root, "identity", plain, image_size=SIZE, batch_size=8,
                            shard_size=6, with_images=True)


def _random_torch_vae(seed: int = 0) -> TorchAutoencoderKL:
  model = TorchAutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1,
                             norm_num_groups=8).eval()
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      base = 1.0 if (p.ndim == 1 and "norm" in name and name.endswith("weight")) else 0.0
      p.copy_(base + (0.2 * noise if p.ndim == 1 else noise / np.sqrt(np.prod(p.shape[1:]))))
  return model


def test_vae_records_match_diffusers_encodings(tree, tmp_path):
  root, good = tree
  model = _random_torch_vae()
  vae_dir = str(tmp_path / "tiny-vae")
  model.save_pretrained(vae_dir, safe_serialization=True)
  out = str(tmp_path / "latents")
  manifest = prepare_latents.prepare(root, vae_dir, out, image_size=SIZE, batch_size=4, shard_size=20,
                                     dtype="float32", precision="highest")
  assert manifest["vae"] == "tiny-vae" and manifest["scale_factor"] == 0.18215
  assert manifest["latent_shape"] == [SIZE // 2, SIZE // 2, 4] and manifest["count"] == 13
  weights = open(os.path.join(vae_dir, "diffusion_pytorch_model.safetensors"), "rb").read()
  assert manifest["vae_weights_sha256"] == hashlib.sha256(weights).hexdigest()

  labels, mean, std = _read_all(out)
  images = _expected_images(good)
  np.testing.assert_array_equal(labels, [label for _, label in good])
  for flip in (0, 1):
    x = images if flip == 0 else images[:, :, ::-1]
    with torch.no_grad():
      posterior = model.encode(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).latent_dist
    for got, want in ((mean[:, flip], posterior.mean), (std[:, flip], posterior.std)):
      want = want.numpy().transpose(0, 2, 3, 1)
      assert np.abs(got - want).max() < 1e-4 * np.abs(want).max()


def test_named_ldm_vae_writes_per_channel_statistics_and_decodes(tree, tmp_path, monkeypatch):
  # A VA-VAE-shaped LDM checkpoint (named config, LDM key names) at a CPU test's size.
  import safetensors.numpy  # pylint: disable=import-outside-toplevel
  from dit_jax import latent_norm, sampling, vae  # pylint: disable=import-outside-toplevel
  from test_vae import _to_ldm_names  # pylint: disable=import-outside-toplevel
  root, good = tree
  config = dict(block_out_channels=(16, 16, 32), down_block_types=("DownEncoderBlock2D",) * 3,
                up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, norm_num_groups=8,
                latent_channels=8)
  model = TorchAutoencoderKL(**config).eval()
  g = torch.Generator().manual_seed(5)
  with torch.no_grad():
    for name, p in model.named_parameters():
      base = 1.0 if (p.ndim == 1 and "norm" in name and name.endswith("weight")) else 0.0
      noise = torch.randn(p.shape, generator=g)
      p.copy_(base + (0.2 * noise if p.ndim == 1 else noise / np.sqrt(np.prod(p.shape[1:]))))
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  weights = str(tmp_path / "tiny-vavae.safetensors")
  safetensors.numpy.save_file({f"first_stage_model.{k}": np.ascontiguousarray(v)
                               for k, v in _to_ldm_names(sd, 3).items()}, weights)
  monkeypatch.setitem(vae.CONFIGS, "tiny_f4d8", {**config, "in_channels": 3, "out_channels": 3})
  monkeypatch.setitem(vae.LATENT_NORMS, "tiny_f4d8", "channel")
  out = str(tmp_path / "latents")
  spec = f"tiny_f4d8:{weights}"
  manifest = prepare_latents.prepare(root, spec, out, image_size=SIZE, batch_size=4,
                                     shard_size=5, dtype="float32", precision="highest")
  assert manifest["vae"] == "tiny_f4d8" and manifest["vae_path"] == spec
  assert manifest["scale_factor"] == 1.0 and manifest["latent_shape"] == [4, 4, 8]
  assert manifest["vae_weights_sha256"] == hashlib.sha256(open(weights, "rb").read()).hexdigest()

  # The statistics: per channel, of posterior samples of every image and its flip, from
  # diffusers' encoder (its posterior mean and variance) over the whole record set.
  images = _expected_images(good)
  both = np.concatenate([images, images[:, :, ::-1]])
  with torch.no_grad():
    post = model.encode(torch.from_numpy(np.ascontiguousarray(both.transpose(0, 3, 1, 2)))).latent_dist
  mu, var = (v.numpy().transpose(0, 2, 3, 1).reshape(-1, 8) for v in (post.mean, post.var))
  want_mean = mu.mean(0)
  want_std = np.sqrt((mu ** 2 + var).mean(0) - want_mean ** 2)
  stats = manifest["latent_stats"]
  np.testing.assert_allclose(stats["mean"], want_mean, rtol=1e-3, atol=1e-4)
  np.testing.assert_allclose(stats["std"], want_std, rtol=1e-3)

  # Training reads that rule; decoding undoes it: diffusers' decoder of z = x * std + mean.
  info = input_pipeline.get_info(out)
  norm = latent_norm.of_data(info)
  assert norm.per_channel and norm.same_as(latent_norm.from_record(manifest, out))
  x = np.random.default_rng(4).normal(size=(2, 4, 4, 8)).astype(np.float32)
  got = np.asarray(sampling.Decoder(info.manifest["vae_path"], norm)(x)).astype(int)
  z = x * np.asarray(stats["std"], np.float32) + np.asarray(stats["mean"], np.float32)
  with torch.no_grad():
    ref = model.decode(torch.from_numpy(z.transpose(0, 3, 1, 2))).sample.numpy()
  ref = np.clip(127.5 * ref.transpose(0, 2, 3, 1) + 128.0, 0, 255).astype(int)
  assert np.abs(got - ref).max() <= 1
  # Rewriting the manifest by the scale rule keeps the shards and drops the statistics.
  again = prepare_latents.prepare(root, spec, out, image_size=SIZE, batch_size=4, shard_size=5,
                                  dtype="float32", latent_norm_rule="scale")
  assert "latent_stats" not in again and again["scale_factor"] == 0.18215
  with pytest.raises(ValueError, match="give its weights as tiny_f4d8:PATH"):
    prepare_latents.prepare(root, "tiny_f4d8", out, image_size=SIZE)


def test_interrupted_run_resumes_without_duplicates(tree, tmp_path, monkeypatch):
  root, _ = tree
  kw = dict(image_size=SIZE, batch_size=8, shard_size=4)
  reference = prepare_latents.prepare(root, "identity", str(tmp_path / "reference"), **kw)
  out = str(tmp_path / "latents")
  real_write = records.write_shard
  written = []

  def crash_after_two(path, *args, **kwargs):
    if len(written) == 2:
      raise KeyboardInterrupt("simulated preemption")
    written.append(os.path.basename(path))
    return real_write(path, *args, **kwargs)

  monkeypatch.setattr(records, "write_shard", crash_after_two)
  with pytest.raises(KeyboardInterrupt):
    prepare_latents.prepare(root, "identity", out, **kw)
  assert not os.path.exists(os.path.join(out, records.MANIFEST))
  assert not [f for f in os.listdir(out) if f.endswith(".tmp")]

  def count(path, *args, **kwargs):
    written.append(os.path.basename(path))
    return real_write(path, *args, **kwargs)

  monkeypatch.setattr(records, "write_shard", count)
  written.clear()
  manifest = prepare_latents.prepare(root, "identity", out, **kw)
  assert written == ["latents-p000-00002.tfrecord", "latents-p000-00003.tfrecord"]
  # A lost shard (file and sidecar) is redone alone.
  os.remove(os.path.join(out, "latents-p000-00001.tfrecord"))
  os.remove(os.path.join(out, "latents-p000-00001.tfrecord.json"))
  written.clear()
  manifest = prepare_latents.prepare(root, "identity", out, **kw)
  assert written == ["latents-p000-00001.tfrecord"]

  assert manifest["count"] == reference["count"] == 13 and manifest["num_skipped"] == 1
  assert [s["sha256"] for s in manifest["shards"]] == [s["sha256"] for s in reference["shards"]]
  got, want = _read_all(out), _read_all(str(tmp_path / "reference"))
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a, b)

  with pytest.raises(ValueError, match="different run.*image_size"):
    prepare_latents.prepare(root, "identity", out, **dict(kw, image_size=8))


def test_shard_plan_covers_every_example_once():
  for n, processes, size in ((13, 1, 4), (13, 3, 2), (5, 8, 3), (1000, 7, 64)):
    plan = prepare_latents.shard_plan(n, processes, size)
    covered = [i for _, _, a, b in plan for i in range(a, b)]
    assert covered == list(range(n))
    assert all(0 < b - a <= size for _, _, a, b in plan)
    for p in range(processes):
      assert [k for q, k, _, _ in plan if q == p] == list(range(sum(q == p for q, *_ in plan)))


def test_two_processes_write_their_own_shards(tree, tmp_path, monkeypatch):
  root, good = tree
  out = str(tmp_path / "latents")
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(prepare_latents, "_barrier", lambda name: None)
  kw = dict(image_size=SIZE, batch_size=8, shard_size=4)

  monkeypatch.setattr(jax, "process_index", lambda: 0)
  with pytest.raises(RuntimeError, match="latents-p001-00000.tfrecord"):
    prepare_latents.prepare(root, "identity", out, **kw)  # process 1 has not written yet
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  assert prepare_latents.prepare(root, "identity", out, **kw) is None
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  manifest = prepare_latents.prepare(root, "identity", out, **kw)

  assert [s["file"] for s in manifest["shards"]] == [
      "latents-p000-00000.tfrecord", "latents-p000-00001.tfrecord",
      "latents-p001-00000.tfrecord", "latents-p001-00001.tfrecord"]
  labels, mean, _ = _read_all(out)
  np.testing.assert_array_equal(labels, [label for _, label in good])
  np.testing.assert_allclose(mean[:, 0], _expected_images(good), atol=1e-3)


class TinyImagesForPrepareLatents(tfds.core.GeneratorBasedBuilder):
  """A 7-image TFDS dataset with ImageNet's features (image, label, file_name)."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(encoding_format="png"),
        "label": tfds.features.ClassLabel(names=["x", "y", "z"]),
        "file_name": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i, image in enumerate(_tfds_images()):
      yield i, {"image": image, "label": i % 3, "file_name": f"img{i}.png"}


def _tfds_images() -> list[np.ndarray]:
  photo = load_sample_images().images[1]
  return [photo[10 * i:10 * i + 20 + 5 * i, 7 * i:7 * i + 40] for i in range(7)]


def test_tfds_source(tmp_path):
  out = str(tmp_path / "latents")
  manifest = prepare_latents.prepare("tfds:tiny_images_for_prepare_latents", "identity", out,
                                     image_size=SIZE, batch_size=8, shard_size=3,
                                     tfds_data_dir=str(tmp_path / "tfds"))
  assert manifest["count"] == 7 and manifest["classes"] == ["x", "y", "z"]
  assert len(manifest["shards"]) == 3 and manifest["split"] == "train"
  labels, mean, _ = _read_all(out)
  images = np.stack([preprocessing.preprocess(Image.fromarray(x), SIZE) for x in _tfds_images()])
  found = []
  for label, m in zip(labels, mean):  # TFDS stores examples in its own (fixed) order
    i = int(np.argmin(np.abs(images - m[0]).reshape(7, -1).max(axis=1)))
    assert np.abs(images[i] - m[0]).max() < 1e-3 and label == i % 3
    found.append(i)
  assert sorted(found) == list(range(7))
