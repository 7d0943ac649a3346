"""The grid's presets: which models, from which config files, trained and evaluated how.

'paper': the paper's 12 models (configs/{s,b,l,xl}{8,4,2}.py) at 256 px, 400K steps at batch 256,
  FID-50K (ADM's Inception evaluator, 250 DDPM steps, no guidance) every 50K steps.
'mini': configs/mini.py, the same 12 scaled down on the 8x8 digits for a CPU: 2,000 steps at
  batch 32, a proxy FID of 500 samples (50 DDPM steps, no guidance) every 500 steps.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
from typing import Any

import ml_collections

# Repository root (configs/ lives next to the package, as in the Flax examples).
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODELS = ("s8", "s4", "s2", "b8", "b4", "b2", "l8", "l4", "l2", "xl8", "xl4", "xl2")


@dataclasses.dataclass(frozen=True)
class Preset:
  """How every model of a grid is trained and evaluated (identical across its models)."""
  name: str
  config_file: str         # relative to ROOT; '{model}' is replaced by the model's short name
  total_steps: int         # training budget of every model
  eval_every: int          # evaluate the EMA weights at every multiple of this (and at the end)
  metric: str              # 'proxy' (digits classifier, in-process) or 'inception' (ADM's)
  num_samples: int         # samples per evaluation
  cfg_scale: float = 1.0   # the paper's grid is evaluated without guidance
  # The evaluation's sampler: one of the trained objective's ('' = its default, or what
  # sampler_options choose), with sampler_steps steps (0 = the sampler's default).
  sampler: str = ""
  sampler_steps: int = 0
  # The objective's own sampler options, passed through to it: the presets sample ADM with the
  # release's respacing string ({"respacing": "250"}); e.g. {"spacing": "logsnr"} with a sampler.
  sampler_options: dict = dataclasses.field(default_factory=dict)
  sample_batch: int = 256  # global batch of the evaluation's sampler
  latent_shape: tuple[int, int, int] = (32, 32, 4)  # for parameter and Gflops counts
  num_classes: int = 1000
  models: tuple[str, ...] = MODELS

  def sampler_kwargs(self, objective: Any = None) -> dict[str, Any]:
    """guidance.make_sample_fn's sampler keywords for the evaluation; with the trained
    `objective`, the options another objective owns are left out (the presets' respacing
    strings are ADM's)."""
    options = dict(self.sampler_options)
    if objective is not None:
      from dit_jax import objectives  # pylint: disable=import-outside-toplevel
      options = objectives.base.options_for(objective, options)
    return {"sampler": self.sampler or None, "steps": self.sampler_steps or None, **options}

  def sampler_flags(self, objective: Any = None) -> list[str]:
    """The same, as dit_jax.sample flags."""
    kwargs = self.sampler_kwargs(objective)
    flags = [f"--sampler={self.sampler}"] if self.sampler else []
    flags += [f"--steps={self.sampler_steps}"] if self.sampler_steps else []
    options = {k: v for k, v in kwargs.items() if k not in ("sampler", "steps")}
    if options:
      flags.append("--sampler_options=" + ",".join(
          f"{k}={v}" for k, v in sorted(options.items())))
    return flags

  def sampler_name(self) -> str:
    return sampler_name(dataclasses.asdict(self))

  def config_spec(self, model: str) -> str:
    return self.config_file.format(model=model)

  def eval_steps(self, total_steps: int | None = None) -> list[int]:
    total = total_steps or self.total_steps
    steps = list(range(self.eval_every, total + 1, self.eval_every)) if self.eval_every else []
    return steps if total in steps else steps + [total]


PRESETS = {
    "paper": Preset(name="paper", config_file="configs/{model}.py", total_steps=400_000,
                    eval_every=50_000, metric="inception", num_samples=50_000,
                    sampler_options={"respacing": "250"}, sample_batch=256),
    "mini": Preset(name="mini", config_file="configs/mini.py:{model}", total_steps=2_000,
                   eval_every=500, metric="proxy", num_samples=500,
                   sampler_options={"respacing": "50"}, sample_batch=500,
                   latent_shape=(8, 8, 1), num_classes=10),
}


# Fields of grid.json settings written before sampler_options: now its entries.
_LEGACY_OPTIONS = ("respacing", "spacing")


def settings_options(settings: dict[str, Any]) -> dict[str, Any]:
  """The sampler options of recorded preset settings (ROOT/grid.json), old layouts too."""
  if "sampler_options" in settings:
    return dict(settings["sampler_options"])
  legacy = {k: settings[k] for k in _LEGACY_OPTIONS if settings.get(k)}
  if settings.get("sampler"):  # the sampler replaced the respacing string
    legacy.pop("respacing", None)
  return {k: v for k, v in legacy.items() if (k, v) != ("spacing", "time")}


def sampler_name(settings: dict[str, Any]) -> str:
  """How a grid samples, from its preset's settings (as recorded in ROOT/grid.json)."""
  options = settings_options(settings)
  if not settings.get("sampler") and list(options) == ["respacing"]:
    return f"'{options['respacing']}' steps"
  name = (f"{settings.get('sampler') or 'default sampler'}, "
          f"{settings.get('sampler_steps') or 'default'} steps")
  return name + (f" ({', '.join(f'{k}={v}' for k, v in sorted(options.items()))})"
                 if options else "")


def get_preset(name: str, **changes: Any) -> Preset:
  """PRESETS[name] with `changes`; a sampler given without sampler_options replaces the
  preset's own (its respacing string picks a sampler of its own)."""
  if name not in PRESETS:
    raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
  changes = {k: v for k, v in changes.items() if v is not None}
  if changes.get("sampler") and "sampler_options" not in changes:
    changes["sampler_options"] = {}
  return dataclasses.replace(PRESETS[name], **changes)


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads 'configs/x.py' or 'configs/x.py:ARG' (relative to ROOT) like --config does."""
  path, _, arg = spec.partition(":")
  path = path if os.path.isabs(path) else os.path.join(ROOT, path)
  if ROOT not in sys.path:  # the config files import `configs.base`
    sys.path.insert(0, ROOT)
  module_spec = importlib.util.spec_from_file_location(
      "grid_config_" + os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def training_overrides(preset: Preset, data: str = "", extra: dict | None = None) -> dict:
  """The dotted config fields the grid sets on every model (on top of its config file)."""
  out = {"total_steps": preset.total_steps, "checkpoint.keep_period": preset.eval_every,
         # Evaluation runs from the kept checkpoints (dit_jax.grid), not inside the job.
         "eval.every_steps": 0}
  if data:
    out["data.dir"] = data
  out.update(extra or {})
  return out


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: dict) -> ml_collections.ConfigDict:
  for key, value in overrides.items():
    node = config
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    if last not in node:
      raise KeyError(f"config has no field {key!r}")
    node[last] = value
  return config


def model_config(preset: Preset, model: str, data: str = "",
                 extra: dict | None = None) -> ml_collections.ConfigDict:
  config = apply_overrides(load_config(preset.config_spec(model)),
                           training_overrides(preset, data, extra))
  every = config.checkpoint.every_steps
  if preset.eval_every and preset.eval_every % every:
    raise ValueError(f"{model}: checkpoint.every_steps={every} must divide the evaluation period "
                     f"{preset.eval_every}, or the checkpoints to evaluate are never written")
  return config
