"""How latents are normalised before the DiT sees them, and how that is undone before decoding.

Two rules, one record:

- **A scale factor** (DiT's, for the SD-VAE): x = z * s, with s = 0.18215.
- **Per-channel statistics** (LightningDiT's `latents_stats`, for the VA-VAE): x = (z - mean_c) /
  std_c * s, with s LightningDiT's `latent_multiplier` (1.0). The statistics are the mean and
  standard deviation of each latent channel over the training set's posterior samples, both flips
  included. prepare_latents computes them exactly from the stored moments (`channel_moments`).

A record set's manifest holds `scale_factor` and, for the second rule, `latent_stats` ({"mean":
[C], "std": [C]}). A checkpoint's meta holds the same record as `latent_norm`, so sampling undoes
what training did, and a record set normalised otherwise than a checkpoint is refused by name.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

# The rule prepare_latents applies for --latent_norm=auto: per channel for the VAEs whose
# releases train that way (LightningDiT's VA-VAE), the scale factor otherwise.
RULES = ("auto", "scale", "channel")


@dataclasses.dataclass(frozen=True)
class LatentNorm:
  """x = (z - mean) / std * scale_factor per channel; mean/std None: x = z * scale_factor.
  Hashable, so it can be a static argument of a jitted function."""
  scale_factor: float = 1.0
  mean: tuple[float, ...] | None = None
  std: tuple[float, ...] | None = None

  def __post_init__(self):
    if (self.mean is None) != (self.std is None):
      raise ValueError("latent normalisation: mean and std go together (both or neither)")
    if not (math.isfinite(self.scale_factor) and self.scale_factor > 0):
      raise ValueError(f"latent normalisation: scale_factor must be positive, got {self.scale_factor}")
    if self.mean is not None:
      if len(self.mean) != len(self.std) or not self.mean:
        raise ValueError(f"latent normalisation: mean has {len(self.mean)} channels, std "
                         f"{len(self.std)}")
      if not all(math.isfinite(m) for m in self.mean) or not all(
          math.isfinite(s) and s > 0 for s in self.std):
        raise ValueError("latent normalisation: mean must be finite and std positive, got "
                         f"mean {list(self.mean)}, std {list(self.std)}")

  @property
  def per_channel(self) -> bool:
    return self.mean is not None

  @property
  def channels(self) -> int | None:
    return len(self.mean) if self.mean is not None else None

  def normalize(self, z: Any) -> Any:
    """Latents as the VAE gives them [..., C] -> as the DiT sees them (float32)."""
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    z = jnp.asarray(z, jnp.float32)
    if self.mean is None:
      return z * self.scale_factor
    self.check_channels(z.shape[-1], "the latents")
    mean, std = (jnp.asarray(v, jnp.float32) for v in (self.mean, self.std))
    return (z - mean) / std * self.scale_factor

  def denormalize(self, x: Any) -> Any:
    """The DiT's latents [..., C] -> the VAE's (float32): the inverse of `normalize`."""
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    x = jnp.asarray(x, jnp.float32)
    if self.mean is None:
      return x / self.scale_factor
    self.check_channels(x.shape[-1], "the latents")
    mean, std = (jnp.asarray(v, jnp.float32) for v in (self.mean, self.std))
    return x / self.scale_factor * std + mean

  def check_channels(self, channels: int, what: str) -> None:
    if self.mean is not None and channels != len(self.mean):
      raise ValueError(f"{what} have {channels} channels but the per-channel latent statistics "
                       f"have {len(self.mean)}")

  def to_meta(self) -> dict:
    out: dict[str, Any] = {"scale_factor": float(self.scale_factor)}
    if self.mean is not None:
      out.update(mean=[float(v) for v in self.mean], std=[float(v) for v in self.std])
    return out

  def describe(self) -> str:
    if self.mean is None:
      return f"scale factor {self.scale_factor:g}"
    return (f"per-channel statistics of {len(self.mean)} channels (mean "
            f"{_short(self.mean)}, std {_short(self.std)}) times {self.scale_factor:g}")

  def same_as(self, other: "LatentNorm", rtol: float = 1e-6) -> bool:
    """Equal rules and values (to `rtol`: the statistics go through JSON)."""
    if self.per_channel != other.per_channel or not _close([self.scale_factor],
                                                            [other.scale_factor], rtol):
      return False
    return not self.per_channel or (len(self.mean) == len(other.mean)
                                    and _close(self.mean, other.mean, rtol)
                                    and _close(self.std, other.std, rtol))


def _close(a: Sequence[float], b: Sequence[float], rtol: float) -> bool:
  return bool(np.allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=rtol,
                          atol=rtol))


def _short(values: Sequence[float]) -> str:
  shown = ", ".join(f"{v:.4g}" for v in values[:3])
  return f"[{shown}{', ...' if len(values) > 3 else ''}]"


def from_record(record: Mapping[str, Any], where: str,
                default_scale: float = 1.0) -> LatentNorm:
  """The rule of a manifest (its `scale_factor` and `latent_stats`) or of checkpoint meta (its
  `latent_norm`, else its `scale_factor`, the only field before per-channel statistics).
  Errors name `where` and the field."""
  if "latent_norm" in record:
    spec, field = record["latent_norm"], "latent_norm"
  else:
    spec = {"scale_factor": record.get("scale_factor", default_scale)}
    if "latent_stats" in record:
      stats = record["latent_stats"]
      if not isinstance(stats, Mapping) or set(stats) != {"mean", "std"}:
        raise ValueError(f"{where}: latent_stats must be {{'mean': [C], 'std': [C]}}, got "
                         f"{stats!r}")
      spec.update(stats)
    field = "latent_stats"
  try:
    mean, std = spec.get("mean"), spec.get("std")
    return LatentNorm(float(spec["scale_factor"]),
                      None if mean is None else tuple(float(v) for v in mean),
                      None if std is None else tuple(float(v) for v in std))
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f"{where}: bad {field} ({e})") from None


def of_data(info: Any, configured_scale: float | None = None) -> LatentNorm:
  """The rule training applies to a record set (a DataInfo): its manifest's, with
  config.vae.scale_factor (`configured_scale`, when set) in place of the recorded factor."""
  norm = from_record(info.manifest, "manifest.json", default_scale=info.scale_factor)
  if configured_scale:
    norm = dataclasses.replace(norm, scale_factor=float(configured_scale))
  norm.check_channels(int(info.latent_shape[-1]), "the records' latents")
  return norm


def as_norm(value: "LatentNorm | float") -> LatentNorm:
  """A LatentNorm, or a plain scale factor as one."""
  return value if isinstance(value, LatentNorm) else LatentNorm(float(value))


def check_same(data: LatentNorm, data_where: str, trained: LatentNorm, trained_where: str) -> None:
  """Refuses a record set whose normalisation differs from the checkpoint's, naming both."""
  if not data.same_as(trained):
    raise ValueError(
        f"{data_where} normalises latents by {data.describe()}, but {trained_where} was trained "
        f"on latents normalised by {trained.describe()}: the model would see inputs on another "
        "scale. Use the record set it was trained on, or a new workdir")


# Moments of the stored latents, per channel, for the statistics.

def channel_moments(mean: np.ndarray, std: np.ndarray) -> dict:
  """Per-channel sums over a shard's posteriors (mean/std [n, 2, h, w, c], both flips): the
  count of values, sum E[z] and sum E[z^2] = mean^2 + std^2 (exact moments of the posterior
  samples training draws, not of one draw)."""
  m = np.asarray(mean, np.float64).reshape(-1, mean.shape[-1])
  s = np.asarray(std, np.float64).reshape(-1, std.shape[-1])
  return {"count": int(m.shape[0]), "sum": m.sum(0).tolist(),
          "sum_sq": (m * m + s * s).sum(0).tolist()}


def stats_from_moments(moments: Iterable[Mapping[str, Any]]) -> dict:
  """Sums shards' channel_moments -> {"mean": [C], "std": [C]} over the whole record set."""
  count, total, total_sq = 0, None, None
  for m in moments:
    count += int(m["count"])
    s, sq = np.asarray(m["sum"], np.float64), np.asarray(m["sum_sq"], np.float64)
    total = s if total is None else total + s
    total_sq = sq if total_sq is None else total_sq + sq
  if not count:
    raise ValueError("no latents to compute per-channel statistics from")
  mean = total / count
  var = np.maximum(total_sq / count - mean * mean, 0.0)
  return {"mean": mean.tolist(), "std": np.sqrt(var).tolist()}
