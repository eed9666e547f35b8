"""Self-describing checkpoints and the Hugging Face Hub, offline: config.json's inference block, a
folder saved with backend="triton" on a CPU-only machine, a super-resolution folder predicted as
such, Hub repo ids from an offline cache (never the network), push_to_hub, the model card."""
import importlib.util
import json
import shutil
import socket
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import bionet_fast
from bionet_fast import BiONet
from bionet_fast.engine.prediction.inference import InferenceOptions, load_for_inference
from bionet_fast.models.config import InferenceInfo

REV = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _tiny(**kw):
    return BiONet(**{"iterations": 2, "multiplier": 0.125, "depth": 2, **kw}).eval()


def _fake_cache(tmp_path, folder, repo="org/bionet-tiny"):
    """The huggingface_hub cache layout: models--org--name/snapshots/<rev>/..., refs/main -> rev."""
    root = tmp_path / "hf-cache"
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, repo_dir / "snapshots" / REV)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(REV)
    return root


def test_config_json_holds_the_inference_block_not_execution_choices(tmp_path):
    model = _tiny(checkpoint_iters=True)
    model.inference_info = InferenceInfo(tile_size=64, metrics={"dice": 0.8}, training_data="synthetic")
    model.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["architecture"] == "bionet" and data["iterations"] == 2
    assert data["inference"] == {"task": "segmentation", "sr_scale": None, "threshold": 0.5,
                                 "value_range": [0.0, 1.0], "tile_size": 64, "metrics": {"dice": 0.8},
                                 "training_data": "synthetic", "mpp": None}
    assert not {"backend", "checkpoint_iters", "checkpoint_segments", "checkpoint_stages"} & set(data)
    loaded = bionet_fast.from_pretrained(tmp_path)
    assert loaded.inference_info == model.inference_info
    _, _, task, scale, tile = load_for_inference(InferenceOptions(tmp_path, device="cpu"))
    assert (task, tile) == ("segmentation", 64)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only fallback")
def test_folder_saved_with_triton_runs_on_a_cpu_machine_with_one_warning(tmp_path):
    model = _tiny(backend="triton")
    model.save_pretrained(tmp_path)
    # the older format stored the backend: it must load too
    data = json.loads((tmp_path / "config.json").read_text())
    data.update(backend="triton", checkpoint_iters=True)
    del data["inference"]
    (tmp_path / "config.json").write_text(json.dumps(data))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = BiONet.from_pretrained(tmp_path)
    assert len([w for w in caught if "triton" in str(w.message)]) == 1
    assert loaded.resolved_backend(torch.device("cpu")) == "reference"
    assert loaded.inference_info is None
    x = torch.rand(1, 3, 16, 16)
    model.config.backend = "reference"  # the saved model's own output, computed without Triton
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), model(x), rtol=0, atol=0)


def test_super_resolution_folder_is_predicted_as_super_resolution(tmp_path):
    model = _tiny(in_channels=3, classes=3)
    model.inference_info = InferenceInfo(task="super-resolution", sr_scale=2, tile_size=32)
    model.save_pretrained(tmp_path / "sr")
    img = (np.random.default_rng(0).random((12, 20, 3)) * 255).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "low.png")
    from bionet_fast.predict import main

    assert main(["--checkpoint", str(tmp_path / "sr"), str(tmp_path / "low.png"), "--out",
                 str(tmp_path / "pred"), "--device", "cpu"]) == 0
    out = sorted(p.name for p in (tmp_path / "pred").iterdir())
    assert out == ["low_sr.png"], out
    assert Image.open(tmp_path / "pred" / "low_sr.png").size == (40, 24)


def test_old_run_folder_takes_task_from_train_args(tmp_path):
    model = _tiny(in_channels=1, classes=1)
    model.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    del data["inference"]
    (tmp_path / "config.json").write_text(json.dumps(data))
    (tmp_path / "train_args.json").write_text(json.dumps({"task": "super-resolution", "sr_scale": 4,
                                                           "image_size": 48, "tile_size": None}))
    _, _, task, scale, tile = load_for_inference(InferenceOptions(tmp_path, device="cpu"))
    assert (task, scale, tile) == ("super-resolution", 4, 48)  # zero padding: the training crop
    (tmp_path / "train_args.json").write_text(json.dumps({"image_size": 48, "padding_mode": "reflect"}))
    assert load_for_inference(InferenceOptions(tmp_path, device="cpu"))[4] == 512  # window-invariant


def test_hub_repo_id_loads_from_an_offline_cache_both_ways(tmp_path):
    pytest.importorskip("huggingface_hub")
    model = _tiny()
    model.inference_info = InferenceInfo(tile_size=32)
    model.save_pretrained(tmp_path / "saved")
    cache = _fake_cache(tmp_path, tmp_path / "saved")
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        want = model(x)
        for load in (BiONet.from_pretrained, bionet_fast.from_pretrained):
            for rev in (None, REV):
                got = load("org/bionet-tiny", cache_dir=cache, local_files_only=True, revision=rev).eval()
                assert torch.equal(got(x), want)
                assert got.inference_info.tile_size == 32
    with pytest.raises(FileNotFoundError, match="not in the cache"):
        bionet_fast.from_pretrained("org/other", cache_dir=cache, local_files_only=True)
    with pytest.raises(ValueError, match="revision"):
        bionet_fast.from_pretrained(tmp_path / "saved", revision="main")


def test_missing_huggingface_hub_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(ImportError, match=r"pip install bionet_fast\[hub\]"):
        bionet_fast.from_pretrained("org/name")
    with pytest.raises(ImportError, match=r"pip install bionet_fast\[hub\]"):
        _tiny().push_to_hub("org/name")


def test_push_to_hub_uploads_what_save_pretrained_writes(monkeypatch, tmp_path):
    hf = pytest.importorskip("huggingface_hub")
    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, private=None, exist_ok=False):
            calls["repo"] = (repo_id, exist_ok)

        def upload_folder(self, repo_id, folder_path, **kw):
            calls["files"] = sorted(p.name for p in __import__("pathlib").Path(folder_path).iterdir())
            shutil.copytree(folder_path, tmp_path / "uploaded")
            return "commit"

    monkeypatch.setattr(hf, "HfApi", FakeApi)
    model = _tiny()
    assert model.push_to_hub("org/bionet-tiny", token="t") == "commit"
    assert calls["repo"] == ("org/bionet-tiny", True) and calls["token"] == "t"
    assert calls["files"] == ["README.md", "config.json", "model.safetensors"]
    assert bionet_fast.from_pretrained(tmp_path / "uploaded").config == model.config


def test_model_card(tmp_path):
    hf = pytest.importorskip("huggingface_hub")
    model = _tiny(integrate=True)
    model.inference_info = InferenceInfo(metrics={"dice": 0.877, "iou": 0.781, "epoch": 7},
                                         training_data="512 synthetic H&E-like images")
    model.inference_info.mpp = 0.5  # a pixel size, when the inference block records one
    model.save_pretrained(tmp_path, license="cc-by-nc-sa-4.0")
    card = (tmp_path / "README.md").read_text()
    n = sum(p.numel() for p in model.parameters())
    for text in ("# bionet (t=2)", f"{n:,}", "segmentation", "0.5 µm/px",
                 "512 synthetic H&E-like images", "| dice | 0.8770 |", "bionet_fast.from_pretrained(",
                 "MICCAI 2020", "Learning Recurrent Bi-directional Connections", "integrate (INT) | True"):
        assert text in card, text
    data = hf.ModelCard.load(tmp_path / "README.md").data  # the metadata the Hub reads
    assert (data.license, data.library_name, data.pipeline_tag) == ("cc-by-nc-sa-4.0", "bionet_fast",
                                                                    "image-segmentation")
    assert data.pixel_size_um == 0.5
    assert {(r.metric_type, r.metric_value) for r in data.eval_results} == {("dice", 0.877), ("iou", 0.781)}
    model.save_pretrained(tmp_path / "nocard", model_card=False)
    assert not (tmp_path / "nocard" / "README.md").exists()


def test_a_folder_saves_and_loads_without_huggingface_hub(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    model = _tiny()
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert bionet_fast.from_pretrained(tmp_path).config == model.config


def _trained_then_saved(folder):
    """A tiny model whose running statistics differ from the first batch's statistics."""
    model = _tiny().train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(2, 3, 16, 16) * 2)
    model.save_pretrained(folder)
    return model.eval()


def test_from_pretrained_returns_eval_mode_folders_and_hub_ids(tmp_path):
    """model(x) straight after loading is the eval-mode output, and it leaves the stored BatchNorm
    statistics alone (train mode would use batch statistics and overwrite them)."""
    model = _trained_then_saved(tmp_path / "saved")
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        want = model(x)
    loaders = [lambda: bionet_fast.from_pretrained(tmp_path / "saved"),
               lambda: BiONet.from_pretrained(tmp_path / "saved")]
    if importlib.util.find_spec("huggingface_hub") is not None:
        cache = _fake_cache(tmp_path, tmp_path / "saved")
        loaders += [lambda: bionet_fast.from_pretrained("org/bionet-tiny", cache_dir=cache, local_files_only=True),
                    lambda: BiONet.from_pretrained("org/bionet-tiny", cache_dir=cache, local_files_only=True)]
    for load in loaders:
        got = load()
        assert got.training is False and not any(m.training for m in got.modules())
        stats = {k: v.clone() for k, v in got.state_dict().items()}
        with torch.no_grad():
            assert torch.equal(got(x), want)
        assert all(torch.equal(v, got.state_dict()[k]) for k, v in stats.items())


def test_map_location_and_strict(tmp_path):
    from safetensors.torch import load_file, save_file

    _trained_then_saved(tmp_path)
    for where in ("cpu", torch.device("cpu")):
        got = bionet_fast.from_pretrained(tmp_path, map_location=where)
        assert {p.device.type for p in got.state_dict().values()} == {"cpu"}
    if torch.cuda.is_available():  # the GPU twin of the line above
        got = bionet_fast.from_pretrained(tmp_path, map_location="cuda")
        assert {p.device.type for p in got.state_dict().values()} == {"cuda"}
    with pytest.raises(ValueError, match="map_location='gpu0' is not a device"):
        bionet_fast.from_pretrained(tmp_path, map_location="gpu0")
    state = load_file(tmp_path / "model.safetensors")
    dropped = sorted(state)[0]
    del state[dropped]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="missing keys"):
        bionet_fast.from_pretrained(tmp_path)
    with pytest.warns(UserWarning, match=f"strict=False.*{dropped}"):
        got = bionet_fast.from_pretrained(tmp_path, strict=False)
    assert got.training is False and all(torch.equal(v, got.state_dict()[k]) for k, v in state.items())
