"""The XLA attention path in its two layouts, compiled by the planner side by side: head-major
(`model.attention_impl='xla'`, what 'auto' runs at 256 px on TPUs) against token-major
(`--config.model.attention_impl=xla_tokens`).

`models.Attention` on the XLA path produces q, k and v head-major ([N, heads, T, head_dim]) by
one einsum on the fused qkv kernel, attends in that layout, and its output projection contracts
(heads, head_dim) directly. The token-major path ('xla_tokens', the layout the splash and cuDNN
kernels take) applies the qkv Linear, reshapes to [N, T, heads, head_dim] and calls
jax.nn.dot_product_attention. Same parameters, same math per element; by XLA's TPU cost model
the token-major path spends ~9% of XL/2's step on v5p-64 on the qkv bias add, reshape and
gradient sum around its [N, T, heads, head_dim] slices
(`python -m dit_jax.aot ... --breakdown=40`).

  python benchmarks/heads_major_attention.py --config=configs/xl2.py --topology=v5p-64

Prints, for both: per-chip memory, collectives, roofline and XLA's estimate of the train step
(`dit_jax.aot.plan`, the same compile as the table's rows). Also checks, on this CPU, that the
two give the same outputs (float32 and bf16).
Measured (2026-11-30, libtpu 0.0.42.1, XL/2, batch 256, bf16, v5p-64): XLA's estimate 35.5
(token-major) -> 33.6 ms (head-major), roofline 25.0 -> 23.4 ms, memory 4.55 GiB both.
"""

import copy
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")

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


def _check_outputs() -> None:
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
  t, y = jnp.array([3, 700]), jnp.array([1, 10])
  for dtype in (jnp.float32, jnp.bfloat16):
    model = models.DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2,
                       num_heads=4, num_classes=10, dtype=dtype, attention_impl="xla")
    params = nn.meta.unbox(model.init(jax.random.key(0), x, t, y)["params"])
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(2), p.shape),
                          params)
    heads = np.asarray(model.apply({"params": params}, x, t, y))
    tokens = np.asarray(model.clone(attention_impl="xla_tokens").apply({"params": params}, x, t, y))
    print(f"{jnp.dtype(dtype).name}: token-major vs head-major output, max abs difference "
          f"{np.abs(tokens - heads).max():.1e} (of max {np.abs(heads).max():.2f})")


def main(argv):
  del argv
  _check_outputs()
  devices = aot.topology_devices(FLAGS.topology)
  for name, impl in (("token-major", "xla_tokens"), ("head-major", "xla")):
    config = copy.deepcopy(FLAGS.config)
    config.model.attention_impl = impl
    _, (report,) = aot.plan(config, devices, sampling_step=False)
    coll = sum(report.collectives.values()) / 2**30
    xla = f"{report.xla_seconds * 1e3:.2f} ms" if report.xla_seconds else "invalid"
    print(f"{name:12s} memory {report.memory['total']:.2f} GiB, collectives {coll:.2f} GiB, "
          f"roofline {report.roofline_seconds * 1e3:.2f} ms, XLA's estimate {xla}", flush=True)


if __name__ == "__main__":
  app.run(main)
