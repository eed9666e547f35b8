"""Take docs/napari-widget.png: a napari window with the synthetic H&E sample, the "BiO-Net nuclei"
widget docked, and the labels it produced with the model RUN.

    xvfb-run -a -s "-screen 0 1600x1000x24" python docs/make_napari_screenshot.py RUN docs/napari-widget.png

(a real X window under Xvfb, Qt's xcb platform: apt-get install xvfb libxcb-icccm4 libxcb-keysyms1
libxcb-xinerama0 libxcb-image0 libxcb-render-util0; the offscreen platform's window grab leaves the
OpenGL canvas black)
"""
import sys
import warnings

warnings.filterwarnings("ignore", message="System theme detection")  # notifications over the canvas
warnings.filterwarnings("ignore", message="napari support for the PyQt5")

import napari
from npe2 import PluginManager, PluginManifest
from qtpy.QtWidgets import QApplication

from bionet_fast.napari import __file__ as plugin_init


def main(run: str, out: str) -> None:
    pm = PluginManager.instance()
    try:
        pm.get_manifest("bionet_fast")
    except KeyError:  # a source tree: register the manifest by hand
        pm.register(PluginManifest.from_file(plugin_init.replace("__init__.py", "napari.yaml")))
    viewer = napari.Viewer(title="napari: BiO-Net nuclei")
    viewer.window.resize(1400, 800)
    viewer.open_sample("bionet_fast", "synthetic_he", size=384, seed=7)
    _, widget = viewer.window.add_plugin_dock_widget("bionet_fast", "BiO-Net nuclei")
    widget.model_edit.setText(run)
    widget.run()
    while widget._worker is not None and widget._worker.is_running or widget.last_result is None:
        QApplication.processEvents()
    viewer.layers["synthetic H&E nucleus probability"].visible = False
    viewer.layers["synthetic H&E nuclei"].contour = 1
    viewer.reset_view()
    for _ in range(20):
        QApplication.processEvents()
    viewer.screenshot(out, canvas_only=False, flash=False)
    print(f"wrote {out}: {widget.status.text()}")
    viewer.close()


if __name__ == "__main__":
    main(*sys.argv[1:3])
