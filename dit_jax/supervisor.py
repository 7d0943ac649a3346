"""A lost process ends every other process of a multi-process job promptly and cleanly.

When one process of a jax.distributed job dies (kill -9, a lost host, an OOM kill), the
others cannot go on: their collectives fail (Gloo's "Connection reset by peer" on CPUs) or
wait, and JAX's coordination service then declares the dead task (no heartbeat for
`--heartbeat_timeout_s`) and ends every survivor from C++ (LOG(FATAL) and abort: 37-56 lines
of gRPC errors, a C++ stack, Python's "Fatal Python error: Aborted" and module list, a core).
Its missed-heartbeat callback cannot be replaced from Python in this JAX (the binding has no
converter for its status argument), and a lost coordinator aborts the others within 0.3 s.

So `dit_jax.main` runs a multi-process job's training in a child process and watches its
stderr (`run`): lines pass through after HOLD_S seconds, unless the signs of a lost peer
appear (MARKERS). Then the child's last lines are kept in a file instead of printed, the
child is ended if it has not ended within GRACE_S seconds, the workdir's lock it held is
released, and the survivor prints what happened in a few lines: which process was lost, the
newest checkpoint (complete: Orbax commits a checkpoint by renaming it), and the command
that resumes. It exits with EXIT_PEER_LOST. Signals are passed on to the child; if the
supervisor itself is killed, the child is killed with it (PR_SET_PDEATHSIG).

One process (no peers to lose) runs without a supervisor; `--supervise=false` turns it off.
"""

from __future__ import annotations

import ctypes
import os
import re
import selectors
import shlex
import signal
import subprocess
import sys
import tempfile
import time

ENV = "DIT_JAX_SUPERVISED"
HOLD_S = 1.0    # lines are held this long, so that the first of a peer loss's can be dropped
GRACE_S = 3.0   # after the first sign, the child has this long to end by itself
EXIT_PEER_LOST = 75  # EX_TEMPFAIL: run again

# Lines that show a process of the job is gone (the survivor's view).
MARKERS = re.compile(
    r"detected fatal errors|heartbeat timeout|stopped sending heartbeats|"
    r"Gloo \w+ failed|Connection (reset|closed) by peer|"
    r"coordination[_ ]service.*(Socket closed|Connection refused|Failed to connect|UNAVAILABLE)|"
    r"(Socket closed|Connection refused|UNAVAILABLE).*coordination[_ ]service", re.I)
_TASK = re.compile(r"[Tt]ask (\d+) heartbeat timeout")
_UNHEALTHY = re.compile(r"stopped sending heartbeats\):\s*([\d ,]+)")
_COORDINATOR = re.compile(r"Socket closed|Connection refused|Failed to connect|PollForError")
_PROCESS = re.compile(r"JAX process (\d+)/(\d+)")


def wanted(flags) -> bool:
  """Whether this invocation should run supervised: several processes, not yet a child."""
  if os.environ.get(ENV) or not flags.supervise:
    return False
  if flags.coordinator_address:
    return (flags.num_processes or 2) > 1
  if flags.distributed is False:
    return False
  if flags.distributed:
    return True
  from dit_jax import runtime  # pylint: disable=import-outside-toplevel
  return runtime.detect_cluster() is not None


def _die_with_parent() -> None:
  """In the child: SIGKILL when the supervisor dies (Linux; elsewhere nothing)."""
  try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    pass


def _newest_checkpoint(workdir: str) -> int | None:
  root = os.path.join(workdir, "checkpoints")
  try:
    if "://" in root:
      import tensorflow as tf  # pylint: disable=import-outside-toplevel
      names = [n.rstrip("/") for n in tf.io.gfile.listdir(root)]
    else:
      names = os.listdir(root)
  except Exception:  # pylint: disable=broad-except
    return None
  steps = [int(n) for n in names if n.isdigit()]
  return max(steps) if steps else None


def _release_lock(workdir: str, pid: int) -> None:
  """Removes WORKDIR/lock.json if the child held it (it cannot: it was ended)."""
  import json  # pylint: disable=import-outside-toplevel
  path = os.path.join(workdir, "lock.json")
  if "://" in path:
    return  # left to the next job's takeover (a lock of a dead pid on this host)
  try:
    with open(path) as f:
      if json.load(f).get("pid") == pid:
        os.remove(path)
  except (OSError, ValueError, AttributeError):
    pass


def who_was_lost(lines: list[str], me: int | None, count: int | None) -> str:
  """'process 1', 'the coordinator (process 0)' or 'another process', from the lines."""
  text = "\n".join(lines)
  found = _TASK.findall(text) or " ".join(_UNHEALTHY.findall(text)).replace(",", " ").split()
  ids = sorted({int(i) for i in found} - ({me} if me is not None else set()))
  of = ""
  if ids:
    return ("process " if len(ids) == 1 else "processes ") + ", ".join(map(str, ids)) + of
  if me != 0 and _COORDINATOR.search(text):
    return f"the coordinator (process 0{of})"
  if count == 2 and me is not None:
    return f"process {1 - me}{of}"
  return "another process"


def run(argv: list[str], workdir: str, heartbeat_s: float) -> int:
  """Runs `python -m dit_jax.main argv[1:]` as a watched child; returns the exit code."""
  cmd = [sys.executable, "-m", "dit_jax.main", *argv[1:]]
  child = subprocess.Popen(cmd, env=dict(os.environ, **{ENV: "1"}), stderr=subprocess.PIPE,
                           preexec_fn=_die_with_parent)

  def forward(signum, frame):  # pylint: disable=unused-argument
    try:
      child.send_signal(signum)
    except OSError:
      pass

  for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(s, forward)

  sel = selectors.DefaultSelector()
  sel.register(child.stderr, selectors.EVENT_READ)
  held: list[tuple[float, str]] = []
  dropped: list[str] = []
  lost_at = None
  partial = b""
  me = count = None
  while True:
    events = sel.select(timeout=0.2)
    data = os.read(child.stderr.fileno(), 65536) if events else None
    now = time.time()
    if data:
      partial += data
      *complete, partial = partial.split(b"\n")
      for raw in complete:
        line = raw.decode("utf-8", "replace")
        m = _PROCESS.search(line)
        if m and me is None:
          me, count = int(m.group(1)), int(m.group(2))
        if lost_at is None and MARKERS.search(line):
          lost_at = now  # what is held (the last HOLD_S seconds) belongs to the loss too
          dropped.extend(l for _, l in held)
          held = []
        if lost_at is None:
          held.append((now, line))
        else:
          dropped.append(line)
    if lost_at is None:
      while held and (data == b"" or held[0][0] < now - HOLD_S):
        sys.stderr.write(held.pop(0)[1] + "\n")
      sys.stderr.flush()
    elif child.poll() is None and now - lost_at > GRACE_S:
      child.kill()
    if data == b"":  # the child closed stderr: it is ending
      break
  rc = child.wait()
  tail = [partial.decode("utf-8", "replace")] if partial else []
  if lost_at is None:
    for line in [l for _, l in held] + tail:
      sys.stderr.write(line + "\n")
    sys.stderr.flush()
    return rc if rc >= 0 else 128 - rc
  dropped.extend(tail)
  _release_lock(workdir, child.pid)
  fd, path = tempfile.mkstemp(prefix=f"dit_jax_lost_peer_{os.getpid()}_", suffix=".log")
  with os.fdopen(fd, "w") as f:
    f.write("\n".join(dropped) + "\n")
  newest = _newest_checkpoint(workdir)
  saved = (f"the newest checkpoint, step {newest} in {workdir}/checkpoints, is complete"
           if newest is not None else f"no checkpoint was written yet in {workdir}")
  this = f"process {me}" if me is not None else "this process"
  sys.stderr.write(
      f"dit_jax: {who_was_lost(dropped, me, count)} of this job was lost (killed, its host "
      f"gone, or no heartbeat for {heartbeat_s:.0f} s); {this} stopped too.\n"
      f"Nothing else is lost: {saved}.\n"
      f"To resume, start every process again with the same command: python -m dit_jax.main "
      f"{shlex.join(argv[1:])}\n"
      f"(this process's last {len(dropped)} log lines: {path})\n")
  sys.stderr.flush()
  return EXIT_PEER_LOST
