"""Per-device peak bf16 FLOP/s, memory and bandwidths of the accelerators dit_jax targets.

Keyed by `device.device_kind` as JAX reports it: v5p reports "TPU v5", v5e "TPU v5 lite",
v6e "TPU v6 lite". Figures are per JAX device (one chip, or one core on v2/v3), from the
vendors' data sheets. Unknown kinds (CPUs) have none: no MFU is logged and the layout is
not chosen by memory.
"""

from __future__ import annotations

import dataclasses
from typing import Any

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  peak_flops: float      # dense bf16 FLOP/s
  memory: int            # bytes of HBM
  hbm_bandwidth: float   # bytes/s
  ici_bandwidth: float   # bytes/s out of one device over the chip interconnect (ICI / NVLink)


CHIPS = {
    "TPU v2": Chip(22.5e12, 8 * GiB, 0.35e12, 62e9),
    "TPU v3": Chip(61.5e12, 16 * GiB, 0.45e12, 82e9),
    "TPU v4": Chip(275e12, 32 * GiB, 1.2e12, 300e9),
    "TPU v5 lite": Chip(197e12, 16 * GiB, 0.82e12, 200e9),    # v5e
    "TPU v5e": Chip(197e12, 16 * GiB, 0.82e12, 200e9),
    "TPU v5": Chip(459e12, 95 * GiB, 2.76e12, 600e9),         # v5p
    "TPU v5p": Chip(459e12, 95 * GiB, 2.76e12, 600e9),
    "TPU v6 lite": Chip(918e12, 32 * GiB, 1.64e12, 448e9),    # v6e (Trillium)
    "TPU v6e": Chip(918e12, 32 * GiB, 1.64e12, 448e9),
    "NVIDIA A100-SXM4-40GB": Chip(312e12, 40 * 10**9, 1.56e12, 300e9),
    "NVIDIA A100-SXM4-80GB": Chip(312e12, 80 * 10**9, 2.04e12, 300e9),
    "NVIDIA A100": Chip(312e12, 80 * 10**9, 2.04e12, 300e9),
    "NVIDIA H100": Chip(989e12, 80 * 10**9, 3.35e12, 450e9),
    "NVIDIA H200": Chip(989e12, 141 * 10**9, 4.8e12, 450e9),
}


def chip(device: Any) -> Chip | None:
  """The table's entry for a device, or None (CPUs, unknown kinds)."""
  kind = getattr(device, "device_kind", "")
  if kind in CHIPS:
    return CHIPS[kind]
  # Longest known prefix ("NVIDIA H100 80GB HBM3" -> "NVIDIA H100"), never "TPU v5" for
  # "TPU v5 lite": exact TPU names are listed above.
  names = [n for n in CHIPS if kind.startswith(n + " ") or kind.startswith(n + "-")]
  return CHIPS[max(names, key=len)] if names else None


def peak_flops(device: Any) -> float | None:
  spec = chip(device)
  return spec.peak_flops if spec else None


def memory_bytes(device: Any) -> int | None:
  """Memory one device can use: the runtime's limit where it reports one, else the table."""
  try:
    stats = device.memory_stats()
    if stats and stats.get("bytes_limit"):
      return int(stats["bytes_limit"])
  except Exception:  # pylint: disable=broad-except  (AOT topology devices, CPUs)
    pass
  spec = chip(device)
  return spec.memory if spec else None


def roofline_seconds(spec: Chip, flops: float, accessed: float, collective: float) -> float:
  """Seconds: compute or HBM bound, plus the collectives with no overlap. `flops` should be at
  least the analytic count: XLA counts no FLOPs in Pallas kernels (splash attention)."""
  return (max(flops / spec.peak_flops, accessed / spec.hbm_bandwidth) +
          collective / spec.ici_bandwidth)
