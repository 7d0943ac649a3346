"""How close do the flow samplers come to the exact answer? Gaussian data, exact models.

  python benchmarks/flow_closed_form.py

For data x1 ~ N(0.5, 0.3^2 I) the Bayes-optimal velocity, score and noise predictions of every
path are known in closed form, and the probability-flow ODE is affine: x(t1) = m1 + s1/s0
(x(t0) - m0) with (m, s) the marginal's mean and std. The table gives, per path and ODE method,
the largest error over 4096 x 8 values against that map and the model calls (NFE, counted on
the host); then each SDE sampler's sample mean and std against the data's (0.5, 0.3).
"""

import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dit_jax import flow  # noqa: E402

MU, S = 0.5, 0.3


def exact_velocity(path):
  def fn(x, t):
    t = t.reshape(-1, 1, 1, 1)
    (a, da), (s, ds) = path.alpha(t), path.sigma(t)
    var = a ** 2 * S ** 2 + s ** 2
    return da * MU + (da * a * S ** 2 + ds * s) * (x - a * MU) / var
  return fn


def marginal(path, t):
  a, s = float(path.alpha(jnp.float32(t))[0]), float(path.sigma(jnp.float32(t))[0])
  return a * MU, math.sqrt(a ** 2 * S ** 2 + s ** 2)


def counted(fn, calls):
  def wrapped(x, t):
    jax.debug.callback(lambda: calls.append(1))
    return fn(x, t)
  return wrapped


def main():
  x = jax.random.normal(jax.random.PRNGKey(0), (4096, 2, 2, 2))
  print("ODE: max |x - exact| over 32768 values (velocity models)")
  print(f"{'path':>6} {'method':>7} {'points':>6} {'NFE':>5} {'max error':>10}")
  for name in flow.PATHS:
    tr = flow.create_transport(name, "velocity")
    t0, t1 = tr.interval(sampling=True)
    (m0, s0), (m1, s1) = marginal(tr.path, t0), marginal(tr.path, t1)
    want = m1 + s1 / s0 * (np.asarray(x) - m0)
    for method, points in (("euler", 51), ("euler", 251), ("heun2", 26), ("heun2", 126),
                           ("dopri5", 2)):
      calls = []
      fn = counted(exact_velocity(tr.path), calls)
      got = jax.jit(lambda x: tr.sample_ode(fn, x, method=method, num_steps=points))(x)
      got.block_until_ready()
      print(f"{name:>6} {method:>7} {points if method != 'dopri5' else '-':>6} {len(calls):>5} "
            f"{np.abs(np.asarray(got) - want).max():10.2e}")
  print(f"\nSDE: sample mean / std of 32768 values (data: {MU} / {S}), 250 points, "
        "diffusion 'sigma', last step 'mean' 0.04")
  for name in flow.PATHS:
    tr = flow.create_transport(name, "velocity")
    for method in flow.SDE_METHODS:
      got = jax.jit(lambda x, k: tr.sample_sde(exact_velocity(tr.path), x, k, method=method))(
          x, jax.random.PRNGKey(1))
      print(f"{name:>6} {method:>6}: {float(got.mean()):.4f} / {float(got.std()):.4f}")


if __name__ == "__main__":
  main()
