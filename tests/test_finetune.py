"""Fine-tuning from the CLI on tiny models: --initial-checkpoint (and its architecture check before
training), --model-ema (validated and saved), --grad-accum-steps, --clip-grad."""
import json

import pytest
import torch
from safetensors.torch import load_file

from bionet_fast import BiONet
from bionet_fast.engine.training.finetune import FineTuning, load_source
from bionet_fast.train import build_parser
from bionet_fast.train import main as train

TINY = ["--t", "2", "--multiplier", "0.125", "--depth", "2", "--batch-size", "2", "--steps", "2", "--epochs", "1",
        "--precise-bn", "2", "--device", "cpu", "--quiet", "--workers", "0", "--image-size", "32",
        "--n-train", "8", "--n-val", "2", "--no-augment"]


def _params(state: dict) -> dict:
    """Conv and BatchNorm parameters only (running statistics change in any forward)."""
    return {k: v for k, v in state.items() if k.endswith(("weight", "bias"))}


def test_help_lists_every_fine_tuning_flag():
    text = build_parser().format_help()
    for flag in ("--initial-checkpoint", "--model-ema", "--model-ema-decay", "--grad-accum-steps", "--clip-grad"):
        assert flag in text, flag


def test_initial_checkpoint_weights_are_the_starting_point(tmp_path, capsys):
    source = BiONet(iterations=2, multiplier=0.125, depth=2)  # zero padding, as official checkpoints
    source.save_pretrained(tmp_path / "src")
    out = tmp_path / "run"
    assert train(TINY + ["--initial-checkpoint", str(tmp_path / "src"), "--lr", "0", "--out", str(out)]) == 0
    # the synthetic recipe pads by reflection: same state dict, the run says so
    assert "pads with zeros; this run pads with reflect" in capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["padding_mode"] == "reflect"
    got = _params(load_file(str(out / "model.safetensors")))
    for k, v in _params(source.state_dict()).items():
        assert torch.equal(got[k], v), k  # lr 0: the run's weights are the checkpoint's
    info = json.loads((out / "config.json").read_text())["inference"]
    # a reflect-padded model is window-invariant: large default windows (zero-padded: the crop, 32)
    assert info["task"] == "segmentation" and info["tile_size"] == 512 and "dice" in info["metrics"]
    assert json.loads((out / "train_args.json").read_text())["initial_checkpoint"] == str(tmp_path / "src")


def test_architecture_mismatch_is_named_before_training(tmp_path, capsys):
    BiONet(iterations=3, multiplier=0.125, depth=2, integrate=True).save_pretrained(tmp_path / "src")
    out = tmp_path / "run"
    assert train(TINY + ["--initial-checkpoint", str(tmp_path / "src"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "iterations: checkpoint 3, run 2" in err and "integrate: checkpoint True, run False" in err
    assert "--t" in err and "--integrate" in err
    assert not (out / "metrics.jsonl").exists()
    with pytest.raises(FileNotFoundError, match="initial-checkpoint"):
        load_source(str(tmp_path / "missing" / "deeper"))


def test_model_ema_accumulation_and_clipping_in_one_run(tmp_path):
    """4 batches, accumulated by 2: 2 optimizer steps, 2 EMA updates; the best model saved (and
    validated) is the EMA's, not the live weights."""
    out = tmp_path / "run"
    assert train(TINY + ["--steps", "4", "--grad-accum-steps", "2", "--clip-grad", "1.0", "--model-ema",
                         "--model-ema-decay", "0.5", "--out", str(out)]) == 0
    state = json.loads((out / "training_state.json").read_text())
    assert state["progress"]["global_step"] == 4
    assert state["scheduler"]["last_epoch"] == 2  # the LR schedule counts optimizer steps
    tensors = load_file(str(out / state["tensors"]))
    steps = {float(v) for k, v in tensors.items() if k.endswith(".step")} or \
        {v for k, v in state["optimizer"]["scalars"].items() if k.endswith(".step")}
    assert steps == {2.0}
    ema = load_file(str(out / "ema.safetensors"))
    best = load_file(str(out / "model.safetensors"))
    last = load_file(str(out / "last.safetensors"))
    assert int(ema["n_averaged"]) == 2  # one update per optimizer step
    for k, v in _params(best).items():
        assert torch.equal(v, ema["module." + k]), k
    assert any(not torch.equal(v, last[k]) for k, v in _params(best).items())


def test_accumulated_gradient_is_the_mean_and_clipping_bounds_the_norm():
    """FineTuning's arithmetic in float64: sum of loss/N backwards = mean of the batch gradients;
    clip_gradients returns the norm before and leaves it at most NORM."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).double()
    cfg = type("Cfg", (), dict(grad_accum_steps=3, clip_grad=0.01, model_ema=False, initial_checkpoint=None))
    ft = FineTuning(cfg, model)
    batches = [torch.randn(5, 4, dtype=torch.float64) for _ in range(3)]
    grads = []
    for x in batches:
        model.zero_grad()
        model(x).square().mean().backward()
        grads.append(model.weight.grad.clone())
    model.zero_grad()
    for step, x in enumerate(batches):
        assert ft.starts_cycle(step) == (step == 0) and ft.ends_cycle(step) == (step == 2)
        (model(x).square().mean() / ft.loss_scale()).backward()
    torch.testing.assert_close(model.weight.grad, torch.stack(grads).mean(0), rtol=1e-12, atol=1e-12)
    before = ft.clip_gradients(model, None, None)
    after = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
    assert before > 0.01 and after <= 0.01 * (1 + 1e-6)


def test_bad_fine_tuning_values_are_refused(tmp_path, capsys):
    for extra in (["--clip-grad", "0"], ["--grad-accum-steps", "0"], ["--model-ema-decay", "1.5"]):
        assert train(TINY + extra + ["--out", str(tmp_path / "x")]) == 2
        assert extra[0] in capsys.readouterr().err


def test_initial_checkpoint_from_an_official_port_file(tmp_path):
    from port_layout import PortNet, randomise

    from bionet_fast import load_official
    from bionet_fast.engine.training.finetune import load_initial_weights

    torch.manual_seed(0)
    path = tmp_path / "iter_2_mul_1_best_weights.pt"
    torch.save({"state_dict": randomise(PortNet(iterations=2, multiplier=0.25, num_layers=2), 0).state_dict()}, path)
    target = BiONet(iterations=2, multiplier=0.25, depth=2)
    load_initial_weights(target, str(path))
    for (k, a), b in zip(target.state_dict().items(), load_official(path).state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(ValueError, match="depth: checkpoint 2, run 3.*--depth"):
        load_initial_weights(BiONet(iterations=2, multiplier=0.25, depth=3), str(path))
