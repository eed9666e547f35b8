"""Output names: the one sanitising rule every writer applies, so the names predict compares (the
duplicate check, "outputs complete, skipped", the per-image lock) are the names written.

A leaf of the engine: it imports nothing of bionet_fast.
"""
from __future__ import annotations

# Every file predict may write for an image NAME: NAME + one of these. No suffix ends with another
# one, so two different (sanitised) names never share an output file.
OUTPUT_SUFFIXES = ("_mask.png", "_mask.tif", "_prob.png", "_prob.tif", "_labels.tif", ".geojson", "_nuclei.csv",
                   "_rois.zip", "_sr.png")
# The fixed-name scratch files, hidden as ".NAME<suffix>": a several-class whole-slide probability
# map (engine.whole_slide) and the uint32 label rows before they become uint16 (engine.label_writer).
CHANNELS_TMP = "_prob.channels.tmp"
SCRATCH_SUFFIXES = (CHANNELS_TMP, "_labels.uint32.tmp")


def safe_name(name: str) -> str:
    """The name as the writers write it: brackets (glob / ImageJ syntax) become plain characters."""
    return name.replace("[", "_").replace("]", "")


def output_files(name: str) -> list[str]:
    """Every output file name predict may write for the (sanitised) image name."""
    return [name + s for s in OUTPUT_SUFFIXES]


def is_output_name(stem: str) -> bool:
    """Whether a file stem looks like one of predict's outputs (NAME_mask, NAME_prob, NAME_labels,
    NAME_sr, NAME_nuclei): a folder that is both input and --out must not predict them again."""
    return stem.endswith(("_mask", "_prob", "_labels", "_sr", "_nuclei"))
