"""Per-layer microbenchmark of the fused forward conv (bionet_fast.kernels.conv_fwd) against cuDNN,
over every 3x3 conv of a t=3, 512x512, batch-2 BiO-Net forward, plus the whole model in eval mode.
Run on a CUDA machine from the repository root: `PYTHONPATH=. python bench/conv_layers.py`
(the kernels import as bionet_fast.kernels once the package is installed: `pip install -e .`).
Its H200 output is recorded in bench/RESULTS.md.
"""
import os, sys, time, traceback
os.environ["TRITON_INTERPRET"] = "0"
import torch, triton
import torch.nn.functional as F
from triton.testing import do_bench
from bionet_fast.kernels.conv_fwd import conv3x3_fwd, pack_weight, _conv3x3_fwd_kernel
from bionet_fast.kernels.bn_stats import bn_stats
print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), flush=True)
B, t, c = 2, 3, [32, 64, 128, 256, 512]
layers = {}  # (C1, C2, Cout, H, aff) -> count
def add(k, n=1): layers[k] = layers.get(k, 0) + n
add((3, 0, 32, 512, False)); add((32, 0, 32, 512, True), 2); add((32, 0, 32, 512, True), 2)  # stem 2 + head 2
for l in range(4):
    r = 256 >> l
    add((c[l], c[l], c[l], r, True), t); add((c[l], 0, c[l], r, True), t); add((c[l], 0, c[l + 1], r, True), t)
add((512, 0, 512, 16, True), 2 * t)
for j in range(4):
    r = 256 >> j
    add((c[j + 1], c[j], c[j], r, True), t); add((c[j], 0, c[j], r, True), t)
convT = {(512, 16): t}
for j in range(4): convT[(c[j], 256 >> j)] = t if j > 0 else t  # all UPs run for the last iteration
dev = "cuda"
def gtime(fn, reps=10):
    fn(); fn(); torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps): fn()
    return do_bench(g.replay, return_mode="median") / reps
tot = {}
print(f"{'C1':>4} {'C2':>4} {'Co':>4} {'H':>4} n | fused  noaff  +stats  cudnn  memfloor (us, graph) best", flush=True)
for (c1, c2, co, h, aff), n in sorted(layers.items(), key=lambda kv: -kv[0][3]):
    x1 = torch.randn(B, c1, h, h, device=dev, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    x2 = torch.randn(B, c2, h, h, device=dev, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last) if c2 else None
    w = torch.randn(co, c1 + c2, 3, 3, device=dev) * 0.05; b = torch.randn(co, device=dev)
    s1 = torch.randn(c1, device=dev) if aff else None; b1 = torch.randn(c1, device=dev) if aff else None
    s2 = torch.randn(c2, device=dev) if c2 else None; b2 = torch.randn(c2, device=dev) if c2 else None
    wp = pack_weight(w, torch.bfloat16)
    f = lambda: conv3x3_fwd(x1, w, b, x2, s1, b1, s2, b2, want_stats=False, packed_weight=wp)
    fn = lambda: conv3x3_fwd(x1, w, b, x2, want_stats=False, packed_weight=wp)
    fs = lambda: conv3x3_fwd(x1, w, b, x2, s1, b1, s2, b2, want_stats=True, packed_weight=wp)
    f(); best = _conv3x3_fwd_kernel.best_config
    xc = torch.cat([x1, x2], 1) if c2 else x1
    wb = w.to(torch.bfloat16).contiguous(memory_format=torch.channels_last); bb = b.to(torch.bfloat16)
    g = lambda: F.relu(F.conv2d(xc, wb, bb, padding=1))
    r = [gtime(f), gtime(fn), gtime(fs), gtime(g)]
    floor = 2 * B * h * h * (c1 + c2 + co) / 4.3e12 * 1e3
    for k, v in zip(("fused", "noaff", "stats", "cudnn"), r): tot[k] = tot.get(k, 0) + n * v
    print(f"{c1:>4} {c2:>4} {co:>4} {h:>4} {n} | " + " ".join(f"{v*1e3:6.1f}" for v in r) + f" {floor*1e3:6.1f}  {best.kwargs} w{best.num_warps} s{best.num_stages}", flush=True)
tT = 0.0
for (ch, h), n in convT.items():
    x = torch.randn(B, ch, h, h, device=dev, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    w = torch.randn(ch, ch, 3, 3, device=dev, dtype=torch.bfloat16)
    ms = gtime(lambda: F.conv_transpose2d(x, w, None, 2, 1, 1).relu_())
    y = F.conv_transpose2d(x, w, None, 2, 1, 1)
    mst = gtime(lambda: bn_stats(y))
    print(f"convT {ch} {h}: {ms*1e3:.1f} us, bn_stats {mst*1e3:.1f} us", flush=True); tT += n * (ms + mst)
print("SUM over t=3 convs (ms, graph):", {k: round(v, 3) for k, v in tot.items()}, f"convT+stats {tT:.3f}", flush=True)

def model_bench():
    from bionet_fast import BiONet
    for backend in ("reference", "triton"):
        m = BiONet(iterations=3, backend=backend).cuda().eval().to(memory_format=torch.channels_last)
        x = torch.randn(2, 3, 512, 512, device=dev).contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            for _ in range(3): m(x)
            torch.cuda.synchronize()
            ms = do_bench(lambda: m(x), return_mode="median")
            s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(2): m(x)
            torch.cuda.current_stream().wait_stream(s)
            gr = torch.cuda.CUDAGraph()
            with torch.cuda.graph(gr):
                out = m(x)
            msg = do_bench(lambda: gr.replay(), return_mode="median")
        print(f"model t=3 eval bf16 {backend}: eager {ms:.3f} ms, cuda graph {msg:.3f} ms", flush=True)
try:
    model_bench()
except Exception:
    traceback.print_exc()
