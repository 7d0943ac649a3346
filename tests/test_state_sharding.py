"""Weight-update sharding (config.sharding), exact low-precision gathers and gradient
accumulation (config.optim.microbatches): the sharded step equals the replicated one, the
microbatched step the whole batch, and checkpoints cross layouts."""

import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from dit_jax import aot, input_pipeline, models, sharding, step, train
from test_train import digits_dir, final_params, losses, tiny_config  # noqa: F401

REPLICATED = {"sharding.params": "compute", "sharding.opt_state": "compute",
              "sharding.ema": "compute"}
XLA = {"sharding.collectives": "xla"}


def _run_steps(config, info, n=3):
  """n train steps of `config` on fixed random batches: (TrainSetup, final state, losses)."""
  b = step.build(config, info)
  state = b.init(jax.random.PRNGKey(0))
  rng = np.random.RandomState(0)
  h, w, c = info.latent_shape
  gbs = config.data.global_batch_size
  out = []
  for _ in range(n):
    batch = {"label": rng.randint(0, 10, (gbs,)).astype(np.int32),
             "mean": rng.randn(gbs, 2, h, w, c).astype(np.float32),
             "std": 0.1 * np.abs(rng.randn(gbs, 2, h, w, c)).astype(np.float32)}
    state, metrics = b.compiled(state, jax.device_put(batch, b.batch_sh))
    out.append(float(metrics["loss"]))
  return b, state, out


def _max_rel_error(a, b):
  """Largest relative L2 error over the arrays of two trees."""
  errs = [float(np.linalg.norm(np.ravel(x) - np.ravel(y)) / max(np.linalg.norm(np.ravel(y)), 1e-30))
          for x, y in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b)))]
  return max(errs)


def _tree_rel_error(a, b):
  """Relative L2 error of a whole tree (all its arrays as one vector), in float64."""
  pairs = [(np.asarray(x, np.float64), np.asarray(y, np.float64))
           for x, y in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b)))]
  return float(np.sqrt(sum(np.sum((x - y)**2) for x, y in pairs) /
                       sum(np.sum(y**2) for _, y in pairs)))


def test_sharded_update_and_microbatches_equal_the_replicated_step(digits_dir,  # noqa: F811
                                                                  monkeypatch):
  # The reference: the release's layout (every part replicated), XLA's partitioner.
  info = input_pipeline.get_info(digits_dir)
  cfg = lambda **o: tiny_config(digits_dir, **{"model.dtype": "float32",
                                               "data.global_batch_size": 32, **o})
  ref_b, ref, ref_losses = _run_steps(cfg(**REPLICATED, **XLA), info)
  assert all(not any(s.spec) for s in jax.tree.leaves(ref_b.state_sh.params))
  assert not ref_b.explicit
  per_axis = {"per_axis": True}  # the explicit collectives one mesh axis at a time
  # The state split over 'data' only (4 of the 8 devices): each block is then summed over
  # 'data_minor' after its group, as over 'slice' on a multi-slice pod.
  data_only = {"data_only": True}
  for overrides in ({}, {"optim.microbatches": 2}, per_axis, data_only,
                    {"sharding.modulation": "gathered"}, XLA, {**XLA, "optim.microbatches": 4}):
    with monkeypatch.context() as m:
      m.setattr(sharding, "PER_AXIS_FROM", 2 if overrides is per_axis else 16)
      if overrides is data_only:
        m.setattr(sharding, "UPDATE_AXES", ("data",))
      b, got, got_losses = _run_steps(cfg(**{k: v for k, v in overrides.items()
                                              if k not in ("per_axis", "data_only")}), info)
    assert b.microbatches == overrides.get("optim.microbatches", 1)
    assert b.explicit == (overrides.get("sharding.collectives") != "xla")
    # Each device stores 1/8 of the state (everything but a few odd-sized vectors).
    per_device = sharding.device_bytes(b.state_sh, b.abstract)
    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(b.abstract))
    assert per_device < (0.3 if overrides is data_only else 0.15) * total, (per_device, total)
    np.testing.assert_allclose(got_losses, ref_losses, rtol=1e-6)
    for part in ("params", "ema_params", "opt_state"):
      # Parameters, EMA and Adam moments within 1e-6 (measured: ~1e-7 with microbatches or
      # the explicit collectives, whose sums run in another order). Array by array, Adam's
      # normalised update amplifies the gradient's float rounding where successive gradients
      # cancel: 1.2e-5 in the zero-initialised final layer's kernel.
      assert _tree_rel_error(getattr(got, part), getattr(ref, part)) < 1e-6, (overrides, part)
      assert _max_rel_error(getattr(got, part), getattr(ref, part)) < 1e-4, (overrides, part)
    if overrides == XLA:
      # The same program but for where XLA's partitioner puts the gradient sums: float32
      # rounding only (1.5e-9; bit-equal with attention_impl='xla_tokens':
      # python benchmarks/explicit_vs_replicated.py).
      assert _max_rel_error(got.params, ref.params) < 1e-8


def test_stationary_modulation_moves_no_adaln_kernel(digits_dir):  # noqa: F811
  # The explicit step's default: each device computes its columns of the adaLN modulations
  # for its group's images, so the adaLN kernels and biases are neither all-gathered nor
  # their gradients reduce-scattered; the conditioning rows and modulations move instead.
  info = input_pipeline.get_info(digits_dir)
  cfg = lambda **o: tiny_config(digits_dir, **{"model.dtype": "float32",
                                               "model.overrides.hidden_size": 64, **o})
  kinds = {}
  for mode in ("stationary", "gathered"):
    b = step.build(cfg(**{"sharding.modulation": mode}), info)
    assert b.explicit
    kinds[mode] = aot.collective_bytes(b.compiled.as_text())
  params = b.abstract.params
  adaln = sum(x.size * 4 for path, x in jax.tree_util.tree_flatten_with_path(params)[0]
              if "adaLN_modulation" in jax.tree_util.keystr(path))
  assert sharding.stationary_axes(params, jax.tree.map(lambda s: s.spec, b.state_sh.params)) \
      == ("data", "data_minor")
  s, g = kinds["stationary"], kinds["gathered"]
  # Gathered: every adaLN parameter arrives whole on each device (adaln bytes of results).
  # Stationary: only the 16 images' conditioning vectors, once per Linear (3 x 16 x 64 floats).
  assert g["all-gather"] - s["all-gather"] >= 0.9 * adaln, (s, g, adaln)
  assert s.get("all-to-all", 0) > 0 and "all-to-all" not in g, (s, g)
  assert s.get("all-to-all", 0) < 0.1 * adaln, (s, adaln)
  with pytest.raises(ValueError, match="config.sharding.modulation='nearby'"):
    step.build(cfg(**{"sharding.modulation": "nearby"}), info)


def test_stationary_axes_need_one_column_layout_for_every_modulation():
  z = np.zeros
  params = {"blocks_0": {"adaLN_modulation": {"kernel": z((4, 24)), "bias": z((24,))},
                         "attn": {"qkv": {"kernel": z((4, 12))}}},
            "final_layer": {"adaLN_modulation": {"kernel": z((4, 8)), "bias": z((8,))}}}
  X = ("data", "data_minor")

  def specs(final_kernel=P(None, X), final_bias=P(X)):
    return {"blocks_0": {"adaLN_modulation": {"kernel": P(None, X), "bias": P(X)},
                         "attn": {"qkv": {"kernel": P(X, None)}}},  # others: any layout
            "final_layer": {"adaLN_modulation": {"kernel": final_kernel, "bias": final_bias}}}
  assert sharding.stationary_axes(params, specs()) == X
  # One modulation split otherwise (other axes, its rows, not at all): every one is gathered.
  assert sharding.stationary_axes(params, specs(P(None, "data"), P("data"))) is None
  assert sharding.stationary_axes(params, specs(P(X, None), P(None))) is None
  assert sharding.stationary_axes(params, specs(P(), P())) is None


def test_bf16_gathers_are_exact(digits_dir):  # noqa: F811
  # bf16 token matmuls: the sharded step gathers bf16 kernels, the replicated one casts them
  # inside the layers; the numbers are the same.
  info = input_pipeline.get_info(digits_dir)
  cfg = lambda **o: tiny_config(digits_dir, **{"model.dtype": "bfloat16", **o})
  _, ref, ref_losses = _run_steps(cfg(**REPLICATED, **XLA), info, n=2)
  _, got, got_losses = _run_steps(cfg(**XLA), info, n=2)
  assert got_losses == ref_losses
  assert _max_rel_error(got.params, ref.params) == 0.0
  assert _max_rel_error(got.ema_params, ref.ema_params) == 0.0
  # The explicit collectives: the same forward (the losses), gradients summed in bf16 in
  # another order (measured: 3e-11 here, well within 1e-6).
  _, got, got_losses = _run_steps(cfg(), info, n=2)
  assert got_losses[0] == ref_losses[0]
  np.testing.assert_allclose(got_losses, ref_losses, rtol=1e-3)
  assert _tree_rel_error(got.params, ref.params) < 1e-6


def test_compute_dtypes_are_the_dtypes_the_model_uses():
  # Rounding one parameter to bf16 changes a bf16 model's output iff the model uses that
  # parameter in float32: so each leaf's declared compute dtype is checked against the model.
  model = models.DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2,
                     num_heads=2, num_classes=10, dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
  t, y = jnp.array([3, 700]), jnp.array([1, 10])
  params = nn.meta.unbox(model.init(jax.random.key(0), x, t, y)["params"])
  # Random values everywhere (the zero-initialised adaLN and final layers included).
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(2), p.shape),
                        params)
  dtypes = models.compute_dtypes(model, params)
  apply = jax.jit(lambda p: model.apply({"params": p}, x, t, y))
  ref = np.asarray(apply(params))
  leaves, treedef = jax.tree_util.tree_flatten(params)
  declared = jax.tree.leaves(dtypes)
  assert {str(d) for d in declared} == {"bfloat16", "float32"}
  for i, (leaf, dt) in enumerate(zip(leaves, declared)):
    rounded = list(leaves)
    rounded[i] = leaf.astype(jnp.bfloat16).astype(jnp.float32)
    same = np.array_equal(np.asarray(apply(jax.tree_util.tree_unflatten(treedef, rounded))), ref)
    assert same == (dt == jnp.bfloat16), (i, dt)
  # All at once: the pre-cast parameters give the same output, bit for bit.
  cast = jax.tree.map(lambda p, d: p.astype(d), params, dtypes)
  assert np.array_equal(np.asarray(apply(cast)), ref)


def _mesh(**sizes):
  return types.SimpleNamespace(shape={"slice": 1, "data": 1, "data_minor": 1, "fsdp": 1, **sizes})


def test_update_layout_splits_every_xl_kernel_over_256_chips():
  # v5e-256: 256 data-parallel chips in one slice, factored 16 x 16. XL's 1152 and 3456 wide
  # dimensions do not divide by 256; the two factors go to two dimensions.
  assert sharding.split_data(256) == (16, 16) and sharding.split_data(128) == (16, 8)
  mesh = _mesh(data=16, data_minor=16)
  model = models.get_model("DiT-XL/2")
  shapes = models.param_shapes(model)
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 4)),
                                            jnp.zeros((1,), jnp.int32),
                                            jnp.zeros((1,), jnp.int32)))["params"]
  logical = nn.get_partition_spec(boxed)
  whole = split = 0
  axes = lambda e: () if e is None else (e,) if isinstance(e, str) else e
  is_spec = lambda s: isinstance(s, jax.sharding.PartitionSpec)
  for spec, x in zip(jax.tree.leaves(logical, is_leaf=is_spec), jax.tree.leaves(shapes)):
    s = sharding.update_spec(sharding.compute_spec(spec, x.shape, mesh), spec, x.shape, mesh)
    ways = int(np.prod([mesh.shape[a] for e in s for a in axes(e)]))
    for dim, e in zip(x.shape, s):
      assert dim % np.prod([mesh.shape[a] for a in axes(e)]) == 0
    whole += x.size
    split += x.size / ways
    if x.ndim == 2 and x.size >= 1152 * 1152:
      assert ways == 256, (x.shape, s)
  # Per chip 1/248 of the parameters: only the label table (1001 rows), biases and the patch
  # kernel are split 16 ways.
  assert split / whole < 1.05 / 256


def test_state_layout_from_config_names_the_field(digits_dir):  # noqa: F811
  with pytest.raises(ValueError, match="config.sharding.ema='sharded'"):
    sharding.Layout.from_config(tiny_config(digits_dir, **{"sharding.ema": "sharded"}))
  with pytest.raises(ValueError, match="config.sharding.rules"):
    sharding.Layout.from_config(tiny_config(digits_dir, **{"sharding.rules": (("embed", "x"),)}))
  with pytest.raises(ValueError, match="config.optim.microbatches=3 must divide"):
    step.build(tiny_config(digits_dir, **{"optim.microbatches": 3}),
               input_pipeline.get_info(digits_dir))


def _tpu_collectives(config, info, devices):
  b = step.build(config, info, devices=devices)
  out = {}
  for kind, dtype, n in aot.collectives(b.compiled.as_text()):
    out[kind, dtype] = out.get((kind, dtype), 0) + n
  return b, out


def test_tpu_step_gathers_bf16_and_reduce_scatters(digits_dir):  # noqa: F811
  devices = aot.topology_devices("v5p:2x2x1")
  info = input_pipeline.get_info(digits_dir)
  cfg = lambda **o: tiny_config(digits_dir, **{"model.dtype": "bfloat16",
                                               "model.overrides.hidden_size": 64, **o})
  b, coll = _tpu_collectives(cfg(), info, devices)
  _, repl = _tpu_collectives(cfg(**REPLICATED), info, devices)
  params = b.abstract.params
  dtypes = jax.tree.leaves(models.compute_dtypes(b.model, params))
  low = sum(x.size for x, d in zip(jax.tree.leaves(params), dtypes) if d == jnp.bfloat16)
  high = sum(x.size for x, d in zip(jax.tree.leaves(params), dtypes) if d == jnp.float32)
  # Every token-matmul kernel is gathered whole, in bf16; only conditioning-path parameters
  # (float32 in the forward) are gathered in float32.
  assert coll.get(("all-gather", "bf16"), 0) >= 2 * low, coll
  assert coll.get(("all-gather", "f32"), 0) <= 4 * high, coll
  # Gradients: the replicated step all-reduces them all; the sharded one reduce-scatters.
  all_reduce = lambda c: sum(v for (k, _), v in c.items() if k == "all-reduce")
  assert not any(k == "all-gather" for k, _ in repl) and all_reduce(repl) >= 2 * low + 4 * high
  assert coll.get(("reduce-scatter", "bf16"), 0) + coll.get(("reduce-scatter", "f32"), 0) > 0
  assert all_reduce(coll) < all_reduce(repl), (coll, repl)


def test_explicit_collectives_reduce_scatter_on_a_32_chip_slice(digits_dir):  # noqa: F811
  # On a v5p-64 (32 chips over a 4x4x2 torus) XLA's partitioner reduces every gradient with
  # a whole all-reduce; the explicit step reduce-scatters them, axis by axis.
  devices = aot.topology_devices("v5p-64")
  info = input_pipeline.get_info(digits_dir)
  cfg = lambda **o: tiny_config(digits_dir, **{"model.dtype": "bfloat16",
                                               "model.overrides.hidden_size": 64,
                                               "data.global_batch_size": 64, **o})
  b, coll = _tpu_collectives(cfg(), info, devices)
  xb, xla = _tpu_collectives(cfg(**XLA), info, devices)
  assert b.explicit and not xb.explicit
  kind = lambda c, k: sum(v for (kk, _), v in c.items() if kk == k)
  grads = sum(x.size * 2 for x in jax.tree.leaves(b.abstract.params))  # >= bf16 gradient bytes
  assert kind(xla, "reduce-scatter") == 0 and kind(xla, "all-reduce") >= grads, xla
  # (a reduce-scatter's result is the block each chip keeps: 1/8, then 1/32 of the bytes;
  # the all-reduces left carry small arrays and the metrics)
  assert kind(coll, "reduce-scatter") >= grads / 8 and kind(coll, "all-reduce") < 0.5 * grads, \
      coll


def test_checkpoints_cross_layouts(digits_dir, tmp_path):  # noqa: F811
  full = train.train_and_evaluate(tiny_config(digits_dir), str(tmp_path / "full"))
  for first_layout, second_layout, name in ((REPLICATED, {}, "r2u"), ({}, REPLICATED, "u2r")):
    wd = str(tmp_path / name)
    first = train.train_and_evaluate(tiny_config(digits_dir, total_steps=3, **first_layout), wd)
    rest = train.train_and_evaluate(tiny_config(digits_dir, **second_layout), wd)
    assert sorted(rest) == [4, 5, 6]
    np.testing.assert_allclose(losses({**first, **rest}), losses(full), rtol=1e-5)
    _, pa, ea = final_params(str(tmp_path / "full"))
    _, pb, eb = final_params(wd)
    assert _max_rel_error(pb, pa) < 1e-5 and _max_rel_error(eb, ea) < 1e-5
