"""Export a trained model for other runtimes: one self-contained file with dynamic batch, height
and width, and a JSON beside it with what a consumer needs.

    python -m bionet_fast.export --checkpoint runs/bionet-t5 --format onnx --out bionet.onnx
    python -m bionet_fast.export --checkpoint runs/bionet-t5 --format torchscript --out bionet.pt
    python -m bionet_fast.export --checkpoint runs/bionet-t5 --format openvino --out bionet.xml
    python -m bionet_fast.export --checkpoint runs/bionet-t5 --format bioimageio --out nuclei.zip

bioimageio: a bioimage.io model package (TorchScript + ONNX weights, test tensors, cover, model card;
deepImageJ, ilastik, QuPath, napari; engine/bioimageio.py); --mpp records the training pixel size.

Formats: onnx (onnxruntime, OpenCV, TensorRT ...), torchscript (QuPath's deep-learning extension,
libtorch), exported-program (torch.export; keeps the input size check as a guard). ONNX is written
by torch.onnx.export(dynamo=True); the TorchScript-based exporter is the fallback, with the reason
printed (--onnx-exporter picks one). The reference PyTorch path is traced whatever backend the model
was trained with. The file is verified by running it (onnxruntime for ONNX, when installed) at two
input sizes; the largest difference from PyTorch is printed. The file itself (ONNX metadata_props,
TorchScript / ExportedProgram extra file bionet_fast.json) and OUT.json beside it hold the channels,
value range, size multiple (height and width must be multiples of it: the exported graph does not
check), activation, task, classes and threshold.

From Python: bionet_fast.export(model, "bionet.onnx", format="onnx").
"""
from __future__ import annotations

import argparse
import sys
import types

from .engine.prediction.bioimageio import export_bioimageio
from .engine.prediction.export import FORMATS, ONNX_EXPORTERS, ExportReport, export
from .engine.prediction.export_target import check_export_target
from .engine.prediction.inference import InferenceOptions, load_for_inference
from .models.config import InferenceInfo

__all__ = ["export", "export_bioimageio", "ExportReport", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bionet_fast.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="a training run's --out folder, a save_pretrained folder, a Hub repo id, or an "
                        "official .pt checkpoint")
    p.add_argument("--format", required=True, choices=FORMATS + ("bioimageio",), help="the file format")
    p.add_argument("--out", required=True, metavar="FILE", help="the file to write (OUT.json goes beside it)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    p.add_argument("--onnx-exporter", choices=ONNX_EXPORTERS, default="auto",
                   help="auto (default): torch.onnx.export(dynamo=True), the TorchScript-based exporter if "
                        "that fails (the reason is printed); dynamo or torchscript: that one only")
    p.add_argument("--mpp", type=float, help="bioimageio: the training pixel size, micrometres per pixel")
    p.add_argument("--no-verify", action="store_true", help="do not run the written file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file (never a model "
                   "folder's own files)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_export_target(args.out, args.checkpoint, args.overwrite)  # before any loading or tracing
        opts = InferenceOptions(args.checkpoint, device="cpu", backend="reference")
        model, _, task, scale, tile = load_for_inference(opts)
        if getattr(model, "inference_info", None) is None:  # older folders: train_args.json's choices
            model.inference_info = InferenceInfo(task=task, sr_scale=scale if task == "super-resolution"
                                                 else None, tile_size=tile)
        if args.format == "bioimageio":
            report = export_bioimageio(model, args.out, mpp=args.mpp, opset=args.opset,
                                       onnx_exporter=args.onnx_exporter)
        else:
            report = export(model, args.out, format=args.format, opset=args.opset,
                            verify=not args.no_verify, onnx_exporter=args.onnx_exporter)
    except (FileNotFoundError, ValueError, ImportError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0


class _CallableModule(types.ModuleType):
    """`import bionet_fast.export` rebinds the package attribute `export` from the function to this
    module: calling the module calls the function, so bionet_fast.export(model, path) always works."""

    def __call__(self, *args, **kwargs) -> ExportReport:
        return export(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    raise SystemExit(main())
