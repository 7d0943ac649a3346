"""The scaling-grid runner (idempotence, resume) on tiny models; the report on synthetic metrics."""

import dataclasses
import io
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from dit_jax import model_table
from dit_jax.grid import presets, report, runner

# Two tiny grid models, 4 steps, evaluated at steps 2 and 4 with 20 samples of 4 DDPM steps.
TINY = {"model.overrides.hidden_size": 16, "model.overrides.depth": 1,
        "model.overrides.num_heads": 2, "data.global_batch_size": 16, "log_every_steps": 1,
        "checkpoint.every_steps": 2, "ema_decay": 0.5}


def tiny_preset():
  return presets.get_preset("mini", total_steps=4, eval_every=2, num_samples=20,
                            sampler_options={"respacing": "4"},
                            sample_batch=20)


def read(path):
  with open(path, "rb") as f:
    return f.read()


def test_run_is_idempotent_and_resumes(tmp_path):
  root, preset = str(tmp_path / "grid"), tiny_preset()
  first = runner.run(preset, root, ["s8", "s2"], extra=TINY, out=io.StringIO())
  for m in ("s8", "s2"):
    st = first[m]
    assert st.trained_steps == [1, 2, 3, 4] and st.newly_evaluated == [2, 4]
    # keep_period = the evaluation period: step 2 survives checkpoint.keep = 1.
    assert runner.checkpoint_steps(os.path.join(root, m)) == [2, 4]
    metrics = runner.read_metrics(os.path.join(root, m))
    assert sorted(metrics) == [2, 4]
    assert all(np.isfinite(v["proxy_fid"]) and v["num_samples"] == 20 for v in metrics.values())
    with np.load(os.path.join(root, m, "samples.npz")) as f:
      assert f["arr_0"].shape == (20, 8, 8, 1) and f["arr_0"].dtype == np.uint8
      np.testing.assert_array_equal(f["arr_1"], np.arange(20) % 10)
  info = json.loads(read(os.path.join(root, "s2", "model.json")))
  assert (info["name"], info["patch"], info["tokens"], info["batch"]) == ("DiT-S/2", 2, 16, 16)
  assert json.loads(read(os.path.join(root, "s8", "model.json")))["tokens"] == 1
  assert info["gflops"] > 0 and info["params"] > 1000
  grid = json.loads(read(os.path.join(root, "grid.json")))
  assert grid["preset"] == "mini" and grid["settings"]["total_steps"] == 4
  assert grid["models"] == ["s2", "s8"]
  metrics_bytes = {m: read(os.path.join(root, m, "metrics.json")) for m in ("s8", "s2")}
  s2_final = runner.read_metrics(os.path.join(root, "s2"))[4]

  # A rerun trains and evaluates nothing, and rewrites no result.
  out = io.StringIO()
  again = runner.run(preset, root, ["s8", "s2"], extra=TINY, out=out)
  for m in ("s8", "s2"):
    assert again[m].trained_steps == [] and again[m].newly_evaluated == []
    assert read(os.path.join(root, m, "metrics.json")) == metrics_bytes[m]
  assert "checkpoints [2, 4]; evaluated [2, 4]" in out.getvalue()

  # s2 interrupted after its step-2 checkpoint (final checkpoint, samples, metrics lost);
  # s8 interrupted during its first evaluation (trained, step 2 not scored).
  shutil.rmtree(os.path.join(root, "s2", "checkpoints", "4"))
  os.remove(os.path.join(root, "s2", "samples.npz"))
  for m, drop in (("s2", "4"), ("s8", "2")):
    path = os.path.join(root, m, "metrics.json")
    values = json.loads(read(path))
    del values[drop]
    with open(path, "w") as f:
      json.dump(values, f)
  resumed = runner.run(preset, root, ["s8", "s2"], extra=TINY, out=io.StringIO())
  assert resumed["s2"].trained_steps == [3, 4] and resumed["s2"].newly_evaluated == [4]
  assert resumed["s8"].trained_steps == [] and resumed["s8"].newly_evaluated == [2]
  after = {m: runner.read_metrics(os.path.join(root, m)) for m in ("s8", "s2")}
  assert sorted(after["s2"]) == sorted(after["s8"]) == [2, 4]
  assert os.path.exists(os.path.join(root, "s2", "samples.npz"))
  # The resumed training reaches the same weights, so the same samples and scores.
  assert after["s2"][4]["proxy_fid"] == pytest.approx(s2_final["proxy_fid"], rel=1e-3)
  assert after["s2"][2] == json.loads(metrics_bytes["s2"])["2"]


def test_print_mode_and_bad_requests(tmp_path):
  root = str(tmp_path / "paper")
  out = io.StringIO()
  st = runner.run(presets.get_preset("paper"), root, ["s2", "xl2"], data="gs://b/latents",
                  mode="print", out=out)
  text = out.getvalue()
  assert "python -m dit_jax.main --config=configs/xl2.py" in text
  assert "--config.checkpoint.keep_period=50000" in text and "--config.total_steps=400000" in text
  assert "--config.data.dir=gs://b/latents" in text
  assert len(st["s2"].commands) == 1 and not os.path.exists(root)  # nothing run or written
  tpu = io.StringIO()
  runner.run(presets.get_preset("paper"), root, ["s2"], data="gs://b/l", mode="print",
             tpu="dit-{model}", zone="z", out=tpu)
  assert "tpu_vm.sh dit-s2 z configs/s2.py" in tpu.getvalue()
  with pytest.raises(ValueError, match="unknown models"):
    runner.run(presets.get_preset("mini"), root, ["s16"], mode="print")
  with pytest.raises(ValueError, match="--data"):
    runner.run(presets.get_preset("paper"), root, ["s2"])
  with pytest.raises(ValueError, match="must divide the evaluation period"):
    presets.model_config(presets.get_preset("mini", eval_every=300), "s2")
  assert presets.get_preset("paper").eval_steps() == [50_000 * i for i in range(1, 9)]
  assert presets.get_preset("mini", total_steps=1200).eval_steps(1200) == [500, 1000, 1200]


def write_synthetic_grid(root, preset_name, fids):
  """grid.json, model.json and metrics.json of a finished grid; fids: model -> final FID."""
  preset = presets.get_preset(preset_name)
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, "grid.json"), "w") as f:
    json.dump({"preset": preset.name, "settings": dataclasses.asdict(preset),
               "models": sorted(fids)}, f)
  for model, fid in fids.items():
    size, patch = model.rstrip("248").upper(), int(model[-1])
    name = f"DiT-{size}/{patch}"
    gflops, params = model_table.PAPER_256[name]
    os.makedirs(os.path.join(root, model))
    info = {"model": model, "name": name, "size": size, "patch": patch, "params": params,
            "gflops": gflops, "batch": 256, "tokens": (32 // patch)**2}
    steps = preset.eval_steps()
    # FID falls along training to the given final value.
    key = "proxy_fid" if preset.metric == "proxy" else "fid"
    metrics = {str(s): {key: fid * (steps[-1] / s)**0.3, "precision": 0.5, "recall": 0.4,
                        "num_samples": preset.num_samples} for s in steps}
    for name_, value in (("model.json", info), ("metrics.json", metrics)):
      with open(os.path.join(root, model, name_), "w") as f:
        json.dump(value, f)


def paper_fids():
  return {f"{s}{p}": report.PAPER_FID_400K[f"DiT-{s.upper()}/{p}"]
          for s in ("s", "b", "l", "xl") for p in (8, 4, 2)}


def test_report_on_synthetic_paper_grid(tmp_path, monkeypatch):
  root = str(tmp_path / "paper")
  write_synthetic_grid(root, "paper", paper_fids())
  drawn = {}
  real_figure = report._figure  # pylint: disable=protected-access

  def spy(path, draw):  # keeps each figure's axes for the checks below
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots()
    draw(ax)
    drawn[os.path.basename(path)] = (ax.get_xscale(), ax.get_yscale(), ax.get_xlabel(),
                                     ax.get_ylabel(), len(ax.get_legend().get_texts()))
    plt.close(fig)
    real_figure(path, draw)

  monkeypatch.setattr(report, "_figure", spy)
  out = report.write_report(root)
  # results.csv: every (model, step), with the paper's training compute convention.
  import csv
  with open(out["csv"]) as f:
    table = list(csv.DictReader(f))
  assert len(table) == out["rows"] == 12 * 8
  xl2 = [r for r in table if r["model"] == "xl2" and r["step"] == "400000"][0]
  assert float(xl2["train_compute_gflops"]) == pytest.approx(118.64 * 256 * 400_000 * 3)
  assert float(xl2["fid"]) == pytest.approx(19.47) and xl2["params"] == "675129632"
  assert {"model", "patch", "params", "gflops", "step", "precision", "recall"} <= set(table[0])
  # Spearman's rho of the paper's own Table 4, and both findings hold pair by pair.
  assert out["spearman"] == pytest.approx(-0.9161, abs=1e-4)
  assert all(ok for *_, ok in out["findings"]["patch"]) and len(out["findings"]["patch"]) == 8
  assert all(ok for *_, ok in out["findings"]["size"]) and len(out["findings"]["size"]) == 9
  md = read(out["markdown"]).decode()
  assert "paper FID-50K @ 400K" in md and "| DiT-XL/2 | 2 | 256 | 675,129,632 | 118.6 |" in md
  assert "holds for 8 of 8 pairs" in md and "holds for 9 of 9 pairs" in md
  # Figures: PNGs with labelled axes, log scales where the paper has them, a legend.
  for png in out["figures"]:
    with Image.open(png) as im:
      assert im.format == "PNG" and im.size[0] > 300
  assert drawn["fid_vs_gflops.png"][:2] == ("log", "log")
  assert drawn["fid_vs_compute.png"][:2] == ("log", "log")
  assert drawn["fid_vs_steps.png"][:2] == ("linear", "log")
  assert "Gflops" in drawn["fid_vs_gflops.png"][2] and "FID-50K" in drawn["fid_vs_gflops.png"][3]
  assert "training compute" in drawn["fid_vs_compute.png"][2]
  assert drawn["fid_vs_steps.png"][4] == 12 and drawn["fid_vs_gflops.png"][4] == 13  # + paper


def test_report_names_the_pairs_that_break_a_finding(tmp_path):
  fids = paper_fids()
  fids["b2"] = 80.0  # worse than S/2 (68.40) and than B/4 (68.38)
  del fids["l8"]     # a model that has not finished
  root = str(tmp_path / "broken")
  write_synthetic_grid(root, "mini", fids)
  out = report.write_report(root)
  md = read(out["markdown"]).decode()
  assert "holds for 6 of 7 pairs; fails for b4 -> b2" in md
  assert "holds for 6 of 7 pairs; fails for s2 -> b2" in md
  assert "proxy FID" in md and "paper FID-50K" not in md
  assert out["spearman"] > -0.9161


def test_cli_print_and_report(tmp_path):
  import subprocess
  import sys
  root_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="",
             PYTHONPATH=root_dir + os.pathsep + os.environ.get("PYTHONPATH", ""))
  grid = str(tmp_path / "grid")
  write_synthetic_grid(grid, "mini", paper_fids())
  r = subprocess.run([sys.executable, "-m", "dit_jax.grid", "report", f"--root={grid}"],
                     cwd=root_dir, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "Spearman rho (Gflops vs FID, final step): -0.916" in r.stdout
  assert os.path.exists(os.path.join(grid, "fid_vs_compute.png"))
  # The recorded preset is reused by a rerun; --mode=print runs nothing.
  r = subprocess.run([sys.executable, "-m", "dit_jax.grid", "run", f"--root={grid}",
                      "--models=xl2", "--mode=print", "--steps=3000"], cwd=root_dir, env=env,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert ("python -m dit_jax.main --config=configs/mini.py:xl2 --workdir=" in r.stdout
          and "--config.total_steps=3000" in r.stdout)


def test_inception_evaluation_bookkeeping(tmp_path):
  # The paper preset's evaluation with the sample/evaluate CLIs replaced by fakes.
  preset = presets.get_preset("paper", total_steps=4, eval_every=2, num_samples=6)
  workdir = str(tmp_path / "grid" / "xl2")
  calls = []

  def fake(cmd):
    calls.append(cmd)
    args = dict(a[2:].split("=", 1) for a in cmd if a.startswith("--") and "=" in a)
    if "dit_jax.sample" in cmd:
      assert args["cfg_scale"] == "1" and args["sampler_options"] == "respacing=250"
      os.makedirs(os.path.dirname(args["out"]), exist_ok=True)
      np.savez(args["out"], arr_0=np.full((6, 4, 4, 3), int(args["step"]), np.uint8),
               arr_1=np.arange(6))
    else:
      assert args["reference"] == "ref.npz" and args["reference_cache"].endswith(
          os.path.join("grid", "reference_stats.npz"))
      with np.load(args["samples"]) as f:
        fid = 100.0 / f["arr_0"][0, 0, 0, 0]
      with open(args["out"], "w") as f:
        json.dump({"fid": fid, "precision": 0.5}, f)

  files = {"reference": "ref.npz", "inception": "inc.pth"}
  done = runner.evaluate_inception(preset, workdir, [2, 4], 4, files, runner=fake)
  assert len(calls) == 4 and {s: v["fid"] for s, v in done.items()} == {2: 50.0, 4: 25.0}
  assert runner.read_metrics(workdir)[4]["fid"] == 25.0
  with np.load(os.path.join(workdir, "samples.npz")) as f:  # the final step's samples
    assert f["arr_0"][0, 0, 0, 0] == 4
  assert not [f for f in os.listdir(os.path.join(workdir, "eval")) if f.endswith(".npz")]
  with pytest.raises(ValueError, match="--reference"):
    runner.evaluate_inception(preset, workdir, [2], 4, {}, runner=fake)


def test_grid_evaluates_with_a_fast_sampler(tmp_path):
  preset = presets.get_preset("mini", total_steps=2, eval_every=2, num_samples=20,
                              sample_batch=20, sampler="dpm++2m", sampler_steps=5)
  root = str(tmp_path / "grid")
  runner.run(preset, root, ["s8"], extra=TINY, out=io.StringIO())
  metrics = runner.read_metrics(os.path.join(root, "s8"))
  assert np.isfinite(metrics[2]["proxy_fid"])
  assert metrics[2]["sampler"] == "dpm++2m, 5 steps"
  cmds = runner.inception_commands(presets.get_preset("paper", sampler="dpm++2m",
                                                      sampler_steps=20), "/w/xl2", 50_000,
                                   "s.npz", "m.json", {})
  assert "--sampler=dpm++2m" in cmds[0] and "--steps=20" in cmds[0]
  assert not any("respacing" in a for a in cmds[0])
  assert "--sampler_options=respacing=250" in runner.inception_commands(
      presets.get_preset("paper"), "/w/xl2", 50_000, "s.npz", "m.json", {})[0]
  # grid.json settings recorded before sampler_options keep their meaning.
  assert presets.settings_options({"respacing": "250", "sampler": "", "spacing": "time"}) == {
      "respacing": "250"}
  assert presets.sampler_name({"respacing": "50", "sampler": ""}) == "'50' steps"
  assert presets.settings_options({"respacing": "250", "sampler": "ddim",
                                   "spacing": "logsnr"}) == {"spacing": "logsnr"}
