"""Per-device peak bf16 FLOP/s and memory of the accelerators dit_jax targets.

Keyed by `device.device_kind` as JAX reports it: v5p reports "TPU v5", v5e "TPU v5 lite",
v6e "TPU v6 lite". Figures are per JAX device (one chip, or one core on v2/v3), from the
vendors' data sheets. Unknown kinds (CPUs) have none: no MFU is logged and the layout is
not chosen by memory.
"""

from __future__ import annotations

from typing import Any

GiB = 2**30

# device_kind: (dense bf16 FLOP/s, memory bytes) per JAX device.
CHIPS = {
    "TPU v2": (22.5e12, 8 * GiB),
    "TPU v3": (61.5e12, 16 * GiB),
    "TPU v4": (275e12, 32 * GiB),
    "TPU v5 lite": (197e12, 16 * GiB),    # v5e
    "TPU v5e": (197e12, 16 * GiB),
    "TPU v5": (459e12, 95 * GiB),         # v5p
    "TPU v5p": (459e12, 95 * GiB),
    "TPU v6 lite": (918e12, 32 * GiB),    # v6e (Trillium)
    "TPU v6e": (918e12, 32 * GiB),
    "NVIDIA A100-SXM4-40GB": (312e12, 40 * 10**9),
    "NVIDIA A100-SXM4-80GB": (312e12, 80 * 10**9),
    "NVIDIA A100": (312e12, 80 * 10**9),
    "NVIDIA H100": (989e12, 80 * 10**9),
    "NVIDIA H200": (989e12, 141 * 10**9),
}


def _spec(device: Any) -> tuple[float, int] | None:
  kind = getattr(device, "device_kind", "")
  if kind in CHIPS:
    return CHIPS[kind]
  # Longest known prefix ("NVIDIA H100 80GB HBM3" -> "NVIDIA H100"), never "TPU v5" for
  # "TPU v5 lite": exact TPU names are listed above.
  names = [n for n in CHIPS if kind.startswith(n + " ") or kind.startswith(n + "-")]
  return CHIPS[max(names, key=len)] if names else None


def peak_flops(device: Any) -> float | None:
  spec = _spec(device)
  return spec[0] if spec else None


def memory_bytes(device: Any) -> int | None:
  """Memory one device can use: the runtime's limit where it reports one, else the table."""
  try:
    stats = device.memory_stats()
    if stats and stats.get("bytes_limit"):
      return int(stats["bytes_limit"])
  except Exception:  # pylint: disable=broad-except  (AOT topology devices, CPUs)
    pass
  spec = _spec(device)
  return spec[1] if spec else None
