"""Importing the library changes nothing in the process's environment; the CLIs set their own
process's OpenMP wait policy before torch loads (issue 21)."""
import os
import subprocess
import sys

SCRIPT = """
import os, sys, json
before = dict(os.environ)
import bionet_fast
from bionet_fast import BiONet, from_pretrained, export  # the lazy names load torch and the models
import bionet_fast.train, bionet_fast.evaluate, bionet_fast.predict  # imported, not run
assert "torch" in sys.modules
changed = {k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k)}
print(json.dumps(sorted(changed)))
"""

CLI = """
import os, runpy, sys
sys.argv = ["bionet_fast.train", "--help"]
seen = {}
real_import = __builtins__.__import__
def spy(name, *args, **kw):  # what OMP_WAIT_POLICY is when torch is first imported
    if name == "torch" and "torch" not in sys.modules:
        seen["at_torch_import"] = os.environ.get("OMP_WAIT_POLICY")
    return real_import(name, *args, **kw)
__builtins__.__import__ = spy
try:
    runpy.run_module("bionet_fast.train", run_name="__main__", alter_sys=True)
except SystemExit:
    pass
print(seen)
"""


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    return {**env, **extra}


def test_importing_the_package_leaves_os_environ_unchanged():
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


def test_the_train_cli_sets_its_own_wait_policy_before_torch_loads_and_yours_wins():
    for given, want in ((None, "PASSIVE"), ("ACTIVE", "ACTIVE")):
        env = _env(**({"OMP_WAIT_POLICY": given} if given else {}))
        out = subprocess.run([sys.executable, "-c", CLI], env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        assert out.stdout.strip().splitlines()[-1] == repr({"at_torch_import": want}), out.stdout
