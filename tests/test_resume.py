"""Resuming reproduces an uninterrupted run bit for bit on the CPU; a NaN loss stops training
with exit code 3 and leaves the last good checkpoint intact."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bionet_fast import BiONet
from bionet_fast.train import main as train

TINY = ["--t", "2", "--multiplier", "0.125", "--depth", "2", "--batch-size", "2", "--steps", "3",
        "--precise-bn", "2", "--device", "cpu", "--quiet", "--workers", "0", "--image-size", "32",
        "--n-train", "8", "--n-val", "4", "--seed", "3"]
TIMING = ("epoch_time_s", "images_per_s")


def _same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def _records(out: Path) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


def _state_tensors(out: Path) -> dict:
    meta = json.loads((out / "training_state.json").read_text())
    return load_file(str(out / meta["tensors"]))


@pytest.mark.parametrize("accum", [1, 2], ids=["plain", "accum2"])
def test_resume_after_an_epoch_equals_straight_run(tmp_path, accum):
    """accum 2 with 3 steps per epoch: the epoch ends mid-cycle, its gradients are saved and restored."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    tiny = TINY + ["--grad-accum-steps", str(accum)]
    assert train(tiny + ["--epochs", "2", "--out", str(straight)]) == 0
    assert train(tiny + ["--epochs", "1", "--out", str(resumed)]) == 0
    assert train(["--resume", str(resumed), "--epochs", "2", "--quiet"]) == 0
    for name in ("last.safetensors", "model.safetensors"):
        _same_weights(straight / name, resumed / name)
    assert _records(straight) == _records(resumed)
    a, b = _state_tensors(straight), _state_tensors(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("optimizer."))
    # a finished run resumed again has nothing left to do and changes nothing
    assert train(["--resume", str(resumed), "--quiet"]) == 0
    _same_weights(straight / "last.safetensors", resumed / "last.safetensors")


@pytest.mark.parametrize("accum", [1, 3], ids=["plain", "accum3"])
def test_kill_mid_epoch_loses_only_the_steps_since_the_last_save(tmp_path, accum):
    """accum 3: the save at global step 4 is one batch into a cycle (its gradient is saved)."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    tiny = TINY + ["--grad-accum-steps", str(accum)]
    assert train(tiny + ["--epochs", "2", "--out", str(straight)]) == 0
    # save every 2 steps, "killed" at global step 5 (epoch 2, step 2): the save at step 4 survives
    rc = train(tiny + ["--epochs", "2", "--out", str(killed), "--save-every-steps", "2",
                       "--debug-exit-at-step", "5"])
    assert rc == 130
    state = json.loads((killed / "training_state.json").read_text())["progress"]
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (1, 1, 4)
    assert len(list(killed.glob("training_state.*.safetensors"))) == 1
    assert train(["--resume", str(killed), "--quiet"]) == 0
    _same_weights(straight / "last.safetensors", killed / "last.safetensors")
    _same_weights(straight / "model.safetensors", killed / "model.safetensors")
    assert _records(straight) == _records(killed)


def test_nan_loss_stops_with_exit_3_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    good, bad = tmp_path / "good", tmp_path / "bad"
    assert train(TINY + ["--epochs", "1", "--out", str(good)]) == 0
    rc = train(TINY + ["--epochs", "3", "--out", str(bad), "--debug-nan-at-step", "4"])
    assert rc == 3
    err = capsys.readouterr().err
    assert "nan" in err and "epoch 2" in err and "after 1 epoch(s), step 3" in err and "Traceback" not in err
    assert f"--resume {bad}" in err
    _same_weights(good / "last.safetensors", bad / "last.safetensors")
    assert len(_records(bad)) == 1
    model = BiONet.from_pretrained(bad)  # the best checkpoint still loads and is finite
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert json.loads((bad / "training_state.json").read_text())["progress"]["epoch"] == 1


def test_huge_learning_rate_is_stopped_before_anything_is_saved(tmp_path, capsys):
    out = tmp_path / "run"
    rc = train(TINY + ["--epochs", "2", "--lr", "1e30", "--no-augment", "--out", str(out)])
    assert rc == 3
    err = capsys.readouterr().err
    assert "became nan" in err and "nothing had been saved yet" in err and "Traceback" not in err
    assert not (out / "model.safetensors").exists() and not (out / "last.safetensors").exists()


def test_a_run_older_than_padding_mode_resumes_with_zero_padding(tmp_path):
    """train_args.json of runs before --padding-mode has no such key: they padded with zeros, and
    a resume must not take the synthetic recipe's reflect (same state dict: it would load silently)."""
    out = tmp_path / "run"
    assert train(TINY + ["--epochs", "1", "--padding-mode", "zeros", "--out", str(out)]) == 0
    args = json.loads((out / "train_args.json").read_text())
    del args["padding_mode"]
    (out / "train_args.json").write_text(json.dumps(args))
    assert train(["--resume", str(out), "--epochs", "2", "--quiet"]) == 0
    assert json.loads((out / "config.json").read_text())["padding_mode"] == "zeros"
    assert json.loads((out / "train_args.json").read_text())["padding_mode"] == "zeros"
