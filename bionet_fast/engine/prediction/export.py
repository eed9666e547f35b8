"""Export a model to one self-contained file for other runtimes: ONNX, TorchScript (what QuPath's
deep-learning extension loads), a torch.export ExportedProgram, or an OpenVINO IR (NAME.xml + NAME.bin,
the metadata also in the model's rt_info).

`export(model, path, format=...)` always traces the reference (plain PyTorch) path, whatever
backend the model was built with: a reference copy shares the model's state_dict, so the fused
Triton blocks (opaque to every tracer) are never traced. Batch, height and width stay dynamic.
ONNX is written by the exporter PyTorch recommends, `torch.onnx.export(dynamo=True)` (torch.export
+ onnxscript), from the same ExportedProgram as the exported-program format; the TorchScript-based
exporter is the fallback (onnxscript missing, or the dynamo exporter failed), with the reason
said in one line. What a consumer needs (channels, value range, size multiple, activation, task,
classes, threshold) is stored inside the file (ONNX metadata_props, TorchScript / ExportedProgram
extra file `bionet_fast.json`; `read_file_metadata` reads it back) and in `<file>.json` beside it,
which adds the verification: the file is run (onnxruntime for ONNX when installed, torch.jit.load,
torch.export.load) at two input sizes and the largest difference from PyTorch is reported.

The size check (sides multiples of 2**(depth+1)) is not part of a traced ONNX or TorchScript graph:
a bad size fails inside the runtime with a shape error; the JSON states the rule. The ExportedProgram
keeps it as a guard.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import nn

from ...models.pretrained import inference_info
from ...utils.files import atomic_write, write_json

FORMATS = ("onnx", "torchscript", "exported-program", "openvino")
ONNX_EXPORTERS = ("auto", "dynamo", "torchscript")  # auto: dynamo, the TorchScript-based one if it fails
INPUT_NAME, OUTPUT_NAME = "image", "logits"
META_NAME = "bionet_fast.json"  # the extra file (TorchScript, ExportedProgram) / metadata key (ONNX)
# flat ONNX metadata_props beside the JSON one, for viewers such as Netron
ONNX_FLAT_KEYS = ("task", "classes", "threshold", "tile_size", "sr_scale")


@dataclass
class ExportReport:
    """What `export` wrote and how close the file's outputs are to PyTorch's."""

    path: Path
    meta_path: Path
    format: str
    max_abs_diff: dict[str, float] = field(default_factory=dict)  # "BxCxHxW" -> max |file - torch|
    verified_with: Optional[str] = None  # None when no runtime was available (ONNX without onnxruntime)
    exporter: str = ""  # ONNX: "dynamo" or "torchscript"
    fallback_reason: Optional[str] = None  # why the TorchScript-based ONNX exporter was used

    def summary(self) -> str:
        lines = [f"ONNX exporter: TorchScript-based (fallback: {self.fallback_reason})"] if self.fallback_reason else []
        if self.verified_with is None:
            lines.append(f"wrote {self.path} and {self.meta_path} (not verified: pip install onnxruntime)")
        else:
            diffs = ", ".join(f"{k}: {v:.2e}" for k, v in self.max_abs_diff.items())
            lines.append(f"wrote {self.path} and {self.meta_path}; verified with {self.verified_with}, "
                         f"largest difference from PyTorch {diffs}")
        return "\n".join(lines)


@contextlib.contextmanager
def _reference_backend() -> Iterator[None]:
    """BIONET_FAST_BACKEND would override the reference copy's backend: unset it while tracing."""
    saved = os.environ.pop("BIONET_FAST_BACKEND", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["BIONET_FAST_BACKEND"] = saved


def reference_copy(model: nn.Module) -> nn.Module:
    """An eval-mode, CPU, float32 copy of `model` on the reference backend, without checkpointing,
    sharing nothing but the values of its state_dict."""
    cfg = model.config
    changes = {k: v for k, v in (("backend", "reference"), ("checkpoint_iters", False))
               if hasattr(cfg, k)}
    ref = type(model).from_config(dataclasses.replace(cfg, **changes))
    ref.load_state_dict({k: v.detach().float().cpu() for k, v in model.state_dict().items()})
    return ref.eval()


def default_sizes(model: nn.Module, channels: int) -> list[tuple[int, int, int, int]]:
    """Two input shapes (trace / verify): a square and a non-square one of another batch size."""
    m = model.size_multiple
    side = max(2 * m, 64 // m * m)
    return [(1, channels, side, side), (2, channels, side + m, side - m if side > m else 2 * m)]


def export(model: nn.Module, path: str | Path, format: str = "onnx",
           sizes: Optional[list[tuple[int, int, int, int]]] = None, opset: int = 18,
           verify: bool = True, onnx_exporter: str = "auto") -> ExportReport:
    """Write `model` to `path` in `format` (onnx | torchscript | exported-program), its metadata
    inside the file and in the JSON `<path>.json` beside it; verify the file at `sizes` (two
    (B, C, H, W) shapes, sides multiples of model.size_multiple; the first is traced).
    `onnx_exporter`: "auto" (torch.onnx.export(dynamo=True), falling back to the TorchScript-based
    exporter with the reason in the report and a warning), "dynamo" (no fallback) or "torchscript".
    Returns an ExportReport."""
    if format not in FORMATS:
        raise ValueError(f"format={format!r}; choose one of {', '.join(FORMATS)}")
    if onnx_exporter not in ONNX_EXPORTERS:
        raise ValueError(f"onnx_exporter={onnx_exporter!r}; choose one of {', '.join(ONNX_EXPORTERS)}")
    if format == "onnx" and importlib.util.find_spec("onnx") is None:
        raise ImportError("ONNX export needs the onnx package (and onnxscript for the dynamo exporter, "
                          "onnxruntime to verify the file): pip install bionet_fast[onnx]")
    path = Path(path)
    if format == "openvino":
        _check_openvino(path)
    cfg = model.config
    sizes = sizes or default_sizes(model, cfg.in_channels)
    ref = reference_copy(model)
    for shape in sizes:  # names the fix before any tracing
        ref.check_input(torch.empty(shape, device="meta"))
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.rand(shape, generator=gen) for shape in sizes]
    file_meta = export_metadata(model, format, {})
    del file_meta["max_abs_diff_vs_pytorch"]  # the file says what it is; the JSON adds how it was checked
    used = {}
    with _reference_backend(), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation chatter, not actionable here
        writer = _WRITERS[format] if format != "openvino" else _ir_writer(path)
        atomic_write(path, lambda tmp: used.update(writer(ref, inputs[0], Path(tmp), opset, file_meta,
                                                          onnx_exporter) or {}))
        expected = [ref(x) for x in inputs]
        runner, name = _runner(format, path) if verify else (None, None)
        diffs = {}
        if runner is not None:
            for x, want in zip(inputs, expected):
                got = runner(x)
                diffs["x".join(map(str, x.shape))] = float((got.float() - want).abs().max())
    if used.get("fallback_reason"):
        warnings.warn(f"ONNX: the TorchScript-based exporter wrote {path} ({used['fallback_reason']})",
                      stacklevel=2)
    meta_path = path.with_name(path.name + ".json")
    meta = export_metadata(model, format, diffs)
    if format == "onnx":
        meta["onnx_exporter"] = used.get("exporter", "")
        meta["onnx_fallback_reason"] = used.get("fallback_reason")
    write_json(meta_path, meta)
    return ExportReport(path, meta_path, format, diffs, name, used.get("exporter", format),
                        used.get("fallback_reason"))


def export_metadata(model: nn.Module, format: str, diffs: dict) -> dict:
    """The JSON a consumer of the exported file needs."""
    cfg, info = model.config, inference_info(model)
    if info.task == "super-resolution":
        act = "none"
    else:
        act = "sigmoid" if cfg.classes == 1 else "softmax"
    arch = {k: v for k, v in cfg.to_dict().items()
            if k not in ("backend", "checkpoint_iters", "checkpoint_segments", "checkpoint_stages")}
    return {
        "format": format, "architecture": getattr(model, "architecture", "bionet"), "config": arch,
        "input": {"name": INPUT_NAME, "layout": "NCHW", "dtype": "float32", "channels": cfg.in_channels,
                  "value_range": list(info.value_range), "size_multiple": model.size_multiple,
                  "dynamic": ["batch", "height", "width"]},
        "output": {"name": OUTPUT_NAME, "channels": cfg.classes, "activation": act,
                   "meaning": "logits: apply the activation, then the threshold" if act != "none"
                   else "the super-resolved image (input upsampled bicubically sr_scale times first)"},
        "task": info.task, "sr_scale": info.sr_scale, "classes": cfg.classes, "threshold": info.threshold,
        "tile_size": info.tile_size,
        "size_check": f"height and width must be multiples of {model.size_multiple}; the exported graph "
                      "does not check it" + (" (the ExportedProgram keeps it as a guard)"
                                             if format == "exported-program" else ": pad or tile first"),
        "max_abs_diff_vs_pytorch": diffs, "exporter": f"bionet_fast {_version()}, torch {torch.__version__}",
    }


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("bionet_fast")
    except PackageNotFoundError:  # a source tree that is not installed
        return "(not installed)"


# --- the three writers and their runners ------------------------------------------------------------
def _dynamic_shapes(ref: nn.Module) -> dict:
    """Batch, height and width dynamic; height and width multiples of the model's size multiple."""
    m = ref.size_multiple
    dim = torch.export.Dim
    return {"x": {0: dim("batch", min=1, max=4096), 2: m * dim("h_blocks", min=1, max=65536 // m),
                  3: m * dim("w_blocks", min=1, max=65536 // m)}}


def _exported_program(ref: nn.Module, x: torch.Tensor):
    x = x.expand(2, *x.shape[1:]) if x.shape[0] == 1 else x  # an example batch of 1 would specialise it
    return torch.export.export(ref, (x,), dynamic_shapes=_dynamic_shapes(ref))


def _write_onnx(ref: nn.Module, x: torch.Tensor, tmp: Path, opset: int, meta: dict, exporter: str) -> dict:
    used = {"exporter": "torchscript"}
    if exporter != "torchscript":
        reason = _write_onnx_dynamo(ref, x, tmp, opset, fallback=exporter == "auto")
        used = {"exporter": "dynamo"} if reason is None else {"exporter": "torchscript", "fallback_reason": reason}
    if used["exporter"] == "torchscript":
        _write_onnx_torchscript(ref, x, tmp, opset)
    _add_onnx_metadata(tmp, meta)
    return used


def _write_onnx_dynamo(ref: nn.Module, x: torch.Tensor, tmp: Path, opset: int, fallback: bool = True
                       ) -> Optional[str]:
    """torch.onnx.export(dynamo=True) of the ExportedProgram, weights inside the file; returns None,
    or (fallback) the one-line reason it could not be used."""
    if importlib.util.find_spec("onnxscript") is None:
        if not fallback:
            raise ImportError("the dynamo ONNX exporter needs onnxscript: pip install bionet_fast[onnx]")
        return "onnxscript is not installed: pip install bionet_fast[onnx]"
    try:
        program = torch.onnx.export(_exported_program(ref, x), dynamo=True, input_names=[INPUT_NAME],
                                    output_names=[OUTPUT_NAME], opset_version=opset, external_data=False)
        program.save(str(tmp), external_data=False)
    except Exception as err:  # any failure of the newer exporter: the older one still works
        if not fallback:
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return f"the dynamo exporter failed: {type(err).__name__}: {first[:200]}"
    return None


def _write_onnx_torchscript(ref: nn.Module, x: torch.Tensor, tmp: Path, opset: int) -> None:
    # The TorchScript-based exporter: one file with the weights inside and dynamic axes.
    dyn = {0: "batch", 2: "height", 3: "width"}
    torch.onnx.export(ref, (x,), str(tmp), dynamo=False, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                      dynamic_axes={INPUT_NAME: dyn, OUTPUT_NAME: dyn}, opset_version=opset)


def _add_onnx_metadata(tmp: Path, meta: dict) -> None:
    """The metadata as ONNX metadata_props: the whole JSON under "bionet_fast.json", and flat keys."""
    import onnx

    proto = onnx.load(str(tmp))
    flat = {META_NAME: json.dumps(meta, sort_keys=True),
            "input_name": INPUT_NAME, "output_name": OUTPUT_NAME,
            "size_multiple": meta["input"]["size_multiple"], "value_range": meta["input"]["value_range"],
            "channels": meta["input"]["channels"], "activation": meta["output"]["activation"],
            **{k: meta[k] for k in ONNX_FLAT_KEYS}}
    del proto.metadata_props[:]
    for key, value in flat.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    onnx.save(proto, str(tmp))


def _write_torchscript(ref: nn.Module, x: torch.Tensor, tmp: Path, opset: int, meta: dict, exporter: str) -> None:
    # Tracing is shape-generic here: no op of the forward depends on H or W except the input check,
    # which the trace drops (check_trace=False: the check's Python branches warn, not differ).
    traced = torch.jit.trace(ref, (x,), check_trace=False)
    traced.save(str(tmp), _extra_files={META_NAME: json.dumps(meta, sort_keys=True)})


def _write_exported_program(ref: nn.Module, x: torch.Tensor, tmp: Path, opset: int, meta: dict,
                            exporter: str) -> None:
    torch.export.save(_exported_program(ref, x), str(tmp),
                      extra_files={META_NAME: json.dumps(meta, sort_keys=True)})


_WRITERS = {"onnx": _write_onnx, "torchscript": _write_torchscript, "exported-program": _write_exported_program}


def read_file_metadata(path: str | Path) -> dict:
    """The metadata an exported file carries itself (no sidecar needed): ONNX metadata_props or the
    TorchScript / ExportedProgram extra file."""
    path = Path(path)
    if path.suffix == ".onnx":
        import onnx

        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        return json.loads(props[META_NAME])
    extra = {META_NAME: ""}
    try:
        torch.jit.load(str(path), _extra_files=extra)
    except RuntimeError:  # not TorchScript: an ExportedProgram archive
        torch.export.load(str(path), extra_files=extra)
    return json.loads(extra[META_NAME])
def _check_openvino(path: Path) -> None:
    if importlib.util.find_spec("openvino") is None:
        raise ImportError("OpenVINO export needs the openvino package: pip install 'bionet_fast[openvino]'")
    if path.suffix != ".xml":
        raise ValueError(f"--out {path}: an OpenVINO IR is NAME.xml (+ NAME.bin beside it); "
                         f"use --out {path.with_suffix('.xml')}")


def _ir_writer(path: Path):
    """export()'s writer for the IR: the .bin beside `path`, the metadata in its rt_info."""
    return lambda ref, x, tmp, opset, meta, exporter: _write_openvino(ref, tmp, meta, path)


def openvino_route() -> str:
    """How `to_openvino` converts: "onnx" (the ONNX export, then convert_model of the file: about half
    the CPU time of the other route, same graph) where the onnx package is installed, else "pytorch"
    (convert_model on the module)."""
    try:
        return "onnx" if importlib.util.find_spec("onnx") is not None else "pytorch"
    except (ImportError, ValueError):  # sys.modules["onnx"] = None: blocked
        return "pytorch"


def to_openvino(ref: nn.Module, how: Optional[str] = None):
    """The reference-path model `ref` (reference_copy) as an openvino.Model with dynamic batch, height
    and width; `how`: "onnx" or "pytorch" (default: `openvino_route()`)."""
    import openvino as ov

    cin = ref.config.in_channels
    x = torch.rand(default_sizes(ref, cin)[0], generator=torch.Generator().manual_seed(0))
    with _reference_backend(), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer chatter about the input check's Python branches
        if (how or openvino_route()) == "pytorch":
            return ov.convert_model(ref, example_input=x, input=[ov.PartialShape([-1, cin, -1, -1])])
        with tempfile.TemporaryDirectory() as tmp:
            # the TorchScript-based exporter: seconds, where the dynamo one takes tens of them
            _write_onnx_torchscript(ref, x, Path(tmp) / "model.onnx", 17)
            model = ov.convert_model(str(Path(tmp) / "model.onnx"))
    model.reshape([-1, cin, -1, -1])  # the names ONNX gave the dynamic axes do not matter
    return model


def _write_openvino(ref: nn.Module, tmp: Path, meta: dict, path: Path) -> None:
    """The IR of `ref`: the .bin beside `path` (renamed into place first), the .xml into `tmp`
    (atomic_write renames it to `path`); `meta` goes into the model's rt_info as
    bionet_fast/metadata (JSON) and, for its plain values, bionet_fast/<key>."""
    import openvino as ov

    model = to_openvino(ref)
    model.set_rt_info(json.dumps(meta), ["bionet_fast", "metadata"])
    flat = {**meta, "channels": meta["input"]["channels"], "size_multiple": meta["input"]["size_multiple"],
            "activation": meta["output"]["activation"]}
    for k, v in flat.items():  # the plain values one by one too, for readers of the XML
        if isinstance(v, (str, int, float)) and not isinstance(v, bool):
            model.set_rt_info(str(v), ["bionet_fast", k])
    with tempfile.TemporaryDirectory(dir=path.parent) as d:
        ov.save_model(model, str(Path(d) / "model.xml"), compress_to_fp16=False)
        os.replace(Path(d) / "model.bin", path.with_suffix(".bin"))
        shutil.copyfile(Path(d) / "model.xml", tmp)


def _runner(format: str, path: Path):
    """(callable x -> output tensor, runtime name) for the written file; (None, None) when the
    runtime is not installed."""
    if format == "openvino":
        import openvino as ov

        compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        return (lambda x: torch.from_numpy(compiled(x.numpy())[0].copy())), "openvino"
    if format == "torchscript":
        loaded = torch.jit.load(str(path)).eval()
        return loaded, "torch.jit.load"
    if format == "exported-program":
        module = torch.export.load(str(path)).module()
        return module, "torch.export.load"
    try:
        import onnxruntime as ort
    except ImportError:
        return None, None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return (lambda x: torch.from_numpy(session.run(None, {INPUT_NAME: x.numpy()})[0])), "onnxruntime"
