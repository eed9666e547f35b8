"""The pixel size a file records, in micrometres per pixel (mpp), with its unit honoured.

Sources, first found wins: an Aperio SVS description ("MPP = 0.2520"); OME-XML
``PhysicalSizeX`` with ``PhysicalSizeXUnit`` (nm, µm, mm, cm, m, Å, in ...; the OME default is the
micrometre); TIFF resolution tags (XResolution per ResolutionUnit: inch, centimetre, or the
millimetre / micrometre units some writers add); an ImageJ ``unit`` (um, micron, µm, nm, mm ...)
with the resolution tags as pixels per unit. PNG pHYs (Pillow's ``dpi``) for PNG files.

A value outside (0.01, 20) µm/px is not a microscope's pixel size: 72, 96 or 300 dpi written by
image editors as a default; it is ignored (None), as is a file that says nothing.

A leaf module: it imports nothing of bionet_fast.
"""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Optional

import tifffile

__all__ = ["tiff_mpp", "file_mpp", "UM_PER_UNIT", "plausible_mpp"]

# micrometres per unit, for OME's UnitsLength values and ImageJ's unit strings
UM_PER_UNIT = {
    "pm": 1e-6, "Å": 1e-4, "å": 1e-4, "angstrom": 1e-4, "nm": 1e-3, "nanometer": 1e-3, "nanometre": 1e-3,
    "µm": 1.0, "μm": 1.0, "um": 1.0, "micron": 1.0, "microns": 1.0, "micrometer": 1.0, "micrometre": 1.0,
    "\\u00b5m": 1.0, "mm": 1e3, "millimeter": 1e3, "cm": 1e4, "centimeter": 1e4, "dm": 1e5, "m": 1e6,
    "meter": 1e6, "thou": 25.4, "mil": 25.4, "in": 25400.0, "inch": 25400.0,
}
# TIFF ResolutionUnit -> micrometres per unit: INCH, CENTIMETER, and tifffile's MILLIMETER, MICROMETER
_RESUNIT_UM = {2: 25400.0, 3: 1e4, 4: 1e3, 5: 1.0}
_PLAUSIBLE = (0.01, 20.0)
_TIFFLIKE = (".tif", ".tiff", ".svs", ".ndpi", ".btf", ".tf8", ".tf2", ".ome.tif", ".scn", ".bif")


def plausible_mpp(mpp: Optional[float]) -> Optional[float]:
    """`mpp` when it could be a microscope's pixel size (0.01 to 20 µm/px), else None."""
    return float(mpp) if mpp and _PLAUSIBLE[0] < float(mpp) < _PLAUSIBLE[1] else None


def _unit_um(unit: str) -> Optional[float]:
    unit = (unit or "").strip()
    return UM_PER_UNIT.get(unit, UM_PER_UNIT.get(unit.lower()))


def ome_mpp(xml: str) -> Optional[float]:
    """µm per pixel of the first OME Image's Pixels (PhysicalSizeX in PhysicalSizeXUnit, µm by
    default); None when absent or in a unit that is not a length (pixel, reference frame)."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        m = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', xml)
        u = re.search(r'PhysicalSizeXUnit="([^"]+)"', xml)
        size, unit = (m.group(1) if m else None), (u.group(1) if u else "µm")
    else:
        pixels = next((el for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "Pixels"), None)
        if pixels is None:
            return None
        size, unit = pixels.get("PhysicalSizeX"), pixels.get("PhysicalSizeXUnit", "µm")
    factor = _unit_um(unit)
    if size is None or factor is None:
        return None
    return float(size) * factor


def tiff_mpp(tif: tifffile.TiffFile) -> Optional[float]:
    """Micrometres per pixel of the base level of an open TIFF (see the module docstring); None
    when the file does not say or says something implausible."""
    page = tif.pages.first if hasattr(tif.pages, "first") else tif.pages[0]
    desc = page.description or ""
    m = re.search(r"MPP\s*=\s*([0-9.eE+-]+)", desc)
    if m:
        return plausible_mpp(float(m.group(1)))
    if tif.ome_metadata and "PhysicalSizeX" in tif.ome_metadata:
        return plausible_mpp(ome_mpp(tif.ome_metadata))
    xres = page.resolution[0] if page.resolution else 0
    if not xres:
        return None
    unit = int(page.resolutionunit)
    if unit in _RESUNIT_UM:
        return plausible_mpp(_RESUNIT_UM[unit] / xres)
    ij_unit = _unit_um((tif.imagej_metadata or {}).get("unit", ""))
    return plausible_mpp(ij_unit / xres) if ij_unit else None


def file_mpp(path: str | Path) -> Optional[float]:
    """Micrometres per pixel a TIFF (or a PNG's pHYs) records; None for other files or when it
    does not say."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".png":
        from PIL import Image

        with Image.open(path) as im:
            dpi = im.info.get("dpi")
        return plausible_mpp(25400.0 / float(dpi[0])) if dpi and dpi[0] else None
    if suffix not in _TIFFLIKE:
        return None
    with tifffile.TiffFile(path) as tif:
        return tiff_mpp(tif)


def dataset_mpp(paths: list[Path]) -> tuple[Optional[float], str]:
    """The pixel size of a set of training images, from their files: (µm/px or None, a note for
    the log). Files that disagree by more than 5 % give their median, with a note saying so."""
    found = [m for m in (file_mpp(p) for p in paths) if m]
    if not found:
        return None, "pixel size: not recorded in the training images (set it with --train-mpp)"
    found.sort()
    mpp = found[len(found) // 2]
    note = f"pixel size: {mpp:.4g} um/px (from the files"
    if len(found) < len(paths):
        note += f"; {len(paths) - len(found)} of {len(paths)} images record none"
    if found[-1] > found[0] * 1.05:
        note += f"; they range {found[0]:.4g} to {found[-1]:.4g}, the median is kept; --train-mpp overrides"
    return mpp, note + ")"
