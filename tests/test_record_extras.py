"""Named extra per-example arrays in latent records: written, listed, validated and batched."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from dit_jax import input_pipeline
from dit_jax import records

LATENT = (4, 4, 2)  # [h, w, c] of one orientation


def _shard(path: str, labels: np.ndarray, *, extras=None, latent=LATENT, **kw) -> dict:
  """Writes a shard whose mean encodes the label (mean = label + position) and std = 0.5."""
  n = len(labels)
  mean = (np.asarray(labels, np.float32)[:, None, None, None, None]
          + np.arange(np.prod(latent) * 2).reshape(1, 2, *latent) / 64)
  mean = np.broadcast_to(mean, (n, 2, *latent))
  return records.write_shard(path, labels, mean, np.full_like(mean, 0.5), extras=extras, **kw)


def _extras(labels: np.ndarray, seed: int) -> dict[str, records.Extra]:
  rng = np.random.default_rng(seed)
  n = len(labels)
  return {
      "image": records.Extra(rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8), "width"),
      "feat": records.Extra(rng.standard_normal((n, 4, 16)).astype(np.float16), "none"),
  }


def _manifest(d: str) -> dict:
  return records.write_manifest(d, vae="identity", scale_factor=1.0, num_classes=16)


def _batches(d: str, batch_size: int, count: int) -> list[dict[str, np.ndarray]]:
  info = input_pipeline.get_info(d)
  ds = input_pipeline.create_dataset(info, local_batch_size=batch_size, seed=0, shuffle_buffer=8)
  it = input_pipeline.iterate(ds, info.files)
  return [next(it) for _ in range(count)]


def test_two_extras_round_trip_through_the_pipeline(tmp_path):
  d = str(tmp_path)
  labels_a, labels_b = np.arange(6), np.arange(6, 11)
  extras_a, extras_b = _extras(labels_a, 0), _extras(labels_b, 1)
  side = _shard(os.path.join(d, "a.tfrecord"), labels_a, extras=extras_a)
  _shard(os.path.join(d, "b.tfrecord"), labels_b, extras=extras_b)
  want_extras = {"feat": {"shape": [4, 16], "dtype": "float16", "flip": "none"},
                 "image": {"shape": [8, 8, 3], "dtype": "uint8", "flip": "width"}}
  assert side["extras"] == want_extras
  assert json.load(open(os.path.join(d, "a.tfrecord.json")))["extras"] == want_extras

  manifest = _manifest(d)
  assert manifest["extras"] == want_extras
  assert records.read_manifest(d)["extras"] == want_extras
  assert records.flip_modes(manifest) == {"mean": "pair", "std": "pair", "feat": "none",
                                          "image": "width"}
  spec = records.batch_spec(manifest, 4)
  assert spec == {"label": ((4,), np.int32), "mean": ((4, 2, *LATENT), np.float16),
                  "std": ((4, 2, *LATENT), np.float16), "feat": ((4, 4, 16), np.float16),
                  "image": ((4, 8, 8, 3), np.uint8)}

  by_label = {}
  for labels, extras in ((labels_a, extras_a), (labels_b, extras_b)):
    for i, label in enumerate(labels):
      by_label[int(label)] = {k: e.value[i] for k, e in extras.items()}
  batches = _batches(d, 4, 3)  # 12 records: one epoch of 11 and the start of the next
  for batch in batches:
    assert set(batch) == set(spec)
    for k, (shape, dtype) in spec.items():
      assert batch[k].shape == shape and batch[k].dtype == dtype, k
    for i, label in enumerate(batch["label"]):
      np.testing.assert_array_equal(batch["image"][i], by_label[label]["image"])
      np.testing.assert_array_equal(batch["feat"][i], by_label[label]["feat"])
      assert batch["mean"][i, 0, 0, 0, 0] == label  # the latents of the same record
  first_epoch = np.concatenate([b["label"] for b in batches])[:11]
  assert sorted(first_epoch) == list(range(11))


@pytest.mark.parametrize("other", [
    {"image": records.Extra(np.zeros((3, 8, 4, 3), np.uint8), "width")},   # shape
    {"image": records.Extra(np.zeros((3, 8, 8, 3), np.float16), "width")},  # dtype
    {"image": records.Extra(np.zeros((3, 8, 8, 3), np.uint8), "none")},    # flip
    {"picture": records.Extra(np.zeros((3, 8, 8, 3), np.uint8), "width")},  # name
    None,                                                                   # none at all
])
def test_shards_disagreeing_on_extras_are_refused(tmp_path, other):
  d = str(tmp_path)
  _shard(os.path.join(d, "a.tfrecord"), np.arange(3),
         extras={"image": records.Extra(np.zeros((3, 8, 8, 3), np.uint8), "width")})
  _shard(os.path.join(d, "b.tfrecord"), np.arange(3), extras=other)
  with pytest.raises(ValueError, match=re.escape(os.path.join(d, "b.tfrecord.json"))):
    _manifest(d)


def _lie_in_sidecar(path: str, extras: dict) -> None:
  """Declares `extras` in a shard's sidecar, so that the manifest accepts a mis-sized shard."""
  with open(path + ".json") as f:
    info = json.load(f)
  info["extras"] = extras
  with open(path + ".json", "w") as f:
    json.dump(info, f)


@pytest.mark.parametrize("bad_extras", [
    {"image": records.Extra(np.zeros((4, 8, 4, 3), np.uint8), "width")},  # half the width
    None,                                                                  # field missing
])
def test_mis_sized_extra_is_named_by_iterate(tmp_path, bad_extras):
  d = str(tmp_path)
  good = {"image": records.Extra(np.zeros((4, 8, 8, 3), np.uint8), "width")}
  info = _shard(os.path.join(d, "a.tfrecord"), np.arange(4), extras=good)
  _shard(os.path.join(d, "b.tfrecord"), np.arange(4), extras=bad_extras)
  _lie_in_sidecar(os.path.join(d, "b.tfrecord"), info["extras"])
  _manifest(d)
  with pytest.raises(ValueError, match=r"'image' in.*b\.tfrecord.*needs 192"):
    _batches(d, 8, 1)


@pytest.mark.parametrize("name,extra,match", [
    ("label", records.Extra(np.zeros((3, 2), np.int32), "none"), "identifier"),
    ("mean", records.Extra(np.zeros((3, 2), np.int32), "none"), "identifier"),
    ("my-image", records.Extra(np.zeros((3, 2), np.int32), "none"), "identifier"),
    ("feat", records.Extra(np.zeros((3, 2), np.float64), "none"), "float64"),
    ("feat", records.Extra(np.zeros((3, 2), np.int64), "none"), "int64"),
    ("feat", records.Extra(np.zeros((3, 2), bool), "none"), "bool"),
    ("feat", records.Extra(np.zeros((2, 2), np.float32), "none"), r"\[n=3"),
    ("feat", records.Extra(np.full((3, 2), np.inf, np.float16), "none"), "non-finite"),
    ("image", records.Extra(np.zeros((3, 8), np.uint8), "width"), "spatial"),
    ("image", records.Extra(np.zeros((3, 8, 8), np.uint8), "height"), "flip"),
    ("image", np.zeros((3, 8, 8), np.uint8), "records.Extra"),
])
def test_bad_extras_are_refused_with_their_name(tmp_path, name, extra, match):
  path = str(tmp_path / "a.tfrecord")
  with pytest.raises((ValueError, TypeError), match=match) as e:
    _shard(path, np.arange(3), extras={name: extra})
  assert path in str(e.value) and repr(name) in str(e.value)
  assert os.listdir(tmp_path) == []  # refused before anything is written


@pytest.mark.parametrize("field,value,match", [
    ("shape", [8, "8", 3], "shape"),
    ("shape", 8, "shape"),
    ("dtype", "float64", "dtype"),
    ("flip", "height", "flip"),
    ("flip", "width", "flip 'width' needs"),  # on the [4, ] shape below
])
def test_manifest_extras_are_validated(tmp_path, field, value, match):
  d = str(tmp_path)
  _shard(os.path.join(d, "a.tfrecord"), np.arange(3),
         extras={"feat": records.Extra(np.zeros((3, 4), np.float32), "none")})
  m = _manifest(d)
  m["extras"]["feat"][field] = value
  path = os.path.join(d, records.MANIFEST)
  with open(path, "w") as f:
    json.dump(m, f)
  with pytest.raises(ValueError, match=match) as e:
    records.read_manifest(d)
  assert path in str(e.value) and "'feat'" in str(e.value)


def test_reserved_name_in_a_manifest_is_refused(tmp_path):
  d = str(tmp_path)
  _shard(os.path.join(d, "a.tfrecord"), np.arange(3))
  m = _manifest(d)
  m["extras"] = {"std": {"shape": [2], "dtype": "float32", "flip": "none"}}
  with open(os.path.join(d, records.MANIFEST), "w") as f:
    json.dump(m, f)
  with pytest.raises(ValueError, match=r"manifest\.json: extra name 'std'"):
    records.read_manifest(d)


def test_dataset_without_extras_is_unchanged(tmp_path):
  d = str(tmp_path)
  _shard(os.path.join(d, "a.tfrecord"), np.arange(5), dtype="float32")
  # A sidecar from before extras existed (no "extras" field) is read as having none.
  _shard(os.path.join(d, "b.tfrecord"), np.arange(5, 10), dtype="float32")
  with open(os.path.join(d, "b.tfrecord.json")) as f:
    info = json.load(f)
  del info["extras"]
  with open(os.path.join(d, "b.tfrecord.json"), "w") as f:
    json.dump(info, f)
  manifest = _manifest(d)
  assert "extras" not in manifest and "extras" not in records.read_manifest(d)
  assert records.batch_spec(manifest, 3) == {"label": ((3,), np.int32),
                                             "mean": ((3, 2, *LATENT), np.float32),
                                             "std": ((3, 2, *LATENT), np.float32)}
  assert records.flip_modes(manifest) == {"mean": "pair", "std": "pair"}
  (batch,) = _batches(d, 3, 1)
  assert set(batch) == {"label", "mean", "std"}
  np.testing.assert_array_equal(batch["mean"][:, 0, 0, 0, 0], batch["label"])


def test_extras_is_not_a_free_form_manifest_field(tmp_path):
  _shard(str(tmp_path / "a.tfrecord"), np.arange(3))
  with pytest.raises(ValueError, match="write_shard"):
    records.write_manifest(str(tmp_path), vae="identity", scale_factor=1.0, num_classes=3,
                           extra={"extras": {}})


def test_batch_spec_and_flip_modes_need_no_tensorflow():
  # The train step builds its abstract batch from these where TensorFlow is not installed.
  code = ("import sys\n"
          "sys.modules['tensorflow'] = None  # any import of it now fails\n"
          "from dit_jax import records\n"
          "m = {'latent_shape': [4, 4, 2], 'dtype': 'float16',\n"
          "     'extras': {'image': {'shape': [8, 8, 3], 'dtype': 'uint8', 'flip': 'width'}}}\n"
          "print(records.batch_spec(m, 2)['image'], records.flip_modes(m)['image'])\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == "((2, 8, 8, 3), dtype('uint8')) width"
