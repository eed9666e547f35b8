"""predict as a user meets it: one output per input name, numbers checked up front, a folder of
slides split across processes exactly once, an interrupted run resumed without redoing work."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

import bionet_fast.predict as predict_mod
from bionet_fast.models import BiONet
from bionet_fast.predict import main as predict, output_names

ROOT = Path(__file__).resolve().parents[1]




def _img(seed: int, h: int = 40, w: int = 48) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def _slides(folder: Path, n: int = 4) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        paths.append(folder / f"s{i}.tif")
        tifffile.imwrite(paths[-1], _img(i, 64, 80), photometric="rgb", tile=(32, 32))
    return paths


def _args(ckpt, out, *extra):
    return ["--checkpoint", str(ckpt), "--out", str(out), "--tile-size", "64", "--precision", "fp32",
            "--no-progress", *map(str, extra)]


def test_two_inputs_with_one_name_get_two_outputs(tmp_path, ckpt, capsys):
    for sub, seed in (("a", 1), ("b", 2)):
        (tmp_path / sub).mkdir()
        Image.fromarray(_img(seed)).save(tmp_path / sub / "im0.png")
    Image.fromarray(_img(3)).save(tmp_path / "a" / "im1.png")
    tifffile.imwrite(tmp_path / "a" / "im1.tif", _img(4), photometric="rgb")
    out = tmp_path / "out"
    inputs = [tmp_path / "a" / "im0.png", tmp_path / "b" / "im0.png", tmp_path / "a" / "im1.png",
              tmp_path / "a" / "im1.tif", tmp_path / "a" / "im0.png"]  # the last: a file named twice
    assert predict(_args(ckpt, out, *inputs)) == 0
    text = capsys.readouterr().out
    assert "wrote predictions of 4 image(s)" in text
    a = np.asarray(Image.open(out / "a__im0_prob.png"))
    b = np.asarray(Image.open(out / "b__im0_prob.png"))
    assert not np.array_equal(a, b)  # two different predictions, neither overwritten
    assert (out / "im1_png_mask.png").is_file() and (out / "im1_tif_mask.tif").is_file()
    assert output_names([Path("x/a.png"), Path("y/b.png")]) == ["a", "b"]


@pytest.mark.parametrize("flag,value", [("--tile-size", "0"), ("--tile-size", "-8"), ("--tile-size", "4"),
                                        ("--overlap", "1"), ("--overlap", "-0.1"), ("--batch-size", "0"),
                                        ("--min-area", "-1"), ("--level", "-1"), ("--mpp", "0"),
                                        ("--sr-scale", "0"), ("--threshold", "0"), ("--threshold", "1"),
                                        ("--threshold", "nan")])
def test_bad_numbers_are_named_errors_before_any_work(tmp_path, ckpt, capsys, flag, value):
    Image.fromarray(_img(0)).save(tmp_path / "x.png")
    out = tmp_path / "out"
    argv = ["--checkpoint", str(ckpt), "--out", str(out), str(tmp_path / "x.png"), flag, value]
    assert predict(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("error: ") and flag in err
    assert not out.exists()  # no empty output folder left behind


def _run(ckpt, out, folder, rank, world):
    env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "bionet_fast.predict", *_args(ckpt, out, folder)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_processes_split_a_folder_each_slide_once(tmp_path, ckpt):
    _slides(tmp_path / "slides")
    out = tmp_path / "out"
    procs = [_run(ckpt, out, tmp_path / "slides", rank, 2) for rank in range(2)]
    done = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr
        done += [line.split(" -> ")[0] for line in stdout.splitlines() if " -> " in line]
        assert "process" in stdout and "2 of 4 images" in stdout
    assert sorted(Path(d).name for d in done) == ["s0.tif", "s1.tif", "s2.tif", "s3.tif"]  # each exactly once
    assert sorted(p.name for p in out.iterdir()) == sorted(f"s{i}_{k}.tif" for i in range(4) for k in ("mask", "prob"))


class _Killed(BaseException):
    """Stands in for a kill: not an Exception, so nothing on the way catches it."""


def test_interrupted_run_resumes_without_redoing_finished_slides(tmp_path, ckpt, monkeypatch, capsys):
    _slides(tmp_path / "slides")
    out = tmp_path / "out"
    calls, killed = [], []
    real = predict_mod.window_predictor

    def counting(model, *a, **k):
        run = real(model, *a, **k)

        def wrapped(x):
            calls.append(x.shape[0])
            if len(calls) == 6 and not killed:  # the second (last) window of the third slide
                killed.append(True)
                raise _Killed
            return run(x)
        return wrapped

    monkeypatch.setattr(predict_mod, "window_predictor", counting)
    with pytest.raises(_Killed):
        predict(_args(ckpt, out, tmp_path / "slides", "--instances", "--batch-size", "1"))
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(f"s{i}_{k}.tif" for i in range(2) for k in ("mask", "prob", "labels"))  # no half s2
    (out / ".s2_mask.tif.x1y2.tmp").write_bytes(b"what a SIGKILL leaves")
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if not p.name.startswith(".")}
    calls.clear()
    capsys.readouterr()
    assert predict(_args(ckpt, out, tmp_path / "slides", "--instances", "--batch-size", "1")) == 0
    text = capsys.readouterr().out
    assert text.count("outputs complete, skipped") == 2 and "wrote predictions of 2 image(s)" in text
    assert len(calls) == 2 * 2  # only s2 and s3 were run
    for name, mtime in before.items():
        assert (out / name).stat().st_mtime_ns == mtime  # finished slides untouched
    assert not list(out.glob(".*")) and len(list(out.iterdir())) == 12
    assert predict(_args(ckpt, out, tmp_path / "slides", "--instances", "--overwrite")) == 0
    assert "wrote predictions of 4 image(s)" in capsys.readouterr().out


def test_geojson_and_measurements_from_the_cli(tmp_path, ckpt):
    _slides(tmp_path / "slides", n=1)
    out = tmp_path / "out"
    assert predict(_args(ckpt, out, tmp_path / "slides" / "s0.tif", "--geojson", "--measurements",
                         "--instances")) == 0
    labels = tifffile.imread(out / "s0_labels.tif")
    geo = json.loads((out / "s0.geojson").read_text())
    assert len(geo["features"]) == labels.max()
    assert len((out / "s0_nuclei.csv").read_text().splitlines()) == labels.max() + 1


def test_unreadable_tiff_is_a_named_error(tmp_path, ckpt, capsys):
    (tmp_path / "bad.tif").write_bytes(b"garbage, not a TIFF")
    assert predict(_args(ckpt, tmp_path / "out", tmp_path / "bad.tif")) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "bad.tif" in err and not (tmp_path / "out").exists()


def test_evaluate_takes_precision(tmp_path, ckpt):
    from bionet_fast.evaluate import main as evaluate

    for i in range(2):
        for folder, arr in (("images", _img(i, 64, 64)), ("masks", (_img(i + 5, 64, 64)[..., 0] > 128) * 255)):
            (tmp_path / "data" / folder).mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr.astype(np.uint8)).save(tmp_path / "data" / folder / f"im{i}.png")
    scores = {}
    for precision in ("fp32", "bf16"):
        ev = tmp_path / precision
        assert evaluate(["--checkpoint", str(ckpt), "--data", str(tmp_path / "data"), "--out", str(ev),
                         "--device", "cpu", "--tile-size", "64", "--precision", precision]) == 0
        scores[precision] = json.loads((ev / "metrics.json").read_text())
        assert scores[precision]["precision"] == precision
    assert abs(scores["fp32"]["loss"] - scores["bf16"]["loss"]) < 0.01


def test_masks_use_the_models_stored_threshold_unless_given(tmp_path, ckpt):
    """config.json's "inference" threshold decides the mask of predict (PNG and tiled TIFF paths,
    instances) and evaluate's Dice; --threshold overrides it. (The tiny random model's probabilities
    lie near 0.49: the thresholds are quantiles of its own output, so each one splits the pixels.)"""
    from bionet_fast.evaluate import main as evaluate
    from bionet_fast.models.config import InferenceInfo

    model = BiONet.from_pretrained(ckpt)
    Image.fromarray(_img(5, 64, 64)).save(tmp_path / "x.png")
    tifffile.imwrite(tmp_path / "s.tif", _img(6, 64, 80), photometric="rgb", tile=(32, 32))
    assert predict(_args(ckpt, tmp_path / "probe", tmp_path / "x.png")) == 0
    probe = np.asarray(Image.open(tmp_path / "probe" / "x_prob.png")).astype(np.float64) / 65535
    low, high = (round(float(np.quantile(probe, q)), 5) for q in (0.3, 0.7))
    for label, stored, flag in (("stored", low, ()), ("flag", low, ("--threshold", high))):
        folder = tmp_path / f"model-{label}"
        model.inference_info = InferenceInfo(threshold=stored)
        model.save_pretrained(folder)
        out = tmp_path / f"out-{label}"
        assert predict(_args(folder, out, tmp_path / "x.png", tmp_path / "s.tif", "--instances", "--min-area", "0",
                             *flag)) == 0
        want = high if flag else stored
        prob = np.asarray(Image.open(out / "x_prob.png")).astype(np.float64) / 65535
        for mask, p in ((np.asarray(Image.open(out / "x_mask.png")), prob),
                        (tifffile.imread(out / "s_mask.tif"), tifffile.imread(out / "s_prob.tif") / 65535)):
            assert 0.05 < (p > want).mean() < 0.95 and 0.05 < (p > 0.5).mean() < 0.95 or (p > 0.5).mean() < 0.05
            assert (mask == 255).mean() != (p > 0.5).mean()  # not the default threshold
            near = np.abs(p - want) < 1e-4  # uint16 rounding of the saved probabilities
            assert np.array_equal((mask == 255)[~near], (p > want)[~near]), label
        labelled, mask = tifffile.imread(out / "s_labels.tif") > 0, tifffile.imread(out / "s_mask.tif") == 255
        assert labelled[mask].all()  # every mask pixel is in a nucleus (labels also fill holes)
        ev = tmp_path / f"eval-{label}"
        assert evaluate(["--checkpoint", str(folder), "--data", "synthetic", "--out", str(ev), "--device", "cpu",
                         "--tile-size", "64", "--quiet", *map(str, flag)]) == 0
        assert json.loads((ev / "metrics.json").read_text())["threshold"] == want
