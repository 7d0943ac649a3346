"""The objective wired through the jobs: config.objective trains a flow model in the main job,
checkpoints record it, resume and dit_jax.sample read it back; converted SiT checkpoints
sample with flow samplers."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

from configs import base
from dit_jax import checkpointing, convert, flow, models, objectives, train
from test_main_cli import ROOT, env
from test_train import digits_dir, tiny_config  # noqa: F401  (fixture)


def _sample(*args, timeout=600):
  return subprocess.run([sys.executable, "-m", "dit_jax.sample", *args], cwd=ROOT, env=env(),
                        capture_output=True, text=True, timeout=timeout)


def test_flow_main_job_trains_checkpoints_resumes_and_samples(digits_dir, tmp_path):  # noqa: F811
  wd = str(tmp_path / "flow")
  # The in-job grid samples with the objective's default sampler (sampler '').
  c = tiny_config(digits_dir, total_steps=3, **{
      "objective.name": "flow", "sample.num_images": 8, "sample.steps": 3})
  hist = train.train_and_evaluate(c, wd)
  loss = np.array([hist[s]["loss"] for s in (1, 2, 3)])
  assert np.isfinite(loss).all() and loss[-1] < loss[0], loss
  # Flow logs its loss by quarter of t, not ADM's mse/vb.
  assert {"loss_t0", "loss_t3"} <= set(hist[3]) and "vb" not in hist[3]
  assert os.path.exists(os.path.join(wd, "samples", "step_00000003.png"))
  meta = checkpointing.read_meta(wd)
  assert meta["objective"]["name"] == "flow" and meta["objective"]["path_type"] == "Linear"
  assert checkpointing.read_objective(meta) == objectives.from_config(c)

  # Resume: three more steps from the checkpoint of step 3.
  c.total_steps = 6
  hist = train.train_and_evaluate(c, wd)
  assert sorted(hist) == [4, 5, 6] and all(np.isfinite(hist[s]["loss"]) for s in hist)
  # An ADM config cannot continue the flow run.
  adm = tiny_config(digits_dir, total_steps=7)
  with pytest.raises(ValueError, match="objective"):
    train.train_and_evaluate(adm, wd)

  out = str(tmp_path / "flow.npz")
  r = _sample(f"--workdir={wd}", "--num_samples=8", "--batch_size=8", "--sampler=heun2",
              "--steps=3", "--cfg_scale=2", "--guidance_interval=0,0.9", f"--out={out}")
  assert r.returncode == 0, r.stderr[-3000:]
  with np.load(out) as f:
    assert f["arr_0"].shape == (8, 8, 8, 1) and f["arr_0"].dtype == np.uint8
    assert f["arr_0"].std() > 0
  r = _sample(f"--workdir={wd}", "--sampler=ddpm", f"--out={out}", timeout=300)
  assert r.returncode != 0 and "flow objective" in r.stderr and "heun2" in r.stderr


def test_converted_sit_checkpoint_samples_with_flow(tmp_path):
  # A tiny SiT with random weights in the release's state-dict layout (SiT's is DiT's).
  kwargs = dict(input_size=4, patch_size=2, in_channels=1, hidden_size=32, depth=1,
                num_heads=2, num_classes=10)
  model = models.DiT(**kwargs)
  params = jax.tree.map(lambda p: np.asarray(0.02 * jax.random.normal(jax.random.PRNGKey(1),
                                                                      p.shape)),
                        models.param_shapes(model))
  sd = {k: torch.from_numpy(np.array(v))
        for k, v in convert.to_official(params, model).items()}
  pt = str(tmp_path / "SiT-XL-2-256.pt")
  torch.save(sd, pt)
  record = convert.official_objective(pt)  # '' = by the file name
  assert record == objectives.Flow(flow.create_transport()).to_meta()
  assert convert.official_objective(str(tmp_path / "DiT-XL-2-256x256.pt")) is None
  assert convert.official_objective(pt, "adm") is None
  with pytest.raises(ValueError, match="--objective"):
    convert.official_objective(pt, "nope")
  out_dir = str(tmp_path / "sit")
  convert.convert_official(pt, out_dir, "DiT-S/2", record,
                           **{k: v for k, v in kwargs.items() if k != "patch_size"})
  assert convert.converted_objective(out_dir) == record
  meta = {"objective": record, "model_kwargs": {"learn_sigma": True}}
  assert isinstance(objectives.from_meta(meta), objectives.Flow)

  out = str(tmp_path / "sit.npz")
  r = _sample(f"--checkpoint={out_dir}", "--vae=identity", "--num_samples=8",
              "--batch_size=8", "--sampler=euler", "--steps=3", "--cfg_scale=1.5",
              "--release_cfg=false", f"--out={out}")
  assert r.returncode == 0, r.stderr[-3000:]
  with np.load(out) as f:
    assert f["arr_0"].shape == (8, 4, 4, 1)


def test_planner_compiles_the_flow_step_and_sampler_for_a_tpu_slice(digits_dir):  # noqa: F811
  from dit_jax import aot  # pylint: disable=import-outside-toplevel
  c = tiny_config(digits_dir, **{"data.builtin": "", "data.image_size": 64, "eval.batch_size": 8,
                                 "objective.name": "flow", "eval.sampler": "heun2",
                                 "eval.steps": 4})
  devices = aot.topology_devices("v5p-8")
  b, (step, sample, loop) = aot.plan(c, devices, sampler_loop=True)
  assert isinstance(b.objective, objectives.Flow)
  assert step.flops > 0 and sample.flops > 0
  assert "whole sampler (heun2, 4 steps" in loop.name and loop.memory["total"] > 0
