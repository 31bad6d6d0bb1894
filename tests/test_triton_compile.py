"""Ahead-of-time compiles of the Triton kernels for the A100 (sm_80) and H100 (sm_90), here
without a GPU (tests/triton_aot.py): the kernels as the real host launchers specialise
them must compile for both targets, without register spills and within the target's
shared memory. The interpreter (tests/triton) checks their results but cannot see a compile
error (there every scalar argument is a tensor, where on a GPU an integer equal to 1
arrives as a constant) nor a spill.

Each test prints its table (kernel, shape, config, registers, spills, stack, shared
memory) with ``pytest -s``, and on failure in the assertion message."""

import multiprocessing
import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("compiles for a GPU target: run without TRITON_INTERPRET", allow_module_level=True)
pytest.importorskip("triton")

from conftest import BLOCK_SHAPES  # noqa: E402
from triton_aot import SHARED_LIMIT, block_args, compile_launch, recorded_launches  # noqa: E402

from mnv2_kernels.triton_kernels import fused_ir  # noqa: E402

CAPABILITIES = (80, 90)
N_SPLITS_ARG = 12  # _moments_kernel(x, w_expand, b_expand, w_dw, part, N, H, W, HO, WO, CIN, HID, N_SPLITS, ...)


def _block_launches(n, cin, hidden, cout, stride, h, w, dtype, channels_last, dilation=1, kernel_size=3,
                    activation="relu6"):
    """Every launch of the forward, the backward, the statistics and their backward for one block."""
    args = block_args(n, cin, hidden, cout, stride, h, w, dtype, channels_last, dilation, kernel_size, activation)
    ho, wo = fused_ir.output_size(h, w, stride, dilation, kernel_size=kernel_size)
    gy = torch.randn(n, cout, ho, wo).to(dtype)
    if channels_last:
        gy = gy.contiguous(memory_format=torch.channels_last)
    with recorded_launches() as launches:
        fused_ir.forward(*args)
        fused_ir.backward(gy, *args)
        fused_ir.moments(args[0], args[1], args[2], args[3], stride, dilation, activation)
        fused_ir.moments_backward(args[0], args[1], args[2], args[3], stride, torch.randn(hidden),
                                  torch.randn(hidden), dilation, activation)
    return launches


def _signature_key(launch):
    """What a compile depends on: each argument's value class (1, multiple of 16, other;
    one class for the integers the kernel does not specialise on) or dtype, and the
    constexprs."""
    parts = []
    for param, a in zip(launch.autotuner.fn.params, launch.args):
        if isinstance(a, torch.Tensor):
            parts.append(str(a.dtype))
        elif isinstance(a, bool) or not isinstance(a, int):
            parts.append(repr(a))
        elif param.do_not_specialize:
            parts.append("int")
        else:
            parts.append("1" if a == 1 else "16n" if a % 16 == 0 else "int")
    return (launch.kernel,) + tuple(parts) + tuple(sorted((k, repr(v)) for k, v in launch.kwargs.items()))


# (block..., channels_last): MobileNetV2's 17 blocks at 224x224 (batch 64), channels_last
# (a layout changes strides, not the kernel's code); the awkward ones: sides and channel
# counts of 1, no expand, a Cin over several expand slices, at batch 1 on a 1x1 image in
# channels_last and batch 2 on a 5x3 image in NCHW (the batch and the sides are not
# specialised on: other values give the same compiles).
def _mobilenet_blocks():
    for cin, cout, stride, t, side in dict.fromkeys(BLOCK_SHAPES):
        yield 64, cin, cin * t, cout, stride, side, side, True


AWKWARD = [(n, cin, hidden, cout, stride, h, w, channels_last)
           for cin, hidden, cout, stride in [(16, 96, 16, 1), (24, 144, 40, 2), (8, 8, 8, 1), (1, 6, 1, 1),
                                             (40, 80, 3, 2)]
           for n, (h, w), channels_last in [(1, (1, 1), True), (2, (5, 3), False)]]


def _jobs(dtype):
    """(launch, config, capability, label) of every distinct compile: the default configs on
    MobileNetV2's blocks and on the awkward ones, every config on the wide ones."""
    seen, jobs = set(), []

    def add(blocks, all_configs=False, dilation=1, kernel_size=3, activation="relu6"):
        for *block, channels_last in blocks:
            for launch in _block_launches(*block, dtype, channels_last, dilation, kernel_size, activation):
                for config in launch.configs() if all_configs else launch.configs()[:1]:
                    key = _signature_key(launch) + (str(config),)
                    if key in seen:
                        continue
                    seen.add(key)
                    kw = launch.kwargs
                    tile = f"{kw.get('TH', kw.get('TQH'))}x{kw.get('TW', kw.get('TQW'))}/{kw['BLOCK_H']}h"
                    label = (f"{launch.kernel:19} {'x'.join(map(str, block[1:4]))} s{block[4]}"
                             f"{f' d{dilation}' if dilation != 1 else ''}"
                             f"{f' k{kernel_size}' if kernel_size != 3 else ''}"
                             f"{f' {activation}' if activation != 'relu6' else ''} "
                             f"{block[5]}x{block[6]} n{block[0]}{'' if channels_last else ' nchw'} {tile} "
                             f"w{config.num_warps}s{config.num_stages}")
                    for cap in CAPABILITIES:
                        jobs.append((launch, config, cap, label))

    add(_mobilenet_blocks())
    add(AWKWARD)
    add(WIDE, all_configs=True)
    for block, dilation in DILATED:
        add([block], dilation=dilation)
    for block, kernel_size, activation in FAMILY:
        add([block], kernel_size=kernel_size, activation=activation)
    return jobs


_JOBS = []


def _compile(i):
    launch, config, cap, label = _JOBS[i]
    try:
        r = compile_launch(launch, config, cap)
    except Exception as exc:  # noqa: BLE001 - every failure is reported in the table
        return (f"sm{cap} {label} DOES NOT COMPILE: {type(exc).__name__}: "
                f"{str(exc).strip().splitlines()[-1][:160]}"), "error"
    if r.registers is None or r.shared_bytes > SHARED_LIMIT[cap]:
        verdict = "error"
    elif r.spill_bytes or r.stack_bytes:
        verdict = "spill"
    else:
        verdict = "ok"
    return (f"sm{cap} {label} regs {r.registers} spills {r.spill_bytes} B stack {r.stack_bytes} B "
            f"shared {r.shared_bytes} B"), verdict


def _compile_all(jobs):
    """Compiles the jobs in processes forked from this one (they inherit the recorded
    launches), one per core."""
    global _JOBS
    _JOBS = jobs
    workers = max(1, min(len(os.sched_getaffinity(0)), 16))
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        return pool.map(_compile, range(len(jobs)), chunksize=1)


def _worst(rows):
    """Per kernel: the largest registers, spills, stack and shared memory."""
    import re

    worst = {}
    for row, _ in rows:
        m = re.search(r"(_\w+_kernel).* regs (\d+) spills (\d+) B stack (\d+) B shared (\d+) B", row)
        if m:
            w = worst.setdefault(m.group(1), [0, 0, 0, 0])
            worst[m.group(1)] = [max(a, int(b)) for a, b in zip(w, m.groups()[1:])]
    return "\n".join(f"worst {k:19} regs {v[0]} spills {v[1]} B stack {v[2]} B shared {v[3]} B"
                     for k, v in sorted(worst.items()))


# Two wide blocks on which every autotune config (the pipeline stages; the host picks tiles and
# warps) must compile cleanly too.
WIDE = [(64, 96, 576, 160, 2, 14, 14, True), (64, 160, 960, 320, 1, 7, 7, True)]

# Dilated blocks, with their dilation: the dilated kernels (phases of a dilated lattice, see
# fused_ir) with the default configs. Two that Mobile DeepLabv3 dilates (output stride 8, a
# 513 x 513 crop), and a small odd dilation at stride 2 in NCHW (phases at stride 2, whose
# input-gradient tiles can start before the image).
DILATED = [((8, 96, 576, 96, 1, 65, 65, True), 2), ((8, 160, 960, 160, 1, 65, 65, True), 4),
           ((2, 16, 96, 24, 2, 13, 11, False), 3)]

# Blocks of the family with their depthwise kernel size and activation: the kernels of the 5x5
# and 7x7 depthwise steps (their larger halos, _halo_scale) and of ReLU with the default
# configs. EfficientNet-Lite0's 5x5 blocks 40 -> 240 -> 40 at 28 x 28 and 80 -> 480 -> 112 at
# 14 x 14, an MCUNet-like 7x7 block 48 -> 288 -> 48 at 14 x 14, and a 7x7 block at stride 2
# (the largest halos) with ReLU, in NCHW (whose float32 halos are the smallest).
FAMILY = [((64, 40, 240, 40, 1, 28, 28, True), 5, "relu6"), ((64, 80, 480, 112, 1, 14, 14, True), 5, "relu6"),
          ((64, 48, 288, 48, 1, 14, 14, True), 7, "relu6"), ((64, 24, 144, 40, 2, 28, 28, False), 7, "relu")]

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _rows(dtype):
    """The gate's table for ``dtype``: every compile's row and verdict, printed."""
    rows = _compile_all(_jobs(dtype))
    print(f"\n{str(dtype)}:\n" + "\n".join(row for row, _ in rows) + "\n" + _worst(rows))
    return rows


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernels_compile_without_spills(dtype):
    """Every kernel, as launched for MobileNetV2's 17 blocks, the awkward blocks, three dilated
    ones and four of the family (5x5 and 7x7 depthwise steps, ReLU), with its default config,
    and with every autotune config on two wide blocks, for sm_80 and sm_90:
    it compiles, spills no register, has no stack frame and fits the target's shared
    memory."""
    rows = _rows(dtype)
    bad = [row for row, verdict in rows if verdict != "ok"]
    assert not bad, f"{len(bad)} of {len(rows)} compiles fail the gate:\n" + "\n".join(bad) + "\n" + _worst(rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_statistics_kernel_with_one_split(dtype):
    """Train-mode statistics over a single (image, tile) item (batch 1, an output of one
    tile, as blocks 14-17 at batch 1): the launcher uses one split, which Triton would turn
    into a constant if the kernel specialised on it (it once failed to compile that way).
    Compiled here on its own, with the split count as the launcher passes it."""
    launches = _block_launches(1, 16, 96, 24, 1, 5, 5, dtype, channels_last=True)
    (moments,) = [launch for launch in launches if launch.kernel == "_moments_kernel"]
    assert moments.args[N_SPLITS_ARG] == 1
    report = compile_launch(moments, moments.configs()[0], 90)
    assert report.registers is not None and not report.spill_bytes


def test_forward_grid_launches_any_batch():
    """CUDA grids stop at 65535 programs on axes 1 and 2: the batch must not sit there."""
    args = block_args(70000, 8, 48, 8, 1, 1, 1, torch.float16, channels_last=True)
    with recorded_launches() as launches:
        fused_ir.forward(*args)
    (launch,) = launches
    grid = launch.grid(launch.configs()[0].all_kwargs()) if callable(launch.grid) else launch.grid
    assert grid[0] >= 70000 and grid[0] < 2**31 and all(g <= 65535 for g in grid[1:]), grid
