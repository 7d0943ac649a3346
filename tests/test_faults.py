"""Faults that must not lose work or train on wrong data, and the errors they give."""

import glob
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from dit_jax import checkpointing, integrity, train
from test_main_cli import ROOT, env, main_cmd, steps_saved
from test_train import _copy_dataset, digits_dir, final_params, tiny_config  # noqa: F401


def _all_finite(tree):
  return all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(tree))


def test_digest_is_layout_independent_and_sees_one_bit():
  x = jnp.arange(64 * 8, dtype=jnp.float32).reshape(64, 8) / 7
  tree = {"w": x, "k": jax.random.PRNGKey(3), "b": jnp.ones((3,), jnp.bfloat16)}
  mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
  sharded = dict(tree, w=jax.device_put(x, NamedSharding(mesh, P("d"))))
  ref = integrity.summarize(tree)
  assert integrity.summarize(sharded) == ref  # same digests on 1 device and over 8
  assert integrity.nonfinite(ref) == []
  bits = np.asarray(x).view(np.uint32).copy()
  for i, bit in ((1, 31), (2, 0), (511, 17)):  # the sign bit at an odd position too
    flipped = bits.copy()
    flipped.reshape(-1)[i] ^= np.uint32(1 << bit)
    changed = integrity.summarize(dict(tree, w=jnp.asarray(flipped.view(np.float32))))
    assert integrity.mismatches(changed, integrity.digests(ref)) == ["['w']"]
  swapped = np.asarray(x).copy()
  swapped[0, [0, 1]] = swapped[0, [1, 0]]  # same values, other places
  assert integrity.mismatches(integrity.summarize(dict(tree, w=jnp.asarray(swapped))),
                              integrity.digests(ref)) == ["['w']"]
  assert integrity.nonfinite(integrity.summarize(dict(tree, w=x.at[3, 3].set(jnp.nan)))) == ["['w']"]


def test_nonfinite_state_is_never_checkpointed(digits_dir, tmp_path):  # noqa: F811
  wd = str(tmp_path)
  train.train_and_evaluate(tiny_config(digits_dir, total_steps=6), wd)  # checkpoints 3, 6
  _, good, _ = final_params(wd)
  # Diverge: saves every 2 steps, logs only every 100, keeping 3 checkpoints.
  c = tiny_config(digits_dir, total_steps=40, **{
      "optim.learning_rate": 1e30, "log_every_steps": 100, "checkpoint.every_steps": 2})
  with pytest.raises(FloatingPointError, match=r"NaN/inf at step (\d+)") as e:
    train.train_and_evaluate(c, wd)
  bad = int(e.value.args[0].split("at step ")[1].split()[0])
  assert bad > 6 and "newest: step" in str(e.value)
  saved = steps_saved(wd)
  assert 6 in saved and all(s < bad for s in saved), (saved, bad)
  step, params, ema = final_params(wd)
  assert step < bad and _all_finite(params) and _all_finite(ema)
  if step == 6:
    jax.tree.map(np.testing.assert_array_equal, params, good)


def test_save_refuses_a_nonfinite_state(tmp_path):
  mngr = checkpointing.create_manager(str(tmp_path), keep=2, async_save=False)
  tree = {"w": jnp.ones((4,))}
  checkpointing.save(mngr, 1, tree, tree, {"step": 1})
  with pytest.raises(FloatingPointError, match=r"step 2: .*NaN/inf in 1 array.*\['w'\]"):
    checkpointing.save(mngr, 2, {"w": jnp.array([1.0, jnp.inf, 0, 0])}, tree, {"step": 2})
  mngr.wait_until_finished()
  assert mngr.all_steps() == [1]
  mngr.close()


def _flip_bytes(path, n=400, seed=0):
  data = bytearray(open(path, "rb").read())
  rng = np.random.default_rng(seed)
  lo = len(data) // 4
  for i in rng.choice(np.arange(lo, len(data) - lo), size=min(n, len(data) // 2), replace=False):
    data[i] ^= 0xFF
  open(path, "wb").write(bytes(data))


def _edit_meta(workdir, step, fn):
  path = glob.glob(os.path.join(workdir, "checkpoints", str(step), "meta", "*"))[0]
  meta = json.load(open(path))
  fn(meta)
  json.dump(meta, open(path, "w"))


@pytest.mark.parametrize("damage", ["bytes", "values"])
def test_corrupt_checkpoint_of_the_right_size_is_set_aside(digits_dir, tmp_path, caplog,  # noqa: F811
                                                           damage):
  wd = str(tmp_path)
  train.train_and_evaluate(tiny_config(digits_dir), wd)  # checkpoints 3 and 6
  if damage == "bytes":  # flipped bytes in the largest data file: fails to decode
    files = glob.glob(os.path.join(wd, "checkpoints", "6", "train", "**", "d", "*"),
                      recursive=True)
    biggest = max(files, key=os.path.getsize)
    size = os.path.getsize(biggest)
    _flip_bytes(biggest)
    assert os.path.getsize(biggest) == size
  else:  # arrays that decode but are not what was saved: only the digests can tell
    def tamper(meta):
      leaf = sorted(meta["integrity"]["train"])[5]
      meta["integrity"]["train"][leaf] = "0123456789abcdef"
    _edit_meta(wd, 6, tamper)
  hist = train.train_and_evaluate(
      tiny_config(digits_dir, total_steps=7, **{"checkpoint.restore_backoff_s": 0.0}), wd)
  assert sorted(hist) == [4, 5, 6, 7]  # resumed from step 3
  assert os.listdir(os.path.join(wd, "checkpoints_unreadable"))[0].startswith("6-")
  assert "checkpoints/6 cannot be restored" in caplog.text
  if damage == "values":
    assert "differ from the digests recorded at save time" in caplog.text
  else:  # TensorStore's checksum, or the decompressor, finds the flipped bytes
    assert ("Data corruption detected" in caplog.text
            or "ZSTD_decompressStream() failed" in caplog.text), caplog.text
  assert "restore attempt" not in caplog.text  # damage is not retried (transient errors are)
  _, params, ema = final_params(wd)
  assert _all_finite(params) and _all_finite(ema)


def test_ema_restore_verifies_digests(digits_dir, tmp_path):  # noqa: F811
  wd = str(tmp_path)
  train.train_and_evaluate(tiny_config(digits_dir, total_steps=3), wd)
  sh = NamedSharding(jax.make_mesh((8,), ("d",)), P())
  checkpointing.load_ema_model(wd, sh)  # verifies
  _edit_meta(wd, 3, lambda meta: meta["integrity"]["ema"].update(
      {next(iter(meta["integrity"]["ema"])): "0" * 16}))
  with pytest.raises(checkpointing.CheckpointIntegrityError, match="differ from the digests"):
    checkpointing.load_ema_model(wd, sh)


def test_edited_manifest_shape_is_refused(digits_dir, tmp_path):  # noqa: F811
  d = str(tmp_path / "data")
  _copy_dataset(digits_dir, d)
  path = os.path.join(d, "manifest.json")
  m = json.load(open(path))
  m["latent_shape"] = [4, 4, 4]  # as many values per record as [8, 8, 1]
  json.dump(m, open(path, "w"))
  with pytest.raises(ValueError, match=r"latent_shape is \[4, 4, 4\] .* \[8, 8, 1\]"):
    train.train_and_evaluate(tiny_config(d), str(tmp_path / "wd"))
  # Without sidecars, the image size and the VAE's downsampling still disagree.
  for side in glob.glob(os.path.join(d, "*.tfrecord.json")):
    os.remove(side)
  with pytest.raises(ValueError, match=r"latent_shape \[4, 4, 4\] does not fit 8px images"):
    train.train_and_evaluate(tiny_config(d), str(tmp_path / "wd"))


def test_shard_failing_its_crc_is_named(digits_dir, tmp_path):  # noqa: F811
  d = str(tmp_path / "data")
  _copy_dataset(digits_dir, d)
  shard = sorted(glob.glob(os.path.join(d, "*.tfrecord")))[2]
  data = bytearray(open(shard, "rb").read())
  data[len(data) // 2] ^= 0x01  # same size: only the record CRC can tell
  open(shard, "wb").write(bytes(data))
  with pytest.raises(ValueError, match="corrupt TFRecord shard") as e:
    train.train_and_evaluate(tiny_config(d, total_steps=400), str(tmp_path / "wd"))
  msg = str(e.value)
  assert msg.startswith(shard + ":")
  others = [f for f in glob.glob(os.path.join(d, "*.tfrecord")) if f != shard]
  assert not any(os.path.basename(f) in msg for f in others)


def test_only_checkpoint_unreadable_gives_one_short_error(digits_dir, tmp_path):  # noqa: F811
  wd = str(tmp_path / "run")
  first = subprocess.run(main_cmd(wd, digits_dir, "--config.total_steps=2",
                                  "--config.checkpoint.every_steps=2"),
                         cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
  assert first.returncode == 0, first.stderr[-3000:]
  for f in glob.glob(os.path.join(wd, "checkpoints", "2", "train", "**", "d", "*"),
                     recursive=True):
    with open(f, "r+b") as fh:
      fh.truncate(10)
  r = subprocess.run(main_cmd(wd, digits_dir, "--config.total_steps=4",
                              "--config.checkpoint.restore_backoff_s=0"),
                     cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
  assert r.returncode != 0
  assert "Event loop is closed" not in r.stderr
  problems = [l for l in r.stderr.splitlines() if l[:1] in "EW" or l.startswith("RuntimeError")]
  assert len(r.stderr.splitlines()) < 150 and len(problems) < 12, r.stderr[-5000:]
  errors = [l for l in r.stderr.splitlines() if l.startswith("RuntimeError: No checkpoint in ")]
  assert len(errors) == 1, r.stderr[-5000:]
  assert "checkpoints_unreadable" in errors[0] and len(errors[0]) < 1000
  assert steps_saved(wd) == [] and os.listdir(os.path.join(wd, "checkpoints_unreadable"))


def _not_log_lines(stderr):
  """stderr less absl's I/W log lines (and TensorFlow's start-up notices)."""
  return [l for l in stderr.splitlines() if l.strip() and not (
      l[:1] in "IW" and l[1:5].isdigit()) and "absl::InitializeLog" not in l]


@pytest.mark.parametrize("case", ["missing", "not_npz", "grayscale"])
def test_evaluate_errors_name_the_file_in_two_lines(tmp_path, case):
  bad = tmp_path / "samples.npz"
  if case == "not_npz":
    bad.write_text("not a zip archive")
  elif case == "grayscale":  # [N, H, W, 1] uint8 is not an ADM sample batch
    np.savez(bad, arr_0=np.zeros((4, 32, 32, 1), np.uint8))
  r = subprocess.run([sys.executable, "-m", "dit_jax.evaluate", f"--samples={bad}",
                      f"--reference={tmp_path / 'ref.npz'}", f"--inception={tmp_path / 'i.npz'}"],
                     cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
  assert r.returncode == 1, r.stderr[-3000:]
  lines = _not_log_lines(r.stderr)
  assert len(lines) == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
  want = {"missing": f"FileNotFoundError: {bad}: no such file",
          "not_npz": f"ValueError: {bad}: not an .npz file",
          "grayscale": f"ValueError: {bad}: arr_0 must be uint8 RGB images [N, H, W, 3]"}[case]
  assert lines[0].startswith(want), lines
  if case == "grayscale":
    assert lines[0].endswith("got uint8 [4, 32, 32, 1]"), lines
  assert "--traceback" in lines[1]


def test_prepare_latents_errors_name_the_input(tmp_path):
  r = subprocess.run([sys.executable, "-m", "dit_jax.prepare_latents",
                      f"--source={tmp_path / 'nowhere'}", "--vae=identity",
                      f"--out={tmp_path / 'out'}"],
                     cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
  assert r.returncode == 1
  lines = _not_log_lines(r.stderr)
  assert len(lines) == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
  assert lines[0].startswith("FileNotFoundError: --source=") and "nowhere" in lines[0], lines
