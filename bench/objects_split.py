"""Touching nuclei separated: object F1, PQ and AJI of components / watershed / contour decoding
on synthetic touching nuclei, pixel Dice beside them, and the cost of the split in the streaming
instance writer as a ratio (split vs none on the same probability map, one process).

    # the two models (short recipes, CPU):
    python -m bionet_fast.train --epochs 3 --out runs/mask3
    python -m bionet_fast.train --epochs 3 --target contour --out runs/contour3
    # the parameter sweep (tuning images, seed 101) and the report (held-out images, seed 2**31 - 2):
    python bench/objects_split.py --mask-model runs/mask3 --contour-model runs/contour3 --sweep --out split.json

Images: synthetic H&E-like tiles (bionet_fast.data.synthetic) with instance labels, two regimes:
"default" (the training statistics: about 64% of nuclei touch another) and "crowded"
(--density 1.5 --children 1.5: about 88% touch). The oracle rows split the true mask: what the
split itself can do when the mask is perfect. Metrics (local helper, see `object_scores`): object
F1 and PQ at IoU > 0.5 pooled over the images, AJI (Kumar et al. 2017) per image then averaged,
pixel Dice pooled on nucleus vs background.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from bionet_fast.data.synthetic import make_synthetic_nuclei
from bionet_fast.engine.prediction.inference import infer
from bionet_fast.engine.prediction.instances import InstanceWriter
from bionet_fast.engine.prediction.split import SplitOptions, label_image
from bionet_fast.models import from_pretrained

TUNE_SEED, TEST_SEED = 101, 2**31 - 2  # neither is a training seed nor the validation seed (2**31 - 1)
REGIMES = {"default": dict(), "crowded": dict(density=1.5, children=1.5)}


def _overlaps(truth: np.ndarray, pred: np.ndarray):
    """Pairwise intersections (n_true + 1, n_pred + 1) and the object areas."""
    nt, npr = int(truth.max()), int(pred.max())
    inter = np.bincount(truth.ravel().astype(np.int64) * (npr + 1) + pred.ravel(),
                        minlength=(nt + 1) * (npr + 1)).reshape(nt + 1, npr + 1)
    return inter, inter.sum(1), inter.sum(0)


def object_scores(truth: np.ndarray, pred: np.ndarray) -> dict:
    """Counts of one image: tp / fp / fn and the summed IoU of matches at IoU > 0.5 (unique:
    two objects cannot both overlap one object by more than half), and AJI's C and U."""
    inter, at, ap = _overlaps(truth, pred)
    i = inter[1:, 1:].astype(np.float64)
    union = at[1:, None] + ap[None, 1:] - i
    iou = np.divide(i, union, out=np.zeros_like(i), where=union > 0)
    match = iou > 0.5
    tp = int(match.sum())
    out = dict(tp=tp, fp=int(pred.max()) - tp, fn=int(truth.max()) - tp, iou_sum=float(iou[match].sum()))
    c = u = 0.0
    used = np.zeros(iou.shape[1], bool)
    for g in range(iou.shape[0]):  # AJI: each true nucleus with its best-IoU prediction
        if iou.shape[1] and iou[g].max() > 0:
            j = int(iou[g].argmax())
            c, u, used[j] = c + i[g, j], u + union[g, j], True
        else:
            u += at[g + 1]
    out.update(aji_c=c, aji_u=u + float(ap[1:][~used].sum()))
    return out


def summarize(rows: list[dict]) -> dict:
    tp, fp, fn = (sum(r[k] for r in rows) for k in ("tp", "fp", "fn"))
    sq = sum(r["iou_sum"] for r in rows) / max(tp, 1)
    f1 = 2 * tp / max(2 * tp + fp + fn, 1)
    aji = np.mean([r["aji_c"] / r["aji_u"] if r["aji_u"] else 1.0 for r in rows])
    return dict(f1=round(f1, 4), pq=round(f1 * sq, 4), sq=round(sq, 4), aji=round(float(aji), 4),
                objects=tp + fp, nuclei=tp + fn)


def dice(masks: list[np.ndarray], truths: list[np.ndarray]) -> float:
    inter = sum(int((m & t).sum()) for m, t in zip(masks, truths))
    return round(2 * inter / max(sum(int(m.sum() + t.sum()) for m, t in zip(masks, truths)), 1), 4)


def images(regime: str, seed: int, n: int, size: int):
    return make_synthetic_nuclei(n, size, seed=seed, instances=True, **REGIMES[regime])


def probabilities(model, rgb: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(rgb).permute(0, 3, 1, 2).float() / 255
    info = model.inference_info
    with torch.no_grad():
        return infer(model, x, "segmentation", info.tile_size or 512).numpy()


def score(probs, truths, threshold, target, opts) -> dict:
    labels = [label_image(p, threshold, target, opts) for p in probs]
    res = summarize([object_scores(t, lab) for t, lab in zip(truths, labels)])
    res["dice"] = dice([lab > 0 for lab in labels], [t > 0 for t in truths])
    return res


def oracle(truths, opts) -> dict:
    return score([(t > 0)[None].astype(np.float32) for t in truths], truths, 0.5, "mask", opts)


def isolated(truths) -> list[np.ndarray]:
    """The true nuclei that touch no other one (each alone in its component): a split must keep them whole."""
    from scipy import ndimage

    out = []
    for lab in truths:
        comp, _ = ndimage.label(lab > 0)
        for i, sl in enumerate(ndimage.find_objects(comp), start=1):
            if len(np.unique(lab[sl][comp[sl] == i])) == 1:
                out.append(comp[sl] == i)
    return out


def sweep(regime_data, models) -> tuple[SplitOptions, list]:
    """The watershed's h and sigma: the best mean PQ over both regimes of the tuning images (oracle
    masks and the mask model's predictions) among the settings that split at most 0.5% of the
    isolated true nuclei."""
    from bionet_fast.engine.prediction.split import split_component

    alone = isolated(regime_data["default"][0])
    table = []
    for h in (0.25, 0.5, 0.75, 1.0, 1.5):
        for sigma in (0.5, 1.0, 2.0):
            opts = SplitOptions("watershed", h=h, sigma=sigma)
            pqs = []
            for regime, (truths, probs) in regime_data.items():
                pqs.append(oracle(truths, opts)["pq"])
                if "mask" in probs:
                    pqs.append(score(probs["mask"], truths, models["mask"][1], "mask", opts)["pq"])
            over = sum(split_component(x, opts)[1] > 1 for x in alone) / max(len(alone), 1)
            table.append(dict(h=h, sigma=sigma, pq=round(float(np.mean(pqs)), 4), isolated_split=round(over, 4)))
            print(table[-1], file=sys.stderr)
    best = max((r for r in table if r["isolated_split"] <= 0.005), key=lambda r: r["pq"])
    return SplitOptions("watershed", h=best["h"], sigma=best["sigma"]), table


def split_cost(probs: np.ndarray, threshold: float, opts: SplitOptions, tmp: Path, band: int = 64,
               repeats: int = 3) -> float:
    """Time of the streaming writer (labels + GeoJSON + CSV) with the split / without, on one
    probability map (K, H, W), interleaved, best of `repeats` each: the ratio."""
    best = {}
    for _ in range(repeats):
        for name, o in (("none", SplitOptions("none")), ("split", opts)):
            t0 = time.perf_counter()
            w = InstanceWriter(tmp, name, probs.shape[1:], geojson=True, measurements=True, threshold=threshold,
                               split=o, target="contour" if o.method == "contour" else "mask")
            for y in range(0, probs.shape[1], band):
                w.put(probs[:, y:y + band])
            w.close()
            best[name] = min(best.get(name, 1e9), time.perf_counter() - t0)
    return round(best["split"] / best["none"], 3)


def predict_cost(model, rgb: np.ndarray, threshold: float, opts: SplitOptions, tmp: Path, repeats: int = 2) -> float:
    """End to end: predict_image (windows through the model, blending, mask / probability TIFFs,
    labels + GeoJSON + CSV) on one RGB image (H, W, 3) with the split / without, interleaved, best
    of `repeats` each: the ratio of the times."""
    import tifffile

    from bionet_fast.engine.prediction.inference import window_predictor
    from bionet_fast.engine.prediction.slide import TiffReader
    from bionet_fast.engine.prediction.streaming import StreamOptions
    from bionet_fast.engine.prediction.whole_slide import OutputOptions, predict_image

    tifffile.imwrite(tmp / "slide.tif", rgb, photometric="rgb", tile=(256, 256))
    run = window_predictor(model, "segmentation")
    best = {}
    for _ in range(repeats):
        for name, o in (("none", SplitOptions("none")), ("split", opts)):
            reader = TiffReader(tmp / "slide.tif")
            t0 = time.perf_counter()
            predict_image(reader, run, 3, 1, model.size_multiple, StreamOptions(256, 0.25, 4, progress=False),
                          OutputOptions("png", True, True, True, threshold=threshold, split=o), tmp / name,
                          "slide", torch.device("cpu"))
            best[name] = min(best.get(name, 1e9), time.perf_counter() - t0)
            reader.close()
    return round(best["split"] / best["none"], 3)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mask-model", help="a run folder trained with the mask target")
    p.add_argument("--contour-model", help="a run folder trained with --target contour")
    p.add_argument("--n", type=int, default=16, help="images per regime and split (default 16)")
    p.add_argument("--size", type=int, default=256, help="image side (default 256)")
    p.add_argument("--sweep", action="store_true", help="choose the watershed's h / sigma on the tuning images")
    p.add_argument("--out", help="write the results as JSON here")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    models = {}
    for target, path in (("mask", a.mask_model), ("contour", a.contour_model)):
        if path:
            m = from_pretrained(path).eval()
            models[target] = (m, m.inference_info.threshold)
    result = {"n": a.n, "size": a.size}

    def data(seed):
        out = {}
        for regime in REGIMES:
            rgb, truths = images(regime, seed, a.n, a.size)
            out[regime] = (list(truths), {t: list(probabilities(m, rgb)) for t, (m, _) in models.items()})
        return out

    opts = SplitOptions("watershed")
    if a.sweep:
        opts, result["sweep"] = sweep(data(TUNE_SEED), models)
        result["chosen"] = dict(h=opts.h, sigma=opts.sigma)
    test = data(TEST_SEED)
    for regime, (truths, probs) in test.items():
        rows = {"oracle components": oracle(truths, SplitOptions("none")),
                "oracle watershed": oracle(truths, opts)}
        if "mask" in probs:
            thr = models["mask"][1]
            rows["mask model, components"] = score(probs["mask"], truths, thr, "mask", SplitOptions("none"))
            rows["mask model, watershed"] = score(probs["mask"], truths, thr, "mask", opts)
        if "contour" in probs:
            thr = models["contour"][1]
            rows["contour model, components"] = score(probs["contour"], truths, thr, "contour", SplitOptions("none"))
            rows["contour model, watershed"] = score(probs["contour"], truths, thr, "contour", opts)
            rows["contour model, contour"] = score(probs["contour"], truths, thr, "contour",
                                                   replace(opts, method="contour"))
        result[regime] = rows
        for k, v in rows.items():
            print(f"{regime:8s} {k:28s} " + "  ".join(f"{m} {v[m]}" for m in ("f1", "pq", "aji", "dice")))
    if "mask" in models:
        import tempfile

        truths, probs = test["crowded"]
        side = int(np.sqrt(len(probs["mask"])))
        grid = np.block([[probs["mask"][r * side + c][0] for c in range(side)] for r in range(side)])[None]
        rgb, _ = images("crowded", TEST_SEED, side * side, a.size)
        slide = np.concatenate([np.concatenate(list(rgb[r * side:(r + 1) * side]), axis=1) for r in range(side)])
        with tempfile.TemporaryDirectory() as tmp:
            result["split_cost_ratio_writer"] = split_cost(grid, models["mask"][1], opts, Path(tmp))
            result["split_cost_ratio_predict"] = predict_cost(models["mask"][0], slide, models["mask"][1], opts,
                                                              Path(tmp))
        print(f"instance writing alone (labels + GeoJSON + CSV), watershed / none: "
              f"{result['split_cost_ratio_writer']}x; whole predict (model + all outputs): "
              f"{result['split_cost_ratio_predict']}x ({grid.shape[1]}x{grid.shape[2]} px, crowded, 1 thread)")
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
