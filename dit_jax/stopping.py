"""SIGTERM and SIGINT at any moment of a training job: a clean exit, and a checkpoint where one
is due.

`install(workdir)` (dit_jax.main, before any start-up work) takes both signals for the whole
life of the process. Python runs its signal handlers only between bytecodes of the main
thread, which a long compile, restore or collective can hold for minutes; so the handler only
wakes a watcher thread (`signal.set_wakeup_fd`), which acts at once, by phase:

  - start-up (data, compile, restore, compiling the grids): nothing is due yet. One line
    names the signal and the newest checkpoint, the workdir's lock is released and the
    process exits with 128 + the signal's number.
  - training (`phase(LOOP)`): the request is recorded with the newest step the device had
    finished (`finished_step`); the loop saves at the next step boundary and exits (dit_jax/train.py
    bounds how far the host runs ahead, so that boundary is at most 2 steps later). A grid or
    an evaluation in progress is cut short (`check()` raises `Interrupted` between batches).
  - finishing (`phase(FINISHING)`: the final save, closing): the save completes, then the
    normal exit.

A second signal while a save is pending exits at once, as at start-up (the checkpoints
already written are whole: Orbax commits by renaming). With several processes SIGTERM
belongs to JAX's preemption sync (jax.distributed installs its own handler, so that every
host saves at the same step; the loop asks it every step); SIGINT there ends the process as
at start-up, since the hosts cannot agree on a step without that service.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

STARTUP, LOOP, FINISHING = "start-up", "training", "finishing"
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(Exception):
  """A stop was requested during a grid or an evaluation (raised by `check`)."""


class _State:
  def __init__(self):
    self.phase = STARTUP
    self.what = "start-up"      # what start-up is doing, for the message
    self.workdir: str | None = None
    self.signum: int | None = None
    self.finished_step: int | None = None  # the newest step finished on the device at the signal
    self.done_step = 0          # the newest step known to be complete on the device
    self.saved_step: int | None = None
    self.installed = False
    self.lock = threading.Lock()


_state = _State()


def install(workdir: str | None) -> bool:
  """Takes SIGTERM and SIGINT for this process (from the main thread; False elsewhere)."""
  if threading.current_thread() is not threading.main_thread():
    return False
  _state.workdir = workdir
  if _state.installed:
    return True
  r, w = os.pipe()
  os.set_blocking(w, False)
  signal.set_wakeup_fd(w, warn_on_full_buffer=False)
  for s in SIGNALS:
    signal.signal(s, _ignore)  # a Python handler must exist for the wakeup fd to be written
  threading.Thread(target=_watch, args=(r,), name="dit_jax-signals", daemon=True).start()
  _state.installed = True
  return True


def installed() -> bool:
  return _state.installed


def reset(workdir: str | None) -> None:
  """A new job in this process (train_and_evaluate): start-up, nothing requested."""
  with _state.lock:
    _state.workdir = workdir
    _state.phase, _state.what = STARTUP, "start-up"
    _state.signum = _state.finished_step = None
    _state.done_step = 0


def record(signum, frame=None) -> None:  # pylint: disable=unused-argument
  """A Python signal handler for the loop alone (train_and_evaluate called from Python,
  `install` not done): records the request, which the loop saves at the next step."""
  with _state.lock:
    if _state.signum is not None:
      return
    _state.signum, _state.finished_step = signum, _state.done_step
  logging.warning("%s received after step %d: saving a checkpoint at the next step boundary, "
                  "then exiting", signal_name(), _state.finished_step)


def _ignore(signum, frame):  # pylint: disable=unused-argument
  """The watcher thread acts on the signal; the main thread goes on."""


def phase(name: str, what: str = "") -> None:
  """Enters STARTUP (doing `what`), LOOP or FINISHING."""
  with _state.lock:
    _state.phase, _state.what = name, what or _state.what


def starting(what: str) -> None:
  """What start-up is doing now (named if a signal comes)."""
  _state.what = what


def step_done(step: int) -> None:
  """The device has completed `step` (the loop's dispatch bound waited for it)."""
  _state.done_step = step


def requested() -> bool:
  return _state.signum is not None


def signal_name() -> str:
  return signal.Signals(_state.signum).name if _state.signum else ""


def finished_step() -> int | None:
  """The newest step the device had finished when the signal came."""
  return _state.finished_step


def check() -> None:
  """Interrupted if a stop was requested (between the batches of a grid or an evaluation)."""
  if requested():
    raise Interrupted(f"{signal_name()} received")


def _newest_checkpoint() -> str:
  if not _state.workdir:
    return "no checkpoint"
  root = os.path.join(_state.workdir, "checkpoints")
  try:
    if "://" in root:
      import tensorflow as tf  # pylint: disable=import-outside-toplevel
      names = [n.rstrip("/") for n in tf.io.gfile.listdir(root)]
    else:
      names = os.listdir(root)
  except Exception:  # pylint: disable=broad-except
    names = []
  steps = sorted(int(n) for n in names if n.isdigit())
  return f"the newest checkpoint is step {steps[-1]} in {root}" if steps else "no checkpoint yet"


def _exit_now(signum: int, message: str) -> None:
  """One line, the lock released, exit 128 + signum (no interpreter teardown, no atexit:
  jax.distributed's shutdown barrier would wait for the other hosts)."""
  from dit_jax import workdir_lock  # pylint: disable=import-outside-toplevel
  workdir_lock.release_all()
  sys.stderr.flush()
  sys.stderr.write(message + "\n")
  sys.stderr.flush()
  os._exit(128 + signum)  # pylint: disable=protected-access


def _on_signal(signum: int) -> None:
  name = signal.Signals(signum).name
  with _state.lock:
    first = _state.signum is None
    ph = _state.phase
    multi = _multiprocess()
    if first and ph in (LOOP, FINISHING) and not (multi and signum == signal.SIGINT):
      _state.signum = signum
      _state.finished_step = _state.done_step
  if ph == STARTUP or not first or (multi and signum == signal.SIGINT):
    why = (f"during {_state.what}" if ph == STARTUP and first else
           "again before the exit" if not first else
           "in a multi-process job (only SIGTERM is synchronised across hosts)")
    _exit_now(signum, f"{name} {why}: exiting without saving; {_newest_checkpoint()}, the "
              "workdir's lock is released. Run the same command to resume.")
  if ph == LOOP:
    logging.warning("%s received after step %d: saving a checkpoint at the next step boundary, "
                    "then exiting", name, _state.finished_step)
  else:
    logging.warning("%s received during the final save: completing it, then exiting", name)


def _multiprocess() -> bool:
  """Whether jax.distributed is up (asked without initialising a backend)."""
  if "jax" not in sys.modules:
    return False
  from dit_jax import runtime  # pylint: disable=import-outside-toplevel
  return runtime.distributed_client_ready()


def _watch(fd: int) -> None:
  while True:
    try:
      data = os.read(fd, 16)
    except InterruptedError:
      continue
    except OSError:
      return
    for signum in data:
      if signum in SIGNALS:
        try:
          _on_signal(signum)
        except Exception as e:  # pylint: disable=broad-except  (never lose the watcher)
          sys.stderr.write(f"dit_jax: handling signal {signum} failed: {e}\n")
