"""Hugging Face diffusers' format, both ways: a DiT as a `DiTPipeline` folder, and back.

  dit-convert --converted=DIR --vae=SD_VAE --to_diffusers=OUT        # a converted checkpoint
  dit-convert --workdir=RUN --vae=SD_VAE --to_diffusers=OUT          # a training run's EMA
  dit-convert --official DiT-XL-2-256x256.pt --model DiT-XL/2 --image_size 256 \
      --vae=SD_VAE --to_diffusers OUT                                 # a released .pt
  dit-convert --from_diffusers=OUT --out=DIR                         # back to dit_jax

`convert.to_diffusers` (through `write_pipeline`) writes OUT/model_index.json (`DiTPipeline`, with `id2label` when known),
OUT/transformer (diffusers' `DiTTransformer2DModel` config and safetensors, in its layout: q, k, v
split, the timestep and label embedders copied into every block's `norm1.emb`), OUT/scheduler
(a `DDIMScheduler` config of the checkpoint's ADM process: the release's linear betas, or
`squaredcos_cap_v2` for the cosine schedule; leading spacing, which is ADM's 'ddimN'), and
OUT/vae (the SD-VAE folder the latents were made with, copied). `DiTPipeline.from_pretrained(OUT)`
then loads offline. Numbers to know: diffusers' DiT embeds the timestep with
`downscale_freq_shift=1` where the release uses 0 (its frequencies are
exp(-ln(10^4) i / 127) instead of / 128), and its pipeline guides every latent channel where the
release guides 3; the weights are the same either way.

Only the release's architecture has a diffusers class. Flow checkpoints (no DiT pipeline for
them) and LightningDiT's parts (no diffusers class) get `OUT/transformer` alone: the DiT layout
for flow, LightningDiT's own state-dict layout for its variants, each with a `dit_jax.json` that
says what it is and that no pipeline was written.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Mapping

import numpy as np

from dit_jax import models

DIFFUSERS_VERSION = "0.42.1"  # the version whose layout this writes (model_index.json)
TRANSFORMER = "transformer"
WEIGHTS = "diffusion_pytorch_model.safetensors"


def transformer_config(model: models.DiT) -> dict:
  """diffusers' DiTTransformer2DModel config of a release-architecture DiT."""
  return {"_class_name": "DiTTransformer2DModel", "_diffusers_version": DIFFUSERS_VERSION,
          "num_attention_heads": model.num_heads,
          "attention_head_dim": model.hidden_size // model.num_heads,
          "in_channels": model.in_channels, "out_channels": model.out_channels,
          "num_layers": model.depth, "dropout": 0.0, "norm_num_groups": 32,
          "attention_bias": True, "sample_size": model.input_size, "patch_size": model.patch_size,
          "activation_fn": "gelu-approximate", "num_embeds_ada_norm": model.num_classes,
          "upcast_attention": False, "norm_type": "ada_norm_zero",
          "norm_elementwise_affine": False, "norm_eps": 1e-6}


def release_architecture(model: models.DiT) -> bool:
  """Whether `model` has the release's parts (the architecture diffusers' DiT class has)."""
  return (model.norm, model.mlp, model.pos_embedding, model.attention, model.qk_norm,
          model.rope, model.adaln_shift, model.h_embedder) == (
              "layernorm", "gelu", "sincos", "mha", False, False, True, False)


def _as_numpy(x: Any) -> np.ndarray:
  if hasattr(x, "detach"):  # torch tensor, without importing torch
    x = x.detach().cpu().float().numpy()
  return np.asarray(x, dtype=np.float32)


def to_diffusers_state_dict(sd: Mapping[str, Any], model: models.DiT) -> dict[str, np.ndarray]:
  """The release's state dict (`convert.to_official`) -> DiTTransformer2DModel's (numpy
  float32)."""
  sd = {k: _as_numpy(v) for k, v in sd.items()}
  out = {"pos_embed.proj.weight": sd["x_embedder.proj.weight"],
         "pos_embed.proj.bias": sd["x_embedder.proj.bias"],
         "proj_out_1.weight": sd["final_layer.adaLN_modulation.1.weight"],
         "proj_out_1.bias": sd["final_layer.adaLN_modulation.1.bias"],
         "proj_out_2.weight": sd["final_layer.linear.weight"],
         "proj_out_2.bias": sd["final_layer.linear.bias"]}
  d = model.hidden_size
  for i in range(model.depth):
    b, o = f"transformer_blocks.{i}.", f"blocks.{i}."
    e = b + "norm1.emb."
    out[e + "class_embedder.embedding_table.weight"] = sd["y_embedder.embedding_table.weight"]
    for s in ("weight", "bias"):
      out[e + f"timestep_embedder.linear_1.{s}"] = sd[f"t_embedder.mlp.0.{s}"]
      out[e + f"timestep_embedder.linear_2.{s}"] = sd[f"t_embedder.mlp.2.{s}"]
      qkv = sd[o + f"attn.qkv.{s}"]
      for j, c in enumerate("qkv"):
        out[b + f"attn1.to_{c}.{s}"] = qkv[j * d:(j + 1) * d]
      out[b + f"attn1.to_out.0.{s}"] = sd[o + f"attn.proj.{s}"]
      out[b + f"ff.net.0.proj.{s}"] = sd[o + f"mlp.fc1.{s}"]
      out[b + f"ff.net.2.{s}"] = sd[o + f"mlp.fc2.{s}"]
      out[b + f"norm1.linear.{s}"] = sd[o + f"adaLN_modulation.1.{s}"]
  return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def from_diffusers_state_dict(sd: Mapping[str, Any], config: Mapping[str, Any]
                              ) -> tuple[models.DiT, dict]:
  """DiTTransformer2DModel's state dict and config -> (DiT, the release's state dict;
  `convert.from_official` makes params of it). Every block's copy of the embedders must be the
  same (block 0's is used): a model whose blocks differ there is not a DiT. Errors name the
  key."""
  def g(key: str) -> np.ndarray:
    if key not in sd:
      raise ValueError(f"from_diffusers: the state dict has no {key!r}")
    return _as_numpy(sd[key])
  depth = int(config["num_layers"])
  heads, head_dim = int(config["num_attention_heads"]), int(config["attention_head_dim"])
  if config.get("norm_type", "ada_norm_zero") != "ada_norm_zero":
    raise ValueError(f"from_diffusers: norm_type {config.get('norm_type')!r} is not DiT's "
                     "'ada_norm_zero'")
  official = {"x_embedder.proj.weight": g("pos_embed.proj.weight"),
              "x_embedder.proj.bias": g("pos_embed.proj.bias"),
              "final_layer.adaLN_modulation.1.weight": g("proj_out_1.weight"),
              "final_layer.adaLN_modulation.1.bias": g("proj_out_1.bias"),
              "final_layer.linear.weight": g("proj_out_2.weight"),
              "final_layer.linear.bias": g("proj_out_2.bias")}
  e0 = "transformer_blocks.0.norm1.emb."
  shared = {"y_embedder.embedding_table.weight": "class_embedder.embedding_table.weight",
            **{f"t_embedder.mlp.{a}.{s}": f"timestep_embedder.linear_{n}.{s}"
               for a, n in ((0, 1), (2, 2)) for s in ("weight", "bias")}}
  for ours, theirs in shared.items():
    official[ours] = g(e0 + theirs)
    for i in range(1, depth):
      if not np.array_equal(g(f"transformer_blocks.{i}.norm1.emb." + theirs), official[ours]):
        raise ValueError(f"from_diffusers: transformer_blocks.{i}.norm1.emb.{theirs} differs "
                         "from block 0's: DiT shares one timestep and label embedder")
  for i in range(depth):
    b, o = f"transformer_blocks.{i}.", f"blocks.{i}."
    for s in ("weight", "bias"):
      official[o + f"attn.qkv.{s}"] = np.concatenate([g(b + f"attn1.to_{c}.{s}") for c in "qkv"])
      official[o + f"attn.proj.{s}"] = g(b + f"attn1.to_out.0.{s}")
      official[o + f"mlp.fc1.{s}"] = g(b + f"ff.net.0.proj.{s}")
      official[o + f"mlp.fc2.{s}"] = g(b + f"ff.net.2.{s}")
      official[o + f"adaLN_modulation.1.{s}"] = g(b + f"norm1.linear.{s}")
  rows = official["y_embedder.embedding_table.weight"].shape[0]
  c = int(config["in_channels"])
  model = models.DiT(input_size=int(config["sample_size"]), patch_size=int(config["patch_size"]),
                     in_channels=c, hidden_size=heads * head_dim, depth=depth, num_heads=heads,
                     num_classes=int(config["num_embeds_ada_norm"]),
                     class_dropout_prob=0.1 if rows == int(config["num_embeds_ada_norm"]) + 1
                     else 0.0,
                     learn_sigma=int(config.get("out_channels") or c) == 2 * c)
  return model, official


def scheduler_config(objective: Mapping[str, Any] | None) -> dict:
  """A DDIMScheduler config of an ADM record (None: the release's process)."""
  record = objective or {"name": "adm", "noise_schedule": "linear", "steps": 1000}
  if record.get("name", "adm") != "adm":
    raise ValueError(f"the {record['name']} objective has no DiTPipeline scheduler")
  schedule = record.get("noise_schedule", "linear")
  steps = int(record.get("steps", 1000))
  if schedule == "linear":
    scale = 1000 / steps  # ADM scales the linear betas by 1000 / T
    betas = {"beta_schedule": "linear", "beta_start": 1e-4 * scale, "beta_end": 0.02 * scale}
  elif schedule in ("cosine", "squaredcos_cap_v2"):
    betas = {"beta_schedule": "squaredcos_cap_v2", "beta_start": 1e-4, "beta_end": 0.02}
  else:
    raise ValueError(f"noise_schedule {schedule!r} has no diffusers scheduler")
  return {"_class_name": "DDIMScheduler", "_diffusers_version": DIFFUSERS_VERSION,
          "num_train_timesteps": steps, **betas, "clip_sample": False, "set_alpha_to_one": True,
          "steps_offset": 0, "timestep_spacing": "leading", "prediction_type": "epsilon"}


def _save_safetensors(path: str, sd: Mapping[str, np.ndarray]) -> None:
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  tmp = path + ".tmp"
  save_file(dict(sd), tmp)
  os.replace(tmp, path)


def _write_json(path: str, record: Mapping[str, Any]) -> None:
  with open(path + ".tmp", "w") as f:
    json.dump(record, f, indent=2)
  os.replace(path + ".tmp", path)


def write_pipeline(out: str, model: models.DiT, objective: Mapping[str, Any] | None,
                   release_sd: Mapping[str, Any] | None = None,
                   lightningdit_sd: Mapping[str, Any] | None = None, vae_dir: str | None = None,
                   id2label: Mapping[int, str] | None = None) -> str:
  """Writes `out` (see the module docstring) from the release's state dict of a
  release-architecture DiT (`release_sd`), or LightningDiT's of one with its parts
  (`lightningdit_sd`); returns a line saying what was written. `convert.to_diffusers` is the
  entry point from dit_jax parameters."""
  name = (objective or {}).get("name", "adm")
  os.makedirs(os.path.join(out, TRANSFORMER), exist_ok=True)
  tdir = os.path.join(out, TRANSFORMER)
  if not release_architecture(model):
    _save_safetensors(os.path.join(tdir, "lightningdit.safetensors"),
                      {k: _as_numpy(v) for k, v in lightningdit_sd.items()})
    _write_json(os.path.join(tdir, "dit_jax.json"), {
        "layout": "LightningDiT state dict (hustvl/LightningDiT models/lightningdit.py)",
        "model_kwargs": dict(models.architecture(model)),
        "objective": dict(objective or {}),
        "note": "diffusers has no class for these parts: transformer weights only, no pipeline"})
    return (f"{out}/transformer: LightningDiT-layout weights and dit_jax.json (diffusers has no "
            "class for its parts; no pipeline written)")
  _save_safetensors(os.path.join(tdir, WEIGHTS), to_diffusers_state_dict(release_sd, model))
  _write_json(os.path.join(tdir, "config.json"), transformer_config(model))
  if name != "adm":
    _write_json(os.path.join(tdir, "dit_jax.json"), {
        "objective": dict(objective), "note": f"the {name} objective has no diffusers "
        "pipeline: DiTTransformer2DModel weights only"})
    return (f"{out}/transformer: DiTTransformer2DModel weights and config (the {name} objective "
            "has no DiTPipeline; no pipeline written)")
  if not vae_dir:
    return (f"{out}/transformer: DiTTransformer2DModel weights and config (no --vae given: no "
            "pipeline written)")
  from dit_jax import vae as vae_lib  # pylint: disable=import-outside-toplevel
  src = vae_lib.find_vae_dir(vae_dir)
  if os.path.abspath(src) != os.path.abspath(os.path.join(out, "vae")):
    shutil.rmtree(os.path.join(out, "vae"), ignore_errors=True)
    shutil.copytree(src, os.path.join(out, "vae"))
  os.makedirs(os.path.join(out, "scheduler"), exist_ok=True)
  _write_json(os.path.join(out, "scheduler", "scheduler_config.json"), scheduler_config(objective))
  index = {"_class_name": "DiTPipeline", "_diffusers_version": DIFFUSERS_VERSION,
           "scheduler": ["diffusers", "DDIMScheduler"],
           "transformer": ["diffusers", "DiTTransformer2DModel"],
           "vae": ["diffusers", "AutoencoderKL"]}
  if id2label:
    index["id2label"] = {str(k): v for k, v in id2label.items()}
  _write_json(os.path.join(out, "model_index.json"), index)
  return (f"{out}: a DiTPipeline (transformer, DDIM scheduler of the {name} process, vae"
          + (", id2label" if id2label else "") + "); diffusers loads it with "
          "DiTPipeline.from_pretrained")


def read_transformer(path: str) -> tuple[models.DiT, dict]:
  """(DiT, the release's state dict) of a DiTPipeline folder or its transformer/ subfolder."""
  tdir = os.path.join(path, TRANSFORMER) if os.path.isdir(os.path.join(path, TRANSFORMER)) \
      else path
  cfg_path = os.path.join(tdir, "config.json")
  if not os.path.exists(cfg_path):
    raise FileNotFoundError(f"{path}: no config.json in it or in its transformer/ subfolder "
                            "(a diffusers DiTPipeline folder or DiTTransformer2DModel folder)")
  with open(cfg_path) as f:
    config = json.load(f)
  weights = os.path.join(tdir, WEIGHTS)
  if os.path.exists(weights):
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
    sd = load_file(weights)
  elif os.path.exists(os.path.join(tdir, "diffusion_pytorch_model.bin")):
    import torch  # pylint: disable=import-outside-toplevel
    sd = torch.load(os.path.join(tdir, "diffusion_pytorch_model.bin"), map_location="cpu",
                    weights_only=True)
  else:
    raise FileNotFoundError(f"{tdir}: no {WEIGHTS} (or diffusion_pytorch_model.bin)")
  return from_diffusers_state_dict(sd, config)


def read_objective(path: str) -> dict:
  """The ADM record of a pipeline folder's scheduler (the release's when there is none)."""
  cfg = os.path.join(path, "scheduler", "scheduler_config.json")
  if not os.path.exists(cfg):
    return {"name": "adm", "noise_schedule": "linear", "steps": 1000}
  with open(cfg) as f:
    s = json.load(f)
  steps = int(s.get("num_train_timesteps", 1000))
  if s.get("prediction_type", "epsilon") != "epsilon":
    raise ValueError(f"{cfg}: prediction_type {s['prediction_type']!r}: DiT predicts epsilon")
  schedule = {"linear": "linear", "squaredcos_cap_v2": "cosine"}.get(s.get("beta_schedule"))
  if schedule is None:
    raise ValueError(f"{cfg}: beta_schedule {s.get('beta_schedule')!r} is not DiT's (linear or "
                     "squaredcos_cap_v2)")
  if schedule == "linear" and not np.allclose(
      [s.get("beta_start"), s.get("beta_end")], [1e-4 * 1000 / steps, 0.02 * 1000 / steps]):
    raise ValueError(f"{cfg}: linear betas {s.get('beta_start')}..{s.get('beta_end')} are not "
                     "ADM's (1e-4..0.02 times 1000/T)")
  return {"name": "adm", "noise_schedule": schedule, "steps": steps}
