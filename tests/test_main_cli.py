"""The entry points as users run them: preemption, kill -9, two processes, sampling."""

import glob
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from dit_jax import train
from test_train import digits_dir, final_params, tiny_config  # noqa: F401  (fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config=configs/demo.py", "--config.data.global_batch_size=16",
        "--config.data.shuffle_buffer=256", "--config.model.overrides.hidden_size=32",
        "--config.model.overrides.depth=2", "--config.model.overrides.num_heads=2",
        "--config.log_every_steps=1", "--config.sample.every_steps=0",
        "--config.sample.num_images=0", "--config.optim.warmup_steps=0"]


def main_cmd(workdir, data, *extra):
  return [sys.executable, "-m", "dit_jax.main", f"--workdir={workdir}", *TINY,
          f"--config.data.dir={data}", *extra]


def env(devices=8):
  e = dict(os.environ, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="",
           XLA_FLAGS=" ".join([f"--xla_force_host_platform_device_count={devices}"] + [
               f for f in os.environ.get("XLA_FLAGS", "").split()
               if not f.startswith("--xla_force_host_platform_device_count")]),
           PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return e


def steps_saved(workdir):
  return sorted(int(os.path.basename(p)) for p in glob.glob(os.path.join(workdir, "checkpoints", "*"))
                if os.path.basename(p).isdigit())


def assert_same_params(a, b):
  """The newest parameters and EMA of workdirs a and b are equal bit for bit (the same program
  on the same devices, interrupted and resumed or not)."""
  _, pa, ea = final_params(a)
  _, pb, eb = final_params(b)
  for x, y in ((pa, pb), (ea, eb)):
    for u, v in zip(__import__("jax").tree.leaves(x), __import__("jax").tree.leaves(y)):
      np.testing.assert_array_equal(u, v)


def test_sigterm_saves_and_resumes(digits_dir, tmp_path):  # noqa: F811
  wd = str(tmp_path / "run")
  p = subprocess.Popen(main_cmd(wd, digits_dir, "--config.total_steps=100000",
                                "--config.checkpoint.every_steps=100000"),
                       cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True)
  log = []
  for line in p.stdout:  # wait until it is training
    log.append(line)
    if "] [3] " in line and "loss=" in line:
      break
  t_term = time.time()
  p.send_signal(signal.SIGTERM)
  out, _ = p.communicate(timeout=300)
  assert p.returncode == 0, "".join(log) + out
  # TPU VMs give ~30 s of notice: the checkpoint and the exit must fit (a hang, or compiling
  # on the save path, would not; a normal exit takes a few seconds).
  assert time.time() - t_term < 30, "".join(log) + out
  saved = steps_saved(wd)
  assert len(saved) == 1 and saved[0] >= 3, saved
  k = saved[0]
  resumed = subprocess.run(main_cmd(wd, digits_dir, f"--config.total_steps={k + 2}"),
                           cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"Resumed from step {k}" in resumed.stderr
  ref = str(tmp_path / "ref")
  c = tiny_config(digits_dir, total_steps=k + 2, **{"checkpoint.every_steps": 100000})
  train.train_and_evaluate(c, ref)
  assert_same_params(wd, ref)


def test_sigterm_during_start_up_exits_at_once_and_releases_the_lock(digits_dir, tmp_path):  # noqa: F811
  wd = str(tmp_path / "run")
  p = subprocess.Popen(main_cmd(wd, digits_dir, "--config.total_steps=100000"), cwd=ROOT,
                       env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  log = []
  for line in p.stdout:  # the train step is being built and compiled
    log.append(line)
    if "Parameters: " in line:
      break
  assert os.path.exists(os.path.join(wd, "lock.json")), "".join(log)
  t_term = time.time()
  p.send_signal(signal.SIGTERM)
  out, _ = p.communicate(timeout=60)
  assert time.time() - t_term < 5, out  # not after the compile, nor after a step
  assert p.returncode == 128 + signal.SIGTERM, "".join(log) + out
  last = [l for l in out.splitlines() if l.strip()][-1]
  assert last.startswith("SIGTERM during compiling the train step: exiting without saving; no "
                         "checkpoint yet, the workdir's lock is released"), out
  assert "Traceback" not in out and not os.path.exists(os.path.join(wd, "lock.json"))
  assert steps_saved(wd) == []


def test_sigint_after_a_log_line_saves_within_2_steps(digits_dir, tmp_path):  # noqa: F811
  # Logs every 100 steps: the save must not wait for a log step (the host is kept at most 2
  # steps ahead of the device; unbounded it ran 19-34 steps ahead here).
  wd = str(tmp_path / "run")
  p = subprocess.Popen(main_cmd(wd, digits_dir, "--config.total_steps=100000",
                                "--config.checkpoint.every_steps=100000",
                                "--config.log_every_steps=100"),
                       cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True)
  log = []
  for line in p.stdout:
    log.append(line)
    if "] [100] " in line and "loss=" in line:
      break
  time.sleep(0.5)  # shortly after the log line, between log steps
  p.send_signal(signal.SIGINT)  # Ctrl-C: the same as a preemption notice
  out, _ = p.communicate(timeout=300)
  assert p.returncode == 0, "".join(log) + out
  came = re.search(r"SIGINT received after step (\d+): saving a checkpoint", out)
  written = re.search(r"SIGINT: checkpoint of step (\d+) written \(it came after step (\d+)\)",
                      out)
  assert came and written, out
  saved = steps_saved(wd)
  assert saved == [int(written.group(1))], (saved, out)
  assert 100 <= int(came.group(1)) == int(written.group(2)) < saved[0] <= int(came.group(1)) + 2
  assert saved[0] < 200 and not os.path.exists(os.path.join(wd, "lock.json"))


def kill_9_after_step_4(wd, data, *flags):
  """Runs dit_jax.main with `flags` (checkpoints every 2 steps) until a checkpoint of step 4 or
  later exists, kills it with SIGKILL (possibly in the middle of writing a checkpoint) and
  returns the steps saved."""
  p = subprocess.Popen(main_cmd(wd, data, "--config.total_steps=100000",
                                "--config.checkpoint.every_steps=2", *flags),
                       cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 400
  while time.time() < deadline and not [s for s in steps_saved(wd) if s >= 4]:
    time.sleep(0.2)
  p.kill()
  p.wait()
  saved = steps_saved(wd)
  assert saved and saved[-1] >= 4, saved
  return saved


def test_kill_9_resumes_with_nothing_lost(digits_dir, tmp_path):  # noqa: F811
  wd = str(tmp_path / "run")
  saved = kill_9_after_step_4(wd, digits_dir)
  total = saved[-1] + 3
  resumed = subprocess.run(main_cmd(wd, digits_dir, f"--config.total_steps={total}",
                                    "--config.checkpoint.every_steps=2"),
                           cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  ref = str(tmp_path / "ref")
  train.train_and_evaluate(tiny_config(digits_dir, total_steps=total,
                                       **{"checkpoint.every_steps": 2}), ref)
  assert steps_saved(wd)[-1] == total
  assert_same_params(wd, ref)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]



def _two_processes(wd, data, port, *extra):
  return [subprocess.Popen(
      main_cmd(wd, data, "--config.mesh.fsdp=2", f"--coordinator_address=127.0.0.1:{port}",
               "--num_processes=2", f"--process_id={i}", *extra),
      cwd=ROOT, env=env(devices=4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]


@pytest.mark.parametrize("victim", [1, 0], ids=["worker", "coordinator"])
def test_a_lost_process_ends_the_other_cleanly_and_a_restart_resumes(digits_dir, tmp_path,  # noqa: F811
                                                                     victim):
  wd = str(tmp_path / "run")
  procs = _two_processes(wd, digits_dir, _free_port(), "--config.total_steps=100000",
                         "--config.checkpoint.every_steps=5")
  deadline = time.time() + 400
  while time.time() < deadline and not [s for s in steps_saved(wd) if s >= 5]:
    time.sleep(0.2)
  procs[victim].kill()  # SIGKILL: the process (its host) is gone
  t_kill = time.time()
  survivor = procs[1 - victim]
  _, err = survivor.communicate(timeout=120)
  took = time.time() - t_kill
  procs[victim].communicate()
  assert survivor.returncode == 75, err[-4000:]  # EX_TEMPFAIL: run again
  assert took < 20, took  # within --heartbeat_timeout_s (10) and the supervisor's grace
  for noise in ("Fatal Python error", "Traceback", "Check failure", "Terminating process",
                "heartbeat timeout", "Gloo"):
    assert noise not in err, err[-4000:]
  report = err.rstrip("\n").splitlines()[-4:]
  lost = "process 1" if victim == 1 else "the coordinator (process 0)"
  assert report[0].startswith(f"dit_jax: {lost} of this job was lost"), report
  newest = steps_saved(wd)[-1]
  assert f"the newest checkpoint, step {newest} in {wd}/checkpoints, is complete" in report[1]
  assert report[2].startswith("To resume, start every process again with the same command: "
                              "python -m dit_jax.main ") and f"--process_id={1 - victim}" in report[2]
  assert report[3].startswith("(this process's last ")
  if victim == 0:
    return
  assert not os.path.exists(os.path.join(wd, "lock.json"))  # released for the survivor's child
  # Two processes train and checkpoint together again (a multi-process job, 4 devices each).
  total = newest + 2
  procs = _two_processes(wd, digits_dir, _free_port(), f"--config.total_steps={total}",
                         "--config.checkpoint.every_steps=5")
  outs = ["".join(p.communicate(timeout=600)) for p in procs]
  for p, o in zip(procs, outs):
    assert p.returncode == 0, o[-4000:]
  assert "JAX process 1/2, 4 local / 8 global devices" in outs[1]
  assert f"Resumed from step {newest}" in outs[0] and steps_saved(wd)[-1] == total
  # One process with 8 devices restores the two-process checkpoint and continues.
  hist = train.train_and_evaluate(tiny_config(digits_dir, total_steps=total + 1), wd)
  assert sorted(hist) == [total + 1] and np.isfinite(hist[total + 1]["loss"])


def test_sample_cli_writes_adm_npz(digits_dir, tmp_path):  # noqa: F811
  wd = str(tmp_path / "run")
  train.train_and_evaluate(tiny_config(digits_dir, total_steps=2), wd)
  out = str(tmp_path / "s" / "samples.npz")
  r = subprocess.run([sys.executable, "-m", "dit_jax.sample", f"--workdir={wd}",
                      "--num_samples=10", "--batch_size=8", "--respacing=5", "--cfg_scale=2",
                      f"--out={out}"], cwd=ROOT, env=env(), capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  with np.load(out) as f:
    assert f["arr_0"].shape == (10, 8, 8, 1) and f["arr_0"].dtype == np.uint8
    assert f["arr_1"].shape == (10,) and f["arr_1"].min() >= 0 and f["arr_1"].max() < 10
  assert os.path.exists(str(tmp_path / "s" / "samples.png"))
  r = subprocess.run([sys.executable, "-m", "dit_jax.sample", f"--workdir={tmp_path / 'none'}",
                      f"--out={out}"], cwd=ROOT, env=env(), capture_output=True, text=True,
                     timeout=300)
  assert r.returncode != 0 and "no checkpoint found" in r.stderr


def test_sample_cli_fast_samplers(digits_dir, tmp_path):  # noqa: F811
  wd = str(tmp_path / "run")
  train.train_and_evaluate(tiny_config(digits_dir, total_steps=2), wd)
  out = str(tmp_path / "dpm.npz")
  r = subprocess.run([sys.executable, "-m", "dit_jax.sample", f"--workdir={wd}",
                      "--num_samples=8", "--batch_size=8", "--sampler=dpm++3m", "--steps=4",
                      "--spacing=karras", "--guidance_interval=0.5,20", "--cfg_scale=2",
                      f"--out={out}"], cwd=ROOT, env=env(), capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  with np.load(out) as f:
    assert f["arr_0"].shape == (8, 8, 8, 1) and f["arr_0"].dtype == np.uint8
  r = subprocess.run([sys.executable, "-m", "dit_jax.sample", f"--workdir={wd}",
                      "--respacing=250", "--steps=20", f"--out={out}"], cwd=ROOT, env=env(),
                     capture_output=True, text=True, timeout=300)
  assert r.returncode != 0 and "--respacing replaces" in r.stderr
  # The kernel choice: splash (run by the Pallas interpreter here) under the sampling mesh of
  # 8 devices, in bf16; an unknown kernel is refused by name.
  out2 = str(tmp_path / "splash.npz")
  r = subprocess.run([sys.executable, "-m", "dit_jax.sample", f"--workdir={wd}",
                      "--num_samples=8", "--batch_size=8", "--respacing=2", "--cfg_scale=2",
                      "--dtype=bfloat16", "--attention_impl=splash_interpret", f"--out={out2}"],
                     cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  with np.load(out2) as f:
    assert f["arr_0"].shape == (8, 8, 8, 1)
  r = subprocess.run([sys.executable, "-m", "dit_jax.sample", f"--workdir={wd}",
                      "--attention_impl=flash", f"--out={out2}"], cwd=ROOT, env=env(),
                     capture_output=True, text=True, timeout=300)
  assert r.returncode != 0 and "--attention_impl: attention_impl='flash'" in r.stderr
