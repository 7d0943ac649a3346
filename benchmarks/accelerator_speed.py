"""Train-step and sampling-step speed of DiT on the attached accelerator (one GPU or TPU host).

  python benchmarks/accelerator_speed.py                       # XL/2, S/2, B/2 (the issue-10 set)
  python benchmarks/accelerator_speed.py --cases=xl2:256 --steps=20
  python benchmarks/accelerator_speed.py --cases=xl2:max --budget_s=420 --json=out.json

Each case is CONFIG:BATCH[:key=value,...] with CONFIG a file in configs/ and BATCH a global
batch or 'max': the largest multiple of 32 whose compiled train step fits in 90% of a device's
memory (from XLA's memory analysis of a first compile at 256, then checked by compiling it).
Options after the batch are config overrides, e.g. xl2:256:model.attention_impl=xla.

Every case runs the main job's own step (`dit_jax.step.build`, synthetic latents, bf16 as the
config says, attention 'auto' = cuDNN on GPUs) and prints compile time, memory per device,
steps/s, images/s and MFU = analytic model FLOPs (3 x the forward's matmul FLOPs, from
dit_jax.model_table) / time / the device's peak (dit_jax/hardware.py: 989 TFLOP/s dense bf16
for an H100/H200). With remat the recomputed forward is not counted (HFU would count it).
Cases named 'sample' time one classifier-free-guided model call on 2B latents, the step a
250-step sampler repeats. Only JAX, Flax, Optax and ml_collections are needed (no TensorFlow).
A case that would start after --budget_s is skipped and said so, so the run ends in time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dit_jax import data_info, guidance, hardware, step  # noqa: E402
from dit_jax.grid import presets  # noqa: E402

# In order of importance: a run cut short by --budget_s loses the last ones.
DEFAULT_CASES = ("xl2:256", "s2:256", "b2:256", "sample:xl2:256",
                 "xl2:256:model.attention_impl=xla", "xl2:256:model.scan_layers=True", "xl2:max")


def _value(text: str):
  """A --config-style override's value: bool, int, float or string."""
  if text in ("True", "False"):
    return text == "True"
  for kind in (int, float):
    try:
      return kind(text)
    except ValueError:
      pass
  return text


def load_config(name: str, batch: int, overrides: list[str]):
  """configs/NAME.py at global batch `batch`, with 'dotted.field=value' overrides."""
  changes = {"data.global_batch_size": batch}
  changes.update((k, _value(v)) for k, v in (o.split("=", 1) for o in overrides))
  return presets.apply_overrides(presets.load_config(f"configs/{name}.py"), changes)


def synthetic_batch(setup: step.TrainSetup, info: data_info.DataInfo, gbs: int) -> dict:
  rng = np.random.default_rng(0)
  dtype = np.dtype(info.manifest["dtype"])
  host = {"label": rng.integers(0, info.num_classes, gbs).astype(np.int32),
          "mean": rng.normal(size=(gbs, 2, *info.latent_shape)).astype(dtype),
          "std": np.full((gbs, 2, *info.latent_shape), 0.1, dtype)}
  return {k: jax.device_put(v, setup.batch_sh) for k, v in host.items()}


def timed(fn, min_steps: int, min_seconds: float) -> tuple[int, float]:
  """Runs fn() (which returns arrays to wait on) at least min_steps times and min_seconds."""
  n, t0 = 0, time.perf_counter()
  out = None
  while n < min_steps or time.perf_counter() - t0 < min_seconds:
    out = fn()
    n += 1
    if n % 5 == 0:
      jax.block_until_ready(out)
  jax.block_until_ready(out)
  return n, time.perf_counter() - t0


def time_train_step(setup: step.TrainSetup, info: data_info.DataInfo, batch: int, min_steps: int,
                    min_seconds: float) -> tuple[float, float, int]:
  """(steps/s, last loss, timed steps) of setup's compiled step on a synthetic batch, after 2
  warm-up steps."""
  state = setup.init(jax.random.PRNGKey(0))
  data = synthetic_batch(setup, info, batch)
  for _ in range(2):
    state, m = setup.compiled(state, data)
  jax.block_until_ready(m)
  holder = {"state": state}

  def one():
    holder["state"], metrics = setup.compiled(holder["state"], data)
    return metrics["loss"]
  n, dt = timed(one, min_steps, min_seconds)
  return n / dt, float(jax.device_get(one())), n


def train_case(name: str, batch: int, overrides: list[str], args) -> dict:
  config = load_config(name, batch, overrides)
  info = data_info.synthetic_info(config)
  setup = step.build(config, info)
  sps, loss, n = time_train_step(setup, info, batch, args.steps, args.min_seconds)
  dev = jax.devices()[0]
  peak = hardware.peak_flops(dev)
  ndev = setup.mesh.size
  return {"case": f"{name}:{batch}" + "".join(f":{o}" for o in overrides),
          "model": config.model.name, "batch": batch, "dtype": config.model.dtype,
          "remat": str(setup.model.remat), "attention": str(setup.model.attention_impl),
          "scan_layers": bool(setup.model.scan_layers), "devices": ndev,
          "compile_s": setup.compile_seconds, "memory_gib": setup.memory_gib, "steps_per_s": sps,
          "images_per_s": sps * batch, "mfu": setup.model_flops * sps / peak if peak else None,
          "loss": loss,
          "finite": bool(np.isfinite(loss)), "timed_steps": n}


def max_batch(name: str, overrides: list[str], limit: float) -> int:
  """The largest multiple of 32 whose train step XLA says fits in step.MEMORY_HEADROOM x `limit`
  bytes."""
  config = load_config(name, 256, overrides)
  setup = step.build(config, data_info.synthetic_info(config))
  state_gib = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(setup.abstract)) / 2**30
  per_image = (setup.memory_gib - 2 * state_gib) / 256  # arguments + outputs hold the state twice
  usable = step.MEMORY_HEADROOM * limit / 2**30
  batch = max(32, int((usable - 2 * state_gib) / per_image) // 32 * 32)
  print(f"  {name}: {setup.memory_gib:.1f} GiB at batch 256 ({per_image * 1024:.0f} MiB per image "
        f"beyond the state): predicting batch {batch}", flush=True)
  while batch >= 32:
    if batch != 256:
      config = load_config(name, batch, overrides)
      setup = step.build(config, data_info.synthetic_info(config))
    if setup.memory_gib * 2**30 <= step.MEMORY_HEADROOM * limit:
      return batch
    print(f"  batch {batch} needs {setup.memory_gib:.1f} GiB: trying {batch - 32}", flush=True)
    batch -= 32
  raise RuntimeError(f"{name}: not even batch 32 fits in {limit / 2**30:.1f} GiB")


def sample_case(name: str, batch: int, overrides: list[str], args) -> dict:
  """One guided model call on [2B] latents (parameters replicated), as dit_jax.sample runs it."""
  config = load_config(name, batch, overrides)
  info = data_info.synthetic_info(config)
  model = step.create_model(config, info)
  params = jax.jit(lambda k: model.init(k, jnp.zeros((1, *info.latent_shape)),
                                        jnp.zeros((1,), jnp.int32),
                                        jnp.zeros((1,), jnp.int32))["params"])(
                                            jax.random.PRNGKey(0))
  params = nn.meta.unbox(params)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2 * batch, *info.latent_shape)), jnp.float32)
  t = jnp.full((2 * batch,), 500, jnp.int32)
  y = jnp.concatenate([jnp.asarray(rng.integers(0, 1000, batch), jnp.int32),
                       jnp.full((batch,), 1000, jnp.int32)])
  out = {}
  for precision in ("highest", "default"):
    fn = jax.jit(lambda p, x, t, y: guidance.cfg_model_fn(
        lambda xx, tt, yy: model.apply({"params": p}, xx, tt, yy), y[:batch], 1000, 1.5)(x, t))
    t0 = time.perf_counter()
    with jax.default_matmul_precision(precision):
      compiled = fn.lower(params, x, t, y).compile()
    compile_s = time.perf_counter() - t0
    n, dt = timed(lambda: compiled(params, x, t, y), args.steps, args.min_seconds)
    out[precision] = {"compile_s": compile_s, "call_s": dt / n,
                      "images_per_s_250_steps": batch / (250 * dt / n)}
  peak = hardware.peak_flops(jax.devices()[0])
  flops = step.forward_flops(model) * 2 * batch  # the cond and uncond halves
  return {"case": f"sample:{name}:{batch}", "model": config.model.name, "batch": batch,
          "dtype": config.model.dtype, "attention": str(model.attention_impl),
          **{f"{p}_{k}": v for p, d in out.items() for k, v in d.items()},
          **({f"{p}_mfu": flops / d["call_s"] / peak for p, d in out.items()} if peak else {})}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--cases", default=",".join(DEFAULT_CASES))
  ap.add_argument("--steps", type=int, default=10, help="timed steps per case, at least")
  ap.add_argument("--min_seconds", type=float, default=3.0, help="timed seconds per case, at least")
  ap.add_argument("--budget_s", type=float, default=0, help="skip cases starting after this")
  ap.add_argument("--json", default="", help="also write the results here")
  args = ap.parse_args()
  start = time.time()
  dev = jax.devices()[0]
  import flax, optax  # pylint: disable=import-outside-toplevel,multiple-imports
  print(f"jax {jax.__version__} flax {flax.__version__} optax {optax.__version__}; "
        f"{jax.device_count()} x {dev.device_kind} ({dev.platform}); "
        f"memory {(hardware.memory_bytes(dev) or 0) / 2**30:.1f} GiB; "
        f"peak {(hardware.peak_flops(dev) or 0) / 1e12:.0f} TFLOP/s", flush=True)
  results = []
  for case in args.cases.split(","):
    if args.budget_s and time.time() - start > args.budget_s:
      print(f"{case}: skipped (past --budget_s={args.budget_s:.0f})", flush=True)
      continue
    parts = case.split(":")
    t0 = time.time()
    try:
      if parts[0] == "sample":
        r = sample_case(parts[1], int(parts[2]), parts[3:], args)
      else:
        name, batch, overrides = parts[0], parts[1], parts[2:]
        if batch == "max":
          batch = max_batch(name, overrides, hardware.memory_bytes(dev) or 0)
          print(f"  {name}: batch {batch} is the largest that fits", flush=True)
        done = [x for x in results if x.get("case") == ":".join([name, str(batch), *overrides])]
        r = dict(done[0]) if done else train_case(name, int(batch), overrides, args)
    except Exception as e:  # pylint: disable=broad-except  (report and go on to the next case)
      r = {"case": case, "error": f"{type(e).__name__}: {str(e)[:500]}"}
    r["wall_s"] = time.time() - t0
    results.append(r)
    print(json.dumps(r), flush=True)
    if args.json:
      with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
  print("\ncase | images/s | steps/s | MFU | memory GiB | compile s")
  for r in results:
    if "images_per_s" in r:
      mfu = f"{r['mfu']:.1%}" if r.get("mfu") else "n/a"
      print(f"{r['case']} | {r['images_per_s']:.1f} | {r['steps_per_s']:.3f} | {mfu} | "
            f"{r['memory_gib']:.1f} | {r['compile_s']:.1f}")
    elif "default_call_s" in r:
      print(f"{r['case']} (guided call, 2x{r['batch']}) | "
            f"{r['default_images_per_s_250_steps']:.2f} img/s at 250 steps (default precision), "
            f"{r['highest_images_per_s_250_steps']:.2f} (highest) | call "
            f"{r['default_call_s'] * 1e3:.1f} / {r['highest_call_s'] * 1e3:.1f} ms")
    else:
      print(f"{r['case']} | {r.get('error', '')}")


if __name__ == "__main__":
  main()
