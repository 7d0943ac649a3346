"""LightningDiT's parts (RMSNorm, SwiGLU, 2-D RoPE, qk-norm, adaLN without shift) against their
formulas and closed forms, in every attention path."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit_jax import models

HD = 16  # head_dim of the tests' RoPE


def _angle(channel: int, row: int, col: int, head_dim: int = HD) -> float:
  """The closed form: channel j < head_dim/2 rotates with the row, the rest with the column;
  channels 2i, 2i+1 of a half share the frequency 10000^(-2i / (head_dim/2))."""
  half = head_dim // 2
  pos, j = (row, channel) if channel < half else (col, channel - half)
  return pos * 10000.0 ** (-2 * (j // 2) / half)


def test_rope_is_a_rotation_of_each_pair_by_the_positions_angle():
  grid = 5
  cos, sin = models.rope_tables(HD, grid)
  want = np.array([[_angle(j, t // grid, t % grid) for j in range(HD)]
                   for t in range(grid * grid)])
  np.testing.assert_allclose(cos, np.cos(want), atol=2e-6)
  np.testing.assert_allclose(sin, np.sin(want), atol=2e-6)
  # apply_rope multiplies each pair (x[2i], x[2i+1]) as a complex number by exp(i angle).
  x = np.random.default_rng(0).normal(size=(3, grid * grid, HD)).astype(np.float32)
  got = np.asarray(models.apply_rope(jnp.asarray(x), cos, sin))
  z = (x[..., 0::2] + 1j * x[..., 1::2]) * np.exp(1j * want[None, :, 0::2])
  np.testing.assert_allclose(got[..., 0::2], z.real, atol=1e-5)
  np.testing.assert_allclose(got[..., 1::2], z.imag, atol=1e-5)


def test_rope_attention_scores_depend_only_on_the_offset():
  grid = 6
  cos, sin = (jnp.asarray(a) for a in models.rope_tables(HD, grid))
  rng = np.random.default_rng(1)
  q, k = (jnp.asarray(rng.normal(size=(HD,)), jnp.float32) for _ in range(2))

  def score(pq, pk):  # q at token pq, k at token pk: (row, col) each
    tq, tk = pq[0] * grid + pq[1], pk[0] * grid + pk[1]
    return float(models.apply_rope(q, cos[tq], sin[tq]) @ models.apply_rope(k, cos[tk], sin[tk]))
  base = score((1, 0), (3, 2))
  for shift in ((1, 1), (2, 3), (0, 2)):
    moved = score((1 + shift[0], shift[1]), (3 + shift[0], 2 + shift[1]))
    assert abs(moved - base) < 1e-4 * (1 + abs(base)), (shift, moved, base)
  assert abs(score((1, 0), (3, 3)) - base) > 1e-3  # another offset, another score


def test_rmsnorm_and_swiglu_follow_their_formulas():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(2, 3, 12)) * 3, jnp.float32)
  norm = models.NORMS['rmsnorm']('n')
  w = jnp.asarray(rng.normal(size=(12,)), jnp.float32)
  got = norm.apply({'params': {'scale': w}}, x)
  want = x / np.sqrt(np.mean(np.square(x), -1, keepdims=True) + 1e-6) * w
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

  mlp = models.SwiGLU(12, 48)
  params = nn.meta.unbox(mlp.init(jax.random.PRNGKey(0), x))['params']
  h = int(2 / 3 * 48)
  assert params['w12']['kernel'].shape == (12, 2 * h) and params['w3']['kernel'].shape == (h, 12)
  x12 = x @ params['w12']['kernel'] + params['w12']['bias']
  x1, x2 = x12[..., :h], x12[..., h:]
  want = (x1 / (1 + np.exp(-x1)) * x2) @ params['w3']['kernel'] + params['w3']['bias']
  np.testing.assert_allclose(mlp.apply({'params': params}, x), want, rtol=1e-5, atol=1e-5)


def _lightning(**kw):
  base = dict(input_size=8, num_classes=5, learn_sigma=False, hidden_size=64, depth=2,
              num_heads=4, patch_size=2)
  return models.get_model('LightningDiT-B/2', **{**base, **kw})


def _inputs(model, n=3):
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(n, model.input_size, model.input_size, model.in_channels)),
                  jnp.float32)
  return x, jnp.asarray(rng.uniform(0, 1, n), jnp.float32), jnp.arange(n, dtype=jnp.int32) % 5


def _perturbed(model, seed=4):
  """Initialised parameters with the zero-initialised adaLN and final layer made random, so
  that every part of the block reaches the output."""
  x, t, y = _inputs(model)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), x, t, y))['params']
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  leaves = [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)]
  return jax.tree.unflatten(tree, leaves)


@pytest.mark.parametrize('parts', [
    dict(), dict(qk_norm=True), dict(qk_norm=True, norm='layernorm'),
    dict(adaln_shift=False), dict(rope=False, mlp='gelu')])
def test_every_attention_path_and_layout_gives_the_same_output(parts):
  model = _lightning(**parts)
  params = _perturbed(model)
  x, t, y = _inputs(model)
  ref = model.apply({'params': params}, x, t, y)
  assert ref.shape == x.shape and np.isfinite(np.asarray(ref)).all()
  tokens = model.clone(attention_impl='xla_tokens').apply({'params': params}, x, t, y)
  np.testing.assert_allclose(tokens, ref, rtol=1e-5, atol=1e-5)
  from dit_jax import convert  # pylint: disable=import-outside-toplevel
  scanned = model.clone(scan_layers=True).apply({'params': convert.stack_blocks(params)}, x, t, y)
  np.testing.assert_allclose(scanned, ref, rtol=1e-5, atol=1e-5)
  block = params['blocks_0']
  assert block['adaLN_modulation']['kernel'].shape[1] == (6 if model.adaln_shift else 4) * 64
  if model.qk_norm:
    assert set(block['attn']) == {'qkv', 'proj', 'q_norm', 'k_norm'}
    assert ('bias' in block['attn']['q_norm']) == (model.norm == 'layernorm')


def test_rope_and_qk_norm_change_the_output_and_the_defaults_are_lightningdits():
  model = _lightning()
  assert (model.norm, model.mlp, model.rope, model.qk_norm, model.adaln_shift) == (
      'rmsnorm', 'swiglu', True, False, True)
  params = _perturbed(model)
  x, t, y = _inputs(model)
  with_rope = model.apply({'params': params}, x, t, y)
  without = model.clone(rope=False).apply({'params': params}, x, t, y)
  assert float(jnp.abs(with_rope - without).max()) > 1e-3
  # The release's DiT is unchanged by the new fields' defaults.
  dit = models.get_model('DiT-S/2')
  assert (dit.norm, dit.mlp, dit.rope, dit.qk_norm, dit.adaln_shift) == (
      'layernorm', 'gelu', False, False, True)
  with pytest.raises(ValueError, match='head_dim=6 must be divisible by 4'):
    _lightning(hidden_size=24).validate()


# --- LightningDiT's checkpoints: a PyTorch forward written from its architecture ------------

D, HEADS, DEPTH, P, SIZE, C, CLASSES = 64, 4, 2, 2, 8, 4, 5


def _torch_rope(head_dim, grid):
  """VisionRotaryEmbeddingFast(dim=head_dim/2, pt_seq_len=grid)'s buffers, in torch."""
  import torch  # pylint: disable=import-outside-toplevel
  dim = head_dim // 2
  freqs = 1.0 / (10000 ** (torch.arange(0, dim, 2)[:dim // 2].float() / dim))
  t = torch.arange(grid) / grid * grid
  f = torch.einsum('i,f->if', t, freqs).repeat_interleave(2, dim=-1)  # [S, dim], pairs
  f = torch.cat([f[:, None, :].expand(grid, grid, dim), f[None, :, :].expand(grid, grid, dim)],
                dim=-1).reshape(-1, head_dim)
  return f.cos(), f.sin()


def _lightning_state_dict(seed, rms, swiglu, qk, shift, rope, learn_sigma):
  import torch  # pylint: disable=import-outside-toplevel
  g = torch.Generator().manual_seed(seed)
  sd = {}

  def linear(name, out, inp):
    sd[f'{name}.weight'] = torch.randn(out, inp, generator=g) * inp**-0.5
    sd[f'{name}.bias'] = torch.randn(out, generator=g) * 0.1
  sd['x_embedder.proj.weight'] = torch.randn(D, C, P, P, generator=g) * 0.3
  sd['x_embedder.proj.bias'] = torch.randn(D, generator=g) * 0.1
  grid = SIZE // P
  sd['pos_embed'] = torch.from_numpy(models.get_2d_sincos_pos_embed(D, grid)).float()[None]
  linear('t_embedder.mlp.0', D, 256)
  linear('t_embedder.mlp.2', D, D)
  sd['y_embedder.embedding_table.weight'] = torch.randn(CLASSES + 1, D, generator=g)
  hd, hidden = D // HEADS, int(2 / 3 * 4 * D)
  for i in range(DEPTH):
    b = f'blocks.{i}'
    if rms:
      sd[f'{b}.norm1.weight'] = 1 + 0.1 * torch.randn(D, generator=g)
      sd[f'{b}.norm2.weight'] = 1 + 0.1 * torch.randn(D, generator=g)
    linear(f'{b}.attn.qkv', 3 * D, D)
    if qk:
      for n in ('q_norm', 'k_norm'):
        sd[f'{b}.attn.{n}.weight'] = 1 + 0.1 * torch.randn(hd, generator=g)
        if not rms:
          sd[f'{b}.attn.{n}.bias'] = 0.1 * torch.randn(hd, generator=g)
    linear(f'{b}.attn.proj', D, D)
    if swiglu:
      linear(f'{b}.mlp.w12', 2 * hidden, D)
      linear(f'{b}.mlp.w3', D, hidden)
    else:
      linear(f'{b}.mlp.fc1', 4 * D, D)
      linear(f'{b}.mlp.fc2', D, 4 * D)
    linear(f'{b}.adaLN_modulation.1', (6 if shift else 4) * D, D)
  if rms:
    sd['final_layer.norm_final.weight'] = 1 + 0.1 * torch.randn(D, generator=g)
  linear('final_layer.linear', P * P * C * (2 if learn_sigma else 1), D)
  linear('final_layer.adaLN_modulation.1', 2 * D, D)
  if rope:
    sd['feat_rope.freqs_cos'], sd['feat_rope.freqs_sin'] = _torch_rope(hd, grid)
  return sd


def _torch_forward(sd, x, t, y, rms, swiglu, qk, shift, rope, learn_sigma):
  """LightningDiT.forward (NCHW) on state dict `sd`, in torch."""
  import torch  # pylint: disable=import-outside-toplevel
  import torch.nn.functional as F  # pylint: disable=import-outside-toplevel

  def lin(h, name):
    return F.linear(h, sd[f'{name}.weight'], sd[f'{name}.bias'])

  def norm(h, name):
    if rms:
      h32 = h.float()
      return h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + 1e-6) * sd[f'{name}.weight']
    return F.layer_norm(h, h.shape[-1:], eps=1e-6)

  def rotate_half(q):
    pairs = q.reshape(*q.shape[:-1], -1, 2)
    return torch.stack([-pairs[..., 1], pairs[..., 0]], -1).reshape(q.shape)

  n, hd = x.shape[0], D // HEADS
  h = F.conv2d(x, sd['x_embedder.proj.weight'], sd['x_embedder.proj.bias'], stride=P)
  h = h.flatten(2).transpose(1, 2) + sd['pos_embed']
  half = 128
  freqs = torch.exp(-np.log(10000) * torch.arange(half, dtype=torch.float32) / half)
  args = t[:, None].float() * freqs[None]
  temb = torch.cat([torch.cos(args), torch.sin(args)], -1)
  c = lin(F.silu(lin(temb, 't_embedder.mlp.0')), 't_embedder.mlp.2')
  c = c + sd['y_embedder.embedding_table.weight'][y]
  for i in range(DEPTH):
    b = f'blocks.{i}'
    mod = lin(F.silu(c), f'{b}.adaLN_modulation.1')
    if shift:
      sh1, sc1, g1, sh2, sc2, g2 = mod.chunk(6, dim=1)
    else:
      sc1, g1, sc2, g2 = mod.chunk(4, dim=1)
      sh1 = sh2 = torch.zeros_like(sc1)
    a = norm(h, f'{b}.norm1') * (1 + sc1[:, None]) + sh1[:, None]
    qkv = lin(a, f'{b}.attn.qkv').reshape(n, -1, 3, HEADS, hd).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    if qk:
      if rms:
        q, k = (z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + 1e-6) * sd[f'{b}.attn.{m}.weight']
                for z, m in ((q, 'q_norm'), (k, 'k_norm')))
      else:
        q, k = (F.layer_norm(z, (hd,), sd[f'{b}.attn.{m}.weight'], sd[f'{b}.attn.{m}.bias'])
                for z, m in ((q, 'q_norm'), (k, 'k_norm')))
    if rope:
      cos, sin = sd['feat_rope.freqs_cos'], sd['feat_rope.freqs_sin']
      q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, -1, D)
    h = h + g1[:, None] * lin(a, f'{b}.attn.proj')
    m = norm(h, f'{b}.norm2') * (1 + sc2[:, None]) + sh2[:, None]
    if swiglu:
      x1, x2 = lin(m, f'{b}.mlp.w12').chunk(2, dim=-1)
      m = lin(F.silu(x1) * x2, f'{b}.mlp.w3')
    else:
      m = lin(F.gelu(lin(m, f'{b}.mlp.fc1'), approximate='tanh'), f'{b}.mlp.fc2')
    h = h + g2[:, None] * m
  shift_f, scale_f = lin(F.silu(c), 'final_layer.adaLN_modulation.1').chunk(2, dim=1)
  h = norm(h, 'final_layer.norm_final') * (1 + scale_f[:, None]) + shift_f[:, None]
  h = lin(h, 'final_layer.linear')
  out_c, grid = C * (2 if learn_sigma else 1), SIZE // P
  h = h.reshape(n, grid, grid, P, P, out_c)
  h = torch.einsum('nhwpqc->nchpwq', h).reshape(n, out_c, SIZE, SIZE)
  return h[:, :C] if learn_sigma else h


@pytest.mark.parametrize('rms,swiglu,qk,shift,rope,learn_sigma', [
    (True, True, False, True, True, False),    # LightningDiT's defaults
    (True, True, True, False, True, False),    # qk-norm (RMSNorm), adaLN without shift
    (False, False, True, True, False, True),   # LayerNorm qk-norm, GELU, no RoPE, learn_sigma
])
def test_lightningdit_state_dicts_convert_exactly(rms, swiglu, qk, shift, rope, learn_sigma):
  import torch  # pylint: disable=import-outside-toplevel
  from dit_jax import convert  # pylint: disable=import-outside-toplevel
  parts = (rms, swiglu, qk, shift, rope, learn_sigma)
  sd = _lightning_state_dict(0, *parts)
  model, params = convert.from_lightningdit(sd, SIZE // 1, CLASSES, rope=rope,
                                            learn_sigma=learn_sigma, num_heads=HEADS)
  assert (model.norm, model.mlp, model.qk_norm, model.adaln_shift, model.rope) == (
      'rmsnorm' if rms else 'layernorm', 'swiglu' if swiglu else 'gelu', qk, shift, rope)
  rng = np.random.default_rng(5)
  x = rng.normal(size=(3, C, SIZE, SIZE)).astype(np.float32)
  t = np.array([0.1, 0.5, 0.9], np.float32)
  y = np.array([0, 3, CLASSES], np.int64)  # the null class too
  with torch.no_grad():
    ref = _torch_forward(sd, torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y),
                         *parts).numpy()
  got = np.asarray(model.apply({'params': params}, jnp.asarray(x.transpose(0, 2, 3, 1)),
                               jnp.asarray(t), jnp.asarray(y.astype(np.int32))))
  got = got[..., :C].transpose(0, 3, 1, 2)
  np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5)
  back = convert.to_lightningdit(params, model)  # weights bit-exact; the buffers recomputed
  assert set(back) == set(sd)
  for k, v in sd.items():
    if k.startswith('feat_rope.'):
      np.testing.assert_allclose(back[k], v.numpy(), atol=1e-6, err_msg=k)
    else:
      np.testing.assert_array_equal(back[k], v.numpy(), err_msg=k)


def test_lightningdit_converter_refuses_what_it_cannot_read():
  from dit_jax import convert  # pylint: disable=import-outside-toplevel
  sd = _lightning_state_dict(0, True, True, False, True, True, False)
  with pytest.raises(ValueError, match='feat_rope.* buffers: pass rope=True'):
    convert.from_lightningdit(sd, SIZE, CLASSES, rope=False, num_heads=HEADS)
  with pytest.raises(ValueError, match='pass learn_sigma=False'):
    convert.from_lightningdit(sd, SIZE, CLASSES, learn_sigma=True, num_heads=HEADS)
  with pytest.raises(ValueError, match='pass num_heads'):
    convert.from_lightningdit(sd, SIZE, CLASSES)
  sd['feat_rope.freqs_cos'] = sd['feat_rope.freqs_cos'] * 0
  with pytest.raises(ValueError, match='feat_rope.freqs_cos does not match'):
    convert.from_lightningdit(sd, SIZE, CLASSES, num_heads=HEADS)


def test_a_lightningdit_pt_converts_to_a_flow_checkpoint_that_samples(tmp_path):
  import torch  # pylint: disable=import-outside-toplevel
  from dit_jax import convert, guidance, objectives  # pylint: disable=import-outside-toplevel
  sd = _lightning_state_dict(1, True, True, False, True, True, False)
  path = str(tmp_path / 'lightningdit.pt')
  torch.save({'ema': sd, 'model': {k: v * 0 for k, v in sd.items()}}, path)  # EMA is read
  # LightningDiT's latents_stats.pt: mean and std [1, C, 1, 1].
  stats = str(tmp_path / 'latents_stats.pt')
  mean, std = torch.linspace(-1, 1, C).view(1, C, 1, 1), torch.linspace(0.5, 2, C).view(1, C, 1, 1)
  torch.save({'mean': mean, 'std': std}, stats)
  model, params = convert.convert_lightningdit(path, str(tmp_path / 'conv'), SIZE, CLASSES,
                                               num_heads=HEADS, latent_stats=stats)
  norm = convert.converted_latent_norm(str(tmp_path / 'conv'))
  np.testing.assert_allclose(norm.mean, mean.flatten().numpy(), rtol=1e-6)
  np.testing.assert_allclose(norm.std, std.flatten().numpy(), rtol=1e-6)
  assert norm.scale_factor == 1.0
  torch.save({'mean': mean[:, :2], 'std': std[:, :2]}, stats)
  with pytest.raises(ValueError, match=f"latents have {C} channels but the per-channel latent "
                                       "statistics have 2"):
    convert.convert_lightningdit(path, str(tmp_path / 'conv2'), SIZE, CLASSES, num_heads=HEADS,
                                 latent_stats=stats)
  loaded, loaded_params = convert.load_converted(str(tmp_path / 'conv'))
  assert loaded == model and (loaded.mlp, loaded.norm, loaded.rope) == ('swiglu', 'rmsnorm', True)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded_params)):
    np.testing.assert_array_equal(a, b)
  objective = objectives.from_meta({'objective': convert.converted_objective(
      str(tmp_path / 'conv'))})
  assert objective.name == 'flow'
  fn = guidance.make_sample_fn(objective, loaded, sampler='euler', steps=3, guided=True,
                               release_cfg=False)
  out = fn(loaded_params, jax.random.PRNGKey(0), jnp.arange(2, dtype=jnp.int32),
           jnp.float32(1.5))
  assert out.shape == (2, SIZE, SIZE, C) and np.isfinite(np.asarray(out)).all()


# --- LightningDiT's recipe: the direction loss, the timestep shift, CFG on every channel ----

def test_cosine_loss_adds_one_minus_the_cosine_over_channels():
  from dit_jax import flow  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(6)
  x1 = jnp.asarray(rng.normal(size=(4, 3, 3, 5)), jnp.float32)
  noise = jnp.asarray(rng.normal(size=(4, 3, 3, 5)), jnp.float32)
  t = jnp.asarray([0.1, 0.4, 0.6, 0.9], jnp.float32)
  ut = x1 - noise  # the Linear path's velocity (t = 0 noise, 1 data)
  plain = flow.create_transport("Linear", "velocity")
  cos = flow.create_transport("Linear", "velocity", cosine_loss=True)
  for scale, direction in ((2.0, 0.0), (-1.0, 2.0)):  # same direction: 0; opposite: 2
    fn = lambda x, tt, s=scale: s * ut  # pylint: disable=cell-var-from-loop
    mse = np.mean(np.square((scale - 1) * np.asarray(ut)), axis=(1, 2, 3))
    np.testing.assert_allclose(plain.training_losses(fn, x1, t, noise)["loss"], mse, rtol=1e-5)
    np.testing.assert_allclose(cos.training_losses(fn, x1, t, noise)["loss"], mse + direction,
                               rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="cosine_loss"):
    flow.create_transport("Linear", "noise", cosine_loss=True)


def test_timestep_shift_moves_the_grid_as_lightningdit():
  from dit_jax.flow import samplers  # pylint: disable=import-outside-toplevel
  plain = samplers.time_grid(0.0, 1.0, 11)
  shifted = samplers.time_grid(0.0, 1.0, 11, timestep_shift=0.3)
  np.testing.assert_allclose(shifted, 0.3 * plain / (1 - 0.7 * plain), rtol=1e-6)
  assert shifted[0] == 0 and shifted[-1] == 1 and np.all(shifted <= plain)  # more steps near noise
  np.testing.assert_array_equal(samplers.time_grid(0.0, 1.0, 11, timestep_shift=1.0), plain)
  # Through the objective: euler with the shift; dopri5 has no grid to shift.
  from dit_jax import objectives  # pylint: disable=import-outside-toplevel
  obj = objectives.from_meta({"objective": {"name": "flow"}})
  x = jnp.ones((2, 2, 2, 1))
  drift = lambda z, tt, **kw: jnp.ones_like(z) * 2.0  # noqa: E731  (dx/dt = 2: exact on any grid)
  out = obj.sample(drift, x, jax.random.PRNGKey(0), sampler="euler", steps=6, timestep_shift=0.3)
  np.testing.assert_allclose(out, 3.0, rtol=1e-6)
  with pytest.raises(ValueError, match="dopri5 has no grid"):
    obj.sample(drift, x, jax.random.PRNGKey(0), sampler="dopri5", timestep_shift=0.3)


def test_guidance_covers_every_channel_by_default_except_for_adm():
  from dit_jax import guidance, objectives  # pylint: disable=import-outside-toplevel
  model = _lightning(in_channels=8)
  params = _perturbed(model)
  labels = jnp.arange(2, dtype=jnp.int32)
  for name, release in (("flow", False), ("adm", True)):
    obj = objectives.from_meta({"objective": {"name": name}, "model_kwargs": {
        "learn_sigma": False}})
    kw = dict(sampler="euler", steps=3) if name == "flow" else dict(sampler="ddim", steps=3)
    run = lambda **k: guidance.make_sample_fn(obj, model, **kw, **k)(  # noqa: E731
        params, jax.random.PRNGKey(0), labels, jnp.float32(4.0))
    default, explicit, other = run(), run(release_cfg=release), run(release_cfg=not release)
    np.testing.assert_array_equal(default, explicit)
    assert float(jnp.abs(default - other).max()) > 1e-4, name
