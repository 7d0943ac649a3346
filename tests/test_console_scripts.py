"""The console scripts of setup.py point at functions that run the entry points."""

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def console_scripts() -> dict[str, str]:
  """name -> 'module:function', read from setup.py without running it."""
  with open(os.path.join(ROOT, "setup.py"), encoding="utf-8") as f:
    tree = ast.parse(f.read())
  for node in ast.walk(tree):
    if isinstance(node, ast.Dict):
      for key, value in zip(node.keys, node.values):
        if isinstance(key, ast.Constant) and key.value == "console_scripts":
          entries = [e.value for e in value.elts]
          return {name.strip(): target.strip() for name, target in
                  (e.split("=") for e in entries)}
  raise AssertionError("setup.py declares no console_scripts")


def test_every_script_names_a_top_level_function():
  scripts = console_scripts()
  assert {"dit-train", "dit-sample", "dit-evaluate", "dit-grid", "dit-aot",
          "dit-convert"} <= set(scripts)
  for name, target in scripts.items():
    module, function = target.split(":")
    path = os.path.join(ROOT, *module.split(".")) + ".py"
    with open(path, encoding="utf-8") as f:
      functions = {n.name for n in ast.parse(f.read()).body if isinstance(n, ast.FunctionDef)}
    assert function in functions, f"{name}: {module} has no function {function}"


@pytest.mark.parametrize("name,flag", [("dit-train", "--workdir"), ("dit-aot", "--topology")])
def test_script_runs_its_flags(name, flag):
  module, function = console_scripts()[name].split(":")
  code = (f"import sys; sys.argv = [{name!r}, '--helpfull']; "
          f"from {module} import {function}; {function}()")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                     env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"), timeout=300)
  # absl prints the usage and the flags of every module, then exits with 1.
  assert "Traceback" not in r.stderr, r.stderr[-2000:]
  assert f"USAGE: {name}" in r.stdout and flag in r.stdout, r.stdout[-2000:]
