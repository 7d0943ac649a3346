"""`dit-inspect`: a look inside a trained DiT, as PNGs, JSON and TensorBoard images.

  dit-inspect --workdir=RUN --out=RUN/inspect [--step=N] [--queries=0,5] [--levels=0.9,0.5,0.1]
      [--sampler=NAME --steps=K]

From a checkpoint's EMA weights and held-out latents of its dataset (the records of
meta["data"]["dir"], or --data), it writes:

- attention.png / attention.json: per layer and head, the attention of chosen query tokens
  (--queries, token indices in raster order) at chosen noise levels (--levels: fraction of the
  way from data, 0, to noise, 1), the map over the key tokens laid over the decoded x0 estimate;
- loss_by_level.png / .json: the objective's own training loss on held-out latents, by noise
  level in 10 equal-count buckets of the objective's training distribution (flow time, ADM's t,
  EDM's log sigma): where the model still loses;
- adaln.png / adaln.json: per block, the mean |gate| and |scale| of the attention and MLP
  branches across noise levels (the modulations adaLN-Zero computes from t and y): which blocks
  each noise level uses;
- trajectory.png / .json: the objective's own sampler (--sampler, --steps; unguided, label
  --label) from one noise draw, every network call it makes recorded: x_t at each call (top)
  and the model's estimate of x0 from that call (bottom; ADM: from eps; flow: x_t + (1 - t) v
  on the linear path; EDM: the denoiser; MeanFlow: x_t - t u(x_t, t, t)), at most 10 columns;
- estimates.png / .json: for one held-out latent and one noise draw, x_t at each --levels
  value along the objective's forward process and the model's one-call estimate of x0 from it:
  what each level's single network call recovers from a real image.

The attention maps come from `models.Attention`'s `attention_weights` (sown only when the
'intermediates' collection is mutable, so training is unchanged), the adaLN statistics from
`models.Modulation`'s 'modulation'.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dit_jax import checkpointing, image_io, latent_norm, models, sampling


# ------------------------------------------------------------------ the model's internals
def intermediates(model: models.DiT, params: Any, x: jax.Array, t: jax.Array, y: jax.Array,
                  **kwargs: Any) -> tuple[jax.Array, dict]:
  """(output, {'attention': [depth, N, heads, T, T], 'modulation': [depth, N, k*D]}) of one
  forward pass, the blocks in order."""
  if model.scan_layers:
    raise ValueError("intermediates: a per-block (unscanned) model; convert.unstack_blocks "
                     "turns scanned parameters into per-block ones")
  out, state = model.apply({"params": params}, x, t, y, mutable=["intermediates"], **kwargs)
  inter = state["intermediates"]
  blocks = [inter[f"blocks_{i}"] for i in range(model.depth)]
  attn = jnp.stack([b["attn"]["attention_weights"][0] for b in blocks])
  mod = jnp.stack([b["adaLN_modulation"]["modulation"][0] for b in blocks])
  return out, {"attention": attn, "modulation": mod}


def adaln_statistics(model: models.DiT, mod: jax.Array) -> dict[str, np.ndarray]:
  """Per block, mean |.| over images and width of the gates and scales ([depth] each)."""
  names = (("shift_msa", "scale_msa", "gate_msa", "shift_mlp", "scale_mlp", "gate_mlp")
           if model.adaln_shift else ("scale_msa", "gate_msa", "scale_mlp", "gate_mlp"))
  parts = jnp.split(mod, len(names), axis=-1)
  return {n: np.asarray(jnp.abs(p).mean(axis=(1, 2))) for n, p in zip(names, parts)
          if not n.startswith("shift")}


# ------------------------------------------------------------------- objective-specific
def model_time(objective: Any, level: float, x0: jax.Array) -> dict[str, jax.Array]:
  """The objective's inputs at noise `level` (0 data, 1 noise) for every row of x0: t (and
  sigma for EDM), as its training draws them."""
  n = x0.shape[0]
  name = objective.name
  if name == "adm":
    return {"t": jnp.full((n,), int(round(level * (objective.steps - 1))), jnp.int32)}
  if name == "flow":
    return {"t": jnp.full((n,), 1.0 - level, jnp.float32)}  # SiT's time: 0 noise, 1 data
  if name == "edm":
    from dit_jax.objectives import edm  # pylint: disable=import-outside-toplevel
    lo, hi = np.log(edm.SIGMA_MIN), np.log(edm.SIGMA_MAX)
    sigma = jnp.full((n,), float(np.exp(lo + level * (hi - lo))), jnp.float32)
    return {"t": objective.model_time(sigma), "sigma": sigma}
  if name == "meanflow":
    return {"t": jnp.full((n,), level, jnp.float32), "r": jnp.full((n,), level, jnp.float32)}
  raise ValueError(f"dit-inspect: no noise levels for the {name} objective")


def noisy_and_estimate(objective: Any, apply: Any, x0: jax.Array, noise: jax.Array,
                       level: float, y: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(x_t, the model's one-call estimate of x0) at noise `level`; apply(x, t, y, **kw)."""
  c = x0.shape[-1]
  times = model_time(objective, level, x0)
  t = times["t"]
  name = objective.name
  if name == "adm":
    abar = float(np.cumprod(1.0 - _betas(objective))[int(t[0])])
    xt = np.sqrt(abar) * x0 + np.sqrt(1.0 - abar) * noise
    eps = apply(xt, t, y)[..., :c]
    return xt, (xt - np.sqrt(1.0 - abar) * eps) / np.sqrt(abar)
  if name == "flow":
    _check_linear_velocity(objective)
    s = float(t[0])
    xt = s * x0 + (1.0 - s) * noise
    if getattr(objective, "network_time", "sit") == "repa":  # REPA's time: 1 - t, -v
      v = -apply(xt, 1.0 - t, y)[..., :c]
    else:
      v = apply(xt, t, y)[..., :c]
    return xt, xt + (1.0 - s) * v
  if name == "edm":
    from dit_jax.objectives import edm  # pylint: disable=import-outside-toplevel
    sigma = times["sigma"]
    xt = x0 + float(sigma[0]) * noise
    c_skip, c_out, c_in, _ = edm.precondition(sigma.reshape(-1, 1, 1, 1))
    raw = apply(c_in * xt, t, y)[..., :c]
    return xt, c_skip * xt + c_out * raw
  if name == "meanflow":
    s = float(t[0])
    xt = (1.0 - s) * x0 + s * noise
    u = apply(xt, t, y, h=jnp.zeros_like(t))[..., :c]
    return xt, xt - s * u
  raise ValueError(f"dit-inspect: no trajectory for the {name} objective")


def estimate_from_call(objective: Any, x: np.ndarray, t: np.ndarray, out: np.ndarray,
                       channels: int) -> tuple[np.ndarray, np.ndarray, float]:
  """(x_t, x0 estimate, level 0 data .. 1 noise) of one network call that a sampler made, from
  what the network saw (x, t) and returned (out); MeanFlow's estimate needs its own call
  (`sampler_trajectory`)."""
  eps_or_v = out[..., :channels]
  name = objective.name
  if name == "adm":
    abar = float(np.cumprod(1.0 - _betas(objective))[int(t[0])])
    x0 = (x - np.sqrt(1.0 - abar) * eps_or_v) / np.sqrt(abar)
    return x, x0, float(t[0]) / (objective.steps - 1)
  if name == "flow":
    _check_linear_velocity(objective)
    if getattr(objective, "network_time", "sit") == "repa":  # REPA's time: 1 - t, -v
      s, v = 1.0 - float(t[0]), -eps_or_v
    else:
      s, v = float(t[0]), eps_or_v
    return x, x + (1.0 - s) * v, 1.0 - s
  if name == "edm":
    from dit_jax.objectives import edm  # pylint: disable=import-outside-toplevel
    sigma = np.exp(4.0 * np.asarray(t, np.float64) / objective.time_scale).astype(np.float32)
    c_skip, c_out, c_in, _ = (np.asarray(c).reshape(-1, 1, 1, 1)
                              for c in edm.precondition(sigma, objective.sigma_data))
    xt = x / c_in  # the network saw c_in * x_t
    lo, hi = np.log(edm.SIGMA_MIN), np.log(edm.SIGMA_MAX)
    return xt, c_skip * xt + c_out * eps_or_v, float((np.log(sigma[0]) - lo) / (hi - lo))
  raise ValueError(f"dit-inspect: no estimate from a {name} call")


def sampler_trajectory(objective: Any, apply: Any, noise: jax.Array, y: jax.Array,
                       sampler: str | None = None, steps: int | None = None,
                       key: jax.Array | None = None) -> tuple[np.ndarray, list[dict]]:
  """The objective's own sampler (unguided) from `noise`, with every network call it makes
  recorded: (the sample, [{'level', 'x_t', 'x0'} per call, in call order]). x0 is the model's
  estimate of the data from that call's x_t (MeanFlow: x_t - t u(x_t, t, h = t), one more call
  per step). apply(x, t, y, **kw) is the DiT."""
  calls = []
  c = noise.shape[-1]

  def record(x, t, out):
    calls.append((np.asarray(x), np.asarray(t), np.asarray(out)))

  def model_fn(x, t, yy=None, **kw):
    kw.pop("force_drop_ids", None)
    out = apply(x, t, y if yy is None else yy, **kw)
    jax.debug.callback(record, x, t, out, ordered=True)
    return out
  final = objective.sample(model_fn, noise, key if key is not None else jax.random.PRNGKey(0),
                           sampler=sampler, steps=steps)
  final = np.asarray(jax.block_until_ready(final))
  jax.effects_barrier()
  out = []
  for x, t, o in calls:
    if objective.name == "meanflow":
      tt = jnp.asarray(t)
      u = np.asarray(apply(jnp.asarray(x), tt, y, h=tt))[..., :c]
      out.append({"level": float(t[0]), "x_t": x, "x0": x - float(t[0]) * u})
    else:
      xt, x0, level = estimate_from_call(objective, x, t, o, c)
      out.append({"level": level, "x_t": xt, "x0": x0})
  return final, out


def _check_linear_velocity(objective: Any) -> None:
  tr = objective.transport
  if tr.path.name != "Linear" or tr.prediction != "velocity":
    raise ValueError("dit-inspect's trajectory: flow on the Linear path with velocity "
                     f"prediction only (this one: {tr.path.name}, {tr.prediction})")


def _betas(objective: Any) -> np.ndarray:
  from dit_jax import diffusion  # pylint: disable=import-outside-toplevel
  return diffusion.get_named_beta_schedule(objective.noise_schedule, objective.steps)


def loss_by_level(objective: Any, apply: Any, x0: jax.Array, y: jax.Array, key: jax.Array,
                  buckets: int = 10) -> list[dict]:
  """The objective's training loss of held-out x0 by noise level: its own draws for every row,
  then equal-count buckets of the level (log sigma for EDM, t otherwise)."""
  k_t, k_noise = jax.random.split(key)
  inputs = {**objective.draw(k_t, k_noise, x0), "label": y, "drop": jnp.zeros_like(y)}

  def model_fn(x, t, yy=None, **kw):
    kw.pop("force_drop_ids", None)
    return apply(x, t, y if yy is None else yy, **kw)
  loss, _ = objective.training_losses(model_fn, x0, inputs)
  loss = np.asarray(loss, np.float64)
  level = np.log(np.asarray(inputs["sigma"])) if "sigma" in inputs else np.asarray(inputs["t"],
                                                                                  np.float64)
  order = np.argsort(level)
  out = []
  for idx in np.array_split(order, buckets):
    out.append({"level_lo": float(level[idx].min()), "level_hi": float(level[idx].max()),
                "loss": float(loss[idx].mean()), "count": int(len(idx))})
  return out


# ----------------------------------------------------------------------------- pictures
def _upscale(img: np.ndarray, size: int) -> np.ndarray:
  f = max(1, size // img.shape[0])
  return np.repeat(np.repeat(img, f, 0), f, 1)


def attention_overlay(base: np.ndarray, weights: np.ndarray, grid: int,
                      query: int | None = None) -> np.ndarray:
  """An attention map over key tokens [T] as a heat map (red, scaled to its maximum) laid over
  a uint8 image [H, W, C] at a quarter of its brightness; the query token outlined in green;
  a white border."""
  h = base.shape[0]
  cell = h // grid
  m = weights.reshape(grid, grid)
  m = m / max(float(m.max()), 1e-12)
  m = np.kron(m, np.ones((cell, cell)))[..., None]
  gray = (base.mean(-1, keepdims=True) if base.shape[-1] > 1 else base).astype(np.float32)
  heat = np.concatenate([m * 255, m * 40, m * 40], axis=-1)
  img = np.clip(0.25 * gray + 0.75 * heat, 0, 255).astype(np.uint8)
  if query is not None:
    r, c = divmod(int(query), grid)
    box = img[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell]
    box[0, :], box[-1, :], box[:, 0], box[:, -1] = (0, 255, 0), (0, 255, 0), (0, 255, 0), (0, 255, 0)
  return np.pad(img, ((1, 1), (1, 1), (0, 0)), constant_values=255)


def _bar_png(values: Sequence[float], height: int = 64) -> np.ndarray:
  """A plain bar chart, uint8 [height, 8 * len, 3] (no plotting dependency)."""
  v = np.asarray(values, np.float64)
  v = v / max(float(np.abs(v).max()), 1e-12)
  img = np.full((height, 8 * len(v), 3), 255, np.uint8)
  for i, x in enumerate(v):
    top = int(round((1 - abs(x)) * (height - 1)))
    img[top:, 8 * i + 1:8 * i + 7] = (40, 90, 200)
  return img


def inspect(workdir: str, out: str, step: int | None = None, data: str = "",
            queries: Sequence[int] = (0,), levels: Sequence[float] = (0.9, 0.5, 0.1),
            num_examples: int = 256, label: int = 0, seed: int = 0,
            sampler: str | None = None, steps: int | None = 10) -> dict:
  """Writes the pictures and JSON of the module docstring into `out`; returns the JSON dict."""
  from dit_jax import input_pipeline  # pylint: disable=import-outside-toplevel
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  model, params, meta = checkpointing.load_ema_model(workdir, dev, step)
  model = model.clone(scan_layers=False) if model.scan_layers else model
  if "blocks" in params:
    from dit_jax import convert  # pylint: disable=import-outside-toplevel
    params = convert.unstack_blocks(params)
  objective = checkpointing.read_objective(meta)
  data = data or meta.get("data", {}).get("dir", "")
  if not data:
    raise ValueError(f"{workdir}: the checkpoint meta names no data directory: pass --data")
  info = input_pipeline.get_info(data)
  ds = input_pipeline.create_dataset(info, local_batch_size=num_examples, seed=seed + 1,
                                     process_index=0, start_step=0, shuffle_buffer=1024,
                                     cycle_length=2)
  batch = {k: np.asarray(v) for k, v in next(iter(ds)).items()}
  norm = latent_norm.from_record(meta, workdir)
  x0 = norm.normalize(batch["mean"][:, 0].astype(np.float32))
  y = jnp.asarray(batch["label"], jnp.int32)
  os.makedirs(out, exist_ok=True)
  apply = jax.jit(lambda x, t, yy, **kw: model.apply({"params": params}, x, t, yy, **kw))
  kw = lambda t: ({"h": jnp.zeros_like(t)} if model.h_embedder else {})
  decode = sampling.Decoder(meta.get("vae_path") or "identity", norm)
  result: dict[str, Any] = {"step": int(meta["step"]), "objective": objective.name,
                            "label": label,
                            "levels": list(map(float, levels)), "queries": list(map(int, queries))}

  # Loss by level (the objective's own draws over the held-out batch).
  result["loss_by_level"] = loss_by_level(objective, apply, x0, y, jax.random.PRNGKey(seed))
  image_io.save_png(os.path.join(out, "loss_by_level.png"),
                    _upscale(_bar_png([b["loss"] for b in result["loss_by_level"]]), 64))

  # One example through the levels: x_t, the estimate of x0, attention and adaLN statistics.
  noise = jax.random.normal(jax.random.PRNGKey(seed + 7), x0[:1].shape)
  # The traced example: the first held-out latent of class `label` (else the first one).
  i = int(np.argmax(np.asarray(y) == label)) if (np.asarray(y) == label).any() else 0
  one, y1 = x0[i:i + 1], y[i:i + 1]
  grid = model.grid_size
  internals = jax.jit(lambda x, t: intermediates(model, params, x, t, y1, **kw(t)))
  strip, attn_rows, attention, adaln = [], [], {}, {}
  for level in levels:
    xt, est = noisy_and_estimate(objective, apply, one, noise, float(level), y1)
    t = model_time(objective, float(level), one)["t"]
    _, inter = internals(objective_input(objective, xt, float(level)), t)
    images = np.asarray(decode(jnp.concatenate([xt, est])))
    strip.append(np.concatenate([images[0], images[1]], axis=0))
    w = np.asarray(inter["attention"][:, 0])  # [depth, heads, T, T]
    attention[str(level)] = {str(q): w[:, :, q].tolist() for q in queries}
    stats = adaln_statistics(model, inter["modulation"])
    adaln[str(level)] = {k: v.tolist() for k, v in stats.items()}
    for q in queries:
      row = [attention_overlay(_upscale(images[1], 32), w[layer, head, q], grid, q)
             for layer in range(w.shape[0]) for head in range(w.shape[1])]
      attn_rows.append(np.concatenate(row, axis=1))
  result["attention"], result["adaln"] = attention, adaln
  image_io.save_png(os.path.join(out, "estimates.png"),
                    _upscale(np.concatenate(strip, axis=1), 64 * len(levels)))

  # The sampler's own trajectory from one noise draw, every network call recorded.
  final, calls = sampler_trajectory(objective, apply, noise, y1, sampler, steps,
                                    jax.random.PRNGKey(seed + 11))
  shown = sorted(set(np.linspace(0, len(calls) - 1, min(len(calls), 10)).round().astype(int)))
  columns = []
  for i in shown:
    images = np.asarray(decode(jnp.concatenate([jnp.asarray(calls[i]["x_t"]),
                                                jnp.asarray(calls[i]["x0"])])))
    columns.append(np.concatenate([images[0], images[1]], axis=0))
  sample = np.asarray(decode(jnp.asarray(final)))[0]
  columns.append(np.concatenate([sample, sample], axis=0))  # the sampler's output
  image_io.save_png(os.path.join(out, "trajectory.png"),
                    _upscale(np.concatenate(columns, axis=1), 64 * len(columns)))
  norm = float(np.linalg.norm(final)) or 1.0
  result["trajectory"] = {"sampler": sampler or "default", "steps": steps,
                          "calls": len(calls), "levels": [c["level"] for c in calls],
                          "shown": [int(i) for i in shown],
                          # How far each call's estimate is from where the sampler ends.
                          "x0_to_sample": [float(np.linalg.norm(c["x0"] - final)) / norm
                                           for c in calls]}
  image_io.save_png(os.path.join(out, "attention.png"), np.concatenate(attn_rows, axis=0))
  bars = [_bar_png([adaln[str(l)][k][b] for b in range(model.depth)])
          for l in levels for k in sorted(adaln[str(levels[0])])]
  image_io.save_png(os.path.join(out, "adaln.png"), np.concatenate(bars, axis=0))
  for name in ("loss_by_level", "attention", "adaln"):
    with open(os.path.join(out, f"{name}.json"), "w") as f:
      json.dump({k: result[k] for k in ("step", "objective", name)}, f)
  with open(os.path.join(out, "estimates.json"), "w") as f:
    json.dump({"step": result["step"], "levels": result["levels"],
               "note": "each column: x_t (top) and the model's one-call x0 estimate (bottom)"}, f)
  with open(os.path.join(out, "trajectory.json"), "w") as f:
    json.dump({"step": result["step"], **result["trajectory"],
               "note": "each column: a network call of the sampler, x_t (top) and the model's "
                       "x0 estimate from it (bottom); the last column is the sample"}, f)
  _to_tensorboard(out, result["step"])
  return result


def objective_input(objective: Any, xt: jax.Array, level: float) -> jax.Array:
  """What the network sees at x_t: EDM's c_in * x_t, x_t otherwise."""
  if objective.name != "edm":
    return xt
  from dit_jax.objectives import edm  # pylint: disable=import-outside-toplevel
  sigma = model_time(objective, level, xt)["sigma"]
  return edm.precondition(sigma.reshape(-1, 1, 1, 1))[2] * xt


def _to_tensorboard(out: str, step: int) -> None:
  from clu import metric_writers  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  writer = metric_writers.create_default_writer(out, just_logging=False)
  images = {name: np.asarray(Image.open(os.path.join(out, f"{name}.png")).convert("RGB"))[None]
            for name in ("attention", "loss_by_level", "adaln", "trajectory", "estimates")}
  writer.write_images(step, images)
  writer.flush()


def main(argv: Sequence[str]) -> None:
  from absl import flags  # pylint: disable=import-outside-toplevel
  del argv
  f = flags.FLAGS
  result = inspect(f.workdir, f.out or os.path.join(f.workdir, "inspect"), f.step, f.data,
                   [int(q) for q in f.queries], [float(x) for x in f.levels],
                   f.num_examples, f.label, sampler=f.sampler or None, steps=f.steps)
  worst = max(result["loss_by_level"], key=lambda b: b["loss"])
  print(f"wrote {f.out or os.path.join(f.workdir, 'inspect')}: attention, loss_by_level, adaln, "
        f"trajectory ({result['trajectory']['calls']} network calls), estimates (.png, .json, "
        f"TensorBoard) of step {result['step']}; the highest loss is at "
        f"levels {worst['level_lo']:.3g}..{worst['level_hi']:.3g} ({worst['loss']:.4g})")


def run() -> None:
  """Console script `dit-inspect` (python -m dit_jax.inspection)."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  from dit_jax import runtime  # pylint: disable=import-outside-toplevel
  flags.DEFINE_string("workdir", None, "A training run (its newest checkpoint, or --step).")
  flags.DEFINE_string("out", "", "Output directory (default: WORKDIR/inspect).")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
  flags.DEFINE_string("data", "", "Latent records (default: the checkpoint meta's data dir).")
  flags.DEFINE_list("queries", ["0"], "Query tokens of the attention maps (raster order).")
  flags.DEFINE_list("levels", ["0.9", "0.5", "0.1"], "Noise levels: 0 data, 1 noise.")
  flags.DEFINE_integer("num_examples", 256, "Held-out latents for the loss by level.")
  flags.DEFINE_integer("label", 0, "Class of the example traced through the levels, and of "
                       "the sampler's trajectory.")
  flags.DEFINE_string("sampler", "", "The trajectory's sampler (default: the objective's).")
  flags.DEFINE_integer("steps", 10, "The trajectory's sampler steps.")
  flags.mark_flags_as_required(["workdir"])
  runtime.run(main)


if __name__ == "__main__":
  run()
