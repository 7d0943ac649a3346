"""Orbax checkpoints of the training state, written atomically, restored with fallback.

Layout: WORKDIR/checkpoints/<step>/{train, ema, meta}
  train: {step, params, opt_state, rng}   everything needed to continue training
  ema:   the EMA parameters                what the sampler loads (alone, cheaply)
  meta:  JSON: step, data stream position, model name and kwargs, and the integrity digests

One job per workdir (dit_jax/workdir_lock.py). Orbax writes each checkpoint into a temporary directory and renames it when complete, so
a run killed at any moment leaves only whole checkpoints. Restoring takes target shardings,
so a checkpoint can be restored onto a different mesh or number of devices.

Integrity (dit_jax/integrity.py): `save` refuses a state holding NaN/inf and records a
layout-independent digest of every array in `meta`; `restore_latest` recomputes the digests
and the finiteness of what it read. A checkpoint that cannot be read for a reason that may
pass (an unavailable or slow store, a reset connection, a 5xx) is retried; any other (data loss,
a missing item, file or permission, a truncated file, meta that is not UTF-8 or not ours,
digests that do not match) is moved to `checkpoints_unreadable/` at once (`is_transient`), and
the previous one is used. A save that fails (a full disk) stops the job at the
next step with one error naming the path and the disk; the checkpoints before it stay, and
Orbax removes the unfinished `<step>.orbax-checkpoint-tmp*` directory on the next start.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import time
import weakref
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorflow as tf
from jax.experimental import multihost_utils

from dit_jax import integrity

# Default restore attempts of one checkpoint before it is set aside, and the first back-off
# delay in seconds, multiplied by 4 after each failed attempt (2, 8, 32 s: 42 s in all).
RESTORE_ATTEMPTS = 4
RESTORE_BACKOFF_S = 2.0


class CheckpointIntegrityError(ValueError):
  """A checkpoint's arrays do not match the digests recorded when it was written."""


class CheckpointMetaError(ValueError):
  """A checkpoint's meta is not this project's (or not JSON): the checkpoint is unreadable."""


class CheckpointSaveError(RuntimeError):
  """Writing a checkpoint failed (a full disk, a lost bucket permission)."""


def _abspath(path: str) -> str:
  return path if "://" in path else os.path.abspath(path)


_replica_parallel: bool | None = None  # what _configure_array_writes registered


def _configure_array_writes() -> None:
  """Replica-parallel writes only where several hosts share the work.

  Orbax splits each replicated array across its replicas so that every host writes a part;
  that costs one small compiled slice per array shape and replica on the first save (8.5 s
  for the demo on 8 CPU devices, more on a pod slice), paid again after every restart and
  on the SIGTERM path if no checkpoint was written before. One process writes everything
  anyway, so there it is off; with several processes only arrays of 1 MiB or more per
  replica are split.
  """
  global _replica_parallel
  multi = jax.process_count() > 1
  if _replica_parallel == multi:
    return
  _replica_parallel = multi
  ocp.type_handlers.register_type_handler(
      jax.Array, ocp.type_handlers.ArrayHandler(
          use_replica_parallel=multi, min_slice_bytes_for_replica_parallel=2**20),
      override=True)


def create_manager(workdir: str, keep: int = 3, async_save: bool = True,
                   keep_period: int | None = None) -> ocp.CheckpointManager:
  """Checkpoints under WORKDIR/checkpoints: the newest `keep`, plus every step that is a
  multiple of `keep_period` (e.g. 50_000 for the grid's FID-vs-steps), kept for good."""
  _configure_array_writes()
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, keep_period=keep_period or None, create=True,
      enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
  return ocp.CheckpointManager(_abspath(os.path.join(workdir, "checkpoints")), options=options,
                               item_names=("train", "ema", "meta"))


def summarize(train: Any, ema: Any) -> dict[str, dict[str, tuple[str, bool]]]:
  """Digests and finiteness of both items (see dit_jax/integrity.py); one compile per state
  layout, so calling it once at start-up keeps compilation off the save (and SIGTERM) path."""
  return {"train": integrity.summarize(train), "ema": integrity.summarize(ema)}


def save(mngr: ocp.CheckpointManager, step: int, train: Any, ema: Any, meta: dict) -> None:
  """Writes a checkpoint, refusing a non-finite state; records integrity digests in `meta`."""
  summary = summarize(train, ema)
  bad = [f"{item}{path}" for item, s in summary.items() for path in integrity.nonfinite(s)]
  if bad:
    raise FloatingPointError(
        f"step {step}: the state holds NaN/inf in {len(bad)} array(s) ({', '.join(bad[:3])}"
        f"{', ...' if len(bad) > 3 else ''}); not saved, the checkpoints in {mngr.directory} "
        "are left as they were")
  meta = dict(meta, integrity={item: integrity.digests(s) for item, s in summary.items()})
  finish(mngr)  # a previous save's failure is reported as such
  _saving[mngr] = step
  try:
    mngr.save(step, args=ocp.args.Composite(
        train=ocp.args.StandardSave(train), ema=ocp.args.StandardSave(ema),
        meta=ocp.args.JsonSave(meta)), force=True)
  except Exception as e:  # pylint: disable=broad-except
    raise _save_error(mngr, step, e) from None


# The step each manager is writing, to name it when the background write fails.
_saving: "weakref.WeakKeyDictionary[ocp.CheckpointManager, int]" = weakref.WeakKeyDictionary()


def _chain(err: BaseException):
  while err is not None:
    yield err
    err = err.__cause__ or err.__context__


def _disk_of(path: str) -> str:
  """'the disk mounted at /mnt (12 MiB free)' for a local path, else the path's bucket."""
  if "://" in path:
    return path.split("/", 3)[2] if path.count("/") >= 2 else path
  mount = os.path.abspath(path)
  while not os.path.exists(mount):
    mount = os.path.dirname(mount)
  try:
    free = shutil.disk_usage(mount).free
  except OSError:
    free = None
  while not os.path.ismount(mount):
    mount = os.path.dirname(mount)
  return f"the disk mounted at {mount}" + (f" ({free / 2**20:.0f} MiB free)" if free is not None
                                           else "")


def _save_error(mngr: ocp.CheckpointManager, step: int | None,
                err: BaseException) -> CheckpointSaveError:
  where = f"{mngr.directory}/{step}" if step is not None else str(mngr.directory)
  full = any((isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT))
             or "No space left" in str(e) or "Disk quota exceeded" in str(e)
             for e in _chain(err))
  kept = [s for s in mngr.all_steps() if s != step]
  if full:
    what = f"no space left on {_disk_of(str(mngr.directory))}: free some space"
  else:
    what = f"{_short(err)}: fix the storage"
  return CheckpointSaveError(
      f"Saving checkpoint {where} failed, {what}, then run again to resume (kept: "
      f"{', '.join(map(str, kept)) or 'no checkpoint'})")


def finish(mngr: ocp.CheckpointManager) -> None:
  """Waits for the checkpoint being written; CheckpointSaveError if writing it failed."""
  try:
    mngr.wait_until_finished()
  except Exception as e:  # pylint: disable=broad-except
    raise _save_error(mngr, _saving.get(mngr), e) from None


def check_saves(mngr: ocp.CheckpointManager) -> None:
  """CheckpointSaveError if a background save has failed; does not wait (called every step,
  so that a full disk stops the job at the save that failed, not at the next one)."""
  if not mngr.is_saving_in_progress():
    finish(mngr)


def finish_quietly(mngr: ocp.CheckpointManager) -> None:
  """`finish` while another error is already stopping the job: a failed save is logged."""
  try:
    finish(mngr)
  except CheckpointSaveError as e:
    logging.error("%s", e)


def verify(item: str, tree: Any, meta: dict, where: str) -> None:
  """Raises CheckpointIntegrityError if `tree` (item 'train' or 'ema' of a restored
  checkpoint) differs from the digests in its meta, or holds NaN/inf."""
  summary = integrity.summarize(tree)
  saved = meta.get("integrity", {}).get(item)
  if saved is None:
    logging.warning("%s: written without integrity digests; %s not verified", where, item)
  else:
    wrong = integrity.mismatches(summary, saved)
    if wrong:
      raise CheckpointIntegrityError(
          f"{len(wrong)} array(s) of {item} differ from the digests recorded at save time "
          f"({', '.join(wrong[:3])}{', ...' if len(wrong) > 3 else ''}): the files were "
          "damaged or modified after writing")
  bad = integrity.nonfinite(summary)
  if bad:
    raise CheckpointIntegrityError(f"{item} holds NaN/inf in {', '.join(bad[:3])}")


def _abstract(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def restore_latest(mngr: ocp.CheckpointManager, abstract_train: Any, train_shardings: Any,
                   abstract_ema: Any, ema_shardings: Any,
                   model_kwargs: dict | None = None, attempts: int = RESTORE_ATTEMPTS,
                   backoff_s: float = RESTORE_BACKOFF_S,
                   objective: dict | None = None) -> tuple[Any, Any, dict] | None:
  """Restores and verifies the newest good checkpoint, falling back to older ones.

  A checkpoint of a different architecture (`model_kwargs` differ) or trained with another
  objective (`objective`: the to_meta() record of the run's) is an error, not a fallback.
  Each checkpoint is tried up to `attempts` times with back-off (transient storage errors
  on any host), every process agreeing on each outcome; one that still cannot be read, or
  whose arrays do not match their recorded digests, is moved to checkpoints_unreadable/.
  Returns (train, ema, meta), or None if there is no checkpoint.
  """
  steps = sorted(mngr.all_steps(), reverse=True)
  if steps and (model_kwargs is not None or objective is not None):
    _check_model(mngr, steps[0], model_kwargs or {}, objective)
  failed: list[tuple[int, str]] = []
  for step in steps:
    out, reason = _restore_step(mngr, step, _abstract(abstract_train, train_shardings),
                                _abstract(abstract_ema, ema_shardings), attempts, backoff_s)
    if out is not None:
      if failed:
        _set_aside(mngr, [s for s, _ in failed])
        logging.warning("Restored step %d after setting aside %d bad checkpoint(s)", step,
                        len(failed))
      return out["train"], out["ema"], out["meta"]
    logging.error("%s/%d cannot be restored (%s); trying the previous checkpoint",
                  mngr.directory, step, reason)
    failed.append((step, reason))
  if failed:
    _set_aside(mngr, [s for s, _ in failed])
    raise RuntimeError(
        f"No checkpoint in {mngr.directory} could be restored: "
        + "; ".join(f"step {s}: {r}" for s, r in failed)
        + f". They were moved to {_unreadable_dir(mngr)} for inspection. Run again to train "
        "from scratch, or move a checkpoint back if its storage error has cleared.") from None
  return None


def _short(err: BaseException) -> str:
  """One line for the log: the innermost cause (TensorStore's own error, not Orbax's wrapper)."""
  while err.__cause__ is not None:
    err = err.__cause__
  first = str(err).strip().splitlines()[0] if str(err).strip() else ""
  return f"{type(err).__name__}: {first[:300]}"


def _agree(ok: bool) -> bool:
  if jax.process_count() > 1:
    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))
  return ok


def _restore_step(mngr: ocp.CheckpointManager, step: int, train: Any, ema: Any, attempts: int,
                  backoff_s: float) -> tuple[dict | None, str]:
  """One checkpoint, read and verified, retried with back-off; (out, "") or (None, reason)."""
  where = f"{mngr.directory}/{step}"
  delay, reason = backoff_s, ""
  for attempt in range(1, attempts + 1):
    out, err = None, None
    try:
      read = mngr.restore(step, args=ocp.args.Composite(
          train=ocp.args.StandardRestore(train), ema=ocp.args.StandardRestore(ema),
          meta=ocp.args.JsonRestore()))
      check_meta(read["meta"], step)
      out = read
    except Exception as e:  # pylint: disable=broad-except
      err = e
    if _agree(out is not None):
      try:  # collective (all processes run it), hence only once every read succeeded
        verify("train", out["train"], out["meta"], where)
        verify("ema", out["ema"], out["meta"], where)
      except CheckpointIntegrityError as e:
        err = e
      if _agree(err is None):
        return out, ""
    reason = _short(err) if err is not None else "failed on another process"
    logging.debug("%s: restore attempt %d failed", where, attempt, exc_info=err)
    # Damaged files read the same bytes again: retry only errors that may be transient.
    transient = err is not None and is_transient(err)
    if attempt == attempts or _agree(not transient):  # nobody may retry usefully
      break
    logging.warning("%s: restore attempt %d/%d failed (%s); retrying in %.0fs", where, attempt,
                    attempts, reason, delay)
    time.sleep(delay)
    delay *= 4
  return None, reason


# Status codes (TensorStore, absl, gRPC) of errors that reading again cannot fix, and of
# those that can pass.
_PERMANENT_CODES = ("DATA_LOSS", "OUT_OF_RANGE", "NOT_FOUND", "INVALID_ARGUMENT",
                    "FAILED_PRECONDITION", "ALREADY_EXISTS", "UNIMPLEMENTED", "PERMISSION_DENIED",
                    "UNAUTHENTICATED")
_TRANSIENT_CODES = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED", "RESOURCE_EXHAUSTED")
# OS errors of a store or network file system that may pass (EIO: NFS, gcsfuse).
_TRANSIENT_ERRNOS = {errno.EIO, errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET,
                     errno.ECONNREFUSED, errno.ECONNABORTED, errno.ENETDOWN, errno.ENETUNREACH,
                     errno.EHOSTUNREACH, errno.ESTALE, errno.EBUSY, errno.EINTR}
# A store's HTTP answer that may pass: 5xx, 408 (timeout) and 429 (rate limit).
_TRANSIENT_HTTP = re.compile(r"(HTTP|response|status)[^0-9]{0,20}(5\d\d|408|429)\b|"
                             r"\b(5\d\d|408|429) (Internal|Bad Gateway|Service|Gateway|"
                             r"Request Timeout|Too Many)", re.I)
_TRANSIENT_TEXT = ("connection reset", "connection refused", "timed out", "temporarily unavailable",
                   "service unavailable", "transient")


def _kind(e: BaseException) -> bool | None:
  """True: may pass; False: permanent; None: this error alone does not tell."""
  text = str(e)
  if isinstance(e, (CheckpointIntegrityError, CheckpointMetaError, FileNotFoundError,
                    IsADirectoryError, NotADirectoryError, PermissionError, KeyError,
                    UnicodeError, json.JSONDecodeError)):
    return False
  if any(f"{code}:" in text for code in _PERMANENT_CODES):
    return False
  if isinstance(e, (TimeoutError, ConnectionError, tf.errors.UnavailableError,
                    tf.errors.DeadlineExceededError, tf.errors.AbortedError)):
    return True
  if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
    return True
  if (any(f"{code}:" in text for code in _TRANSIENT_CODES) or _TRANSIENT_HTTP.search(text)
      or any(t in text.lower() for t in _TRANSIENT_TEXT)):
    return True
  return None


def is_transient(err: BaseException) -> bool:
  """Whether reading a checkpoint again may succeed: only for I/O errors that can pass (a
  timeout, a reset or refused connection, a store's 5xx/408/429, an UNAVAILABLE or
  DEADLINE_EXCEEDED status). Everything else is permanent and set aside at once: a missing
  item (a half-written step) or file, undecodable or non-UTF-8 meta, meta that is not ours,
  a digest mismatch, truncation, a denied permission, and any error not recognised."""
  for e in _chain(err):  # the outermost error that tells decides
    verdict = _kind(e)
    if verdict is not None:
      return verdict
  return False


def check_meta(meta: Any, step: int) -> None:
  """CheckpointMetaError unless `meta` is a dit_jax checkpoint meta of `step`."""
  problem = None
  if not isinstance(meta, dict):
    problem = f"a JSON {type(meta).__name__}, not an object"
  elif not isinstance(meta.get("model_kwargs"), dict):
    problem = "no model_kwargs"
  elif meta.get("step") != step:
    problem = f"step {meta.get('step')!r}, not {step}"
  if problem:
    raise CheckpointMetaError(f"its meta is not a dit_jax checkpoint's ({problem})")


# model_kwargs that choose a parameter layout, not an architecture: not compared (the caller
# restores in the saved layout and converts; see latest_model_kwargs).
LAYOUT_KWARGS = ("scan_layers",)


def _read_meta(mngr: ocp.CheckpointManager, step: int | None,
               missing_ok: bool = False) -> dict | None:
  """The meta item of checkpoint `step` (None: the newest). With missing_ok, None where there
  is no checkpoint or its meta cannot be read (restore_latest falls back past it)."""
  step = mngr.latest_step() if step is None else step
  if step is None:
    if missing_ok:
      return None
    raise FileNotFoundError(f"{mngr.directory}: no checkpoint found")
  try:
    meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    check_meta(meta, step)
    return meta
  except Exception:  # pylint: disable=broad-except
    if missing_ok:
      return None
    raise


def latest_model_kwargs(mngr: ocp.CheckpointManager) -> dict:
  """model_kwargs recorded with the newest checkpoint ({} if none or unreadable)."""
  return (_read_meta(mngr, None, missing_ok=True) or {}).get("model_kwargs", {})


def _check_model(mngr: ocp.CheckpointManager, step: int, model_kwargs: dict,
                 objective: dict | None = None) -> None:
  meta = _read_meta(mngr, step, missing_ok=True)
  if meta is None:
    return  # unreadable: restore_latest sets it aside and falls back past it
  if objective is not None:
    saved_objective = read_objective(meta).to_meta()
    if saved_objective != objective:
      raise ValueError(
          f"{mngr.directory}/{step} was trained with the objective {saved_objective}, this run "
          f"has {objective} (config.objective, config.diffusion): use another workdir")
  from dit_jax import models  # pylint: disable=import-outside-toplevel
  # A field the checkpoint's meta lacks (it predates the field) is the field's default.
  saved = {**models.architecture_fields(), **meta.get("model_kwargs", {})}
  diff = {k: (saved.get(k), v) for k, v in model_kwargs.items()
          if k not in LAYOUT_KWARGS and saved.get(k) != v}
  if diff:
    raise ValueError(
        f"{mngr.directory}/{step} holds a checkpoint of another model ({meta.get('model')}; "
        + ", ".join(f"{k}={a} there, {b} now" for k, (a, b) in diff.items())
        + "): use another workdir")


def _unreadable_dir(mngr: ocp.CheckpointManager) -> str:
  return str(mngr.directory).rstrip("/") + "_unreadable"


def _set_aside(mngr: ocp.CheckpointManager, steps: list[int]) -> None:
  """Moves unreadable checkpoints to checkpoints_unreadable/ (kept for inspection) so the
  run can write those steps again."""
  root = str(mngr.directory)
  dest = _unreadable_dir(mngr)
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
  """Restores only the EMA parameters and meta of a training workdir (for sampling),
  verified against the digests recorded at save time (CheckpointIntegrityError if damaged)."""
  mngr = _open_manager(workdir)
  path = str(mngr.directory)
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"{path}: no checkpoint found (train first, or pass a converted "
                            "release checkpoint with --checkpoint)")
  out = mngr.restore(step, args=ocp.args.Composite(
      ema=ocp.args.StandardRestore(_abstract(abstract_ema, shardings)),
      meta=ocp.args.JsonRestore()))
  mngr.close()
  verify("ema", out["ema"], out["meta"], f"{path}/{step}")
  return out["ema"], out["meta"]


def read_objective(meta: dict) -> Any:
  """The objective (dit_jax.objectives.ADM or Flow) a checkpoint's meta records; checkpoints
  from before objectives are ADM on meta["diffusion"]'s process."""
  from dit_jax import objectives  # pylint: disable=import-outside-toplevel
  return objectives.from_meta(meta)


def load_ema_model(workdir: str, sharding: Any, step: int | None = None,
                   dtype: Any = None) -> tuple[Any, Any, dict]:
  """(DiT, EMA params placed with `sharding`, meta) of a training workdir's checkpoint; the
  objective to sample it with is read_objective(meta) (meta["objective"] is checked here)."""
  from dit_jax import models  # pylint: disable=import-outside-toplevel
  meta = read_meta(workdir, step)
  read_objective(meta)  # an unknown objective fails before the weights are read
  model = models.from_architecture(meta["model_kwargs"], f"{workdir}: meta model_kwargs",
                                   **({"dtype": dtype} if dtype else {}))
  shapes = models.param_shapes(model)
  params, meta = restore_ema(workdir, shapes, jax.tree.map(lambda _: sharding, shapes),
                             meta["step"])
  logging.info("Loaded EMA weights of %s at step %d from %s", meta["model"], meta["step"], workdir)
  model, params = models.without_projector(model, params)  # REPA's: training only
  return model, params, meta


def read_meta(workdir: str, step: int | None = None) -> dict:
  """The meta of a training workdir's checkpoint `step` (None: the newest)."""
  mngr = _open_manager(workdir)
  try:
    return _read_meta(mngr, step)
  finally:
    mngr.close()


def _open_manager(workdir: str) -> ocp.CheckpointManager:
  """A reader of WORKDIR/checkpoints (creates nothing)."""
  return ocp.CheckpointManager(_abspath(os.path.join(workdir, "checkpoints")),
                               item_names=("train", "ema", "meta"),
                               options=ocp.CheckpointManagerOptions(create=False))
