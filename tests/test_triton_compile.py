"""Ahead-of-time compiles of the Triton kernels for the A100 (sm_80) and H100 (sm_90), here
without a GPU (tests/triton_aot.py): the kernels as the real host launchers specialise
them must compile for both targets. The interpreter (tests/triton) checks their results
but cannot see a compile error: there every scalar argument is a tensor, where on a GPU
an integer equal to 1 arrives as a constant."""

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("compiles for a GPU target: run without TRITON_INTERPRET", allow_module_level=True)
pytest.importorskip("triton")

from triton_aot import block_args, compile_launch, recorded_launches  # noqa: E402

from mnv2_kernels.triton_kernels import fused_ir  # noqa: E402

CAPABILITIES = (80, 90)
N_SPLITS_ARG = 12  # _moments_kernel(x, w_expand, b_expand, w_dw, part, N, H, W, HO, WO, CIN, HID, N_SPLITS, ...)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("capability", CAPABILITIES)
def test_statistics_kernel_with_one_split_compiles(capability, dtype):
    """Train-mode statistics over a single (image, tile) item (batch 1, an output of one
    tile, as blocks 14-17 at batch 1): the launcher uses one split, which Triton turns into
    a constant."""
    args = block_args(1, 16, 96, 24, 1, 5, 5, dtype, channels_last=True)
    with recorded_launches() as launches:
        fused_ir.moments(args[0], args[1], args[2], args[3], 1)
    (launch,) = launches
    assert launch.kernel == "_moments_kernel" and launch.args[N_SPLITS_ARG] == 1
    report = compile_launch(launch, launch.configs()[0], capability)
    assert report.registers is not None


# Awkward blocks: sides and channel counts of 1, no expand, batch 1 and 2, both layouts.
EDGE_BLOCKS = [(16, 96, 16, 1), (24, 144, 40, 2), (8, 8, 8, 1), (1, 6, 1, 1)]
EDGE_SIZES = [(1, 1), (5, 3)]


def _edge_launches(dtype):
    """Every distinct specialisation the launchers make for the awkward blocks (forward,
    backward, statistics and their backward), with the default config."""
    seen, unique = set(), []
    for cin, hidden, cout, stride in EDGE_BLOCKS:
        for h, w in EDGE_SIZES:
            for n in (1, 2):
                for channels_last in (True, False):
                    args = block_args(n, cin, hidden, cout, stride, h, w, dtype, channels_last)
                    ho, wo = fused_ir.output_size(h, w, stride)
                    gy = torch.randn(n, cout, ho, wo).to(dtype)
                    if channels_last:
                        gy = gy.contiguous(memory_format=torch.channels_last)
                    with recorded_launches() as launches:
                        fused_ir.forward(*args)
                        fused_ir.backward(gy, *args)
                        fused_ir.moments(args[0], args[1], args[2], args[3], stride)
                        fused_ir.moments_backward(args[0], args[1], args[2], args[3], stride,
                                                  torch.randn(hidden), torch.randn(hidden))
                    for launch in launches:
                        key = (launch.kernel, _signature_key(launch))
                        if key not in seen:
                            seen.add(key)
                            unique.append(launch)
    return unique


def _signature_key(launch):
    """What the specialisation depends on: each argument's value class (1, multiple of 16,
    other) or dtype, and the constexprs."""
    parts = []
    for a in launch.args:
        if isinstance(a, torch.Tensor):
            parts.append(str(a.dtype))
        elif isinstance(a, bool) or not isinstance(a, int):
            parts.append(repr(a))
        else:
            parts.append("1" if a == 1 else "16n" if a % 16 == 0 else "int")
    return tuple(parts) + tuple(sorted((k, repr(v)) for k, v in launch.kwargs.items()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_awkward_specialisations_compile_for_sm90(dtype):
    failures = []
    launches = _edge_launches(dtype)
    for launch in launches:
        try:
            compile_launch(launch, launch.configs()[0], 90, ptxas_report=False)
        except Exception as exc:  # noqa: BLE001 - every failure is reported below
            failures.append((launch.kernel, type(exc).__name__, str(exc).strip().splitlines()[-1][:200]))
    assert not failures, f"{len(failures)} of {len(launches)} specialisations do not compile: {failures[:5]}"


# Representative MobileNetV2 blocks (Cin, hidden, Cout, stride, side, batch): the first
# two, a wide early one, a middle one, the last stride-2 and the last.
BLOCKS = {"32-32-16 s1 112": (32, 32, 16, 1, 112, 32), "16-96-24 s2 112": (16, 96, 24, 2, 112, 32),
          "24-144-24 s1 56": (24, 144, 24, 1, 56, 64), "64-384-64 s1 14": (64, 384, 64, 1, 14, 64),
          "96-576-160 s2 14": (96, 576, 160, 2, 14, 64), "160-960-320 s1 7": (160, 960, 320, 1, 7, 64)}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_default_configs_do_not_spill_16bit(dtype):
    """Every kernel's default config, as launched for each block (forward, backward,
    statistics), for sm_90: no register spills, shared memory within the H100's limit."""
    from triton_aot import SHARED_LIMIT

    rows, bad = [], []
    for name, (cin, hidden, cout, stride, side, n) in BLOCKS.items():
        args = block_args(n, cin, hidden, cout, stride, side, side, dtype, channels_last=True)
        out = fused_ir.output_size(side, side, stride)
        gy = torch.randn(n, cout, *out).to(dtype).contiguous(memory_format=torch.channels_last)
        with recorded_launches() as launches:
            fused_ir.forward(*args)
            fused_ir.backward(gy, *args)
            fused_ir.moments(args[0], args[1], args[2], args[3], stride)
        for launch in launches:
            r = compile_launch(launch, launch.configs()[0], 90)
            rows.append(f"{name:18} {launch.kernel:19} regs {r.registers} spills {r.spill_bytes} B "
                        f"stack {r.stack_bytes} B shared {r.shared_bytes} B")
            if r.spill_bytes or r.shared_bytes > SHARED_LIMIT[90]:
                bad.append(rows[-1])
    print("\n".join(rows))
    assert not bad, "\n".join(bad)


def test_forward_grid_launches_any_batch():
    """CUDA grids stop at 65535 programs on axes 1 and 2: the batch must not sit there."""
    args = block_args(70000, 8, 48, 8, 1, 1, 1, torch.float16, channels_last=True)
    with recorded_launches() as launches:
        fused_ir.forward(*args)
    (launch,) = launches
    grid = launch.grid(launch.configs()[0].all_kwargs())
    assert grid[0] >= 70000 and grid[0] < 2**31 and all(g <= 65535 for g in grid[1:]), grid
