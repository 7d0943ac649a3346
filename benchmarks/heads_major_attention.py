"""A candidate for the XLA attention path, compiled by the planner beside the default: q, k and v
produced head-major ([N, heads, T, head_dim]) by one einsum on the fused qkv kernel, attention
computed in that layout, and the output projection contracting (heads, head_dim) directly.
The same parameters (the release's fused qkv and proj Linears, same names and shapes) and the
same math per element as `models.Attention` with `jax.nn.dot_product_attention`'s XLA path
(float32 logits and softmax, probabilities cast to the value dtype); only the layouts XLA is
given differ. By XLA's TPU cost model the default spends ~9% of XL/2's step on v5p-64 on the
qkv bias add, reshape and gradient sum around the [N, T, heads, head_dim] slices
(`python -m dit_jax.aot ... --breakdown=40`).

  python benchmarks/heads_major_attention.py --config=configs/xl2.py --topology=v5p-64

Prints, for the default model and the candidate: per-chip memory, collectives, roofline and
XLA's estimate of the train step (`dit_jax.aot.plan`, the same compile as the table's rows).
Also checks, on this CPU, that the candidate's output equals the default's (float32 and bf16).
Measured (2026-11-30, libtpu 0.0.42.1, XL/2, batch 256, bf16, v5p-64): XLA's estimate 35.5 ->
33.6 ms, roofline 25.0 -> 23.4 ms, memory 4.55 GiB both.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")

from typing import Any  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from dit_jax import aot, models  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config.", lock_config=False)
flags.DEFINE_string("topology", "v5p-64", "TPU slice to compile for.")
flags.mark_flags_as_required(["config"])


class _LinearParams(nn.Module):
  """nn.Dense's kernel [in, out] and bias [out] (same names, initialisers and logical axes),
  cast to the compute dtype, for a layer that contracts them in another shape."""
  in_features: int
  features: int
  in_name: str
  out_name: str
  dtype: Any

  @nn.compact
  def __call__(self):
    part = models._part  # pylint: disable=protected-access
    kernel = self.param("kernel", part(nn.initializers.xavier_uniform(),
                                       (self.in_name, self.out_name)),
                        (self.in_features, self.features), jnp.float32)
    bias = self.param("bias", part(nn.initializers.zeros_init(), (self.out_name,)),
                      (self.features,), jnp.float32)
    return kernel.astype(self.dtype), bias.astype(self.dtype)


class HeadsMajorAttention(models.Attention):
  """models.Attention's fields and parameters; only the layouts of the computation differ."""

  @nn.compact
  def __call__(self, x):
    _, _, d = x.shape
    nh, hd = self.num_heads, d // self.num_heads
    wqkv, bqkv = _LinearParams(d, 3 * d, "embed", "qkv", self.dtype, name="qkv")()
    wo, bo = _LinearParams(d, d, "heads", "embed", self.dtype, name="proj")()
    qkv = jnp.einsum("btd,dknh->bknth", x.astype(self.dtype), wqkv.reshape(d, 3, nh, hd))
    qkv = qkv + bqkv.reshape(1, 3, nh, 1, hd)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]  # [N, heads, T, head_dim]
    precision = jax.lax.DotAlgorithmPreset.BF16_BF16_F32 if q.dtype == jnp.bfloat16 else None
    logits = jnp.einsum("bnth,bnsh->bnts", q, k, precision=precision,
                        preferred_element_type=jnp.float32)
    logits = logits * jnp.float32(hd ** -0.5)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bnts,bnsh->bnth", probs, v)
    return jnp.einsum("bnth,nhd->btd", out, wo.reshape(nh, hd, d)) + bo


def _check_outputs() -> None:
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
  t, y = jnp.array([3, 700]), jnp.array([1, 10])
  for dtype in (jnp.float32, jnp.bfloat16):
    model = models.DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2,
                       num_heads=4, num_classes=10, dtype=dtype)
    params = nn.meta.unbox(model.init(jax.random.key(0), x, t, y)["params"])
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(2), p.shape),
                          params)
    ref = np.asarray(model.apply({"params": params}, x, t, y))
    default, models.Attention = models.Attention, HeadsMajorAttention
    try:
      got = np.asarray(model.apply({"params": params}, x, t, y))
    finally:
      models.Attention = default
    print(f"{jnp.dtype(dtype).name}: candidate vs default output, max abs difference "
          f"{np.abs(got - ref).max():.1e} (of max {np.abs(ref).max():.2f})")


def main(argv):
  del argv
  _check_outputs()
  devices = aot.topology_devices(FLAGS.topology)
  default = models.Attention
  for name, cls in (("default", default), ("heads-major", HeadsMajorAttention)):
    models.Attention = cls
    try:
      _, (report,) = aot.plan(FLAGS.config, devices, sampling_step=False)
    finally:
      models.Attention = default
    coll = sum(report.collectives.values()) / 2**30
    xla = f"{report.xla_seconds * 1e3:.2f} ms" if report.xla_seconds else "invalid"
    print(f"{name:12s} memory {report.memory['total']:.2f} GiB, collectives {coll:.2f} GiB, "
          f"roofline {report.roofline_seconds * 1e3:.2f} ms, XLA's estimate {xla}", flush=True)


if __name__ == "__main__":
  app.run(main)
