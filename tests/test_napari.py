"""The napari plugin, headless (QT_QPA_PLATFORM=offscreen, napari's make_napari_viewer fixture from
pytest-qt): the manifest validates (npe2 validate), the widget segments the sample into the labels
predict --instances writes for the same image, the reader opens each output as its layer type, and
importing the plugin package does not import torch.

napari's canvas needs an OpenGL context even offscreen; Qt's offscreen platform gets one through
GLX (Mesa's software renderer) when an X server is there: without DISPLAY, the viewer tests start
Xvfb (apt-get install xvfb libgl1-mesa-dri) for this module."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # before the QApplication exists
napari = pytest.importorskip("napari")
pytest.importorskip("pytestqt")

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "bionet_fast" / "napari" / "napari.yaml"
PLUGIN = "bionet_fast"


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def test_manifest_validates_with_npe2():
    npe2_cli = [sys.executable, "-c", "from npe2.cli import main; main()"]
    done = subprocess.run([*npe2_cli, "validate", str(MANIFEST), "--imports"], capture_output=True, text=True,
                          env=_env(), timeout=120)
    assert done.returncode == 0 and "valid" in done.stdout, done.stdout + done.stderr


def test_plugin_modules_do_not_import_torch():
    code = ("import sys, bionet_fast.napari, bionet_fast.napari._reader, bionet_fast.napari._sample; "
            "print(sorted(m for m in ('torch', 'bionet_fast.engine', 'napari') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def x_display():
    """DISPLAY for OpenGL: the one given, else a private Xvfb for this module's tests."""
    if os.environ.get("DISPLAY"):
        yield os.environ["DISPLAY"]
        return
    xvfb = shutil.which("Xvfb")
    if xvfb is None:
        pytest.fail("napari's canvas needs OpenGL through an X server and neither DISPLAY nor Xvfb is "
                    "there: apt-get install xvfb libgl1-mesa-dri (or run under xvfb-run)")
    read, write = os.pipe()
    # The server must outlive the session's QApplication (stopping it first is a fatal X IO error in
    # Qt): it is stopped by the kernel when this process ends (PR_SET_PDEATHSIG).
    proc = subprocess.Popen([xvfb, "-displayfd", str(write), "-screen", "0", "1280x1024x24", "-nolisten", "tcp"],
                            pass_fds=(write,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=_die_with_parent)
    os.close(write)
    with os.fdopen(read) as f:
        number = f.readline().strip()  # Xvfb writes its display number once it accepts clients
    os.environ["DISPLAY"] = f":{number}"
    yield os.environ["DISPLAY"]


def _die_with_parent() -> None:
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


@pytest.fixture(scope="module")
def plugin():
    """The manifest registered with npe2 (an installed bionet_fast registers it by its entry point)."""
    from npe2 import PluginManager, PluginManifest

    pm = PluginManager.instance()
    try:
        pm.get_manifest(PLUGIN)
    except KeyError:
        pm.register(PluginManifest.from_file(MANIFEST))
    return pm


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A saved tiny BiONet whose probabilities spread around 0.5 (random weights, a scaled head)."""
    import torch

    from bionet_fast import BiONet

    torch.manual_seed(0)
    model = BiONet(multiplier=0.125, depth=2, iterations=2).eval()
    with torch.no_grad():
        model.head[-1].weight.mul_(40.0)
    folder = tmp_path_factory.mktemp("napari") / "run"
    model.save_pretrained(folder)
    return folder


def test_widget_labels_equal_predict_instances(x_display, make_napari_viewer, qtbot, plugin, tiny_run, tmp_path):
    from PIL import Image

    from bionet_fast.predict import main as predict

    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "synthetic_he")
    image = viewer.layers["synthetic H&E"]
    image.scale = (0.5, 0.5)
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "BiO-Net nuclei")
    widget.model_edit.setText(str(tiny_run))
    widget.image_combo.setCurrentText(image.name)
    widget.window_spin.setValue(64)
    widget.min_area_spin.setValue(0)  # the random tiny model's objects are small: keep them all
    widget.run()
    with qtbot.waitSignal(widget._worker.finished, timeout=180_000):
        pass
    assert widget.last_result is not None, widget.status.text()
    labels = viewer.layers["synthetic H&E nuclei"]
    prob = viewer.layers["synthetic H&E nucleus probability"]
    assert isinstance(labels, napari.layers.Labels) and isinstance(prob, napari.layers.Image)
    assert labels.data.dtype == np.uint16 and labels.data.shape == image.data.shape[:2]
    assert tuple(labels.scale) == tuple(prob.scale) == (0.5, 0.5)
    assert labels.data.max() >= 3  # objects, not an empty or full mask

    Image.fromarray(np.asarray(image.data)).save(tmp_path / "tile.png")
    out = tmp_path / "out"
    assert predict([str(tmp_path / "tile.png"), "--checkpoint", str(tiny_run), "--out", str(out), "--instances",
                    "--geojson", "--prob-format", "tiff", "--tile-size", "64", "--min-area", "0px",
                    "--no-progress"]) == 0
    import tifffile

    np.testing.assert_array_equal(labels.data, tifffile.imread(out / "tile_labels.tif"))

    # the reader: each output as its layer type
    for name, kind in (("tile_labels.tif", napari.layers.Labels), ("tile_prob.tif", napari.layers.Image),
                       ("tile.geojson", napari.layers.Shapes)):
        layers = viewer.open(out / name, plugin=PLUGIN)
        assert len(layers) == 1 and isinstance(layers[0], kind), (name, layers)
    assert len(viewer.layers["tile"].data) == labels.data.max()  # one polygon per nucleus
    np.testing.assert_array_equal(viewer.layers["tile_labels"].data, labels.data)
    assert viewer.layers["tile_prob"].data.shape == labels.data.shape


def test_reader_scales_uint16_probability_and_declines_other_files(plugin, tmp_path):
    import tifffile

    from bionet_fast.napari._reader import get_reader

    tifffile.imwrite(tmp_path / "a_prob.tif", np.array([[0, 65535]], np.uint16))
    (data, kwargs, kind), = get_reader(str(tmp_path / "a_prob.tif"))(str(tmp_path / "a_prob.tif"))
    assert kind == "image" and data.dtype == np.float32 and data.tolist() == [[0.0, 1.0]]
    assert get_reader(str(tmp_path / "a_mask.tif")) is None and get_reader(str(tmp_path / "a.png")) is None
    (tmp_path / "b.geojson").write_text('{"type": "Feature"}')
    with pytest.raises(ValueError, match="FeatureCollection"):
        get_reader(str(tmp_path / "b.geojson"))(str(tmp_path / "b.geojson"))
