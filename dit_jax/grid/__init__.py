"""The paper's scaling grid end to end: run (train + FID along training) and report.

  python -m dit_jax.grid run --preset=mini --root=/tmp/dit_grid_mini
  python -m dit_jax.grid report --root=/tmp/dit_grid_mini

presets.py: the 'paper' and 'mini' grids; runner.py: idempotent training and evaluation of any
subset; report.py: results.csv, report.md and the figures. docs/grid.md: the full procedure.
"""

from dit_jax.grid.presets import PRESETS, Preset, get_preset
from dit_jax.grid.report import write_report
from dit_jax.grid.runner import run

__all__ = ["PRESETS", "Preset", "get_preset", "run", "write_report"]
