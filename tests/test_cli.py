"""End-to-end tests of the train / evaluate / predict CLIs on tiny data (in-process via main(argv))."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from bionet_fast import BiONet
from bionet_fast.evaluate import main as evaluate
from bionet_fast.predict import main as predict
from bionet_fast.data.synthetic import make_synthetic_nuclei
from bionet_fast.train import main as train
from bionet_fast.train import parse_args

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--t", "2", "--multiplier", "0.125", "--depth", "2", "--batch-size", "2", "--steps", "2", "--epochs", "1",
        "--precise-bn", "2", "--device", "cpu", "--quiet", "--workers", "0"]
SYN = ["--image-size", "32", "--n-train", "8", "--n-val", "4"]
OUTPUTS = ("config.json", "model.safetensors", "last.safetensors", "train_args.json", "training_state.json",
           "metrics.jsonl", "curves.png", "samples.png")


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _pairs(n: int, size: int, seed: int = 0):
    images, masks = make_synthetic_nuclei(n, size=size, seed=seed)
    return images, masks * 255


def make_layout(root: Path, layout: str, n: int = 3, size: int = 40) -> Path:
    """A small labelled dataset in one of the supported layouts; returns its root."""
    images, masks = _pairs(n, size)
    if layout in ("folder", "images-masks"):
        xd, yd = ("x", "y") if layout == "folder" else ("images", "masks")
        for i in range(n):
            _png(root / xd / f"img{i}.png", images[i])
            _png(root / yd / f"img{i}.png", masks[i])
    elif layout == "tnbc":
        for i in range(n):
            k = f"{i % 2 + 1:02d}"
            _png(root / f"Slide_{k}" / f"{k}_{i}.png", images[i])
            _png(root / f"GT_{k}" / f"{k}_{i}.png", masks[i])
    elif layout == "tiff-stack":
        root.mkdir(parents=True)
        gray = images.mean(-1).astype(np.uint8)
        tifffile.imwrite(root / "stack1_image.tif", gray, photometric="minisblack")
        tifffile.imwrite(root / "stack1_label.tif", (255 - masks).astype(np.uint8), photometric="minisblack")  # cells = 255
    return root


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_help_subprocess():
    r = subprocess.run([sys.executable, "-m", "bionet_fast.train", "--help"], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 0
    for flag in ("--t", "--checkpoint-iters", "--train-data", "--resume", "--config", "--amp-dtype", "synthetic"):
        assert flag in r.stdout


def test_synthetic_train_evaluate_predict(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(TINY + SYN + ["--epochs", "2", "--out", str(out)]) == 0
    for name in OUTPUTS:
        assert (out / name).is_file(), name
    records = _records(out)
    assert [r["epoch"] for r in records] == [1, 2]
    assert {"dice", "iou", "train_loss", "val_loss", "lr", "images_per_s"} <= set(records[0])
    assert records[1]["lr"] == pytest.approx(0.01 / (1 + 3e-5 * 4))  # Keras decay lr / (1 + decay * step)
    assert records[1]["lr"] < records[0]["lr"] < 0.01
    model = BiONet.from_pretrained(out)
    assert model.config.iterations == 2 and model.config.depth == 2
    text = capsys.readouterr().out
    assert str(out / "model.safetensors") in text and "Best validation IoU" in text
    # predict: odd-sized images, a folder and a file
    images, _ = _pairs(2, 50)
    _png(tmp_path / "in" / "a.png", images[0][:37])
    _png(tmp_path / "b.png", images[1])
    pred = tmp_path / "pred"
    assert predict(["--checkpoint", str(out), str(tmp_path / "in"), str(tmp_path / "b.png"), "--out", str(pred),
                    "--device", "cpu", "--tile-size", "32"]) == 0
    mask = np.asarray(Image.open(pred / "a_mask.png"))
    prob = np.asarray(Image.open(pred / "a_prob.png"))
    assert mask.shape == (37, 50) and set(np.unique(mask)) <= {0, 255}
    assert prob.shape == (37, 50) and prob.dtype in (np.uint16, np.int32) and prob.max() <= 65535
    assert ((prob > 32767.5) == (mask == 255)).mean() > 0.99
    assert (pred / "b_mask.png").is_file()
    assert predict(["--checkpoint", str(out), str(tmp_path / "b.png"), "--out", str(pred), "--device", "cpu",
                    "--prob-format", "tiff"]) == 0
    assert tifffile.imread(pred / "b_prob.tif").shape == (1, 50, 50)


@pytest.mark.parametrize("layout", ["folder", "images-masks", "tnbc", "tiff-stack"])
def test_every_layout_through_the_clis(tmp_path, layout, capsys):
    data = make_layout(tmp_path / "data", layout)
    out = tmp_path / "run"
    args = TINY + ["--train-data", str(data), "--image-size", "32", "--out", str(out)]
    if layout == "tiff-stack":
        args += ["--in-channels", "1"]
    assert train(args) == 0, capsys.readouterr().err
    record = _records(out)[0]
    assert record["n_images"] == 1  # 10% of 3 images held out (at least one)
    assert ("rand_f" in record) == (layout == "tiff-stack")
    ev = tmp_path / "eval"
    assert evaluate(["--checkpoint", str(out), "--data", str(data), "--out", str(ev), "--device", "cpu",
                     "--save-predictions", "--tile-size", "32"]) == 0
    metrics = json.loads((ev / "metrics.json").read_text())
    assert metrics["n_images"] == 3 and 0 <= metrics["dice"] <= 1 and 0 <= metrics["iou"] <= metrics["dice"]
    assert ("rand_f" in metrics) == (layout == "tiff-stack")
    assert len(list((ev / "predictions").glob("*_mask.png"))) == 3
    assert "dice" in capsys.readouterr().out


def test_valid_data_config_file_and_official_spellings(tmp_path):
    data = make_layout(tmp_path / "data", "folder", n=2)
    val = make_layout(tmp_path / "val", "images-masks", n=2, size=48)
    cfg = tmp_path / "opts.yaml"
    cfg.write_text("epochs: 3\nbatch-size: 4\nlr: 0.002\nseed: 5\n")
    args = parse_args(["--config", str(cfg), "--train_data", str(data), "--valid_data", str(val),
                       "--batch_size", "2", "--iter", "4", "--lr_decay", "0.001"])
    assert (args.epochs, args.batch_size, args.lr, args.seed, args.t, args.lr_decay) == (3, 2, 0.002, 5, 4, 0.001)
    assert (args.multiplier, args.depth, args.steps) == (1.0, 4, 250)  # the paper's recipe with real data
    assert parse_args(["--iterations", "3"]).t == 3 and parse_args([]).multiplier == 0.25
    out = tmp_path / "run"
    jcfg = tmp_path / "opts.json"
    jcfg.write_text(json.dumps({"train_data": str(data), "valid-data": str(val), "image_size": 32}))
    assert train(TINY + ["--config", str(jcfg), "--out", str(out)]) == 0
    assert _records(out)[0]["n_images"] == 2


def test_super_resolution_and_multiclass_amp(tmp_path):
    out = tmp_path / "sr"
    assert train(TINY + SYN + ["--task", "super-resolution", "--out", str(out)]) == 0
    r = _records(out)[0]
    assert r["psnr"] > 0 and r["psnr_bicubic"] > 10 and "dice" not in r
    assert BiONet.from_pretrained(out).config.classes == 3
    images, _ = _pairs(1, 24)
    _png(tmp_path / "lr.png", images[0])
    assert predict(["--checkpoint", str(out), str(tmp_path / "lr.png"), "--out", str(tmp_path / "p"),
                    "--device", "cpu"]) == 0
    assert np.asarray(Image.open(tmp_path / "p" / "lr_sr.png")).shape == (48, 48, 3)  # x2
    out2 = tmp_path / "mc"
    assert train(TINY + SYN + ["--classes", "2", "--amp", "--channels-last", "--no-augment", "--out", str(out2)]) == 0
    assert 0 <= _records(out2)[0]["dice"] <= 1


def _fails(capsys, argv, *needles, fn=train):
    """The CLI exits 2 with 'error: ...' naming the problem, without a traceback."""
    assert fn(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    return err


def test_bad_input_is_a_clear_error_before_training(tmp_path, capsys):
    run = ["--out", str(tmp_path / "run")] + TINY
    _fails(capsys, run + ["--train-data", str(tmp_path / "nope")], "error:", "does not exist", "layout")
    data = make_layout(tmp_path / "d1", "folder")
    (data / "y" / "img1.png").unlink()
    _fails(capsys, run + ["--train-data", str(data), "--image-size", "32"], "error:", "img1.png", "no mask")
    data = make_layout(tmp_path / "d2", "folder")
    _png(data / "y" / "img0.png", np.zeros((20, 20), np.uint8))
    _fails(capsys, run + ["--train-data", str(data), "--image-size", "32"], "error:", "img0", "same size")
    (tmp_path / "d3" / "x").mkdir(parents=True)
    (tmp_path / "d3" / "y").mkdir()
    _fails(capsys, run + ["--train-data", str(tmp_path / "d3")], "error:", "empty")
    data = make_layout(tmp_path / "d4", "folder")
    (data / "x" / "img2.png").write_bytes(b"not a png")
    _fails(capsys, run + ["--train-data", str(data), "--image-size", "32"], "error:", "img2.png", "unreadable")
    data = make_layout(tmp_path / "d5", "folder", size=36)
    _fails(capsys, run + ["--train-data", str(data)], "error:", "--image-size")
    _fails(capsys, run + ["--image-size", "30"], "error:", "multiple")
    _fails(capsys, run + ["--resume", str(tmp_path / "none")], "error:", "train_args.json")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("epochz: 3\n")
    _fails(capsys, run + ["--config", str(cfg)], "error:", "epochz")
    assert not (tmp_path / "run").exists()  # nothing was trained or written
    _fails(capsys, ["--checkpoint", str(tmp_path / "none"), "--data", str(data)], "error:", "not found", fn=evaluate)
    _fails(capsys, ["--checkpoint", str(tmp_path), "--out", str(tmp_path / "o"), str(tmp_path / "x.png")],
           "error:", fn=predict)


def test_refuses_to_overwrite_a_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(TINY + SYN + ["--out", str(out)]) == 0
    _fails(capsys, TINY + SYN + ["--out", str(out)], "error:", "--resume", "--overwrite")
    assert train(TINY + SYN + ["--out", str(out), "--overwrite", "--seed", "1"]) == 0
    assert len(_records(out)) == 1
    _fails(capsys, ["--resume", str(out), "--t", "3"], "error:", "architecture")
    _fails(capsys, ["--resume", str(out), "--out", str(tmp_path / "elsewhere")], "error:", "own folder")


def test_precise_bn_sets_population_statistics(tmp_path):
    """With --precise-bn covering the whole (4-image) training set in one batch, the saved running
    statistics are exactly the statistics of that batch under the final weights."""
    from bionet_fast.data.synthetic import SyntheticNucleiDataset
    from bionet_fast.data.training import SyntheticCrops

    out = tmp_path / "run"
    assert train(TINY + ["--image-size", "32", "--n-train", "4", "--n-val", "2", "--precise-bn", "4",
                         "--epochs", "2", "--out", str(out)]) == 0
    saved = BiONet.from_pretrained(out, weights_name="last.safetensors")
    crops = SyntheticCrops(SyntheticNucleiDataset(4, 128, seed=0), 32, 0)
    crops.set_epoch(1)  # the last epoch's crops
    x = torch.stack([crops[i][0] for i in range(4)])
    fresh = BiONet.from_pretrained(out, weights_name="last.safetensors")
    for bn in fresh.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.reset_running_stats()
            bn.momentum = 1.0  # running statistics := this batch's
    with torch.no_grad():
        fresh.train()(x)
    ours, want = saved.state_dict(), fresh.state_dict()
    stats = [k for k in ours if k.endswith(("running_mean", "running_var"))]
    tracked = [int(v) for k, v in ours.items() if k.endswith("num_batches_tracked")]
    assert len(stats) > 20 and set(tracked) <= {0, 1} and tracked.count(1) > 20  # 0: BNs that feed nothing
    for k in stats:
        torch.testing.assert_close(ours[k], want[k], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ours["stem_norms.0.running_var"], torch.ones_like(ours["stem_norms.0.running_var"]))
