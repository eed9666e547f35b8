"""The OpenVINO engine: the same probabilities as torch fp32 for every architecture and option predict
accepts (1e-4 at the f32 hint, 0.01 at the bf16 hint where the CPU has bf16 natively); `auto` picks
it on a CPU where it is installed and torch where it is not; the streaming whole-slide path through
it equals the in-memory torch path; a broken or missing cache is rebuilt; a model it cannot convert
falls back to torch with one line; export --format openvino writes an IR with the metadata."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("openvino")  # in the [test] extra: skipped only by an install without it

from bionet_fast import BiONet, sliding_window_inference  # noqa: E402
from bionet_fast.engine.prediction import openvino_engine as ove  # noqa: E402
from bionet_fast.engine.prediction.engines import engine_predictor, inference_setup, resolve_engine  # noqa: E402
from bionet_fast.engine.prediction.export import export  # noqa: E402
from bionet_fast.engine.prediction.inference import infer, window_predictor  # noqa: E402
from bionet_fast.engine.precision import cpu_has_native_bf16  # noqa: E402
from bionet_fast.engine.prediction.slide import ArrayReader  # noqa: E402
from bionet_fast.engine.prediction.streaming import StreamOptions, predict_blocks  # noqa: E402
from bionet_fast.models.biolinknet import BiOLinkNet  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
FP32_TOL, BF16_TOL = 1e-4, 0.01


def _stats(model, size=32):
    """Non-trivial BatchNorm running statistics (a wrong mapping of them shows), then eval."""
    model.train()
    with torch.no_grad():
        model(torch.rand(2, model.config.in_channels, size, size))
    return model.eval()


def _bionet(**kw):
    kw = dict(iterations=2, multiplier=0.125, depth=2, backend="reference") | kw
    return _stats(BiONet(**kw))


# name -> (model factory, task, image side): every architecture and option predict accepts
CASES = {
    "bionet-zeros": (lambda: _bionet(), "segmentation", 40),
    "bionet-reflect": (lambda: _bionet(padding_mode="reflect"), "segmentation", 40),
    "bionet-integrate": (lambda: _bionet(iterations=3, integrate=True, backward_skips=1), "segmentation", 40),
    "bionet-3-classes": (lambda: _bionet(classes=3), "segmentation", 40),
    "super-resolution": (lambda: _bionet(classes=3, padding_mode="reflect"), "super-resolution", 40),
    "biolinknet": (lambda: _stats(BiOLinkNet(iterations=2, backend="reference"), 64), "segmentation", 64),
}


def _probs(model, task, x, forward=None, tile=32):
    return infer(model, x, task, tile_size=tile, overlap=0.25, forward=forward)


@pytest.mark.parametrize("name", list(CASES))
def test_openvino_matches_torch_fp32(name, capsys):
    make, task, side = CASES[name]
    model = make()
    x = torch.rand(2, 3, side + 8, side - 8 if side > 40 else side + 16, generator=torch.Generator().manual_seed(1))
    want = _probs(model, task, x, tile=side)
    got = _probs(model, task, x, ove.openvino_forward(model, "fp32", threads=1), tile=side)
    assert (got - want).abs().max() < FP32_TOL
    if not cpu_has_native_bf16():
        with capsys.disabled():
            print(f"\nnote: this CPU has no native bf16 (AVX512-BF16 / AMX): the bf16 hint of {name} is not checked")
        return
    bf16 = _probs(model, task, x, ove.openvino_forward(model, "bf16", threads=1), tile=side)
    assert (bf16 - want).abs().max() < BF16_TOL


def test_sliding_window_inference_takes_an_engine():
    model = _bionet(padding_mode="reflect")
    x = torch.rand(1, 3, 45, 70)
    want = sliding_window_inference(x, 32, 4, model, size_multiple=model.size_multiple)
    got = sliding_window_inference(x, 32, 4, model, engine="openvino", precision="fp32", threads=1)
    assert got.shape == want.shape == (1, 1, 45, 70)
    assert (got.sigmoid() - want.sigmoid()).abs().max() < FP32_TOL
    with pytest.raises(ValueError, match="bionet_fast model"):
        sliding_window_inference(x, 32, 4, lambda w: w[:, :1], engine="openvino")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_streaming_slide_path_with_openvino_equals_in_memory_torch(precision):
    if precision == "bf16" and not cpu_has_native_bf16():
        precision = "fp32"  # the bound of the bf16 hint is checked only where bf16 is native
        print("note: this CPU has no native bf16: the streaming path is checked at fp32")
    model = _bionet(padding_mode="reflect")
    img = np.random.default_rng(0).integers(0, 255, (70, 90, 3), dtype=np.uint8)
    x = torch.from_numpy(img.transpose(2, 0, 1).astype(np.float32) / 255)[None]
    want = _probs(model, "segmentation", x)[0].numpy()
    setup = inference_setup(model, CPU, "openvino", precision, threads=1)
    assert setup.engine == "openvino" and setup.precision == precision and setup.autocast is None
    predictor = window_predictor(model, "segmentation", None, False, setup.forward)
    got = np.zeros_like(want)
    for y, x0, block in predict_blocks(ArrayReader(img), predictor, 3, model.size_multiple,
                                       StreamOptions(32, 0.25, 3, progress=False), CPU):
        got[:, y:y + block.shape[1], x0:x0 + block.shape[2]] = block
    assert np.abs(got - want).max() < (FP32_TOL if precision == "fp32" else BF16_TOL)
    if precision == "fp32":  # masks bit for bit wherever p is not within 1e-3 of the threshold (here the
        t = float(np.median(want))  # median: an untrained model's p sits near 0.5, this splits the image)
        clear = np.abs(want - t) > 1e-3
        assert clear.mean() > 0.3 and ((got > t) == (want > t))[clear].all()


def test_a_broken_or_missing_cache_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv(ove.CACHE_ENV, str(tmp_path / "cache"))
    model = _bionet()
    x = torch.rand(1, 3, 32, 48)
    with torch.no_grad():
        want = model(x)
    ove.clear_memo()
    assert (ove.openvino_forward(model, "fp32", 1)(x) - want).abs().max() < FP32_TOL
    entries = list((tmp_path / "cache" / "models").iterdir())
    assert len(entries) == 1 and (entries[0] / "model.xml").is_file() and (entries[0] / "model.bin").is_file()
    blobs = list((tmp_path / "cache" / "compiled").iterdir())
    assert blobs  # OpenVINO's compiled-model cache
    # damage everything: a truncated IR and garbage blobs
    (entries[0] / "model.xml").write_text("<net>")
    (entries[0] / "model.bin").write_bytes(b"\0" * 7)
    for blob in blobs:
        os.chmod(blob, 0o644)
        blob.write_bytes(b"not a blob")
    ove.clear_memo()
    assert (ove.openvino_forward(model, "fp32", 1)(x) - want).abs().max() < FP32_TOL
    import openvino as ov

    ov.Core().read_model(str(entries[0] / "model.xml"))  # rebuilt, readable
    # a missing cache: rebuilt from nothing
    import shutil

    shutil.rmtree(tmp_path / "cache")
    ove.clear_memo()
    assert (ove.openvino_forward(model, "fp32", 1)(x) - want).abs().max() < FP32_TOL
    assert (entries[0] / "model.xml").is_file()


def test_no_cache_and_unwritable_cache(tmp_path, monkeypatch):
    model = _bionet()
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
    monkeypatch.setenv(ove.CACHE_ENV, "off")
    ove.clear_memo()
    assert (ove.openvino_forward(model, "fp32", 1)(x) - want).abs().max() < FP32_TOL
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv(ove.CACHE_ENV, str(blocker / "cache"))  # under a file: cannot be created
    ove.clear_memo()
    assert (ove.openvino_forward(model, "fp32", 1)(x) - want).abs().max() < FP32_TOL


def test_auto_picks_openvino_on_cpu_and_torch_elsewhere():
    assert resolve_engine("auto", CPU) == "openvino"
    assert resolve_engine("auto", torch.device("cuda")) == "torch"
    assert resolve_engine("torch", CPU) == "torch"
    with pytest.raises(ValueError, match="runs on the CPU"):
        resolve_engine("openvino", torch.device("cuda"))
    with pytest.raises(ValueError, match="use one of"):
        resolve_engine("tensorrt", CPU)


def test_auto_picks_torch_when_openvino_is_not_installed(tmp_path):
    """A fresh process where `import openvino` fails: auto runs torch, an explicit request names the fix."""
    folder = tmp_path / "model"
    _bionet().save_pretrained(folder)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "im.png")
    code = ("import sys; sys.modules['openvino'] = None\n"
            "import torch\n"
            "from bionet_fast.engine.prediction.engines import resolve_engine\n"
            "try:\n    resolve_engine('openvino', torch.device('cpu'))\n"
            "except ValueError as e:\n    print('REFUSED', e)\n"
            "from bionet_fast.predict import main\n"
            f"sys.exit(main(['--checkpoint', {str(folder)!r}, '--out', {str(tmp_path / 'out')!r}, "
            f"'--no-progress', '--device', 'cpu', {str(tmp_path / 'im.png')!r}]))\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "REFUSED" in run.stdout and "pip install 'bionet_fast[openvino]'" in run.stdout
    assert "engine torch" in run.stdout


def test_a_model_openvino_cannot_convert_falls_back_to_torch(monkeypatch, capsys):
    def fail(*a, **k):
        raise RuntimeError("Cannot create Foo layer from unsupported opset: bar\nmore detail")

    monkeypatch.setattr(ove, "openvino_forward", fail)
    setup = inference_setup(_bionet(), CPU, "auto", "fp32", threads=1)
    assert setup.engine == "torch" and setup.forward is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "running it with torch" in err[0] and "unsupported opset" in err[0]


def test_predict_and_evaluate_cli_engines(tmp_path, capsys):
    """predict --engine openvino writes the probabilities torch writes (16-bit PNG: within 1e-4 of
    65535); evaluate records the engine."""
    from bionet_fast.evaluate import main as evaluate
    from bionet_fast.predict import main as predict

    folder = tmp_path / "model"
    _bionet(padding_mode="reflect").save_pretrained(folder)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 56, 3), dtype=np.uint8)).save(tmp_path / "im.png")
    probs = {}
    for engine in ("torch", "openvino", "onnxruntime"):
        out = tmp_path / engine
        assert predict(["--checkpoint", str(folder), "--out", str(out), "--no-progress", "--precision", "fp32",
                        "--tile-size", "32", "--engine", engine, "--threads", "1", str(tmp_path / "im.png")]) == 0
        assert f"engine {engine}, precision fp32, 1 thread(s)" in capsys.readouterr().out
        probs[engine] = np.asarray(Image.open(out / "im_prob.png")).astype(np.int64)
    assert np.abs(probs["openvino"] - probs["torch"]).max() <= 7
    assert np.abs(probs["onnxruntime"] - probs["torch"]).max() <= 7
    ev = tmp_path / "ev"
    assert evaluate(["--checkpoint", str(folder), "--data", "synthetic", "--out", str(ev), "--quiet",
                     "--tile-size", "64", "--engine", "openvino", "--precision", "fp32", "--threads", "1"]) == 0
    metrics = json.loads((ev / "metrics.json").read_text())
    assert metrics["engine"] == "openvino" and metrics["precision"] == "fp32"


def test_engine_predictor_returns_logits_of_the_model():
    model = _bionet(classes=3)
    x = torch.rand(2, 3, 32, 40)
    run = engine_predictor(model, "openvino", "fp32", threads=1)
    with torch.no_grad():
        assert (run(x) - model(x)).abs().max() < 1e-3  # logits (probabilities are checked at 1e-4 above)
    assert run.setup.engine == "openvino"


def test_export_openvino_ir_with_metadata(tmp_path, capsys):
    from bionet_fast.export import main as export_cli

    model = _bionet(classes=3)
    report = export(model, tmp_path / "m.xml", format="openvino")
    assert report.verified_with == "openvino" and max(report.max_abs_diff.values()) < FP32_TOL
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.bin", "m.xml", "m.xml.json"]
    meta, stored = json.loads(report.meta_path.read_text()), ove.read_metadata(tmp_path / "m.xml")
    assert stored["format"] == meta["format"] == "openvino"
    assert {k: v for k, v in stored.items() if k != "max_abs_diff_vs_pytorch"} == \
        {k: v for k, v in meta.items() if k != "max_abs_diff_vs_pytorch"}
    assert stored["output"]["activation"] == "softmax" and stored["classes"] == 3
    with pytest.raises(ValueError, match="NAME.xml"):
        export(model, tmp_path / "m.onnx", format="openvino")
    folder = tmp_path / "run"
    model.save_pretrained(folder)
    assert export_cli(["--checkpoint", str(folder), "--format", "openvino", "--out", str(tmp_path / "cli.xml")]) == 0
    assert "verified with openvino" in capsys.readouterr().out
    assert (tmp_path / "cli.bin").is_file() and ove.read_metadata(tmp_path / "cli.xml")["classes"] == 3


def test_cpu_engines_bench_table_and_cpu_record():
    """bench.cpu_engines' report (its timed run is for an idle machine: python -m bench.cpu_engines)."""
    sys.path.insert(0, str(ROOT))
    from bench import cpu_engines

    info = cpu_engines.cpu_info()
    assert info["name"] and info["cpus"] >= 1 and isinstance(info["flags"], list)
    rows = [{"model": "m", "side": s, "engine": e, "windows_per_s": 10.0 * (i + 1), "vs_torch_fp32": 1.0 + i,
             "vs_official_port": 2.0, "max_prob_diff": None if i == 0 else 1e-3 * i}
            for s in (256, 512) for i, e in enumerate(cpu_engines.ENGINES)]
    slides = [{"case": "openvino bf16", "side": 8000, "setup_s": 1.0, "predict_s": 20.0, "windows_per_s": 22.1,
               "peak_rss_mib": 512.0}]
    text = cpu_engines.table(rows, slides)
    assert "| m | openvino bf16 | 60.00 (6.00x, 2.00x) | 60.00 (6.00x, 2.00x) | 0.0050 |" in text
    assert "| m | official port fp32 | 10.00 (1.00x, 2.00x)" in text and "| 8000x8000 | openvino bf16 | 1.0 | 20.0" in text
