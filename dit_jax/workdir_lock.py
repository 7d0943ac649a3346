"""One training job per workdir: a lock file WORKDIR/lock.json held while the job runs.

Two jobs writing the same checkpoints would overwrite each other's steps (with other configs
or data orders, silently). The file names its holder: host, pid, the process's start time
and a heartbeat that a thread refreshes every HEARTBEAT_S seconds. A second job reads it and
stops with one line naming the holder, unless the lock is stale:

  - same host: the holder's pid is gone (or is another process of that number, told apart by
    its start time): the job died without releasing it (kill -9, a crash, a reboot);
  - another host (a workdir on gs:// or a shared disk): no heartbeat for STALE_S seconds.

A stale lock is taken over with a warning. On several hosts process 0 holds the lock for all
and tells the others whether it got it. Local paths are created exclusively (O_EXCL); on
object stores (gs://, through tf.io.gfile) the job writes the file and reads it back, which
leaves a window of a second or so for two jobs started at the same moment.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import socket
import threading
import time
from typing import Any, Callable

import numpy as np
import tensorflow as tf

LOCK_FILE = "lock.json"
HEARTBEAT_S = 30.0
# Another host's lock without a heartbeat for this long is stale: ten missed heartbeats.
STALE_S = 300.0


# The locks this process holds (released by release_all on an exit without unwinding).
_HELD: "set[Lock]" = set()


def release_all() -> None:
  """Releases every lock this process holds (dit_jax/stopping.py, before os._exit)."""
  for lock in list(_HELD):
    lock.release()


class WorkdirLocked(RuntimeError):
  """Another live job holds the workdir."""


def _process_start(pid: int) -> str | None:
  """The process's start time in clock ticks since boot (Linux), or None where unknown."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _pid_alive(pid: int, start: str | None) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process: alive
    pass
  now = _process_start(pid)
  return start is None or now is None or now == start


def _describe(info: dict) -> str:
  started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(info.get("started", 0)))
  return f"pid {info.get('pid')} on {info.get('host')}, started {started}"


def holder_state(info: dict, now: float | None = None) -> str:
  """'alive' or why the lock is stale."""
  if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int):
    if _pid_alive(info["pid"], info.get("pid_start")):
      return "alive"
    return "its process is gone"
  age = (time.time() if now is None else now) - float(info.get("heartbeat", 0))
  if age < STALE_S:
    return "alive"
  return f"no heartbeat for {age:.0f}s"


class Lock:
  """The lock of one workdir, held by this process (process 0 of a multi-process job)."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_FILE)
    self.local = "://" not in workdir
    self.info = {"host": socket.gethostname(), "pid": os.getpid(),
                 "pid_start": _process_start(os.getpid()), "started": time.time()}
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def _read(self) -> dict | None:
    """The lock's content; None if there is none; {"damaged": why} if it cannot be a lock
    (a torn write, a disk error, an edit): no live job can hold such a file."""
    try:
      with tf.io.gfile.GFile(self.path, "rb") as f:
        raw = f.read()
    except tf.errors.NotFoundError:
      return None
    except tf.errors.OpError as e:
      return {"damaged": f"unreadable: {e.message.splitlines()[0] if e.message else e}"}
    try:
      info = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
      return {"damaged": f"{len(raw)} bytes that are not JSON ({type(e).__name__})"}
    if not isinstance(info, dict) or not {"host", "pid", "heartbeat"} <= info.keys():
      return {"damaged": "JSON without the host, pid and heartbeat of a holder"}
    return info

  def _write(self, exclusive: bool) -> bool:
    data = json.dumps(dict(self.info, heartbeat=time.time()))
    if self.local:
      if exclusive:
        # Written whole, then linked into place: link() fails if the lock exists, and no
        # reader ever sees a half-written lock (which would look damaged).
        tmp = f"{self.path}.{os.getpid()}.new"
        with open(tmp, "w") as f:
          f.write(data)
        try:
          os.link(tmp, self.path)
        except FileExistsError:
          return False
        except OSError:  # a filesystem without hard links: create it exclusively
          try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
          except FileExistsError:
            return False
          with os.fdopen(fd, "w") as f:
            f.write(data)
        finally:
          os.remove(tmp)
        return True
      tmp = f"{self.path}.{os.getpid()}.tmp"
      with open(tmp, "w") as f:
        f.write(data)
      os.replace(tmp, self.path)
      return True
    with tf.io.gfile.GFile(self.path, "w") as f:
      f.write(data)
    return True

  def _mine(self, info: dict | None) -> bool:
    return bool(info) and all(info.get(k) == v for k, v in self.info.items())

  def acquire(self) -> None:
    """Takes the lock (over a stale one, with a warning); WorkdirLocked if it is held."""
    tf.io.gfile.makedirs(os.path.dirname(self.path) or ".")
    for _ in range(3):
      info = self._read()
      if info is not None and "damaged" in info:
        logging.warning("%s is damaged (%s), so no job can be holding it: taking the lock over",
                        self.path, info["damaged"])
      elif info is not None:
        state = holder_state(info)
        if state == "alive":
          raise WorkdirLocked(
              f"{self.path}: the workdir is in use by another job ({_describe(info)}); "
              "wait for it to end, or use another --workdir")
        logging.warning("%s: taking over the lock of a job that did not release it (%s; %s)",
                        self.path, _describe(info), state)
      if info is not None and self.local:
        # Remove only the stale file we read: if another job replaced it meanwhile, its
        # exclusive create below wins and we read its lock on the next round.
        try:
          os.remove(self.path)
        except FileNotFoundError:
          pass
      if not self._write(exclusive=True):
        continue
      if not self.local:
        time.sleep(1.0)  # let a concurrent writer's object land, then check who won
        if not self._mine(self._read()):
          continue
      self._thread = threading.Thread(target=self._beat, name="workdir-lock-heartbeat",
                                      daemon=True)
      self._thread.start()
      _HELD.add(self)
      return
    raise WorkdirLocked(f"{self.path}: another job is taking the lock at the same time")

  def _beat(self) -> None:
    while not self._stop.wait(HEARTBEAT_S):
      try:
        if not self._mine(self._read()):
          logging.error("%s: the lock was taken by another job (%s); this job's checkpoints "
                        "may be overwritten", self.path, _describe(self._read() or {}))
          return
        self._write(exclusive=False)
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("%s: heartbeat failed (%s)", self.path, e)

  def release(self) -> None:
    _HELD.discard(self)
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=5)
    try:
      if self._mine(self._read()):
        tf.io.gfile.remove(self.path)
    except tf.errors.OpError as e:
      logging.warning("%s: could not release the lock (%s)", self.path, e)


def _agree_on_process_0(ok: bool) -> bool:
  import jax  # pylint: disable=import-outside-toplevel
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))


def hold(fn: Callable[..., Any]) -> Callable[..., Any]:
  """Runs `fn(config, workdir, ...)` holding workdir's lock (process 0 for all processes)."""

  @functools.wraps(fn)
  def locked(config, workdir, *args, **kwargs):
    import jax  # pylint: disable=import-outside-toplevel
    lock, err = None, None
    if jax.process_index() == 0:
      lock = Lock(workdir)
      try:
        lock.acquire()
      except WorkdirLocked as e:
        err, lock = e, None
    if not _agree_on_process_0(err is None):
      raise err or WorkdirLocked(f"{workdir}: process 0 found the workdir in use by another "
                                 "job (see its log)")
    try:
      return fn(config, workdir, *args, **kwargs)
    finally:
      if lock is not None:
        lock.release()

  return locked
