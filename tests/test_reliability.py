"""One job per workdir, prompt exits, failed saves, damaged checkpoints and bad flags, each
ending in a short error. Tiny model, few steps."""

import errno
import glob
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import tensorflow as tf

from dit_jax import checkpointing, config_checks, train, workdir_lock
from test_main_cli import ROOT, env, main_cmd, steps_saved
from test_train import digits_dir, tiny_config  # noqa: F401  (fixture)

_NOISE = ("WARNING: All log messages before absl::InitializeLog()", "To enable the following "
          "instructions", "I0000 ", "W0000 ")


def error_lines(stderr: str) -> list[str]:
  """What a user reads as the error: stderr less INFO logs and TF/XLA start-up notices."""
  return [l for l in stderr.splitlines()
          if l.strip() and not (l[:1] == "I" and l[1:5].isdigit()) and not l.startswith(_NOISE)]


def _exit_after_commit(workdir: str, t_exit: float) -> float:
  """Seconds from the newest checkpoint's commit (Orbax renames its directory into place when
  it is complete: the directory's ctime) to `t_exit`."""
  newest = steps_saved(workdir)[-1]
  return t_exit - os.stat(os.path.join(workdir, "checkpoints", str(newest))).st_ctime


def test_one_job_per_workdir_and_exits_within_5s_of_the_commit(digits_dir, tmp_path):  # noqa: F811
  wd = str(tmp_path / "run")
  first = subprocess.Popen(main_cmd(wd, digits_dir, "--config.total_steps=100000",
                                    "--config.checkpoint.every_steps=100000"),
                           cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
  log = []
  for line in first.stdout:
    log.append(line)
    if "] [2] " in line and "loss=" in line:
      break
  lock = json.load(open(os.path.join(wd, workdir_lock.LOCK_FILE)))
  assert lock["pid"] == first.pid and lock["host"] == socket.gethostname()
  # A second job on the same workdir refuses in a few lines naming the holder.
  second = subprocess.run(main_cmd(wd, digits_dir, "--config.total_steps=3"), cwd=ROOT,
                          env=env(), capture_output=True, text=True, timeout=300)
  assert second.returncode == 1, second.stderr[-3000:]
  errors = error_lines(second.stderr)
  assert len(errors) <= 5, errors
  assert any("in use by another job" in l and f"pid {first.pid} on {socket.gethostname()}" in l
             for l in errors), errors
  # SIGTERM: the first job saves, releases the lock and exits promptly after the commit.
  first.send_signal(signal.SIGTERM)
  out, _ = first.communicate(timeout=300)
  t_exit = time.time()
  assert first.returncode == 0, "".join(log) + out
  assert not os.path.exists(os.path.join(wd, workdir_lock.LOCK_FILE))
  assert _exit_after_commit(wd, t_exit) < 5, "".join(log) + out
  # A normal end: the last checkpoint, then exit, also within 5 s.
  k = steps_saved(wd)[-1]
  third = subprocess.run(main_cmd(wd, digits_dir, f"--config.total_steps={k + 2}"), cwd=ROOT,
                         env=env(), capture_output=True, text=True, timeout=600)
  t_exit = time.time()
  assert third.returncode == 0, third.stderr[-3000:]
  assert f"Resumed from step {k}" in third.stderr and steps_saved(wd)[-1] == k + 2
  assert "taking over" not in third.stderr  # the first job released its lock
  assert _exit_after_commit(wd, t_exit) < 5, third.stderr[-3000:]


def _write_lock(workdir, **info):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, workdir_lock.LOCK_FILE), "w") as f:
    json.dump(info, f)


def _dead_pid():
  p = subprocess.Popen([sys.executable, "-c", "pass"])
  p.wait()
  return p.pid


def test_stale_locks_are_taken_over_live_ones_refused(tmp_path, caplog):
  wd = str(tmp_path)
  host, now = socket.gethostname(), time.time()
  path = os.path.join(wd, workdir_lock.LOCK_FILE)
  stale = [
      dict(host=host, pid=_dead_pid(), started=now - 60, heartbeat=now),   # killed here
      # Our own pid number, but another process (another start time): a reused pid.
      dict(host=host, pid=os.getpid(), pid_start="1", started=now - 60, heartbeat=now),
      dict(host="other-host", pid=1, started=now - 3600,
           heartbeat=now - workdir_lock.STALE_S - 1),                        # no heartbeat
  ]
  for info in stale:
    _write_lock(wd, **info)
    lock = workdir_lock.Lock(wd)
    lock.acquire()
    assert json.load(open(path))["pid"] == os.getpid()
    lock.release()
    assert not os.path.exists(path)
  assert caplog.text.count("taking over the lock of a job that did not release it") == 3
  assert "its process is gone" in caplog.text and "no heartbeat for" in caplog.text
  # Damaged locks (a torn write, bytes that are not UTF-8, JSON that is not a lock) are
  # reported as damaged and taken over.
  for damaged in (b'{"host": "x", "pi', b"\xff\xfe\x00lock", b"[1, 2]"):
    caplog.clear()
    with open(path, "wb") as f:
      f.write(damaged)
    lock = workdir_lock.Lock(wd)
    lock.acquire()
    assert json.load(open(path))["pid"] == os.getpid()
    lock.release()
    assert f"{path} is damaged (" in caplog.text and "taking the lock over" in caplog.text
    assert "did not release it" not in caplog.text
  sleeper = subprocess.Popen(["sleep", "60"])
  try:
    live = [dict(host=host, pid=sleeper.pid, pid_start=workdir_lock._process_start(sleeper.pid),
                 started=now, heartbeat=now - 3600),  # same host: the pid decides
            dict(host="other-host", pid=1, started=now - 60, heartbeat=now - 10)]
    for info in live:
      _write_lock(wd, **info)
      with pytest.raises(workdir_lock.WorkdirLocked,
                         match=f"in use by another job \\(pid {info['pid']} on {info['host']}"):
        workdir_lock.Lock(wd).acquire()
      assert json.load(open(path))["pid"] == info["pid"]  # left alone
  finally:
    sleeper.kill()
    sleeper.wait()


def _fail_meta_write_of(monkeypatch, step):
  """The write of checkpoint `step`'s meta (in Orbax's background commit thread) fails as on
  a full disk."""
  from orbax.checkpoint._src.handlers import json_checkpoint_handler as jh  # pylint: disable=import-outside-toplevel
  real = jh.JsonCheckpointHandler._save_fn

  async def save_fn(self, x, directory):
    if x.get("step") == step:
      raise OSError(errno.ENOSPC, "No space left on device", str(directory / "metadata"))
    return await real(self, x, directory)

  monkeypatch.setattr(jh.JsonCheckpointHandler, "_save_fn", save_fn)


def test_full_disk_stops_the_job_at_the_failed_save(digits_dir, tmp_path, monkeypatch,  # noqa: F811
                                                    caplog):
  wd = str(tmp_path)
  caplog.set_level(logging.INFO)
  _fail_meta_write_of(monkeypatch, 20)
  c = tiny_config(digits_dir, total_steps=60, **{"checkpoint.every_steps": 20})
  with pytest.raises(checkpointing.CheckpointSaveError) as e:
    train.train_and_evaluate(c, wd)
  msg = str(e.value)
  assert f"Saving checkpoint {wd}/checkpoints/20 failed, no space left on the disk mounted " \
         "at /" in msg and "MiB free" in msg and msg.endswith("(kept: no checkpoint)"), msg
  # Stopped at the failed background save, long before the next save (step 40).
  logged = [int(r.getMessage()[1:].split("]")[0]) for r in caplog.records
            if r.getMessage().startswith("[") and "loss=" in r.getMessage()]
  assert max(logged) < 40, max(logged)
  assert steps_saved(wd) == [] and glob.glob(f"{wd}/checkpoints/20.orbax-checkpoint-tmp*")
  assert not os.path.exists(os.path.join(wd, workdir_lock.LOCK_FILE))  # released
  # The next start (disk freed) trains again and removes the unfinished directory.
  monkeypatch.undo()
  _fail_meta_write_of(monkeypatch, 4)
  with pytest.raises(checkpointing.CheckpointSaveError, match=r"checkpoints/4 failed.*kept: 2\)"):
    train.train_and_evaluate(tiny_config(digits_dir, total_steps=6,
                                         **{"checkpoint.every_steps": 2,
                                            "checkpoint.async_save": False}), wd)
  assert steps_saved(wd) == [2]  # the checkpoint before the failed one is kept
  assert not glob.glob(f"{wd}/checkpoints/20.orbax-checkpoint-tmp*")


def test_full_disk_error_is_short(digits_dir, tmp_path):  # noqa: F811
  wd = str(tmp_path / "run")
  # dit_jax.main, with the write of step 4's meta failing as on a full disk.
  code = ("import errno, runpy, sys\n"
          "from orbax.checkpoint._src.handlers import json_checkpoint_handler as jh\n"
          "real = jh.JsonCheckpointHandler._save_fn\n"
          "async def save_fn(self, x, d):\n"
          "  if x.get('step') == 4:\n"
          "    raise OSError(errno.ENOSPC, 'No space left on device', str(d / 'metadata'))\n"
          "  return await real(self, x, d)\n"
          "jh.JsonCheckpointHandler._save_fn = save_fn\n"
          "sys.argv = sys.argv[1:]\n"
          "runpy.run_module('dit_jax.main', run_name='__main__')\n")
  cmd = main_cmd(wd, digits_dir, "--config.total_steps=30", "--config.checkpoint.every_steps=2")
  r = subprocess.run([sys.executable, "-c", code, *cmd[2:]], cwd=ROOT, env=env(),
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 1, r.stderr[-3000:]
  assert "sys.meta_path is None" not in r.stderr
  errors = error_lines(r.stderr)
  # Orbax's own error lines (one per thread the failure passed through) folded into the first.
  logged = [l for l in errors if l[:1] == "E" and l[1:5].isdigit()]
  assert len(errors) <= 5 and len(logged) <= 1, "\n".join(errors)
  assert errors[-2].startswith(f"CheckpointSaveError: Saving checkpoint {wd}/checkpoints/4 "
                               "failed, no space left on the disk mounted at /"), errors
  assert errors[-2].endswith("(kept: 2)") and steps_saved(wd) == [2]


@pytest.mark.parametrize("damage", ["missing_file", "truncated_file", "not_our_meta"])
def test_damaged_checkpoint_is_set_aside_at_once(digits_dir, tmp_path, caplog,  # noqa: F811
                                                 damage):
  wd = str(tmp_path)
  train.train_and_evaluate(tiny_config(digits_dir), wd)  # checkpoints 3 and 6
  files = sorted(glob.glob(os.path.join(wd, "checkpoints", "6", "train", "**", "d", "*"),
                           recursive=True), key=os.path.getsize)
  if damage == "missing_file":
    os.remove(files[-1])
  elif damage == "truncated_file":
    with open(files[-1], "r+b") as f:
      f.truncate(os.path.getsize(files[-1]) // 2)
  else:  # valid JSON, but not a dit_jax meta: unreadable, not "another model"
    meta = glob.glob(os.path.join(wd, "checkpoints", "6", "meta", "*"))[0]
    json.dump({"garbage": [1, 2, 3]}, open(meta, "w"))
  t0 = time.time()
  hist = train.train_and_evaluate(tiny_config(digits_dir, total_steps=7), wd)  # backoff 2 s
  assert sorted(hist) == [4, 5, 6, 7]  # resumed from step 3
  assert "restore attempt" not in caplog.text  # damage is not retried
  assert time.time() - t0 < 60
  assert "checkpoints/6 cannot be restored" in caplog.text
  assert os.listdir(os.path.join(wd, "checkpoints_unreadable"))[0].startswith("6-")
  if damage == "not_our_meta":
    assert "not a dit_jax checkpoint's" in caplog.text


def test_half_written_step_and_undecodable_meta_are_set_aside_at_once(  # noqa: F811
    digits_dir, tmp_path, caplog):
  wd = str(tmp_path)
  train.train_and_evaluate(tiny_config(digits_dir), wd)  # checkpoints 3 and 6
  shutil.rmtree(os.path.join(wd, "checkpoints", "6", "ema"))  # a half-written step
  meta = glob.glob(os.path.join(wd, "checkpoints", "3", "meta", "*"))[0]
  with open(meta, "wb") as f:
    f.write(b"\xff\xfe\x00\x81 not UTF-8")
  t0 = time.time()
  with pytest.raises(RuntimeError, match="No checkpoint in .* could be restored") as e:
    train.train_and_evaluate(tiny_config(digits_dir, total_steps=7), wd)  # backoff 2 s
  assert "restore attempt" not in caplog.text and time.time() - t0 < 60  # neither retried
  assert 'step 6: KeyError: \'Item "ema" was not found' in str(e.value), e.value
  assert "step 3: UnicodeDecodeError" in str(e.value), e.value
  assert sorted(d.split("-")[0] for d in
                os.listdir(os.path.join(wd, "checkpoints_unreadable"))) == ["3", "6"]


def test_transient_read_error_is_retried(digits_dir, tmp_path, caplog, monkeypatch):  # noqa: F811
  wd = str(tmp_path)
  train.train_and_evaluate(tiny_config(digits_dir), wd)
  real = checkpointing.ocp.CheckpointManager.restore
  calls = []

  def flaky(self, step, *args, **kwargs):
    if "train" in kwargs["args"] and not calls:
      calls.append(step)
      raise ValueError("UNAVAILABLE: Error reading gs://bucket/run/checkpoints/6: "
                       "connection reset")
    return real(self, step, *args, **kwargs)

  monkeypatch.setattr(checkpointing.ocp.CheckpointManager, "restore", flaky)
  hist = train.train_and_evaluate(
      tiny_config(digits_dir, total_steps=7, **{"checkpoint.restore_backoff_s": 0.0}), wd)
  assert calls == [6] and sorted(hist) == [7]  # the newest checkpoint, on the second read
  assert "restore attempt 1/4 failed (ValueError: UNAVAILABLE" in caplog.text
  assert not os.path.exists(os.path.join(wd, "checkpoints_unreadable"))


def _wrapped(outer, inner):
  """`outer` raised from `inner`, as Orbax wraps TensorStore's errors."""
  try:
    try:
      raise inner
    except BaseException as e:
      raise outer from e
  except BaseException as e:  # pylint: disable=broad-except
    return e


# Every kind of restore error seen (Orbax, TensorStore, the OS, TensorFlow's gfile, our own
# checks), and whether reading again may help.
ERRORS = [
    # Permanent: set aside at once.
    (KeyError('Item "ema" was not found in the checkpoint. Available items: [\'train\', '
              '\'meta\']'), False),  # a half-written step
    (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), False),  # meta bytes
    (json.JSONDecodeError("Expecting value", "{x", 1), False),
    (checkpointing.CheckpointMetaError("its meta is not a dit_jax checkpoint's"), False),
    (checkpointing.CheckpointIntegrityError("2 array(s) of train differ"), False),
    (FileNotFoundError(errno.ENOENT, "No such file or directory"), False),
    (PermissionError(errno.EACCES, "Permission denied"), False),
    (ValueError("DATA_LOSS: Error reading local file \"/w/checkpoints/6/train/d/ab\""), False),
    (ValueError("OUT_OF_RANGE: Error reading \"d/ab\": unexpected end of file"), False),
    (ValueError("NOT_FOUND: Error opening \"zarr3\" driver: no metadata"), False),
    (ValueError("PERMISSION_DENIED: HTTP response code: 403"), False),
    (ValueError("FAILED_PRECONDITION: Error reading: checksum mismatch"), False),
    (RuntimeError("something nobody has seen before"), False),  # unknown: not retried
    (_wrapped(ValueError("Orbax: restore failed"), KeyError("Item \"ema\"")), False),
    # May pass: retried with back-off.
    (ValueError("UNAVAILABLE: Error reading gs://b/r/checkpoints/6: connection reset"), True),
    (ValueError("DEADLINE_EXCEEDED: read took too long"), True),
    (ValueError("RESOURCE_EXHAUSTED: rate limited"), True),
    (RuntimeError("GCS read failed, HTTP response code: 503 with body: backend error"), True),
    (RuntimeError("request failed with status 429"), True),
    (OSError("503 Service Unavailable (transient)"), True),
    (RuntimeError("GET gs://b/o: 502 Bad Gateway"), True),
    (TimeoutError("The read operation timed out"), True),
    (ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), True),
    (OSError(errno.EIO, "Input/output error"), True),
    (OSError(errno.ESTALE, "Stale file handle"), True),
    (tf.errors.UnavailableError(None, None, "GCS unavailable"), True),
    (tf.errors.DeadlineExceededError(None, None, "deadline"), True),
    (_wrapped(ValueError("Orbax: restore failed"),
              ValueError("UNAVAILABLE: connection reset")), True),
]


@pytest.mark.parametrize("err,transient", ERRORS, ids=[f"{type(e).__name__}-{i}"
                                                       for i, (e, _) in enumerate(ERRORS)])
def test_restore_errors_are_classified(err, transient):
  assert checkpointing.is_transient(err) is transient


def test_checkpoint_meta_must_be_ours():
  for meta, step in (({"garbage": [1, 2, 3]}, 6), ([1, 2], 6),
                     ({"step": 5, "model_kwargs": {}}, 6)):
    with pytest.raises(checkpointing.CheckpointMetaError):
      checkpointing.check_meta(meta, step)
  checkpointing.check_meta({"step": 6, "model_kwargs": {}}, 6)


def test_nan_stop_of_a_fresh_run_says_nothing_was_saved(digits_dir, tmp_path):  # noqa: F811
  c = tiny_config(digits_dir, total_steps=40, **{
      "optim.learning_rate": 1e30, "checkpoint.every_steps": 1000})
  with pytest.raises(FloatingPointError, match="NaN/inf at step") as e:
    train.train_and_evaluate(c, str(tmp_path))
  assert "no checkpoint was written" in str(e.value) and "None" not in str(e.value)


@pytest.mark.parametrize("field,value", [
    ("total_steps", 0), ("total_steps", -5), ("log_every_steps", 0),
    ("data.global_batch_size", 0), ("checkpoint.every_steps", 0), ("checkpoint.keep", 0),
    ("checkpoint.restore_attempts", 0), ("checkpoint.restore_backoff_s", -1.0),
    ("sample.num_images", -1), ("sample.every_steps", -2), ("eval.every_steps", -1),
    ("optim.learning_rate", -1e-4), ("ema_decay", 1.5), ("diffusion.steps", 0),
    ("mesh.data", 0), ("mesh.fsdp", -2)])
def test_config_fields_out_of_range_are_refused(field, value):
  c = tiny_config("unused", **{field: value})
  with pytest.raises(ValueError, match=f"^config.{field}={value!r}: must be"):
    config_checks.check(c)


def test_eval_fields_are_checked_only_when_evaluating():
  config_checks.check(tiny_config("unused", **{"eval.num_samples": 0}))
  with pytest.raises(ValueError, match="config.eval.num_samples=0"):
    config_checks.check(tiny_config("unused", **{"eval.every_steps": 10, "eval.num_samples": 0}))


def test_bad_flags_give_short_errors(tmp_path):
  wd, main = str(tmp_path / "wd"), [sys.executable, "-m", "dit_jax.main",
                                    "--config=configs/demo.py", f"--workdir={tmp_path / 'wd'}"]
  sample = [sys.executable, "-m", "dit_jax.sample", f"--workdir={wd}"]
  cases = [  # command, what the error must say
      (main + ["--config.total_steps=0"], "ValueError: config.total_steps=0: must be at least 1"),
      (main + ["--config.total_steps=-5"], "config.total_steps=-5: must be at least 1"),
      (main + ["--config.optim.learnin_rate=1"],
       '--config.optim.learnin_rate=1: no such field \'learnin_rate\' Did you mean '
       '"learning_rate"'),
      (sample + ["--num_samples=-3"], "flag --num_samples=-3: -3 is not a positive integer"),
      (sample + ["--num_samples=0"], "flag --num_samples=0: 0 is not a positive integer"),
      (sample + ["--batch_size=0"], "flag --batch_size=0"),
  ]
  procs = [subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True) for cmd, _ in cases]
  for p, (cmd, want) in zip(procs, cases):
    stderr = p.communicate(timeout=300)[1]
    errors = error_lines(stderr)
    assert p.returncode == 1 and len(errors) <= 3 and want in errors[0], (cmd, errors)
  assert not os.path.exists(wd)  # refused before anything was written


def test_signal_during_a_sample_grid_saves_that_step_and_exits(digits_dir, tmp_path,  # noqa: F811
                                                               monkeypatch):
  from dit_jax import periodic, stopping  # pylint: disable=import-outside-toplevel
  real = periodic.SampleGrid.__call__
  calls = []

  def grid_then_signal(self, ema_params, step):
    calls.append(step)
    real(self, ema_params, step)
    os.kill(os.getpid(), signal.SIGTERM)  # arrives while the grid is being made
    time.sleep(0.2)
    stopping.check()  # what the evaluation does between its batches

  monkeypatch.setattr(periodic.SampleGrid, "__call__", grid_then_signal)
  wd = str(tmp_path)
  hist = train.train_and_evaluate(
      tiny_config(digits_dir, total_steps=50, **{"sample.every_steps": 2, "sample.num_images": 2,
                                                 "checkpoint.every_steps": 1000}), wd)
  assert calls == [2] and max(hist) == 2  # cut short at the grid, not after the next step
  assert sorted(int(d) for d in os.listdir(os.path.join(wd, "checkpoints")) if d.isdigit()) == [2]
  assert signal.getsignal(signal.SIGTERM) is not stopping.record  # the handler is restored
