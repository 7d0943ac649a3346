"""What every training objective provides, and the registry that finds one by name.

An objective is everything that differs between ways of training the same DiT on latents:
how its training inputs are drawn from a key (its time and noise), its loss and the metrics
it logs, the samplers it offers with their defaults, what time input the model sees, where a
guidance interval applies, and the record that checkpoint meta keeps of it. The train step,
dit_jax.sample, the periodic grids and evaluation, the grid runner and the planner ask the
objective; none of them knows which one it is. docs/objectives.md shows how to add one.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Mapping, Optional, Protocol, Sequence

import jax
import ml_collections

from dit_jax.guidance import ModelFn, Predicate

# run(model_fn, noise [N, H, W, C], key) -> samples [N, H, W, C]: a sampler bound to its steps.
Sampler = Callable[[ModelFn, jax.Array, jax.Array], jax.Array]

# Keywords of every objective's sampler; the others are each objective's own options.
SAMPLER_KEYS = ("sampler", "steps", "guidance_interval")


class Objective(Protocol):
  """The interface; `register` adds a class that implements it to the registry."""
  name: ClassVar[str]
  samplers: ClassVar[tuple[str, ...]]
  default_sampler: ClassVar[str]
  default_steps: ClassVar[Mapping[str, int]]
  # This objective's sampler options and their unset values (e.g. ADM's spacing 'time').
  sampler_options: ClassVar[Mapping[str, Any]]
  # dtype of the model's time input t, as `draw` and the samplers pass it.
  time_dtype: ClassVar[Any]
  # Whether the model predicts a learned variance beside its prediction (2C channels).
  learn_sigma: bool
  # Guidance trained in: sampling runs the conditional model alone (no CFG pass).
  trained_guidance: ClassVar[bool]
  # The loss differentiates the network forward (jax.jvp): attention needs a JVP rule.
  needs_jvp: ClassVar[bool]
  # DiT fields the objective's model needs (MeanFlow: h_embedder=True).
  model_fields: ClassVar[Mapping[str, Any]]
  # The loss drops labels to the model's null class itself.
  drops_labels: ClassVar[bool]

  @classmethod
  def config_fields(cls) -> ml_collections.ConfigDict:
    """This objective's fields of config.objective, with their defaults."""

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "Objective":
    """The objective of an experiment config."""

  @classmethod
  def from_meta(cls, record: Mapping[str, Any], meta: Mapping[str, Any]) -> "Objective":
    """The objective of a checkpoint: `record` is meta["objective"] (`to_meta`'s output)."""

  def draw(self, k_t: jax.Array, k_noise: jax.Array, x0: jax.Array) -> dict[str, jax.Array]:
    """The training inputs beside the data x0 [B, ...], from a key for its times (k_t; split
    it for several) and one for its noise: at least 't' [B] (the model's time input,
    `time_dtype`); per-example arrays with a leading [B] axis, so microbatches split them."""

  def training_losses(self, model_fn: ModelFn, x0: jax.Array,
                      inputs: Mapping[str, jax.Array]) -> tuple[jax.Array, dict]:
    """(loss [B], logged scalars) on data x0; `inputs` holds `draw`'s arrays and the batch's
    per-example inputs. model_fn(x, t) is the DiT's raw output [B, H, W, K]."""

  def sampler(self, sampler: Optional[str] = None, steps: Optional[int] = None,
              **options: Any) -> Sampler:
    """A bound sampler (None: the defaults); ValueError for a name or option it lacks."""

  def guidance_predicate(self, interval: Optional[Sequence[float]]) -> Optional[Predicate]:
    """Whether to guide at a model time t, from an interval in this objective's units; None:
    guide everywhere. ValueError for a malformed interval."""

  def sample(self, model_fn: ModelFn, noise: jax.Array, key: jax.Array,
             sampler: Optional[str] = None, steps: Optional[int] = None,
             **options: Any) -> jax.Array:
    """Samples [B, H, W, C] from noise [B, H, W, C]: `sampler(...)` run once."""

  def to_meta(self) -> dict:
    """A JSON record with 'name' from which `from_meta` rebuilds this objective."""


class ObjectiveBase:
  """What objectives share: `sample` through their bound sampler, and `from_config` /
  `from_meta` from their own config.objective fields through `cls._build(fields,
  learn_sigma, where)` (an objective whose settings live elsewhere overrides them); the
  defaults of the model-facing flags."""
  trained_guidance = False
  needs_jvp = False
  model_fields: Mapping[str, Any] = {}
  drops_labels = False

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> Any:
    fields = own_fields(cls, config.objective, "config.objective")
    return cls._build(fields, config.model.learn_sigma, "config.objective")

  @classmethod
  def from_meta(cls, record: Mapping[str, Any], meta: Mapping[str, Any]) -> Any:
    where = 'meta["objective"]'
    fields = own_fields(cls, record, where, strict=True)
    return cls._build(fields, meta.get("model_kwargs", {}).get("learn_sigma", True), where)

  def sample(self, model_fn: ModelFn, noise: jax.Array, key: jax.Array,
             sampler: Optional[str] = None, steps: Optional[int] = None,
             **options: Any) -> jax.Array:
    """Data [B, H, W, C] from noise [B, H, W, C] with `sampler(sampler, steps, **options)`."""
    return self.sampler(sampler, steps, **options)(model_fn, noise, key)


REGISTRY: dict[str, type] = {}


def register(cls: type) -> type:
  """Class decorator: makes `cls` (an Objective) available as config.objective.name."""
  if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
    raise ValueError(f"objective {cls.name!r} is registered twice")
  REGISTRY[cls.name] = cls
  return cls


def names() -> tuple[str, ...]:
  return tuple(REGISTRY)


def get(name: str, where: str) -> type:
  if name not in REGISTRY:
    raise ValueError(f"{where}: got {name!r}, expected one of {list(REGISTRY)}.")
  return REGISTRY[name]


def default_config() -> ml_collections.ConfigDict:
  """config.objective: the name (ADM by default) and every registered objective's fields."""
  c = ml_collections.ConfigDict()
  c.name = "adm"
  for cls in REGISTRY.values():
    for key, value in cls.config_fields().items():
      if key in c:
        raise ValueError(f"config.objective.{key} is declared by two objectives")
      c[key] = value
  return c


def own_fields(cls: type, fields: Mapping[str, Any], where: str,
               strict: bool = False) -> dict[str, Any]:
  """`cls`'s fields out of a config.objective or meta record, defaults filled in. strict
  (meta records): a field no objective of that name declares is an error."""
  defaults = dict(cls.config_fields())
  if strict:
    unknown = sorted(set(fields) - set(defaults) - {"name"})
    if unknown:
      raise ValueError(f"{where}: unknown fields {unknown} for the {cls.name} objective; "
                       f"expected some of {sorted(defaults)}.")
  return {k: fields.get(k, v) for k, v in defaults.items()}


def from_config(config: ml_collections.ConfigDict) -> Objective:
  """The objective of config.objective.name (absent: ADM). A field no registered objective
  declares is an error naming it (a typo would otherwise be ignored)."""
  fields = dict(config.get("objective") or {})
  known = set(default_config())
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ValueError(f"config.objective: unknown fields {unknown}; the registered objectives "
                     f"declare {sorted(known)}.")
  return get(fields.get("name", "adm"), "config.objective.name").from_config(config)


def from_meta(meta: Mapping[str, Any]) -> Objective:
  """The objective a checkpoint was trained with: meta["objective"], else ADM (checkpoints
  written before objectives were recorded)."""
  record = dict(meta.get("objective") or {})
  name = record.get("name", "adm")
  if name not in REGISTRY:
    raise ValueError(f'meta["objective"]["name"]: got {name!r}, expected one of '
                     f"{list(REGISTRY)}: the checkpoint was written by a newer dit_jax?")
  return REGISTRY[name].from_meta(record, meta)


def sampler_option_defaults() -> dict[str, Any]:
  """Every registered objective's sampler options at their unset values (config.sample and
  config.eval hold them all; each objective takes its own)."""
  out: dict[str, Any] = {}
  for cls in REGISTRY.values():
    for key, value in cls.sampler_options.items():
      out.setdefault(key, value)
  return out


def parse_options(items: Sequence[str]) -> dict[str, str]:
  """['S_churn=40', 'respacing=250'] -> {'S_churn': '40', 'respacing': '250'} (command-line
  options; `own_options` gives each the type of the option's unset value)."""
  out = {}
  for item in items:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
      raise ValueError(f"sampler option {item!r}: expected KEY=VALUE")
    out[key.strip()] = text.strip()
  return out


def _typed(key: str, value: Any, unset: Any) -> Any:
  """A command-line string as the type of the option's unset value (bool, int, float)."""
  if not isinstance(value, str) or isinstance(unset, str) or unset is None:
    return value
  try:
    if isinstance(unset, bool):
      if value.lower() not in ("true", "false"):
        raise ValueError(value)
      return value.lower() == "true"
    return type(unset)(value)
  except ValueError:
    raise ValueError(f"sampler option {key}={value!r}: expected a {type(unset).__name__}") \
        from None


def sampler_kwargs(section: Any) -> dict[str, Any]:
  """The sampler keywords of a config section (config.sample, config.eval) or a mapping:
  SAMPLER_KEYS and every registered objective's options that it holds."""
  keys = list(SAMPLER_KEYS)
  keys += [k for cls in REGISTRY.values() for k in cls.sampler_options if k not in keys]
  out = {k: section[k] for k in keys if k in section}
  if "sampler" in out:
    out["sampler"] = out["sampler"] or None
  if out.get("guidance_interval") is not None:
    out["guidance_interval"] = tuple(float(v) for v in out["guidance_interval"])
  return out


def own_options(objective: Objective, options: Mapping[str, Any]) -> dict[str, Any]:
  """`objective`'s sampler options out of `options`. Another objective's option is accepted
  at its unset value (config sections hold every objective's), else it is an error."""
  own = {}
  for key, value in options.items():
    if key in objective.sampler_options:
      own[key] = _typed(key, value, objective.sampler_options[key])
      continue
    owners = [cls for cls in REGISTRY.values() if key in cls.sampler_options]
    if not owners:
      raise ValueError(f"{key}={value!r} is no sampler option of any objective")
    if value is None or all(_typed(key, value, cls.sampler_options[key]) ==
                            cls.sampler_options[key] for cls in owners):
      continue
    raise ValueError(f"{key}={value!r} is a sampler option of the "
                     f"{'/'.join(cls.name for cls in owners)} objective; the {objective.name} "
                     f"objective samples with sampler (one of {list(objective.samplers)}) and "
                     f"steps" + (f", and takes {sorted(objective.sampler_options)}"
                                 if objective.sampler_options else ""))
  return own


def options_for(objective: Objective, options: Mapping[str, Any]) -> dict[str, Any]:
  """`options` without those another registered objective owns and `objective` lacks (a
  grid preset's ADM respacing string, say, when the model was trained as a flow)."""
  return {k: v for k, v in options.items()
          if k in SAMPLER_KEYS or k in objective.sampler_options
          or not any(k in cls.sampler_options for cls in REGISTRY.values())}


def check_sampler(objective: Objective, sampler: Optional[str]) -> str:
  """The sampler name (None or '': the default), or ValueError naming the choices."""
  sampler = sampler or objective.default_sampler
  if sampler not in objective.samplers:
    raise ValueError(f"sampler: got {sampler!r}, the {objective.name} objective offers "
                     f"{list(objective.samplers)}.")
  return sampler


def binned_means(values: jax.Array, bins: jax.Array, n: int, prefix: str) -> dict:
  """{prefix0: mean of values [B] where bins [B] == 0, ...}: 0 for an empty bin."""
  out = {}
  for i in range(n):
    mask = (bins == i).astype(values.dtype)
    out[f"{prefix}{i}"] = (mask * values).sum() / jax.numpy.maximum(mask.sum(), 1)
  return out


def per_example(c: jax.Array, x: jax.Array) -> jax.Array:
  """[B] -> [B, 1, ..., 1], broadcastable against x [B, ...]."""
  return c.reshape(c.shape + (1,) * (x.ndim - 1))


def draw_noise(key: jax.Array, x0: jax.Array) -> jax.Array:
  """Standard normal noise shaped like x0, float32: every objective's draw uses it."""
  return jax.random.normal(key, x0.shape, jax.numpy.float32)


def first_channels(model_fn: ModelFn) -> ModelFn:
  """The prediction of x's C channels from a model with more (a learn_sigma DiT: 2C)."""
  return lambda x, t: model_fn(x, t)[..., :x.shape[-1]]
