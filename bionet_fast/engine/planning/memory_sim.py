"""A symbolic autograd that counts bytes: the planner's model of one training step.

Nothing here touches a tensor's data. A `Sym` is a shape with a byte count; every storage it owns
is a `Buf`, counted from its creation until Python drops the last reference (as the storages of a
real step are, see engine/memory.py's `LiveBytesMode`). The block models (engine/memory_ops.py)
build `Node`s that say what a forward saves and what its backward allocates; `Tape.backward` runs
them as the autograd engine does on one thread (latest-created ready node first), releasing each
node's saved buffers after it ran, summing gradients in place, keeping parameter gradients.
`Tape.checkpoint` mirrors torch.utils.checkpoint's non-reentrant mode: inside it saved tensors
become holders, the inputs are saved through the enclosing context (so nested checkpoints keep
only what their parent keeps), and the first backward that needs a holder recomputes the region
with early stop.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence


class Buf:
    """One storage of `nbytes`, live while referenced."""

    __slots__ = ("tape", "nbytes")

    def __init__(self, tape: "Tape", nbytes: int):
        self.tape, self.nbytes = tape, int(nbytes)
        tape.alloc(self.nbytes)

    def __del__(self) -> None:
        self.tape.alloc(-self.nbytes)


@dataclass(eq=False)
class Leaf:
    """A parameter: its gradient buffer, once allocated, lives to the end of the step."""

    nbytes: int
    grad: Optional[Buf] = None


class Sym:
    """A symbolic tensor: shape, element size, its storage (None: not counted) and its producer."""

    __slots__ = ("shape", "itemsize", "buf", "node", "slot")

    def __init__(self, shape: Sequence[int], itemsize: int, buf: Optional[Buf],
                 node: Any = None, slot: int = 0):
        self.shape, self.itemsize, self.buf = tuple(shape), itemsize, buf
        self.node, self.slot = node, slot

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    @property
    def requires_grad(self) -> bool:
        return self.node is not None


class Holder:
    """What a checkpointed forward saves instead of a tensor; filled by the recomputation."""

    __slots__ = ("buf", "region", "__weakref__")

    def __init__(self, region: "Region") -> None:
        self.buf: Optional[Buf] = None
        self.region = region


class _Stop(Exception):
    pass


@dataclass(eq=False)
class Region:
    """One checkpoint call: its function, the metadata of its inputs, the holders of its forward."""

    fn: Callable
    specs: list
    inputs: list  # Buf or Holder per tensor input (saved through the enclosing context)
    holders: list = field(default_factory=list)  # weak references to the Holders
    recomputed: bool = False
    counter: int = 0


class Node:
    """A backward function: `bwd(grads_of_outputs, saved_bufs) -> grads per edge` (Bufs or None)."""

    __slots__ = ("seq", "edges", "saved", "bwd", "region", "nout")

    def __init__(self, tape: "Tape", edges: list, saved: list, bwd: Callable, nout: int):
        tape.seq += 1
        self.seq, self.edges, self.bwd, self.nout = tape.seq, edges, bwd, nout
        self.region = tape.packing_region()
        self.saved = [tape.pack(b) for b in saved if b is not None]


class Tape:
    """Byte counter, sequence numbers and the pack context stack of one simulated step."""

    def __init__(self) -> None:
        self.current = self.peak = self.seq = 0
        self.grad_bytes = self.grad_at_peak = 0  # parameter gradients allocated (at the peak)
        self.ctx: list = []  # ("fwd", Region) inside a checkpoint, ("re", Region) recomputing
        self.leaves: dict[int, Sym] = {}

    def alloc(self, nbytes: int) -> None:
        self.current += nbytes
        if self.current > self.peak:
            self.peak, self.grad_at_peak = self.current, self.grad_bytes

    # --- tensors --------------------------------------------------------------------------------
    def new(self, shape: Sequence[int], itemsize: int) -> Sym:
        return Sym(shape, itemsize, Buf(self, math.prod(shape) * itemsize))

    def buf(self, nbytes: int) -> Buf:
        return Buf(self, nbytes)

    def param(self, p: Any) -> Sym:
        """A parameter (not counted; its gradient is)."""
        sym = self.leaves.get(id(p))
        if sym is None:
            size = p.element_size()
            sym = self.leaves[id(p)] = Sym(tuple(p.shape), size, None, Leaf(p.numel() * size))
        return sym

    def record(self, outs: Sequence[Sym], inputs: Sequence[Optional[Sym]], saved: Sequence[Any],
               bwd: Callable) -> None:
        """Make `outs` the outputs of a node with edges to `inputs` (when any of them needs grad)."""
        if not any(x is not None and x.requires_grad for x in inputs):
            return
        edges = [(x.node, x.slot) if x is not None and x.requires_grad else None for x in inputs]
        bufs = [s.buf if isinstance(s, Sym) else s for s in saved]
        node = Node(self, edges, bufs, bwd, len(outs))
        for i, o in enumerate(outs):
            o.node, o.slot = node, i

    # --- saved tensor hooks ---------------------------------------------------------------------
    def packing_region(self) -> Optional[Region]:
        return self.ctx[-1][1] if self.ctx and self.ctx[-1][0] == "fwd" else None

    def pack(self, buf: Buf) -> Any:
        if not self.ctx:
            return buf
        kind, region = self.ctx[-1]
        if kind == "fwd":
            holder = Holder(region)
            region.holders.append(weakref.ref(holder))  # weak, as torch's: no cycle keeps it
            return holder
        holder = region.holders[region.counter]() if region.counter < len(region.holders) else None
        if holder is not None:  # recomputation: fill the original holder (if still needed)
            holder.buf = buf
        region.counter += 1
        if region.counter >= len(region.holders):
            raise _Stop  # early stop: everything the backward needs is back
        return buf

    def checkpoint(self, fn: Callable, *args: Optional[Sym]) -> Any:
        """fn(*args) under non-reentrant checkpointing; args: flat Syms or None (as
        models.recurrence.checkpointed passes them)."""
        specs = [(a.shape, a.itemsize) if a is not None else None for a in args]
        region = Region(fn, specs, [])
        region.inputs = [self.pack(a.buf) for a in args if a is not None and a.buf is not None]
        self.ctx.append(("fwd", region))
        try:
            return fn(*args)
        finally:
            self.ctx.pop()

    def recompute(self, region: Region) -> None:
        bufs = []
        for item in region.inputs:
            if isinstance(item, Holder):
                if item.buf is None:
                    self.recompute(item.region)
                bufs.append(item.buf)
                item.buf = None  # unpacked once: the recomputation holds it from now on
            else:
                bufs.append(item)
        it = iter(bufs)
        args = [None if s is None else Sym(s[0], s[1], next(it, None)) for s in region.specs]
        del bufs, it
        region.recomputed, region.counter = True, 0
        self.ctx.append(("re", region))
        try:
            if region.holders:
                region.fn(*args)
        except _Stop:
            pass
        finally:
            self.ctx.pop()

    # --- backward -------------------------------------------------------------------------------
    def backward(self, loss: Sym) -> None:
        """Run the backward of `loss` (a scalar): latest node first, saved buffers freed as it goes."""
        nodes, stack, seen = [], [loss.node], set()
        while stack:
            n = stack.pop()
            if not isinstance(n, Node) or id(n) in seen:
                continue
            seen.add(id(n))
            nodes.append(n)
            stack.extend(e[0] for e in n.edges if e is not None)
        left: dict[int, int] = {}
        for n in nodes:
            if n.region is not None:
                left[id(n.region)] = left.get(id(n.region), 0) + 1
        nodes.sort(key=lambda n: -n.seq)
        grads: dict[int, list] = {id(loss.node): [None] * loss.node.nout}
        grads[id(loss.node)][loss.slot] = self.buf(loss.itemsize)
        for n in nodes:
            gout = grads.pop(id(n), None)
            if gout is None:
                n.saved = []
                continue
            if n.region is not None and not n.region.recomputed:
                self.recompute(n.region)
            saved = _unpack(n)
            gin = n.bwd(gout, saved)
            del gout, saved
            self._deliver(grads, n.edges, gin)
            del gin
            if n.region is not None:
                left[id(n.region)] -= 1
                if not left[id(n.region)]:  # the frame dies with its last node: inputs go too
                    n.region.inputs = []

    def _deliver(self, grads: dict, edges: list, gin: Sequence[Optional[Buf]]) -> None:
        for edge, g in zip(edges, gin):
            if edge is None or g is None:
                continue
            target, slot = edge
            if isinstance(target, Leaf):
                if target.grad is None:
                    target.grad = g
                    self.grad_bytes += g.nbytes
                else:  # a shared weight's gradients are summed out of place (old + new, then freed)
                    target.grad = self.buf(g.nbytes)
                continue
            slots = grads.setdefault(id(target), [None] * target.nout)
            slots[slot] = slots[slot] or g


def _unpack(node: Node) -> list:
    """The node's saved buffers, taken out of their holders (a holder is unpacked once); a
    function of its own so that no loop variable outlives the unpacking."""
    saved = [s.buf if isinstance(s, Holder) else s for s in node.saved]
    for s in node.saved:
        if isinstance(s, Holder):
            s.buf = None
    node.saved = []
    return saved
