"""The Hugging Face Hub: download a saved folder by repo id, push one, and write its model card.

`huggingface_hub` is an optional extra (`pip install bionet_fast[hub]`), imported only when a repo
id is given, `push_to_hub` is called, or a folder is saved (for its model card: huggingface_hub's
`ModelCard` / `ModelCardData`; without the library a folder saves without README.md).
A Hub repo holds exactly what `save_pretrained` writes (config.json, model.safetensors, README.md),
so a downloaded snapshot loads through the same strict path as a local folder.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Optional

from .config import InferenceInfo

CITATION = """@inproceedings{xiang2020bionet,
  title     = {{BiO-Net}: Learning Recurrent Bi-directional Connections for Encoder-Decoder Architecture},
  author    = {Xiang, Tiange and Zhang, Chaoyi and Liu, Dongnan and Song, Yang and Huang, Heng and Cai, Weidong},
  booktitle = {Medical Image Computing and Computer Assisted Intervention (MICCAI)},
  year      = {2020}
}"""


def _hf():
    try:
        import huggingface_hub
    except ImportError:
        raise ImportError("loading from or pushing to the Hugging Face Hub needs huggingface_hub: "
                          "pip install bionet_fast[hub] (or pip install huggingface_hub)") from None
    return huggingface_hub


def download_folder(repo_id: str, weights_name: str = "model.safetensors", *, revision: Optional[str] = None,
                    cache_dir: Optional[str | Path] = None, local_files_only: bool = False,
                    token: Optional[str | bool] = None, force_download: bool = False) -> Path:
    """Fetch config.json and `weights_name` of `repo_id` (or find them in the cache: with
    local_files_only or HF_HUB_OFFLINE=1 nothing touches the network); returns the snapshot folder."""
    hf = _hf()
    kw = dict(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token,
              force_download=force_download, library_name="bionet_fast")
    try:
        config = hf.hf_hub_download(repo_id, "config.json", **kw)
        weights = hf.hf_hub_download(repo_id, weights_name, **kw)
    except hf.errors.LocalEntryNotFoundError as err:
        raise FileNotFoundError(
            f"{repo_id} is not a local folder, and the Hub repo {repo_id}"
            f"{f' (revision {revision})' if revision else ''} is not in the cache "
            f"({cache_dir or hf.constants.HF_HUB_CACHE}) while offline ({err.__class__.__name__}); "
            "pass the path of a saved folder, or go online (unset HF_HUB_OFFLINE, local_files_only=False)"
        ) from None
    except (hf.errors.RepositoryNotFoundError, hf.errors.RevisionNotFoundError,
            hf.errors.EntryNotFoundError) as err:
        raise FileNotFoundError(f"{repo_id} is neither a local folder nor a Hub model repo with config.json "
                                f"and {weights_name} ({err.__class__.__name__}); check the name, the "
                                "revision and your token") from None
    if Path(config).parent != Path(weights).parent:
        raise ValueError(f"{repo_id}: config.json and {weights_name} come from different snapshots")
    return Path(config).parent


def push_to_hub(model, repo_id: str, *, token: Optional[str] = None, private: Optional[bool] = None,
                revision: Optional[str] = None, commit_message: str = "Upload BiO-Net weights",
                create_pr: bool = False, license: str = "unknown") -> Any:
    """save_pretrained into a temporary folder and upload it as one commit (creating the repo if
    needed); returns huggingface_hub's CommitInfo."""
    hf = _hf()
    api = hf.HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, license=license, repo_id=repo_id)
        return api.upload_folder(repo_id=repo_id, folder_path=tmp, revision=revision,
                                 commit_message=commit_message, create_pr=create_pr)


def model_card(model, repo_id: Optional[str] = None, license: str = "unknown"):
    """The README.md model card of a saved folder as a huggingface_hub `ModelCard`, its metadata
    from `ModelCardData` (license, pipeline_tag, library_name, tags, the training pixel size when
    known, the validation metrics as model-index results); None when huggingface_hub is not
    installed (the folder then saves without a card: push_to_hub, which needs the library, always
    writes one)."""
    try:
        from huggingface_hub import EvalResult, ModelCard, ModelCardData
    except ImportError:
        return None
    cfg, info = model.config, _info(model)
    arch = getattr(model, "architecture", "bionet")
    name = f"{arch}-t{cfg.iterations}"
    mpp = _pixel_size(info)
    results = [EvalResult(task_type="image-segmentation" if info.task == "segmentation" else "image-to-image",
                          dataset_type="validation", dataset_name=info.training_data or "validation images",
                          dataset_split="validation", metric_type=k, metric_value=v, metric_name=k)
               for k, v in sorted(info.metrics.items()) if k not in ("epoch", "step") and _is_number(v)]
    data = ModelCardData(
        license=license, library_name="bionet_fast",
        pipeline_tag="image-segmentation" if info.task == "segmentation" else "image-to-image",
        tags=["bionet_fast", "bionet", "biomedical", "nuclei-segmentation", "pytorch"],
        model_name=name if results else None, eval_results=results or None,
        **({"pixel_size_um": mpp} if mpp is not None else {}))
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{_card_body(model, info, repo_id, mpp)}")


def model_card_text(model, repo_id: Optional[str] = None) -> str:
    """The card's Markdown without the Hub's YAML front matter (needs no huggingface_hub): what a
    bioimage.io package carries as its documentation."""
    info = _info(model)
    return _card_body(model, info, repo_id, _pixel_size(info))


def _info(model) -> InferenceInfo:
    info = getattr(model, "inference_info", None)
    return info if isinstance(info, InferenceInfo) else InferenceInfo()


def _pixel_size(info: InferenceInfo) -> Optional[float]:
    """The training images' pixel size in micrometres, if the inference block records one."""
    return float(info.mpp) if _is_number(info.mpp) else None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _card_body(model, info: InferenceInfo, repo_id: Optional[str], mpp: Optional[float]) -> str:
    """The card's Markdown: architecture, t, parameters, task, training data and metrics, how to
    load it, and the paper's citation."""
    cfg = model.config
    arch = getattr(model, "architecture", "bionet")
    n = sum(p.numel() for p in model.parameters())
    name = repo_id or "PATH_OR_REPO_ID"
    task = info.task + (f" (x{info.sr_scale})" if info.task == "super-resolution" else "")
    rows = [("architecture", arch), ("iterations t", cfg.iterations),
            ("channel multiplier", getattr(cfg, "multiplier", "-")), ("depth", getattr(cfg, "depth", "-")),
            ("integrate (INT)", getattr(cfg, "integrate", "-")), ("parameters", f"{n:,}"),
            ("input", f"{cfg.in_channels} channels, values in {list(info.value_range)}, sides multiples "
                      f"of {getattr(model, 'size_multiple', '?')}"),
            ("output", f"{cfg.classes} channel(s), {task}"),
            ("threshold", info.threshold),
            ("default inference window", info.tile_size or "whole images"),
            ("training pixel size", f"{mpp:g} µm/px (predict reads slides at it)" if mpp is not None
             else "not recorded (images are predicted at their own resolution)")]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    metrics = "\n".join(f"| {k} | {_fmt(v)} |" for k, v in sorted(info.metrics.items())) or "| - | not recorded |"
    return f"""# {arch} (t={cfg.iterations})

A BiO-Net (recurrent bi-directional U-Net) trained with bionet_fast for {task}.

| | |
|---|---|
{table}

## Training data

{info.training_data or "not recorded"}

## Validation metrics

| metric | value |
|---|---|
{metrics}

## How to load it

```python
import torch
import bionet_fast

model = bionet_fast.from_pretrained("{name}")   # a local folder or a Hub repo id; eval mode
probs = model.predict(torch.rand(1, {cfg.in_channels}, 256, 256))   # values in {list(info.value_range)}
```

or from the command line:
`python -m bionet_fast.predict --checkpoint {name} IMAGES... --out predictions/`
(images of any size are tiled). Export for QuPath (TorchScript) or ONNX runtimes:
`python -m bionet_fast.export --checkpoint {name} --format torchscript --out model.pt`.

## Citation

T. Xiang, C. Zhang, D. Liu, Y. Song, H. Huang, W. Cai, "BiO-Net: Learning Recurrent Bi-directional Connections for
Encoder-Decoder Architecture", MICCAI 2020.

```bibtex
{CITATION}
```
"""


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)
