"""A model trained with the default synthetic recipe, shortened (t=2, 60 steps), gives the same
Dice whatever the inference window: its training crop, twice it, and the whole image (issue 16,
case 14). Scored on held-out synthetic images three times the crop's side, pooled over the images.

Not yet true at the default t=5 (docs/sections/robustness.md: the failure grows with the
iterations, and a t=5 model needs far more than a minute of training to be worth comparing); this
test keeps the t=2 case from regressing while case 14 stays open."""
from bionet_fast import BiONet
from bionet_fast.data.synthetic import SyntheticNucleiDataset
from bionet_fast.engine.inference import infer
from bionet_fast.metrics import SegmentationMeter
from bionet_fast.train import SYNTHETIC
from bionet_fast.train import main as train


def _dice(model: BiONet, images: SyntheticNucleiDataset, window: int) -> float:
    meter = SegmentationMeter(1)
    for i in range(len(images)):
        x, y = images[i]
        meter.update(infer(model, x[None], "segmentation", window), y[None])
    return meter.compute()["dice"]


def test_dice_does_not_depend_on_the_window(tmp_path):
    crop, out = SYNTHETIC["image_size"], tmp_path / "run"
    assert train(["--t", "2", "--epochs", "2", "--steps", "30", "--n-train", "128", "--n-val", "4",
                  "--precise-bn", "32", "--quiet", "--device", "cpu", "--out", str(out)]) == 0
    model = BiONet.from_pretrained(out).eval()
    held = SyntheticNucleiDataset(2, 3 * crop, seed=777)
    scores = {w: _dice(model, held, w) for w in (crop, 2 * crop, 3 * crop)}  # 3 * crop: the whole image
    assert scores[crop] > 0.7, scores  # a model worth comparing
    for window, score in scores.items():
        assert abs(score - scores[crop]) <= 0.02, scores
