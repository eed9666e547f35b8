"""Every numeric argument of train and evaluate is checked before any work: exit code 2, a message
naming the flag, no traceback, nothing written (issue 16, case 10). In-process through main(argv);
two subprocess runs check the same from the shell."""
import subprocess
import sys
from pathlib import Path

import pytest

from bionet_fast import BiONet
from bionet_fast.evaluate import main as evaluate
from bionet_fast.train import main as train

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--t", "2", "--multiplier", "0.125", "--depth", "2", "--batch-size", "2", "--steps", "2", "--epochs", "1",
        "--precise-bn", "2", "--device", "cpu", "--quiet", "--workers", "0", "--image-size", "32",
        "--n-train", "8", "--n-val", "4"]


def _exit_code(fn, argv) -> int:
    try:
        return fn(argv)
    except SystemExit as exc:  # argparse's own errors (not a number, a bad choice)
        return exc.code


def _refused(capsys, fn, argv, flag):
    assert _exit_code(fn, argv) == 2, argv
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error" in err, err
    assert flag in err, (flag, err)


TRAIN_BAD = [("--t", "0"), ("--multiplier", "0"), ("--multiplier", "nan"), ("--depth", "0"),
             ("--backward-skips", "-1"), ("--in-channels", "0"), ("--classes", "0"), ("--bn-momentum", "0"),
             ("--bn-momentum", "1.5"), ("--image-size", "-32"), ("--image-size", "30"), ("--workers", "-1"),
             ("--n-train", "0"), ("--n-val", "0"), ("--epochs", "0"), ("--steps", "-3"), ("--batch-size", "0"),
             ("--lr", "-0.1"), ("--lr", "inf"), ("--lr-decay", "-1"), ("--precise-bn", "-1"), ("--seed", "-1"),
             ("--tile-size", "0"), ("--tile-size", "12"), ("--save-every-steps", "-1"),
             ("--save-every-minutes", "0"), ("--threads", "0"), ("--epochs", "ten"), ("--lr", "fast")]


def test_train_refuses_every_bad_number(tmp_path, capsys):
    out = tmp_path / "run"
    for flag, value in TRAIN_BAD:
        _refused(capsys, train, TINY + ["--out", str(out), flag, value], flag)
    assert not out.exists()  # nothing was written


def test_lr_zero_warns(tmp_path, capsys):
    # the data folder does not exist: the run stops right after the option checks
    assert train(TINY + ["--lr", "0", "--train-data", str(tmp_path / "none"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "warning: --lr 0" in err and "will not change" in err


def test_evaluate_refuses_every_bad_number(tmp_path, capsys):
    ckpt = tmp_path / "model"
    BiONet(3, 1, 2, 0.125, 2).save_pretrained(ckpt)  # sides must be multiples of 8
    out = tmp_path / "eval"
    base = ["--checkpoint", str(ckpt), "--data", "synthetic", "--out", str(out), "--device", "cpu"]
    for flag, value in [("--batch-size", "0"), ("--overlap", "1"), ("--overlap", "-0.5"), ("--overlap", "nan"),
                        ("--tile-size", "0"), ("--tile-size", "12"), ("--sr-scale", "0"), ("--batch-size", "x"),
                        ("--threshold", "1"), ("--threshold", "0"), ("--threshold", "nan")]:
        _refused(capsys, evaluate, base + [flag, value], flag)
    assert not out.exists()  # no empty output folder left behind


def test_from_the_shell_without_traceback(tmp_path):
    ckpt = tmp_path / "model"
    BiONet(3, 1, 2, 0.125, 2).save_pretrained(ckpt)
    runs = [[sys.executable, "-m", "bionet_fast.train", "--epochs", "0", "--out", str(tmp_path / "r")],
            [sys.executable, "-m", "bionet_fast.evaluate", "--checkpoint", str(ckpt), "--data", "synthetic",
             "--overlap", "1", "--out", str(tmp_path / "e")]]
    for cmd, flag in zip(runs, ["--epochs", "--overlap"]):
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300,
                           env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 2, r.stderr
        assert flag in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "r").exists() and not (tmp_path / "e").exists()


@pytest.mark.parametrize("flag", ["--batch-size", "--tile-size"])
def test_message_says_what_the_value_must_be(tmp_path, capsys, flag):
    _refused(capsys, train, TINY + ["--out", str(tmp_path / "r"), flag, "0"], "at least 1")
