"""The diffusers format both ways: a bit-exact round trip, DiTTransformer2DModel and DiTPipeline
loading what dit-convert writes, and DDIM sampling parity with diffusers' pipeline."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DiTPipeline, DiTTransformer2DModel

from dit_jax import convert, diffusers_format, guidance, models, objectives

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model(num_classes=1000, learn_sigma=True):
  return models.DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2,
                    num_heads=2, num_classes=num_classes, learn_sigma=learn_sigma)


def _params(model, seed=0):
  """Random weights away from the init's zeros (the adaLN-Zero gates would hide mistakes)."""
  p = nn.meta.unbox(model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 8, 8, 4)),
                               jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.int32)))["params"]
  rng = np.random.default_rng(seed)

  def draw(path, x):
    name = jax.tree_util.keystr(path)
    if "embedding" in name:
      return rng.normal(0, 0.5, x.shape).astype(np.float32)
    if x.ndim >= 2:  # unit-variance outputs: fan-in scaled, as test_convert's reference
      bound = np.sqrt(3.0 / np.prod(x.shape[:-1]))
      return rng.uniform(-bound, bound, x.shape).astype(np.float32)
    return rng.normal(0, 0.1, x.shape).astype(np.float32)
  return jax.tree_util.tree_map_with_path(draw, p)


def _vae_dir(path):
  torch.manual_seed(0)
  vae = AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                      up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1,
                      norm_num_groups=8, latent_channels=4, sample_size=16).eval()
  vae.save_pretrained(path, safe_serialization=True)
  return path


def test_round_trip_is_bit_exact():
  model = _model(num_classes=10)
  params = _params(model)
  sd = diffusers_format.to_diffusers_state_dict(convert.to_official(params, model), model)
  back_model, release_sd = diffusers_format.from_diffusers_state_dict(
      sd, diffusers_format.transformer_config(model))
  back = convert.from_official(release_sd, back_model)
  assert models.architecture(back_model) == models.architecture(model)
  for (pa, a), (pb, b) in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                              jax.tree_util.tree_flatten_with_path(back)[0]):
    assert pa == pb
    np.testing.assert_array_equal(a, b)


def test_transformer_loads_in_diffusers_and_gives_our_output(tmp_path):
  model = _model(num_classes=10)
  params = _params(model)
  out = str(tmp_path / "pipe")
  line = convert.to_diffusers(out, params, model, None)
  assert "no --vae given" in line
  ref = DiTTransformer2DModel.from_pretrained(os.path.join(out, "transformer")).eval()
  for block in ref.transformer_blocks:  # the release's timestep frequencies (see the module doc)
    block.norm1.emb.time_proj.downscale_freq_shift = 0
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 4, 8, 8)).astype(np.float32)
  t, y = np.array([0, 500, 999]), np.array([1, 4, 10])
  with torch.no_grad():
    want = ref(torch.from_numpy(x), timestep=torch.from_numpy(t),
               class_labels=torch.from_numpy(y)).sample.numpy()
  got = model.apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t),
                    jnp.asarray(y))
  got = np.asarray(got).transpose(0, 3, 1, 2)
  assert np.abs(want).max() > 0.1
  assert np.abs(got - want).max() / np.abs(want).max() < 1e-5


def test_dit_pipeline_loads_offline_and_samples_as_our_ddim(tmp_path, monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  model = _model(num_classes=1000)  # DiTPipeline's null class is 1000
  params = _params(model, seed=3)
  out = str(tmp_path / "pipe")
  id2label = {i: f"class {i}" for i in range(1000)}
  line = convert.to_diffusers(out, params, model, {"name": "adm", "steps": 1000,
                                                   "noise_schedule": "linear"},
                              _vae_dir(str(tmp_path / "vae")), id2label)
  assert "DiTPipeline" in line
  pipe = DiTPipeline.from_pretrained(out)
  assert pipe.get_label_ids(["class 7"]) == [7]
  for block in pipe.transformer.transformer_blocks:
    block.norm1.emb.time_proj.downscale_freq_shift = 0
  seen = {}
  decode = pipe.vae.decode
  pipe.vae.decode = lambda z, **kw: seen.setdefault("z", z.clone()) is not None and decode(z, **kw)
  labels, scale, steps = [3, 7], 4.0, 10
  pipe(class_labels=labels, guidance_scale=scale, num_inference_steps=steps,
       generator=torch.Generator().manual_seed(0), output_type="np")
  theirs = (seen["z"] * pipe.vae.config.scaling_factor).numpy()  # the sampler's latents
  noise = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0)).numpy()
  objective = objectives.from_meta({"objective": {"name": "adm"},
                                    "model_kwargs": {"learn_sigma": True}})
  run = objective.sampler(None, None, respacing=f"ddim{steps}")
  apply = lambda x, t, y: model.apply({"params": params}, x, t, y)
  y = jnp.asarray(labels, jnp.int32)
  fn = guidance.kept_half(guidance.cfg_model_fn(apply, y, 1000, jnp.float32(scale), None))
  ours = run(fn, jnp.asarray(noise.transpose(0, 2, 3, 1)), jax.random.PRNGKey(0))
  ours = np.asarray(ours).transpose(0, 3, 1, 2)
  assert np.abs(ours - noise).max() > 0.1  # the sampler moved the latents
  assert np.abs(ours - theirs).max() / np.abs(theirs).max() < 1e-4


def test_cli_both_ways_and_flow_or_lightningdit_export_the_transformer_only(tmp_path):
  model = _model(num_classes=10)
  params = _params(model)
  conv = str(tmp_path / "converted")
  name, kwargs = convert.named(model)
  convert.save_converted(conv, params, name, **kwargs)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  pipe, back = str(tmp_path / "pipe"), str(tmp_path / "back")
  run = lambda *a: subprocess.run([sys.executable, "-m", "dit_jax.convert", *a], cwd=ROOT,
                                  env=env, capture_output=True, text=True, timeout=300)
  r = run(f"--converted={conv}", f"--to_diffusers={pipe}", f"--vae={_vae_dir(str(tmp_path / 'v'))}")
  assert r.returncode == 0 and "DiTPipeline" in r.stdout, r.stderr[-2000:]
  assert json.load(open(os.path.join(pipe, "model_index.json")))["_class_name"] == "DiTPipeline"
  r = run(f"--from_diffusers={pipe}", f"--out={back}")
  assert r.returncode == 0, r.stderr[-2000:]
  back_model, back_params = convert.load_converted(back)
  assert models.architecture(back_model) == models.architecture(model)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back_params)):
    np.testing.assert_array_equal(a, np.asarray(b))
  assert convert.converted_objective(back)["name"] == "adm"
  # A flow checkpoint: the transformer, and a note that no pipeline was written.
  line = convert.to_diffusers(str(tmp_path / "flow"), params, model, {"name": "flow"},
                              str(tmp_path / "v"))
  assert "no pipeline" in line and not os.path.exists(str(tmp_path / "flow" / "model_index.json"))
  assert DiTTransformer2DModel.from_pretrained(str(tmp_path / "flow" / "transformer"))
  # LightningDiT's parts: its own layout.
  ldit = model.clone(norm="rmsnorm", mlp="swiglu", rope=True)
  lp = _params(ldit)
  line = convert.to_diffusers(str(tmp_path / "ldit"), lp, ldit, {"name": "flow"})
  assert "LightningDiT" in line
  from safetensors.numpy import load_file
  sd = load_file(str(tmp_path / "ldit" / "transformer" / "lightningdit.safetensors"))
  m2, p2 = convert.from_lightningdit(sd, 8, 10, rope=True, learn_sigma=True, num_heads=2)
  for a, b in zip(jax.tree.leaves(lp), jax.tree.leaves(p2)):
    np.testing.assert_array_equal(a, b)


def test_from_diffusers_errors_name_the_key(tmp_path):
  model = _model(num_classes=10)
  sd = diffusers_format.to_diffusers_state_dict(convert.to_official(_params(model), model),
                                                model)
  cfg = diffusers_format.transformer_config(model)
  sd["transformer_blocks.1.norm1.emb.class_embedder.embedding_table.weight"] = (
      sd["transformer_blocks.1.norm1.emb.class_embedder.embedding_table.weight"] + 1)
  with pytest.raises(ValueError, match="transformer_blocks.1.norm1.emb.class_embedder"):
    diffusers_format.from_diffusers_state_dict(sd, cfg)
  del sd["proj_out_2.bias"]
  with pytest.raises(ValueError, match="proj_out_2.bias"):
    diffusers_format.from_diffusers_state_dict(sd, cfg)
  with pytest.raises(FileNotFoundError, match="no config.json"):
    diffusers_format.read_transformer(str(tmp_path))
