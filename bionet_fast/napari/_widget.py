"""The "BiO-Net nuclei" widget: a model, an image layer, the window size, the threshold (and the
split of touching nuclei, where predict has one); Run segments the image in a worker thread (the
viewer stays live, napari's activity dock shows the windows done) and adds a labels layer (uint16
nuclei) and a probability layer with the image layer's scale and translation.

The segmentation is engine.segment.segment_array: predict --instances' own code path, so the labels
equal predict's NAME_labels.tif for the same image, model, window and threshold. torch and the
engine load when the widget opens; the model loads on the first Run (then it is kept).
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
from qtpy.QtCore import Signal
from qtpy.QtWidgets import (QCheckBox, QDoubleSpinBox, QFileDialog, QFormLayout, QHBoxLayout, QLabel, QLineEdit,
                            QPushButton, QSpinBox, QWidget, QComboBox)

MODEL_HINT = "run folder, saved folder, Hub id (org/name) or bioimage.io .zip"


class NucleiWidget(QWidget):
    """napari dock widget; `napari_viewer` is given by napari."""

    progressed = Signal(int, int)  # (windows done, windows in all), emitted from the worker thread

    def __init__(self, napari_viewer: Any):
        super().__init__()
        from ..engine.prediction.segment import instance_options

        self.viewer = napari_viewer
        self._models: dict[str, Any] = {}
        self._worker = None
        self._bar = None
        self.last_result = None
        form = QFormLayout(self)
        self.model_edit = QLineEdit()
        self.model_edit.setPlaceholderText(MODEL_HINT)
        row = QHBoxLayout()
        row.addWidget(self.model_edit)
        for text, pick in (("Folder...", self._pick_folder), ("File...", self._pick_file)):
            button = QPushButton(text)
            button.clicked.connect(pick)
            row.addWidget(button)
        form.addRow("model", row)
        self.image_combo = QComboBox()
        form.addRow("image", self.image_combo)
        self.window_spin = QSpinBox()
        self.window_spin.setRange(0, 16384)
        self.window_spin.setSingleStep(64)
        self.window_spin.setSpecialValueText("model's default")
        form.addRow("window size", self.window_spin)
        self.threshold_spin = QDoubleSpinBox()
        self.threshold_spin.setRange(0.0, 0.99)
        self.threshold_spin.setDecimals(3)
        self.threshold_spin.setSingleStep(0.05)
        self.threshold_spin.setSpecialValueText("model's default")
        form.addRow("threshold", self.threshold_spin)
        # predict's --min-area, in image pixels: smaller objects are dropped (15 px: predict's default
        # where the image records no pixel size)
        self.min_area_spin = QSpinBox()
        self.min_area_spin.setRange(0, 1_000_000)
        self.min_area_spin.setValue(15)
        form.addRow("smallest nucleus (px)", self.min_area_spin)
        self.split_check = None
        if "split" in instance_options():  # offered only where predict's instances can split
            self.split_check = QCheckBox("split touching nuclei")
            self.split_check.setChecked(True)  # predict's default (--split auto)
            form.addRow("", self.split_check)
        self.run_button = QPushButton("Run")
        self.run_button.clicked.connect(self.run)
        form.addRow(self.run_button)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        form.addRow(self.status)
        self.progressed.connect(self._on_progress)
        for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            event.connect(self._refresh_layers)
        self._refresh_layers()

    # --- choices ------------------------------------------------------------------------------
    def _refresh_layers(self, *_: Any) -> None:
        from napari.layers import Image

        current = self.image_combo.currentText()
        names = [layer.name for layer in self.viewer.layers if isinstance(layer, Image)]
        self.image_combo.clear()
        self.image_combo.addItems(names)
        if current in names:
            self.image_combo.setCurrentText(current)

    def _pick_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "A run or saved-model folder")
        if folder:
            self.model_edit.setText(folder)

    def _pick_file(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "A bioimage.io package or official checkpoint", "",
                                              "Models (*.zip *.pt *.pth)")
        if path:
            self.model_edit.setText(path)

    def options(self) -> dict[str, Any]:
        """segment_array's keywords from the form (None = the model's default)."""
        opts: dict[str, Any] = {"tile_size": self.window_spin.value() or None,
                                "threshold": self.threshold_spin.value() or None,
                                "min_area": float(self.min_area_spin.value())}
        if self.split_check is not None:
            opts["split"] = self.split_check.isChecked()
        return opts

    # --- running -------------------------------------------------------------------------------
    def run(self) -> None:
        """Start the segmentation of the chosen image layer in a worker thread."""
        from napari.qt.threading import create_worker
        from napari.utils import progress

        source = self.model_edit.text().strip()
        layer = self.viewer.layers[self.image_combo.currentText()] if self.image_combo.currentText() else None
        problem = ("choose a model: " + MODEL_HINT) if not source else "add or choose an image layer" \
            if layer is None else _not_2d(layer)
        if problem:
            self._say(problem, error=True)
            return
        self.run_button.setEnabled(False)
        self._say(f"segmenting {layer.name} ...")
        self._bar = progress(total=0, desc=f"BiO-Net nuclei: {layer.name}")
        self._worker = create_worker(self._compute, source, np.asarray(layer.data), self.options(),
                                     _start_thread=False)
        self._worker.returned.connect(lambda result: self._add_layers(layer, result))
        self._worker.errored.connect(lambda err: self._say(f"failed: {err}", error=True))
        self._worker.finished.connect(self._finished)
        self._worker.start()

    def _compute(self, source: str, image: np.ndarray, opts: dict[str, Any]):
        """Worker thread: load the model (once per source), segment the image."""
        from ..engine.prediction.segment import segment_array

        model = self._models.get(source)
        if model is None:
            from ..engine.prediction.inference import load_model

            model = load_model(source)
            if model is None:
                raise FileNotFoundError(f"{source}: not a model ({MODEL_HINT})")
            self._models = {source: model.eval()}  # one model kept: a new source replaces it
        return segment_array(model, image, progress=self.progressed.emit, **opts)

    def _on_progress(self, done: int, total: int) -> None:
        if self._bar is not None:
            self._bar.total = total
            self._bar.update(done - self._bar.n)

    def _add_layers(self, layer: Any, result: Any) -> None:
        place = {"scale": tuple(layer.scale[-2:]), "translate": tuple(layer.translate[-2:])}
        prob = result.probability
        names = {"name": f"{layer.name} nucleus probability"} if prob.ndim == 2 else \
            {"name": [f"{layer.name} class {k} probability" for k in range(prob.shape[0])], "channel_axis": 0}
        self.viewer.add_image(prob, colormap="magma", contrast_limits=(0.0, 1.0), opacity=0.6, blending="additive",
                              **names, **place)
        self.viewer.add_labels(result.labels, name=f"{layer.name} nuclei", **place)
        self.last_result = result
        self._say(f"{result.count} nuclei in {layer.name} (threshold {result.threshold:g})")

    def _finished(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self.run_button.setEnabled(True)

    def _say(self, text: str, error: bool = False) -> None:
        self.status.setText(text)
        self.status.setStyleSheet("color: #e04040" if error else "")
        if error:
            from napari.utils.notifications import show_error

            show_error(f"BiO-Net nuclei: {text}")


def _not_2d(layer: Any) -> Optional[str]:
    """Why `layer` cannot be segmented (None when it can): a 2-D grey or RGB(A) image only."""
    if getattr(layer, "multiscale", False):
        return f"{layer.name} is multiscale: segment whole slides with python -m bionet_fast.predict"
    spatial = layer.data.ndim - (1 if layer.rgb else 0)
    if spatial != 2:
        return f"{layer.name} has {spatial} dimensions; choose a 2-D image (or one plane of the stack)"
    return None
