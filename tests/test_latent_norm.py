"""Latent normalisation: the scale factor and per-channel statistics, their record in manifests
and checkpoints, and the refusal of a record set normalised otherwise than a checkpoint."""

import json
import os

import numpy as np
import pytest
import torch

from dit_jax import checkpointing, latent_norm, records, sampling, train
from test_train import _copy_dataset, digits_dir, tiny_config  # noqa: F401  (fixture)


def test_per_channel_rule_is_lightningdits_and_inverts():
  rng = np.random.default_rng(0)
  mean, std = rng.normal(size=5), rng.uniform(0.5, 2.0, 5)
  norm = latent_norm.LatentNorm(0.7, tuple(mean), tuple(std))
  z = rng.normal(size=(3, 4, 4, 5)).astype(np.float32)
  # LightningDiT: feature = (feature - mean) / std * latent_multiplier, with [1, C, 1, 1] stats
  # on NCHW; sampling: samples * std / latent_multiplier + mean.
  zt = torch.from_numpy(z.transpose(0, 3, 1, 2))
  m_t, s_t = (torch.tensor(v, dtype=torch.float32).view(1, 5, 1, 1) for v in (mean, std))
  want = ((zt - m_t) / s_t * 0.7).numpy().transpose(0, 2, 3, 1)
  x = np.asarray(norm.normalize(z))
  np.testing.assert_allclose(x, want, rtol=1e-5, atol=1e-6)
  back = (torch.from_numpy(x.transpose(0, 3, 1, 2).copy()) * s_t / 0.7 + m_t).numpy().transpose(0, 2, 3, 1)
  np.testing.assert_allclose(np.asarray(norm.denormalize(x)), back, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(norm.denormalize(x)), z, rtol=1e-5, atol=1e-5)
  # The scale factor alone is the release's rule.
  np.testing.assert_allclose(np.asarray(latent_norm.LatentNorm(0.18215).normalize(z)),
                             z * 0.18215, rtol=1e-6)
  with pytest.raises(ValueError, match="have 4 channels but the per-channel latent statistics "
                                       "have 5"):
    norm.normalize(z[..., :4])


def test_statistics_are_the_moments_of_the_posterior_samples():
  rng = np.random.default_rng(1)
  shards = [(rng.normal(1.0, 2.0, (n, 2, 3, 3, 4)), rng.uniform(0.1, 1.0, (n, 2, 3, 3, 4)))
            for n in (5, 7)]
  stats = latent_norm.stats_from_moments(latent_norm.channel_moments(m, s) for m, s in shards)
  # Monte Carlo over posterior samples z = mean + std * eps of every value of both shards.
  draws = np.concatenate([(m[None] + s[None] * rng.normal(size=(400, *m.shape))).reshape(
      -1, 4) for m, s in shards])
  np.testing.assert_allclose(stats["mean"], draws.mean(0), atol=0.02)
  np.testing.assert_allclose(stats["std"], draws.std(0), rtol=0.01)
  # With std = 0 they are numpy's mean and (population) std of the stored means.
  flat = np.concatenate([m.reshape(-1, 4) for m, _ in shards])
  exact = latent_norm.stats_from_moments(
      latent_norm.channel_moments(m, np.zeros_like(m)) for m, _ in shards)
  np.testing.assert_allclose(exact["mean"], flat.mean(0), rtol=1e-12)
  np.testing.assert_allclose(exact["std"], flat.std(0), rtol=1e-10)


def test_manifest_and_meta_records_and_their_errors(tmp_path):
  d = str(tmp_path)
  rng = np.random.default_rng(2)
  mean = rng.normal(3.0, 2.0, (6, 2, 2, 2, 3)).astype(np.float32)
  records.write_shard(os.path.join(d, "a.tfrecord"), np.zeros(6, np.int64), mean,
                      np.zeros_like(mean), dtype="float32")
  m = records.write_manifest(d, vae="x", scale_factor=1.0, num_classes=1, per_channel=True)
  flat = mean.reshape(-1, 3)
  np.testing.assert_allclose(m["latent_stats"]["mean"], flat.mean(0), rtol=1e-6)
  np.testing.assert_allclose(m["latent_stats"]["std"], flat.std(0), rtol=1e-5)
  read = latent_norm.from_record(records.read_manifest(d), "manifest.json")
  assert read.per_channel and read.channels == 3
  # Checkpoint meta keeps the same record; older meta has only the scale factor.
  assert latent_norm.from_record({"latent_norm": read.to_meta()}, "meta").same_as(read)
  assert latent_norm.from_record({"scale_factor": 0.18215}, "meta") == latent_norm.LatentNorm(
      0.18215)
  # A manifest whose statistics do not fit its latents is refused by name.
  path = os.path.join(d, records.MANIFEST)
  bad = dict(m, latent_stats={"mean": [0.0, 0.0], "std": [1.0, 1.0]})
  with open(path, "w") as f:
    json.dump(bad, f)
  with pytest.raises(ValueError, match=r"manifest.json: the latents have 3 channels but the "
                                       r"per-channel latent statistics have 2"):
    records.read_manifest(d)
  with open(path, "w") as f:
    json.dump(dict(m, latent_stats={"mean": [0.0] * 3, "std": [1.0, 0.0, 1.0]}), f)
  with pytest.raises(ValueError, match=r"manifest.json: bad latent_stats .*std positive"):
    records.read_manifest(d)


def test_identity_decoder_undoes_per_channel_statistics():
  norm = latent_norm.LatentNorm(1.0, (0.5, -0.5, 0.0), (0.25, 0.5, 0.1))
  images = np.random.default_rng(3).uniform(-1, 1, (2, 4, 4, 3)).astype(np.float32)
  out = np.asarray(sampling.Decoder("identity", norm)(norm.normalize(images)))
  want = np.clip(127.5 * images + 128.0, 0, 255).astype(np.uint8)
  assert np.abs(out.astype(int) - want.astype(int)).max() <= 1


def test_checkpoint_refuses_records_normalised_otherwise(digits_dir, tmp_path):  # noqa: F811
  per_channel = str(tmp_path / "digits_per_channel")
  _copy_dataset(digits_dir, per_channel)
  m = records.read_manifest(digits_dir)
  manifest = records.write_manifest(per_channel, vae="identity", scale_factor=1.0,
                                    num_classes=m["num_classes"], per_channel=True)
  stats = manifest["latent_stats"]
  assert len(stats["mean"]) == 1 and 0 < stats["std"][0] < 1
  wd = str(tmp_path / "run")
  train.train_and_evaluate(tiny_config(per_channel, total_steps=1), wd)
  meta = checkpointing.read_meta(wd)
  norm = latent_norm.from_record(meta, wd)
  assert norm.per_channel and norm.same_as(latent_norm.from_record(manifest, "manifest"))
  # The scale-factor record set is refused by name, before any step.
  with pytest.raises(ValueError, match=r"digits.*manifest.json normalises latents by scale "
                                       r"factor 1, but the checkpoint in .*run/checkpoints was "
                                       r"trained on latents normalised by per-channel"):
    train.train_and_evaluate(tiny_config(digits_dir, total_steps=2), wd)
