r"""Guided DDPM sampling speed: one lax.scan loop vs a Python loop of jitted steps.

Measures images/s of classifier-free-guided ancestral sampling (the release's
CFG on the doubled batch, dit_jax.guidance, as the release samples for FID), the
compile time of the whole scanned loop, and the same loop driven step by step
from Python (one jitted step, a Python for loop). Weights are random (speed
does not depend on them). Both loops use the same keys and must agree.

  python benchmarks/sample_speed.py --model DiT-S/2 --image-size 256 --batch 4 --steps 250
  python benchmarks/sample_speed.py --model DiT-S/2 --steps 2 --skip-python-loop --scan-layers

With --steps below 250 the process is respaced to that many steps (each step
costs the same); images/s for the full 250 steps is extrapolated and printed.
"""
import argparse
import time

import jax
import jax.numpy as jnp

from dit_jax import guidance
from dit_jax.diffusion import create_diffusion
from dit_jax.diffusion import sample_with_cfg
from dit_jax.models import DiT_models

FULL_STEPS = 250


def _parse():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default="DiT-S/2", choices=sorted(DiT_models))
  p.add_argument("--image-size", type=int, default=256, help="pixels; latents are size/8")
  p.add_argument("--batch", type=int, default=4, help="images per loop (model sees 2x)")
  p.add_argument("--steps", type=int, default=FULL_STEPS, help="DDPM steps (respacing)")
  p.add_argument("--cfg-scale", type=float, default=1.5)
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--repeats", type=int, default=1, help="timed runs of each loop")
  p.add_argument("--skip-python-loop", action="store_true")
  p.add_argument("--scan-layers", action="store_true", help="nn.scan over the blocks")
  return p.parse_args()


def _timed(fn, *args):
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return out, time.perf_counter() - start


def main():
  args = _parse()
  latent = args.image_size // 8
  model = DiT_models[args.model](input_size=latent, num_classes=1000,
                                 dtype=jnp.dtype(args.dtype), scan_layers=args.scan_layers)
  diffusion = create_diffusion(str(args.steps))
  n = args.batch
  shape = (n, latent, latent, 4)
  key = jax.random.PRNGKey(0)
  params = model.init(key, jnp.zeros((2, latent, latent, 4)), jnp.zeros((2,), jnp.int32),
                      jnp.zeros((2,), jnp.int32))["params"]
  # Release init zeroes the output layers; perturb them so samples are not trivial.
  params = jax.tree_util.tree_map(
      lambda p: p + 0.02 * jax.random.normal(jax.random.PRNGKey(p.size), p.shape, p.dtype),
      params)
  labels = jnp.arange(n, dtype=jnp.int32) % 1000

  def guided(params, scale):
    return guidance.cfg_model_fn(lambda x, t, y: model.apply({"params": params}, x, t, y),
                                 labels, 1000, scale)

  @jax.jit
  def scan_loop(params, scale, key):
    return sample_with_cfg(diffusion, guided(params, scale), shape, key)

  @jax.jit
  def step(params, scale, x, i, key_steps):
    t = jnp.full((n,), i, jnp.int32)
    fn = guidance.kept_half(guided(params, scale))
    return diffusion.p_sample(fn, x, t, jax.random.fold_in(key_steps, i))["sample"]

  def python_loop(params, scale, key):
    key_init, key_steps = jax.random.split(key)
    x = jax.random.normal(key_init, shape, jnp.float32)
    for i in reversed(range(diffusion.num_timesteps)):
      x = step(params, scale, x, jnp.int32(i), key_steps)
    return x

  scale = jnp.float32(args.cfg_scale)
  print(f"{args.model} {args.image_size}px (latent {latent}x{latent}x4), batch {n} "
        f"(model batch {2 * n}), {diffusion.num_timesteps} DDPM steps, cfg {args.cfg_scale}, "
        f"{args.dtype}{', scanned blocks' if args.scan_layers else ''}, backend "
        f"{jax.default_backend()} x{jax.device_count()}")

  start = time.perf_counter()
  compiled = scan_loop.lower(params, scale, key).compile()
  compile_s = time.perf_counter() - start
  print(f"scan loop: compile {compile_s:.1f} s")
  times = []
  for r in range(args.repeats):
    scan_out, sec = _timed(compiled, params, scale, jax.random.fold_in(key, r))
    times.append(sec)
  sec = min(times)
  _report("scan loop", n, diffusion.num_timesteps, sec)

  if not args.skip_python_loop:
    start = time.perf_counter()
    step.lower(params, scale, jnp.zeros(shape), jnp.int32(0), key).compile()
    print(f"python loop: step compile {time.perf_counter() - start:.1f} s")
    jax.block_until_ready(step(params, scale, jnp.zeros(shape), jnp.int32(0), key))  # warm cache
    times = []
    for r in range(args.repeats):
      py_out, sec = _timed(python_loop, params, scale, jax.random.fold_in(key, r))
      times.append(sec)
    _report("python loop", n, diffusion.num_timesteps, min(times))
    diff = float(jnp.max(jnp.abs(py_out - scan_out)))
    print(f"max |scan - python| = {diff:.2e} (same keys, so they must agree)")


def _report(name, n, steps, sec):
  per_step = sec / steps
  line = (f"{name}: {sec:.2f} s for {n} images x {steps} steps = {per_step * 1e3:.1f} ms/step, "
          f"{n / sec:.4f} images/s")
  if steps != FULL_STEPS:
    line += f"; at {FULL_STEPS} steps: {n / (per_step * FULL_STEPS):.4f} images/s (extrapolated)"
  print(line, flush=True)


if __name__ == "__main__":
  main()
