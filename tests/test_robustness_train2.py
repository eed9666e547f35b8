"""Nothing lost, round two (issue 24), training's side: the EMA and the training state are one
generation (a kill between their writes, then a resume, equals an uninterrupted run), a damaged
scheduler state is named, and --grad-accum-steps never drops work silently. Tiny models."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bionet_fast.engine import checkpoint_io as tio
from bionet_fast.train import main as train

TINY = ["--t", "2", "--multiplier", "0.125", "--depth", "2", "--batch-size", "2", "--steps", "3",
        "--precise-bn", "2", "--device", "cpu", "--quiet", "--workers", "0", "--image-size", "32",
        "--n-train", "8", "--n-val", "4", "--seed", "3", "--no-augment"]


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _same(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), (a.name, k)


def test_a_kill_between_the_ema_and_state_writes_resumes_as_an_uninterrupted_run(tmp_path, monkeypatch, capsys):
    ema = ["--model-ema", "--model-ema-decay", "0.5", "--epochs", "2"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert train(TINY + ema + ["--out", str(straight)]) == 0
    real = tio.save_training_state

    def killed_before_the_state(out, *a, **k):  # ema.safetensors of step 6 is on disk already
        progress = a[4]
        if progress["global_step"] == 6:
            raise KeyboardInterrupt("killed between the EMA and the state writes")
        return real(out, *a, **k)

    monkeypatch.setattr(tio, "save_training_state", killed_before_the_state)
    assert train(TINY + ema + ["--out", str(killed)]) == 130
    monkeypatch.setattr(tio, "save_training_state", real)
    assert json.loads((killed / "training_state.json").read_text())["progress"]["global_step"] == 3
    assert train(["--resume", str(killed), "--quiet"]) == 0
    for name in ("ema.safetensors", "model.safetensors", "last.safetensors"):
        _same(straight / name, killed / name)


def test_a_damaged_scheduler_state_is_named(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(TINY + ["--epochs", "1", "--out", str(out)]) == 0
    path = out / "training_state.json"
    meta = json.loads(path.read_text())
    for bad in ({"last_epoch": "three"}, {"base_lrs": ["x"]}, [1, 2]):
        meta["scheduler"] = bad if isinstance(bad, list) else {**meta["scheduler"], **bad}
        path.write_text(json.dumps(meta))
        assert train(["--resume", str(out), "--epochs", "2", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and str(path) in err and "scheduler" in err


def test_accumulation_longer_than_the_run_is_a_warning(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(TINY + ["--epochs", "1", "--grad-accum-steps", "4", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "no optimizer step is taken" in err and "--grad-accum-steps 3 or less" in err


def test_resume_with_another_accumulation_says_what_it_drops(tmp_path, capsys):
    out = tmp_path / "run"
    # 3 steps per epoch, cycles of 2: the epoch ends one batch into a cycle, its gradient saved
    assert train(TINY + ["--epochs", "1", "--grad-accum-steps", "2", "--out", str(out)]) == 0
    capsys.readouterr()
    assert train(["--resume", str(out), "--epochs", "2", "--grad-accum-steps", "3", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "--grad-accum-steps 2 -> 3" in err and "1 batch(es)" in err and "dropped" in err
