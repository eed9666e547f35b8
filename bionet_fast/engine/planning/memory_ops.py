"""What each block allocates and saves, per backend, as nodes of the symbolic tape (memory_sim).

`RefSim` models blocks/reference.py (aten conv, ReLU, BatchNorm, cat, max-pool with int64 indices,
autocast casts of activations and cached casts of the weights); `FusedSim` models blocks/fused.py
and blocks/fused_autograd.py (ConvReluFn, BNAffineFn, DownFn, UpFn and the kernels' own buffers:
packed and folded weights, statistics partials, dgrad/wgrad partials). Both implement the `Ops`
interface the model's `_iteration` calls, on `Sym` shapes, so the planner follows the model's own
wiring. Sizes follow the code they model; bench/plan_accuracy.py checks them against the measured
count. Element sizes: `cs` is the compute dtype's (4 fp32, 2 under bf16/fp16 autocast).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

from .memory_sim import Sym, Tape

F32 = 4


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _out_size(n: int, m, d: int) -> int:
    """Output side of conv or transposed conv `m` along dimension d for an input side n."""
    k, s, p = m.kernel_size[d], m.stride[d], m.padding[d]
    if getattr(m, "transposed", False):
        return (n - 1) * s - 2 * p + k + m.output_padding[d]
    return (n + 2 * p - k) // s + 1


class RefSim:
    """blocks.reference.RefOps on symbolic tensors; also the head's 1x1 conv and the loss."""

    name = "reference"

    def __init__(self, tape: Tape, cs: int):
        self.t, self.cs = tape, cs
        self._casts: dict[int, Sym] = {}  # autocast's weight cache (alive through the step)

    # --- casts --------------------------------------------------------------------------------
    def _to(self, x: Sym, itemsize: int) -> Sym:
        if x.itemsize == itemsize:
            return x
        out = self.t.new(x.shape, itemsize)
        n, t = x.nbytes, self.t
        t.record([out], [x], [], lambda g, s: [t.buf(n)])
        return out

    def param(self, p, cast: bool = True) -> Optional[Sym]:
        if p is None:
            return None
        sym = self.t.param(p)
        if not cast or sym.itemsize == self.cs:
            return sym
        if id(p) not in self._casts:
            self._casts[id(p)] = self._to(sym, self.cs)
        return self._casts[id(p)]

    # --- aten ops -----------------------------------------------------------------------------
    def conv(self, x: Sym, m, transposed: bool = False) -> Sym:
        """aten.convolution: saves the (cast) input and weight; backward allocates their grads."""
        xc, w, b = self._to(x, self.cs), self.param(m.weight), self.param(m.bias)
        bsz, _, h, wd = x.shape
        out = self.t.new((bsz, m.out_channels, *(_out_size(n, m, d) for d, n in enumerate((h, wd)))),
                         self.cs)
        t, nx, nw = self.t, xc.nbytes if xc.requires_grad else 0, w.nbytes
        nb = b.nbytes if b is not None else 0
        t.record([out], [xc, w, b], [xc, w],
                 lambda g, s: [t.buf(nx) if nx else None, t.buf(nw), t.buf(nb) if nb else None])
        return out

    def relu(self, x: Sym) -> Sym:
        out = self.t.new(x.shape, x.itemsize)
        t, n = self.t, x.nbytes
        t.record([out], [x], [out], lambda g, s: [t.buf(n)])
        return out

    def batch_norm(self, x: Sym, bn) -> Sym:
        out, c = self.t.new(x.shape, x.itemsize), x.shape[1]
        stats = [self.t.buf(c * F32), self.t.buf(c * F32)]  # save_mean, save_invstd
        t, n = self.t, x.nbytes
        t.record([out], [x, self.param(bn.weight, False), self.param(bn.bias, False)], [x, *stats],
                 lambda g, s: [t.buf(n), t.buf(c * F32), t.buf(c * F32)])
        return out

    def cat(self, xs: Sequence[Sym]) -> Sym:
        if len(xs) == 1:
            return xs[0]
        b, _, h, w = xs[0].shape
        out = self.t.new((b, sum(x.shape[1] for x in xs), h, w), xs[0].itemsize)
        k = len(xs)
        self.t.record([out], list(xs), [], lambda g, s: [g[0]] * k)  # views of one gradient
        return out

    def add(self, a: Sym, b: Sym) -> Sym:
        """a + b: saves nothing; its backward passes the gradient on to both."""
        out = self.t.new(a.shape, a.itemsize)
        self.t.record([out], [a, b], [], lambda g, s: [g[0], g[0]])
        return out

    def max_pool(self, x: Sym, stem: bool = False) -> Sym:
        """2x2 max-pool (stem=True: ResNet's 3x3, stride 2, padding 1): output and int64 indices."""
        b, c, h, w = x.shape
        out = self.t.new((b, c, (h - 1) // 2 + 1 if stem else h // 2, (w - 1) // 2 + 1 if stem else w // 2),
                         x.itemsize)
        idx = self.t.buf(out.numel * 8)  # int64 indices, saved for backward
        t, n = self.t, x.nbytes
        t.record([out], [x], [x, idx], lambda g, s: [t.buf(n)])
        return out

    def loss(self, logits: Sym) -> Sym:
        """BCE with logits against zeros, in fp32 (engine.memory._bce)."""
        l32 = self._to(logits, F32)
        target = self.t.buf(l32.nbytes)
        out = self.t.new((), F32)
        t, n = self.t, l32.nbytes
        t.record([out], [l32], [l32, target], lambda g, s: [t.buf(n)])
        return out

    def end_forward(self, checkpointing: bool) -> None:
        """Autocast's weight cache outlives the forward (the measured step runs in one autocast)."""

    # --- the Ops interface --------------------------------------------------------------------
    def block(self, xs: Sequence[Sym], conv, bn) -> Sym:
        return self.batch_norm(self.relu(self.conv(self.cat(xs), conv)), bn)

    def down(self, x: Sym, conv, bn) -> Sym:
        return self.max_pool(self.block([x], conv, bn))

    def up(self, x: Sym, conv, bn) -> Sym:
        return self.batch_norm(self.relu(self.conv(x, conv, transposed=True)), bn)

    def dense(self, x: Sym) -> Sym:
        return x

    def from_dense(self, x: Sym) -> Sym:
        return x


class SymPending(NamedTuple):
    """blocks.fused_autograd.Pending on symbolic tensors: raw (B,C,H,W), scale/shift (C,) or None."""

    raw: Sym
    scale: Optional[Sym] = None
    shift: Optional[Sym] = None


class Platform(NamedTuple):
    """Sizes of the fused kernels' scratch buffers: rows per statistics tile of the forward, rows
    per dgrad partial tile, and the SM count the wgrad split follows (4 in the interpreter)."""

    fwd_rows: int = 64
    dgrad_rows: int = 64
    sms: int = 132  # an H100 / H200

    @classmethod
    def detect(cls, device_type: str) -> "Platform":
        try:
            from bionet_fast.kernels import _bwd_utils as U, conv_fwd, splitk
        except Exception:  # no triton: the GPU defaults
            return cls()
        rows = min([c.kwargs["BLOCK_M"] for c in U.dgrad_configs()] + [splitk.REDUCE_BLOCK_M])
        return cls(conv_fwd.MIN_BLOCK_M, rows, 4 if device_type != "cuda" else cls.sms)


class FusedSim(RefSim):
    """blocks.fused.FusedOps on symbolic tensors (BatchNorm pending, DOWN's output recomputed).

    A local name holds a buffer exactly as long as the modelled code holds its tensor; `del` (or
    rebinding) ends the lifetime, so some names are assigned and never read.
    """

    name = "triton"

    def __init__(self, tape: Tape, cs: int, platform: Platform = Platform()):
        super().__init__(tape, cs)
        self.p = platform
        self._packs: dict[tuple, object] = {}  # FusedOps._packs: one packed weight per forward

    def end_forward(self, checkpointing: bool) -> None:
        """The forward's FusedOps dies with it, and its packed weights too, unless checkpoint
        closures keep it for the recomputation (then until the end of the backward)."""
        if not checkpointing:
            self._packs.clear()

    # --- kernel scratch -----------------------------------------------------------------------
    def _packed(self, weight, affine: bool) -> None:
        key = (id(weight), affine)
        if key not in self._packs:  # pack_weight: permute-copy, then a cast when the dtype differs
            n = weight.numel()
            self._packs[key] = self.t.buf(n * (F32 if affine else self.cs))
            if not affine and self.cs != F32:
                self.t.buf(n * F32)

    def _conv_fwd(self, shape, cout: int, cin: int, affine: bool, stats: bool) -> Sym:
        """kernels.conv3x3_fwd: y (B, cout, H, W) plus its transient buffers."""
        t = self.t
        folded = [t.buf(9 * cin * cout * self.cs), t.buf(18 * cout * self.cs)] if affine else []
        y = t.new((shape[0], cout, shape[2], shape[3]), self.cs)
        m = shape[0] * shape[2] * shape[3]
        parts = [t.buf(_cdiv(m, self.p.fwd_rows) * cout * F32) for _ in range(2)] if stats else []
        m_max = 1 << max(m - 1, 0).bit_length()  # kernels/splitk.workspace: split-K partials (GPU)
        if self.p.sms > 4 and _cdiv(m_max, 128) * _cdiv(cout, 128) < self.p.sms \
                and 4 * m_max * cout * F32 <= 64 << 20:
            parts.append(t.buf(4 * m * cout * F32))
        del folded, parts
        return y

    def _conv_bwd(self, x1n: int, x2n: int, cout: int, cin: int, m: int) -> list:
        """kernels.conv3x3_dgrad + conv3x3_wgrad: [dx1, ds1, db1, dx2, ds2, db2, dweight, dbias]."""
        t = self.t
        wt = t.buf(cout * cin * 9 * self.cs)
        dx1, dx2 = t.buf(x1n), (t.buf(x2n) if x2n else None)
        parts = [t.buf(_cdiv(m, self.p.dgrad_rows) * cin * F32) for _ in range(2)]
        ds, db = t.buf(cin * F32), t.buf(cin * F32)
        del parts, wt
        tiles = _cdiv(cout, 64) * 9 * _cdiv(cin, 64)
        splits = min(_cdiv(4 * self.p.sms, tiles), max(1, (16 << 20) // (cout * 9 * cin)),
                     max(1, m // (4 * 64)))
        dw_part = t.buf(splits * cout * 9 * cin * F32)
        db_part = t.buf(splits * cout * F32)
        dw, dbias = t.buf(cout * 9 * cin * F32), t.buf(cout * F32)
        del dw_part, db_part
        return [dx1, ds, db, dx2, ds if x2n else None, db if x2n else None, dw, dbias]

    def _bn_affine(self, y: Sym, mean: Sym, bn) -> SymPending:
        """BNAffineFn: (scale, shift) (C,) of y's batch statistics; backward one pass over y."""
        t, c = self.t, y.shape[1]
        scale, shift = t.new((c,), F32), t.new((c,), F32)
        invstd = t.buf(c * F32)
        n, cs = y.numel, self.cs

        def bwd(g, s):
            small = [t.buf(c * F32) for _ in range(4)]
            wide = t.buf(n * F32)
            dy = wide if cs == F32 else t.buf(n * cs)
            return [dy, None, small[2], small[3]]

        t.record([scale, shift], [y, mean, self.param(bn.weight, False), self.param(bn.bias, False)],
                 [y, mean, invstd], bwd)
        return SymPending(y, scale, shift)

    # --- the Ops interface --------------------------------------------------------------------
    def block(self, xs: Sequence[SymPending], conv, bn) -> SymPending:
        t = self.t
        x1, x2 = xs[0], (xs[1] if len(xs) == 2 else SymPending(None))
        r1 = self._to_nograd(x1.raw)
        r2 = None if x2.raw is None else self._to_nograd(x2.raw)
        affine = x1.scale is not None or x2.scale is not None
        cout, cin = conv.weight.shape[0], conv.weight.shape[1]
        self._packed(conv.weight, affine)
        y = self._conv_fwd(r1.shape, cout, cin, affine, True)
        mean, m2 = t.new((cout,), F32), t.new((cout,), F32)
        x1n, x2n, m = r1.nbytes, (r2.nbytes if r2 is not None else 0), r1.numel // r1.shape[1]
        inputs = [r1, x1.scale, x1.shift, r2, x2.scale, x2.shift, self.param(conv.weight, False),
                  self.param(conv.bias, False)]
        t.record([y, mean, m2], inputs, [r1, x1.scale, x1.shift, r2, x2.scale, x2.shift, y],
                 lambda g, s: self._conv_bwd(x1n, x2n, cout, cin, m))
        del m2
        return self._bn_affine(y, mean, bn)

    def down(self, x: SymPending, conv, bn) -> SymPending:
        """DownFn: conv + ReLU + statistics + pool; y recomputed in backward."""
        t, cs = self.t, self.cs
        r = self._to_nograd(x.raw)
        cout, cin = conv.weight.shape[0], conv.weight.shape[1]
        sgn = t.buf(cout * F32)
        affine = x.scale is not None
        self._packed(conv.weight, affine)
        y = self._conv_fwd(r.shape, cout, cin, affine, True)
        stats = [t.buf(cout * F32) for _ in range(5)]  # mean, m2, scale, shift, invstd
        ys = t.buf(y.nbytes)
        b, _, h, w = y.shape
        pooled0 = t.new((b, cout, h // 2, w // 2), cs)
        pooled = t.new(pooled0.shape, cs)
        scale, shift = t.new((cout,), F32), t.new((cout,), F32)
        del ys, pooled0, y
        rn, rshape, yn, pn, m = r.nbytes, r.shape, b * cout * h * w, pooled.numel, b * h * w

        def bwd(g, s):
            y = self._conv_fwd(rshape, cout, cin, affine, False)
            small = [t.buf(cout * F32) for _ in range(4)]
            gy = t.buf(yn * F32)
            gy = gy if cs == F32 else t.buf(yn * cs)
            if g[0] is not None:
                gp, ys, pool, idx = t.buf(pn * cs), t.buf(yn * cs), t.buf(pn * cs), t.buf(pn * 8)
                d1 = t.buf(yn * cs)
                d2 = t.buf(yn * cs)
                del gp, ys, pool, idx, d1
                gy = t.buf(yn * cs)
                del d2
            out = self._conv_bwd(rn, 0, cout, cin, m)
            del y, gy
            return out[:3] + out[6:] + [small[2], small[3]]

        inputs = [r, x.scale, x.shift, self.param(conv.weight, False), self.param(conv.bias, False),
                  self.param(bn.weight, False), self.param(bn.bias, False)]
        t.record([pooled, scale, shift], inputs, [r, x.scale, x.shift, sgn, stats[0], stats[4]], bwd)
        del stats, sgn
        return SymPending(pooled, scale, shift)

    def up(self, x: SymPending, conv, bn) -> SymPending:
        """UpFn: transposed conv + ReLU on the materialised input, which backward recomputes."""
        t, cs = self.t, self.cs
        b, c, h, w = x.raw.shape
        cout = conv.weight.shape[1]
        v = self._value_nograd(x)
        wc = [t.buf(conv.weight.numel() * cs), t.buf(cout * cs)] if cs != F32 else []
        y = t.new((b, cout, 2 * h, 2 * w), cs)
        del v, wc
        rsz, yn, wn, scaled = x.raw.numel, y.numel, conv.weight.numel(), x.scale is not None

        def bwd(g, s):
            mask = t.buf(yn)
            dz = t.buf(yn * cs)
            del mask
            v = self._value_nograd_sizes(rsz, scaled)
            wc = t.buf(wn * cs) if cs != F32 else None
            dv, dw, dbias = t.buf(rsz * cs), t.buf(wn * cs), t.buf(cout * cs)
            del dz, v, wc
            draw, dscale, dshift = dv, None, None
            if scaled:
                wide = t.buf(rsz * F32)
                draw = wide if cs == F32 else t.buf(rsz * cs)
                del wide
                tmp = [t.buf(rsz * F32) for _ in range(3 if cs != F32 else 1)]
                dscale, dshift = t.buf(c * F32), t.buf(c * F32)
                del tmp, dv
            if cs != F32:
                dw, dbias = t.buf(wn * F32), t.buf(cout * F32)
            return [draw, dscale, dshift, dw, dbias]

        inputs = [x.raw, x.scale, x.shift, self.param(conv.weight, False), self.param(conv.bias, False)]
        t.record([y], inputs, [x.raw, x.scale, x.shift, y], bwd)
        mean = t.new((cout,), F32)  # bn_stats of y (no epilogue here)
        return self._bn_affine(y, mean, bn)

    def _to_nograd(self, x: Sym) -> Sym:
        """raw.to(dt) before a fused kernel: a copy only for the (fp32) network input."""
        if x.itemsize == self.cs:
            return x
        return Sym(x.shape, self.cs, self.t.buf(x.numel * self.cs), x.node, x.slot)

    def _value_nograd(self, x: SymPending) -> list:
        return self._value_nograd_sizes(x.raw.numel, x.scale is not None)

    def _value_nograd_sizes(self, n: int, scaled: bool) -> list:
        """Pending.value() inside a Function: raw * scale (promoted to fp32), + shift, cast back."""
        if not scaled:
            return []
        t = self.t
        a = t.buf(n * F32)
        bb = t.buf(n * F32)
        del a
        return [bb, t.buf(n * self.cs)] if self.cs != F32 else [bb]

    def dense(self, x: SymPending) -> Sym:
        """Pending.value() with autograd: mul (saves raw and scale), add, cast back."""
        if x.scale is None:
            return x.raw
        t, cs, n, c = self.t, self.cs, x.raw.numel, x.raw.shape[1]
        wide = F32  # raw (cs) * scale (fp32) promotes to fp32
        prod = t.new(x.raw.shape, wide)

        def mul_bwd(g, s):
            gr = t.buf(n * wide)
            gr = gr if cs == wide else t.buf(n * cs)
            full = t.buf(n * wide)
            gs = t.buf(c * F32)
            del full
            return [gr, gs]

        t.record([prod], [x.raw, x.scale], [x.raw, x.scale], mul_bwd)
        val = t.new(x.raw.shape, wide)
        t.record([val], [prod, x.shift], [], lambda g, s: [g[0], t.buf(c * F32)])
        del prod
        return self._to(val, cs)

    def from_dense(self, x: Sym) -> SymPending:
        return SymPending(x)
