"""--cuda-graph (engine/cuda_graph.py): the rules, the static-buffer logic of the graphed train step
and forward on the CPU through an injected capture that runs the step eagerly (compared bit for bit
with eager steps), the flag through the train / evaluate / predict CLIs, the bench's dry run, and
the CUDA twin (three graphed steps against three eager steps)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from bionet_fast import BiONet
from bionet_fast.engine import cuda_graph as cg
from bionet_fast.engine.prediction.inference import infer
from bionet_fast.train import main as train_main

REPO = Path(__file__).resolve().parents[1]
TINY = dict(in_channels=3, classes=1, iterations=2, multiplier=0.125, depth=2)
CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny shapes: OpenMP threads only contend with each other on a busy 2-core host.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def bce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits.float(), y)


def batches(n: int, size: int = 16, rows: int = 2, device: str = "cpu") -> list:
    g = torch.Generator().manual_seed(1)
    return [(torch.rand(rows, 3, size, size, generator=g).to(device),
             (torch.rand(rows, 1, size, size, generator=g) > 0.5).float().to(device)) for _ in range(n)]


def setup(device: str = "cpu", backend: str = "reference", channels_last: bool = False, **kw):
    torch.manual_seed(0)
    model = BiONet(**{**TINY, **kw}, backend=backend).to(device).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.1 * s))  # the trainer's decay
    return model, opt, sched


def eager_steps(data, amp=False, channels_last=False, device="cpu", opt_setup=None, clip=None, **kw):
    """The trainer's eager step: zero_grad, forward under autocast, loss, backward, Adam, schedule."""
    model, opt, sched = setup(device, channels_last=channels_last, **kw)
    if opt_setup:
        opt_setup(opt)
    losses = []
    for x, y in data:
        x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
        opt.zero_grad(set_to_none=True)
        # autocast's weight cache is off under capture: each use of a shared conv weight gets its
        # own bf16 cast, so its gradient sums in fp32 (with the cache, in bf16: not the same bits)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp, cache_enabled=False):
            loss = bce(model(x), y)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        sched.step()
        losses.append(loss.detach().clone())
    return model, losses


def graphed_steps(data, capture, amp=False, channels_last=False, device="cpu", warmup=1, say=None, clip=None,
                  **kw):
    model, opt, sched = setup(device, channels_last=channels_last, **kw)
    options = cg.GraphStepOptions(amp=amp, warmup=warmup, clip=clip)
    step = cg.GraphedTrainStep(model, opt, bce, torch.device(device), options, capture=capture, say=say)
    losses = []
    for x, y in data:
        x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
        loss = step.step(x, y)
        assert loss is not None
        sched.step()
        losses.append(loss)
    return model, losses, step


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module, exact: bool = True) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    for k in sa:
        if exact:
            assert torch.equal(sa[k], sb[k]), k
        else:
            torch.testing.assert_close(sa[k], sb[k], rtol=2e-3, atol=2e-4, msg=k)


# --- pure rules --------------------------------------------------------------------------------------
def test_obstacles_name_the_reason():
    assert cg.graph_obstacle("cuda") is None
    assert "CUDA device" in cg.graph_obstacle("cpu")
    assert "several processes" in cg.graph_obstacle("cuda", world=2)
    assert "--compile" in cg.graph_obstacle("cuda", compiled=True)
    assert "bfloat16" in cg.graph_obstacle("cuda", grad_scaler=True)
    assert "--grad-accum-steps 4" in cg.graph_obstacle("cuda", accum=4)
    assert cg.GraphStepOptions(amp=True, amp_dtype="float16").grad_scaler
    assert not cg.GraphStepOptions(amp=True, amp_dtype="bfloat16").grad_scaler


def test_last_batch_rule():
    full = (8, 3, 64, 64)
    assert cg.batch_rule(full, None, training=True) == "capture"
    assert cg.batch_rule(full, full, training=True) == "replay"
    # a last partial batch: training never pads (BatchNorm statistics and the mean loss see every row)
    assert cg.batch_rule((5, 3, 64, 64), full, training=True) == "eager"
    assert cg.batch_rule((5, 3, 64, 64), full, training=False) == "pad"
    assert cg.batch_rule((8, 3, 32, 32), full, training=False) == "eager"  # another image size
    assert cg.batch_rule((9, 3, 64, 64), full, training=False) == "eager"
    assert cg.pick_rows(3, [4, 2, 8]) == 4
    assert cg.pick_rows(2, [4, 2]) == 2
    assert cg.pick_rows(5, [4, 2]) is None
    assert cg.pick_rows(1, []) is None


def test_tensor_lr_schedule_equals_float_schedule():
    """The scheduler fills a tensor lr in place; its values are the float schedule's rounded to
    float32, and the Adam steps stay within that rounding of the float-lr steps."""
    runs = []
    for tensor_lr in (False, True):
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(4, 4))
        opt = torch.optim.Adam([w], lr=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 3e-2 * s))
        if tensor_lr:
            cg.prepare_optimizer(opt, capturable=False, device=torch.device("cpu"), tensor_lr=True)
            lr_tensor = opt.param_groups[0]["lr"]
        lrs = []
        for step in range(6):
            opt.zero_grad()
            (w.sin() ** 2).sum().backward()
            opt.step()
            sched.step()
            lr = opt.param_groups[0]["lr"]
            lrs.append(float(lr))
            if tensor_lr:
                assert lr is lr_tensor  # filled in place: the graph reads this tensor
            else:
                assert lr == pytest.approx(cg.keras_decay(0.01, 3e-2, step + 1), rel=1e-12)
        runs.append((lrs, w.detach().clone()))
    (float_lrs, w_float), (tensor_lrs, w_tensor) = runs
    assert tensor_lrs == [float(torch.tensor(v, dtype=torch.float32)) for v in float_lrs]
    torch.testing.assert_close(w_tensor, w_float, rtol=1e-6, atol=1e-7)
    assert not torch.equal(w_tensor, torch.randn(4, 4))


def test_prepare_optimizer_round_trip():
    w = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.Adam([w], lr=0.5)
    w.grad = torch.ones(2)
    opt.step()
    cg.prepare_optimizer(opt, capturable=False, device=torch.device("cpu"), tensor_lr=True)
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor) and opt.state[w]["step"].dtype == torch.float32
    opt.param_groups[0]["capturable"] = True  # as resumed from a --cuda-graph run on a GPU
    with pytest.raises((RuntimeError, AssertionError), match="capturable"):
        opt.step()
    cg.prepare_optimizer(opt, capturable=False, device=torch.device("cpu"))  # back to plain
    assert opt.param_groups[0]["lr"] == 0.5 and opt.param_groups[0]["capturable"] is False
    opt.step()


# --- the graphed train step on the CPU (injected capture) --------------------------------------------
@pytest.mark.parametrize("variant", [{}, {"checkpoint_iters": True, "channels_last": True}, {"amp": True},
                                     {"clip": 0.05}], ids=["fp32", "ckpt-channels_last", "bf16", "clip"])
def test_graphed_steps_equal_eager_steps(variant):
    """1 warm-up + capture + 2 replays through static buffers equal 4 eager steps bit for bit (the
    eager optimizer with the same float32 tensor lr)."""
    data = batches(4)
    tensor_lr = lambda opt: cg.prepare_optimizer(opt, False, torch.device("cpu"), tensor_lr=True)  # noqa: E731
    ref, ref_losses = eager_steps(data, opt_setup=tensor_lr, **variant)
    capture = cg.EagerCapture()
    got, losses, step = graphed_steps(data, capture, **variant)
    assert capture.captures == 1 and capture.replays == 2
    assert step.counts == {"warmup": 1, "replayed": 3, "eager": 0}
    assert_same_state(ref, got)
    for a, b in zip(ref_losses, losses):
        assert torch.equal(a, b)
    # the returned loss is a copy: the next replay does not overwrite it
    assert losses[-1].data_ptr() != step.static_loss.data_ptr()


class _Failing(cg.EagerCapture):
    def capture(self, fn):
        raise RuntimeError("operation not permitted when stream is capturing\nmore")


def test_other_shapes_and_failed_capture_run_eagerly_said_once():
    messages: list[str] = []
    model, opt, _ = setup()
    step = cg.GraphedTrainStep(model, opt, bce, torch.device("cpu"), cg.GraphStepOptions(warmup=1),
                               capture=cg.EagerCapture(), say=messages.append)
    small, big = batches(3, size=16), batches(2, size=32)
    assert step.step(*small[0]) is not None  # warm-up
    assert step.step(*big[0]) is None and step.step(*big[1]) is None  # mixed sizes: eager
    assert step.step(*small[1]) is not None and step.step(*small[2]) is not None  # captured, replayed
    assert len([m for m in messages if "differs from the captured" in m]) == 1
    assert step.counts == {"warmup": 1, "replayed": 2, "eager": 2}

    messages.clear()
    step = cg.GraphedTrainStep(model, opt, bce, torch.device("cpu"), cg.GraphStepOptions(warmup=0),
                               capture=_Failing(), say=messages.append)
    assert step.step(*small[0]) is None and step.step(*small[1]) is None
    assert len(messages) == 1 and "capture failed (operation not permitted" in messages[0]
    assert all(p.grad is None for p in model.parameters())


def test_cpu_device_says_so_once_and_returns_none():
    messages: list[str] = []
    model, opt, _ = setup()
    step = cg.GraphedTrainStep(model, opt, bce, torch.device("cpu"), say=messages.append)
    x, y = batches(1)[0]
    assert step.step(x, y) is None and step.step(x, y) is None
    assert messages == ["CUDA graphs need a CUDA device; training eagerly on the cpu"]
    assert not isinstance(opt.param_groups[0]["lr"], torch.Tensor)  # the eager optimizer untouched


# --- the trainer -------------------------------------------------------------------------------------
TRAIN = ["--t", "2", "--multiplier", "0.125", "--depth", "2", "--batch-size", "2", "--steps", "4", "--epochs", "1",
         "--precise-bn", "2", "--device", "cpu", "--quiet", "--workers", "0", "--image-size", "32",
         "--n-train", "8", "--n-val", "2", "--seed", "3"]


def test_trainer_flag_on_the_cpu_and_with_the_stand_in_capture(tmp_path, monkeypatch, capsys):
    """--cuda-graph on the CPU: one message, eager training. With the stand-in capture injected
    (graphs allowed on the CPU) the trainer warms up, captures and ends with the weights, Adam
    moments, BatchNorm statistics and metrics of the eager run, bit for bit (augmentation on,
    outside the graph)."""
    assert train_main(TRAIN + ["--cuda-graph", "--out", str(tmp_path / "eager")]) == 0
    err = capsys.readouterr().err
    assert err.count("--cuda-graph: CUDA graphs need a CUDA device; training eagerly on the cpu") == 1, err
    made = []

    def stand_in(device):
        made.append(cg.EagerCapture())
        made[-1].tensor_lr = False  # the eager run's float lr (tensor lr: test_tensor_lr_schedule...)
        return made[-1]

    monkeypatch.setattr(cg, "graph_obstacle", lambda *a, **k: None)
    monkeypatch.setattr(cg, "CudaGraphCapture", stand_in)
    assert train_main(TRAIN + ["--cuda-graph", "--out", str(tmp_path / "graph")]) == 0
    assert "captured the training step (batch (2, 3, 32, 32)) after 3 warm-up step(s)" in capsys.readouterr().err
    assert len(made) == 1 and made[0].captures == 1  # steps 1-3 warm up, step 4 is the capture
    name = next((tmp_path / "eager").glob("training_state.*.safetensors")).name
    a, b = load_file(tmp_path / "eager" / name), load_file(tmp_path / "graph" / name)
    assert a.keys() == b.keys()
    for k in a:
        if not k.startswith("rng."):
            assert torch.equal(a[k], b[k]), k
    records = [json.loads((tmp_path / d / "metrics.jsonl").read_text()) for d in ("eager", "graph")]
    for r in records:
        for k in ("epoch_time_s", "images_per_s"):
            r.pop(k)
    assert records[0] == records[1]


def test_train_refuses_accumulation_but_not_clipping_with_the_flag(tmp_path, capsys):
    from bionet_fast.train import parse_args

    out = ["--out", str(tmp_path / "r")]
    assert train_main(TRAIN + ["--cuda-graph", "--grad-accum-steps", "2"] + out) == 2
    assert "cannot accumulate gradients; drop --cuda-graph or --grad-accum-steps" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # refused before any work
    cfg = parse_args(TRAIN + ["--cuda-graph", "--clip-grad", "1.0"] + out)
    assert cfg.cuda_graph and cg.GraphStepOptions.of(cfg).clip == 1.0


# --- the inference forward ---------------------------------------------------------------------------
def test_graphed_forward_pads_keys_and_recaptures():
    torch.manual_seed(0)
    model = BiONet(**TINY).eval()
    capture = cg.EagerCapture()
    fwd = cg.GraphedForward(model, capture, warmup=1, say=None)
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        want = model(x)
        assert torch.equal(fwd(x), want)
        torch.testing.assert_close(fwd(x[:3]), want[:3], rtol=1e-5, atol=1e-6)  # padded into the 4-row graph
        assert fwd.count == 1 and capture.replays == 2
        fwd(torch.rand(2, 3, 32, 32))  # another window size: its own graph
        assert fwd.count == 2
        model.to(torch.float64)  # new parameter tensors: the graphs would read the old ones
        assert fwd(x.double()).dtype == torch.float64 and fwd.count == 1


def test_infer_with_the_graphed_forward_matches_plain_infer():
    torch.manual_seed(0)
    model = BiONet(**TINY)
    image = torch.rand(1, 3, 40, 56)
    fwd = cg.GraphedForward(model, cg.EagerCapture(), warmup=1, say=None)
    plain = infer(model, image, tile_size=16, sw_batch_size=4)
    graphed = infer(model, image, tile_size=16, sw_batch_size=4, forward=fwd)
    torch.testing.assert_close(graphed, plain, rtol=1e-5, atol=1e-6)
    assert fwd.count == 1 and model.training  # the padded last chunk replays the 4-window graph
    assert cg.graphed_forward(model, torch.device("cpu"), False) is None


def test_evaluate_and_predict_flag_on_the_cpu(tmp_path, capsys):
    from bionet_fast.evaluate import build_parser as eval_parser
    from bionet_fast.predict import main as predict_main
    from PIL import Image
    import numpy as np

    assert eval_parser().parse_args(["--checkpoint", "c", "--data", "d", "--cuda-graph"]).cuda_graph
    model = BiONet(**TINY)
    model.save_pretrained(tmp_path / "m")
    Image.fromarray((np.random.default_rng(0).random((20, 24, 3)) * 255).astype(np.uint8)).save(tmp_path / "a.png")
    rc = predict_main(["--checkpoint", str(tmp_path / "m"), str(tmp_path / "a.png"), "--out", str(tmp_path / "p"),
                       "--device", "cpu", "--tile-size", "16", "--cuda-graph"])
    assert rc == 0
    assert "--cuda-graph: CUDA graphs need a CUDA device; running eagerly on the cpu" in capsys.readouterr().err
    assert (tmp_path / "p" / "a_mask.png").is_file()


# --- the bench's dry run -----------------------------------------------------------------------------
def test_graph_step_bench_quick(capsys):
    sys.path.insert(0, str(REPO))
    from bench import graph_step

    assert graph_step.main(["--quick"]) == 0
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("| reference")]
    assert len(rows) == 2, table
    assert "CPU dry run" in table


# --- the CUDA twin -----------------------------------------------------------------------------------
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (CPU twin: test_graphed_steps_equal_eager_steps)")
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_cuda_graphed_steps_equal_eager_steps_gpu(backend):
    """Three graphed steps (1 warm-up, capture + replay, replay) against three eager steps with the
    same capturable Adam: bit for bit in fp32 with deterministic cuDNN (reference), close (triton)."""
    flags = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        data = batches(3, size=32, device="cuda")
        kw = dict(device="cuda", backend=backend, checkpoint_iters=True)
        capturable = lambda opt: cg.prepare_optimizer(opt, True, torch.device("cuda"))  # noqa: E731
        ref, ref_losses = eager_steps(data, opt_setup=capturable, **kw)
        got, losses, step = graphed_steps(data, None, **kw)
        torch.cuda.synchronize()
        assert step.replay is not None and step.counts == {"warmup": 1, "replayed": 2, "eager": 0}
        exact = backend == "reference"
        assert_same_state(ref, got, exact=exact)
        torch.testing.assert_close(torch.stack(losses), torch.stack(ref_losses),
                                   rtol=0 if exact else 1e-3, atol=0 if exact else 1e-4)
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags
