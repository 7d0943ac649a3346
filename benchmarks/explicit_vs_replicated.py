"""The sharded data-parallel steps against the replicated XLA step: relative errors after 3
float32 steps on 8 CPU devices (the figures docs/pods.md quotes; tests/test_state_sharding.py
asserts them below 1e-6 for whole trees).

  python benchmarks/explicit_vs_replicated.py
"""
import os, sys, tempfile
os.environ["XLA_FLAGS"]="--xla_force_host_platform_device_count=8"; os.environ["JAX_PLATFORMS"]="cpu"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "tests"), ROOT]
from test_train import tiny_config
from test_state_sharding import _run_steps, _tree_rel_error, _max_rel_error, REPLICATED, XLA
from dit_jax import input_pipeline, demo_data
d = tempfile.mkdtemp(); demo_data.write_digits(d); info = input_pipeline.get_info(d)
cfg = lambda **o: tiny_config(d, **{"model.dtype": "float32", "data.global_batch_size": 32, **o})
TOKENS = {"model.attention_impl": "xla_tokens"}
refs = {}
# The explicit step, then the update layout with XLA's collectives (the same program as the
# reference but for where the gradient sums go), in both attention layouts, each against the
# replicated step in its own layout.
for o in ({}, {"optim.microbatches": 2}, {"sharding.modulation": "gathered"}, XLA,
          {**XLA, **TOKENS}):
  attn = o.get("model.attention_impl", "auto")
  if attn not in refs:
    refs[attn] = _run_steps(cfg(**REPLICATED, **XLA, **{"model.attention_impl": attn}), info)[1]
  ref = refs[attn]
  _, got, _ = _run_steps(cfg(**o), info)
  print(o or "explicit, no microbatches", [f"{part} tree {_tree_rel_error(getattr(got, part), getattr(ref, part)):.1e} max {_max_rel_error(getattr(got, part), getattr(ref, part)):.1e}" for part in ("params", "ema_params", "opt_state")])
