"""Annotations as pathologists have them: Aperio ImageScope XML (MoNuSeg) and QuPath GeoJSON
rasterised into instance labels; MoNuSeg's folders as downloaded; instance label maps kept as
instances beside the binary target; predict's own GeoJSON read back as training labels."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from bionet_fast.data.annotations import read_aperio_xml, read_geojson, read_target, rasterize
from bionet_fast.data.datasets import SegmentationDataset, detect_format, discover
from bionet_fast.data.readers import read_image

RNG = np.random.default_rng(0)


def _square(x0, y0, x1, y1):
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def _aperio(path: Path, regions: list, mpp="0.2521") -> Path:
    """regions: (vertices, negative) in file order, written as ImageScope does."""
    out = [f'<Annotations MicronsPerPixel="{mpp}">', '<Annotation Id="1" Type="4"><Regions>']
    for k, (ring, negative) in enumerate(regions, start=1):
        neg = ' NegativeROA="1"' if negative else ""
        out.append(f'<Region Id="{k}" Type="0"{neg}><Attributes/><Vertices>')
        out += [f'<Vertex X="{x}" Y="{y}" Z="0" />' for x, y in ring]
        out.append("</Vertices></Region>")
    out.append("</Regions></Annotation></Annotations>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(out))
    return path


# ------------------------------------------------------------------------------- Aperio XML
def test_aperio_xml_ids_in_file_order_later_regions_win(tmp_path):
    path = _aperio(tmp_path / "a.xml", [
        (_square(2, 2, 8, 8), False),        # id 1
        ([(0, 0), (5, 5)], False),           # two vertices: skipped, takes no id
        (_square(6, 6, 12, 12), False),      # id 2, painted over id 1 where they overlap
        ([(14, 1), (17.2, 1), (14, 4.2)], False),  # id 3: a triangle, pixel centres inside
        (_square(10, 0, 13, 3), False),      # id 4
        (_square(11, 1, 20, 2), True),       # an exclusion: clears id 4 (and id 3) under it
    ])
    ann = read_aperio_xml(path, (16, 20))
    want = np.zeros((16, 20), np.int32)
    want[2:8, 2:8] = 1
    want[6:12, 6:12] = 2
    # the triangle: pixels whose centre (x + .5, y + .5) has (x + .5 - 14) + (y + .5 - 1) < 3.2
    for y in range(16):
        for x in range(20):
            if x >= 14 and y >= 1 and (x + 0.5 - 14) + (y + 0.5 - 1) < 3.2:
                want[y, x] = 3
    want[0:3, 10:13] = 4
    want[1, 11:20] = 0
    np.testing.assert_array_equal(ann.labels, want)
    assert ann.mpp == pytest.approx(0.2521) and ann.names == [None] * 5


def test_aperio_xml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.xml"
    bad.write_text("<Annotations><Region>")
    with pytest.raises(ValueError, match="bad.xml"):
        read_aperio_xml(bad, (4, 4))
    other = tmp_path / "other.xml"
    other.write_text("<svg/>")
    with pytest.raises(ValueError, match="other.xml.*Annotations"):
        read_aperio_xml(other, (4, 4))


# ---------------------------------------------------------------------------------- GeoJSON
def _features():
    outer, hole = _square(2, 2, 12, 12), _square(5, 5, 8, 8)
    return [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [outer + outer[:1], hole]},
         "properties": {"objectType": "annotation", "classification": {"name": "Tumor", "color": [1, 2, 3]}}},
        {"type": "Feature", "geometry": {"type": "MultiPolygon", "coordinates": [
            [_square(14, 2, 17, 5)], [_square(14, 10, 18, 14)]]},
         "properties": {"objectType": "detection", "classification": "Lymphocyte"}},
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 1]}, "properties": {}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [_square(0, 14, 10, 16)]},
         "nucleusGeometry": {"type": "Polygon", "coordinates": [_square(1, 14, 4, 16)]},
         "properties": {"objectType": "cell", "classification": {"name": "Tumor"}}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [_square(10, 10, 13, 13)]},
         "properties": {"objectType": "detection"}},  # unclassified, over the first feature
    ]


def _geo_want():
    want = np.zeros((16, 20), np.int32)
    want[2:12, 2:12] = 1
    want[5:8, 5:8] = 0  # the hole
    want[2:5, 14:17] = 2
    want[10:14, 14:18] = 2
    want[14:16, 1:4] = 3  # the cell's nucleus, not the cell
    want[10:13, 10:13] = 4
    return want


@pytest.mark.parametrize("wrap", ["collection", "list"])
def test_geojson_hole_multipolygon_cells_and_classes(tmp_path, wrap):
    feats = _features()
    data = {"type": "FeatureCollection", "features": feats} if wrap == "collection" else feats
    (tmp_path / "a.geojson").write_text(json.dumps(data))
    ann = read_geojson(tmp_path / "a.geojson", (16, 20))
    np.testing.assert_array_equal(ann.labels, _geo_want())
    assert ann.names == ["Tumor", "Lymphocyte", "Tumor", None]


def test_geojson_class_map_and_errors(tmp_path):
    (tmp_path / "a.geojson").write_text(json.dumps(_features()[:4]))
    mask, inst = read_target(tmp_path / "a.geojson", (16, 20), classes=3,
                             class_index={"Lymphocyte": 1, "Tumor": 2})
    want = _geo_want()
    want[10:13, 10:13] = 0  # the fifth feature left out
    want[10:12, 10:12] = 1
    lut = np.array([0, 2, 1, 2])  # Tumor, Lymphocyte, Tumor
    np.testing.assert_array_equal(inst, want)
    np.testing.assert_array_equal(mask, lut[inst])
    (tmp_path / "b.geojson").write_text(json.dumps(_features()))
    with pytest.raises(ValueError, match="b.geojson: object 4 has no classification"):
        read_target(tmp_path / "b.geojson", (16, 20), classes=3, class_index={"Lymphocyte": 1, "Tumor": 2})
    (tmp_path / "c.geojson").write_text("{not json")
    with pytest.raises(ValueError, match="c.geojson: unreadable GeoJSON"):
        read_geojson(tmp_path / "c.geojson", (4, 4))


def test_rasterize_pixel_centre_rule_and_clipping():
    # an edge-aligned square covers exactly its pixels; parts outside the image are clipped
    lab = rasterize([[[_square(-3, -3, 2, 2)]], [[_square(3, 1, 9, 4)]]], (4, 6))
    want = np.zeros((4, 6), np.int32)
    want[0:2, 0:2] = 1
    want[1:4, 3:6] = 2
    np.testing.assert_array_equal(lab, want)


# ------------------------------------------------------------------- datasets and readers
def _rgb(h=16, w=20):
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_lzw_rgb_tiff_reads_with_imagecodecs(tmp_path):
    rgb = _rgb(33, 47)
    tifffile.imwrite(tmp_path / "lzw.tif", rgb, photometric="rgb", compression="lzw")
    with tifffile.TiffFile(tmp_path / "lzw.tif") as tif:
        assert tif.pages[0].compression == 5  # LZW
    np.testing.assert_array_equal(read_image(tmp_path / "lzw.tif"), rgb)


def _monuseg_train(root: Path) -> Path:
    """MoNuSeg's training data as unpacked: Tissue Images/NAME.tif (LZW RGB) + Annotations/NAME.xml."""
    for i in range(2):
        (root / "Tissue Images").mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(root / "Tissue Images" / f"TCGA-{i}.tif", _rgb(), photometric="rgb", compression="lzw")
        _aperio(root / "Annotations" / f"TCGA-{i}.xml",
                [(_square(2 + i, 2, 8, 8), False), (_square(7, 7, 12, 12), False)])
    return root


def test_monuseg_training_folders_as_downloaded(tmp_path):
    root = _monuseg_train(tmp_path / "MoNuSeg 2018 Training Data")
    assert detect_format(root) == "folder"
    ds = SegmentationDataset(root, train=False, return_instances=True)
    assert ds.has_instances and "instance labels" in ds.describe() and ds.mpp == pytest.approx(0.2521)
    image, target, inst = ds[1]
    want = np.zeros((16, 20), np.int32)
    want[2:8, 3:8] = 1
    want[7:12, 7:12] = 2
    np.testing.assert_array_equal(inst.numpy(), want)
    assert torch.equal(target[0], (inst > 0).float()) and image.shape == (3, 16, 20)
    # training items stay (image, target): the loss is unchanged
    assert len(SegmentationDataset(root, image_size=8, train=True, return_instances=False)[0]) == 2


def test_monuseg_flat_test_folder_and_errors_name_the_file(tmp_path):
    root = tmp_path / "MoNuSegTestData"
    root.mkdir()
    tifffile.imwrite(root / "TCGA-a.tif", _rgb(), photometric="rgb", compression="lzw")
    _aperio(root / "TCGA-a.xml", [(_square(2, 2, 8, 8), False)])
    assert detect_format(root) == "annotated"
    ds = SegmentationDataset(root, train=False, return_instances=True)
    assert ds.fmt == "annotated" and ds[0][2].max() == 1 and int(ds[0][1].sum()) == 36
    tifffile.imwrite(root / "TCGA-b.tif", _rgb(), photometric="rgb")
    with pytest.raises(ValueError, match="TCGA-b.tif has no annotation"):
        discover(root)
    (root / "TCGA-b.tif").unlink()
    _aperio(root / "TCGA-c.xml", [(_square(2, 2, 8, 8), False)])
    with pytest.raises(ValueError, match="TCGA-c.xml has no image"):
        discover(root)


@pytest.mark.parametrize("ext", [".png", ".tif"])
def test_instance_label_maps_kept_as_instances(tmp_path, ext):
    labels = np.zeros((16, 20), np.uint16)
    labels[1:6, 1:6], labels[1:6, 6:12], labels[10:15, 2:19] = 7, 300, 65535  # touching 7 and 300
    for i in range(2):
        (tmp_path / "images").mkdir(exist_ok=True)
        Image.fromarray(_rgb()).save(tmp_path / "images" / f"n{i}.png")
        (tmp_path / "masks").mkdir(exist_ok=True)
        if ext == ".png":
            Image.fromarray(labels).save(tmp_path / "masks" / f"n{i}.png")
        else:
            tifffile.imwrite(tmp_path / "masks" / f"n{i}.tif", labels)
    ds = SegmentationDataset(tmp_path, train=False, return_instances=True)
    _, target, inst = ds[0]
    np.testing.assert_array_equal(inst.numpy(), labels.astype(np.int32))
    np.testing.assert_array_equal(target[0].numpy(), (labels > 0).astype(np.float32))
    # a plain 0/255 mask is binary: no instances, items stay pairs
    binary = tmp_path / "bin"
    (binary / "images").mkdir(parents=True)
    (binary / "masks").mkdir()
    Image.fromarray(_rgb()).save(binary / "images" / "a.png")
    Image.fromarray(((labels > 0) * 255).astype(np.uint8)).save(binary / "masks" / "a.png")
    ds = SegmentationDataset(binary, train=False, return_instances=True)
    assert not ds.has_instances and len(ds[0]) == 2


def test_geojson_classes_give_a_class_map_target(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.fromarray(_rgb()).save(tmp_path / "images" / "a.png")
    (tmp_path / "masks" / "a.geojson").write_text(json.dumps(_features()[:4]))
    ds = SegmentationDataset(tmp_path, train=False, classes=3, return_instances=True)
    assert ds.class_names == ["Lymphocyte", "Tumor"]
    _, target, inst = ds[0]
    np.testing.assert_array_equal(target[0].numpy(), np.array([0, 2, 1, 2])[inst.numpy()])
    with pytest.raises(ValueError, match="pass --classes 3"):
        SegmentationDataset(tmp_path, train=False, classes=2)


def test_predict_geojson_read_back_gives_the_same_instances(tmp_path):
    """InstanceWriter (what predict --instances --geojson writes) -> its GeoJSON beside the image
    as training labels -> exactly its label image, ids included."""
    from bionet_fast.engine.prediction.instances import InstanceWriter

    h, w = 60, 50
    yy, xx = np.mgrid[:h, :w]
    prob = np.full((h, w), 0.1, np.float32)
    for cy, cx, r in [(10, 10, 6), (30, 25, 9), (50, 40, 7), (12, 40, 5)]:
        prob[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 0.9
    prob[28:33, 20:22] = 0.2  # a hole, filled by the writer
    prob[45:60, 0:4] = 0.9  # an object on the image border
    out = tmp_path / "pred"
    writer = InstanceWriter(out, "img", (h, w), geojson=True)
    for y in range(0, h, 16):
        writer.put(prob[None, y:y + 16])
    writer.close()
    labels = tifffile.imread(out / "img_labels.tif").astype(np.int32)
    data = tmp_path / "data"
    data.mkdir()
    Image.fromarray(_rgb(h, w)).save(data / "img.png")
    (data / "img.geojson").write_bytes((out / "img.geojson").read_bytes())
    ds = SegmentationDataset(data, train=False, return_instances=True)
    assert ds.fmt == "annotated" and labels.max() == 5
    np.testing.assert_array_equal(ds[0][2].numpy(), labels)


def test_train_on_monuseg_as_downloaded_validates_objects(tmp_path):
    """The one command of docs/real-data.md, tiny: MoNuSeg's folders as unpacked, validated on the
    flat test folder; every epoch record holds AJI, PQ and object F1 beside Dice."""
    from bionet_fast.train import main as train

    root = _monuseg_train(tmp_path / "MoNuSeg 2018 Training Data")
    test = tmp_path / "MoNuSegTestData"
    test.mkdir()
    tifffile.imwrite(test / "TCGA-t.tif", _rgb(), photometric="rgb", compression="lzw")
    _aperio(test / "TCGA-t.xml", [(_square(2, 2, 8, 8), False), (_square(10, 3, 15, 9), False)])
    out = tmp_path / "run"
    assert train(["--train-data", str(root), "--valid-data", str(test), "--t", "2", "--multiplier", "0.125",
                  "--depth", "2", "--batch-size", "2", "--steps", "1", "--epochs", "1", "--image-size", "16",
                  "--workers", "0", "--device", "cpu", "--quiet", "--out", str(out)]) == 0
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    for key in ("dice", "aji", "pq", "object_f1"):
        assert 0.0 <= record[key] <= 1.0, key
    assert record["n_true_objects"] == 2


def test_binary_mask_among_instance_maps_gives_its_components(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for name in ("a", "b"):
        Image.fromarray(_rgb()).save(tmp_path / "images" / f"{name}.png")
    _aperio(tmp_path / "masks" / "a.xml", [(_square(2, 2, 8, 8), False)])
    binary = np.zeros((16, 20), np.uint8)
    binary[1:4, 1:4], binary[8:12, 5:15] = 255, 255
    Image.fromarray(binary).save(tmp_path / "masks" / "b.png")
    ds = SegmentationDataset(tmp_path, train=False, return_instances=True)
    assert ds.has_instances
    inst = ds[1][2].numpy()
    assert inst.max() == 2 and set(np.unique(inst[1:4, 1:4])) == {1} and set(np.unique(inst[8:12, 5:15])) == {2}
