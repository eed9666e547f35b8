"""BiO-LinkNet: parameter counts, t=1 against an independent LinkNet written here from
`shared/reference/biolinknet.md`, the backward skips, exact checkpointing through the shared
recurrence, the ResNet-18 import, bad input, the factory round trip and the CLIs."""
from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from bionet_fast import BiOLinkNet, BiONet, create_model, from_pretrained
from checkpoint_compare import assert_checkpointing_is_exact, step

# --- an independent LinkNet (torchvision's ResNet-18 names for the encoder) -------------------


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x):
        h = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(h + (x if self.downsample is None else self.downsample(x)))


class ResNet18(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        for k, (cin, c) in enumerate([(64, 64), (64, 128), (128, 256), (256, 512)], start=1):
            setattr(self, f"layer{k}", nn.Sequential(BasicBlock(cin, c, 1 if k == 1 else 2), BasicBlock(c, c, 1)))
        self.fc = nn.Linear(512, 1000)


class Decoder(nn.Module):
    def __init__(self, m: int, n: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(m, m // 4, 1, bias=False), nn.BatchNorm2d(m // 4)
        self.tp = nn.ConvTranspose2d(m // 4, m // 4, 3, stride, 1, output_padding=stride - 1, bias=False)
        self.bn2 = nn.BatchNorm2d(m // 4)
        self.conv2, self.bn3 = nn.Conv2d(m // 4, n, 1, bias=False), nn.BatchNorm2d(n)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn3(self.conv2(F.relu(self.bn2(self.tp(x))))))


class LinkNet(nn.Module):
    def __init__(self, classes: int = 1):
        super().__init__()
        self.encoder = ResNet18()
        self.decoder4, self.decoder3 = Decoder(512, 256, 2), Decoder(256, 128, 2)
        self.decoder2, self.decoder1 = Decoder(128, 64, 2), Decoder(64, 64, 1)
        self.tp1, self.fbn1 = nn.ConvTranspose2d(64, 32, 3, 2, 1, output_padding=1), nn.BatchNorm2d(32)
        self.conv, self.fbn2 = nn.Conv2d(32, 32, 3, 1, 1), nn.BatchNorm2d(32)
        self.tp2 = nn.ConvTranspose2d(32, classes, 2, 2)

    def forward(self, x):
        r = self.encoder
        x0 = F.max_pool2d(F.relu(r.bn1(r.conv1(x))), 3, 2, 1)
        e1 = r.layer1(x0)
        e2 = r.layer2(e1)
        e3 = r.layer3(e2)
        e4 = r.layer4(e3)
        d = e3 + self.decoder4(e4)
        d = e2 + self.decoder3(d)
        d = e1 + self.decoder2(d)
        d = x0 + self.decoder1(d)
        h = F.relu(self.fbn2(self.conv(F.relu(self.fbn1(self.tp1(d))))))
        return self.tp2(h)


RULES = [  # reference LinkNet name -> BiOLinkNet name (t=1: iteration 0's BatchNorms)
    (r"encoder\.conv1\.", "stem."), (r"encoder\.bn1\.", "stem_norm."),
    (r"encoder\.layer(\d)\.(\d)\.conv(\d)\.", lambda m: f"encoders.{int(m[1]) - 1}.{m[2]}.conv{m[3]}."),
    (r"encoder\.layer(\d)\.0\.downsample\.0\.", lambda m: f"encoders.{int(m[1]) - 1}.0.downsample."),
    (r"encoder\.layer(\d)\.(\d)\.bn(\d)\.", lambda m: f"norms.0.encoders.{int(m[1]) - 1}.{m[2]}.{int(m[3]) - 1}."),
    (r"encoder\.layer(\d)\.0\.downsample\.1\.", lambda m: f"norms.0.encoders.{int(m[1]) - 1}.0.2."),
    (r"decoder(\d)\.conv(\d)\.", lambda m: f"decoders.{int(m[1]) - 1}.conv{m[2]}."),
    (r"decoder(\d)\.tp\.", lambda m: f"decoders.{int(m[1]) - 1}.deconv."),
    (r"decoder(\d)\.bn(\d)\.", lambda m: f"norms.0.decoders.{int(m[1]) - 1}.{int(m[2]) - 1}."),
    (r"tp1\.", "final.0."), (r"conv\.", "final.1."), (r"tp2\.", "final.2."),
    (r"fbn(\d)\.", lambda m: f"final_norms.{int(m[1]) - 1}."),
]


def to_bio(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        if key.startswith("encoder.fc."):
            continue
        for pattern, repl in RULES:
            new, n = re.subn("^" + pattern, repl, key)
            if n:
                out[new] = value
                break
        else:
            raise KeyError(key)
    return out


def randomize(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm affines and running statistics, so eval mode tests something."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(7)
    return model


def test_parameter_counts():
    counts = [sum(p.numel() for p in BiOLinkNet(iterations=t).parameters()) for t in (1, 2, 3)]
    assert counts == [11_533_377, 11_544_833, 11_556_289]
    assert sum(p.numel() for p in LinkNet().parameters()) - 513_000 == counts[0]  # the reference less fc
    assert sum(p.numel() for p in BiOLinkNet(iterations=1, classes=4).parameters()) == 11_533_248 + 129 * 4


def test_t1_is_exactly_linknet():
    ref = randomize(LinkNet(classes=2)).double()
    bio = BiOLinkNet(classes=2, iterations=1).double()
    state = to_bio(ref.state_dict())
    assert state.keys() == bio.state_dict().keys()
    bio.load_state_dict(state)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for train in (True, False):
        torch.testing.assert_close(bio.train(train)(x), ref.train(train)(x), rtol=1e-10, atol=1e-10)
    for key, value in to_bio(ref.state_dict()).items():  # running statistics moved alike in train mode
        torch.testing.assert_close(bio.state_dict()[key], value, rtol=1e-10, atol=1e-12, msg=key)


def test_backward_skips_change_the_output_and_get_gradients():
    model = BiOLinkNet(iterations=2).train()
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    out.square().mean().backward()
    # iteration 0's decoder reaches the output only through the backward skips
    for k in range(4):
        for p in model.norms[0].decoders[k].parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"decoder {k + 1} of iteration 1"
    with torch.no_grad():  # the same second iteration without backward input
        x0 = model._stem(x)
        alone = model._final(model._iteration(None, 1, x0, None)[0])
    assert (out - alone).abs().max() > 1e-3


@pytest.mark.parametrize("kw", [dict(iterations=3), dict(iterations=3, checkpoint_segments=2, checkpoint_stages=True)],
                         ids=["t3", "segments+stages"])
def test_checkpointing_is_exact(kw):
    plain = BiOLinkNet(**kw)
    assert_checkpointing_is_exact(plain)
    assert plain.norms[1].decoders[0][0].num_batches_tracked.item() == 2  # updated once per step


def test_resnet18_import(tmp_path):
    resnet = randomize(ResNet18())
    state = resnet.state_dict()  # torchvision's resnet18 keys, fc.* included (to be ignored)
    torch.save(state, tmp_path / "r18.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "r18.safetensors")
    for name in ("r18.pth", "r18.safetensors"):
        model = BiOLinkNet(iterations=3, encoder_weights=tmp_path / name)
        own = model.state_dict()
        for it in range(3):  # every iteration got the file's BatchNorms
            for f in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                assert torch.equal(own[f"norms.{it}.encoders.2.0.1.{f}"], state[f"layer3.0.bn2.{f}"])
                assert torch.equal(own[f"norms.{it}.encoders.3.0.2.{f}"], state[f"layer4.0.downsample.1.{f}"])
        assert torch.equal(own["stem.weight"], state["conv1.weight"])
        assert torch.equal(own["encoders.1.0.downsample.weight"], state["layer2.0.downsample.0.weight"])
        assert torch.equal(own["stem_norm.running_var"], state["bn1.running_var"])
    broken = {k: v for k, v in state.items() if k != "layer2.1.conv2.weight"}
    broken["layer1.0.bn1.weight"] = torch.ones(32)
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match=r"layer2\.1\.conv2\.weight.*layer1\.0\.bn1\.weight: file \(32,\)"):
        BiOLinkNet(encoder_weights=tmp_path / "broken.pth")
    with pytest.raises(ValueError, match="in_channels=1"):
        BiOLinkNet(in_channels=1, encoder_weights=tmp_path / "r18.pth")
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        BiOLinkNet(encoder_weights=tmp_path / "resnet18-f37072fd.pth")


def test_bad_input_is_named():
    model = BiOLinkNet(iterations=1).eval()
    with pytest.raises(ValueError, match="height 48 is not a multiple of 32.*32 or 64"):
        model(torch.randn(1, 3, 48, 64))
    with pytest.raises(ValueError, match="width 20 .* pad to 32,"):
        model(torch.randn(1, 3, 32, 20))
    with pytest.raises(ValueError, match="in_channels=3 but the input has 1 channels"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="fused Triton kernels implement BiONet"):
        BiOLinkNet(backend="triton")
    with pytest.raises(ValueError, match="iterations=0"):
        create_model("biolinknet", iterations=0)
    assert BiOLinkNet(backend="auto").resolved_backend(torch.device("cpu")) == "reference"


def test_create_model_and_from_pretrained_round_trip(tmp_path):
    link = randomize(create_model("biolinknet", iterations=2, classes=2)).eval()
    bio = randomize(create_model("bionet", iterations=2, multiplier=0.25, depth=2)).eval()
    x = torch.randn(1, 3, 32, 32)
    for model, cls in ((link, BiOLinkNet), (bio, BiONet)):
        folder = model.save_pretrained(tmp_path / cls.__name__)
        assert json.loads((folder / "config.json").read_text())["architecture"] == cls.architecture
        loaded = from_pretrained(folder)
        assert type(loaded) is cls and loaded.config == model.config
        torch.testing.assert_close(loaded.eval()(x), model(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="holds a biolinknet checkpoint, not a bionet"):
        BiONet.from_pretrained(tmp_path / "BiOLinkNet")
    with pytest.raises(ValueError, match="holds a bionet checkpoint, not a biolinknet"):
        BiOLinkNet.from_pretrained(tmp_path / "BiONet")
    config = json.loads((tmp_path / "BiONet" / "config.json").read_text())
    del config["architecture"]  # a folder saved before the key existed
    (tmp_path / "BiONet" / "config.json").write_text(json.dumps(config))
    assert type(from_pretrained(tmp_path / "BiONet")) is BiONet


def test_compile_autocast_channels_last_cpu():
    """torch.compile ("aot_eager": no C++ compiler needed) of a checkpointed model gives eager's loss and
    gradients; bf16 autocast with channels_last gives the fp32 output within bf16 rounding."""
    eager = BiOLinkNet(iterations=1, checkpoint_iters=True).train()  # t=1: compiling costs ~20 s per iteration
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, backend="aot_eager")
    x = torch.randn(2, 3, 32, 32)
    y = (torch.rand(2, 1, 32, 32) > 0.5).float()
    torch.testing.assert_close(step(compiled, x, y), step(eager, x, y), rtol=1e-6, atol=0)
    for (k, a), (_, b) in zip(eager.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=k)
    eager.eval()
    fast = copy.deepcopy(eager).to(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = fast(x.to(memory_format=torch.channels_last))
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), eager(x).detach(), rtol=0.05, atol=0.05)


# --- the CLIs ---------------------------------------------------------------------------------
LINK = ["--arch", "biolinknet", "--t", "2", "--batch-size", "2", "--steps", "2", "--epochs", "1", "--precise-bn", "4",
        "--device", "cpu", "--quiet", "--workers", "0", "--image-size", "64", "--n-train", "8", "--n-val", "2"]


def test_cli_options_and_resume(tmp_path, capsys):
    from bionet_fast.train import main as train
    from bionet_fast.train import parse_args

    assert train(LINK + ["--depth", "3", "--integrate"]) == 2
    assert "--depth, --integrate: BiO-Net option(s)" in capsys.readouterr().err
    assert train(LINK + ["--image-size", "48"]) == 2
    assert "--image-size 48 is not a multiple of 32 (BiO-LinkNet); use 32 or 64" in capsys.readouterr().err
    cfg = parse_args(["--arch", "biolinknet"])
    assert (cfg.out, cfg.bn_momentum, cfg.size_multiple, cfg.multiplier) == ("runs/biolinknet-t3", 0.1, 32, None)
    (tmp_path / "train_args.json").write_text(json.dumps(cfg.to_json()))
    assert parse_args(["--resume", str(tmp_path)]).arch == "biolinknet"  # resumes without BiO-Net options
    with pytest.raises(ValueError, match=r"architecture cannot change \(arch\)"):
        parse_args(["--resume", str(tmp_path), "--arch", "bionet"])
    old = parse_args([]).to_json()
    del old["arch"]  # a run folder written before --arch
    (tmp_path / "train_args.json").write_text(json.dumps(old))
    assert parse_args(["--resume", str(tmp_path)]).arch == "bionet"


def test_cli_train_evaluate_predict(tmp_path, capsys):
    """--arch biolinknet trains on the synthetic data (64x64 crops: at 32x32 the deepest map is 1x1);
    evaluate and predict read the architecture from the run folder."""
    from bionet_fast.data.synthetic import make_synthetic_nuclei
    from bionet_fast.evaluate import main as evaluate
    from bionet_fast.predict import main as predict
    from bionet_fast.train import main as train

    out = tmp_path / "run"
    assert train(LINK + ["--out", str(out)]) == 0, capsys.readouterr().err
    assert "BiO-LinkNet (ResNet-18) t=2, 11,544,833 parameters" in capsys.readouterr().out
    model = from_pretrained(out)
    assert type(model) is BiOLinkNet and model.config.iterations == 2 and model.config.bn_momentum == 0.1
    images, masks = make_synthetic_nuclei(2, size=64, seed=1)
    for i, (image, mask) in enumerate(zip(images, masks)):
        for folder, array in (("images", image), ("masks", mask * 255)):
            (tmp_path / "data" / folder).mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(tmp_path / "data" / folder / f"im{i}.png")
    ev = tmp_path / "eval"
    assert evaluate(["--checkpoint", str(out), "--data", str(tmp_path / "data"), "--out", str(ev),
                     "--device", "cpu", "--tile-size", "64"]) == 0, capsys.readouterr().err
    metrics = json.loads((ev / "metrics.json").read_text())
    assert metrics["n_images"] == 2 and 0 <= metrics["iou"] <= metrics["dice"] <= 1
    Image.fromarray(images[0][:50, :45]).save(tmp_path / "odd.png")  # any size: tiles of multiples of 32
    assert predict(["--checkpoint", str(out), str(tmp_path / "odd.png"), "--out", str(tmp_path / "pred"),
                    "--device", "cpu", "--tile-size", "64"]) == 0, capsys.readouterr().err
    mask = np.asarray(Image.open(tmp_path / "pred" / "odd_mask.png"))
    assert mask.shape == (50, 45) and set(np.unique(mask)) <= {0, 255}
