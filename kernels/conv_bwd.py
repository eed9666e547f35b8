"""Fused backward of the 3x3 conv block: input gradient (dgrad) and weight gradient (wgrad).

The fused forward (conv_fwd.py) reads two "Pending" activations, value = raw * scale[c] + shift[c],
and computes
    A = cat([pad0(x1 * s1 + b1), pad0(x2 * s2 + b2)], dim=1)    # zero padding AFTER the affine
    z = conv2d(A, weight (Cout, C1 + C2, 3, 3), bias, padding=1);  y = relu(z)
Its backward, given dy = dL/dy (B, Cout, H, W), is
    dz = dy * (y > 0)
    dA = conv2d_input(dz, weight), split by channel into dA1 (C1) and dA2 (C2)
    dx_k = dA_k * s_k;  ds_k = sum_{b,h,w} dA_k * x_k;  db_k = sum_{b,h,w} dA_k
    dweight = conv2d_weight(A, dz);  dbias = sum_{b,h,w} dz
Neither dz, A nor the concatenation is ever written to memory: the ReLU mask is applied as dy is
loaded, A is rebuilt from x in registers, and dA goes straight to the two halves.

Both kernels are implicit GEMMs over NHWC-style addressing with every stride passed in, so any
layout works and channels_last (channel stride 1) gives coalesced loads. fp32 accumulation
(fp64 for fp64 inputs, a test-only path for gradcheck);
fp32 operands use TF32 tensor cores on the GPU (like cuDNN's default), IEEE in the interpreter.
Determinism: no atomics; per-tile partial sums land in buffers that torch sums in a fixed order.
Bitwise repeatability holds for a fixed autotuned config (i.e. within one process after tuning).
Split-K: wgrad always splits its K (pixels) into chunks (_bwd_utils.wgrad_split) whose partials
are summed over the split axis; dgrad may split its K (9 x Cout) where its output tiles are fewer
than SMs (autotune meta-parameter SPLIT_K, kernels/splitk.py: fixed-order reduction, then the
same epilogue, kernels/epilogues.py).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import _bwd_utils as U
from . import splitk
from ._utils import round_to
from .epilogues import dgrad_epilogue
from .padding import check_pad, dgrad_border_fixup, pad_index, padded

Tensor = torch.Tensor


@triton.jit
def _mma(a, b, acc, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b, accumulating in acc's dtype (fp32, or fp64 for fp64 inputs)."""
    if UPCAST:  # Triton 3.9's interpreter gets bf16 dots wrong; fp32 products of bf16 are exact
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=DOT_PREC)
    else:
        acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
    return acc


@triton.autotune(configs=U.dgrad_configs(), key=["C_OUT", "C_IN", "M_BUCKET"],
                 prune_configs_by={"early_config_prune": U.prune_dgrad},
                 post_hook=splitk.post_hook(splitk.reduce_dgrad))
@triton.jit
def _dgrad_kernel(dy_ptr, y_ptr, w_ptr, x1_ptr, x2_ptr, s1_ptr, s2_ptr,
                  dx1_ptr, dx2_ptr, ds_part_ptr, db_part_ptr, part_ptr,
                  H, W, M, C_OUT, C1, C_IN, M_BUCKET,
                  sdy_b, sdy_c, sdy_h, sdy_w, sy_b, sy_c, sy_h, sy_w,
                  sw_o, sw_i, sw_h, sw_w,
                  sx1_b, sx1_c, sx1_h, sx1_w, sx2_b, sx2_c, sx2_h, sx2_w,
                  sd1_b, sd1_c, sd1_h, sd1_w, sd2_b, sd2_c, sd2_h, sd2_w,
                  HAS_X2: tl.constexpr, HAS_S1: tl.constexpr, HAS_S2: tl.constexpr,
                  DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  SPLIT_K: tl.constexpr):
    """One (BLOCK_M pixels) x (BLOCK_N input channels) tile of dA, K = 9 taps x Cout; with
    SPLIT_K > 1 one slice of that K loop (grid axis 1), stored as an fp32 partial for
    splitk.reduce_dgrad."""
    # N-tiles of one pixel tile are neighbours in launch order: they share the dz tiles in L2.
    n_tiles = tl.cdiv(C_IN, BLOCK_N)
    pid = tl.program_id(0)
    pid_m = pid // n_tiles
    pid_n = pid % n_tiles

    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < M
    hw = H * W
    b = (m // hw).to(tl.int64)  # int64: batch offsets of big activations pass 2**31
    r = m % hw
    h = r // W
    w = r % W
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < C_IN
    kk = tl.arange(0, BLOCK_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    # One flat loop over (tap, Cout block) so the pipeliner overlaps loads across taps too
    # (with Cout <= BLOCK_K a per-tap inner loop would have a single iteration).
    k_tiles = tl.cdiv(C_OUT, BLOCK_K)
    it_lo, it_hi = 0, 9 * k_tiles
    if SPLIT_K > 1:  # this program's contiguous slice of the iterations
        per = tl.cdiv(9 * k_tiles, SPLIT_K)
        it_lo = tl.program_id(1) * per
        it_hi = tl.minimum(it_lo + per, 9 * k_tiles)
    for it in range(it_lo, it_hi):
        tap = it // k_tiles
        co = (it - tap * k_tiles) * BLOCK_K + kk
        kh = tap // 3
        kw = tap - kh * 3
        # Input pixel (h, w) received tap (kh, kw) from output pixel (h + 1 - kh, w + 1 - kw).
        hs = h + 1 - kh
        ws = w + 1 - kw
        ok = m_ok & (hs >= 0) & (hs < H) & (ws >= 0) & (ws < W)
        co_ok = co < C_OUT
        msk = ok[:, None] & co_ok[None, :]
        o_dy = b * sdy_b + hs * sdy_h + ws * sdy_w
        o_y = b * sy_b + hs * sy_h + ws * sy_w
        g = tl.load(dy_ptr + o_dy[:, None] + co[None, :] * sdy_c, mask=msk, other=0.0)
        yv = tl.load(y_ptr + o_y[:, None] + co[None, :] * sy_c, mask=msk, other=0.0)
        dz = tl.where(yv > 0, g, tl.zeros_like(g))  # ReLU mask in the prologue
        wt = tl.load(w_ptr + kh * sw_h + kw * sw_w + co[:, None] * sw_o + n[None, :] * sw_i,
                     mask=co_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _mma(dz, wt, acc, DOT_PREC, UPCAST)

    if SPLIT_K == 1:
        dgrad_epilogue(acc, pid_m, m_ok, b, h, w, n, n_ok, x1_ptr, x2_ptr, s1_ptr, s2_ptr,
                       dx1_ptr, dx2_ptr, ds_part_ptr, db_part_ptr, C1, C_IN,
                       sx1_b, sx1_c, sx1_h, sx1_w, sx2_b, sx2_c, sx2_h, sx2_w,
                       sd1_b, sd1_c, sd1_h, sd1_w, sd2_b, sd2_c, sd2_h, sd2_w,
                       HAS_X2, HAS_S1, HAS_S2, UPCAST, ACC)
    else:  # fp32 partial of this slice, (SPLIT_K, M, C_IN)
        part = part_ptr + tl.program_id(1) * M * C_IN
        tl.store(part + m[:, None] * C_IN + n[None, :], acc, mask=m_ok[:, None] & n_ok[None, :])


@triton.autotune(configs=U.wgrad_configs(), key=["C_OUT", "C_IN", "P_BUCKET"],
                 prune_configs_by={"early_config_prune": U.prune_wgrad})
@triton.jit
def _wgrad_kernel(dy_ptr, y_ptr, x1_ptr, x2_ptr, s1_ptr, b1_ptr, s2_ptr, b2_ptr,
                  dw_part_ptr, dbias_part_ptr,
                  H, W, P, C_OUT, C1, C_IN, CHUNK, P_BUCKET,
                  sdy_b, sdy_c, sdy_h, sdy_w, sy_b, sy_c, sy_h, sy_w,
                  sx1_b, sx1_c, sx1_h, sx1_w, sx2_b, sx2_c, sx2_h, sx2_w,
                  HAS_X2: tl.constexpr, HAS_A1: tl.constexpr, HAS_A2: tl.constexpr, PAD: tl.constexpr,
                  DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Partial dW[split, co, tap, ci] over one chunk of pixels; K = pixels of the chunk."""
    pid_m = tl.program_id(0)  # Cout tile
    pid_n = tl.program_id(1)  # tap * ci_tiles + Cin tile
    pid_s = tl.program_id(2)  # pixel chunk, slowest: programs of one chunk share it in L2
    ci_tiles = tl.cdiv(C_IN, BLOCK_N)
    tap = pid_n // ci_tiles
    kh = tap // 3
    kw = tap % 3

    co = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    co_ok = co < C_OUT
    ci = (pid_n % ci_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    ci_ok = ci < C_IN
    in1 = ci < C1
    in2 = ci_ok & (ci >= C1)
    ci2 = tl.where(in2, ci - C1, 0)
    # Per-column affine of the concatenated input: (s1, b1) on x1's channels, (s2, b2) on x2's.
    if HAS_A1:
        sc = tl.load(s1_ptr + ci, mask=in1, other=0.0)
        sh = tl.load(b1_ptr + ci, mask=in1, other=0.0)
    else:
        sc = tl.where(in1, 1.0, 0.0)
        sh = tl.zeros((BLOCK_N,), dtype=ACC)
    if HAS_A2:
        sc += tl.load(s2_ptr + ci2, mask=in2, other=0.0)
        sh += tl.load(b2_ptr + ci2, mask=in2, other=0.0)
    else:
        sc += tl.where(in2, 1.0, 0.0)

    hw = H * W
    start = pid_s * CHUNK
    end = tl.minimum(start + CHUNK, P)
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    dbias = tl.zeros((BLOCK_M,), dtype=ACC)
    for k0 in range(start, end, BLOCK_K):
        p = k0 + kk
        p_ok = p < end
        b = (p // hw).to(tl.int64)
        r = p % hw
        h = r // W
        w = r % W
        msk = p_ok[:, None] & co_ok[None, :]
        o_dy = b * sdy_b + h * sdy_h + w * sdy_w
        o_y = b * sy_b + h * sy_h + w * sy_w
        g = tl.load(dy_ptr + o_dy[:, None] + co[None, :] * sdy_c, mask=msk, other=0.0)
        yv = tl.load(y_ptr + o_y[:, None] + co[None, :] * sy_c, mask=msk, other=0.0)
        dz = tl.where(yv > 0, g, tl.zeros_like(g))  # (BLOCK_K, BLOCK_M), ReLU mask on load
        # A at the tap's source pixel, rebuilt from x: affine first, then the padding (zeros:
        # masked; reflect / replicate: the mirrored / clamped pixel, kernels/padding.py).
        hs = h + kh - 1
        ws = w + kw - 1
        ok = p_ok
        if PAD == 0:
            ok = ok & (hs >= 0) & (hs < H) & (ws >= 0) & (ws < W)
        hs = pad_index(hs, H, PAD)
        ws = pad_index(ws, W, PAD)
        o1 = b * sx1_b + hs * sx1_h + ws * sx1_w
        xa = tl.load(x1_ptr + o1[:, None] + ci[None, :] * sx1_c,
                     mask=ok[:, None] & in1[None, :], other=0.0).to(ACC)
        if HAS_X2:
            o2 = b * sx2_b + hs * sx2_h + ws * sx2_w
            xa += tl.load(x2_ptr + o2[:, None] + ci2[None, :] * sx2_c,
                          mask=ok[:, None] & in2[None, :], other=0.0).to(ACC)
        a = tl.where(ok[:, None] & ci_ok[None, :], xa * sc[None, :] + sh[None, :], 0.0)
        acc = _mma(tl.trans(dz), round_to(a, dz.dtype, UPCAST), acc, DOT_PREC, UPCAST)
        if pid_n == 0:  # one column of programs also reduces dbias from the same dz tiles
            dbias += tl.sum(dz.to(ACC), axis=0)

    # Partial layout (split, Cout, 9, Cin): summed over split it is dW in (Cout, kh, kw, Cin).
    out = dw_part_ptr + pid_s.to(tl.int64) * C_OUT * 9 * C_IN + tap * C_IN
    tl.store(out + co[:, None] * (9 * C_IN) + ci[None, :], acc,
             mask=co_ok[:, None] & ci_ok[None, :])
    if pid_n == 0:
        tl.store(dbias_part_ptr + pid_s * C_OUT + co, dbias, mask=co_ok)


def _strides(t: Optional[Tensor], like: Tensor) -> tuple:
    """(b, c, h, w) strides of a 4-D tensor; the placeholder for a missing x2 reuses x1's."""
    return tuple((like if t is None else t).stride())


def _dgrad_launch(dy, y, wt, x1, x2, s1, s2, dx1, dx2, ds_part, db_part, c1: int,
                  split: Optional[int]):
    """Run _dgrad_kernel (and, for a split-K config, its reduction) -> the rows of ds_part /
    db_part (tiles, C_IN) that the launched config wrote."""
    bsz, c_out, h, w = dy.shape
    m, c_in = bsz * h * w, wt.shape[1]
    part = splitk.workspace(m, 2 ** U.size_bucket(m) - 1, c_in, dy, U.acc_dtype(dy.dtype),
                            _dgrad_kernel.configs, split)
    args = (dy, y, wt, x1, x2 if x2 is not None else x1, U.affine_or_dummy(s1, dy),
            U.affine_or_dummy(s2, dy), dx1, dx2, ds_part, db_part, part,
            h, w, m, c_out, c1, c_in, U.size_bucket(m),
            *dy.stride(), *y.stride(), *wt.stride(), *x1.stride(), *_strides(x2, x1),
            *dx1.stride(), *dx2.stride())
    consts = dict(HAS_X2=x2 is not None, HAS_S1=s1 is not None, HAS_S2=s2 is not None,
                  **U.dot_meta(dy.dtype))
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(c_in, meta["BLOCK_N"]),  # noqa: E731
                         meta["SPLIT_K"])
    forced = None if split is None else splitk.with_split(U.dgrad_base_config(c_out, c_in), split)
    config = splitk.launch(_dgrad_kernel, grid, args, consts, forced)
    rows = config.kwargs["BLOCK_M"]
    if config.kwargs["SPLIT_K"] > 1:  # sum the slices in fixed order, then the epilogue
        splitk.reduce_dgrad(splitk.named(_dgrad_kernel, args, consts, config))
        rows = splitk.REDUCE_BLOCK_M
    tiles = triton.cdiv(m, rows)  # only these rows were written
    return ds_part[:tiles], db_part[:tiles]


def conv3x3_dgrad(dy: Tensor, y: Tensor, weight: Tensor, c1: int, x1: Tensor,
                  x2: Optional[Tensor] = None, s1: Optional[Tensor] = None,
                  s2: Optional[Tensor] = None, *, split_k: Optional[int] = None, pad: str = "zeros"):
    """Input-side gradients of a fused block, without materialising dz or dA.

    dy, y: (B, Cout, H, W) gradient of the ReLU output and the ReLU output (for the mask);
    weight: (Cout, C1 + C2, 3, 3); x1: (B, C1, H, W) raw of the first input, c1 = C1;
    x2: (B, C2, H, W) raw of the concatenated second input or None; s1, s2: (C_k,) scales or
    None for identity. Returns (dx1, dx2, ds1, db1, ds2, db2): dx_k like x_k (dtype and
    strides), ds_k and db_k fp32 (C_k,) (fp64 for fp64 inputs); dx2, ds2, db2 are None
    when x2 is None. Autotuned on the GPU: call once outside CUDA-graph capture to tune.
    split_k: force a deterministic split-K of the 9*Cout loop into this many slices on the pinned
    tile (kernels/splitk.py; tests, benchmarks); None = BIONET_FAST_SPLIT_K if set, else the
    autotuner's choice (split configs only where output tiles are fewer than SMs).
    pad: the forward's padding ("zeros", "reflect", "replicate"): the kernel computes the direct
    terms, kernels/padding.dgrad_border_fixup adds the mirrored / clamped ones.
    """
    U.check_device(dy, y, weight, x1, x2, s1, s2)
    bsz, c_out, h, w = U.check_pair(dy, y)
    pad_c = check_pad(pad, h, w)
    c_in = U.check_weight(weight, c_out)
    if x2 is None and c1 != c_in:
        raise ValueError(f"c1={c1} but weight has {c_in} input channels and x2 is None; "
                         "pass x2 or a weight with c1 input channels")
    U.check_input("x1", x1, bsz, h, w, c1)
    if x2 is not None:
        U.check_input("x2", x2, bsz, h, w, c_in - c1)
    U.check_affine("s1", s1, c1)
    U.check_affine("s2", s2, c_in - c1)

    # The GEMM's B operand must share dz's dtype; channels_last puts Cin (the N axis) at stride 1.
    wt = weight.detach().to(dtype=dy.dtype, memory_format=torch.channels_last)
    dx1 = torch.empty_like(x1)
    dx2 = torch.empty_like(x2) if x2 is not None else dx1
    m, acc = bsz * h * w, U.acc_dtype(dy.dtype)
    min_rows = min([c.kwargs["BLOCK_M"] for c in U.dgrad_configs()] + [splitk.REDUCE_BLOCK_M])
    ds_part = torch.empty((triton.cdiv(m, min_rows), c_in), device=dy.device, dtype=acc)
    db_part = torch.empty_like(ds_part)
    if m > 0:
        ds_part, db_part = _dgrad_launch(dy, y, wt, x1, x2, s1, s2, dx1, dx2, ds_part, db_part, c1,
                                         splitk.forced(split_k))
        ds, db = ds_part.sum(0), db_part.sum(0)  # fixed-order sum of the launched config's tiles
        if pad_c:
            halves = [(x1, s1, dx1)] + ([(x2, s2, dx2)] if x2 is not None else [])
            dgrad_border_fixup(dy, y, weight, pad, halves, ds, db)
    else:
        ds = db = torch.zeros(c_in, device=dy.device, dtype=acc)
    if x2 is None:
        return dx1, None, ds, db, None, None
    return dx1, dx2, ds[:c1], db[:c1], ds[c1:], db[c1:]


def conv3x3_wgrad(dy: Tensor, y: Tensor, x1: Tensor, x2: Optional[Tensor] = None,
                  s1: Optional[Tensor] = None, b1: Optional[Tensor] = None,
                  s2: Optional[Tensor] = None, b2: Optional[Tensor] = None,
                  *, split_k: Optional[int] = None, pad: str = "zeros"):
    """Weight and bias gradients of a fused block, A rebuilt from x on the fly.

    dy, y: (B, Cout, H, W); x1: (B, C1, H, W), x2: (B, C2, H, W) or None; s_k, b_k: (C_k,)
    scale and shift of input k, None for identity (each pair is given or omitted together, a
    lone one means the other is identity). split_k: pixel chunks of the deterministic split-K
    (None = automatic). Returns dweight fp32 (Cout, C1 + C2, 3, 3) (channels_last strides) and
    dbias fp32 (Cout,); fp64 for fp64 inputs. A recurrent block applies one weight t times; autograd sums those t
    dweights itself, so nothing here is iteration-aware.
    """
    U.check_device(dy, y, x1, x2, s1, b1, s2, b2)
    bsz, c_out, h, w = U.check_pair(dy, y)
    c1 = U.check_input("x1", x1, bsz, h, w)
    c_in = c1 + (U.check_input("x2", x2, bsz, h, w) if x2 is not None else 0)
    pad_c = check_pad(pad, h, w)
    for name, v, c in (("s1", s1, c1), ("b1", b1, c1), ("s2", s2, c_in - c1), ("b2", b2, c_in - c1)):
        U.check_affine(name, v, c)
    if x2 is None and (s2 is not None or b2 is not None):
        raise ValueError("s2/b2 given without x2; pass x2 or drop s2 and b2")

    def pair(s, b, c):  # the kernel applies scale and shift together; fill the missing one
        if s is None and b is None:
            return None, None
        return (torch.ones(c, device=dy.device) if s is None else s,
                torch.zeros(c, device=dy.device) if b is None else b)

    s1, b1 = pair(s1, b1, c1)
    s2, b2 = pair(s2, b2, c_in - c1)
    pixels = bsz * h * w
    splits, chunk = U.wgrad_split(pixels, c_out, c_in, dy.device, split_k)
    acc = U.acc_dtype(dy.dtype)
    dw_part = torch.empty((splits, c_out, 9 * c_in), device=dy.device, dtype=acc)
    db_part = torch.empty((splits, c_out), device=dy.device, dtype=acc)
    if pixels > 0:
        grid = lambda meta: (triton.cdiv(c_out, meta["BLOCK_M"]),
                             9 * triton.cdiv(c_in, meta["BLOCK_N"]), splits)
        _wgrad_kernel[grid](
            dy, y, x1, x2 if x2 is not None else x1,
            *(U.affine_or_dummy(v, dy) for v in (s1, b1, s2, b2)),
            dw_part, db_part,
            h, w, pixels, c_out, c1, c_in, chunk, U.size_bucket(pixels),
            *dy.stride(), *y.stride(), *x1.stride(), *_strides(x2, x1),
            HAS_X2=x2 is not None, HAS_A1=s1 is not None, HAS_A2=s2 is not None, PAD=pad_c,
            **U.dot_meta(dy.dtype))
        dw, dbias = dw_part.sum(0), db_part.sum(0)  # fixed-order reduction over the splits
    else:
        dw = torch.zeros((c_out, 9 * c_in), device=dy.device, dtype=acc)
        dbias = torch.zeros(c_out, device=dy.device, dtype=acc)
    return dw.view(c_out, 3, 3, c_in).permute(0, 3, 1, 2), dbias


def _affine(x: Tensor, s: Optional[Tensor], b: Optional[Tensor]) -> Tensor:
    x = x if s is None else x * s.to(x.dtype)[None, :, None, None]
    return x if b is None else x + b.to(x.dtype)[None, :, None, None]


def conv3x3_dgrad_reference(dy: Tensor, y: Tensor, weight: Tensor, c1: int, x1: Tensor,
                            x2: Optional[Tensor] = None, s1: Optional[Tensor] = None,
                            s2: Optional[Tensor] = None, pad: str = "zeros"):
    """torch.nn.grad version of conv3x3_dgrad, computed in dy's dtype (pass float64 for tests);
    other padding modes by autograd through torch's pad (the adjoint of the padding)."""
    dz = dy * (y > 0)
    shape = (dy.shape[0], weight.shape[1], *dy.shape[2:])
    if pad == "zeros":
        dA = torch.nn.grad.conv2d_input(shape, weight.to(dz.dtype), dz, padding=1)
    else:  # conv(pad(A)) is linear in A: its gradient at A = 0 is the adjoint
        with torch.enable_grad():
            a = torch.zeros(shape, dtype=dz.dtype, device=dz.device, requires_grad=True)
            (dA,) = torch.autograd.grad(torch.nn.functional.conv2d(padded(a, pad), weight.to(dz.dtype)), a, dz)
    out = []
    for dA_k, x_k, s_k in ((dA[:, :c1], x1, s1), (dA[:, c1:], x2, s2)):
        if x_k is None:
            out += [None, None, None]
            continue
        dx = dA_k if s_k is None else dA_k * s_k.to(dA_k.dtype)[None, :, None, None]
        out += [dx, (dA_k * x_k.to(dA_k.dtype)).sum((0, 2, 3)), dA_k.sum((0, 2, 3))]
    dx1, ds1, db1, dx2, ds2, db2 = out
    return dx1, dx2, ds1, db1, ds2, db2


def conv3x3_wgrad_reference(dy: Tensor, y: Tensor, x1: Tensor, x2: Optional[Tensor] = None,
                            s1: Optional[Tensor] = None, b1: Optional[Tensor] = None,
                            s2: Optional[Tensor] = None, b2: Optional[Tensor] = None, pad: str = "zeros"):
    """torch.nn.grad version of conv3x3_wgrad, computed in dy's dtype -> (dweight, dbias)."""
    dz = dy * (y > 0)
    parts = [_affine(x1.to(dz.dtype), s1, b1)]
    if x2 is not None:
        parts.append(_affine(x2.to(dz.dtype), s2, b2))
    a = padded(torch.cat(parts, dim=1), pad)  # padded after the affine, as in the block
    dw = torch.nn.grad.conv2d_weight(a, (dy.shape[1], a.shape[1], 3, 3), dz, padding=0)
    return dw, dz.sum((0, 2, 3))
