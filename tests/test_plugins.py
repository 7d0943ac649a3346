"""The plug-in points: old checkpoints keep loading as the model gains variant fields, hidden
states of a chosen block, extra per-example inputs reaching a registered objective."""
import dataclasses
import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit_jax import (checkpointing, convert, guidance, input_pipeline, models, objectives,
                     records, step, train)
from test_train import digits_dir, tiny_config  # noqa: F401  (fixture)

FIXTURE = os.path.join(os.path.dirname(__file__), "data", "checkpoint_b0d07be")


def _fixture_config(data_dir, **overrides):
  """The config the fixture checkpoint was written with (its README), on `data_dir`."""
  return tiny_config(data_dir, **{"data.global_batch_size": 8, "checkpoint.every_steps": 2,
                                  "checkpoint.async_save": False, "optim.warmup_steps": 100,
                                  "data.shuffle_buffer": 2_000, **overrides})


def test_a_checkpoint_from_before_the_plugin_points_resumes_and_samples(  # noqa: F811
    digits_dir, tmp_path):  # noqa: F811
  wd = str(tmp_path / "old")
  shutil.copytree(os.path.join(FIXTURE, "checkpoints"), os.path.join(wd, "checkpoints"))
  meta = checkpointing.read_meta(wd)
  # Written before the variant fields and the objectives package existed.
  assert "norm" not in meta["model_kwargs"] and meta["objective"]["name"] == "adm"
  hist = train.train_and_evaluate(_fixture_config(digits_dir, total_steps=4), wd)
  assert sorted(hist) == [3, 4] and all(np.isfinite(hist[s]["loss"]) for s in hist)
  new = checkpointing.read_meta(wd)
  assert new["step"] == 4 and new["model_kwargs"]["norm"] == "layernorm"
  # The old checkpoint itself samples with today's sampler.
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  model, params, meta = checkpointing.load_ema_model(wd, dev, step=2)
  assert (model.norm, model.mlp, model.pos_embedding) == ("layernorm", "gelu", "sincos")
  fn = guidance.make_sample_fn(checkpointing.read_objective(meta), model, steps=4,
                               release_cfg=False)
  x = fn(params, jax.random.PRNGKey(0), jnp.arange(4, dtype=jnp.int32), jnp.float32(2.0))
  assert x.shape == (4, 8, 8, 1) and np.isfinite(np.asarray(x)).all()


def test_adm_training_repeats_the_losses_logged_before_the_plugin_points(  # noqa: F811
    digits_dir, tmp_path):  # noqa: F811
  """The fixture's README records the losses b0d07be logged on one device: the same keys draw
  the same t, noise, flips and label dropout today."""
  hist = train.train_and_evaluate(_fixture_config(digits_dir, total_steps=2),
                                  str(tmp_path / "fresh"), devices=jax.devices()[:1])
  np.testing.assert_allclose([hist[1]["loss"], hist[2]["loss"]], [1.08478, 1.03201],
                             rtol=2e-5)


def _edit_meta(wd, edit):
  path = os.path.join(wd, "checkpoints", "2", "meta", "metadata")
  with open(path) as f:
    meta = json.load(f)
  edit(meta["model_kwargs"])
  with open(path, "w") as f:
    json.dump(meta, f)


def test_a_new_variant_field_does_not_refuse_old_checkpoints(digits_dir, tmp_path):  # noqa: F811
  base = str(tmp_path / "base")
  shutil.copytree(os.path.join(FIXTURE, "checkpoints"), os.path.join(base, "checkpoints"))
  # Every variant field is absent from the fixture's meta: each reads as its default.
  fields = models.architecture_fields()
  variants = {"norm", "mlp", "pos_embedding", "attention"}
  assert variants <= set(fields)
  assert not variants & set(checkpointing.read_meta(base)["model_kwargs"])
  # A field recorded at another value than this run's is refused, naming it.
  other = str(tmp_path / "other")
  shutil.copytree(base, other)
  _edit_meta(other, lambda kw: kw.update(mlp="swiglu"))
  with pytest.raises(ValueError, match="mlp=swiglu there, gelu now"):
    train.train_and_evaluate(_fixture_config(digits_dir, total_steps=3), other)
  # A field this dit_jax does not know (a newer writer) is named when loading the model.
  newer = str(tmp_path / "newer")
  shutil.copytree(base, newer)
  _edit_meta(newer, lambda kw: kw.update(future_field=1))
  with pytest.raises(ValueError, match="future_field"):
    checkpointing.load_ema_model(newer, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  # The recorded kwargs are the module's architecture fields, nothing hand-listed.
  model = models.get_model("DiT-S/8", input_size=16, num_classes=3)
  kw = models.architecture(model)
  assert set(kw) == set(fields) and models.from_architecture(kw) == model
  assert not set(kw) & set(models.RUNTIME_FIELDS)


@pytest.mark.parametrize("remat", ["none", "full"])
def test_hidden_states_equal_with_scanned_and_unrolled_blocks(remat):
  model = models.DiT(input_size=8, patch_size=2, in_channels=2, hidden_size=32, depth=4,
                     num_heads=2, num_classes=5, remat=remat)
  scanned = model.clone(scan_layers=True)
  x = jax.random.normal(jax.random.PRNGKey(1), (3, 8, 8, 2))
  t, y = jnp.array([1, 400, 999]), jnp.array([0, 2, 4])
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), x, t, y)["params"])
  params = jax.tree.map(lambda p: p + 0.05 * jnp.sin(jnp.arange(p.size).reshape(p.shape)),
                        params)
  stacked = convert.stack_blocks({"p": params})["p"]
  plain = model.apply({"params": params}, x, t, y)
  for capture in (0, 2, 3):
    out, hidden = model.apply({"params": params}, x, t, y, capture=capture)
    out_s, hidden_s = jax.jit(lambda p: scanned.apply({"params": p}, x, t, y, capture=capture))(
        stacked)
    assert hidden.shape == (3, 16, 32)
    np.testing.assert_allclose(out, plain, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out_s, plain, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(hidden_s, hidden, rtol=1e-5, atol=1e-5)
  # The hidden states are those after blocks_{capture}: the last one feeds the final layer.
  _, first = model.apply({"params": params}, x, t, y, capture=0)
  _, last = model.apply({"params": params}, x, t, y, capture=3)
  assert float(jnp.abs(first - last).max()) > 1e-3
  # Gradients flow through both outputs of the split scan.
  grad = lambda m, p: jax.grad(lambda p: sum(
      jnp.sum(o ** 2) for o in m.apply({"params": p}, x, t, y, capture=1)))(p)
  g, g_s = grad(model, params), jax.jit(lambda p: grad(scanned, p))(stacked)
  np.testing.assert_allclose(convert.unstack_blocks({"p": g_s})["p"]["blocks_1"]["mlp"]["fc1"][
      "kernel"], g["blocks_1"]["mlp"]["fc1"]["kernel"], rtol=1e-4, atol=1e-6)
  with pytest.raises(ValueError, match="capture=4"):
    model.apply({"params": params}, x, t, y, capture=4)
  with pytest.raises(ValueError, match="initialise the scanned blocks without it"):
    scanned.init(jax.random.PRNGKey(0), x, t, y, capture=1)


@dataclasses.dataclass(frozen=True)
class _Probe(objectives.ADM):
  """ADM, plus what reached the loss: how far the extra 'image' is from the latent it was
  written beside (0 when both were flipped alike), and the captured hidden states' size."""
  name = "probe_extras"

  def training_losses(self, model_fn, x0, inputs):
    loss, logged = super().training_losses(model_fn, x0, inputs)
    _, hidden = model_fn(x0, inputs["t"], capture=0)
    mismatch = jnp.abs(x0 - inputs["image"]).max()
    return loss, {**logged, "mismatch": mismatch, "hidden_sq": jnp.mean(hidden ** 2),
                  "image_flip_sum": inputs["image"][:, :, 0].sum()}


@pytest.fixture
def probe_objective():
  objectives.register(_Probe)
  yield _Probe
  del objectives.REGISTRY[_Probe.name]


def _records_with_an_image(out: str, n: int = 32) -> np.ndarray:
  """Latent records whose extra 'image' [n, 4, 4, 2] equals the unflipped latent (std 0)."""
  rng = np.random.default_rng(0)
  image = rng.normal(size=(n, 4, 4, 2)).astype(np.float32)
  mean = np.stack([image, image[:, :, ::-1]], axis=1)
  for i in range(2):
    rows = slice(16 * i, 16 * (i + 1))
    records.write_shard(os.path.join(out, f"s{i}.tfrecord"), np.arange(n)[rows] % 3, mean[rows],
                        np.zeros_like(mean[rows]), dtype="float32",
                        extras={"image": records.Extra(image[rows], "width")})
  records.write_manifest(out, vae="identity", scale_factor=1.0, num_classes=3,
                         extra={"image_size": 4})
  return image


@pytest.mark.parametrize("scan_layers", [False, True])
def test_an_extra_array_reaches_the_objective_flipped_with_its_latent(tmp_path, probe_objective,
                                                                     scan_layers):
  _records_with_an_image(str(tmp_path))
  info = input_pipeline.get_info(str(tmp_path))
  assert info.manifest["extras"] == {"image": {"shape": [4, 4, 2], "dtype": "float32",
                                               "flip": "width"}}
  c = tiny_config(str(tmp_path), **{"objective.name": "probe_extras", "data.random_flip": True,
                                    "data.image_size": 4, "data.global_batch_size": 16,
                                    "model.overrides.patch_size": 2,
                                    "model.scan_layers": scan_layers})
  setup = step.build(c, info)
  assert setup.mesh.size == 8 and setup.explicit  # the written-out collectives, 8 devices
  ds = input_pipeline.create_dataset(info, local_batch_size=16, seed=0, shuffle_buffer=32)
  batches = input_pipeline.iterate(ds, info.files)
  state = setup.init(jax.random.PRNGKey(0))
  sums = []
  for _ in range(3):
    batch = {k: jax.make_array_from_process_local_data(setup.batch_sh, v)
             for k, v in next(batches).items()}
    assert set(batch) == {"label", "mean", "std", "image"}
    state, metrics = setup.compiled(state, batch)
    assert float(metrics["mismatch"]) == 0.0
    assert np.isfinite(float(metrics["hidden_sq"])) and float(metrics["hidden_sq"]) > 0
    sums.append(float(metrics["image_flip_sum"]))
  # The flips are drawn per example and per step: the image reached the loss in both
  # orientations. Each device logs its rows' sum, averaged over the 8 devices.
  again = input_pipeline.iterate(input_pipeline.create_dataset(
      info, local_batch_size=16, seed=0, shuffle_buffer=32), info.files)
  unflipped = [float(next(again)["image"][:, :, 0].sum()) for _ in range(3)]
  assert any(abs(8 * a - b) > 1e-3 for a, b in zip(sums, unflipped)), (sums, unflipped)


def test_the_planner_compiles_a_step_that_reads_an_extra_array(probe_objective):
  from dit_jax import data_info  # pylint: disable=import-outside-toplevel
  c = tiny_config("unused", **{"objective.name": "probe_extras", "data.builtin": "digits",
                               "data.image_size": 8})
  extras = {"image": {"shape": [8, 8, 1], "dtype": "float32", "flip": "width"}}
  setup = step.build(c, data_info.synthetic_info(c, extras=extras))
  assert setup.compiled is not None
  with pytest.raises(KeyError, match="image"):  # without the extra the objective cannot trace
    step.build(c, data_info.synthetic_info(c))
