"""bioimage.io model packages: `bioimageio test` (the ecosystem's validator, run as a subprocess with
the network blocked) passes with TorchScript and ONNX weights for a tiny BiONet and a tiny
BiO-LinkNet; the test tensors are PyTorch's output; the rdf says what the model expects; the
package loads back with from_pretrained."""
import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

pytest.importorskip("bioimageio.spec")
pytest.importorskip("bioimageio.core")
pytest.importorskip("onnxruntime")
yaml = pytest.importorskip("yaml")

import bionet_fast  # noqa: E402
from bionet_fast import BiONet  # noqa: E402
from bionet_fast.engine.prediction.bioimageio import export_bioimageio  # noqa: E402
from bionet_fast.export import main as export_cli  # noqa: E402
from bionet_fast.models.config import InferenceInfo  # noqa: E402

OFFLINE = {"HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
           "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", "NO_PROXY": "", "no_proxy": ""}


def _tiny_bionet():
    torch.manual_seed(0)
    model = BiONet(multiplier=0.125, depth=2, iterations=2, padding_mode="reflect")
    model.train()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        model(torch.rand(2, 3, 32, 32))
    model.eval().inference_info = InferenceInfo(threshold=0.4, tile_size=64, metrics={"dice": 0.81})
    return model


def _tiny_linknet():
    from bionet_fast.models.biolinknet import BiOLinkNet

    torch.manual_seed(1)
    return BiOLinkNet(iterations=1).eval()


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    """{name: (model, package path)}: the BiONet through the CLI (with --mpp), the BiO-LinkNet
    through the Python function."""
    folder = tmp_path_factory.mktemp("bioimageio")
    bionet = _tiny_bionet()
    bionet.save_pretrained(folder / "run")
    assert export_cli(["--checkpoint", str(folder / "run"), "--format", "bioimageio", "--out",
                       str(folder / "bionet.zip"), "--mpp", "0.5"]) == 0
    linknet = _tiny_linknet()
    report = export_bioimageio(linknet, folder / "biolinknet.zip")
    assert max(report.max_abs_diff.values()) < 1e-4, report.max_abs_diff
    return {"bionet": (bionet, folder / "bionet.zip"), "biolinknet": (linknet, folder / "biolinknet.zip")}


def test_bioimageio_test_passes_offline_with_both_weight_formats(packages, tmp_path):
    env = {**os.environ, **OFFLINE, "BIOIMAGEIO_CACHE_PATH": str(tmp_path / "cache")}
    runs = {}
    for name, (_, path) in packages.items():  # both at once: most of each run is start-up
        cmd = [sys.executable, "-m", "bioimageio.core", "test", str(path), "--summary", str(tmp_path / f"{name}.json")]
        runs[name] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                      cwd=tmp_path)
    for name, proc in runs.items():
        out, _ = proc.communicate(timeout=600)
        summary = json.loads((tmp_path / f"{name}.json").read_text())
        failed = [d["name"] for d in summary["details"] if d["status"] != "passed"]
        assert proc.returncode == 0 and summary["status"] == "passed" and not failed, (name, failed, out[-3000:])
        tested = {d["loc"][1] for d in summary["details"] if d["loc"][:1] == ["weights"]}
        assert tested == {"torchscript", "onnx"}, (name, tested)


def test_test_tensors_are_pytorchs_and_the_package_loads_back(packages):
    for name, (model, path) in packages.items():
        with zipfile.ZipFile(path) as zf:
            rdf = yaml.safe_load(zf.read("rdf.yaml"))
            x = np.load(zf.open("test_input.npy"))
            want = np.load(zf.open("test_output.npy"))
        assert x.dtype == np.uint8 and x.shape[:2] == (1, 3) and want.dtype == np.float32
        with torch.no_grad():
            got = torch.sigmoid(model(torch.from_numpy(x.astype(np.float32) / 255))).numpy()
        np.testing.assert_allclose(want, got, rtol=0, atol=1e-6, err_msg=name)

        loaded = bionet_fast.from_pretrained(path)
        assert type(loaded) is type(model)
        for key, value in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), (name, key)

        ipt, out = rdf["inputs"][0], rdf["outputs"][0]
        m = model.size_multiple
        low = 2 * m if name == "bionet" else m  # reflect padding: two pixels at the bottleneck
        assert [a["size"] for a in ipt["axes"][2:]] == [{"min": low, "step": m}] * 2
        assert [p["id"] for p in ipt["preprocessing"]] == ["ensure_dtype", "scale_linear", "ensure_dtype"]
        assert ipt["preprocessing"][1]["kwargs"]["gain"] == pytest.approx(1 / 255)
        assert out["postprocessing"][0]["id"] == "sigmoid"
        assert set(rdf["weights"]) == {"torchscript", "onnx"}
        assert "arxiv.org/abs/2007.00243" in rdf["cite"][0]["url"] and rdf["license"]
        assert rdf["documentation"]["source"] == "README.md" and rdf["covers"]
    rdf = yaml.safe_load(zipfile.ZipFile(packages["bionet"][1]).read("rdf.yaml"))
    assert rdf["inputs"][0]["axes"][2]["unit"] == "micrometer" and rdf["inputs"][0]["axes"][2]["scale"] == 0.5
    assert rdf["config"]["bionet_fast"]["validation_metrics"] == {"dice": 0.81}
    assert rdf["config"]["bionet_fast"]["threshold"] == 0.4


def test_bad_requests_fail_before_any_work(tmp_path):
    model = BiONet(multiplier=0.125, depth=2, iterations=1).eval()
    with pytest.raises(ValueError, match=r"\.zip"):
        export_bioimageio(model, tmp_path / "model.onnx")
    with pytest.raises(ValueError, match="--mpp"):
        export_bioimageio(model, tmp_path / "m.zip", mpp=0.0)
    model.inference_info = InferenceInfo(task="super-resolution")
    with pytest.raises(ValueError, match="segmentation"):
        export_bioimageio(model, tmp_path / "m.zip")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="no config.json"):
        with zipfile.ZipFile(tmp_path / "other.zip", "w") as zf:
            zf.writestr("rdf.yaml", "type: model\n")
        bionet_fast.from_pretrained(tmp_path / "other.zip")
