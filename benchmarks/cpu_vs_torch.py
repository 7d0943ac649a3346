"""This CPU's train step, dit_jax against a PyTorch DiT, side by side in one run, with XLA CPU options.

  python benchmarks/cpu_vs_torch.py                      # DiT-S/2, batch 8, float32
  python benchmarks/cpu_vs_torch.py --steps=8 --variants=default,onednn

The PyTorch side is diffusers' DiTTransformer2DModel (the released architecture; its parity
with dit_jax is tests/test_convert.py) at the same size, trained the release's way: AdamW
(lr 1e-4, no weight decay), the noise-prediction MSE on a random timestep, then the EMA
update. Its loss omits the release's variational-bound term (a [B, 8, 32, 32]-sized
elementwise sum: under 1% of the step), so the comparison slightly favours PyTorch. The JAX side
is the main job's own step (benchmarks/accelerator_speed.py, one fresh process per XLA_FLAGS
variant). The runs alternate torch, JAX variants, torch again, so drift in the machine's load
shows as a difference between the two torch figures. Seconds per step: the median of the timed
PyTorch steps; for JAX, the mean (steps are dispatched asynchronously and timed together).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dit_jax.diffusion import get_named_beta_schedule  # noqa: E402

# XLA CPU options tried (flags of the installed jaxlib; see its --xla_cpu_* list).
VARIANTS = {
    "default": "",
    "onednn": "--xla_cpu_use_onednn=true",
    "xnnpack": "--xla_cpu_use_xnnpack=true",
    "fast_math": "--xla_cpu_enable_fast_math=true",
    "no_multi_thread_eigen": "--xla_cpu_multi_thread_eigen=false",
}
SIZES = {"DiT-S/2": (6, 64, 12, "s2"), "DiT-B/2": (12, 64, 12, "b2")}


def torch_step_seconds(model_name: str, batch: int, steps: int) -> list[float]:
  import torch  # pylint: disable=import-outside-toplevel
  from diffusers import DiTTransformer2DModel  # pylint: disable=import-outside-toplevel
  heads, head_dim, depth, _ = SIZES[model_name]
  torch.manual_seed(0)
  model = DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=head_dim,
                                in_channels=4, out_channels=8, num_layers=depth, sample_size=32,
                                patch_size=2, num_embeds_ada_norm=1000, norm_eps=1e-6).train()
  ema = [p.detach().clone() for p in model.parameters()]
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
  betas = get_named_beta_schedule("linear", 1000)  # the same schedule as the JAX side
  abar = torch.from_numpy(np.cumprod(1.0 - betas)).float()
  x0 = torch.randn(batch, 4, 32, 32)
  y = torch.randint(0, 1000, (batch,))
  times = []
  for i in range(steps + 2):
    t0 = time.perf_counter()
    t = torch.randint(0, 1000, (batch,))
    noise = torch.randn_like(x0)
    a = abar[t].view(-1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
    out = model(xt, timestep=t, class_labels=y).sample
    loss = torch.nn.functional.mse_loss(out[:, :4], noise)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    with torch.no_grad():
      torch._foreach_lerp_(ema, list(model.parameters()), 1 - 0.9999)  # pylint: disable=protected-access
    if i >= 2:
      times.append(time.perf_counter() - t0)
  return times


def jax_step_seconds(config: str, batch: int, steps: int, flags: str) -> dict:
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "r.json")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags}
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "accelerator_speed.py"),
           f"--cases={config}:{batch}:model.dtype=float32:model.attention_impl=xla",
           f"--steps={steps}", "--min_seconds=0", f"--json={out}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode or not os.path.exists(out):
      return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
    with open(out) as f:
      r = json.load(f)[0]
  if "error" in r:
    return r
  return {"s_per_step": 1 / r["steps_per_s"], "compile_s": r["compile_s"]}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--model", default="DiT-S/2", choices=sorted(SIZES))
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--variants", default=",".join(VARIANTS))
  args = ap.parse_args()
  import torch  # pylint: disable=import-outside-toplevel
  print(f"{args.model}, batch {args.batch}, float32, {os.cpu_count()} CPUs, torch "
        f"{torch.__version__} with {torch.get_num_threads()} threads", flush=True)
  config = SIZES[args.model][3]
  before = statistics.median(torch_step_seconds(args.model, args.batch, args.steps))
  print(f"torch (diffusers DiT)      {before:.3f} s/step", flush=True)
  results = {}
  for name in args.variants.split(","):
    r = jax_step_seconds(config, args.batch, args.steps, VARIANTS[name])
    results[name] = r
    if "error" in r:
      print(f"jax {name:22s} failed: {r['error']}", flush=True)
    else:
      print(f"jax {name:22s} {r['s_per_step']:.3f} s/step (mean of {args.steps}; compile "
            f"{r['compile_s']:.0f} s)", flush=True)
  after = statistics.median(torch_step_seconds(args.model, args.batch, args.steps))
  print(f"torch again                {after:.3f} s/step", flush=True)
  ref = (before + after) / 2
  print("\nratio jax / torch (above 1: JAX slower)")
  for name, r in results.items():
    if "s_per_step" in r:
      print(f"  {name:24s} {r['s_per_step'] / ref:.2f}  ({VARIANTS[name] or 'no flags'})")


if __name__ == "__main__":
  main()
