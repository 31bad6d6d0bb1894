"""Property-based tests of mnv2::fused_inverted_residual (hypothesis).

Random blocks (Cin, Cout 1..48, t in {1, 2, 3, 4, 6}, stride 1/2, depthwise kernel
3/5/7, dilation 1/2/4 (atrous, padding = dilation * (k // 2)), ReLU6 or ReLU, H and W 1..64
with a bias toward small, batch 0..4, residual blocks about a quarter of the time),
float32 and float64, inputs in NCHW, channels_last and four kinds of view that
are contiguous in neither (a channel slice, a spatial slice, a permuted
layout, a stride-0 broadcast), and the output gradient in three layouts. Each
case runs on every CPU backend (the C++ kernel and ``reference``) and compares
the output and the gradients of x and of every weight and bias with the
float64 reference, at the tolerances of tests/test_ops.py and
tests/test_blocks.py: normwise relative 1e-4 in float32; 1e-12 (output) and
1e-10 (gradients) in float64.

Float32 data are dyadic (few-bit multiples of powers of two, bounded) so that
every hidden pre-activation (expand, depthwise) is computed exactly in
float32: the ReLU6 masks are then exactly the float64 reference's and a
gradient can never legitimately differ by a whole term at a kink (the reason
tests/test_blocks.py redraws inputs). The project GEMM and every gradient still
round in float32. Float64 data are plain Gaussian.

The CPU kernel's instruction set is chosen once per process (MNV2_CPU_ISA), so
the other ISA paths this machine runs are fuzzed by a pytest subprocess each
(test_fuzz_other_cpu_isas).

Budgets: HYPOTHESIS_PROFILE=ci (default; seeded, fixed examples) or fuzz
(`make fuzz`), registered in tests/conftest.py. A shrunk failure becomes a
REGRESSIONS entry below.
"""

import contextlib
import dataclasses
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, note
from hypothesis.control import currently_in_test_context
from hypothesis import strategies as st

import mnv2_kernels
from mnv2_kernels import ops, reference
from conftest import FP32_RTOL, rel_err

CHILD_ENV = "MNV2_FUZZ_ISA_CHILD"  # set in the per-ISA subprocess
# (output, gradient) tolerances: those of tests/test_ops.py and tests/test_blocks.py
TOLERANCES = {torch.float32: (FP32_RTOL, FP32_RTOL), torch.float64: (1e-12, 1e-10)}
X_LAYOUTS = ("nchw", "channels_last", "channel_slice", "spatial_slice", "permuted", "broadcast")
GY_LAYOUTS = ("nchw", "channels_last", "broadcast")
NAMES = ("x", "w_expand", "b_expand", "w_dw", "b_dw", "w_project", "b_project")


def _backends():
    """Backends to draw from: the C++ kernel three times as often as the reference
    (plain torch ops), which does not depend on the ISA and so is left out of the
    per-ISA subprocesses."""
    if os.environ.get(CHILD_ENV):
        return ["cpu"]
    return (["cpu"] * 3 if mnv2_kernels.build_info()["extension"] else []) + ["reference"]


BACKENDS = _backends()


@dataclasses.dataclass(frozen=True)
class Case:
    n: int
    cin: int
    cout: int
    t: int
    stride: int
    h: int
    w: int
    residual: bool
    dtype: torch.dtype
    x_layout: str
    gy_layout: str
    weights_strided: bool  # weights as non-contiguous views
    backend: str
    seed: int
    dilation: int = 1
    kernel: int = 3
    activation: str = "relu6"

    def __str__(self):
        return (f"n{self.n}-c{self.cin}-o{self.cout}-t{self.t}-s{self.stride}-k{self.kernel}-d{self.dilation}-"
                f"{self.activation}-{self.h}x{self.w}"
                f"{'-res' if self.residual else ''}-{str(self.dtype)[6:]}-{self.x_layout}-gy_{self.gy_layout}"
                f"{'-wstrided' if self.weights_strided else ''}-{self.backend}-seed{self.seed}")


def _size(hi):
    """1..hi, small half the time (each example is cheap and shrinking is quick)."""
    return st.one_of(st.integers(1, min(hi, 8)), st.integers(1, hi))


# Largest hidden tensor (N x hidden x H x W elements) of a drawn case: the CI
# budget keeps every case cheap (the float64 reference's convolutions and
# their backward dominate); make fuzz draws up to the largest block
# (4 x 288 x 64 x 64).
MAX_HIDDEN_ELEMENTS = 2**24 if os.environ.get("HYPOTHESIS_PROFILE") == "fuzz" else 2**19


@st.composite
def cases(draw):
    cin = draw(_size(48))
    if draw(st.integers(0, 3)) == 0:  # about a quarter are residual blocks
        stride, cout, residual = 1, cin, True
    else:
        stride = draw(st.sampled_from([1, 2]))
        cout = cin if draw(st.booleans()) else draw(_size(48))
        residual = stride == 1 and cin == cout and draw(st.booleans())
    t = draw(st.sampled_from([1, 2, 3, 4, 6]))
    # The reference backend in float32 only: in float64 it is the reference itself
    # (in another layout), and torch's float64 depthwise convolutions on
    # channels_last or strided input are slow (seconds for a 13 x 11 block).
    backend = draw(st.sampled_from(BACKENDS))
    budget = MAX_HIDDEN_ELEMENTS // (cin * t)
    h = draw(_size(min(64, budget)))
    w = draw(_size(min(64, budget // h)))
    return Case(
        n=draw(st.integers(0, min(4, budget // (h * w)))), cin=cin, cout=cout, t=t,
        stride=stride, h=h, w=w, residual=residual,
        dtype=draw(st.sampled_from([torch.float32] if backend == "reference" else [torch.float32, torch.float64])),
        x_layout=draw(st.sampled_from(X_LAYOUTS)), gy_layout=draw(st.sampled_from(GY_LAYOUTS)),
        weights_strided=draw(st.booleans()), backend=backend, seed=draw(st.integers(0, 2**31 - 1)),
        dilation=draw(st.sampled_from([1, 1, 2, 4])), kernel=draw(st.sampled_from([3, 3, 5, 7])),
        activation=draw(st.sampled_from(["relu6", "relu"])))


# Cases that always run (also in the per-ISA subprocesses): the edges of the
# plan (1x1 images, one row or column, batch 0, one channel, Cin or hidden just
# past a vector width, stride 2 on odd and even sizes). A failure hypothesis
# finds and shrinks goes here too (none so far).
_F32, _F64 = torch.float32, torch.float64
REGRESSIONS = [
    Case(0, 4, 4, 6, 1, 3, 3, True, _F32, "nchw", "nchw", False, "cpu", 0),
    Case(3, 1, 1, 1, 1, 1, 1, True, _F32, "channel_slice", "broadcast", True, "cpu", 1),
    Case(2, 8, 16, 6, 2, 1, 1, False, _F64, "channels_last", "nchw", False, "cpu", 2),
    Case(1, 9, 17, 4, 2, 2, 63, False, _F32, "spatial_slice", "channels_last", True, "cpu", 3),
    Case(2, 17, 17, 1, 1, 64, 1, True, _F64, "permuted", "broadcast", False, "cpu", 4),
    Case(4, 3, 5, 3, 2, 7, 8, False, _F32, "broadcast", "channels_last", True, "cpu", 5),
    Case(1, 48, 48, 6, 1, 13, 11, True, _F32, "channels_last", "nchw", False, "cpu", 6),
    Case(2, 33, 7, 2, 2, 9, 64, False, _F64, "channel_slice", "nchw", True, "cpu", 7),
    Case(1, 5, 5, 1, 2, 64, 3, False, _F32, "nchw", "broadcast", False, "cpu", 8),
    # dilated: the taps' reach beyond the image, a residual, stride 2, t == 1
    Case(2, 6, 6, 6, 1, 5, 3, True, _F32, "channels_last", "nchw", True, "cpu", 9, dilation=4),
    Case(1, 7, 9, 3, 2, 17, 10, False, _F64, "spatial_slice", "broadcast", False, "cpu", 10, dilation=2),
    Case(3, 9, 9, 1, 1, 12, 12, True, _F32, "permuted", "channels_last", False, "cpu", 11, dilation=2),
    # 5x5 and 7x7, ReLU: taps reaching past small images, dilated, t == 1, residual
    Case(2, 6, 6, 6, 1, 4, 5, True, _F32, "channels_last", "nchw", False, "cpu", 12, kernel=5, activation="relu"),
    Case(1, 8, 12, 3, 2, 13, 9, False, _F64, "nchw", "channels_last", True, "cpu", 13, kernel=7),
    Case(3, 7, 7, 1, 1, 9, 11, True, _F32, "spatial_slice", "broadcast", False, "cpu", 14, kernel=7,
         activation="relu"),
    Case(2, 5, 9, 6, 2, 16, 7, False, _F32, "permuted", "nchw", True, "cpu", 15, dilation=2, kernel=5),
    Case(1, 12, 12, 4, 1, 6, 6, True, _F64, "channel_slice", "nchw", False, "cpu", 16, dilation=4, kernel=7,
         activation="relu"),
]


def _dyadic(t, bits, bound):
    """t rounded to a multiple of 2**-bits and clipped to [-bound, bound]."""
    scale = 2.0 ** bits
    return (t * scale).round().clamp(-bound * scale, bound * scale) / scale


def _tensors(case):
    """Dense float64 data of x (N, Cin, H, W) and the weights, and the output gradient.

    Float32 data are dyadic: x in 2**-a steps within +-8, weights and biases in 2**-b
    steps within +-2. With Cin <= 48 the expand sums stay within 2**10 in 2**-(a+b)
    steps. With ReLU6 the depthwise sums of k * k <= 49 taps stay within 2**10 in
    2**-(a+2b) steps; with ReLU (unbounded) within 2**17. (a, b) = (4, 6) at 3x3 with
    ReLU6 (2**8 there), (4, 5) at 5x5 and 7x7, (1, 3) with ReLU: at most 24 bits,
    exact in float32 in any order, with or without FMA."""
    g = torch.Generator().manual_seed(case.seed)
    hidden = case.cin * case.t
    x_bits, w_bits = (1, 3) if case.activation == "relu" else (4, 6) if case.kernel == 3 else (4, 5)

    def r(*shape, scale=1.0):
        v = scale * torch.randn(*shape, generator=g, dtype=torch.float64)
        return _dyadic(v, w_bits, 2.0) if case.dtype == torch.float32 else v

    if case.x_layout == "broadcast":  # one image, one row: the view repeats it
        x = 2 * torch.randn(1, case.cin, 1, case.w, generator=g, dtype=torch.float64)
    else:
        x = 2 * torch.randn(case.n, case.cin, case.h, case.w, generator=g, dtype=torch.float64)
    if case.dtype == torch.float32:
        x = _dyadic(x, x_bits, 8.0)
    weights = [r(hidden, case.cin, scale=0.5), r(hidden)] if case.t != 1 else [None, None]
    weights += [r(hidden, case.kernel, case.kernel, scale=0.5), r(hidden), r(case.cout, hidden, scale=0.3),
                r(case.cout)]
    ho, wo = ops.output_size(case.h, case.w, case.stride, case.dilation)
    gy = torch.randn(case.n, case.cout, ho, wo, generator=g, dtype=torch.float64)
    if case.gy_layout == "broadcast":  # as from y.sum(): stride 0 everywhere
        gy = torch.full((), 0.5, dtype=torch.float64).expand(case.n, case.cout, ho, wo)
    return x, weights, gy


def _layout_x(x, case):
    """x (case.dtype) in the case's memory layout, as a leaf that requires grad."""
    x = x.to(case.dtype)
    n, c, h, w = case.n, case.cin, case.h, case.w
    if case.x_layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif case.x_layout == "channel_slice":  # channels [2, 2 + C) of a wider channels_last tensor
        big = torch.zeros(n, c + 3, h, w, dtype=x.dtype).contiguous(memory_format=torch.channels_last)
        big[:, 2:c + 2] = x
        x = big[:, 2:c + 2]
    elif case.x_layout == "spatial_slice":  # every other row and column, storage offset too
        big = torch.zeros(n, c, 2 * h + 1, 2 * w + 1, dtype=x.dtype)
        big[:, :, 1::2, 1::2] = x
        x = big[:, :, 1::2, 1::2]
    elif case.x_layout == "permuted":  # memory order N, H, C, W
        x = x.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    elif case.x_layout == "broadcast":
        x = x.expand(n, c, h, w)
    return x.detach().requires_grad_()


def _layout_weight(wt, case):
    """A weight leaf; with case.weights_strided every other element along the last
    dimension of a tensor twice as wide (a non-contiguous view)."""
    if wt is None:
        return None
    wt = wt.to(case.dtype)
    if case.weights_strided:
        wider = torch.zeros(*wt.shape[:-1], 2 * wt.shape[-1], dtype=wt.dtype)
        wider[..., ::2] = wt
        wt = wider[..., ::2]
    return wt.detach().requires_grad_()


def _layout_gy(gy, case):
    gy = gy.to(case.dtype)
    if case.gy_layout == "channels_last":
        gy = gy.contiguous(memory_format=torch.channels_last)
    return gy


@contextlib.contextmanager
def _one_thread():
    """Runs the float64 reference on one thread: on a busy 2-core machine a tiny
    2-thread torch convolution can wait a thousand times its own time for a
    descheduled worker, which would eat the fuzzer's deadline; the kernel under
    test keeps torch's thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _note(text):
    if currently_in_test_context():  # shown with a hypothesis failure
        note(text)


def check_case(case: Case):
    _note(str(case))
    x64, w64, gy64 = _tensors(case)
    x = _layout_x(x64, case)
    weights = [_layout_weight(wt, case) for wt in w64]
    gy = _layout_gy(gy64, case)
    if case.x_layout not in ("nchw", "channels_last") and min(case.n, case.cin, case.h, case.w) > 1:
        assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    assert weights[2].is_contiguous() != case.weights_strided  # w_dw (hidden, k, k)

    y = ops.fused_inverted_residual(x, *weights, case.stride, case.residual, backend=case.backend,
                                    dilation=case.dilation, activation=case.activation)
    ho, wo = ops.output_size(case.h, case.w, case.stride, case.dilation)
    assert y.shape == (case.n, case.cout, ho, wo) and y.dtype == case.dtype
    if case.backend == "cpu" and case.x_layout in ("nchw", "channels_last"):
        # x's memory format (NCHW where both hold, as ATen's suggest_memory_format)
        if x.is_contiguous():
            assert y.is_contiguous()
        else:
            assert y.is_contiguous(memory_format=torch.channels_last)
    y.backward(gy)

    # the float64 reference on exactly the values the kernel saw
    ref_args = [x.detach().double().contiguous().requires_grad_()]
    ref_args += [None if wt is None else wt.detach().double().contiguous().requires_grad_() for wt in weights]
    with _one_thread():
        y_ref = reference.inverted_residual(*ref_args, case.stride, case.residual, case.dilation, case.activation)
        y_ref.backward(gy.double().contiguous())

    out_tol, grad_tol = TOLERANCES[case.dtype]
    errors = {"output": rel_err(y, y_ref)}
    for name, leaf, ref in zip(NAMES, [x] + weights, ref_args):
        if leaf is None:
            continue
        assert leaf.grad is not None and leaf.grad.shape == leaf.shape and leaf.grad.dtype == case.dtype, name
        errors[f"grad {name}"] = rel_err(leaf.grad, ref.grad)
    _note(f"errors: {errors}")
    limits = {k: (out_tol if k == "output" else grad_tol) for k in errors}
    bad = {k: v for k, v in errors.items() if not v <= limits[k]}  # `not <=`: NaN fails too
    assert not bad, f"{case}: {bad} (limits {out_tol:g} / {grad_tol:g})"


@pytest.mark.parametrize("case", REGRESSIONS, ids=str)
def test_regressions(case):
    check_case(case)


@pytest.mark.parametrize("case", [dataclasses.replace(c, backend="reference", dtype=torch.float32)
                                  for c in REGRESSIONS[:3]], ids=str)
def test_regressions_reference_backend(case):
    if os.environ.get(CHILD_ENV):
        pytest.skip("the reference backend does not depend on the CPU ISA")
    check_case(case)


@given(case=cases())
def test_block_matches_reference(case):
    check_case(case)


def test_isa_is_the_one_asked_for():
    """Without MNV2_CPU_ISA the kernels are the best ISA this CPU runs (the last of the
    runnable ones, in the order of preference); with it, exactly the one named, each
    checked in a process of its own (the path is chosen once per process); and a name
    that is no ISA is an error that lists the valid ones."""
    info = mnv2_kernels.build_info()
    if not info["extension"]:
        pytest.skip("no compiled extension")
    runnable = info["cpu_isas_runnable"]
    if not os.environ.get("MNV2_CPU_ISA"):
        assert mnv2_kernels.cpu_isa() == runnable[-1]
    for isa in [*runnable, "no-such-isa"]:
        proc = subprocess.run([sys.executable, "-c", "import mnv2_kernels; print(mnv2_kernels.cpu_isa())"],
                              env=dict(os.environ, MNV2_CPU_ISA=isa), capture_output=True, text=True)
        if isa == "no-such-isa":
            message = [line for line in proc.stderr.splitlines() if f"MNV2_CPU_ISA={isa} is not one of" in line]
            assert proc.returncode != 0 and message, proc.stderr[-2000:]
            assert all(name in message[0] for name in info["cpu_isas_compiled"]), message
        else:
            assert proc.returncode == 0 and proc.stdout.split()[-1] == isa, proc.stderr[-2000:]


def _other_isas():
    if os.environ.get(CHILD_ENV) or not mnv2_kernels.build_info()["extension"]:
        return []
    return [isa for isa in mnv2_kernels.build_info()["cpu_isas_runnable"] if isa != mnv2_kernels.cpu_isa()]


@pytest.mark.parametrize("isa", _other_isas())
def test_fuzz_other_cpu_isas(isa):
    """The same tests on every other ISA path this CPU runs, in a process of its
    own (the path is chosen once per process), with the same hypothesis profile."""
    env = dict(os.environ, MNV2_CPU_ISA=isa, **{CHILD_ENV: "1"})
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", os.path.abspath(__file__)],
        env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"MNV2_CPU_ISA={isa}:\n{proc.stdout[-8000:]}\n{proc.stderr[-2000:]}"
