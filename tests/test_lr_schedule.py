"""config.optim's learning-rate schedules against their closed forms."""

import math

import pytest

from configs import base
from dit_jax import step as dit_step
from dit_jax.lr_schedule import learning_rate_schedule


def optim_config(**optim):
  c = base.get_config()
  c.total_steps = 1000
  for k, v in optim.items():
    c.optim[k] = v
  return c


def test_default_is_the_release_constant():
  schedule = learning_rate_schedule(base.get_config())
  for step in (0, 1, 5_000, 399_999):
    assert float(schedule(step)) == pytest.approx(1e-4, rel=1e-6)
  # The optimizer the train step uses logs the same schedule.
  _, logged = dit_step.create_optimizer(base.get_config())
  assert float(logged(123)) == pytest.approx(1e-4, rel=1e-6)


def test_warmup_then_constant():
  schedule = learning_rate_schedule(optim_config(learning_rate=1e-3, warmup_steps=100))
  for step in (0, 25, 50, 100, 101, 999, 5000):
    assert float(schedule(step)) == pytest.approx(1e-3 * min(step / 100, 1.0), abs=1e-9)


@pytest.mark.parametrize("kind", ["cosine", "linear"])
@pytest.mark.parametrize("warmup,decay_steps", [(0, 0), (100, 0), (100, 600)])
def test_decay_to_floor(kind, warmup, decay_steps):
  peak, floor = 2e-3, 1e-4
  schedule = learning_rate_schedule(optim_config(
      learning_rate=peak, warmup_steps=warmup, schedule=kind, decay_steps=decay_steps,
      min_learning_rate=floor))
  end = decay_steps or 1000

  def expected(step):
    if step < warmup:
      return peak * step / warmup
    frac = min((step - warmup) / (end - warmup), 1.0)
    if kind == "cosine":
      return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * frac))
    return peak + (floor - peak) * frac

  for step in sorted({0, 1, warmup // 2, warmup, warmup + 1, (warmup + end) // 2, end - 1, end,
                      end + 500}):
    assert float(schedule(step)) == pytest.approx(expected(step), rel=1e-5, abs=1e-10), step
  assert float(schedule(end + 10_000)) == pytest.approx(floor, rel=1e-5)


def test_bad_schedule_names_the_field():
  with pytest.raises(ValueError, match="config.optim.schedule"):
    learning_rate_schedule(optim_config(schedule="step"))
  with pytest.raises(ValueError, match="config.optim.decay_steps"):
    learning_rate_schedule(optim_config(schedule="cosine", warmup_steps=100, decay_steps=50))
