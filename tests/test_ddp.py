"""Multi-process training with torch's own launcher (DDP, gloo backend on the CPU)."""
import json
import os
import subprocess
import sys
from pathlib import Path

from bionet_fast import BiONet

ROOT = Path(__file__).resolve().parents[1]


def test_torchrun_two_processes_on_cpu(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "bionet_fast.train", "--t", "2", "--multiplier", "0.125", "--depth", "2", "--batch-size", "2",
           "--steps", "2", "--epochs", "2", "--image-size", "32", "--n-train", "8", "--n-val", "5",
           "--precise-bn", "2", "--device", "cpu", "--quiet", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("training data:") == 1  # only rank 0 talks
    assert "x2 processes" in r.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [rec["epoch"] for rec in records] == [1, 2]
    assert records[-1]["n_images"] == 5  # the two validation shards (3 + 2 images) were summed
    assert records[-1]["global_step"] == 4  # steps count per process
    for name in ("model.safetensors", "last.safetensors", "training_state.json", "curves.png", "samples.png"):
        assert (out / name).is_file(), name
    BiONet.from_pretrained(out)
