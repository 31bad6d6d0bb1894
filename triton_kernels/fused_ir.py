"""Triton kernels of the fused inverted-residual block.

Importing this module imports triton: set TRITON_INTERPRET=1 before that when
running on CPU tensors under the Triton interpreter.

Layout: every kernel addresses x, y, grad_y and grad_x through their actual
(n, c, h, w) strides, so NCHW-contiguous and channels_last tensors (and other
strides) work without copies. Channel dimensions are padded to powers of two
>= 16 (tl.dot's minimum) and masked. Accumulation is float32; for fp16/bf16
the dot operands stay in the input dtype.

Kernels
-------
* ``_fwd_kernel``: one program per (output tile TH x TW, image, Cout block of
  BLOCK_CO <= 64). Loops over hidden chunks of BLOCK_H channels; for each of
  the DW_TAPS depthwise taps (a runtime loop: unrolled, the pipeliner kept all
  DW_TAPS shifted input tiles in shared memory and wide layers ran out of it) it
  recomputes the expand of the shifted input pixels, tiled over Cin in
  BLOCK_CI slices (``_expand``; no scratch at all), then projects the chunk's
  a2 into the [P, BLOCK_CO] accumulator. Zero padding applies to a1.
* ``_bwd_weight_kernel``: chunk-stationary weight gradients. Grid
  (hidden chunks, splits); each program loops over a contiguous range of
  (image, output tile) items, recomputes z1/a1/z2/a2 of its chunk and
  accumulates the chunk's gradients of every weight and bias. Each program
  owns its [split, chunk] slice of float32 per-split partial buffers (the
  project-weight partial is accumulated there in place, one Cout block at a
  time, after the program zeroes its slice, so autotuning reruns are exact);
  the host reduces them with .sum(0): deterministic, no atomics.
* ``_bwd_input_kernel``: pixel-stationary input gradient (gather form). A
  persistent grid of about 4 programs per SM; a program owns an input tile Q
  per item, and for each hidden chunk computes g_z2 on the output halo O of Q
  (DW_TAPS expand recomputes on O) into its own scratch slot
  (nprog x |O| x BLOCK_H float32, far below the hidden tensor's size;
  tl.debug_barrier() around it), then gathers g_a1 on Q from the scratch,
  masks with relu6'(z1(Q)) and accumulates g_a1 @ w_expand[chunk] into the
  [Q, Cin] accumulator; + grad_y for the residual.

Nothing hidden-sized is ever allocated. grad_b_project is grad_y summed over
(N, H, W) in float32 by torch.

The depthwise convolution has DW_KERNEL x DW_KERNEL taps (DW_TAPS in all) and
zero padding DW_PAD; only 3x3 is built today. The kernels take the size as the
constexprs DW_KERNEL and DW_PAD, and the host code is written in terms of it.

Autotuning: a few configs per kernel keyed on the block shape; one config
under the interpreter or with MNV2_TRITON_AUTOTUNE=0 (read at import).
The interpreter's tl.dot mishandles bfloat16 (it multiplies the uint16 bit
patterns): under the interpreter only, bf16 dot operands are upcast to fp32.
"""

import os

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Set by the ahead-of-time compile checks (tests/triton_aot.py): the host launchers take CPU
# tensors and decide everything as for a GPU, while the checks record each launch instead
# of running it.
RECORDING = False

_TORCH_TO_TL_OK = (torch.float32, torch.float16, torch.bfloat16)

# The depthwise kernel size (see the module docstring).
DW_KERNEL = 3
DW_TAPS = DW_KERNEL * DW_KERNEL
DW_PAD = DW_KERNEL // 2
# The tap axis of the weight-gradient kernel's depthwise tiles: DW_TAPS padded
# to a power of two (tl.arange's length).
DW_TAPS_PAD = triton.next_power_of_2(DW_TAPS)


def _upcast(x):
    # The interpreter's tl.dot multiplies bfloat16 bit patterns (stored as uint16) as integers.
    return INTERPRET and x.dtype == torch.bfloat16


def _block_ci(cin, dtype):
    """Cin slice of the tiled expand dots (16 under the interpreter, to exercise the loop)."""
    if INTERPRET:
        return 16
    return min(_pad(cin), 32 if dtype == torch.float32 else 64)


def _pad(c):
    return max(16, triton.next_power_of_2(int(c)))


def output_size(h, w, stride):
    """Output height and width of the depthwise convolution (padding DW_PAD)."""
    return (h + 2 * DW_PAD - DW_KERNEL) // stride + 1, (w + 2 * DW_PAD - DW_KERNEL) // stride + 1


def _sm_count(device):
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2


# ---------------------------------------------------------------------------
# Autotune configurations (a single one under the interpreter).

# MNV2_TRITON_AUTOTUNE=0: one default config per kernel (no autotuning), as
# under the interpreter. Read at import.
AUTOTUNE = os.environ.get("MNV2_TRITON_AUTOTUNE", "1") != "0" and not INTERPRET


def _cfg(num_warps=4, num_stages=2, fp32=None, **meta):
    """A config; ``fp32`` True or False keeps it to float32 or to 16-bit inputs only (see
    configs_for), None to both."""
    cfg = triton.Config(meta, num_warps=num_warps, num_stages=num_stages)
    cfg.mnv2_fp32 = fp32
    return cfg


def configs_for(configs, kwargs):
    """The configs of ``configs`` meant for a launch with these keyword arguments (its
    IS_FP32): float32 operands take twice the registers of 16-bit ones, so some kernels
    have a default of their own for each. The autotuners prune with it before tuning."""
    fp32 = bool(kwargs.get("IS_FP32", False))
    kept = [c for c in configs if getattr(c, "mnv2_fp32", None) in (None, fp32)]
    return kept or list(configs)


_PRUNE = {"early_config_prune": lambda configs, named_args, **kwargs: configs_for(configs, kwargs)}


def _fwd_configs():
    if INTERPRET:
        return [_cfg(TH=4, TW=4, BLOCK_H=16, num_stages=1)]
    default = _cfg(TH=8, TW=8, BLOCK_H=32, num_warps=4, num_stages=2)
    if not AUTOTUNE:
        return [default]
    return [default,
            _cfg(TH=4, TW=8, BLOCK_H=32, num_warps=4, num_stages=2),
            _cfg(TH=4, TW=8, BLOCK_H=64, num_warps=4, num_stages=3),
            _cfg(TH=8, TW=8, BLOCK_H=16, num_warps=4, num_stages=3),
            _cfg(TH=8, TW=8, BLOCK_H=64, num_warps=8, num_stages=2),
            _cfg(TH=8, TW=16, BLOCK_H=32, num_warps=8, num_stages=2),
            _cfg(TH=8, TW=16, BLOCK_H=16, num_warps=8, num_stages=3),
            _cfg(TH=8, TW=8, BLOCK_H=32, num_warps=8, num_stages=3)]


def _bwdw_configs():
    if INTERPRET:
        return [_cfg(TH=4, TW=4, BLOCK_H=16, num_stages=1)]
    # a default per operand width (configs_for): 16-bit operands on eight warps, float32
    # ones in half-height hidden chunks; the others spilled at some MobileNetV2 shapes
    defaults = [_cfg(TH=4, TW=8, BLOCK_H=32, num_warps=8, num_stages=2, fp32=False),
                _cfg(TH=4, TW=8, BLOCK_H=16, num_warps=4, num_stages=2, fp32=True)]
    if not AUTOTUNE:
        return defaults
    return defaults + [
            _cfg(TH=8, TW=8, BLOCK_H=32, num_warps=8, num_stages=2),
            _cfg(TH=4, TW=8, BLOCK_H=32, num_warps=4, num_stages=2),
            _cfg(TH=4, TW=8, BLOCK_H=16, num_warps=4, num_stages=2),
            _cfg(TH=8, TW=8, BLOCK_H=16, num_warps=4, num_stages=2)]


def _bwdx_configs():
    if INTERPRET:
        return [_cfg(BLOCK_H=16, num_stages=1)]
    # eight warps: the register file of four spilled at most MobileNetV2 shapes
    default = _cfg(BLOCK_H=32, num_warps=8, num_stages=2)
    if not AUTOTUNE:
        return [default]
    return [default,
            _cfg(BLOCK_H=16, num_warps=4, num_stages=2),
            _cfg(BLOCK_H=32, num_warps=4, num_stages=2),
            _cfg(BLOCK_H=16, num_warps=8, num_stages=3)]


_KEY = ["CIN", "HID", "COUT", "H", "W", "STRIDE", "HAS_EXPAND", "RESIDUAL", "IS_FP32"]
_KEY_BWD = _KEY + ["MOMENTS"]

# Largest BLOCK_H of any input-gradient config (the scratch is sized for it).
_BWDX_MAX_BH = 16 if INTERPRET else 32


@triton.jit
def _dot(a, b, IS_FP32: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with float32 accumulation: full-precision fp32 ("ieee", no TF32);
    fp16/bf16 operands as they are. UPCAST (bf16 under the interpreter only,
    whose tl.dot multiplies bf16 bit patterns as integers) computes in fp32
    instead, which is exact for bf16 products."""
    if IS_FP32:
        r = tl.dot(a, b, input_precision="ieee")
    elif UPCAST:
        r = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        r = tl.dot(a, b)
    return r


@triton.jit
def _expand(x_base, pix, inb, w_expand_ptr, hh, h_mask, CIN, sxc, IS_FP32: tl.constexpr, UPCAST: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_CI: tl.constexpr):
    """z1 (no bias) [BLOCK_M, BLOCK_H] = x[pixels pix, masked by inb] @ w_expand[hh]^T, tiled
    over Cin in BLOCK_CI slices (bounded shared memory for any Cin)."""
    z1 = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
    for k0 in range(0, CIN, BLOCK_CI):
        ck = k0 + tl.arange(0, BLOCK_CI)
        ck_mask = ck < CIN
        # (every channel offset in int64, as the pixel offsets: an NCHW image of more than
        # 2^31 elements would wrap in int32)
        xt = tl.load(x_base + pix[:, None] + ck.to(tl.int64)[None, :] * sxc,
                     mask=inb[:, None] & ck_mask[None, :], other=0.0)
        w_expand_k = tl.load(w_expand_ptr + hh[None, :] * CIN + ck[:, None],
                             mask=ck_mask[:, None] & h_mask[None, :], other=0.0)
        z1 += _dot(xt, w_expand_k, IS_FP32, UPCAST)
    return z1


@triton.jit
def _relu6(z):
    return tl.minimum(tl.maximum(z, 0.0, propagate_nan=tl.PropagateNan.ALL), 6.0,
                      propagate_nan=tl.PropagateNan.ALL)

@triton.jit
def _tap_a1(x_base, oh, ow, valid, tap, H, W, sxh, sxw, sxc, w_expand_ptr, b_expand_ptr, hh, h_mask, CIN,
            STRIDE: tl.constexpr, DW_KERNEL: tl.constexpr, DW_PAD: tl.constexpr, HAS_EXPAND: tl.constexpr,
            IS_FP32: tl.constexpr, UPCAST: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_CI: tl.constexpr):
    """a1 [BLOCK_M, BLOCK_H] at depthwise tap `tap` of the output pixels (oh, ow): relu6 of
    the expand (t > 1) or x itself (t == 1), exactly zero outside the image (the zero
    padding applies to a1, not to x)."""
    ih = oh * STRIDE + (tap // DW_KERNEL - DW_PAD)
    iw = ow * STRIDE + (tap % DW_KERNEL - DW_PAD)
    inb = valid & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    pix = ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
    if HAS_EXPAND:
        b_expand = tl.load(b_expand_ptr + hh, mask=h_mask, other=0.0).to(tl.float32)
        z1 = _expand(x_base, pix, inb, w_expand_ptr, hh, h_mask, CIN, sxc, IS_FP32, UPCAST,
                     BLOCK_M, BLOCK_H, BLOCK_CI)
        a1 = tl.where(inb[:, None] & h_mask[None, :], _relu6(z1 + b_expand[None, :]), 0.0)
    else:
        a1 = tl.load(x_base + pix[:, None] + hh.to(tl.int64)[None, :] * sxc,
                     mask=inb[:, None] & h_mask[None, :], other=0.0).to(tl.float32)
    return a1


@triton.jit
def _depthwise(x_base, oh, ow, valid, H, W, sxh, sxw, sxc, w_expand_ptr, b_expand_ptr, w_dw_ptr, hh, h_mask,
               CIN, STRIDE: tl.constexpr, DW_KERNEL: tl.constexpr, DW_PAD: tl.constexpr,
               HAS_EXPAND: tl.constexpr, IS_FP32: tl.constexpr, UPCAST: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_CI: tl.constexpr):
    """The depthwise DW_KERNEL x DW_KERNEL convolution of a1, without bias, [BLOCK_M, BLOCK_H]
    at the output pixels (oh, ow), a1 recomputed tap by tap (_tap_a1). A runtime tap loop (not
    unrolled): an unrolled one lets the pipeliner keep all DW_TAPS shifted input tiles in
    shared memory at once."""
    DW_TAPS: tl.constexpr = DW_KERNEL * DW_KERNEL
    acc = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
    for tap in range(DW_TAPS):
        a1 = _tap_a1(x_base, oh, ow, valid, tap, H, W, sxh, sxw, sxc, w_expand_ptr, b_expand_ptr, hh, h_mask,
                     CIN, STRIDE, DW_KERNEL, DW_PAD, HAS_EXPAND, IS_FP32, UPCAST, BLOCK_M, BLOCK_H, BLOCK_CI)
        w_dw_tap = tl.load(w_dw_ptr + hh * DW_TAPS + tap, mask=h_mask, other=0.0).to(tl.float32)
        acc += a1 * w_dw_tap[None, :]
    return acc


@triton.jit
def _split_items(N, HO, WO, N_SPLITS, split, TH: tl.constexpr, TW: tl.constexpr):
    """(n_tw, n_tiles, start, end): split `split`'s contiguous range [start, end) of the
    N x (output tiles of TH x TW) items."""
    n_tw = tl.cdiv(WO, TW)
    n_tiles = tl.cdiv(HO, TH) * n_tw
    total = N * n_tiles
    per = tl.cdiv(total, N_SPLITS)
    start = split * per
    end = tl.minimum(start + per, total)
    return n_tw, n_tiles, start, end


@triton.jit
def _item_tile(item, n_tw, n_tiles, p, HO, WO, TH: tl.constexpr, TW: tl.constexpr):
    """(image n as int64, oh, ow, p_mask) of an item of _split_items."""
    n = (item // n_tiles).to(tl.int64)
    t = item % n_tiles
    oh = (t // n_tw) * TH + p // TW
    ow = (t % n_tw) * TW + p % TW
    return n, oh, ow, (oh < HO) & (ow < WO)


# ---------------------------------------------------------------------------
# Forward.

@triton.autotune(configs=_fwd_configs(), key=_KEY)
@triton.jit
def _fwd_kernel(
    x_ptr, w_expand_ptr, b_expand_ptr, w_dw_ptr, b_dw_ptr, w_project_ptr, b_project_ptr, y_ptr,
    H, W, HO, WO, CIN, HID, COUT,
    sxn, sxc, sxh, sxw, syn, syc, syh, syw,
    STRIDE: tl.constexpr, HAS_EXPAND: tl.constexpr, RESIDUAL: tl.constexpr, IS_FP32: tl.constexpr, UPCAST: tl.constexpr,
    DW_KERNEL: tl.constexpr, DW_PAD: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr,
    TH: tl.constexpr, TW: tl.constexpr, BLOCK_H: tl.constexpr,
):
    BLOCK_P: tl.constexpr = TH * TW
    # Grid (images x tiles, Cout blocks): the batch shares axis 0 (up to 2^31 - 1
    # programs) with the tiles, so that any batch launches (axes 1 and 2 stop at 65535).
    n_tw = tl.cdiv(WO, TW)
    n_tiles = tl.cdiv(HO, TH) * n_tw
    pid = tl.program_id(0)
    n = (pid // n_tiles).to(tl.int64)
    pid_t = pid % n_tiles
    pid_co = tl.program_id(1)
    th_i = pid_t // n_tw
    tw_i = pid_t % n_tw
    p = tl.arange(0, BLOCK_P)
    oh = th_i * TH + p // TW
    ow = tw_i * TW + p % TW
    p_mask = (oh < HO) & (ow < WO)
    co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_mask = co < COUT
    dt = x_ptr.dtype.element_ty
    x_base = x_ptr + n * sxn

    acc_y = tl.zeros([BLOCK_P, BLOCK_CO], dtype=tl.float32)
    for h0 in range(0, HID, BLOCK_H):
        hh = h0 + tl.arange(0, BLOCK_H)
        h_mask = hh < HID
        acc_dw = _depthwise(x_base, oh, ow, p_mask, H, W, sxh, sxw, sxc, w_expand_ptr, b_expand_ptr, w_dw_ptr, hh,
                            h_mask, CIN, STRIDE, DW_KERNEL, DW_PAD, HAS_EXPAND, IS_FP32, UPCAST,
                            BLOCK_P, BLOCK_H, BLOCK_CI)
        b_dw = tl.load(b_dw_ptr + hh, mask=h_mask, other=0.0).to(tl.float32)
        a2 = _relu6(acc_dw + b_dw[None, :])
        # w_project^T chunk [BLOCK_H, BLOCK_CO]
        w_project_t = tl.load(w_project_ptr + co[None, :] * HID + hh[:, None],
                              mask=h_mask[:, None] & co_mask[None, :], other=0.0)
        acc_y += _dot(a2.to(dt), w_project_t, IS_FP32, UPCAST)

    b_project = tl.load(b_project_ptr + co, mask=co_mask, other=0.0).to(tl.float32)
    acc_y += b_project[None, :]
    out_mask = p_mask[:, None] & co_mask[None, :]
    if RESIDUAL:
        r = tl.load(x_base + (oh.to(tl.int64) * sxh + ow.to(tl.int64) * sxw)[:, None] + co.to(tl.int64)[None, :] * sxc,
                    mask=out_mask, other=0.0)
        acc_y += r.to(tl.float32)
    y_off = n * syn + (oh.to(tl.int64) * syh + ow.to(tl.int64) * syw)[:, None] + co.to(tl.int64)[None, :] * syc
    tl.store(y_ptr + y_off, acc_y.to(dt), mask=out_mask)


# ---------------------------------------------------------------------------
# Backward: weight gradients (chunk-stationary).

@triton.autotune(configs=_bwdw_configs(), key=_KEY_BWD, prune_configs_by=_PRUNE)
@triton.jit
def _bwd_weight_kernel(
    gy_ptr, x_ptr, w_expand_ptr, b_expand_ptr, w_dw_ptr, b_dw_ptr, w_project_ptr, alpha_ptr, beta_ptr,
    g_w_expand_ptr, g_b_expand_ptr, g_w_dw_ptr, g_b_dw_ptr, g_w_project_ptr,
    N, H, W, HO, WO, CIN, HID, COUT, N_SPLITS,
    sxn, sxc, sxh, sxw, sgn, sgc, sgh, sgw,
    STRIDE: tl.constexpr, HAS_EXPAND: tl.constexpr, RESIDUAL: tl.constexpr, IS_FP32: tl.constexpr, UPCAST: tl.constexpr,
    MOMENTS: tl.constexpr, DW_KERNEL: tl.constexpr, DW_PAD: tl.constexpr, DW_TAPS_PAD: tl.constexpr,
    CIN_PAD: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr,
    TH: tl.constexpr, TW: tl.constexpr, BLOCK_H: tl.constexpr,
):
    # Partial buffers (float32): g_w_expand [S, HID, CIN], g_b_expand [S, HID],
    # g_w_dw [S, HID, DW_TAPS], g_b_dw [S, HID], g_w_project [S, COUT, HID]. This
    # program owns [split, chunk] of each.
    # MOMENTS: the backward of the depthwise moments (train-mode bn2 statistics):
    # g_z2 = alpha + beta * z2 per channel (alpha_ptr, beta_ptr), no project step;
    # gy_ptr, w_project_ptr and g_w_project_ptr are not read.
    BLOCK_P: tl.constexpr = TH * TW
    DW_TAPS: tl.constexpr = DW_KERNEL * DW_KERNEL
    pid_h = tl.program_id(0)
    split = tl.program_id(1)
    dt = x_ptr.dtype.element_ty
    n_tw, n_tiles, start, end = _split_items(N, HO, WO, N_SPLITS, split, TH, TW)

    hh = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = hh < HID
    ci = tl.arange(0, CIN_PAD)
    ci_mask = ci < CIN
    p = tl.arange(0, BLOCK_P)
    taps = tl.arange(0, DW_TAPS_PAD)
    split64 = split.to(tl.int64)

    if HAS_EXPAND:
        w_expand_t = tl.load(w_expand_ptr + hh[None, :] * CIN + ci[:, None],
                             mask=ci_mask[:, None] & h_mask[None, :], other=0.0)
        b_expand = tl.load(b_expand_ptr + hh, mask=h_mask, other=0.0).to(tl.float32)
    b_dw = tl.load(b_dw_ptr + hh, mask=h_mask, other=0.0).to(tl.float32)
    # w_dw chunk as [DW_TAPS_PAD (taps, padded), BLOCK_H]
    w_dw_chunk = tl.load(w_dw_ptr + hh[None, :] * DW_TAPS + taps[:, None],
                         mask=(taps[:, None] < DW_TAPS) & h_mask[None, :], other=0.0).to(tl.float32)

    if MOMENTS:
        alpha = tl.load(alpha_ptr + hh, mask=h_mask, other=0.0).to(tl.float32)
        beta = tl.load(beta_ptr + hh, mask=h_mask, other=0.0).to(tl.float32)
    else:
        # Zero this program's slice of the project-weight partials (accumulated in
        # place below, one Cout block at a time), so that a rerun (autotuning) is exact.
        for co0 in range(0, COUT, BLOCK_CO):
            co = co0 + tl.arange(0, BLOCK_CO)
            co_mask = co < COUT
            tl.store(g_w_project_ptr + split64 * COUT * HID + co[:, None] * HID + hh[None, :],
                     tl.zeros([BLOCK_CO, BLOCK_H], dtype=tl.float32),
                     mask=co_mask[:, None] & h_mask[None, :])
        tl.debug_barrier()

    acc_g_w_expand = tl.zeros([BLOCK_H, CIN_PAD], dtype=tl.float32)
    acc_g_b_expand = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc_g_w_dw = tl.zeros([DW_TAPS_PAD, BLOCK_H], dtype=tl.float32)
    acc_g_b_dw = tl.zeros([BLOCK_H], dtype=tl.float32)

    for item in range(start, end):
        n, oh, ow, p_mask = _item_tile(item, n_tw, n_tiles, p, HO, WO, TH, TW)
        x_base = x_ptr + n * sxn
        gy_pix = n * sgn + oh.to(tl.int64) * sgh + ow.to(tl.int64) * sgw

        # z2 of the chunk on the tile
        z2 = _depthwise(x_base, oh, ow, p_mask, H, W, sxh, sxw, sxc, w_expand_ptr, b_expand_ptr, w_dw_ptr, hh,
                        h_mask, CIN, STRIDE, DW_KERNEL, DW_PAD, HAS_EXPAND, IS_FP32, UPCAST,
                        BLOCK_P, BLOCK_H, BLOCK_CI) + b_dw[None, :]
        if MOMENTS:
            g_z2 = tl.where(p_mask[:, None], alpha[None, :] + beta[None, :] * z2, 0.0)
        else:
            a2 = _relu6(z2)
            a2 = tl.where(p_mask[:, None], a2, 0.0)

            # g_a2 = g_y @ w_project[:, chunk]; g_w_project[:, chunk] += g_y^T @ a2
            g_a2 = tl.zeros([BLOCK_P, BLOCK_H], dtype=tl.float32)
            for co0 in range(0, COUT, BLOCK_CO):
                co = co0 + tl.arange(0, BLOCK_CO)
                co_mask = co < COUT
                gy = tl.load(gy_ptr + gy_pix[:, None] + co.to(tl.int64)[None, :] * sgc,
                             mask=p_mask[:, None] & co_mask[None, :], other=0.0)
                w_project_c = tl.load(w_project_ptr + co[:, None] * HID + hh[None, :],
                                      mask=co_mask[:, None] & h_mask[None, :], other=0.0)
                g_a2 += _dot(gy, w_project_c, IS_FP32, UPCAST)
                part = _dot(tl.trans(gy), a2.to(dt), IS_FP32, UPCAST)
                g_w_project_off = g_w_project_ptr + split64 * COUT * HID + co[:, None] * HID + hh[None, :]
                g_w_project_mask = co_mask[:, None] & h_mask[None, :]
                old = tl.load(g_w_project_off, mask=g_w_project_mask, other=0.0)
                tl.store(g_w_project_off, old + part, mask=g_w_project_mask)
                tl.debug_barrier()
            g_z2 = tl.where((z2 > 0.0) & (z2 < 6.0) & p_mask[:, None], g_a2, 0.0)
        acc_g_b_dw += tl.sum(g_z2, axis=0)

        for tap in range(DW_TAPS):
            ih = oh * STRIDE + (tap // DW_KERNEL - DW_PAD)
            iw = ow * STRIDE + (tap % DW_KERNEL - DW_PAD)
            inb = p_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            pix = ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
            w_dw_tap = tl.sum(tl.where(taps[:, None] == tap, w_dw_chunk, 0.0), axis=0)
            if HAS_EXPAND:
                xt = tl.load(x_base + pix[:, None] + ci.to(tl.int64)[None, :] * sxc,
                             mask=inb[:, None] & ci_mask[None, :], other=0.0)
                z1 = _dot(xt, w_expand_t, IS_FP32, UPCAST) + b_expand[None, :]
                a1 = tl.where(inb[:, None] & h_mask[None, :], _relu6(z1), 0.0)
                g_w_dw_tap = tl.sum(g_z2 * a1, axis=0)
                c = tl.where(inb[:, None] & (z1 > 0.0) & (z1 < 6.0), g_z2 * w_dw_tap[None, :], 0.0)
                acc_g_b_expand += tl.sum(c, axis=0)
                acc_g_w_expand += _dot(tl.trans(c.to(dt)), xt, IS_FP32, UPCAST)
            else:
                a1 = tl.load(x_base + pix[:, None] + hh.to(tl.int64)[None, :] * sxc,
                             mask=inb[:, None] & h_mask[None, :], other=0.0).to(tl.float32)
                g_w_dw_tap = tl.sum(g_z2 * a1, axis=0)
            acc_g_w_dw += tl.where(taps[:, None] == tap, g_w_dw_tap[None, :], 0.0)

    if HAS_EXPAND:
        tl.store(g_w_expand_ptr + split64 * HID * CIN + hh[:, None] * CIN + ci[None, :], acc_g_w_expand,
                 mask=h_mask[:, None] & ci_mask[None, :])
        tl.store(g_b_expand_ptr + split64 * HID + hh, acc_g_b_expand, mask=h_mask)
    tl.store(g_w_dw_ptr + split64 * HID * DW_TAPS + hh[None, :] * DW_TAPS + taps[:, None], acc_g_w_dw,
             mask=(taps[:, None] < DW_TAPS) & h_mask[None, :])
    tl.store(g_b_dw_ptr + split64 * HID + hh, acc_g_b_dw, mask=h_mask)


# ---------------------------------------------------------------------------
# Backward: input gradient (pixel-stationary, gather form with a per-program scratch).

@triton.autotune(configs=_bwdx_configs(), key=_KEY_BWD)
@triton.jit
def _bwd_input_kernel(
    gy_ptr, x_ptr, w_expand_ptr, b_expand_ptr, w_dw_ptr, b_dw_ptr, w_project_ptr, alpha_ptr, beta_ptr, gx_ptr,
    scratch_ptr,
    N, H, W, HO, WO, CIN, HID, COUT, NPROG,
    sxn, sxc, sxh, sxw, sgn, sgc, sgh, sgw, sdn, sdc, sdh, sdw,
    STRIDE: tl.constexpr, HAS_EXPAND: tl.constexpr, RESIDUAL: tl.constexpr, IS_FP32: tl.constexpr, UPCAST: tl.constexpr,
    MOMENTS: tl.constexpr, DW_KERNEL: tl.constexpr, DW_PAD: tl.constexpr,
    CIN_PAD: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr,
    TQH: tl.constexpr, TQW: tl.constexpr, OTH: tl.constexpr, OTW: tl.constexpr,
    BLOCK_O: tl.constexpr, SCRATCH_BH: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    # Input tile Q = [qh0, qh0+TQH) x [qw0, qw0+TQW); output halo O = OTH x OTW
    # pixels starting at (oh0, ow0) = (qh0-DW_PAD, qw0-DW_PAD) for stride 1 and
    # (ceil((qh0-DW_PAD)/2), ceil((qw0-DW_PAD)/2)) = (qh0/2 - DW_PAD//2, qw0/2 - DW_PAD//2)
    # for stride 2 (TQH, TQW even, so qh0 and qw0 are).
    BLOCK_Q: tl.constexpr = TQH * TQW
    DW_TAPS: tl.constexpr = DW_KERNEL * DW_KERNEL
    pid = tl.program_id(0)
    dt = x_ptr.dtype.element_ty
    n_tw = tl.cdiv(W, TQW)
    n_tiles = tl.cdiv(H, TQH) * n_tw
    total = N * n_tiles
    ci = tl.arange(0, CIN_PAD)
    ci_mask = ci < CIN
    q = tl.arange(0, BLOCK_Q)
    o = tl.arange(0, BLOCK_O)
    ol_h = o // OTW
    ol_w = o % OTW
    o_local = o < OTH * OTW
    scr = scratch_ptr + pid.to(tl.int64) * (BLOCK_O * SCRATCH_BH)
    hl = tl.arange(0, BLOCK_H)

    for item in range(pid, total, NPROG):
        n = (item // n_tiles).to(tl.int64)
        t = item % n_tiles
        qh0 = (t // n_tw) * TQH
        qw0 = (t % n_tw) * TQW
        qh = qh0 + q // TQW
        qw = qw0 + q % TQW
        q_mask = (qh < H) & (qw < W)
        if STRIDE == 1:
            oh = qh0 - DW_PAD + ol_h
            ow = qw0 - DW_PAD + ol_w
        else:
            oh = qh0 // 2 - DW_PAD // 2 + ol_h
            ow = qw0 // 2 - DW_PAD // 2 + ol_w
        o_mask = o_local & (oh >= 0) & (oh < HO) & (ow >= 0) & (ow < WO)
        x_base = x_ptr + n * sxn
        q_pix = qh.to(tl.int64) * sxh + qw.to(tl.int64) * sxw
        if HAS_EXPAND:
            acc_gx = tl.zeros([BLOCK_Q, CIN_PAD], dtype=tl.float32)
        gy_pix = n * sgn + oh.to(tl.int64) * sgh + ow.to(tl.int64) * sgw

        for h0 in range(0, HID, BLOCK_H):
            hh = h0 + hl
            h_mask = hh < HID
            if HAS_EXPAND:
                b_expand = tl.load(b_expand_ptr + hh, mask=h_mask, other=0.0).to(tl.float32)
            # z2 on O
            b_dw = tl.load(b_dw_ptr + hh, mask=h_mask, other=0.0).to(tl.float32)
            z2 = _depthwise(x_base, oh, ow, o_mask, H, W, sxh, sxw, sxc, w_expand_ptr, b_expand_ptr, w_dw_ptr, hh,
                            h_mask, CIN, STRIDE, DW_KERNEL, DW_PAD, HAS_EXPAND, IS_FP32, UPCAST,
                            BLOCK_O, BLOCK_H, BLOCK_CI) + b_dw[None, :]
            if MOMENTS:
                alpha = tl.load(alpha_ptr + hh, mask=h_mask, other=0.0).to(tl.float32)
                beta = tl.load(beta_ptr + hh, mask=h_mask, other=0.0).to(tl.float32)
                g_z2 = tl.where(o_mask[:, None], alpha[None, :] + beta[None, :] * z2, 0.0)
            else:
                # g_a2 on O
                g_a2 = tl.zeros([BLOCK_O, BLOCK_H], dtype=tl.float32)
                for co0 in range(0, COUT, BLOCK_CO):
                    co = co0 + tl.arange(0, BLOCK_CO)
                    co_mask = co < COUT
                    gy = tl.load(gy_ptr + gy_pix[:, None] + co.to(tl.int64)[None, :] * sgc,
                                 mask=o_mask[:, None] & co_mask[None, :], other=0.0)
                    w_project_c = tl.load(w_project_ptr + co[:, None] * HID + hh[None, :],
                                          mask=co_mask[:, None] & h_mask[None, :], other=0.0)
                    g_a2 += _dot(gy, w_project_c, IS_FP32, UPCAST)
                g_z2 = tl.where((z2 > 0.0) & (z2 < 6.0) & o_mask[:, None], g_a2, 0.0)
            tl.debug_barrier()  # the previous chunk's gather is done with the scratch
            tl.store(scr + o[:, None] * SCRATCH_BH + hl[None, :], g_z2)
            tl.debug_barrier()
            # gather g_a1 on Q
            g_a1 = tl.zeros([BLOCK_Q, BLOCK_H], dtype=tl.float32)
            for tap in range(DW_TAPS):
                dy = tap // DW_KERNEL
                dx = tap % DW_KERNEL
                if STRIDE == 1:
                    ph = qh + DW_PAD - dy
                    pw = qw + DW_PAD - dx
                    ok = q_mask & (ph >= 0) & (ph < HO) & (pw >= 0) & (pw < WO)
                    lh = ph - (qh0 - DW_PAD)
                    lw = pw - (qw0 - DW_PAD)
                else:
                    th2 = qh + DW_PAD - dy
                    tw2 = qw + DW_PAD - dx
                    ok = q_mask & (th2 >= 0) & (tw2 >= 0) & (th2 % 2 == 0) & (tw2 % 2 == 0)
                    ph = th2 // 2
                    pw = tw2 // 2
                    ok = ok & (ph < HO) & (pw < WO)
                    lh = ph - (qh0 // 2 - DW_PAD // 2)
                    lw = pw - (qw0 // 2 - DW_PAD // 2)
                ok = ok & (lh >= 0) & (lh < OTH) & (lw >= 0) & (lw < OTW)
                lidx = tl.where(ok, lh * OTW + lw, 0)
                gz = tl.load(scr + lidx[:, None] * SCRATCH_BH + hl[None, :],
                             mask=ok[:, None] & h_mask[None, :], other=0.0)
                w_dw_tap = tl.load(w_dw_ptr + hh * DW_TAPS + tap, mask=h_mask, other=0.0).to(tl.float32)
                g_a1 += gz * w_dw_tap[None, :]
            if HAS_EXPAND:
                z1q = _expand(x_base, q_pix, q_mask, w_expand_ptr, hh, h_mask, CIN, sxc, IS_FP32, UPCAST,
                              BLOCK_Q, BLOCK_H, BLOCK_CI) + b_expand[None, :]
                g_z1 = tl.where((z1q > 0.0) & (z1q < 6.0), g_a1, 0.0)
                # w_expand chunk [BLOCK_H, CIN_PAD]
                w_expand_c = tl.load(w_expand_ptr + hh[:, None] * CIN + ci[None, :],
                                     mask=h_mask[:, None] & ci_mask[None, :], other=0.0)
                acc_gx += _dot(g_z1.to(dt), w_expand_c, IS_FP32, UPCAST)
            else:
                m = q_mask[:, None] & h_mask[None, :]
                if RESIDUAL:
                    g_a1 += tl.load(gy_ptr + n * sgn + (qh.to(tl.int64) * sgh + qw.to(tl.int64) * sgw)[:, None]
                                    + hh.to(tl.int64)[None, :] * sgc, mask=m, other=0.0).to(tl.float32)
                tl.store(gx_ptr + n * sdn + (qh.to(tl.int64) * sdh + qw.to(tl.int64) * sdw)[:, None]
                         + hh.to(tl.int64)[None, :] * sdc, g_a1.to(dt), mask=m)
        if HAS_EXPAND:
            m = q_mask[:, None] & ci_mask[None, :]
            if RESIDUAL:
                acc_gx += tl.load(gy_ptr + n * sgn + (qh.to(tl.int64) * sgh + qw.to(tl.int64) * sgw)[:, None]
                                  + ci.to(tl.int64)[None, :] * sgc, mask=m, other=0.0).to(tl.float32)
            tl.store(gx_ptr + n * sdn + (qh.to(tl.int64) * sdh + qw.to(tl.int64) * sdw)[:, None]
                     + ci.to(tl.int64)[None, :] * sdc, acc_gx.to(dt), mask=m)
        tl.debug_barrier()


# ---------------------------------------------------------------------------
# Train-mode bn2 statistics: moments of the depthwise output (no bias).

def _moments_configs():
    if INTERPRET:
        return [_cfg(BLOCK_H=16, num_stages=1)]
    default = _cfg(BLOCK_H=32, num_warps=4, num_stages=2)
    if not AUTOTUNE:
        return [default]
    return [default, _cfg(BLOCK_H=16, num_warps=4, num_stages=2), _cfg(BLOCK_H=64, num_warps=8, num_stages=2)]


@triton.autotune(configs=_moments_configs(), key=["CIN", "HID", "H", "W", "STRIDE", "HAS_EXPAND", "IS_FP32"])
@triton.jit
def _moments_kernel(
    x_ptr, w_expand_ptr, b_expand_ptr, w_dw_ptr, part_ptr,
    N, H, W, HO, WO, CIN, HID, N_SPLITS,
    sxn, sxc, sxh, sxw,
    STRIDE: tl.constexpr, HAS_EXPAND: tl.constexpr, IS_FP32: tl.constexpr, UPCAST: tl.constexpr,
    DW_KERNEL: tl.constexpr, DW_PAD: tl.constexpr,
    BLOCK_CI: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr, BLOCK_H: tl.constexpr,
):
    # Grid (hidden chunks, splits). A program walks its contiguous range of (image, tile)
    # items, recomputes z2 of its chunk on each tile and merges the tile's (count, mean,
    # M2) into running ones (Chan et al.: no cancellation of sum-of-squares). It writes
    # part[0|1|2, split, chunk] = count, mean, M2 (float32).
    BLOCK_P: tl.constexpr = TH * TW
    pid_h = tl.program_id(0)
    split = tl.program_id(1)
    n_tw, n_tiles, start, end = _split_items(N, HO, WO, N_SPLITS, split, TH, TW)
    hh = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = hh < HID
    p = tl.arange(0, BLOCK_P)

    run_n = tl.zeros([BLOCK_H], dtype=tl.float32)
    run_mean = tl.zeros([BLOCK_H], dtype=tl.float32)
    run_m2 = tl.zeros([BLOCK_H], dtype=tl.float32)
    for item in range(start, end):
        n, oh, ow, p_mask = _item_tile(item, n_tw, n_tiles, p, HO, WO, TH, TW)
        z2 = _depthwise(x_ptr + n * sxn, oh, ow, p_mask, H, W, sxh, sxw, sxc, w_expand_ptr, b_expand_ptr, w_dw_ptr,
                        hh, h_mask, CIN, STRIDE, DW_KERNEL, DW_PAD, HAS_EXPAND, IS_FP32, UPCAST,
                        BLOCK_P, BLOCK_H, BLOCK_CI)
        cnt = tl.sum(p_mask.to(tl.float32), axis=0)  # >= 1: every tile holds an output pixel
        tile_mean = tl.sum(tl.where(p_mask[:, None], z2, 0.0), axis=0) / cnt
        d = tl.where(p_mask[:, None], z2 - tile_mean[None, :], 0.0)
        tile_m2 = tl.sum(d * d, axis=0)
        both = run_n + cnt
        delta = tile_mean - run_mean
        run_mean += delta * (cnt / both)
        run_m2 += tile_m2 + delta * delta * (run_n * cnt / both)
        run_n = both
    off = split.to(tl.int64) * HID + hh
    # (tl.cast, not .to: an argument equal to 1 arrives as a constexpr, which has no .to)
    plane = tl.cast(N_SPLITS, tl.int64) * HID
    tl.store(part_ptr + off, run_n, mask=h_mask)
    tl.store(part_ptr + plane + off, run_mean, mask=h_mask)
    tl.store(part_ptr + 2 * plane + off, run_m2, mask=h_mask)


# ---------------------------------------------------------------------------
# Host side.

def check_inputs(x, w_expand, b_expand, w_dw, b_dw, w_project, b_project, stride, residual, grad_y=None):
    """Validates the block's arguments; returns (hidden, cout). Raises ValueError/RuntimeError."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"mnv2 triton: x must be a 4-D tensor (N, C, H, W), got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x)}")
    if x.dtype not in _TORCH_TO_TL_OK:
        raise ValueError(f"mnv2 triton: dtype {x.dtype} is not supported (float32, float16, bfloat16)")
    if stride not in (1, 2):
        raise ValueError(f"mnv2 triton: stride must be 1 or 2, got {stride}")
    if (w_expand is None) != (b_expand is None):
        raise ValueError("mnv2 triton: w_expand and b_expand must be given together")
    for name, t in (("w_expand", w_expand), ("b_expand", b_expand), ("w_dw", w_dw), ("b_dw", b_dw),
                    ("w_project", w_project), ("b_project", b_project), ("grad_y", grad_y)):
        if t is None:
            continue
        if t.device != x.device or t.dtype != x.dtype:
            raise ValueError(f"mnv2 triton: {name} ({t.dtype} on {t.device}) must match x "
                             f"({x.dtype} on {x.device})")
    if x.device.type != "cuda" and not (INTERPRET or RECORDING):
        raise RuntimeError(f"mnv2 triton: tensors must be on a CUDA device (got {x.device}); "
                           "CPU tensors need TRITON_INTERPRET=1")
    if x.device.type != "cuda" and INTERPRET and x.device.type != "cpu":
        raise RuntimeError(f"mnv2 triton: unsupported device {x.device}")
    n, cin, h, w = x.shape
    if w_dw.dim() != 3 or tuple(w_dw.shape[1:]) != (DW_KERNEL, DW_KERNEL):
        raise ValueError(f"mnv2 triton: w_dw must be (hidden, {DW_KERNEL}, {DW_KERNEL}), got {tuple(w_dw.shape)}")
    hidden = w_dw.shape[0]
    if tuple(b_dw.shape) != (hidden,):
        raise ValueError(f"mnv2 triton: b_dw must be ({hidden},), got {tuple(b_dw.shape)}")
    if w_expand is not None:
        if tuple(w_expand.shape) != (hidden, cin):
            raise ValueError(f"mnv2 triton: w_expand must be ({hidden}, {cin}), got {tuple(w_expand.shape)}")
        if tuple(b_expand.shape) != (hidden,):
            raise ValueError(f"mnv2 triton: b_expand must be ({hidden},), got {tuple(b_expand.shape)}")
    elif hidden != cin:
        raise ValueError(f"mnv2 triton: without w_expand, w_dw must have Cin={cin} channels, got {hidden}")
    if w_project.dim() != 2 or w_project.shape[1] != hidden:
        raise ValueError(f"mnv2 triton: w_project must be (Cout, {hidden}), got {tuple(w_project.shape)}")
    cout = w_project.shape[0]
    if tuple(b_project.shape) != (cout,):
        raise ValueError(f"mnv2 triton: b_project must be ({cout},), got {tuple(b_project.shape)}")
    if residual and not (stride == 1 and cin == cout):
        raise ValueError("mnv2 triton: residual needs stride 1 and Cin == Cout")
    if min(cin, hidden, cout) < 1:
        raise ValueError(f"mnv2 triton: empty channel dimension: Cin {cin}, hidden {hidden}, Cout {cout}")
    if grad_y is not None:
        ho, wo = output_size(h, w, stride)
        if tuple(grad_y.shape) != (n, cout, ho, wo):
            raise ValueError(f"mnv2 triton: grad_y must be {(n, cout, ho, wo)}, got {tuple(grad_y.shape)}")
    return hidden, cout


def _memory_format(x):
    from torch._prims_common import suggest_memory_format
    return suggest_memory_format(x)


def _contig_w(t):
    return None if t is None else t.contiguous()


def output_like(x, cout, ho, wo):
    return torch.empty((x.shape[0], cout, ho, wo), dtype=x.dtype, device=x.device,
                       memory_format=_memory_format(x))


def _launch_forward(traceable, x, w_expand, b_expand, w_dw, b_dw, w_project, b_project, stride, residual, y):
    """Launches the forward kernel (through torch.library.wrap_triton when ``traceable``)."""
    n, cin, h, w = x.shape
    hidden, cout = w_dw.shape[0], w_project.shape[0]
    ho, wo = y.shape[2], y.shape[3]
    has_expand = w_expand is not None
    w_expand_arg = w_expand if has_expand else w_dw  # dummy pointer when t == 1 (never read)
    b_expand_arg = b_expand if has_expand else b_dw
    block_co = min(_pad(cout), 64)
    grid = lambda META: (n * triton.cdiv(ho, META["TH"]) * triton.cdiv(wo, META["TW"]),  # noqa: E731
                         triton.cdiv(cout, block_co))
    (wrap_triton(_fwd_kernel) if traceable else _fwd_kernel)[grid](
        x, w_expand_arg, b_expand_arg, w_dw, b_dw, w_project, b_project, y,
        h, w, ho, wo, cin, hidden, cout,
        x.stride(0), x.stride(1), x.stride(2), x.stride(3),
        y.stride(0), y.stride(1), y.stride(2), y.stride(3),
        STRIDE=stride, HAS_EXPAND=has_expand, RESIDUAL=bool(residual), IS_FP32=x.dtype == torch.float32, UPCAST=_upcast(x),
        DW_KERNEL=DW_KERNEL, DW_PAD=DW_PAD, BLOCK_CI=_block_ci(cin, x.dtype), BLOCK_CO=block_co,
    )
    return y


def forward(x, w_expand, b_expand, w_dw, b_dw, w_project, b_project, stride, residual, traceable=False):
    """The fused block (see mnv2_kernels.reference.inverted_residual); y in x's memory format."""
    check_inputs(x, w_expand, b_expand, w_dw, b_dw, w_project, b_project, stride, residual)
    w_expand, b_expand, w_dw, b_dw, w_project, b_project = map(
        _contig_w, (w_expand, b_expand, w_dw, b_dw, w_project, b_project))
    ho, wo = output_size(x.shape[2], x.shape[3], stride)
    y = output_like(x, w_project.shape[0], ho, wo)
    if y.numel() == 0:
        return y
    return _launch_forward(traceable, x, w_expand, b_expand, w_dw, b_dw, w_project, b_project,
                           stride, residual, y)


def _bwd_input_tile(stride, cin_pad):
    """(TQH, TQW, OTH, OTW, BLOCK_O) of the input-gradient kernel. The kernel
    keeps a [TQH*TQW, CIN_PAD] float32 accumulator in registers (whatever the input's
    dtype): smaller tiles for wide inputs."""
    if INTERPRET or cin_pad * 4 > 512:
        tqh, tqw = 4, 4
    else:
        tqh = tqw = 8
    if stride == 1:
        oth, otw = tqh + 2 * DW_PAD, tqw + 2 * DW_PAD
    else:
        oth, otw = tqh // 2 + DW_PAD, tqw // 2 + DW_PAD
    block_o = max(16, triton.next_power_of_2(oth * otw))
    return tqh, tqw, oth, otw, block_o


def backward(grad_y, x, w_expand, b_expand, w_dw, b_dw, w_project, b_project, stride, residual,
             traceable=False):
    """The 7 gradients (grad_x, grad_w_expand, grad_b_expand, grad_w_dw, grad_b_dw,
    grad_w_project, grad_b_project), in the input dtypes. Without w_expand,
    grad_w_expand is (0, 0) and grad_b_expand is (0,)."""
    hidden, cout = check_inputs(x, w_expand, b_expand, w_dw, b_dw, w_project, b_project, stride,
                                residual, grad_y=grad_y)
    w_expand, b_expand, w_dw, b_dw, w_project, b_project = map(
        _contig_w, (w_expand, b_expand, w_dw, b_dw, w_project, b_project))
    n, cin, h, w = x.shape
    has_expand = w_expand is not None
    dev = x.device
    if x.numel() == 0:  # empty batch (or image): every gradient is zero
        def z(*shape):
            return torch.zeros(shape, dtype=x.dtype, device=dev)
        return (torch.empty(x.shape, dtype=x.dtype, device=dev, memory_format=_memory_format(x)).zero_(),
                z(hidden, cin) if has_expand else z(0, 0), z(hidden) if has_expand else z(0),
                z(hidden, DW_KERNEL, DW_KERNEL), z(hidden), z(cout, hidden), z(cout))
    grad_x, g_w_expand_parts, g_b_expand_parts, g_w_dw_parts, g_b_dw_parts, g_w_project_parts = _launch_backward(
        traceable, grad_y, x, w_expand, b_expand, w_dw, b_dw, w_project, stride, residual, None)
    dt = x.dtype
    if has_expand:
        g_w_expand = g_w_expand_parts.sum(0).to(dt)
        g_b_expand = g_b_expand_parts.sum(0).to(dt)
    else:
        g_w_expand = x.new_empty((0, 0))
        g_b_expand = x.new_empty((0,))
    g_w_dw = g_w_dw_parts.sum(0).view(hidden, DW_KERNEL, DW_KERNEL).to(dt)
    g_b_dw = g_b_dw_parts.sum(0).to(dt)
    g_w_project = g_w_project_parts.sum(0).to(dt)
    g_b_project = grad_y.sum(dim=(0, 2, 3), dtype=torch.float32).to(dt)
    return grad_x, g_w_expand, g_b_expand, g_w_dw, g_b_dw, g_w_project, g_b_project


def _launch_backward(traceable, grad_y, x, w_expand, b_expand, w_dw, b_dw, w_project, stride, residual,
                     moments):
    """Launches the weight-gradient and input-gradient kernels; returns grad_x and the float32
    per-split partials of (g_w_expand, g_b_expand, g_w_dw, g_b_dw, g_w_project). ``moments`` =
    (alpha, beta): the backward of the depthwise moments instead (grad_y and w_project are then
    not read)."""
    n, cin, h, w = x.shape
    hidden, cout = w_dw.shape[0], w_project.shape[0]
    ho, wo = output_size(h, w, stride)
    has_expand = w_expand is not None
    w_expand_arg = w_expand if has_expand else w_dw
    b_expand_arg = b_expand if has_expand else b_dw
    alpha, beta = moments if moments is not None else (b_dw, b_dw)  # dummy pointers when not read
    dev = x.device
    f32 = torch.float32
    block_co = min(_pad(cout), 64)
    cin_pad = _pad(cin)
    block_ci = _block_ci(cin, x.dtype)
    is_fp32 = x.dtype == torch.float32
    sms = _sm_count(dev)

    # (a) weight gradients: about 4 programs per SM in total, at most ~4 items per
    # split (bounded by the number of (image, tile) items).
    n_chunks_min = triton.cdiv(hidden, 32 if not INTERPRET else 16)
    items_min = n * triton.cdiv(ho, 8) * triton.cdiv(wo, 8) if not INTERPRET else n * triton.cdiv(ho, 4) * triton.cdiv(wo, 4)
    n_splits = max(1, min(items_min, triton.cdiv(4 * sms, n_chunks_min), 64 if not INTERPRET else 2))
    he = hidden if has_expand else 1
    g_w_expand_parts = torch.empty((n_splits, he, cin if has_expand else 1), dtype=f32, device=dev)
    g_b_expand_parts = torch.empty((n_splits, he), dtype=f32, device=dev)
    g_w_dw_parts = torch.empty((n_splits, hidden, DW_TAPS), dtype=f32, device=dev)
    g_b_dw_parts = torch.empty((n_splits, hidden), dtype=f32, device=dev)
    g_w_project_parts = torch.empty((n_splits, cout, hidden), dtype=f32, device=dev)
    grid_w = lambda META: (triton.cdiv(hidden, META["BLOCK_H"]), n_splits)  # noqa: E731
    (wrap_triton(_bwd_weight_kernel) if traceable else _bwd_weight_kernel)[grid_w](
        grad_y, x, w_expand_arg, b_expand_arg, w_dw, b_dw, w_project, alpha, beta,
        g_w_expand_parts, g_b_expand_parts, g_w_dw_parts, g_b_dw_parts, g_w_project_parts,
        n, h, w, ho, wo, cin, hidden, cout, n_splits,
        x.stride(0), x.stride(1), x.stride(2), x.stride(3),
        grad_y.stride(0), grad_y.stride(1), grad_y.stride(2), grad_y.stride(3),
        STRIDE=stride, HAS_EXPAND=has_expand, RESIDUAL=bool(residual), IS_FP32=is_fp32, UPCAST=_upcast(x),
        MOMENTS=moments is not None, DW_KERNEL=DW_KERNEL, DW_PAD=DW_PAD, DW_TAPS_PAD=DW_TAPS_PAD,
        CIN_PAD=cin_pad, BLOCK_CI=block_ci, BLOCK_CO=block_co,
    )

    # (b) input gradient
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=dev, memory_format=_memory_format(x))
    tqh, tqw, oth, otw, block_o = _bwd_input_tile(stride, cin_pad)
    n_items = n * triton.cdiv(h, tqh) * triton.cdiv(w, tqw)
    nprog = max(1, min(n_items, 4 * sms if not INTERPRET else 2))
    scratch = torch.empty((nprog, block_o, _BWDX_MAX_BH), dtype=f32, device=dev)
    (wrap_triton(_bwd_input_kernel) if traceable else _bwd_input_kernel)[(nprog,)](
        grad_y, x, w_expand_arg, b_expand_arg, w_dw, b_dw, w_project, alpha, beta, grad_x, scratch,
        n, h, w, ho, wo, cin, hidden, cout, nprog,
        x.stride(0), x.stride(1), x.stride(2), x.stride(3),
        grad_y.stride(0), grad_y.stride(1), grad_y.stride(2), grad_y.stride(3),
        grad_x.stride(0), grad_x.stride(1), grad_x.stride(2), grad_x.stride(3),
        STRIDE=stride, HAS_EXPAND=has_expand, RESIDUAL=bool(residual), IS_FP32=is_fp32, UPCAST=_upcast(x),
        MOMENTS=moments is not None, DW_KERNEL=DW_KERNEL, DW_PAD=DW_PAD,
        CIN_PAD=cin_pad, BLOCK_CI=block_ci, BLOCK_CO=block_co,
        TQH=tqh, TQW=tqw, OTH=oth, OTW=otw, BLOCK_O=block_o, SCRATCH_BH=_BWDX_MAX_BH,
    )

    return grad_x, g_w_expand_parts, g_b_expand_parts, g_w_dw_parts, g_b_dw_parts, g_w_project_parts


def moments(x, w_expand, b_expand, w_dw, stride):
    """Train-mode bn2 statistics: the per-channel mean and biased variance (float32) of the
    depthwise output z2 = dw3x3(relu6(x @ w_expand^T + b_expand)) (no bias; z2 = dw3x3(x) when
    w_expand is None), streamed: per-program (count, mean, M2) partials merged with Chan's
    formula, then combined in float64 on the host. Nothing hidden-sized is stored."""
    _check_moments_inputs(x, w_expand, b_expand, w_dw, stride)
    n, cin, h, w = x.shape
    hidden = w_dw.shape[0]
    ho, wo = output_size(h, w, stride)
    w_expand, b_expand, w_dw = map(_contig_w, (w_expand, b_expand, w_dw))
    has_expand = w_expand is not None
    dev = x.device
    if n * ho * wo == 0:
        nan = torch.full((hidden,), float("nan"), dtype=torch.float32, device=dev)
        return nan, nan.clone()
    th = tw = 4 if INTERPRET else 8
    items = n * triton.cdiv(ho, th) * triton.cdiv(wo, tw)
    n_chunks_min = triton.cdiv(hidden, 16 if INTERPRET else 32)
    n_splits = max(1, min(items, triton.cdiv(4 * _sm_count(dev), n_chunks_min), 2 if INTERPRET else 256))
    part = torch.empty((3, n_splits, hidden), dtype=torch.float32, device=dev)
    grid = lambda META: (triton.cdiv(hidden, META["BLOCK_H"]), n_splits)  # noqa: E731
    _moments_kernel[grid](
        x, w_expand if has_expand else w_dw, b_expand if has_expand else w_dw, w_dw, part,
        n, h, w, ho, wo, cin, hidden, n_splits,
        x.stride(0), x.stride(1), x.stride(2), x.stride(3),
        STRIDE=stride, HAS_EXPAND=has_expand, IS_FP32=x.dtype == torch.float32, UPCAST=_upcast(x),
        DW_KERNEL=DW_KERNEL, DW_PAD=DW_PAD, BLOCK_CI=_block_ci(cin, x.dtype), TH=th, TW=tw,
    )
    cnt, mean_s, m2_s = part.double().unbind(0)
    total = cnt.sum(0)
    mean = (cnt * mean_s).sum(0) / total
    m2 = m2_s.sum(0) + (cnt * (mean_s - mean) ** 2).sum(0)
    return mean.float(), (m2 / total).float()


def moments_backward(x, w_expand, b_expand, w_dw, stride, alpha, beta):
    """Gradients (x, w_expand, b_expand, w_dw) of sum_c sum_pixels (alpha_c z2 + beta_c z2^2 / 2):
    the backward of moments() with grad_z2 = alpha + beta * z2, recomputed per tile by the
    fused backward kernels in their moments mode. In the input dtypes; None for the absent
    expand."""
    _check_moments_inputs(x, w_expand, b_expand, w_dw, stride)
    hidden = w_dw.shape[0]
    w_expand, b_expand, w_dw = map(_contig_w, (w_expand, b_expand, w_dw))
    alpha = alpha.to(torch.float32).contiguous()
    beta = beta.to(torch.float32).contiguous()
    if tuple(alpha.shape) != (hidden,) or tuple(beta.shape) != (hidden,):
        raise ValueError(f"mnv2 triton: alpha and beta must be ({hidden},), got "
                         f"{tuple(alpha.shape)} and {tuple(beta.shape)}")
    has_expand = w_expand is not None
    dt = x.dtype
    if x.numel() == 0:
        g_x = torch.zeros(x.shape, dtype=dt, device=x.device).contiguous(memory_format=_memory_format(x))
        return (g_x, torch.zeros_like(w_expand) if has_expand else None,
                torch.zeros_like(b_expand) if has_expand else None, torch.zeros_like(w_dw))
    zero_bias = torch.zeros(hidden, dtype=dt, device=x.device)
    stand_in_project = w_dw.new_zeros((1, hidden))  # never read in the moments mode
    grad_x, g_w_expand_parts, g_b_expand_parts, g_w_dw_parts, _, _ = _launch_backward(
        False, x, x, w_expand, b_expand, w_dw, zero_bias, stand_in_project, stride, False, (alpha, beta))
    g_w_dw = g_w_dw_parts.sum(0).view(hidden, DW_KERNEL, DW_KERNEL).to(dt)
    if not has_expand:
        return grad_x, None, None, g_w_dw
    return grad_x, g_w_expand_parts.sum(0).to(dt), g_b_expand_parts.sum(0).to(dt), g_w_dw


def _check_moments_inputs(x, w_expand, b_expand, w_dw, stride):
    hidden = w_dw.shape[0] if isinstance(w_dw, torch.Tensor) and w_dw.dim() == 3 else 1
    check_inputs(x, w_expand, b_expand, w_dw, w_dw.new_zeros(hidden) if isinstance(w_dw, torch.Tensor) else None,
                 x.new_zeros((1, hidden)), x.new_zeros(1), stride, False)
