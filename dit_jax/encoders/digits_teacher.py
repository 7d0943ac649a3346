"""A teacher for REPA on the digits: a small ViT trained self-supervised, in this repo, here.

No DINOv2 can be downloaded for the demo, so this stands in for it: the DINOv2 architecture
(`encoders.dinov2.DinoV2`) at width 64, depth 4, patch 2 on the 8x8 digits (16 patch tokens, the
grid of the demo's DiT-S/2), trained with SimMIM's masked image modelling (Xie et al. 2022):
half the patch tokens are replaced by the mask token, and a linear head on the final-normed
tokens regresses the masked patches' pixels (L1). No labels are used: like DINOv2's, its
features come from the images alone (its iBOT loss is masked modelling too, of features rather
than pixels).

  python -m dit_jax.encoders.digits_teacher --out=/tmp/digits_teacher [--steps=2000]

writes OUT/params.msgpack and OUT/teacher.json (architecture, steps, final loss, sha256);
config.repa.encoder='digits_teacher' with config.repa.encoder_path=OUT uses it. Weights stay
in the directory given, never in git.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from dit_jax import demo_data
from dit_jax.encoders import dinov2

MODEL = dinov2.DinoV2(embed_dim=64, depth=4, num_heads=4, patch_size=2, in_channels=1,
                      pos_grid=4, interpolate_offset=0.0)
MEAN, STD = (0.5,), (0.5,)
MASK_RATIO = 0.5


def preprocess(images: jax.Array) -> jax.Array:
  """uint8 [B, 8, 8, 1] -> [-1, 1] float32 (x / 255, mean 0.5, std 0.5)."""
  return (images.astype(jnp.float32) / 255.0 - MEAN[0]) / STD[0]


class _SimMIM(nn.Module):
  @nn.compact
  def __call__(self, x, masks):
    tokens = MODEL.clone(parent=self, name="encoder")(x, masks=masks)
    p = MODEL.patch_size
    return nn.Dense(p * p * MODEL.in_channels, name="head")(tokens)


def _patches(x: jax.Array) -> jax.Array:
  b, h, w, c = x.shape
  p = MODEL.patch_size
  x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def train(out: str, steps: int = 2000, batch_size: int = 128, seed: int = 0,
          learning_rate: float = 1e-3, log_every: int = 500) -> dict:
  """Trains the teacher on all 1,797 digits and writes OUT/params.msgpack, OUT/teacher.json;
  returns the json's dict."""
  images, _ = demo_data.digit_images()
  x_all = np.asarray(preprocess(images))
  tokens = (x_all.shape[1] // MODEL.patch_size) ** 2
  net = _SimMIM()
  key = jax.random.PRNGKey(seed)
  params = nn.meta.unbox(net.init(key, x_all[:1], jnp.zeros((1, tokens), bool)))["params"]
  warmup = min(100, steps // 10)
  tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup, steps), b2=0.95,
                   weight_decay=0.05)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, i):
    k_idx, k_mask = jax.random.split(jax.random.fold_in(key, i))
    x = jnp.asarray(x_all)[jax.random.randint(k_idx, (batch_size,), 0, len(x_all))]
    masks = jax.random.uniform(k_mask, (batch_size, tokens)) < MASK_RATIO

    def loss_fn(p):
      pred = net.apply({"params": p}, x, masks)
      err = jnp.abs(pred - _patches(x)).mean(-1)
      return jnp.sum(err * masks) / jnp.maximum(masks.sum(), 1)
    loss, g = jax.value_and_grad(loss_fn)(params)
    updates, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, updates), opt, loss

  t0, losses = time.time(), []
  for i in range(steps):
    params, opt, loss = step(params, opt, i + 1)
    if (i + 1) % log_every == 0 or i + 1 == steps:
      losses.append(float(loss))
      print(f"digits teacher: step {i + 1}/{steps}, masked-patch L1 {losses[-1]:.4f}",
            flush=True)
  os.makedirs(out, exist_ok=True)
  blob = serialization.to_bytes(jax.device_get(params["encoder"]))
  tmp = os.path.join(out, "params.msgpack.tmp")
  with open(tmp, "wb") as f:
    f.write(blob)
  os.replace(tmp, os.path.join(out, "params.msgpack"))
  info = {"model": "DinoV2", "embed_dim": MODEL.embed_dim, "depth": MODEL.depth,
          "num_heads": MODEL.num_heads, "patch_size": MODEL.patch_size, "image_size": 8,
          "objective": "SimMIM masked-patch L1, mask ratio 0.5", "steps": steps,
          "batch_size": batch_size, "seed": seed, "final_loss": losses[-1],
          "seconds": round(time.time() - t0, 1),
          "sha256": hashlib.sha256(blob).hexdigest()}
  with open(os.path.join(out, "teacher.json"), "w") as f:
    json.dump(info, f, indent=1)
  return info


def load(path: str) -> tuple[dinov2.DinoV2, dict]:
  """(MODEL, params) from a directory `train` wrote (errors name the file)."""
  file = os.path.join(path, "params.msgpack") if os.path.isdir(path) else path
  if not os.path.exists(file):
    raise FileNotFoundError(f"{file}: no digits teacher here (python -m "
                            "dit_jax.encoders.digits_teacher --out=DIR writes one)")
  template = nn.meta.unbox(MODEL.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1))))["params"]
  with open(file, "rb") as f:
    try:
      params = serialization.from_bytes(template, f.read())
    except Exception as e:  # msgpack / structure errors
      raise ValueError(f"{file}: not the digits teacher's weights ({e})") from None
  return MODEL, jax.tree.map(np.asarray, params)


def main() -> None:
  import argparse  # pylint: disable=import-outside-toplevel
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", required=True, help="directory for params.msgpack and teacher.json")
  ap.add_argument("--steps", type=int, default=2000)
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args()
  info = train(args.out, args.steps, seed=args.seed)
  print(json.dumps(info))


if __name__ == "__main__":
  main()
