"""Test setup: 8 fake CPU devices so sharding code runs on a laptop or CI box.

XLA_FLAGS must be set before jax is imported anywhere, hence module level here.
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  _flags += " --xla_force_host_platform_device_count=8"
# The tests' programs are tiny: their time is XLA's CPU compilation, which LLVM's cheapest
# optimisation level shortens (by about a seventh of the suite). HLO passes still run; the
# numbers differ from -O2's by float rounding at most. Subprocesses inherit these flags
# (test_main_cli.env).
if "xla_backend_optimization_level" not in _flags:
  _flags += " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = _flags.strip()
# TensorFlow is only used for tf.data; keep it off any accelerator and quiet.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# libtpu (installed for the AOT TPU-topology tests) allows one process per machine unless told.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import sys  # noqa: E402

# configs/ is a directory of experiment files next to the package, as in the Flax examples.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

# Many tests compile the same tiny train step in fresh jit closures and subprocesses: share
# compiled executables through JAX's persistent cache (subprocesses inherit the variables).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.environ.get("TMPDIR", "/tmp"), "dit_jax_test_jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
