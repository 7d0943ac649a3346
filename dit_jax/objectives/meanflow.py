"""MeanFlow (Geng et al. 2025): a DiT trained to predict the average velocity over [r, t], so
that one network evaluation generates an image.

Convention (the official code's): z_t = (1 - t) x + t e, t = 1 is noise, the velocity is
v = e - x, and the network u(z, t, h, y) with h = t - r predicts the average velocity
(z_t - z_r) / (t - r). Its training target comes from the MeanFlow identity
u = v - (t - r) du/dt, du/dt a Jacobian-vector product of the network along (v, 1, 0); the
guidance is trained in (v replaced by the guided velocity), so sampling needs no CFG pass.

`u_fn(z [B, H, W, C], t [B], h [B], y [B]) -> [B, H, W, C]` is the network. The objective
(config.objective.name = 'meanflow') trains a DiT with `h_embedder=True` as u.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dit_jax import guidance
from dit_jax.objectives import base

UFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]

# Numerics

P_MEAN, P_STD = -0.4, 1.0
DATA_PROPORTION = 0.75
OMEGA, KAPPA = 1.0, 0.5
NORM_P, NORM_EPS = 1.0, 0.01


def sample_tr(key: jax.Array, batch: int, p_mean: float = P_MEAN, p_std: float = P_STD,
              data_proportion: float = DATA_PROPORTION) -> tuple[jax.Array, jax.Array]:
  """(t, r) float32 [batch]: both logit-normal, ordered t >= r; the first
  int(batch * data_proportion) rows (by position, as the official code) have r = t."""
  k_t, k_r = jax.random.split(key)
  draw = lambda k: jax.nn.sigmoid(p_mean + p_std * jax.random.normal(k, (batch,), jnp.float32))
  a, b = draw(k_t), draw(k_r)
  t, r = jnp.maximum(a, b), jnp.minimum(a, b)
  return t, jnp.where(jnp.arange(batch) < int(batch * data_proportion), t, r)


def guided_velocity(u_fn: UFn, z: jax.Array, t: jax.Array, v: jax.Array, labels: jax.Array,
                    null_label: Any, omega: float = OMEGA, kappa: float = KAPPA,
                    t_start: float = 0.0, t_end: float = 1.0) -> jax.Array:
  """v_g = omega v + (1 - omega - kappa) v_uncond + kappa v_cond inside [t_start, t_end] (v
  elsewhere), v_uncond and v_cond the network's instantaneous velocities (h = 0) without
  gradient."""
  h0 = jnp.zeros_like(t)
  inside = (t >= t_start) & (t <= t_end)
  w = base.per_example(jnp.where(inside, omega, 1.0), z)
  k = base.per_example(jnp.where(inside, kappa, 0.0), z)
  v_uncond = jax.lax.stop_gradient(u_fn(z, t, h0, jnp.full_like(labels, null_label)))
  if kappa:
    v_cond = jax.lax.stop_gradient(u_fn(z, t, h0, labels))
    return w * v + (1 - w - k) * v_uncond + k * v_cond
  return v_uncond + w * (v - v_uncond)


def mean_velocity_target(u_fn: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
                         z: jax.Array, t: jax.Array, r: jax.Array,
                         v: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(u, target): u = u_fn(z, t, t - r) and the MeanFlow identity's target
  stop_gradient(v - clip(t - r, 0, 1) du/dt), du/dt = jax.jvp of u_fn along (v, 1, 0) in
  (z, t, r). For the true average velocity and v the marginal velocity field the target is u."""
  u, du_dt = jax.jvp(lambda z_, t_, r_: u_fn(z_, t_, t_ - r_), (z, t, r),
                     (v, jnp.ones_like(t), jnp.zeros_like(r)))
  gap = jnp.clip(base.per_example(t - r, z), 0.0, 1.0)
  return u, jax.lax.stop_gradient(v - gap * du_dt)


def loss(u_fn: UFn, x: jax.Array, t: jax.Array, r: jax.Array, noise: jax.Array,
         labels: jax.Array, drop: jax.Array, null_label: Any, omega: float = OMEGA,
         kappa: float = KAPPA, t_start: float = 0.0, t_end: float = 1.0,
         norm_p: float = NORM_P, norm_eps: float = NORM_EPS) -> tuple[jax.Array, dict]:
  """(loss [B], {"v_loss": [B]}): MeanFlow's adaptively weighted loss per example.

  x, noise [B, ...]; t, r [B] with t >= r; labels [B]; drop [B] bool: rows whose label is
  dropped to null_label, with the plain velocity as their target. The guided velocity v_g is
  trained in (omega, kappa inside [t_start, t_end]; omega = 1, kappa = 0 is none); (u, du/dt)
  come from jax.jvp of u_fn in (z_t, t, r) along (v_g, 1, 0) with h = t - r; the target
  v_g - clip(t - r, 0, 1) du/dt has no gradient. The loss is the squared error summed over
  each example's elements, divided by stop_gradient((that + norm_eps)^norm_p). v_loss (u
  against v, summed likewise) is for monitoring.
  """
  x = jnp.asarray(x, jnp.float32)
  te = base.per_example(t, x)
  z = (1 - te) * x + te * noise
  v = noise - x
  guided = omega != 1.0 or kappa != 0.0
  v_g = guided_velocity(u_fn, z, t, v, labels, null_label, omega, kappa, t_start,
                        t_end) if guided else v
  keep = base.per_example(drop, x)
  v_g = jnp.where(keep, v, v_g)
  y = jnp.where(drop, jnp.asarray(null_label, labels.dtype), labels)
  u, target = mean_velocity_target(lambda z_, t_, h_: u_fn(z_, t_, h_, y), z, t, r, v_g)
  axes = tuple(range(1, x.ndim))
  sq = jnp.sum(jnp.square(u - target), axis=axes)
  per_example = sq / jax.lax.stop_gradient((sq + norm_eps) ** norm_p)
  return per_example, {"v_loss": jnp.sum(jnp.square(u - v), axis=axes)}


def sample(u_fn: Callable[[jax.Array, jax.Array, jax.Array], jax.Array], noise: jax.Array,
           steps: int = 1) -> jax.Array:
  """x from noise z_1 [B, ...] in `steps` uniform steps t = 1 -> 0: z_r = z_t - (t - r)
  u(z_t, t, t - r); one step is x = z_1 - u(z_1, 1, 1). u_fn(z, t [B], h [B])."""
  grid = np.linspace(1.0, 0.0, int(steps) + 1).astype(np.float32)
  z = jnp.asarray(noise, jnp.float32)
  batch = z.shape[0]

  def step(z_, tr):
    t, r = tr
    tb, hb = jnp.full((batch,), t), jnp.full((batch,), t - r)
    return z_ - (t - r) * u_fn(z_, tb, hb).astype(jnp.float32), None
  z, _ = jax.lax.scan(step, z, (grid[:-1], grid[1:]))
  return z


# The objective

# The label that stands for "dropped" between `loss` and the step's model: the model applies
# its own null class (force_drop_ids) where it sees it.
_NULL = -1


@base.register
@dataclasses.dataclass(frozen=True)
class MeanFlow(base.ObjectiveBase):
  """MeanFlow's objective on a DiT with the second time input (`DiT.h_embedder`)."""
  p_mean: float = P_MEAN
  p_std: float = P_STD
  data_proportion: float = DATA_PROPORTION
  omega: float = OMEGA
  kappa: float = KAPPA
  t_start: float = 0.0
  t_end: float = 1.0
  norm_p: float = NORM_P
  norm_eps: float = NORM_EPS
  class_dropout_prob: float = 0.1
  learn_sigma: bool = False

  name = "meanflow"
  samplers = ("meanflow",)
  default_sampler = "meanflow"
  default_steps = {"meanflow": 1}
  sampler_options = {}
  time_dtype = jnp.float32
  # Guidance is trained in: sampling runs the conditional model alone.
  trained_guidance = True
  # The loss differentiates the network forward (jax.jvp): attention kernels without a JVP
  # rule (cuDNN, splash) cannot run it.
  needs_jvp = True
  # The model needs its second time input.
  model_fields = {"h_embedder": True}
  # Its loss drops labels to the model's null class (mf_class_dropout_prob).
  drops_labels = True

  @classmethod
  def config_fields(cls) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # MeanFlow only. (t, r) logit-normal: sigmoid(N(mf_p_mean, mf_p_std^2)) (official -0.4, 1).
    c.mf_p_mean = P_MEAN
    c.mf_p_std = P_STD
    # MeanFlow only. The share of each batch trained with r = t (plain flow matching): 0.75.
    c.mf_data_proportion = DATA_PROPORTION
    # MeanFlow only. The trained-in guidance: v_g = omega v + (1 - omega - kappa) v_uncond +
    # kappa v_cond for t in [t_start, t_end] (official 1.0, 0.5, [0, 1]); omega 1, kappa 0: none.
    c.mf_omega = OMEGA
    c.mf_kappa = KAPPA
    c.mf_t_start = 0.0
    c.mf_t_end = 1.0
    # MeanFlow only. Adaptive loss weight 1 / (loss + eps)^p (official p 1.0, eps 0.01).
    c.mf_norm_p = NORM_P
    c.mf_norm_eps = NORM_EPS
    # MeanFlow only. Label dropout: each row drops with this probability, and that many rows,
    # the first ones of the batch, train unconditionally (as the official code; the model's
    # class_dropout_prob must be > 0 for its null class).
    c.mf_class_dropout_prob = 0.1
    return c

  @classmethod
  def _build(cls, fields: Mapping[str, Any], learn_sigma: bool, where: str) -> "MeanFlow":
    if not float(fields["mf_p_std"]) > 0:
      raise ValueError(f"{where}.mf_p_std: expected > 0, got {fields['mf_p_std']!r}")
    if not 0 <= float(fields["mf_data_proportion"]) <= 1:
      raise ValueError(f"{where}.mf_data_proportion: expected in [0, 1], got "
                       f"{fields['mf_data_proportion']!r}")
    if not 0 <= float(fields["mf_t_start"]) <= float(fields["mf_t_end"]) <= 1:
      raise ValueError(f"{where}.mf_t_start/mf_t_end: expected 0 <= start <= end <= 1")
    return cls(*(float(fields["mf_" + f.name]) for f in dataclasses.fields(cls)
                 if f.name != "learn_sigma"), bool(learn_sigma))

  def draw(self, k_t: jax.Array, k_noise: jax.Array, x0: jax.Array) -> dict[str, jax.Array]:
    """t, r [B] (t the model's time input), noise like x0, and mf_drop [B]: the first rows,
    as many as a Bernoulli(class_dropout_prob) draw per row gives, drop their label. Drawn for
    the whole batch, so every device and microbatch sees the same rows dropped."""
    k_tr, k_drop = jax.random.split(k_t)
    n = x0.shape[0]
    t, r = sample_tr(k_tr, n, self.p_mean, self.p_std, self.data_proportion)
    count = jnp.sum(jax.random.uniform(k_drop, (n,)) < self.class_dropout_prob)
    return {"t": t, "r": r, "noise": base.draw_noise(k_noise, x0),
            "mf_drop": jnp.arange(n) < count}

  def training_losses(self, model_fn: guidance.ModelFn, x0: jax.Array,
                      inputs: Mapping[str, jax.Array]) -> tuple[jax.Array, dict]:
    """(loss [B], {"v_loss"}): `loss` with the rows `draw` dropped."""
    c = x0.shape[-1]

    def u_fn(z, t, h, y):
      dropped = y == _NULL
      out = model_fn(z, t, h=h, y=jnp.where(dropped, 0, y), force_drop_ids=dropped)
      return out[..., :c]
    per_example, logged = loss(u_fn, x0, inputs["t"], inputs["r"], inputs["noise"],
                               inputs["label"], inputs["mf_drop"], _NULL, self.omega, self.kappa,
                               self.t_start, self.t_end, self.norm_p, self.norm_eps)
    return per_example, {"v_loss": logged["v_loss"].mean()}

  def sampler(self, sampler: Optional[str] = None, steps: Optional[int] = None,
              **options: Any) -> base.Sampler:
    """`steps` uniform average-velocity steps from t = 1 (default 1: one network call)."""
    base.check_sampler(self, sampler)
    base.own_options(self, options)
    steps = int(steps or 1)

    def run(model_fn, noise, key):
      del key  # deterministic
      return sample(lambda z, t, h: model_fn(z, t, h=h)[..., :noise.shape[-1]], noise, steps)
    return run

  def guidance_predicate(self, interval: Optional[Sequence[float]]) -> Optional[
      guidance.Predicate]:
    """No sampling-time guidance: an interval is an error."""
    if guidance.check_interval(interval, "t", lambda lo, hi: lo == 0 and hi >= 1) is not None:
      raise ValueError("guidance_interval: MeanFlow trains its guidance in (config.objective."
                       "mf_t_start, mf_t_end); sampling takes no interval")
    return None

  def to_meta(self) -> dict:
    return {"name": "meanflow", **{"mf_" + f.name: getattr(self, f.name)
                                   for f in dataclasses.fields(self) if f.name != "learn_sigma"}}


# The official checkpoints (Gsunshine/meanflow, a flax.linen DiT under 'net': TorchLinear
# layers hold a Dense '_flax_linear', nn.Sequential children are 'layers_<index>').

# Heads of the official model sizes by width (its DiT_{S,B,M,L,XL}_{p} configs).
_HEADS = {384: 6, 768: 12, 1024: 16, 1152: 16}


def _release_names(depth: int) -> dict[tuple[str, ...], tuple[str, ...]]:
  """Our parameter path -> the official one (leaf names included)."""
  lin = lambda *p: {("kernel",): p + ("_flax_linear", "kernel"),
                    ("bias",): p + ("_flax_linear", "bias")}
  table = {("x_embedder", "proj", "kernel"): ("x_embedder", "proj", "kernel"),
           ("x_embedder", "proj", "bias"): ("x_embedder", "proj", "bias"),
           ("y_embedder", "embedding_table", "embedding"):
               ("y_embedder", "embedding_table", "_flax_embedding", "embedding")}
  groups = {}
  for emb in ("t_embedder", "h_embedder"):
    groups[(emb, "mlp_0")] = lin(emb, "mlp", "layers_0")
    groups[(emb, "mlp_2")] = lin(emb, "mlp", "layers_2")
  for i in range(depth):
    ours, theirs = f"blocks_{i}", ("blocks", f"layers_{i}")
    groups[(ours, "adaLN_modulation")] = lin(*theirs, "adaLN_modulation", "layers_1")
    for a, b in (("attn", "qkv"), ("attn", "proj"), ("mlp", "fc1"), ("mlp", "fc2")):
      groups[(ours, a, b)] = lin(*theirs, a, b)
  groups[("final_layer", "adaLN_modulation")] = lin("final_layer", "adaLN_modulation",
                                                    "layers_1")
  groups[("final_layer", "linear")] = lin("final_layer", "linear")
  for prefix, leaves in groups.items():
    for leaf, path in leaves.items():
      table[prefix + leaf] = path
  return table


def _get(tree: Mapping[str, Any], path: Sequence[str], where: str) -> Any:
  node = tree
  for key in path:
    if not isinstance(node, Mapping) or key not in node:
      raise ValueError(f"{where}: no {'/'.join(path)} in the official MeanFlow parameters")
    node = node[key]
  return node


def from_release(params_tree: Mapping[str, Any], input_size: int, num_classes: int,
                 num_heads: Optional[int] = None) -> tuple[Any, dict]:
  """(DiT with h_embedder, params) from an official MeanFlow parameter tree (its 'params',
  with or without the top-level 'net'). Width, depth, patch size, channels and learn_sigma come
  from the shapes; heads from the official sizes' table unless given."""
  from dit_jax import models  # pylint: disable=import-outside-toplevel
  tree = params_tree.get("net", params_tree)
  blocks = _get(tree, ("blocks",), "from_release")
  depth = len([k for k in blocks if k.startswith("layers_")])
  kernel = np.asarray(_get(tree, ("x_embedder", "proj", "kernel"), "from_release"))
  patch, _, channels, hidden = kernel.shape
  heads = num_heads or _HEADS.get(hidden)
  if heads is None:
    raise ValueError(f"from_release: width {hidden} is none of the official sizes "
                     f"{sorted(_HEADS)}: pass num_heads")
  out = np.asarray(_get(tree, ("final_layer", "linear", "_flax_linear", "kernel"),
                        "from_release")).shape[-1]
  model = models.DiT(input_size=input_size, patch_size=patch, in_channels=channels,
                     hidden_size=hidden, depth=depth, num_heads=heads, num_classes=num_classes,
                     learn_sigma=out == patch * patch * 2 * channels, h_embedder=True)
  params: dict = {}
  for ours, theirs in _release_names(depth).items():
    node = params
    for key in ours[:-1]:
      node = node.setdefault(key, {})
    node[ours[-1]] = jnp.asarray(_get(tree, theirs, "from_release"), jnp.float32)
  want = jax.tree.map(lambda s: s.shape, models.param_shapes(model))
  got = jax.tree.map(lambda a: a.shape, params)
  if want != got:
    raise ValueError(f"from_release: the parameters do not fit a DiT of width {hidden}, depth "
                     f"{depth}, patch {patch}, {num_classes} classes (input_size {input_size})")
  return model, params


def to_release(model: Any, params: Mapping[str, Any]) -> dict:
  """The official tree ({'net': ...}) of a DiT with h_embedder: from_release's inverse."""
  tree: dict = {}
  for ours, theirs in _release_names(model.depth).items():
    node = tree
    for key in theirs[:-1]:
      node = node.setdefault(key, {})
    node[theirs[-1]] = np.asarray(_get(params, ours, "to_release"))
  return {"net": tree}


def u_fn(model: Any, params: Mapping[str, Any]) -> UFn:
  """u(z [B, H, W, C] NHWC, t [B], h [B], y [B]) of a converted model, as the official
  net(z, t, h, y): the first C output channels."""
  def fn(z, t, h, y):
    out = model.apply({"params": params}, z, t, y, h=h)
    return out[..., :z.shape[-1]]
  return fn
