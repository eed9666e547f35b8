"""Export: ONNX (run by onnxruntime), TorchScript and ExportedProgram files match PyTorch at two input
sizes; the reference path is traced whatever the backend; the CLI writes the file and its JSON; the
files carry their metadata themselves (ONNX metadata_props, TorchScript extra files)."""
import importlib.util
import json
import warnings

import pytest
import torch

import bionet_fast
from bionet_fast import BiONet
from bionet_fast.engine.prediction.export import export, read_file_metadata, reference_copy
from bionet_fast.models.config import InferenceInfo

SIZES = [(1, 3, 32, 32), (2, 3, 48, 24)]  # depth 2: sides multiples of 8; the second is not traced
TOL = 1e-4


def _tiny(**kw):
    model = BiONet(multiplier=0.125, depth=2, **kw)
    model.train()
    with torch.no_grad():  # non-trivial running statistics, then eval
        model(torch.rand(2, 3, 32, 32))
    return model.eval()


def _linknet():
    try:
        from bionet_fast.models.biolinknet import BiOLinkNet
    except ImportError:
        pytest.skip("bionet_fast.models.biolinknet is not importable")
    return BiOLinkNet(iterations=2).eval(), [(1, 3, 32, 32), (2, 3, 64, 32)]


MODELS = {"t1": lambda: (_tiny(iterations=1), SIZES),
          "t3-int": lambda: (_tiny(iterations=3, integrate=True), SIZES),
          "biolinknet": _linknet}


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("name", list(MODELS))
def test_export_matches_pytorch_at_two_sizes(tmp_path, name, fmt):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")  # in the [test] extra; an install without it skips only this
    model, sizes = MODELS[name]()
    path = tmp_path / f"model.{fmt}"
    # the TorchScript-based ONNX exporter here (seconds); the dynamo one, the default, is tested below
    report = export(model, path, format=fmt, sizes=sizes, onnx_exporter="torchscript")
    assert report.verified_with in ("onnxruntime", "torch.jit.load")
    assert len(report.max_abs_diff) == 2
    assert max(report.max_abs_diff.values()) < TOL, report.max_abs_diff
    meta = json.loads(report.meta_path.read_text())
    assert meta["input"]["size_multiple"] == model.size_multiple
    assert meta["input"]["channels"] == 3 and meta["input"]["value_range"] == [0.0, 1.0]
    assert meta["output"]["activation"] == "sigmoid" and meta["task"] == "segmentation"
    assert meta["threshold"] == 0.5 and "does not check" in meta["size_check"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, path.name + ".json"])


def test_independent_run_of_the_torchscript_file(tmp_path):
    """Not only the report: the file, loaded afresh, gives the model's logits at a third size, and
    its extra file says what the sidecar JSON says (but the verification)."""
    model = _tiny(iterations=2)
    model.inference_info = InferenceInfo(threshold=0.4, tile_size=64)
    report = export(model, tmp_path / "m.pt", format="torchscript", sizes=SIZES)
    extra = {"bionet_fast.json": ""}
    loaded = torch.jit.load(str(tmp_path / "m.pt"), _extra_files=extra)
    x = torch.rand(3, 3, 16, 40)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=TOL, rtol=0)
    inside = json.loads(extra["bionet_fast.json"])
    assert inside == read_file_metadata(tmp_path / "m.pt")
    assert inside["input"]["size_multiple"] == 8 and inside["input"]["value_range"] == [0.0, 1.0]
    assert inside["output"]["activation"] == "sigmoid" and inside["threshold"] == 0.4
    sidecar = json.loads(report.meta_path.read_text())
    assert sidecar.pop("max_abs_diff_vs_pytorch") and sidecar == inside


def _onnx_props(path):
    import onnx

    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def test_dynamo_onnx_runs_in_onnxruntime_at_two_sizes_and_carries_its_metadata(tmp_path):
    """The default ONNX path: torch.onnx.export(dynamo=True), a reflect-padded model (the default
    recipe's), dynamic batch / height / width, metadata in the file itself."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = _tiny(iterations=2, padding_mode="reflect")
    model.inference_info = InferenceInfo(threshold=0.6, tile_size=512)
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a fallback would warn
        report = export(model, path, sizes=[(1, 3, 16, 16), (2, 3, 24, 40)])
    assert (report.exporter, report.fallback_reason) == ("dynamo", None)
    assert report.verified_with == "onnxruntime" and max(report.max_abs_diff.values()) < TOL
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])  # afresh, a third size
    x = torch.rand(3, 3, 32, 16)
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(session.run(None, {"image": x.numpy()})[0]), model(x),
                                   atol=TOL, rtol=0)
    props = _onnx_props(path)
    assert (props["size_multiple"], props["value_range"], props["activation"], props["threshold"]) == \
        ("8", "[0.0, 1.0]", "sigmoid", "0.6")
    inside = read_file_metadata(path)
    assert inside["tile_size"] == 512 and inside["config"]["padding_mode"] == "reflect"
    assert json.loads(report.meta_path.read_text())["onnx_exporter"] == "dynamo"


def test_onnx_falls_back_to_the_torchscript_exporter_and_says_why(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    model = _tiny(iterations=1)
    with pytest.warns(UserWarning, match="TorchScript-based exporter.*onnxscript is not installed"):
        report = export(model, tmp_path / "m.onnx", sizes=SIZES)
    assert report.exporter == "torchscript" and "onnxscript" in report.fallback_reason
    assert report.summary().splitlines()[0].startswith("ONNX exporter: TorchScript-based (fallback: onnxscript")
    assert max(report.max_abs_diff.values()) < TOL
    assert _onnx_props(tmp_path / "m.onnx")["size_multiple"] == "8"
    with pytest.raises(ImportError, match="onnxscript"):
        export(model, tmp_path / "n.onnx", sizes=SIZES, onnx_exporter="dynamo")


def test_exported_program_keeps_the_size_guard(tmp_path):
    model = _tiny(iterations=1)
    report = export(model, tmp_path / "m.pt2", format="exported-program", sizes=SIZES)
    assert max(report.max_abs_diff.values()) < TOL
    program = torch.export.load(str(tmp_path / "m.pt2")).module()
    with pytest.raises(Exception, match="8"):
        program(torch.rand(1, 3, 30, 32))


def test_triton_model_is_traced_on_the_reference_path(tmp_path, monkeypatch):
    """A model built for the fused backend (and the env override) exports through the reference copy,
    which shares the weights; the export never enters the fused blocks."""
    model = _tiny(iterations=2)
    model.config.backend = "triton"
    monkeypatch.setenv("BIONET_FAST_BACKEND", "triton")
    import bionet_fast.blocks.fused as fused

    monkeypatch.setattr(fused.FusedOps, "block", lambda *a, **k: pytest.fail("fused path traced"))
    ref = reference_copy(model)
    assert ref.config.backend == "reference" and model.config.backend == "triton"
    for (k, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), k
    report = export(model, tmp_path / "m.pt", format="torchscript", sizes=SIZES)
    assert max(report.max_abs_diff.values()) < TOL


def test_bad_size_and_format_are_named_before_work(tmp_path):
    model = _tiny(iterations=1)
    with pytest.raises(ValueError, match="format"):
        export(model, tmp_path / "m.x", format="tflite")
    with pytest.raises(ValueError, match="divisible by 2\\*\\*\\(depth\\+1\\) = 8"):
        export(model, tmp_path / "m.pt", format="torchscript", sizes=[(1, 3, 30, 32), (1, 3, 32, 32)])
    assert not list(tmp_path.iterdir())


def test_cli_exports_a_super_resolution_folder(tmp_path, capsys):
    model = BiONet(in_channels=1, classes=1, iterations=1, multiplier=0.125, depth=2).eval()
    model.inference_info = InferenceInfo(task="super-resolution", sr_scale=4, tile_size=32)
    model.save_pretrained(tmp_path / "run")
    from bionet_fast.export import main

    out = tmp_path / "sr.pt"
    assert main(["--checkpoint", str(tmp_path / "run"), "--format", "torchscript", "--out", str(out)]) == 0
    assert "largest difference from PyTorch" in capsys.readouterr().out
    meta = json.loads((tmp_path / "sr.pt.json").read_text())
    assert meta["task"] == "super-resolution" and meta["sr_scale"] == 4
    assert meta["output"]["activation"] == "none" and meta["input"]["channels"] == 1
    assert main(["--checkpoint", str(tmp_path / "nowhere"), "--format", "onnx", "--out", str(out)]) == 2
    # the package attribute stays callable after `import bionet_fast.export` rebinds it to the module
    assert callable(bionet_fast.export)


def test_cli_onnx_exporter_flag_and_metadata_in_the_file(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    BiONet(iterations=1, multiplier=0.125, depth=2).eval().save_pretrained(tmp_path / "run")
    from bionet_fast.export import main

    out = tmp_path / "m.onnx"
    assert main(["--checkpoint", str(tmp_path / "run"), "--format", "onnx", "--onnx-exporter", "torchscript",
                 "--out", str(out)]) == 0
    assert "largest difference from PyTorch" in capsys.readouterr().out
    assert json.loads((tmp_path / "m.onnx.json").read_text())["onnx_exporter"] == "torchscript"
    assert read_file_metadata(out)["input"]["size_multiple"] == 8


BLOCKED = ("matplotlib", "kornia", "tqdm", "yaml", "huggingface_hub", "onnx", "onnxruntime", "onnxscript")
SCRIPT = """
import sys
for name in {blocked!r}:
    sys.modules[name] = None  # `import name` now raises ImportError
import numpy as np
from PIL import Image
import bionet_fast
from bionet_fast import BiONet
from bionet_fast.predict import main as predict
from bionet_fast.evaluate import main as evaluate
from bionet_fast.export import main as export
BiONet(iterations=1, multiplier=0.125, depth=2).save_pretrained("run")
Image.fromarray((np.random.default_rng(0).random((24, 24, 3)) * 255).astype(np.uint8)).save("a.png")
assert predict(["--checkpoint", "run", "a.png", "--out", "pred", "--device", "cpu"]) == 0
assert export(["--checkpoint", "run", "--format", "torchscript", "--out", "m.pt"]) == 0
print("ok")
"""


def test_inference_commands_need_no_training_dependencies(tmp_path):
    """predict, evaluate and export import and run with matplotlib, kornia, tqdm, PyYAML, the Hub
    client and ONNX blocked: inference needs torch, numpy, safetensors, Pillow and tifffile only."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", SCRIPT.format(blocked=BLOCKED)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
    assert (tmp_path / "pred" / "a_mask.png").is_file() and (tmp_path / "m.pt.json").is_file()
