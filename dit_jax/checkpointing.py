"""Orbax checkpoints of the training state, written atomically, restored with fallback.

Layout: WORKDIR/checkpoints/<step>/{train, ema, meta}
  train: {step, params, opt_state, rng}   everything needed to continue training
  ema:   the EMA parameters                what the sampler loads (alone, cheaply)
  meta:  JSON: step, data stream position, model name and kwargs

Orbax writes each checkpoint into a temporary directory and renames it when complete, so
a run killed at any moment leaves only whole checkpoints. Restoring takes target shardings,
so a checkpoint can be restored onto a different mesh or number of devices.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorflow as tf
from jax.experimental import multihost_utils


def _abspath(path: str) -> str:
  return path if "://" in path else os.path.abspath(path)


def create_manager(workdir: str, keep: int = 3, async_save: bool = True,
                   keep_period: int | None = None) -> ocp.CheckpointManager:
  """`keep` newest checkpoints, plus every one whose step is a multiple of `keep_period`."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, keep_period=keep_period or None, create=True,
      enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
  return ocp.CheckpointManager(_abspath(os.path.join(workdir, "checkpoints")), options=options,
                               item_names=("train", "ema", "meta"))


def save(mngr: ocp.CheckpointManager, step: int, train: Any, ema: Any, meta: dict) -> None:
  mngr.save(step, args=ocp.args.Composite(
      train=ocp.args.StandardSave(train), ema=ocp.args.StandardSave(ema),
      meta=ocp.args.JsonSave(meta)), force=True)


def _abstract(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def restore_latest(mngr: ocp.CheckpointManager, abstract_train: Any, train_shardings: Any,
                   abstract_ema: Any, ema_shardings: Any,
                   model_kwargs: dict | None = None) -> tuple[Any, Any, dict] | None:
  """Restores the newest readable checkpoint; falls back to older ones if it is unreadable.

  A checkpoint of a different architecture (`model_kwargs` differ) is an error, not a fallback.
  Every process must succeed on the same step; a failure is retried once (transient storage
  errors) before the step is set aside. Returns (train, ema, meta), or None if there is none.
  """
  steps = sorted(mngr.all_steps(), reverse=True)
  if steps and model_kwargs is not None:
    _check_model(mngr, steps[0], model_kwargs)
  errors = []
  for step in steps:
    out, err = None, None
    for attempt in range(2):
      try:
        out = mngr.restore(step, args=ocp.args.Composite(
            train=ocp.args.StandardRestore(_abstract(abstract_train, train_shardings)),
            ema=ocp.args.StandardRestore(_abstract(abstract_ema, ema_shardings)),
            meta=ocp.args.JsonRestore()))
        break
      except Exception as e:  # pylint: disable=broad-except
        err = e
        if attempt == 0:
          time.sleep(5)
    ok = out is not None
    if jax.process_count() > 1:
      ok = bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))
    if ok:
      if errors:
        _set_aside(mngr, [s for s in steps if s > step])
        logging.warning("Restored step %d after skipping %d unreadable checkpoint(s)", step,
                        len(errors))
      return out["train"], out["ema"], out["meta"]
    # A damaged checkpoint must not lose the run: say so loudly and use the previous one.
    msg = f"{mngr.directory}/{step}: cannot be restored ({type(err).__name__}: {err})"
    logging.error("%s; falling back to an older checkpoint", msg[:2000])
    errors.append(msg)
  if errors:
    raise RuntimeError("No checkpoint in the workdir could be restored:\n" + "\n".join(errors))
  return None


def _check_model(mngr: ocp.CheckpointManager, step: int, model_kwargs: dict) -> None:
  try:
    meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  except Exception:  # pylint: disable=broad-except
    return  # unreadable: restore_latest falls back past it
  saved = meta.get("model_kwargs", {})
  diff = {k: (saved.get(k), v) for k, v in model_kwargs.items() if saved.get(k) != v}
  if diff:
    raise ValueError(
        f"{mngr.directory}/{step} holds a checkpoint of another model ({meta.get('model')}; "
        + ", ".join(f"{k}={a} there, {b} now" for k, (a, b) in diff.items())
        + "): use another workdir")


def _set_aside(mngr: ocp.CheckpointManager, steps: list[int]) -> None:
  """Moves unreadable checkpoints to checkpoints_unreadable/ (kept for inspection) so the
  run can write those steps again."""
  root = str(mngr.directory)
  dest = root.rstrip("/") + "_unreadable"
  if jax.process_index() == 0:
    tf.io.gfile.makedirs(dest)
    for step in steps:
      target = os.path.join(dest, f"{step}-{int(time.time())}")
      tf.io.gfile.rename(os.path.join(root, str(step)), target)
      logging.warning("Moved unreadable checkpoint %s/%d to %s", root, step, target)
  multihost_utils.sync_global_devices("set aside unreadable checkpoints")
  mngr.reload()


def restore_ema(workdir: str, abstract_ema: Any, shardings: Any,
                step: int | None = None) -> tuple[Any, dict]:
  """Restores only the EMA parameters and meta of a training workdir (for sampling)."""
  path = _abspath(os.path.join(workdir, "checkpoints"))
  mngr = ocp.CheckpointManager(path, item_names=("train", "ema", "meta"),
                               options=ocp.CheckpointManagerOptions(create=False))
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"{path}: no checkpoint found (train first, or pass a converted "
                            "release checkpoint with --checkpoint)")
  out = mngr.restore(step, args=ocp.args.Composite(
      ema=ocp.args.StandardRestore(_abstract(abstract_ema, shardings)),
      meta=ocp.args.JsonRestore()))
  mngr.close()
  return out["ema"], out["meta"]


def load_ema_model(workdir: str, sharding: Any, step: int | None = None,
                   dtype: Any = None) -> tuple[Any, Any, dict]:
  """(DiT, EMA params placed with `sharding`, meta) of a training workdir's checkpoint."""
  from dit_jax import models  # pylint: disable=import-outside-toplevel
  meta = read_meta(workdir, step)
  model = models.DiT(**meta["model_kwargs"], **({"dtype": dtype} if dtype else {}))
  shapes = models.param_shapes(model)
  params, meta = restore_ema(workdir, shapes, jax.tree.map(lambda _: sharding, shapes),
                             meta["step"])
  logging.info("Loaded EMA weights of %s at step %d from %s", meta["model"], meta["step"], workdir)
  return model, params, meta


def read_meta(workdir: str, step: int | None = None) -> dict:
  path = _abspath(os.path.join(workdir, "checkpoints"))
  mngr = ocp.CheckpointManager(path, item_names=("train", "ema", "meta"),
                               options=ocp.CheckpointManagerOptions(create=False))
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"{path}: no checkpoint found")
  meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  mngr.close()
  return meta
