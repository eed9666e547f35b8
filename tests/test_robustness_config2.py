"""Nothing lost, round two (issue 24): hostile and malformed config.json files, refused by name
before any tensor is allocated (under a memory cap, within seconds), and the planner's bounds."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bionet_fast.models import BiONet
from bionet_fast.plan import main as plan

ROOT = Path(__file__).resolve().parents[1]
CAP_MIB = 2500  # enough for torch's import; far below any of the allocations these configs asked for

HOSTILE = {  # field -> (config.json edit, what the error must name)
    "iterations": ({"iterations": 10**9}, "iterations"),
    "iterations_1e6": ({"iterations": 10**6}, "iterations"),
    "classes": ({"classes": 10**9}, "classes"),
    "in_channels": ({"in_channels": 10**9}, "in_channels"),
    "depth": ({"depth": 50}, "depth"),
    "tile": ({"inference": {"tile_size": 10**12}}, "tile_size"),
    "list": ([1, 2, 3], "JSON array"),
    "null": (None, "JSON null"),
    "string_number": ({"depth": "4"}, "depth"),
    "inf_multiplier": ({"multiplier": float("inf")}, "multiplier"),
    "null_classes": ({"classes": None}, "classes"),
    "string_threshold": ({"inference": {"threshold": "high"}}, "threshold"),
}


def _folder(base: Path, key: str) -> Path:
    folder = base / key
    BiONet(in_channels=3, classes=1, iterations=1, multiplier=0.125, depth=2).save_pretrained(folder)
    edit = HOSTILE[key][0]
    if isinstance(edit, dict):
        data = json.loads((folder / "config.json").read_text())
        for k, v in edit.items():
            data[k] = {**data[k], **v} if isinstance(v, dict) else v
    else:
        data = edit
    (folder / "config.json").write_text(json.dumps(data))  # inf is written as Infinity, as Python reads it
    (folder / "model.safetensors").unlink()  # the old code never reached this error
    return folder


def test_hostile_configs_are_refused_by_name_under_a_memory_cap(tmp_path):
    folders = {k: _folder(tmp_path, k) for k in HOSTILE}
    (tmp_path / "x.png").write_bytes(b"")  # never read: the model is refused first
    script = textwrap.dedent(f"""
        import json, resource, sys, time
        resource.setrlimit(resource.RLIMIT_AS, ({CAP_MIB} << 20, {CAP_MIB} << 20))
        from bionet_fast.predict import main
        results = {{}}
        for key, folder in json.loads(sys.argv[1]).items():
            start = time.time()
            rc = main(["--checkpoint", folder, "--out", {str(tmp_path / 'out')!r}, {str(tmp_path / 'x.png')!r},
                       "--no-progress"])
            results[key] = [rc, time.time() - start]
        print("RESULTS" + json.dumps(results))
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", script, json.dumps({k: str(v) for k, v in folders.items()})],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert "Traceback" not in proc.stderr and "MemoryError" not in proc.stderr, proc.stderr
    results = json.loads(proc.stdout.split("RESULTS", 1)[1])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == len(HOSTILE), proc.stderr
    for (key, (_, field)), line in zip(HOSTILE.items(), errors):
        rc, seconds = results[key]
        assert rc == 2 and seconds < 10, (key, rc, seconds)
        assert str(folders[key] / "config.json") in line and field in line, (key, line)


def test_the_limits_name_the_machine_they_come_from():
    with pytest.raises(ValueError, match="192 GB"):
        BiONet(in_channels=10**8)
    with pytest.raises(ValueError, match="at most 1024"):
        BiONet(iterations=1025)
    BiONet(in_channels=4, classes=10, multiplier=0.125, depth=5, iterations=64)  # real configs still build


@pytest.mark.parametrize("argv,field", [(["--t", "100000"], "1024"), (["--depth", "40"], "depth"),
                                        (["--t", "512", "--budget", "8GiB"], "--t"),
                                        (["--image-size", "1000000000000"], "--image-size")])
def test_the_planner_refuses_what_it_cannot_compute_in_seconds(capsys, argv, field):
    assert plan(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and field in err and "Traceback" not in err


# --- 3: export never writes onto a model folder's files, a folder, or an existing file ----------
def test_export_refuses_a_model_folders_own_files_folders_and_existing_files(tmp_path, capsys):
    from bionet_fast.export import main as export

    run = tmp_path / "run"
    BiONet(in_channels=3, classes=1, iterations=1, multiplier=0.125, depth=2).save_pretrained(run)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    base = ["--checkpoint", str(run), "--format", "torchscript", "--no-verify"]
    (tmp_path / "file").write_bytes(b"a file, not a folder")
    for out, says in ((run / "model.safetensors", "model folder"), (run / "config", "model folder"),
                      (run / "README.md", "model folder"), (tmp_path, "is a folder"),
                      (tmp_path / "file" / "m.pt", "not a writable folder")):
        assert export(base + ["--out", str(out), "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and says in err and "Traceback" not in err, (out, err)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # the folder still loads
    (tmp_path / "m.pt").write_bytes(b"someone's file")
    assert export(base + ["--out", str(tmp_path / "m.pt")]) == 2
    assert "--overwrite" in capsys.readouterr().err and (tmp_path / "m.pt").read_bytes() == b"someone's file"
    assert export(base + ["--out", str(tmp_path / "m.pt"), "--overwrite"]) == 0
