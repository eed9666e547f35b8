"""Nothing lost, nothing silently wrong on the training side (issue 16): one run per folder, resume
and overwrite guards, label maps, resume overrides, divergence wherever it shows, mixed-size
validation, truncated files, evaluate's output folder, unwritable folders, file modes and
interrupted saves. Tiny models; the shared run is trained once per module."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from bionet_fast import BiONet
from bionet_fast.data import SegmentationDataset
from bionet_fast.data.synthetic import make_synthetic_nuclei
from bionet_fast.engine import checkpoint_io as tio
from bionet_fast.engine.run_lock import RunLock
from bionet_fast.evaluate import default_out
from bionet_fast.evaluate import main as evaluate
from bionet_fast.train import main as train
from bionet_fast.utils import files

TINY = ["--t", "2", "--multiplier", "0.125", "--depth", "2", "--batch-size", "2", "--steps", "2", "--epochs", "1",
        "--precise-bn", "2", "--device", "cpu", "--quiet", "--workers", "0", "--image-size", "32",
        "--n-train", "8", "--n-val", "4", "--no-augment"]


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()  # train() sets the count of its run
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shared") / "run"
    assert train(TINY + ["--out", str(out)]) == 0
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


# --- 1-3: one run per folder; --resume needs a state; a model folder needs --overwrite -------------
def test_a_second_run_into_a_locked_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    with RunLock(out):  # another run holds the folder
        assert train(TINY + ["--out", str(out)]) == 2
        assert "in use by another training run" in _err(capsys)
    assert not (out / "metrics.jsonl").exists()
    # a dead run's lock file is taken over, with a message
    (out / ".lock").write_text("999999999 otherhost\n")
    assert train(TINY + ["--out", str(out)]) == 0
    err = _err(capsys)
    assert "took over the lock" in err and "999999999" in err
    assert (out / ".lock").read_text() == ""  # released: emptied at exit


def test_resume_of_a_folder_without_state_is_an_error(one_epoch, tmp_path, capsys):
    run = _copy(one_epoch, tmp_path)
    for f in run.glob("training_state*"):
        f.unlink()
    before = (run / "metrics.jsonl").read_bytes(), (run / "model.safetensors").read_bytes()
    assert train(["--resume", str(run), "--quiet"]) == 2
    err = _err(capsys)
    assert "no resumable state" in err and "metrics.jsonl" in err and "--overwrite" in err
    assert ((run / "metrics.jsonl").read_bytes(), (run / "model.safetensors").read_bytes()) == before


def test_out_into_a_saved_model_needs_overwrite(tmp_path, capsys):
    folder = tmp_path / "model"
    BiONet(3, 1, 2, 0.125, 2).save_pretrained(folder)
    weights = (folder / "model.safetensors").read_bytes()
    assert train(TINY + ["--out", str(folder)]) == 2
    assert "--overwrite" in _err(capsys)
    assert (folder / "model.safetensors").read_bytes() == weights


# --- 5: label maps train K classes; a value >= K names the file --------------------------------
def _label_dataset(root: Path, top: int) -> Path:
    images, masks = make_synthetic_nuclei(3, size=32, seed=0)
    for i in range(3):
        labels = (masks[i] * (1 + (np.arange(32)[None, :] >= 16))).astype(np.uint8)  # classes 1 and 2
        labels[0, 0] = top
        for d, a in (("x", images[i]), ("y", labels)):
            (root / d).mkdir(parents=True, exist_ok=True)
            Image.fromarray(a).save(root / d / f"im{i}.png")
    return root


def test_label_maps_keep_their_classes(tmp_path, capsys):
    data = _label_dataset(tmp_path / "ok", top=2)
    ds = SegmentationDataset(data, classes=3, train=False)
    assert set(np.unique(ds[0][1].numpy())) == {0.0, 1.0, 2.0}  # class 2 is not binarised away
    assert set(np.unique(SegmentationDataset(data, train=False)[0][1].numpy())) == {0.0, 1.0}
    bad = _label_dataset(tmp_path / "bad", top=3)
    assert train(TINY + ["--train-data", str(bad), "--classes", "3", "--out", str(tmp_path / "r")]) == 2
    err = _err(capsys)
    assert "im0.png" in err and "value 3" in err and "--classes 3" in err
    assert not (tmp_path / "r").exists()


# --- 6: overrides given with --resume take effect and are printed, or are refused --------------
def test_resume_overrides_take_effect_or_are_refused(one_epoch, tmp_path, capsys):
    run = _copy(one_epoch, tmp_path)
    assert train(["--resume", str(run), "--batch-size", "4"]) == 2
    assert "--batch-size" in _err(capsys)
    assert train(["--resume", str(run), "--lr", "0.001", "--epochs", "2", "--quiet"]) == 0
    assert "--lr 0.01 -> 0.001" in capsys.readouterr().out
    record = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert record["epoch"] == 2 and record["lr"] == pytest.approx(0.001 / (1 + 3e-5 * 4))
    assert json.loads((run / "train_args.json").read_text())["lr"] == 0.001


# --- 7: divergence wherever it shows; one exit code and message; nothing non-finite saved ------
def _finite_folder(out: Path) -> None:
    for f in out.glob("*.safetensors"):
        assert all(torch.isfinite(t).all() for t in load_file(str(f)).values() if t.is_floating_point()), f


@pytest.mark.parametrize("lr", ["10", "1e5", "1e13"])
def test_divergence_is_one_clean_error_at_every_lr(tmp_path, capsys, lr):
    out = tmp_path / "run"
    rc = train(TINY + ["--lr", lr, "--epochs", "2", "--steps", "3", "--save-every-steps", "1", "--out", str(out)])
    err = _err(capsys)
    assert rc == 3 and "error: training diverged:" in err and "a lower --lr (e.g. " in err, err
    _finite_folder(out)
    m = re.search(r"global step (\d+)", err)
    kept = re.search(r"after \d+ epoch\(s\), step (\d+)", err)
    if m and kept:  # the state called good is older than the update that blew up
        assert int(kept.group(1)) <= int(m.group(1)) - 2


def test_nonfinite_batchnorm_statistics_are_never_saved(tmp_path, capsys, monkeypatch):
    """Weights finite, BatchNorm statistics not: caught before the epoch's validation and save."""
    from bionet_fast.engine.training.trainer import Trainer

    real = Trainer.recalibrate_bn

    def poisoned(self, epoch):
        real(self, epoch)
        next(b for n, b in self.model.named_buffers() if n.endswith("running_var")).fill_(float("inf"))

    monkeypatch.setattr(Trainer, "recalibrate_bn", poisoned)
    out = tmp_path / "run"
    assert train(TINY + ["--out", str(out)]) == 3
    err = _err(capsys)
    assert "training diverged" in err and "BatchNorm statistic" in err and "running_var" in err
    assert not (out / "model.safetensors").exists() and not (out / "last.safetensors").exists()


# --- 9: a validation set of mixed sizes, more than 16 images -----------------------------------
def test_mixed_size_validation_set(tmp_path):
    images, masks = make_synthetic_nuclei(20, size=40, seed=1)
    for i in range(20):
        s = 32 if i < 17 else 40  # the odd sizes come after the first 16
        for d, a in (("x", images[i][:s, :s]), ("y", masks[i][:s, :s] * 255)):
            (tmp_path / "val" / d).mkdir(parents=True, exist_ok=True)
            Image.fromarray(a).save(tmp_path / "val" / d / f"v{i:02d}.png")
    train_data = tmp_path / "train"
    shutil.copytree(tmp_path / "val", train_data)
    out = tmp_path / "run"
    assert train(TINY + ["--train-data", str(train_data), "--valid-data", str(tmp_path / "val"),
                         "--steps", "1", "--precise-bn", "0", "--out", str(out)]) == 0
    assert json.loads((out / "metrics.jsonl").read_text())["n_images"] == 20


# --- 11: truncated files are errors naming the file ----------------------------------------------
def test_truncated_files_name_themselves(one_epoch, tmp_path, capsys):
    run = _copy(one_epoch, tmp_path)
    state = run / "training_state.json"
    state.write_text(state.read_text()[:40])
    assert train(["--resume", str(run), "--epochs", "2", "--quiet"]) == 2
    assert "training_state.json" in _err(capsys)
    run = Path(shutil.copytree(one_epoch, tmp_path / "run2"))
    tensors = run / json.loads((run / "training_state.json").read_text())["tensors"]
    tensors.write_bytes(tensors.read_bytes()[:100])
    assert train(["--resume", str(run), "--epochs", "2", "--quiet"]) == 2
    assert tensors.name in _err(capsys)
    for name, cut in (("model.safetensors", 100), ("config.json", 20)):
        run = Path(shutil.copytree(one_epoch, tmp_path / f"ev-{name}"))
        (run / name).write_bytes((run / name).read_bytes()[:cut])
        assert evaluate(["--checkpoint", str(run), "--data", "synthetic", "--device", "cpu", "--quiet"]) == 2
        assert name in _err(capsys)


# --- 12, 13: evaluate's default output folder; unwritable --out ------------------------------------
def test_evaluate_output_beside_a_pt_file_and_unwritable_out(tmp_path, capsys):
    pt = tmp_path / "ckpts" / "model.pt"
    pt.parent.mkdir()
    pt.write_bytes(b"")
    assert default_out(str(pt), "monuseg/test") == tmp_path / "ckpts" / "model-eval-test"
    assert default_out(str(tmp_path / "ckpts"), "monuseg/test") == tmp_path / "ckpts" / "eval-test"
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert train(TINY + ["--out", str(blocker / "run")]) == 2
    assert "--out" in _err(capsys)
    assert evaluate(["--checkpoint", str(tmp_path / "ckpts"), "--data", "synthetic", "--out", str(blocker / "e")]) == 2
    assert "--out" in _err(capsys)
    if os.geteuid() != 0:  # root writes into read-only folders anyway
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        assert train(TINY + ["--out", str(ro / "run")]) == 2
        assert "--out" in _err(capsys)


# --- also: umask modes, fsync before rename, temp files of an interrupted save ---------------------
def test_saves_have_the_umask_mode_are_fsynced_and_leave_no_temp_files(tmp_path, monkeypatch):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append("replace"), real_replace(a, b))[1])
    path = tio.save_tensors(tmp_path / "w.safetensors", {"a": torch.zeros(3)})
    assert calls == ["fsync", "replace", "fsync"]  # the file before the rename, the folder after
    assert os.stat(path).st_mode & 0o777 == files.file_mode()
    if files._UMASK == 0o022:
        assert os.stat(path).st_mode & 0o777 == 0o644
    (tmp_path / ".w.safetensors.abc123.tmp").write_bytes(b"half")
    (tmp_path / ".tmpAbC123").write_bytes(b"half")  # safetensors' own temp name
    removed = files.remove_stale_temps(tmp_path)
    assert sorted(p.name for p in removed) == [".tmpAbC123", ".w.safetensors.abc123.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]


def test_training_start_removes_temp_files_of_a_killed_save(one_epoch, tmp_path, capsys):
    run = _copy(one_epoch, tmp_path)
    (run / ".last.safetensors.x1y2.tmp").write_bytes(b"half")
    assert train(["--resume", str(run), "--epochs", "2", "--quiet"]) == 0
    assert "removed 1 temporary file" in capsys.readouterr().err
    assert not list(run.glob("*.tmp"))


# --- fault injection: SIGKILL at a random step, resume, bit-identical ----------------------------------
def test_sigkill_at_a_random_step_then_resume_is_bit_identical(tmp_path):
    import random

    # one thread everywhere: bit for bit holds for one thread count
    args = TINY + ["--epochs", "2", "--steps", "3", "--save-every-steps", "1", "--seed", "4", "--threads", "1"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert train(args + ["--out", str(straight)]) == 0
    # after any step of the 6 but the first (the state after step k is saved during step k + 1,
    # once its loss is known to be finite) and the last
    step = random.Random().randint(2, 5)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "bionet_fast.train", *args, "--out", str(killed),
                        "--debug-kill-at-step", str(step)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == -9, (step, r.stderr)
    assert train(["--resume", str(killed), "--quiet"]) == 0, step
    for name in ("last.safetensors", "model.safetensors"):
        a, b = load_file(str(straight / name)), load_file(str(killed / name))
        assert all(torch.equal(a[k], b[k]) for k in a), (step, name)
    strip = lambda out: [{k: v for k, v in json.loads(x).items() if k not in ("epoch_time_s", "images_per_s")}
                         for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert strip(straight) == strip(killed), step


# --- 16: the synthetic run can be evaluated without a data folder ----------------------------------
def test_evaluate_the_synthetic_run(one_epoch, tmp_path, capsys):
    run = _copy(one_epoch, tmp_path)
    assert evaluate(["--checkpoint", str(run), "--data", "synthetic", "--device", "cpu", "--quiet"]) == 0
    metrics = json.loads((run / "eval-synthetic" / "metrics.json").read_text())
    assert metrics["n_images"] == 48 and 0 <= metrics["dice"] <= 1
    assert "48 synthetic" in capsys.readouterr().out
