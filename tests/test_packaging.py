"""The README's first command installs [train] (no triton, no kornia): training on the CPU must work
with both absent. A subprocess hides them with a meta-path finder (an installed package cannot be
uninstalled for one test) and runs a tiny training run of the main job's CLI."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SCRIPT = """
import sys

class Hide:
    '''`import triton` / `import kornia` fail as on a machine without them.'''
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("triton", "kornia"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Hide())
from bionet_fast.train import main
code = main(["--t", "2", "--multiplier", "0.125", "--depth", "2", "--batch-size", "2", "--steps", "2",
             "--epochs", "1", "--precise-bn", "2", "--device", "cpu", "--quiet", "--workers", "0",
             "--image-size", "32", "--n-train", "4", "--n-val", "2", "--checkpoint-iters", "--out", "run"])
hidden = sorted(m for m in sys.modules if m.split(".")[0] in ("triton", "kornia"))
print("exit", code, "hidden modules loaded:", hidden)
"""


def test_cpu_training_needs_neither_triton_nor_kornia(tmp_path):
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=tmp_path, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "exit 0 hidden modules loaded: []", out.stdout[-2000:]
    assert (tmp_path / "run" / "model.safetensors").is_file()


def _extras():
    import ast

    tree = ast.parse((REPO / "setup.py").read_text())
    names = {}
    for n in tree.body:
        if isinstance(n, ast.Assign) and isinstance(n.targets[0], ast.Name) and isinstance(n.value, ast.List):
            try:
                names[n.targets[0].id] = ast.literal_eval(n.value)
            except ValueError:  # a list built from others (*ONNX): not one the tests read
                continue
    return names


def test_train_extra_has_what_the_main_job_needs_and_nothing_heavy():
    train = {name.lower() for name in _extras()["TRAIN"]}
    assert {"imagecodecs", "matplotlib", "tqdm", "pyyaml"} <= train
    assert not {"triton", "kornia"} & train


def test_ci_runs_the_readmes_second_command():
    readme = (REPO / "README.md").read_text()
    block = readme.split("```bash\n", 1)[1].split("```", 1)[0].strip().splitlines()
    assert block[0].startswith('pip install torch==2.13.0 -e ".[train,openvino]" && python -m bionet_fast.train --t 5')
    assert block[1] == 'pip install -e ".[test]" && python -m pytest -q tests'
    ci = (REPO / ".ci" / "run").read_text()
    assert "python -m pip install -q torch==2.13.0" in ci
    assert block[1] in ci
