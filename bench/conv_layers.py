"""Per-layer microbenchmark of the fused conv kernels (bionet_fast.kernels) against cuDNN, over every
3x3 conv of a t=3, 512x512, batch-2 BiO-Net forward, plus the whole model in eval mode.

    PYTHONPATH=. python bench/conv_layers.py [--budget S] [--no-model] [--no-dgrad]

Run on a CUDA machine from the repository root (the kernels import as bionet_fast.kernels once the
package is installed: `pip install -e .`). Layers run deepest first (where split-K matters); with
--budget no new layer starts after S seconds. Columns (us per call, replayed from a CUDA graph):
fused = conv3x3_fwd autotuned (its pick, split-K configs included, is the last column), split2 /
split4 = the pinned tile forced to SPLIT_K=2 / 4 (kernels/splitk.py; "-" where its tiles already
fill the SMs), noaff / +stats = without the input affines / with the BatchNorm statistics, cudnn =
relu(conv2d(cat(x1, x2))). The dgrad table: conv3x3_dgrad autotuned / forced splits against
torch.nn.grad.conv2d_input (cuDNN) at the layers of 32x32 and below.
Its H200 output is recorded in bench/RESULTS.md.
"""
import argparse, os, sys, time, traceback
os.environ["TRITON_INTERPRET"] = "0"
import torch, triton
import torch.nn.functional as F
from triton.testing import do_bench
from bionet_fast.kernels.conv_fwd import conv3x3_fwd, pack_weight, _conv3x3_fwd_kernel, _GPU_CONFIGS
from bionet_fast.kernels.conv_bwd import conv3x3_dgrad, _dgrad_kernel
from bionet_fast.kernels.bn_stats import bn_stats

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--budget", type=float, default=None, help="start no new layer after this many seconds")
p.add_argument("--no-model", action="store_true", help="skip the whole-model timing")
p.add_argument("--no-dgrad", action="store_true", help="skip the dgrad table")
opts = p.parse_args()
START = time.time()
def in_budget(): return opts.budget is None or time.time() - START < opts.budget
print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), flush=True)
SMS = torch.cuda.get_device_properties(0).multi_processor_count
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
for j in range(4): convT[(c[j], 256 >> j)] = t  # all UPs run for the last iteration
dev = "cuda"
def gtime(fn, reps=10):
    fn(); fn(); torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps): fn()
    return do_bench(g.replay, return_mode="median") / reps
def few_tiles(m, n):  # the pinned tile (128x64) leaves SMs idle: forced splits are worth timing
    bm, bn = _GPU_CONFIGS[1][:2]
    return triton.cdiv(m, bm) * triton.cdiv(n, bn) < SMS
def cfg(k): b = k.best_config; return f"{b.kwargs} w{b.num_warps} s{b.num_stages}"
def act(ch, h): return torch.randn(B, ch, h, h, device=dev, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
tot = {}
order = sorted(layers.items(), key=lambda kv: (kv[0][3], -kv[0][0] - kv[0][1]))
print(f"{'C1':>4} {'C2':>4} {'Co':>4} {'H':>4} n | fused split2 split4  noaff +stats  cudnn memfloor (us, graph) | autotuned pick", flush=True)
for (c1, c2, co, h, aff), n in order:
    if not in_budget():
        print(f"budget: skipped {c1}+{c2}>{co} at {h}", flush=True); continue
    x1 = act(c1, h); x2 = act(c2, h) if c2 else None
    w = torch.randn(co, c1 + c2, 3, 3, device=dev) * 0.05; b = torch.randn(co, device=dev)
    s1 = torch.randn(c1, device=dev) if aff else None; b1 = torch.randn(c1, device=dev) if aff else None
    s2 = torch.randn(c2, device=dev) if c2 else None; b2 = torch.randn(c2, device=dev) if c2 else None
    wp = pack_weight(w, torch.bfloat16)
    fused = lambda sk=None: (lambda: conv3x3_fwd(x1, w, b, x2, s1, b1, s2, b2, want_stats=False, packed_weight=wp, split_k=sk))
    fn = lambda: conv3x3_fwd(x1, w, b, x2, want_stats=False, packed_weight=wp)
    fs = lambda: conv3x3_fwd(x1, w, b, x2, s1, b1, s2, b2, want_stats=True, packed_weight=wp)
    fused()(); best = cfg(_conv3x3_fwd_kernel)
    xc = torch.cat([x1, x2], 1) if c2 else x1
    wb = w.to(torch.bfloat16).contiguous(memory_format=torch.channels_last); bb = b.to(torch.bfloat16)
    g = lambda: F.relu(F.conv2d(xc, wb, bb, padding=1))
    split = few_tiles(B * h * h, co)
    r = {"fused": gtime(fused()), "split2": gtime(fused(2)) if split else None, "split4": gtime(fused(4)) if split else None,
         "noaff": gtime(fn), "stats": gtime(fs), "cudnn": gtime(g)}
    floor = 2 * B * h * h * (c1 + c2 + co) / 4.3e12 * 1e3
    for k, v in r.items(): tot[k] = tot.get(k, 0) + n * (v if v is not None else r["fused"])
    cells = " ".join("     -" if v is None else f"{v*1e3:6.1f}" for v in r.values())
    print(f"{c1:>4} {c2:>4} {co:>4} {h:>4} {n} | {cells} {floor*1e3:6.1f} | {best}", flush=True)
print("SUM over t=3 convs (ms, graph; split columns count fused where not run):", {k: round(v, 3) for k, v in tot.items()}, flush=True)

def dgrad_table():
    print(f"dgrad {'C1':>4} {'C2':>4} {'Co':>4} {'H':>4} | fused split2 split4  cudnn (us, graph) | autotuned pick", flush=True)
    for (c1, c2, co, h, aff), n in order:
        if h > 32 or not in_budget(): continue
        dy, y, x1 = act(co, h), act(co, h).relu_(), act(c1, h)
        x2 = act(c2, h) if c2 else None
        w = torch.randn(co, c1 + c2, 3, 3, device=dev) * 0.05
        s1 = torch.randn(c1, device=dev); s2 = torch.randn(c2, device=dev) if c2 else None
        f = lambda sk=None: (lambda: conv3x3_dgrad(dy, y, w, c1, x1, x2, s1, s2, split_k=sk))
        f()(); best = cfg(_dgrad_kernel)
        wb = w.to(torch.bfloat16)
        g = lambda: torch.nn.grad.conv2d_input((B, c1 + c2, h, h), wb, dy * (y > 0), padding=1)
        r = [gtime(f()), gtime(f(2)), gtime(f(4)), gtime(g)]
        print(f"dgrad {c1:>4} {c2:>4} {co:>4} {h:>4} | " + " ".join(f"{v*1e3:6.1f}" for v in r) + f" | {best}", flush=True)
if not opts.no_dgrad:
    try:
        dgrad_table()
    except Exception:
        traceback.print_exc()

if in_budget():
    tT = 0.0
    for (ch, h), n in convT.items():
        x = torch.randn(B, ch, h, h, device=dev, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
        w = torch.randn(ch, ch, 3, 3, device=dev, dtype=torch.bfloat16)
        ms = gtime(lambda: F.conv_transpose2d(x, w, None, 2, 1, 1).relu_())
        y = F.conv_transpose2d(x, w, None, 2, 1, 1)
        mst = gtime(lambda: bn_stats(y))
        print(f"convT {ch} {h}: {ms*1e3:.1f} us, bn_stats {mst*1e3:.1f} us", flush=True); tT += n * (ms + mst)
    print(f"convT+stats {tT:.3f} ms", flush=True)

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
if not opts.no_model and in_budget():
    try:
        model_bench()
    except Exception:
        traceback.print_exc()
print(f"conv_layers.py: {time.time() - START:.0f} s", flush=True)
