"""GPU smoke check of the Triton backend (not a pytest module): correctness of
forward and all gradients against float64 on a few shapes and dtypes, the
registered operator with autograd and torch.compile(fullgraph=True), and one
timing. Works from a source checkout without the package installed:

    MNV2_TRITON_AUTOTUNE=0 python tests/triton/gpu_smoke.py
"""

import importlib.util
import os
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
try:
    import mnv2_kernels.triton_kernels  # noqa: F401  (installed)
except ImportError:
    sys.modules.pop("mnv2_kernels", None)
    spec = importlib.util.spec_from_file_location(
        "mnv2_kernels.triton_kernels", os.path.join(ROOT, "triton_kernels", "__init__.py"),
        submodule_search_locations=[os.path.join(ROOT, "triton_kernels")])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)

import torch  # noqa: E402
import triton  # noqa: E402

from mnv2_kernels import reference  # noqa: E402
from mnv2_kernels.triton_kernels import fused_ir, ops  # noqa: E402

print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name(), flush=True)
NAMES = ("y", "gx", "gw1", "gb1", "gwdw", "gbdw", "gw3", "gb3")
FAIL = []


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def make(n, cin, h, t, cout, s, res, cl, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    hid = cin * t

    def r(*shape, scale=0.3, shift=0.0):
        return (scale * torch.randn(*shape, generator=g, device="cuda") + shift)

    x = r(n, cin, h, h, scale=0.5)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    w = [x, r(hid, cin) if t != 1 else None, r(hid, shift=1.0) if t != 1 else None, r(hid, 3, 3),
         r(hid, scale=0.1, shift=0.5), r(cout, hid, scale=0.3 / (hid / 32) ** 0.5), r(cout, scale=0.1)]
    return [a.to(dtype) if a is not None else None for a in w] + [s, res]


def check(case, dtype):
    args = make(*case, dtype)
    a64 = [a.detach().double().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
    y64 = reference.inverted_residual(*a64)
    gy64 = torch.randn_like(y64)
    y64.backward(gy64)
    refs = [y64] + [a.grad if isinstance(a, torch.Tensor) else None for a in a64[:7]]
    # torch's own result in this dtype (cuDNN), as the low-precision yardstick
    al = [a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
    yl = reference.inverted_residual(*al)
    yl.backward(gy64.to(dtype))
    lows = [yl] + [a.grad if isinstance(a, torch.Tensor) else None for a in al[:7]]
    torch.cuda.synchronize()
    y = fused_ir.forward(*args)
    gy = gy64.to(dtype)
    if case[6]:
        gy = gy.contiguous(memory_format=torch.channels_last)
    grads = fused_ir.backward(gy, *args)
    torch.cuda.synchronize()
    out = []
    for name, got, want, low in zip(NAMES, (y,) + tuple(grads), refs, lows):
        if want is None:
            continue
        e = rel(got, want)
        el = rel(low, want)
        bound = 1e-5 if (dtype == torch.float32 and name == "y") else (1e-4 if dtype == torch.float32 else 2 * el + 1e-6)
        ok = e <= bound
        out.append(f"{name}={e:.1e}{'' if dtype == torch.float32 else f'(torch {el:.1e})'}{'' if ok else ' FAIL'}")
        if not ok:
            FAIL.append((case, dtype, name, e, bound))
    print(case, str(dtype)[6:], " ".join(out), flush=True)


CASES = [  # (N, Cin, H, t, Cout, stride, residual, channels_last)
    (2, 16, 13, 6, 24, 2, False, False),
    (2, 24, 12, 6, 24, 1, True, True),
    (2, 32, 9, 1, 16, 1, False, True),
    (1, 160, 7, 6, 320, 1, False, True),
    (2, 96, 14, 6, 96, 1, True, False),
]
t0 = time.time()
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    for case in (CASES if dtype == torch.float32 else CASES[1:3]):
        try:
            check(case, dtype)
        except Exception:
            traceback.print_exc()
            FAIL.append((case, dtype, "exception"))
print(f"correctness done in {time.time() - t0:.0f}s", flush=True)

# registered op, autograd, torch.compile
try:
    ops.register()
    ops.register()
    print("USED_TRITON_OP", ops.USED_TRITON_OP, flush=True)
    args = make(2, 24, 12, 6, 24, 1, True, True, torch.float32)
    leaves = [a.clone().requires_grad_() for a in args[:7]]
    y = torch.ops.mnv2.triton_fused_inverted_residual(*leaves, *args[7:])
    y.square().sum().backward()
    print("op autograd ok:", all(l.grad is not None for l in leaves), flush=True)
    t1 = time.time()

    def f(*a):
        return torch.ops.mnv2.triton_fused_inverted_residual(*a).square().sum()

    cf = torch.compile(f, fullgraph=True)
    leaves2 = [a.clone().requires_grad_() for a in args[:7]]
    cf(*leaves2, *args[7:]).backward()
    print("compile fullgraph fwd+bwd:", max(rel(a.grad, b.grad) for a, b in zip(leaves2, leaves)),
          f"{time.time() - t1:.0f}s", flush=True)
except Exception:
    traceback.print_exc()
    FAIL.append("op/compile")

# one timing: fp16 channels_last, N=32, 24 -> 144 -> 24, 56x56, residual
try:
    args = make(32, 24, 56, 6, 24, 1, True, True, torch.float16)
    gy = torch.randn(32, 24, 56, 56, device="cuda", dtype=torch.float16).contiguous(memory_format=torch.channels_last)

    def bench(fn, reps=20):
        fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t) / reps * 1e3

    print("fwd ms triton %.3f  torch-unfused %.3f" % (
        bench(lambda: fused_ir.forward(*args)), bench(lambda: reference.inverted_residual(*args))), flush=True)
    print("bwd ms triton %.3f" % bench(lambda: fused_ir.backward(gy, *args), reps=5), flush=True)
except Exception:
    traceback.print_exc()
    FAIL.append("timing")
print("FAILURES:", FAIL if FAIL else "none", f"total {time.time() - t0:.0f}s", flush=True)
