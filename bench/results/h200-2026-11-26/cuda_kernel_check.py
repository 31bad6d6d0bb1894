import sys, time, itertools
import torch
import mnv2_kernels
from mnv2_kernels.reference import inverted_residual

print(mnv2_kernels.build_info(), torch.__version__, torch.cuda.get_device_name(), flush=True)
op = torch.ops.mnv2.fused_inverted_residual
bop = torch.ops.mnv2.fused_inverted_residual_backward
dev = "cuda"
fails = []

def rel(a, b):
    a = a.detach().double(); b = b.detach().double()
    d = (b.norm().item())
    return (a - b).norm().item() / (d if d > 0 else 1.0)

def make(n, cin, h, w, t, cout, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = cin * t
    r = lambda *s, sc=0.3: (torch.randn(*s, generator=g, dtype=torch.float64) * sc)
    x = r(n, cin, h, w, sc=1.0)
    if t == 1:
        we = be = None
    else:
        we, be = r(hidden, cin, sc=1.0 / cin ** 0.5 * 1.5), r(hidden, sc=0.5)
    wd, bd = r(hidden, 3, 3, sc=0.5), r(hidden, sc=0.5)
    wp, bp = r(cout, hidden, sc=1.0 / hidden ** 0.5), r(cout)
    return x, we, be, wd, bd, wp, bp

def to(t, dtype):
    return None if t is None else t.to(dev, dtype)

# (n, cin, h, w, t, cout, stride, residual)
shapes = [
    (2, 16, 7, 7, 1, 16, 1, True),
    (2, 16, 12, 12, 6, 24, 2, False),
    (3, 24, 13, 11, 6, 24, 1, True),
    (1, 5, 1, 1, 6, 7, 1, False),
    (2, 7, 9, 1, 6, 3, 2, False),
    (1, 3, 17, 17, 6, 5, 2, False),
    (2, 160, 7, 7, 6, 320, 1, False),
    (1, 96, 14, 14, 6, 160, 2, False),
    (2, 37, 10, 10, 1, 37, 2, False),
    (1, 40, 1, 9, 3, 40, 1, True),
    (2, 32, 28, 28, 6, 32, 1, True),
    (1, 16, 112, 112, 1, 16, 1, True),
    (1, 24, 56, 56, 6, 32, 2, False),
]
tol = {torch.float64: (1e-10, 1e-9), torch.float32: (2e-6, 1e-5), torch.float16: (5e-3, 2e-2), torch.bfloat16: (3e-2, 8e-2)}
for shp in shapes:
    n, cin, h, w, t, cout, s, res = shp
    p64 = make(n, cin, h, w, t, cout, torch.float64)
    for dtype, cl in itertools.product([torch.float32, torch.float64, torch.float16, torch.bfloat16], [False, True]):
        if dtype in (torch.float64, torch.bfloat16) and cl:  # fewer combos
            continue
        x = p64[0].to(dev, dtype)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        params = [to(p, dtype) for p in p64[1:]]
        # reference in float64 from the rounded params
        xr = x.detach().double().requires_grad_()
        pr = [None if p is None else p.detach().double().requires_grad_() for p in params]
        yr = inverted_residual(xr, *pr, s, res)
        y = op(x, *params, s, res)
        torch.cuda.synchronize()
        fe, be_ = tol[dtype]
        e = rel(y, yr)
        ok_fmt = y.is_contiguous(memory_format=torch.channels_last) if cl else y.is_contiguous()
        # backward
        gy64 = torch.randn(yr.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(dev)
        gy = gy64.to(dtype)
        if cl:
            gy = gy.contiguous(memory_format=torch.channels_last)
        ins = [xr] + [p for p in pr if p is not None]
        gr = torch.autograd.grad(yr, ins, gy.double())
        grads = bop(gy, x, *params, s, res)
        grads2 = bop(gy, x, *params, s, res)
        torch.cuda.synchronize()
        det = all(torch.equal(a, b) for a, b in zip(grads, grads2))
        got = [grads[0]] + ([grads[1], grads[2]] if t != 1 else []) + list(grads[3:])
        names = ["gx"] + (["gwe", "gbe"] if t != 1 else []) + ["gwd", "gbd", "gwp", "gbp"]
        errs = {nm: rel(a, b) for nm, a, b in zip(names, got, gr)}
        bad = e > fe or not ok_fmt or not det or any(v > be_ for v in errs.values())
        if t == 1:
            bad = bad or grads[1].shape != (0, 0) or grads[2].shape != (0,)
        gfmt = grads[0].is_contiguous(memory_format=torch.channels_last) if cl else grads[0].is_contiguous()
        bad = bad or not gfmt
        line = f"{'FAIL' if bad else 'ok  '} {shp} {str(dtype)[6:]:8s} cl={int(cl)} fwd={e:.2e} fmt={ok_fmt},{gfmt} det={det} " + " ".join(f"{k}={v:.1e}" for k, v in errs.items())
        print(line, flush=True)
        if bad:
            fails.append(line)

# strided (non-contiguous) input view
x = torch.randn(2, 40, 9, 9, device=dev)[:, ::2, :, 1:]
p = [to(q, torch.float32) for q in make(2, 20, 9, 8, 6, 12, torch.float64)[1:]]
y = op(x, *p, 1, False)
yr = inverted_residual(x.double(), *[q.double() for q in p], 1, False)
print("strided view fwd", rel(y, yr), flush=True)
if rel(y, yr) > 1e-5: fails.append("strided view")

# timing, fp16 channels_last, batch 64, a few MobileNetV2 blocks
for (cin, h, t, cout, s, res) in [(16, 112, 6, 24, 2, False), (24, 56, 6, 24, 1, True), (32, 28, 6, 64, 2, False), (96, 14, 6, 96, 1, True), (160, 7, 6, 320, 1, False)]:
    n = 64
    p64 = make(n, cin, h, h, t, cout, torch.float64)
    x = p64[0].to(dev, torch.float16).contiguous(memory_format=torch.channels_last)
    params = [to(q, torch.float16) for q in p64[1:]]
    for _ in range(2): y = op(x, *params, s, res)
    torch.cuda.synchronize(); t0 = time.time()
    for _ in range(5): y = op(x, *params, s, res)
    torch.cuda.synchronize(); tf = (time.time() - t0) / 5
    gy = torch.randn_like(y)
    bop(gy, x, *params, s, res); torch.cuda.synchronize(); t0 = time.time()
    for _ in range(3): bop(gy, x, *params, s, res)
    torch.cuda.synchronize(); tb = (time.time() - t0) / 3
    print(f"time N=64 fp16 cl cin={cin} h={h} t={t} cout={cout} s={s}: fwd {tf*1e3:.2f} ms bwd {tb*1e3:.2f} ms", flush=True)

print("FAILS:", len(fails))
for f in fails: print(f)
