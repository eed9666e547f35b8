"""How the package launches each of its @triton.jit kernels, for bench/aot.py's sm_90 compiles.

One builder per kernel: (GPU-mode kernel modules, torch compute dtype, (C1, C2, COUT)) -> Launch,
mirroring its host wrapper in kernels/ as the model calls it under autocast. Read the wrappers when a
kernel changes: tests/test_compile_sm90.py fails when a launched kernel has no entry here, and
bench/aot.py names any constexpr missing from a builder.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

# Representative activation shape (B, H, W): every extent a multiple of 16, like the model's levels.
BATCH, HEIGHT, WIDTH = 2, 64, 64


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _nhwc(prefix: str, channels: int) -> dict:
    """Stride scalars prefix+b/c/h/w of a channels_last (B, C, H, W) activation (the model's layout)."""
    c = max(1, channels)
    return {prefix + "b": HEIGHT * WIDTH * c, prefix + "c": 1, prefix + "h": WIDTH * c, prefix + "w": c}


def split_pixels(ch: tuple) -> int:
    """Output pixels of the split-K prune's stand-in for layer (C1, C2, COUT): batch 2 at the
    smallest level of a 512x512 input that has this layer's widest channel count (32 -> 256x256,
    ..., 512 -> 16x16), where the tiles are fewest and split-K may pay. The compile itself does
    not depend on it (HEIGHT x WIDTH specialise alike)."""
    side = max(16, 16 * 512 // max(ch))
    return BATCH * side * side


def _split_prune(m, ch, n) -> dict:
    """Named-arg stand-ins for the split-K prune: M at split_pixels, and a workspace (a meta tensor:
    no memory) as large as the host allocates when it allows splits, n = the GEMM's N."""
    import torch

    pix = split_pixels(ch)
    return dict(M=pix, part_ptr=torch.empty(max(m.splitk.SPLITS) * pix * n, device="meta"))


@dataclass
class Launch:
    """What one launch passes: the kernel (an Autotuner is resolved to its JITFunction and configs),
    pointers in the compute dtype, constexprs other than an autotune config's, scalars."""
    kernel: object
    act: tuple
    constexprs: dict
    scalars: dict
    ptr_types: dict = field(default_factory=dict)  # pointers of a fixed dtype other than fp32
    prune_args: dict = field(default_factory=dict)  # named-arg stand-ins only the prune reads


# One builder per kernel: (GPU-mode modules, torch compute dtype, (C1, C2, COUT)) -> Launch, mirroring
# its host wrapper as the model calls it under autocast: activations in the compute dtype; conv bias,
# BatchNorm scale/shift/statistics and the fp32 master weight that fold_affine reads in fp32.
def _conv_fwd(m, dt, ch, pad=0):
    c1, c2, co = ch
    u, pix = m._utils, BATCH * HEIGHT * WIDTH
    return Launch(
        m.conv_fwd._conv3x3_fwd_kernel, ("x1_ptr", "x2_ptr", "w_ptr", "bt_ptr", "y_ptr"),
        # conv3x3_fwd with an x2, pending affines (TAP_BIAS), a bias and statistics: the widest variant.
        dict(HAS_X2=c2 > 0, TAP_BIAS=True, HAS_BIAS=True, PAD=pad, WANT_STATS=True, ACC=u.acc_dtype(dt),
             PRECISION=u.dot_precision(dt), UPCAST=u.dot_upcast(dt)),
        dict(M=pix, H=HEIGHT, W=WIDTH, C1=c1, C2=c2, COUT=co, M_BUCKET=_next_pow2(pix),
             **_nhwc("sx1_", c1), **_nhwc("sx2_", c2 or c1), **_nhwc("sy_", co)),
        prune_args=_split_prune(m, ch, co))


def _fold(m, dt, ch):
    import torch
    import triton.language as tl

    c1, c2, co = ch
    # fold_affine: packed weight in the weight's own dtype (fp32), wp / bt in the compute dtype.
    hi = {torch.float64: tl.float64, torch.float16: tl.float16}.get(dt, tl.bfloat16)
    return Launch(m.conv_fwd._fold_kernel, ("wp_ptr", "bt_ptr"),
                  dict(AFF1=True, AFF2=c2 > 0, ACC=m._utils.acc_dtype(dt), HI=hi,
                       EMULATE_RNE=m._utils.dot_upcast(dt), BLOCK_C=32, BLOCK_N=min(64, max(16, _next_pow2(co)))),
                  dict(C1=c1, CIN=c1 + c2, COUT=co))


def _dgrad(m, dt, ch):
    c1, c2, co = ch
    u, pix, cin = m._bwd_utils, BATCH * HEIGHT * WIDTH, c1 + c2
    return Launch(
        m.conv_bwd._dgrad_kernel, ("dy_ptr", "y_ptr", "w_ptr", "x1_ptr", "x2_ptr", "dx1_ptr", "dx2_ptr"),
        dict(HAS_X2=c2 > 0, HAS_S1=True, HAS_S2=c2 > 0, **u.dot_meta(dt)),
        dict(H=HEIGHT, W=WIDTH, M=pix, C_OUT=co, C1=c1, C_IN=cin, M_BUCKET=u.size_bucket(pix),
             **_nhwc("sdy_", co), **_nhwc("sy_", co),
             # weight.to(memory_format=channels_last): (Cout, Cin, 3, 3) strides (9Cin, 1, 3Cin, Cin)
             sw_o=9 * cin, sw_i=1, sw_h=3 * cin, sw_w=cin,
             **_nhwc("sx1_", c1), **_nhwc("sx2_", c2 or c1), **_nhwc("sd1_", c1), **_nhwc("sd2_", c2 or c1)),
        prune_args=_split_prune(m, ch, cin))


def _wgrad(m, dt, ch, pad=0):
    import torch

    c1, c2, co = ch
    u, pix, cin = m._bwd_utils, BATCH * HEIGHT * WIDTH, c1 + c2
    _, chunk = u.wgrad_split(pix, co, cin, torch.device("cpu"))
    return Launch(
        m.conv_bwd._wgrad_kernel, ("dy_ptr", "y_ptr", "x1_ptr", "x2_ptr"),
        dict(HAS_X2=c2 > 0, HAS_A1=True, HAS_A2=c2 > 0, PAD=pad, **u.dot_meta(dt)),
        dict(H=HEIGHT, W=WIDTH, P=pix, C_OUT=co, C1=c1, C_IN=cin, CHUNK=chunk, P_BUCKET=u.size_bucket(pix),
             **_nhwc("sdy_", co), **_nhwc("sy_", co), **_nhwc("sx1_", c1), **_nhwc("sx2_", c2 or c1)))


def _conv_fwd_reflect(m, dt, ch):
    # padding_mode="reflect" (kernels/padding.py: PAD=1): the load index and the tap bias change;
    # replicate (PAD=2) compiles alike. dgrad has no padded variant (its ring is added on the host).
    return _conv_fwd(m, dt, ch, pad=1)


def _wgrad_reflect(m, dt, ch):
    return _wgrad(m, dt, ch, pad=1)


def _fwd_reduce(m, dt, ch):
    # splitk.reduce_fwd after a split conv3x3_fwd: fp32 partials, y in the compute dtype, stats.
    c1, c2, co = ch
    sk, pix = m.splitk, split_pixels(ch)
    side = int((pix // BATCH) ** 0.5)
    return Launch(sk._fwd_reduce_kernel, ("y_ptr",),
                  dict(HAS_BIAS=True, WANT_STATS=True, ACC=m._utils.acc_dtype(dt), UPCAST=m._utils.dot_upcast(dt),
                       BLOCK_M=sk.REDUCE_BLOCK_M, BLOCK_N=sk._block_n(co)),
                  dict(M=pix, H=side, W=side, COUT=co, SPLIT=max(sk.SPLITS), sy_b=side * side * co, sy_c=1,
                       sy_h=side * co, sy_w=co))


def _dgrad_reduce(m, dt, ch):
    # splitk.reduce_dgrad after a split conv3x3_dgrad: both inputs, both scales (the widest variant).
    c1, c2, co = ch
    sk, u, pix, cin = m.splitk, m._bwd_utils, BATCH * HEIGHT * WIDTH, c1 + c2
    return Launch(sk._dgrad_reduce_kernel, ("x1_ptr", "x2_ptr", "dx1_ptr", "dx2_ptr"),
                  dict(HAS_X2=c2 > 0, HAS_S1=True, HAS_S2=c2 > 0, UPCAST=u.dot_upcast(dt), ACC=m._utils.acc_dtype(dt),
                       BLOCK_M=sk.REDUCE_BLOCK_M, BLOCK_N=sk._block_n(cin)),
                  dict(H=HEIGHT, W=WIDTH, M=pix, C1=c1, C_IN=cin, SPLIT=max(sk.SPLITS),
                       **_nhwc("sx1_", c1), **_nhwc("sx2_", c2 or c1), **_nhwc("sd1_", c1), **_nhwc("sd2_", c2 or c1)))


def _merge(m, dt, ch):
    co, rows, pix = ch[2], 128, BATCH * HEIGHT * WIDTH  # rows: a conv tile's BLOCK_M
    b = m.bn_stats
    return Launch(b._merge_kernel, (), dict(BLOCK_T=b._MERGE_BLOCK_T, BLOCK_C=b._MERGE_BLOCK_C),
                  dict(T=-(-pix // rows), C=co, TOTAL=pix, ROWS=rows))


def _partial(m, dt, ch):
    c, b = ch[2], m.bn_stats
    block_c = min(64, max(16, _next_pow2(c)))  # bn_stats() on a channels_last tensor
    return Launch(b._partial_kernel, ("y_ptr",),
                  dict(ACC=m._utils.acc_dtype(dt), BLOCK_R=b._PARTIAL_ELEMS // block_c, BLOCK_C=block_c),
                  dict(M=BATCH * HEIGHT * WIDTH, C=c, HW=HEIGHT * WIDTH, W=WIDTH, **_nhwc("s", c)))


def _finalize(m, dt, ch):
    # Training BatchNorm with affine, running statistics (fp32 buffers) and num_batches_tracked (int64).
    return Launch(m.bn_stats._finalize_kernel, (),
                  dict(HAS_AFFINE=True, UPDATE=True, CUMULATIVE=False, BLOCK_C=128),
                  dict(C=ch[2], count=float(BATCH * HEIGHT * WIDTH), momentum=0.01, eps=1e-5),
                  ptr_types={"nbt_ptr": "i64"})


def _eval_affine(m, dt, ch):
    return Launch(m.bn_stats._eval_affine_kernel, (), dict(HAS_AFFINE=True, BLOCK_C=256),
                  dict(C=ch[2], eps=1e-5))


def _affine_grad(m, dt, ch):
    # BNAffineFn's backward: both output grads present, gamma given (the model's BatchNorms).
    return Launch(m.bn_stats._affine_grad_kernel, (), dict(HAS_GS=True, HAS_GB=True, HAS_GAMMA=True, BLOCK_C=256),
                  dict(C=ch[2], count=float(BATCH * HEIGHT * WIDTH)))


@dataclass(frozen=True)
class KernelSpec:
    jit_name: str          # the @triton.jit function in kernels/
    launch: Callable       # (gpu modules, torch dtype, (C1, C2, COUT)) -> Launch
    dtypes: tuple          # compute dtypes the test compiles ("fp32" only: no compute-dtype pointer)
    gemm: bool = False     # autotuned implicit GEMM: tensor cores expected, spills matter


#: Short name -> spec, for every kernel the package launches (test_compile_sm90 checks the coverage).
KERNELS = {
    "conv_fwd": KernelSpec("_conv3x3_fwd_jit", _conv_fwd, ("bf16", "fp16", "fp32"), gemm=True),
    "fold": KernelSpec("_fold_kernel", _fold, ("bf16", "fp16", "fp32")),
    "dgrad": KernelSpec("_dgrad_kernel", _dgrad, ("bf16", "fp16", "fp32"), gemm=True),
    "wgrad": KernelSpec("_wgrad_kernel", _wgrad, ("bf16", "fp16", "fp32"), gemm=True),
    "conv_fwd_reflect": KernelSpec("_conv3x3_fwd_jit", _conv_fwd_reflect, ("bf16", "fp32"), gemm=True),
    "wgrad_reflect": KernelSpec("_wgrad_kernel", _wgrad_reflect, ("bf16", "fp32"), gemm=True),
    "fwd_splitk_reduce": KernelSpec("_fwd_reduce_kernel", _fwd_reduce, ("bf16", "fp16", "fp32")),
    "dgrad_splitk_reduce": KernelSpec("_dgrad_reduce_kernel", _dgrad_reduce, ("bf16", "fp16", "fp32")),
    "bn_merge": KernelSpec("_merge_kernel", _merge, ("fp32",)),
    "bn_partial": KernelSpec("_partial_kernel", _partial, ("bf16", "fp32")),
    "bn_finalize": KernelSpec("_finalize_kernel", _finalize, ("fp32",)),
    "bn_eval_affine": KernelSpec("_eval_affine_kernel", _eval_affine, ("fp32",)),
    "bn_affine_grad": KernelSpec("_affine_grad_kernel", _affine_grad, ("fp32",)),
}
GEMMS = tuple(k for k, s in KERNELS.items() if s.gemm)
#: (C1, C2, COUT) of the test's compiles: a decoder block of BiO-Net x1.0 level 1.
TEST_CHANNELS = (64, 64, 64)
