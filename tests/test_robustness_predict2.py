"""Nothing lost, round two (issue 24), predict's side: sharded and concurrent runs into one folder,
names compared as written, one corrupt slide in a folder, named errors for the rest, a folder that
is input and --out at once. Tiny model, small TIFFs; the process tests start real processes."""
from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

import bionet_fast.predict as predict_mod
from bionet_fast.engine.prediction.predict_batch import ImageClaim
from bionet_fast.models import BiONet
from bionet_fast.predict import main as predict, output_names

ROOT = Path(__file__).resolve().parents[1]




def _img(seed: int, h: int, w: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def _tif(path: Path, seed: int, side: int = 64) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, _img(seed, side, side), photometric="rgb", tile=(32, 32), compression="zlib")
    return path


def _args(ckpt, out, *extra):
    return ["--checkpoint", str(ckpt), "--out", str(out), "--tile-size", "64", "--precision", "fp32",
            "--no-progress", *map(str, extra)]


def _spawn(ckpt, out, inputs, **env):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **{k: str(v) for k, v in env.items()})
    return subprocess.Popen([sys.executable, "-m", "bionet_fast.predict", *_args(ckpt, out, *inputs)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(procs) -> list[str]:
    done = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr
        assert "Traceback" not in stderr
        done += [line.split(" -> ")[0] for line in stdout.splitlines() if " -> " in line]
    return done


# --- 1: a sharded run over s and s_x; two plain runs into one folder -----------------------------
def test_cleanup_removes_only_this_images_abandoned_temps(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    others = [".s_x_prob.tif.ab12cd34.tmp", ".s_x_mask.tif.q9w8e7r6.tmp", ".s_x.geojson.zz11yy22.tmp",
              ".s_mask.tif.foo_mask.png.ab12cd34.tmp"]
    mine = [".s_prob.tif.ab12cd34.tmp", ".s_mask.tif.q9w8e7r6.tmp", ".s.geojson.zz11yy22.tmp",
            ".s_prob.channels.tmp"]
    for n in others + mine:
        (out / n).write_bytes(b"partial")
    claim = ImageClaim(out, "s")
    assert claim.take()
    claim.release()
    assert sorted(p.name for p in out.iterdir()) == sorted(others)  # and the lock file is gone


def test_a_held_image_is_skipped_by_a_second_claim(tmp_path):
    first, second = ImageClaim(tmp_path, "case1"), ImageClaim(tmp_path, "case1")
    assert first.take()
    (tmp_path / ".case1_mask.tif.ab12cd34.tmp").write_bytes(b"being written")
    assert not second.take() and str(os.getpid()) in second.owner
    assert (tmp_path / ".case1_mask.tif.ab12cd34.tmp").exists()  # a live holder's temp survives
    assert ImageClaim(tmp_path, "case1_HE").take()  # another image: its own lock
    first.release()
    assert second.take()
    second.release()


def test_sharded_run_over_s_and_s_x_loses_nothing(tmp_path, ckpt):
    slides = tmp_path / "slides"
    for i, name in enumerate(("s", "s_x")):
        _tif(slides / f"{name}.tif", i, side=192)
    out = tmp_path / "out"
    done = _finish([_spawn(ckpt, out, [slides], RANK=r, WORLD_SIZE=2, LOCAL_RANK=r) for r in range(2)])
    assert sorted(Path(d).name for d in done) == ["s.tif", "s_x.tif"]
    assert sorted(p.name for p in out.iterdir()) == ["s_mask.tif", "s_prob.tif", "s_x_mask.tif", "s_x_prob.tif"]
    for n in ("s", "s_x"):
        assert tifffile.imread(out / f"{n}_prob.tif").shape == (192, 192)


def test_two_plain_runs_into_one_folder_write_each_image_once(tmp_path, ckpt):
    slides = tmp_path / "slides"
    for i, name in enumerate(("case1", "case1_HE", "case2", "case2_HE")):
        _tif(slides / f"{name}.tif", i, side=128)
    out = tmp_path / "out"
    done = _finish([_spawn(ckpt, out, [slides]) for _ in range(2)])
    assert sorted(Path(d).name for d in done) == ["case1.tif", "case1_HE.tif", "case2.tif", "case2_HE.tif"]
    assert len(list(out.iterdir())) == 8 and not list(out.glob(".*"))


# --- 2: names compared after the writers' sanitising --------------------------------------------
def test_bracket_names_never_share_an_output(tmp_path, ckpt, capsys):
    for name, seed in (("x[1]", 1), ("x_1", 2)):
        Image.fromarray(_img(seed, 40, 48)).save(tmp_path / f"{name}.png")
    assert output_names([tmp_path / "x[1].png"]) == ["x_1"]  # the name the PNG writer writes
    assert predict(_args(ckpt, tmp_path / "out", tmp_path)) == 2
    err = capsys.readouterr().err
    assert "x_1" in err and "x[1].png" in err and "rename one" in err and "Traceback" not in err
    # alone, x[1] is checked as complete under the name it was written as
    assert predict(_args(ckpt, tmp_path / "out", tmp_path / "x[1].png")) == 0
    assert (tmp_path / "out" / "x_1_mask.png").is_file()
    assert predict(_args(ckpt, tmp_path / "out", tmp_path / "x[1].png")) == 0
    assert "outputs complete, skipped" in capsys.readouterr().out


# --- 7: one corrupt slide in a folder; named errors, exit 2, never a traceback ---------------------
def _garble_a_tile(path: Path) -> None:
    with tifffile.TiffFile(path) as tif:
        offset, count = tif.pages[0].dataoffsets[1], tif.pages[0].databytecounts[1]
    data = bytearray(path.read_bytes())
    data[offset:offset + count] = b"\xff" * count
    path.write_bytes(bytes(data))


def test_one_corrupt_slide_is_reported_and_the_others_finish(tmp_path, ckpt, capsys):
    slides = tmp_path / "slides"
    for i in range(3):
        _tif(slides / f"s{i}.tif", i)
    _garble_a_tile(slides / "s1.tif")
    (slides / "s3.tif").write_bytes(b"II*\x00 a truncated header")
    for name, tag, value in (("s4.tif", "ImageWidth", 0), ("s5.tif", "ImageWidth", 100000)):
        _tif(slides / name, 5)  # a 0-size page; a 100000-px-wide page that holds one row of 32 px tiles
        with tifffile.TiffFile(slides / name, mode="r+") as tif:
            tif.pages[0].tags[tag].overwrite(value)
    out = tmp_path / "out"
    assert predict(_args(ckpt, out, slides)) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "wrote predictions of 2 image(s)" in captured.out
    summary = captured.err[captured.err.index("4 image(s) failed"):]
    assert all(f"s{i}.tif" in summary for i in (1, 3, 4, 5)), summary
    assert "64 x 0 pixels" in summary and "holds 4 of the 6250 tiles" in summary
    assert sorted(p.name for p in out.iterdir()) == ["s0_mask.tif", "s0_prob.tif", "s2_mask.tif", "s2_prob.tif"]


@pytest.mark.parametrize("env", [{"WORLD_SIZE": "0"}, {"RANK": "2", "WORLD_SIZE": "2"}, {"WORLD_SIZE": "two"}])
def test_bad_rank_or_world_size_is_a_named_error(tmp_path, ckpt, capsys, monkeypatch, env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    _tif(tmp_path / "s.tif", 0)
    assert predict(_args(ckpt, tmp_path / "out", tmp_path / "s.tif")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "WORLD_SIZE" in err and "Traceback" not in err


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_full_disk_or_read_only_out_ends_with_a_named_error(tmp_path, ckpt, capsys, monkeypatch, code):
    for i in range(2):
        _tif(tmp_path / "in" / f"s{i}.tif", i)

    def fail(*a, **k):
        raise OSError(code, os.strerror(code))
    monkeypatch.setattr(predict_mod._Job, "run", fail)
    assert predict(_args(ckpt, tmp_path / "out", tmp_path / "in")) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "cannot write into --out" in err and os.strerror(code) in err
    assert err.count("error:") == 1  # the run stopped: the second image was not tried


# --- 10: a folder that is input and --out at once -------------------------------------------------
def test_out_equal_to_the_input_folder_does_not_predict_outputs_again(tmp_path, ckpt, capsys):
    Image.fromarray(_img(0, 40, 48)).save(tmp_path / "a.png")
    assert predict(_args(ckpt, tmp_path, tmp_path)) == 0
    assert predict(_args(ckpt, tmp_path, tmp_path, "--overwrite")) == 0
    captured = capsys.readouterr()
    assert "2 file(s)" in captured.err and "earlier outputs" in captured.err
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["a.png", "a_mask.png", "a_prob.png"]


# --- 8: inputs and windows smaller than a reflect-padded model's reflection needs ---------------
@pytest.fixture(scope="module")
def reflect_ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reflect") / "model"
    torch.manual_seed(1)
    BiONet(in_channels=3, classes=1, iterations=2, multiplier=0.125, depth=2, padding_mode="reflect",
           backend="reference").save_pretrained(folder)
    return folder


def test_tiny_inputs_on_a_reflect_model_through_the_model_and_infer(reflect_ckpt):
    from bionet_fast.engine.prediction.inference import infer
    from bionet_fast.models import from_pretrained

    model = from_pretrained(reflect_ckpt).eval()
    assert model.config.min_side == 16
    big = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        ref = torch.nn.Module.__call__(model, big)  # 16 x 16: no padding, as before
        for h, w in [(1, 1), (5, 3), (1, 16), (7, 9), (16, 16)]:
            out = infer(model, torch.rand(1, 3, h, w), "segmentation", 16, 0.25)
            assert out.shape == (1, 1, h, w) and torch.isfinite(out).all(), (h, w)
        assert model(torch.rand(2, 3, 8, 8)).shape == (2, 1, 8, 8)  # a valid multiple, below the reflection's need
    assert torch.equal(ref, model(big))


def test_tiny_images_and_windows_in_predict_and_evaluate(tmp_path, reflect_ckpt, capsys):
    from bionet_fast.evaluate import main as evaluate

    for h in range(1, 17, 3):
        for w in (1, 5, 16):
            for folder, arr in (("images", _img(h * w, h, w)), ("masks", (_img(h + w, h, w)[..., 0] > 128) * 255)):
                (tmp_path / "data" / folder).mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr.astype(np.uint8)).save(tmp_path / "data" / folder / f"im{h}x{w}.png")
    images = tmp_path / "data" / "images"
    for tile in ("8", "16"):
        argv = ["--checkpoint", str(reflect_ckpt), "--out", str(tmp_path / f"p{tile}"), str(images),
                "--tile-size", tile, "--no-progress", "--precision", "fp32"]
        assert predict(argv) == 0, capsys.readouterr().err
        assert len(list((tmp_path / f"p{tile}").glob("*_mask.png"))) == 18
        assert evaluate(["--checkpoint", str(reflect_ckpt), "--data", str(tmp_path / "data"), "--out",
                         str(tmp_path / f"e{tile}"), "--device", "cpu", "--tile-size", tile, "--quiet"]) == 0
    assert "Traceback" not in capsys.readouterr().err


def test_train_refuses_crops_too_small_to_reflect_naming_the_smallest(tmp_path, capsys):
    from bionet_fast.train import main as train

    base = ["--t", "2", "--multiplier", "0.125", "--depth", "3", "--padding-mode", "reflect", "--batch-size", "2",
            "--steps", "1", "--epochs", "1", "--device", "cpu", "--quiet", "--workers", "0", "--n-train", "4",
            "--n-val", "2", "--out", str(tmp_path / "run")]
    assert train(base + ["--image-size", "16"]) == 2
    err = capsys.readouterr().err
    assert "--image-size 16" in err and "at least 32" in err and "Traceback" not in err


# --- 6: --tissue-only's thumbnail in bounded memory ----------------------------------------------
@pytest.mark.parametrize("layout", ["tiled", "strips", "uncompressed"])
def test_tissue_thumbnail_of_a_large_tiff_in_bounded_memory(tmp_path, layout):
    import tracemalloc

    from bionet_fast.engine.prediction.slide import TiffReader

    side = 8192 if layout == "tiled" else 4096  # 192 MB / 48 MB of pixels
    path = tmp_path / f"{layout}.tif"
    tile = np.full((256, 256, 3), 220, np.uint8)
    tile[64:192, 64:192] = (150, 60, 140)  # "tissue"
    if layout == "tiled":
        tifffile.imwrite(path, (tile for _ in range((side // 256) ** 2)), shape=(side, side, 3), dtype=np.uint8,
                         tile=(256, 256), compression="zlib", photometric="rgb", bigtiff=True)
    else:
        tifffile.imwrite(path, np.tile(tile, (side // 256, side // 256, 1)), rowsperstrip=256, bigtiff=True,
                         compression="zlib" if layout == "strips" else None, photometric="rgb")
    reader = TiffReader(path)
    assert (reader._memmap is not None) == (layout == "uncompressed")
    level_bytes = side * side * 3
    tracemalloc.start()
    try:
        thumb, factor = reader.thumbnail(max_side=1024)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        reader.close()
    assert max(thumb.shape[:2]) <= 1024 and factor == side / thumb.shape[1]
    segment = 256 * (256 if layout == "tiled" else side) * 3
    bound = thumb.nbytes + 3 * segment + 2**20  # the thumbnail, one decoded segment (and the codec's copies)
    assert peak < bound and peak < level_bytes / 4, (peak, bound)
    expected = tile[::int(factor), ::int(factor)] if 256 % int(factor) == 0 else None
    if expected is not None:
        assert np.array_equal(thumb[:expected.shape[0], :expected.shape[1]], expected)


def test_an_unreadable_input_is_that_inputs_failure_not_the_folders(tmp_path):
    from bionet_fast.engine.prediction.predict_batch import folder_error

    out = tmp_path / "out"
    assert not folder_error(PermissionError(errno.EACCES, "denied", str(tmp_path / "in" / "a.tif")), out)
    assert folder_error(PermissionError(errno.EACCES, "denied", str(out / ".a_mask.tif.x.tmp")), out)
    assert folder_error(RuntimeError("writing failed").with_traceback(None), out) is False
    wrapped = RuntimeError("writing a_mask.tif failed")
    wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    assert folder_error(wrapped, out)
