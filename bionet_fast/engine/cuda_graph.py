"""Whole-step CUDA graphs: the training step (forward, backward, Adam step, BatchNorm statistics)
and the inference forward captured once and replayed (``--cuda-graph`` of train, evaluate, predict).

At batch 2 a BiO-Net step launches hundreds of small kernels and the launches take about half the
step (bench/RESULTS.md: 38 -> 20 ms on an H200 for the reference train step in bf16). A replay
launches the whole step at once. The recipe is PyTorch's "whole-network capture"
(torch.cuda.graphs docs): warm-up steps on a side stream, static input and target tensors that
every batch is copied into, gradients set to None before capture (backward then allocates them in
the graph's pool), Adam with ``capturable=True`` and its learning rate held in a tensor (the
scheduler fills it in place, so the Keras decay lr / (1 + decay * step) keeps working under replay),
autocast's weight cache off during capture.

What cannot be captured runs eagerly, with one message: another batch shape than the captured one
(mixed image sizes; the trainer's loader drops a last partial batch), a CPU device, DDP, --compile,
fp16 with a GradScaler (it reads its inf check on the host every step), gradient accumulation, a
failed capture. --clip-grad is captured (clip_grad_norm_ is tensor ops, no host sync).

The capture is injected (`CudaGraphCapture` on CUDA, `EagerCapture` anywhere), so the static-buffer
logic (copy in, replay, read out) runs on the CPU in the tests and can be compared with eager steps.
"""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

Say = Callable[[str], None]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def say_stderr(message: str) -> None:
    print(f"--cuda-graph: {message}", file=sys.stderr, flush=True)


# --- pure rules (tested on the CPU) ---------------------------------------------------------------
def graph_obstacle(device_type: str, world: int = 1, compiled: bool = False, grad_scaler: bool = False,
                   accum: int = 1) -> Optional[str]:
    """Why a training step cannot be captured here (None: it can). The trainer then trains eagerly."""
    if device_type != "cuda":
        return f"CUDA graphs need a CUDA device; training eagerly on the {device_type}"
    if world > 1:
        return ("not with several processes yet (DDP capture needs DDP built on a side stream, NCCL's "
                "async error handling off and 11 warm-up steps); training eagerly")
    if compiled:
        return "not with --compile (torch.compile's graphs and this capture do not nest); training eagerly"
    if grad_scaler:
        return ("not with --amp-dtype float16: its GradScaler reads the inf check on the host every step; "
                "use --amp-dtype bfloat16 (no scaler) to replay the step; training eagerly")
    if accum > 1:
        return (f"not with --grad-accum-steps {accum} (the graphed step is one optimizer step per batch); "
                "training eagerly")
    return None


def batch_rule(shape: Sequence[int], captured: Optional[Sequence[int]], training: bool) -> str:
    """What a graphed step does with a batch of `shape` when a graph of `captured` exists (None: none yet).

    "capture": no graph yet; "replay": the captured shape; "pad" (inference only): fewer rows of
    the same image size, copied into the static batch, the extra rows' outputs dropped (eval-mode
    rows are independent); "eager": anything else. In training a padded batch would be another step
    (the BatchNorm batch statistics and the mean loss see every row), so a last partial batch is
    dropped by the trainer's loader (drop_last) and a batch of another size runs eagerly."""
    shape = tuple(shape)
    if captured is None:
        return "capture"
    captured = tuple(captured)
    if shape == captured:
        return "replay"
    if not training and shape[1:] == captured[1:] and shape[0] < captured[0]:
        return "pad"
    return "eager"


def pick_rows(rows: int, captured: Sequence[int]) -> Optional[int]:
    """The smallest captured batch size that holds `rows` rows (None: capture one of `rows`)."""
    fits = [r for r in captured if r >= rows]
    return min(fits) if fits else None


def keras_decay(lr: float, decay: float, step: int) -> float:
    """Keras' time-based decay, the trainer's schedule: lr / (1 + decay * step)."""
    return lr / (1.0 + decay * step)


# --- the optimizer under capture -------------------------------------------------------------------
def prepare_optimizer(opt: torch.optim.Optimizer, capturable: bool, device: torch.device,
                      tensor_lr: Optional[bool] = None) -> None:
    """Make `opt` replayable, or plain again: every group's lr a 0-dim float32 tensor on `device`
    (tensor_lr, default = capturable: a Python float would be baked into the graph; LR schedulers
    fill a tensor lr in place) or a float, `capturable` set, and Adam's `step` counters on the
    device (capturable) or the CPU. Idempotent. Called at the first step, so after a resume too
    (load_state_dict restores the saved groups: float lr, the saved run's capturable flag)."""
    tensor_lr = capturable if tensor_lr is None else tensor_lr
    for group in opt.param_groups:
        lr = group["lr"]
        if tensor_lr and not isinstance(lr, torch.Tensor):
            group["lr"] = torch.tensor(float(lr), dtype=torch.float32, device=device)
        elif not tensor_lr and isinstance(lr, torch.Tensor):
            group["lr"] = float(lr)
        if "capturable" in group:
            group["capturable"] = capturable
        for p in group["params"]:
            step = opt.state.get(p, {}).get("step")
            if isinstance(step, torch.Tensor):
                where = p.device if capturable else torch.device("cpu")
                opt.state[p]["step"] = step.to(dtype=torch.float32, device=where)


# --- capture backends --------------------------------------------------------------------------------
class CudaGraphCapture:
    """The real capture: warm-ups on a side stream, torch.cuda.graph on it, graph.replay()."""

    runs_on_capture = False  # capturing records the kernels, it does not run them
    capturable = tensor_lr = True

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.graphs: list = []  # the graphs (and their memory pools) live as long as this object

    @contextlib.contextmanager
    def warmup(self) -> Iterator[None]:
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            yield
        torch.cuda.current_stream(self.device).wait_stream(self.stream)

    def capture(self, fn: Callable[[], Any]) -> tuple[Any, Callable[[], None]]:
        graph = torch.cuda.CUDAGraph()
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        # thread_local: the DataLoader's pin-memory thread may allocate pinned memory meanwhile,
        # which "global" mode would turn into a failed capture (torch.compile's graphs do the same)
        with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
            out = fn()
        self.graphs.append(graph)
        return out, graph.replay


class EagerCapture:
    """A stand-in of CUDA-graph capture on any device (tests, the bench's CPU dry run): "capture"
    runs fn once and keeps its outputs as the static outputs; "replay" runs fn again and copies the
    new outputs into them, as a graph replay overwrites its static outputs."""

    runs_on_capture = True
    capturable = False  # Adam refuses capturable=True on the CPU
    tensor_lr = True  # exercises the tensor-lr schedule (on CUDA give the optimizer foreach=False)

    def __init__(self) -> None:
        self.captures = self.replays = 0

    def warmup(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def capture(self, fn: Callable[[], Any]) -> tuple[Any, Callable[[], None]]:
        self.captures += 1
        out = fn()

        def replay() -> None:
            self.replays += 1
            new = fn()
            with torch.no_grad():
                for static, value in zip(_tensors(out), _tensors(new)):
                    static.copy_(value)

        return out, replay


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    return [t for v in value for t in _tensors(v)]


def _autocast(device_type: str, enabled: bool, dtype: torch.dtype) -> torch.autocast:
    # The autocast weight cache must be off during capture (PyTorch docs): a cast cached before
    # the capture would be read by the graph after autocast frees it.
    return torch.autocast(device_type, dtype=dtype, enabled=enabled, cache_enabled=False)


# --- the training step -----------------------------------------------------------------------------
@dataclass(frozen=True)
class GraphStepOptions:
    """What the graphed step needs of the run's options (TrainConfig fields, world size)."""

    amp: bool = False
    amp_dtype: str = "bfloat16"
    compiled: bool = False
    world: int = 1
    warmup: int = 3  # eager steps before capture (PyTorch's recipe; they are real training steps)
    accum: int = 1  # --grad-accum-steps (above 1: eager)
    clip: Optional[float] = None  # --clip-grad: the global gradient norm, clipped inside the graph

    @classmethod
    def of(cls, cfg: Any, world: int = 1) -> "GraphStepOptions":
        """From a TrainConfig (amp, amp_dtype, compile; grad_accum_steps and clip_grad if present)."""
        return cls(bool(cfg.amp), str(cfg.amp_dtype), bool(cfg.compile), world,
                   accum=int(getattr(cfg, "grad_accum_steps", 1) or 1), clip=getattr(cfg, "clip_grad", None))

    @property
    def grad_scaler(self) -> bool:
        return self.amp and self.amp_dtype == "float16"


class GraphedTrainStep:
    """One training step (zero_grad, forward under autocast, loss, backward, optimizer step) on
    static batch tensors, captured once and replayed.

    ``step(x, y)`` with x (B, C, H, W) and y (B, K, H, W) on the device returns the step's loss
    (0-dim tensor, not synchronised), or None when this batch must run eagerly (the caller then
    runs its own step): capture impossible here, another batch shape, a failed capture. Each
    reason is said once. The first `options.warmup` steps run eagerly on the side stream, the next
    is captured (and replayed, as capture does not run it), every later one replays. The LR
    scheduler stays with the caller: it fills the optimizer's tensor lr between replays.
    """

    def __init__(self, net: torch.nn.Module, optimizer: torch.optim.Optimizer, loss: LossFn,
                 device: torch.device, options: GraphStepOptions = GraphStepOptions(),
                 capture: Optional[Any] = None, say: Optional[Say] = say_stderr):
        self.net, self.opt, self.loss, self.device, self.options = net, optimizer, loss, device, options
        self.say = say or (lambda _: None)
        self.said: set[str] = set()
        self.obstacle = None if capture is not None else graph_obstacle(
            device.type, options.world, options.compiled, options.grad_scaler, options.accum)
        if self.obstacle:
            self._once("obstacle", self.obstacle)
        self.capture = capture if capture is not None or self.obstacle else CudaGraphCapture(device)
        self.static: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self.static_loss: Optional[torch.Tensor] = None
        self.replay: Optional[Callable[[], None]] = None
        self.counts = {"warmup": 0, "replayed": 0, "eager": 0}
        self.prepared = False

    @property
    def enabled(self) -> bool:
        return self.obstacle is None

    def _once(self, key: str, message: str) -> None:
        if key not in self.said:
            self.said.add(key)
            self.say(message)

    def _disable(self, message: str) -> None:
        self.obstacle = message
        self._once("disabled", message)

    def _eager(self) -> None:
        self.counts["eager"] += 1
        return None

    def step(self, x: torch.Tensor, y: torch.Tensor) -> Optional[torch.Tensor]:
        if not self.prepared:  # after the caller's resume: it may have restored another setup
            self.prepared = True
            on = self.enabled
            prepare_optimizer(self.opt, on and self.capture.capturable, self.device, on and self.capture.tensor_lr)
        if not self.enabled:
            return self._eager()
        captured = None if self.static is None else tuple(self.static[0].shape)
        action = batch_rule(x.shape, captured, training=True)
        if action == "eager" or (self.static is not None and y.shape != self.static[1].shape):
            self._once("shape", f"a batch of shape {tuple(x.shape)} differs from the captured {captured}: "
                                "such batches train eagerly (mixed image sizes? --image-size crops every "
                                "image to one size)")
            return self._eager()
        if self.static is None:
            self.static = (torch.empty_like(x), torch.empty_like(y))  # keeps x's memory format
        self.static[0].copy_(x)
        self.static[1].copy_(y)
        if self.replay is not None:
            self.replay()
            self.counts["replayed"] += 1
            return self.static_loss.clone()
        if self.counts["warmup"] < self.options.warmup:
            self.counts["warmup"] += 1
            with self.capture.warmup():
                return self._step()
        return self._capture()

    def _step(self) -> torch.Tensor:
        """The captured function: reads only the static tensors, writes grads, weights, statistics.
        The same operations as the trainer's eager step (grads clipped with --clip-grad)."""
        self.opt.zero_grad(set_to_none=True)  # backward allocates the grads (in the graph's pool)
        x, y = self.static
        dtype = getattr(torch, self.options.amp_dtype)
        with _autocast(self.device.type, self.options.amp, dtype):
            logits = self.net(x)
        loss = self.loss(logits, y)
        loss.backward()
        if self.options.clip is not None:  # the trainer's call: tensor ops only, no host sync
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.options.clip)
        self.opt.step()
        return loss.detach()

    def _capture(self) -> Optional[torch.Tensor]:
        try:
            self.static_loss, self.replay = self.capture.capture(self._step)
        except Exception as err:  # noqa: BLE001 - any failure: the step still runs, eagerly
            self.opt.zero_grad(set_to_none=True)
            self._disable(f"capture failed ({str(err).splitlines()[0]}); training eagerly")
            return self._eager()
        self._once("captured", f"captured the training step (batch {tuple(self.static[0].shape)}) after "
                               f"{self.counts['warmup']} warm-up step(s); replaying it")
        if not self.capture.runs_on_capture:
            self.replay()
        self.counts["replayed"] += 1
        return self.static_loss.clone()


# --- the inference forward ----------------------------------------------------------------------
class GraphedForward:
    """``model(x)`` replayed from graphs captured per input (C, H, W, dtype) and batch size.

    x (N, C, H, W) -> the model's output for x, a new tensor (N, ...). A batch of fewer rows than a
    captured one is padded into it (eval-mode rows are independent; the extra rows are dropped).
    The graphs read the parameters where they were at capture: after `.to()` or replaced
    parameters they are recaptured (load_state_dict copies in place and needs nothing). At most
    `max_graphs` graphs; other shapes then run eagerly, said once. Inherits the caller's autocast.
    """

    def __init__(self, model: torch.nn.Module, capture: Optional[Any] = None, warmup: int = 2,
                 max_graphs: int = 8, say: Optional[Say] = say_stderr):
        self.model, self.warmup, self.max_graphs = model, warmup, max_graphs
        self.capture = capture
        self.say = say or (lambda _: None)
        self.said: set[str] = set()
        self.graphs: dict[tuple, dict[int, tuple]] = {}
        self.failed = False
        self._where = self._storages()

    def _once(self, key: str, message: str) -> None:
        if key not in self.said:
            self.said.add(key)
            self.say(message)

    def _storages(self) -> tuple:
        return tuple(t.data_ptr() for t in (*self.model.parameters(), *self.model.buffers()))

    @property
    def count(self) -> int:
        return sum(len(v) for v in self.graphs.values())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._storages() != self._where:  # the graphs would read the old tensors
            self.graphs.clear()
            self.capture, self._where = None, self._storages()
        key = (tuple(x.shape[1:]), x.dtype, x.device, x.is_contiguous(memory_format=torch.channels_last))
        by_rows = self.graphs.setdefault(key, {})
        rows = pick_rows(x.shape[0], list(by_rows))
        if rows is None:
            if self.failed:
                return self.model(x)
            if self.count >= self.max_graphs:
                self._once("full", f"{self.max_graphs} graphs captured; other input shapes run eagerly")
                return self.model(x)
            try:
                by_rows[x.shape[0]] = self._record(x)
            except Exception as err:  # noqa: BLE001 - inference goes on eagerly
                self.failed = True
                self._once("failed", f"capture failed ({str(err).splitlines()[0]}); running eagerly")
                return self.model(x)
            rows = x.shape[0]
        static_x, static_out, replay = by_rows[rows]
        n = x.shape[0]
        static_x[:n].copy_(x)
        replay()
        return static_out[:n].clone()

    def _record(self, x: torch.Tensor) -> tuple:
        if self.capture is None:
            self.capture = CudaGraphCapture(x.device) if x.device.type == "cuda" else EagerCapture()
        static_x = x.clone()
        device_type = x.device.type
        run = lambda: self.model(static_x)  # noqa: E731
        with _autocast(device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)):
            with self.capture.warmup():
                for _ in range(self.warmup):  # Triton autotuning and cuDNN's choices happen here
                    run()
            # BiONet's train()/eval() clear the fused backend's inference cache: the capture then
            # folds the BatchNorm affines inside the graph (into the graph's own memory) instead of
            # reading cached tensors that a later clear would free under it.
            self.model.train(self.model.training)
            out, replay = self.capture.capture(run)
        if not self.capture.runs_on_capture:
            replay()
        return static_x, out, replay


def graphed_forward(model: torch.nn.Module, device: torch.device, enabled: bool,
                    say: Optional[Say] = say_stderr) -> Optional[GraphedForward]:
    """The forward `infer` should call for `--cuda-graph` (None: the plain model). Not on CUDA:
    says so once and returns None (inference runs eagerly)."""
    if not enabled:
        return None
    if device.type != "cuda":
        if say:
            say(f"CUDA graphs need a CUDA device; running eagerly on the {device.type}")
        return None
    return GraphedForward(model, CudaGraphCapture(device), say=say)
