"""Every experiment config loads, names a real model, and shards as declared (shapes only)."""

import functools
import glob
import importlib
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from dit_jax import data_info, models, sharding
from dit_jax import step as dit_step
from dit_jax.data_info import DataInfo

CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(
    os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "*.py"))
                 if not p.endswith(("__init__.py", "base.py")))


def latent_info(image_size, classes=1000):
  s = image_size // 8
  return DataInfo((s, s, 4), classes, 0.18215, 0, 0, (), {"dtype": "float16"})


@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads_with_a_valid_model(name):
  c = importlib.import_module(f"configs.{name}").get_config()
  assert c.model.name in models.DiT_models
  assert c.data.global_batch_size % 8 == 0
  if name.startswith("lightningdit"):  # LightningDiT's own recipe (its yaml)
    assert (c.optim.learning_rate, c.optim.b2, c.data.global_batch_size) == (2e-4, 0.95, 1024)
    assert c.objective.cosine_loss and c.objective.time_sampling == "logit_normal"
    assert not c.model.learn_sigma and c.sample.timestep_shift == 0.3
    info = data_info.synthetic_info(c)
    assert info.latent_shape == (16, 16, 32)
    m = dit_step.create_model(c, info)
    assert (m.patch_size, m.norm, m.mlp, m.rope, m.qk_norm) == (1, "rmsnorm", "swiglu", True, False)
  elif name == "repa_sit_xl2":  # REPA's recipe (its train.py defaults for SiT-XL/2)
    assert (c.optim.learning_rate, c.optim.grad_clip_norm, c.data.global_batch_size) == (
        1e-4, 1.0, 256)
    assert (c.repa.encoder, c.repa.depth, c.repa.coefficient, c.repa.projector_hidden) == (
        "dinov2_vitb14", 8, 0.5, 2048)
    assert c.objective.name == "flow" and not c.model.learn_sigma
    info = data_info.synthetic_info(c)
    assert info.manifest["extras"]["image"] == {"shape": [256, 256, 3], "dtype": "uint8",
                                                "flip": "width"}
  elif name not in ("demo", "mini", "demo_repa"):  # the CPU demo and mini-grid's own recipe
    # The release's recipe, untouched by the experiment files.
    assert (c.optim.learning_rate, c.optim.weight_decay, c.ema_decay) == (1e-4, 0.0, 0.9999)
    assert (c.data.global_batch_size, c.model.class_dropout_prob) == (256, 0.1)
    assert c.model.learn_sigma and c.data.random_flip
  # Optional fields stay overridable from the command line (no None-typed leaves).
  c.model.attention_impl = "cudnn"
  c.vae.scale_factor = 0.5


@pytest.mark.parametrize("name,image_size", [("xl2", 256), ("xl2_512", 512)])
def test_xl2_state_is_sharded_over_fsdp(name, image_size):
  c = importlib.import_module(f"configs.{name}").get_config()
  assert c.mesh.fsdp == 0  # auto: step.build picks the layout from memory
  mesh = sharding.create_mesh(c.mesh.data, 8)
  assert dict(mesh.shape) == {"slice": 1, "data": 1, "data_minor": 1, "fsdp": 8}
  model = dit_step.create_model(c, latent_info(image_size))
  tx, _ = dit_step.create_optimizer(c)
  boxed = jax.eval_shape(functools.partial(dit_step.init_state, model=model, tx=tx,
                                           local_shape=model_shape(model)), jax.random.PRNGKey(0))
  sh = sharding.state_shardings(boxed, mesh)
  shapes = nn.meta.unbox(boxed)
  total = sharded = 0
  for s, x in zip(jax.tree.leaves(sh), jax.tree.leaves(shapes)):
    n = int(np.prod(x.shape))
    total += n
    for dim, axis in zip(x.shape, s.spec):
      if axis is not None:
        assert dim % mesh.shape[axis] == 0
        sharded += n
  # Parameters, EMA and both Adam moments: everything but biases and norms is split 8 ways.
  assert sharded / total > 0.99
  # Trainable parameters: the paper's 675,129,632 less the frozen 256 x 1152 position table
  # (the same at 512 px: only the frozen table grows).
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes.params)) == (
      675_129_632 - 256 * 1152)


def model_shape(model):
  return (model.input_size, model.input_size, model.in_channels)


def test_model_options_are_checked_with_the_field_named():
  c = importlib.import_module("configs.s8").get_config()
  info = latent_info(256)
  assert dit_step.create_model(c, info).remat == "none"
  c.model.remat = "True"  # what --config.model.remat=True gives a string field
  assert dit_step.create_model(c, info).remat is True
  c.model.remat = "dots"
  with pytest.raises(ValueError, match=r"config.model.remat: remat='dots' is not a remat policy; "
                     r"choose one of: none, full, dots_saveable, dots_with_no_batch_dims_saveable"):
    dit_step.create_model(c, info)
  c.model.remat = "full"
  c.model.attention_impl = "flash"
  with pytest.raises(ValueError, match=r"config.model.attention_impl: .*'flash'.*auto, splash"):
    dit_step.create_model(c, info)
