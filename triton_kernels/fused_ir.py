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
Every kernel computes a hidden chunk's expand (z1, a1) once on a halo tile: the input
pixels under a tile of outputs (``_halo``, one dot per BLOCK_CI slice of Cin). The
depthwise taps then gather their rows of that tile (``tl.gather``), and the transposed
taps of the backward gather rows of g_z2. Threads exchange values only through these
gathers, which the compiler orders: no scratch memory, no tl.debug_barrier(), no
atomics. Tile shapes are chosen per block shape on the host (``_out_tile``,
``_in_tile``) to minimise the padded work within register budgets; each kernel's comment
gives how often it computes each expanded value.

* ``_fwd_kernel``: one program per (image, output tile). Per hidden chunk: the halo
  expand, the depthwise, then a2 @ w_project^T into one [tile, Cout] accumulator (the
  whole Cout in the program: the expand is not recomputed per Cout block).
* ``_moments_kernel``: train-mode bn2 statistics; the forward's z2, merged per
  (chunk, split) with Chan's formula.
* ``_bwd_weight_kernel``: chunk-stationary weight gradients. Grid (hidden chunks,
  splits, Cout blocks); each program walks a contiguous range of (image, output tile)
  items and accumulates its chunk's gradients in registers, stored once into its
  [split, chunk] slice of float32 per-split partial buffers; the host reduces them with
  .sum(0): deterministic.
* ``_bwd_input_kernel``: pixel-stationary input gradient (gather form). A persistent
  grid of about 4 programs per SM; a program owns an input tile Q per item; per hidden
  chunk it computes z2 and g_z2 on Q's output halo O from the expand on O's own halo,
  gathers g_a1 on Q from g_z2 and accumulates act'(z1) g_a1 @ w_expand[chunk] into a
  [Q, Cin] accumulator; + grad_y for the residual.

Nothing hidden-sized is ever allocated. grad_b_project is grad_y summed over
(N, H, W) in float32 by torch.

The depthwise convolution has k x k taps, k = 3, 5 or 7 (DW_KERNELS), read from the
(hidden, k, k) weights, and zero padding k // 2 (times the dilation): the output size of
every k. The kernels take them as the constexprs DW_KERNEL and DW_PAD, so each kernel
size compiles its own kernels. The host sizes the tiles for it (a tile of t outputs has a
halo of (t - 1) * stride + k, _halo_side) within the register budgets of 3x3 (_halo_cap):
the 5x5 and 7x7 tiles hold fewer outputs, and their launches take one pipeline stage
(configs_for) and more warps (_halo_warps), for their taps hold more registers.

Activation (after the expand and after the depthwise step): ReLU6 (MobileNetV2,
EfficientNet-Lite, MCUNet) or ReLU (MNASNet, FBNet), the constexpr RELU6 (``_act``, and
``_act_passes`` for the backward's masks: 0 < z < 6, or z > 0). Both keep a NaN, as
torch's clamp does.

Dilation (atrous MobileNetV2, Mobile DeepLabv3): a depthwise convolution with dilation d,
padding DW_PAD * d and block stride s reads, for output row oh, the input rows
oh * s + (tap - DW_PAD) * d. Its outputs fall into PHASES x PHASES interleaved lattices
(phases) that read disjoint input lattices: with g = gcd(s, d), the outputs ph + PHASES * i
(PHASES = d / g) read the input rows ph * s + (i * STRIDE - DW_PAD + tap) * d (STRIDE = s / g),
an undilated convolution of stride STRIDE on the input lattice of spacing DIL = d. So
every kernel tiles one phase at a time exactly as it tiles an undilated block (same tiles,
halos, registers and expand work), and only maps its tile-local rows to image rows
through (PHASES, DIL) (``_lattice``). A kernel's STRIDE is the stride within a phase: the
block's stride when d == 1, where PHASES == DIL == 1 and the mapping is the identity, so that
the undilated kernels compile as they did before dilation. A dilation of at least the
image's larger side reads padding at every off-centre tap, as any larger one does: it runs
as that side (``_effective_dilation``), which bounds the number of phases.

Autotuning: the pipeline stages per kernel, keyed on the block shape (the host picks the
tiles and the warps); one config under the interpreter or with MNV2_TRITON_AUTOTUNE=0
(read at import).
The interpreter's tl.dot mishandles bfloat16 (it multiplies the uint16 bit
patterns): under the interpreter only, bf16 dot operands are upcast to fp32.
"""

import functools
import math
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

# The depthwise kernel sizes and the activations the kernels are built for (see the module
# docstring).
DW_KERNELS = (3, 5, 7)
ACTIVATIONS = ("relu6", "relu")


def _upcast(x):
    # The interpreter's tl.dot multiplies bfloat16 bit patterns (stored as uint16) as integers.
    return INTERPRET and x.dtype == torch.bfloat16


def _block_ci(cin, dtype, block_halo=0):
    """Cin slice of the tiled expand dots (16 under the interpreter, to exercise the loop); 16
    for a halo of ``block_halo`` pixels beyond _MAX_HALO (the input-gradient kernel's of a
    7x7 depthwise kernel, see _halo_cap), whose wider slices spilled."""
    if INTERPRET or block_halo > _MAX_HALO:
        return 16
    return min(_pad(cin), 16 if dtype == torch.float32 else 64)


def _pad(c):
    return max(16, triton.next_power_of_2(int(c)))


def output_size(h, w, stride, dilation=1, *, kernel_size):
    """Output height and width of the kernel_size x kernel_size depthwise convolution
    (padding kernel_size // 2 * dilation): the undilated 3x3 ones for every dilation and
    kernel size."""
    reach = (kernel_size - 1) * dilation + 1
    pad = kernel_size // 2 * dilation
    return (h + 2 * pad - reach) // stride + 1, (w + 2 * pad - reach) // stride + 1


def kernel_size(w_dw):
    """k of the (hidden, k, k) depthwise weights."""
    return int(w_dw.shape[-1])


def relu6_flag(activation):
    """The kernels' RELU6 constexpr for an activation of ACTIVATIONS; raises ValueError for
    any other."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"mnv2 triton: activation must be 'relu6' or 'relu', got {activation!r}")
    return activation == "relu6"


def _lattice(stride, dilation):
    """(STRIDE, PHASES) of the kernels for a block of this stride and (effective) dilation:
    the stride within a phase and the phases per side (see the module docstring)."""
    g = math.gcd(stride, dilation)
    return stride // g, dilation // g


def _effective_dilation(dilation, h, w):
    """The dilation the kernels run for an h x w input: from max(h, w) on, every off-centre
    tap of every output reads padding (output row oh reads rows oh * stride +- d, with
    0 <= oh * stride < h), so that any larger dilation runs as max(h, w)."""
    return min(dilation, max(h, w, 1))


def _sm_count(device):
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2


# ---------------------------------------------------------------------------
# Tiles and configs.
#
# Every tile shape that sets a register-resident tensor's size is chosen on the host, per
# block shape (_out_tile, _in_tile, _chunk), within the element budgets below, so that no
# config spills; the autotuners choose warps and pipeline stages only.

# MNV2_TRITON_AUTOTUNE=0: one default config per kernel (no autotuning), as
# under the interpreter. Read at import.
AUTOTUNE = os.environ.get("MNV2_TRITON_AUTOTUNE", "1") != "0" and not INTERPRET

# Element budgets of the register-resident tensors (float32 accumulators and operand tiles):
# _ACC: one accumulator or full-width operand tile ([pixels, Cout] of the forward, [pixels,
# Cin] of the input gradient, [halo, Cin] and [pixels, Cout] of the weight gradient);
# _HALO: one [halo pixels, hidden chunk] tile (a1, z1, g_a1).
_ACC = 8192
_HALO = 2048
# Largest tile (pixels) and halo (pixels, padded): the interpreter takes small ones, so that
# its small test images span several tiles.
_MAX_P = 16 if INTERPRET else 64
_MAX_HALO = 64 if INTERPRET else 128


def _configs(tuned=True):
    """Four and eight warps, two pipeline stages (and three under autotuning when ``tuned``:
    the forward and the statistics; the backward's deeper pipeline spilled), and one stage
    for the 5x5 and 7x7 depthwise kernels. The host picks the warps for each launch (its
    WARPS argument, see configs_for): the number that holds the launch's tiles without
    spilling."""
    if INTERPRET:
        return [triton.Config({}, num_warps=4, num_stages=1)]
    # maxnreg: without a bound, ptxas trades a few spilled bytes for one more resident
    # program per SM at some shapes (168 registers at four warps, 128 at eight)
    stages = (2, 3) if AUTOTUNE and tuned else (2,)
    return [triton.Config({}, num_warps=w, num_stages=s, maxnreg=255) for s in stages + (1,) for w in (4, 8)]


def configs_for(configs, kwargs):
    """The configs of ``configs`` meant for a launch with these keyword arguments: those
    with its WARPS; for float32 operands two stages only (FMA dots gain little from a
    deeper pipeline, and its buffers spilled); for a 3x3 depthwise kernel two or more, for
    5x5 and 7x7 one (their taps hold more registers: the pipelined loads of the hidden
    loop spilled). The autotuners prune with it before tuning."""
    one_stage = kwargs.get("DW_KERNEL", 3) > 3
    kept = [c for c in configs if c.num_warps == kwargs.get("WARPS") and (c.num_stages == 1) == one_stage
            and (c.num_stages <= 2 or not kwargs.get("IS_FP32"))]
    return kept or list(configs)


def _warps(rows, block_h, is_fp32):
    """WARPS of a backward launch whose largest [rows, BLOCK_H] tile is ``rows`` x ``block_h``:
    eight for the large tiles and for float32 operands (FMA dots hold both operands in
    registers), four for small 16-bit ones (eight warps would replicate them)."""
    return 8 if is_fp32 or rows * block_h >= 2048 else 4


def _halo_warps(warps, block_halo, block_h, k):
    """WARPS of a forward or statistics launch with a k x k depthwise kernel: ``warps``, or
    eight for 5x5 and 7x7 where its [halo, hidden chunk] tiles take the whole budget _HALO
    (their tap loops hold more registers than 3x3's: four warps spilled)."""
    return 8 if k > 3 and block_halo * block_h >= _HALO else warps


_PRUNE = {"early_config_prune": lambda configs, named_args, **kwargs: configs_for(configs, kwargs)}


def _pow2(v):
    return max(16, triton.next_power_of_2(int(v)))


def _halo_side(t, stride, k):
    """Input rows (or columns) under t output rows of the k x k depthwise convolution (of a
    phase: ``stride`` the kernels' STRIDE, rows of the phase's input lattice; see _lattice)."""
    return (t - 1) * stride + k


def _halo_cap(max_halo, span):
    """The largest halo (padded pixels) of a tile: ``max_halo`` (at most _MAX_HALO), or the
    halo of a single pixel where that is larger: ``span`` x ``span``, k for the outputs of a
    k x k depthwise convolution, 2k - 1 for the input-gradient kernel's halo A of one input
    pixel (the outputs that read it, and their inputs). The same budgets for every k: the
    3x3 kernels take up to 255 registers at the largest halos, and larger halos for 5x5 and
    7x7 spilled (tests/test_triton_compile.py)."""
    return max(min(max_halo, _MAX_HALO), _pow2(span * span))


def _hidden_chunk(block_halo, is_fp32):
    """BLOCK_H: the hidden channels of a chunk, within the halo budget; 16 for float32
    operands (FMA dots hold both operands in registers)."""
    if INTERPRET or is_fp32:
        return 16
    return max(16, min(32, _HALO // block_halo))


@functools.lru_cache(maxsize=1024)
def _out_tile(ho, wo, stride, cin_pad, cout_pad, cout_budget, cin_budget, max_halo, k):
    """(TH, TW) of the kernels tiled over the output (forward, statistics, weight gradient),
    for a phase's ho x wo outputs, the kernels' STRIDE (see _lattice) and a k x k depthwise
    convolution: the tile that minimises the estimated work per image (halo expand,
    depthwise, project; pow2-padded), within the budgets (0: none): [TH*TW, Cout] elements at
    most ``cout_budget``, [halo, Cin] at most ``cin_budget``, at most ``max_halo`` halo rows
    (_halo_cap). A 1 x 1 tile when none fits."""
    best = ((0,), 1, 1)
    max_halo = _halo_cap(max_halo, k)
    for th in range(1, min(ho, 16) + 1):
        for tw in range(1, min(wo, 16) + 1):
            block_p = _pow2(th * tw)
            block_halo = _pow2(_halo_side(th, stride, k) * _halo_side(tw, stride, k))
            if block_p > _MAX_P or block_halo > max_halo:
                continue
            if (cout_budget and block_p * cout_pad > cout_budget) or (cin_budget and block_halo * cin_pad > cin_budget):
                continue
            tiles = triton.cdiv(ho, th) * triton.cdiv(wo, tw)
            cost = tiles * (block_halo * cin_pad + block_p * (cout_pad + 2 * k * k))
            key = (cost, -th * tw, abs(th - tw))
            if best[0] == (0,) or key < best[0]:
                best = (key, th, tw)
    return best[1], best[2]


@functools.lru_cache(maxsize=1024)
def _in_tile(h, w, stride, cin_pad, cout_pad, acc, max_halo, k):
    """(TQH, TQW) of the input-gradient kernel, tiled over the input (a phase's input lattice
    of h x w pixels, the kernels' STRIDE; see _lattice), for a k x k depthwise convolution:
    each tile needs the outputs of its halo O and their own halo A (see _bwd_input_kernel).
    Minimises the estimated work per image within the budgets ([TQH*TQW, Cin] accumulator,
    [A, BLOCK_H] halo at most ``max_halo``, _halo_cap); even sides for stride 2."""
    step = 2 if stride == 2 else 1
    best = ((0,), step, step)
    max_halo = _halo_cap(max_halo, 2 * k - 1)
    for tqh in range(step, 17, step):
        for tqw in range(step, 17, step):
            if tqh > h + step or tqw > w + step:
                continue
            oth, otw, ah, aw = _in_halos(tqh, tqw, stride, k)
            block_q, block_o, block_a = _pow2(tqh * tqw), _pow2(oth * otw), _pow2(ah * aw)
            if block_q > _MAX_P or max(block_a, 2 * block_o) > max_halo or block_q * cin_pad > acc:
                continue
            tiles = triton.cdiv(h, tqh) * triton.cdiv(w, tqw)
            cost = tiles * (block_a * cin_pad + block_o * (cout_pad + 2 * k * k) + block_q * (cin_pad + k * k))
            key = (cost, -tqh * tqw, abs(tqh - tqw))
            if best[0] == (0,) or key < best[0]:
                best = (key, tqh, tqw)
    return best[1], best[2]


def _in_halos(tqh, tqw, stride, k):
    """(OTH, OTW, AH, AW): the output halo O of an input tile TQH x TQW (the outputs whose
    k x k depthwise window meets the tile) and O's own input halo A."""
    pad = k // 2
    if stride == 1:
        oth, otw = tqh + 2 * pad, tqw + 2 * pad
    else:
        oth, otw = tqh // 2 + pad, tqw // 2 + pad
    return oth, otw, _halo_side(oth, stride, k), _halo_side(otw, stride, k)


_KEY = ["CIN", "HID", "COUT", "H", "W", "STRIDE", "DIL", "PHASES", "HAS_EXPAND", "RESIDUAL", "IS_FP32", "BLOCK_H",
        "DW_KERNEL", "RELU6"]
_KEY_BWD = _KEY + ["MOMENTS"]
# Integer arguments the kernels only compare and divide (batch, sides, item counts), never
# use as strides: not specialised, so that Triton compiles one kernel for all their values
# (an argument equal to 1 would otherwise become a constant, and a multiple of 16 gets a
# divisibility hint that changes nothing here, each a separate compile).
_SIZES = ["N", "H", "W", "HO", "WO", "N_SPLITS", "NPROG"]


def _jit(fn):
    """triton.jit without specialisation on the size arguments of _SIZES that ``fn`` has."""
    names = fn.__code__.co_varnames[:fn.__code__.co_argcount]
    return triton.jit(fn, do_not_specialize=[n for n in _SIZES if n in names])


# ---------------------------------------------------------------------------
# Building blocks.

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
def _act(z, RELU6: tl.constexpr):
    """The block's activation: relu6(z) when RELU6, else relu(z); a NaN stays NaN."""
    a = tl.maximum(z, 0.0, propagate_nan=tl.PropagateNan.ALL)
    if RELU6:
        a = tl.minimum(a, 6.0, propagate_nan=tl.PropagateNan.ALL)
    return a


@triton.jit
def _act_passes(z, RELU6: tl.constexpr):
    """Where the activation passes its gradient (act'(z) = 1): 0 < z < 6 for ReLU6, z > 0
    for ReLU."""
    if RELU6:
        m = (z > 0.0) & (z < 6.0)
    else:
        m = z > 0.0
    return m


@triton.jit
def _halo(x_base, ih0, iw0, H, W, sxh, sxw, sxc, w_expand_ptr, b_expand_ptr, hh, h_mask, CIN,
          HAS_EXPAND: tl.constexpr, IS_FP32: tl.constexpr, UPCAST: tl.constexpr, RELU6: tl.constexpr,
          DIL: tl.constexpr, HALO_H: tl.constexpr, HALO_W: tl.constexpr, BLOCK_HALO: tl.constexpr,
          BLOCK_H: tl.constexpr, BLOCK_CI: tl.constexpr):
    """(z1, a1, inb) of a hidden chunk on a halo tile: the HALO_H x HALO_W input pixels from
    image pixel (ih0, iw0), DIL apart (a phase's input lattice), row-major in BLOCK_HALO rows.
    z1 [BLOCK_HALO, BLOCK_H] = x @ w_expand[hh]^T + b_expand (one dot per BLOCK_CI slice of
    Cin: bounded registers for any Cin); a1 = act(z1) (_act),
    exactly zero outside the image (the depthwise zero padding applies to a1) and in the
    padding rows. Without the expand (t == 1) z1 = a1 = x. inb: the pixel is in the image."""
    i = tl.arange(0, BLOCK_HALO)
    ih = ih0 + (i // HALO_W) * DIL
    iw = iw0 + (i % HALO_W) * DIL
    inb = (i < HALO_H * HALO_W) & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    pix = ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
    m = inb[:, None] & h_mask[None, :]
    if HAS_EXPAND:
        z1 = tl.zeros([BLOCK_HALO, BLOCK_H], dtype=tl.float32)
        for k0 in range(0, CIN, BLOCK_CI):
            ck = k0 + tl.arange(0, BLOCK_CI)
            ck_mask = ck < CIN
            # (every channel offset in int64, as the pixel offsets: an NCHW image of more
            # than 2^31 elements would wrap in int32)
            xt = tl.load(x_base + pix[:, None] + ck.to(tl.int64)[None, :] * sxc,
                         mask=inb[:, None] & ck_mask[None, :], other=0.0)
            w_expand_k = tl.load(w_expand_ptr + hh[None, :] * CIN + ck[:, None],
                                 mask=ck_mask[:, None] & h_mask[None, :], other=0.0)
            z1 += _dot(xt, w_expand_k, IS_FP32, UPCAST)
        b_expand = tl.load(b_expand_ptr + hh, mask=h_mask, other=0.0).to(tl.float32)
        z1 += b_expand[None, :]
        a1 = tl.where(m, _act(z1, RELU6), 0.0)
    else:
        a1 = tl.load(x_base + pix[:, None] + hh.to(tl.int64)[None, :] * sxc, mask=m, other=0.0).to(tl.float32)
        z1 = a1
    return z1, a1, inb


@triton.jit
def _depthwise(a1, r, c, ok, w_dw_ptr, hh, h_mask, STRIDE: tl.constexpr, DW_KERNEL: tl.constexpr,
               HALO_W: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr):
    """The depthwise DW_KERNEL x DW_KERNEL convolution (no bias) [BLOCK_P, BLOCK_H] of the
    halo tile a1 (_halo) at the outputs of tile-local row r and column c, whose window
    starts at halo pixel (r * STRIDE, c * STRIDE): each tap gathers its rows of a1 (tl.gather:
    an exchange between threads that the compiler orders; no scratch memory, no barrier).
    Rows not ``ok`` (the tile's padding rows) read halo pixel 0."""
    DW_TAPS: tl.constexpr = DW_KERNEL * DW_KERNEL
    acc = tl.zeros([BLOCK_P, BLOCK_H], dtype=tl.float32)
    for tap in range(DW_TAPS):
        idx = (r * STRIDE + tap // DW_KERNEL) * HALO_W + c * STRIDE + tap % DW_KERNEL
        idx = tl.where(ok, idx, 0)
        a1_tap = tl.gather(a1, tl.broadcast_to(idx[:, None], (BLOCK_P, BLOCK_H)), 0)
        w_dw_tap = tl.load(w_dw_ptr + hh * DW_TAPS + tap, mask=h_mask, other=0.0).to(tl.float32)
        acc += a1_tap * w_dw_tap[None, :]
    return acc


@triton.jit
def _transpose_taps(g_z2, hr, hc, ok, tap, TH: tl.constexpr, TW: tl.constexpr, STRIDE: tl.constexpr,
                    DW_KERNEL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr):
    """The transposed depthwise tap ``tap`` (no weight): for each halo pixel of local row hr
    and column hc, g_z2 [TH*TW (padded), BLOCK_H] of the output whose window puts this tap on
    it, 0 where no output of the tile does (or not ``ok``). [BLOCK_M, BLOCK_H]."""
    rr = hr - tap // DW_KERNEL
    cc = hc - tap % DW_KERNEL
    if STRIDE == 1:
        r = rr
        c = cc
        hit = ok & (rr >= 0) & (cc >= 0)
    else:
        r = rr // STRIDE
        c = cc // STRIDE
        hit = ok & (rr >= 0) & (cc >= 0) & (rr % STRIDE == 0) & (cc % STRIDE == 0)
    hit = hit & (r < TH) & (c < TW)
    idx = tl.where(hit, r * TW + c, 0)
    g = tl.gather(g_z2, tl.broadcast_to(idx[:, None], (BLOCK_M, BLOCK_H)), 0)
    return tl.where(hit[:, None], g, 0.0)


@triton.jit
def _grad_a2(gy_ptr, gy_pix, valid, sgc, w_project_ptr, hh, h_mask, COUT, HID, IS_FP32: tl.constexpr,
             UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_CO: tl.constexpr):
    """g_a2 [BLOCK_M, BLOCK_H] = g_y[pixels gy_pix, masked by valid] @ w_project[:, hh], over Cout
    in BLOCK_CO slices."""
    g_a2 = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
    for co0 in range(0, COUT, BLOCK_CO):
        co = co0 + tl.arange(0, BLOCK_CO)
        co_mask = co < COUT
        gy = tl.load(gy_ptr + gy_pix[:, None] + co.to(tl.int64)[None, :] * sgc,
                     mask=valid[:, None] & co_mask[None, :], other=0.0)
        w_project_c = tl.load(w_project_ptr + co[:, None] * HID + hh[None, :],
                              mask=co_mask[:, None] & h_mask[None, :], other=0.0)
        g_a2 += _dot(gy, w_project_c, IS_FP32, UPCAST)
    return g_a2


@triton.jit
def _split_items(N, HO, WO, N_SPLITS, split, TH: tl.constexpr, TW: tl.constexpr, PHASES: tl.constexpr):
    """(n_tw, n_tiles, start, end): split `split`'s contiguous range [start, end) of the
    N x PHASES^2 x (output tiles of TH x TW per phase) items; n_tiles: the tiles of a phase."""
    n_tw = tl.cdiv(tl.cdiv(WO, PHASES), TW)
    n_tiles = tl.cdiv(tl.cdiv(HO, PHASES), TH) * n_tw
    total = N * (PHASES * PHASES) * n_tiles
    per = tl.cdiv(total, N_SPLITS)
    start = split * per
    end = tl.minimum(start + per, total)
    return n_tw, n_tiles, start, end


@triton.jit
def _tile(item, n_tw, n_tiles, p, HO, WO, TH: tl.constexpr, TW: tl.constexpr, PHASES: tl.constexpr):
    """(image n as int64, ph, pw, oh0, ow0, oh, ow, r, c, ok, p_mask) of item `item` (an image,
    the phase (ph, pw) and an output tile of TH x TW of the phase from its row oh0 and column
    ow0): tile-local row r and column c of each of the BLOCK_P rows p, their output pixel
    (oh, ow) in the image, ok = a row of the tile (not padding), p_mask = an output pixel of
    the image. A phase's last tiles can hold no output pixel (its lattice can be one row or
    column shorter than another's); never without dilation."""
    n = (item // (n_tiles * (PHASES * PHASES))).to(tl.int64)
    t = item % n_tiles
    phase = (item // n_tiles) % (PHASES * PHASES)
    ph = phase // PHASES
    pw = phase % PHASES
    oh0 = (t // n_tw) * TH
    ow0 = (t % n_tw) * TW
    r = p // TW
    c = p % TW
    ok = p < TH * TW
    # (the mask before the image pixels: without dilation, the undilated kernels' instruction order)
    p_mask = ok & (ph + (oh0 + r) * PHASES < HO) & (pw + (ow0 + c) * PHASES < WO)
    return n, ph, pw, oh0, ow0, ph + (oh0 + r) * PHASES, pw + (ow0 + c) * PHASES, r, c, ok, p_mask


@triton.jit
def _halo_origin(ph, o0, STRIDE: tl.constexpr, DIL: tl.constexpr, PHASES: tl.constexpr, DW_PAD: tl.constexpr):
    """The image row (or column) of the halo origin of a tile of phase ph from its row (or
    column) o0: the phase's input lattice starts at image row ph times the block's stride."""
    PHASE_STEP: tl.constexpr = STRIDE * DIL // PHASES
    return ph * PHASE_STEP + (o0 * STRIDE - DW_PAD) * DIL


@triton.jit
def _divisor(count, MAY_BE_ZERO: tl.constexpr):
    """count as the divisor of a sum over count values: 1 where it is 0 (the sum is then 0)
    when MAY_BE_ZERO."""
    if MAY_BE_ZERO:
        count = tl.maximum(count, 1.0)
    return count


# ---------------------------------------------------------------------------
# Forward.

@triton.autotune(configs=_configs(), key=_KEY + ["TH", "TW"], prune_configs_by=_PRUNE)
@_jit
def _fwd_kernel(
    x_ptr, w_expand_ptr, b_expand_ptr, w_dw_ptr, b_dw_ptr, w_project_ptr, b_project_ptr, y_ptr,
    H, W, HO, WO, CIN, HID, COUT,
    sxn, sxc, sxh, sxw, syn, syc, syh, syw,
    STRIDE: tl.constexpr, HAS_EXPAND: tl.constexpr, RESIDUAL: tl.constexpr, IS_FP32: tl.constexpr, UPCAST: tl.constexpr,
    RELU6: tl.constexpr, DW_KERNEL: tl.constexpr, DW_PAD: tl.constexpr, DIL: tl.constexpr, PHASES: tl.constexpr,
    BLOCK_CI: tl.constexpr, COUT_PAD: tl.constexpr,
    TH: tl.constexpr, TW: tl.constexpr, BLOCK_P: tl.constexpr, HALO_H: tl.constexpr, HALO_W: tl.constexpr,
    BLOCK_HALO: tl.constexpr, BLOCK_H: tl.constexpr, WARPS: tl.constexpr,
):
    # One program per (image, phase, output tile TH x TW of the phase); grid axis 0 only (up
    # to 2^31 - 1 programs: any batch launches). For each hidden chunk: the expand on the tile's
    # halo, once (_halo), the depthwise taps gathered from it, the project of the whole
    # Cout into one [BLOCK_P, COUT_PAD] accumulator.
    # Expand work: each expanded value (input pixel x hidden channel) once per tile whose
    # halo holds it: (TH+k-1)(TW+k-1)/(TH*TW) times at stride 1 for a k x k depthwise
    # convolution (1.56x at 8x8 for 3x3), about (2TH+k-2)(2TW+k-2)/(4*TH*TW) at stride 2;
    # with the halo's padding to BLOCK_HALO rows, for 3x3,
    # 1.4x to 2.6x at MobileNetV2's blocks (5.2x for the last, whose 320-channel Cout
    # keeps the tile to 16 pixels). Once for the whole Cout.
    n_tw = tl.cdiv(tl.cdiv(WO, PHASES), TW)
    n_tiles = tl.cdiv(tl.cdiv(HO, PHASES), TH) * n_tw
    p = tl.arange(0, BLOCK_P)
    n, ph, pw, oh0, ow0, oh, ow, r, c, ok, p_mask = _tile(tl.program_id(0), n_tw, n_tiles, p, HO, WO, TH, TW,
                                                          PHASES)
    co = tl.arange(0, COUT_PAD)
    co_mask = co < COUT
    dt = x_ptr.dtype.element_ty
    x_base = x_ptr + n * sxn

    acc_y = tl.zeros([BLOCK_P, COUT_PAD], dtype=tl.float32)
    for h0 in range(0, HID, BLOCK_H):
        hh = h0 + tl.arange(0, BLOCK_H)
        h_mask = hh < HID
        _, a1, _ = _halo(x_base, _halo_origin(ph, oh0, STRIDE, DIL, PHASES, DW_PAD),
                         _halo_origin(pw, ow0, STRIDE, DIL, PHASES, DW_PAD), H, W, sxh, sxw, sxc,
                         w_expand_ptr, b_expand_ptr, hh, h_mask, CIN, HAS_EXPAND, IS_FP32, UPCAST, RELU6, DIL,
                         HALO_H, HALO_W, BLOCK_HALO, BLOCK_H, BLOCK_CI)
        acc_dw = _depthwise(a1, r, c, ok, w_dw_ptr, hh, h_mask, STRIDE, DW_KERNEL, HALO_W, BLOCK_P, BLOCK_H)
        b_dw = tl.load(b_dw_ptr + hh, mask=h_mask, other=0.0).to(tl.float32)
        a2 = _act(acc_dw + b_dw[None, :], RELU6)
        # w_project^T chunk [BLOCK_H, COUT_PAD]
        w_project_t = tl.load(w_project_ptr + co[None, :] * HID + hh[:, None],
                              mask=h_mask[:, None] & co_mask[None, :], other=0.0)
        acc_y += _dot(a2.to(dt), w_project_t, IS_FP32, UPCAST)

    b_project = tl.load(b_project_ptr + co, mask=co_mask, other=0.0).to(tl.float32)
    acc_y += b_project[None, :]
    out_mask = p_mask[:, None] & co_mask[None, :]
    if RESIDUAL:
        r_ = tl.load(x_base + (oh.to(tl.int64) * sxh + ow.to(tl.int64) * sxw)[:, None] + co.to(tl.int64)[None, :] * sxc,
                     mask=out_mask, other=0.0)
        acc_y += r_.to(tl.float32)
    y_off = n * syn + (oh.to(tl.int64) * syh + ow.to(tl.int64) * syw)[:, None] + co.to(tl.int64)[None, :] * syc
    tl.store(y_ptr + y_off, acc_y.to(dt), mask=out_mask)


# ---------------------------------------------------------------------------
# Backward: weight gradients (chunk-stationary).

@triton.autotune(configs=_configs(tuned=False), key=_KEY_BWD + ["TH", "TW"], prune_configs_by=_PRUNE)
@_jit
def _bwd_weight_kernel(
    gy_ptr, x_ptr, w_expand_ptr, b_expand_ptr, w_dw_ptr, b_dw_ptr, w_project_ptr, alpha_ptr, beta_ptr,
    g_w_expand_ptr, g_b_expand_ptr, g_w_dw_ptr, g_b_dw_ptr, g_w_project_ptr,
    N, H, W, HO, WO, CIN, HID, COUT, N_SPLITS,
    sxn, sxc, sxh, sxw, sgn, sgc, sgh, sgw,
    STRIDE: tl.constexpr, HAS_EXPAND: tl.constexpr, RESIDUAL: tl.constexpr, IS_FP32: tl.constexpr, UPCAST: tl.constexpr,
    MOMENTS: tl.constexpr, RELU6: tl.constexpr, DW_KERNEL: tl.constexpr, DW_PAD: tl.constexpr, DIL: tl.constexpr,
    PHASES: tl.constexpr, DW_TAPS_PAD: tl.constexpr, CIN_PAD: tl.constexpr, COUT_PAD: tl.constexpr,
    BLOCK_CO: tl.constexpr, CO_W: tl.constexpr,
    TH: tl.constexpr, TW: tl.constexpr, BLOCK_P: tl.constexpr, HALO_H: tl.constexpr, HALO_W: tl.constexpr,
    BLOCK_HALO: tl.constexpr, BLOCK_H: tl.constexpr, WARPS: tl.constexpr,
):
    # Grid (hidden chunks, splits, Cout blocks of CO_W); a program walks its contiguous range of (image, phase,
    # output tile) items. Per item: x on the tile's halo, loaded once at full Cin width; z1 and a1
    # from one dot; z2 by gathering the depthwise taps; g_z2; g_a1 on the halo by the
    # transposed taps; then every weight gradient of the chunk accumulates in registers:
    # the project weight's for the program's Cout block (g_a2 reads the whole Cout, in
    # BLOCK_CO slices), the others in the programs of Cout block 0 only. (Wide layers
    # have several Cout blocks, each of which recomputes the chunk's expand: a [Cout,
    # BLOCK_H] accumulator over 128 channels would spill.)
    # Each program stores its [split, chunk] slice of the float32 per-split partial
    # buffers once, at the end: g_w_expand [S, HID, CIN], g_b_expand [S, HID], g_w_dw
    # [S, HID, DW_TAPS] (DW_TAPS_PAD: DW_TAPS padded to a power of two, the tap axis of the
    # accumulator), g_b_dw [S, HID], g_w_project [S, COUT, HID]. The host reduces them
    # with .sum(0): deterministic, no atomics, no thread exchange through memory.
    # Expand work: once per tile's halo, as the forward, times the Cout blocks (1.4x to
    # 2.3x at MobileNetV2's blocks, 3.9x to 11.8x for the four with a 7x7 output).
    # MOMENTS: the backward of the depthwise moments (train-mode bn2 statistics):
    # g_z2 = alpha + beta * z2 per channel (alpha_ptr, beta_ptr), no project step;
    # gy_ptr, w_project_ptr and g_w_project_ptr are not read.
    DW_TAPS: tl.constexpr = DW_KERNEL * DW_KERNEL
    pid_h = tl.program_id(0)
    split = tl.program_id(1)
    pid_co = tl.program_id(2)
    dt = x_ptr.dtype.element_ty
    n_tw, n_tiles, start, end = _split_items(N, HO, WO, N_SPLITS, split, TH, TW, PHASES)

    hh = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = hh < HID
    ci = tl.arange(0, CIN_PAD)
    ci_mask = ci < CIN
    co = pid_co * CO_W + tl.arange(0, CO_W)
    co_mask = co < COUT
    p = tl.arange(0, BLOCK_P)
    i = tl.arange(0, BLOCK_HALO)
    hr = i // HALO_W
    hc = i % HALO_W
    i_ok = i < HALO_H * HALO_W
    taps = tl.arange(0, DW_TAPS_PAD)
    split64 = split.to(tl.int64)

    if HAS_EXPAND:
        b_expand = tl.load(b_expand_ptr + hh, mask=h_mask, other=0.0).to(tl.float32)
    b_dw = tl.load(b_dw_ptr + hh, mask=h_mask, other=0.0).to(tl.float32)
    if MOMENTS:
        alpha = tl.load(alpha_ptr + hh, mask=h_mask, other=0.0).to(tl.float32)
        beta = tl.load(beta_ptr + hh, mask=h_mask, other=0.0).to(tl.float32)

    acc_g_w_expand = tl.zeros([BLOCK_H, CIN_PAD], dtype=tl.float32)
    acc_g_b_expand = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc_g_w_dw = tl.zeros([DW_TAPS_PAD, BLOCK_H], dtype=tl.float32)
    acc_g_b_dw = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc_g_w_project = tl.zeros([CO_W, BLOCK_H], dtype=tl.float32)

    for item in range(start, end):
        n, ph, pw, oh0, ow0, oh, ow, r, c, ok, p_mask = _tile(item, n_tw, n_tiles, p, HO, WO, TH, TW, PHASES)
        x_base = x_ptr + n * sxn
        ih = _halo_origin(ph, oh0, STRIDE, DIL, PHASES, DW_PAD) + hr * DIL
        iw = _halo_origin(pw, ow0, STRIDE, DIL, PHASES, DW_PAD) + hc * DIL
        inb = i_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        pix = ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
        if HAS_EXPAND:
            xh = tl.load(x_base + pix[:, None] + ci.to(tl.int64)[None, :] * sxc,
                         mask=inb[:, None] & ci_mask[None, :], other=0.0)
            # (loaded per item, from cache, rather than held in registers)
            w_expand_t = tl.load(w_expand_ptr + hh[None, :] * CIN + ci[:, None],
                                 mask=ci_mask[:, None] & h_mask[None, :], other=0.0)
            z1 = _dot(xh, w_expand_t, IS_FP32, UPCAST) + b_expand[None, :]
            a1 = tl.where(inb[:, None] & h_mask[None, :], _act(z1, RELU6), 0.0)
        else:
            a1 = tl.load(x_base + pix[:, None] + hh.to(tl.int64)[None, :] * sxc,
                         mask=inb[:, None] & h_mask[None, :], other=0.0).to(tl.float32)

        z2 = _depthwise(a1, r, c, ok, w_dw_ptr, hh, h_mask, STRIDE, DW_KERNEL, HALO_W, BLOCK_P,
                        BLOCK_H) + b_dw[None, :]
        if MOMENTS:
            g_z2 = tl.where(p_mask[:, None], alpha[None, :] + beta[None, :] * z2, 0.0)
        else:
            a2 = tl.where(p_mask[:, None], _act(z2, RELU6), 0.0)
            gy_pix = n * sgn + oh.to(tl.int64) * sgh + ow.to(tl.int64) * sgw
            # (the weight chunks are loaded per item, from cache, rather than held in registers)
            g_a2 = _grad_a2(gy_ptr, gy_pix, p_mask, sgc, w_project_ptr, hh, h_mask, COUT, HID, IS_FP32, UPCAST,
                            BLOCK_P, BLOCK_H, BLOCK_CO)
            # g_w_project[block, chunk] += g_y[:, block]^T @ a2
            gy = tl.load(gy_ptr + gy_pix[:, None] + co.to(tl.int64)[None, :] * sgc,
                         mask=p_mask[:, None] & co_mask[None, :], other=0.0)
            acc_g_w_project += _dot(tl.trans(gy), a2.to(dt), IS_FP32, UPCAST)
            g_z2 = tl.where(_act_passes(z2, RELU6) & p_mask[:, None], g_a2, 0.0)
        if pid_co == 0:
            acc_g_b_dw += tl.sum(g_z2, axis=0)

            # g_w_dw[tap] = sum over the tile of g_z2 * a1 at the tap; g_a1 on the halo
            g_a1 = tl.zeros([BLOCK_HALO, BLOCK_H], dtype=tl.float32)
            for tap in range(DW_TAPS):
                idx = tl.where(ok, (r * STRIDE + tap // DW_KERNEL) * HALO_W + c * STRIDE + tap % DW_KERNEL, 0)
                a1_tap = tl.gather(a1, tl.broadcast_to(idx[:, None], (BLOCK_P, BLOCK_H)), 0)
                acc_g_w_dw += tl.where(taps[:, None] == tap, tl.sum(g_z2 * a1_tap, axis=0)[None, :], 0.0)
                if HAS_EXPAND:
                    w_dw_tap = tl.load(w_dw_ptr + hh * DW_TAPS + tap, mask=h_mask, other=0.0).to(tl.float32)
                    g_a1 += _transpose_taps(g_z2, hr, hc, i_ok, tap, TH, TW, STRIDE, DW_KERNEL,
                                            BLOCK_HALO, BLOCK_H) * w_dw_tap[None, :]
            if HAS_EXPAND:
                g_z1 = tl.where(inb[:, None] & _act_passes(z1, RELU6), g_a1, 0.0)
                acc_g_b_expand += tl.sum(g_z1, axis=0)
                acc_g_w_expand += _dot(tl.trans(g_z1.to(dt)), xh, IS_FP32, UPCAST)

    if pid_co == 0:
        if HAS_EXPAND:
            tl.store(g_w_expand_ptr + split64 * HID * CIN + hh[:, None] * CIN + ci[None, :], acc_g_w_expand,
                     mask=h_mask[:, None] & ci_mask[None, :])
            tl.store(g_b_expand_ptr + split64 * HID + hh, acc_g_b_expand, mask=h_mask)
        tl.store(g_w_dw_ptr + split64 * HID * DW_TAPS + hh[None, :] * DW_TAPS + taps[:, None], acc_g_w_dw,
                 mask=(taps[:, None] < DW_TAPS) & h_mask[None, :])
        tl.store(g_b_dw_ptr + split64 * HID + hh, acc_g_b_dw, mask=h_mask)
    if not MOMENTS:
        tl.store(g_w_project_ptr + split64 * COUT * HID + co[:, None] * HID + hh[None, :], acc_g_w_project,
                 mask=co_mask[:, None] & h_mask[None, :])


# ---------------------------------------------------------------------------
# Backward: input gradient (pixel-stationary, gather form).

@triton.autotune(configs=_configs(tuned=False), key=_KEY_BWD + ["TQH", "TQW"], prune_configs_by=_PRUNE)
@_jit
def _bwd_input_kernel(
    gy_ptr, x_ptr, w_expand_ptr, b_expand_ptr, w_dw_ptr, b_dw_ptr, w_project_ptr, alpha_ptr, beta_ptr, gx_ptr,
    N, H, W, HO, WO, CIN, HID, COUT, NPROG,
    sxn, sxc, sxh, sxw, sgn, sgc, sgh, sgw, sdn, sdc, sdh, sdw,
    STRIDE: tl.constexpr, HAS_EXPAND: tl.constexpr, RESIDUAL: tl.constexpr, IS_FP32: tl.constexpr, UPCAST: tl.constexpr,
    MOMENTS: tl.constexpr, RELU6: tl.constexpr, DW_KERNEL: tl.constexpr, DW_PAD: tl.constexpr, DIL: tl.constexpr,
    PHASES: tl.constexpr, CIN_PAD: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr,
    TQH: tl.constexpr, TQW: tl.constexpr, BLOCK_Q: tl.constexpr, OTH: tl.constexpr, OTW: tl.constexpr,
    BLOCK_O: tl.constexpr, AH: tl.constexpr, AW: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_H: tl.constexpr,
    WARPS: tl.constexpr,
):
    # A persistent grid of about 4 programs per SM; a program owns an input tile Q =
    # TQH x TQW from (qh0, qw0) per item. For each hidden chunk: the expand on A, the input
    # halo of Q's output halo O (the outputs whose window meets Q), once; z2 on O by
    # gathering the taps from a1(A); g_z2 on O; g_a1 on Q by gathering the transposed taps
    # from g_z2(O); z1 on Q gathered from z1(A); g_x[Q] += act'(z1) g_a1 @ w_expand[chunk]
    # in a [BLOCK_Q, CIN_PAD] accumulator; + grad_y for the residual.
    # O starts at (oh0, ow0) = (qh0 - DW_PAD, qw0 - DW_PAD) at stride 1 and at
    # (qh0 / 2 - DW_PAD // 2, ...) at stride 2 (TQH, TQW even); A at O's origin times the
    # stride, less DW_PAD.
    # Expand work: each expanded value once per input tile whose double halo A holds it,
    # AH*AW / (TQH*TQW) times (with padding 2x to 5.2x at MobileNetV2's blocks).
    # Dilated: an item is (image, phase, input tile); the coordinates above are the phase's
    # (its input lattice: image rows ph * PHASE_STEP + j * DIL; its outputs: ph + i * PHASES),
    # and its tiles start at the lattice's first row in the image, j = -(ph * PHASE_STEP // DIL)
    # (0 or, for an odd dilation at stride 2, -1). The lattices of no phase (stride 2, even
    # dilation: the odd rows and columns) get no gradient from the depthwise; the host zeroes
    # grad_x for them.
    DW_TAPS: tl.constexpr = DW_KERNEL * DW_KERNEL
    PHASE_STEP: tl.constexpr = STRIDE * DIL // PHASES
    pid = tl.program_id(0)
    dt = x_ptr.dtype.element_ty
    n_tw = tl.cdiv(tl.cdiv(W, DIL), TQW)
    n_tiles = tl.cdiv(tl.cdiv(H, DIL), TQH) * n_tw
    total = N * (PHASES * PHASES) * n_tiles
    ci = tl.arange(0, CIN_PAD)
    ci_mask = ci < CIN
    q = tl.arange(0, BLOCK_Q)
    q_ok = q < TQH * TQW
    o = tl.arange(0, BLOCK_O)
    o_r = o // OTW
    o_c = o % OTW
    o_ok = o < OTH * OTW
    hl = tl.arange(0, BLOCK_H)

    for item in range(pid, total, NPROG):
        n = (item // (n_tiles * (PHASES * PHASES))).to(tl.int64)
        t = item % n_tiles
        phase = (item // n_tiles) % (PHASES * PHASES)
        ph = phase // PHASES
        pw = phase % PHASES
        qh0 = (t // n_tw) * TQH - ph * PHASE_STEP // DIL
        qw0 = (t % n_tw) * TQW - pw * PHASE_STEP // DIL
        q_r = q // TQW
        q_c = q % TQW
        # Q's rows and columns: qh_l, qw_l in the phase, qh, qw in the image
        qh_l = qh0 + q_r
        qw_l = qw0 + q_c
        qh = ph * PHASE_STEP + qh_l * DIL
        qw = pw * PHASE_STEP + qw_l * DIL
        q_mask = q_ok & (qh < H) & (qw < W)
        if STRIDE == 1:
            oh0 = qh0 - DW_PAD
            ow0 = qw0 - DW_PAD
        elif DIL == 1:
            oh0 = qh0 // 2 - DW_PAD // 2
            ow0 = qw0 // 2 - DW_PAD // 2
        else:
            # (qh0 can be odd, and -1, here: the first output whose window reaches qh0,
            # ceil((qh0 - DW_PAD) / 2), computed on non-negative numbers)
            oh0 = (qh0 + DW_PAD + 3) // 2 - DW_PAD - 1
            ow0 = (qw0 + DW_PAD + 3) // 2 - DW_PAD - 1
        ah0 = oh0 * STRIDE - DW_PAD
        aw0 = ow0 * STRIDE - DW_PAD
        # O's rows and columns in the phase, and in the image
        oh_l = oh0 + o_r
        ow_l = ow0 + o_c
        oh = ph + oh_l * PHASES
        ow = pw + ow_l * PHASES
        o_mask = o_ok & (oh_l >= 0) & (oh < HO) & (ow_l >= 0) & (ow < WO)
        # Q's pixels within A, and O's outputs that reach each pixel of Q (per tap, below)
        q_in_a = tl.where(q_ok, (qh0 - ah0 + q_r) * AW + (qw0 - aw0 + q_c), 0)
        x_base = x_ptr + n * sxn
        if HAS_EXPAND:
            acc_gx = tl.zeros([BLOCK_Q, CIN_PAD], dtype=tl.float32)
        gy_pix = n * sgn + oh.to(tl.int64) * sgh + ow.to(tl.int64) * sgw

        for h0 in range(0, HID, BLOCK_H):
            hh = h0 + hl
            h_mask = hh < HID
            z1, a1, _ = _halo(x_base, ph * PHASE_STEP + ah0 * DIL, pw * PHASE_STEP + aw0 * DIL, H, W, sxh, sxw, sxc,
                              w_expand_ptr, b_expand_ptr, hh, h_mask, CIN, HAS_EXPAND, IS_FP32, UPCAST, RELU6, DIL,
                              AH, AW, BLOCK_A, BLOCK_H, BLOCK_CI)
            b_dw = tl.load(b_dw_ptr + hh, mask=h_mask, other=0.0).to(tl.float32)
            z2 = _depthwise(a1, o_r, o_c, o_ok, w_dw_ptr, hh, h_mask, STRIDE, DW_KERNEL, AW, BLOCK_O,
                            BLOCK_H) + b_dw[None, :]
            if MOMENTS:
                alpha = tl.load(alpha_ptr + hh, mask=h_mask, other=0.0).to(tl.float32)
                beta = tl.load(beta_ptr + hh, mask=h_mask, other=0.0).to(tl.float32)
                g_z2 = tl.where(o_mask[:, None], alpha[None, :] + beta[None, :] * z2, 0.0)
            else:
                # g_a2 on O
                g_a2 = _grad_a2(gy_ptr, gy_pix, o_mask, sgc, w_project_ptr, hh, h_mask, COUT, HID, IS_FP32,
                                UPCAST, BLOCK_O, BLOCK_H, BLOCK_CO)
                g_z2 = tl.where(_act_passes(z2, RELU6) & o_mask[:, None], g_a2, 0.0)
            # g_a1 on Q: the transposed taps, gathered from g_z2 on O (Q's pixels sit at
            # O-local (qh_l - oh0) * STRIDE + DW_PAD - dy, ...)
            g_a1 = tl.zeros([BLOCK_Q, BLOCK_H], dtype=tl.float32)
            for tap in range(DW_TAPS):
                w_dw_tap = tl.load(w_dw_ptr + hh * DW_TAPS + tap, mask=h_mask, other=0.0).to(tl.float32)
                g_a1 += _transpose_taps(g_z2, qh_l - oh0 * STRIDE + DW_PAD, qw_l - ow0 * STRIDE + DW_PAD, q_ok, tap,
                                        OTH, OTW, STRIDE, DW_KERNEL, BLOCK_Q, BLOCK_H) * w_dw_tap[None, :]
            if HAS_EXPAND:
                z1q = tl.gather(z1, tl.broadcast_to(q_in_a[:, None], (BLOCK_Q, BLOCK_H)), 0)
                g_z1 = tl.where(_act_passes(z1q, RELU6), g_a1, 0.0)
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


# ---------------------------------------------------------------------------
# Train-mode bn2 statistics: moments of the depthwise output (no bias).

@triton.autotune(configs=_configs(), key=["CIN", "HID", "H", "W", "STRIDE", "DIL", "PHASES", "HAS_EXPAND", "IS_FP32",
                                           "BLOCK_H", "DW_KERNEL", "RELU6", "TH", "TW"], prune_configs_by=_PRUNE)
@_jit
def _moments_kernel(
    x_ptr, w_expand_ptr, b_expand_ptr, w_dw_ptr, part_ptr,
    N, H, W, HO, WO, CIN, HID, N_SPLITS,
    sxn, sxc, sxh, sxw,
    STRIDE: tl.constexpr, HAS_EXPAND: tl.constexpr, IS_FP32: tl.constexpr, UPCAST: tl.constexpr, RELU6: tl.constexpr,
    DW_KERNEL: tl.constexpr, DW_PAD: tl.constexpr, DIL: tl.constexpr, PHASES: tl.constexpr, BLOCK_CI: tl.constexpr,
    TH: tl.constexpr, TW: tl.constexpr, BLOCK_P: tl.constexpr, HALO_H: tl.constexpr, HALO_W: tl.constexpr,
    BLOCK_HALO: tl.constexpr, BLOCK_H: tl.constexpr, WARPS: tl.constexpr,
):
    # Grid (hidden chunks, splits). A program walks its contiguous range of (image, phase,
    # tile) items, computes z2 of its chunk on each tile (the expand once on the tile's halo, as
    # the forward: 1.4x to 2.6x per expanded value) and merges the tile's (count, mean, M2) into running ones (Chan et al.:
    # no cancellation of sum-of-squares). It writes part[0|1|2, split, chunk] = count,
    # mean, M2 (float32).
    pid_h = tl.program_id(0)
    split = tl.program_id(1)
    n_tw, n_tiles, start, end = _split_items(N, HO, WO, N_SPLITS, split, TH, TW, PHASES)
    hh = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = hh < HID
    p = tl.arange(0, BLOCK_P)

    run_n = tl.zeros([BLOCK_H], dtype=tl.float32)
    run_mean = tl.zeros([BLOCK_H], dtype=tl.float32)
    run_m2 = tl.zeros([BLOCK_H], dtype=tl.float32)
    for item in range(start, end):
        n, ph, pw, oh0, ow0, oh, ow, r, c, ok, p_mask = _tile(item, n_tw, n_tiles, p, HO, WO, TH, TW, PHASES)
        _, a1, _ = _halo(x_ptr + n * sxn, _halo_origin(ph, oh0, STRIDE, DIL, PHASES, DW_PAD),
                         _halo_origin(pw, ow0, STRIDE, DIL, PHASES, DW_PAD), H, W, sxh, sxw, sxc,
                         w_expand_ptr, b_expand_ptr, hh, h_mask, CIN, HAS_EXPAND, IS_FP32, UPCAST, RELU6, DIL,
                         HALO_H, HALO_W, BLOCK_HALO, BLOCK_H, BLOCK_CI)
        z2 = _depthwise(a1, r, c, ok, w_dw_ptr, hh, h_mask, STRIDE, DW_KERNEL, HALO_W, BLOCK_P, BLOCK_H)
        # cnt >= 1 without dilation: every tile holds an output pixel; a dilated phase's tile
        # can hold none (then so can both, at the start of a split)
        cnt = tl.sum(p_mask.to(tl.float32), axis=0)
        tile_mean = tl.sum(tl.where(p_mask[:, None], z2, 0.0), axis=0) / _divisor(cnt, PHASES > 1)
        d = tl.where(p_mask[:, None], z2 - tile_mean[None, :], 0.0)
        tile_m2 = tl.sum(d * d, axis=0)
        both = run_n + cnt
        delta = tile_mean - run_mean
        run_mean += delta * (cnt / _divisor(both, PHASES > 1))
        run_m2 += tile_m2 + delta * delta * (run_n * cnt / _divisor(both, PHASES > 1))
        run_n = both
    off = split.to(tl.int64) * HID + hh
    # (tl.cast, not .to: an argument equal to 1 arrives as a constexpr, which has no .to)
    plane = tl.cast(N_SPLITS, tl.int64) * HID
    tl.store(part_ptr + off, run_n, mask=h_mask)
    tl.store(part_ptr + plane + off, run_mean, mask=h_mask)
    tl.store(part_ptr + 2 * plane + off, run_m2, mask=h_mask)


# ---------------------------------------------------------------------------
# Host side.

def check_inputs(x, w_expand, b_expand, w_dw, b_dw, w_project, b_project, stride, residual, grad_y=None,
                 dilation=1, activation="relu6"):
    """Validates the block's arguments; returns (hidden, cout). Raises ValueError/RuntimeError."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"mnv2 triton: x must be a 4-D tensor (N, C, H, W), got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x)}")
    if x.dtype not in _TORCH_TO_TL_OK:
        raise ValueError(f"mnv2 triton: dtype {x.dtype} is not supported (float32, float16, bfloat16)")
    if stride not in (1, 2):
        raise ValueError(f"mnv2 triton: stride must be 1 or 2, got {stride}")
    if isinstance(dilation, bool) or not isinstance(dilation, int) or dilation < 1:
        raise ValueError(f"mnv2 triton: dilation must be an integer >= 1, got {dilation!r}")
    relu6_flag(activation)
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
    if w_dw.dim() != 3:
        raise ValueError(f"mnv2 triton: w_dw must be (hidden, k, k), got {tuple(w_dw.shape)}")
    if w_dw.shape[1] != w_dw.shape[2] or kernel_size(w_dw) not in DW_KERNELS:
        raise ValueError(f"mnv2 triton: w_dw must be (hidden, k, k): the depthwise kernel must be 3x3, 5x5 or 7x7, "
                         f"got {w_dw.shape[1]}x{w_dw.shape[2]}")
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
        ho, wo = output_size(h, w, stride, dilation, kernel_size=kernel_size(w_dw))
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


def _launch_forward(traceable, x, w_expand, b_expand, w_dw, b_dw, w_project, b_project, stride, residual, y,
                    dilation=1, activation="relu6"):
    """Launches the forward kernel (through torch.library.wrap_triton when ``traceable``)."""
    n, cin, h, w = x.shape
    hidden, cout = w_dw.shape[0], w_project.shape[0]
    k = kernel_size(w_dw)
    ho, wo = y.shape[2], y.shape[3]
    dilation = _effective_dilation(dilation, h, w)
    lattice_stride, phases = _lattice(stride, dilation)
    # the outputs of a phase (the largest)
    hp, wp = triton.cdiv(ho, phases), triton.cdiv(wo, phases)
    has_expand = w_expand is not None
    w_expand_arg = w_expand if has_expand else w_dw  # dummy pointer when t == 1 (never read)
    b_expand_arg = b_expand if has_expand else b_dw
    cin_pad, cout_pad = _pad(cin), _pad(cout)
    is_fp32 = x.dtype == torch.float32
    # float32 with a wide Cout: eight warps, for the [tile, Cout] accumulator and the FMA
    # dot's [BLOCK_H, Cout] operand
    warps = 8 if is_fp32 and cout_pad >= 256 else 4
    th, tw = _out_tile(hp, wp, lattice_stride, cin_pad if has_expand else 0, cout_pad,
                       _ACC // 2 * (warps // 4) if is_fp32 else _ACC, 0, 64 if is_fp32 else 256, k)
    halo_h, halo_w = _halo_side(th, lattice_stride, k), _halo_side(tw, lattice_stride, k)
    block_halo = _pow2(halo_h * halo_w)
    block_h = _hidden_chunk(block_halo, is_fp32)
    grid = (n * phases * phases * triton.cdiv(hp, th) * triton.cdiv(wp, tw),)
    (wrap_triton(_fwd_kernel) if traceable else _fwd_kernel)[grid](
        x, w_expand_arg, b_expand_arg, w_dw, b_dw, w_project, b_project, y,
        h, w, ho, wo, cin, hidden, cout,
        x.stride(0), x.stride(1), x.stride(2), x.stride(3),
        y.stride(0), y.stride(1), y.stride(2), y.stride(3),
        STRIDE=lattice_stride, HAS_EXPAND=has_expand, RESIDUAL=bool(residual), IS_FP32=x.dtype == torch.float32,
        UPCAST=_upcast(x), RELU6=relu6_flag(activation), DW_KERNEL=k, DW_PAD=k // 2, DIL=dilation, PHASES=phases,
        BLOCK_CI=_block_ci(cin, x.dtype), COUT_PAD=cout_pad,
        TH=th, TW=tw, BLOCK_P=_pow2(th * tw), HALO_H=halo_h, HALO_W=halo_w, BLOCK_HALO=block_halo,
        BLOCK_H=block_h, WARPS=_halo_warps(warps, block_halo, block_h, k),
    )
    return y


def forward(x, w_expand, b_expand, w_dw, b_dw, w_project, b_project, stride, residual, dilation=1,
            activation="relu6", traceable=False):
    """The fused block (see mnv2_kernels.reference.inverted_residual): the depthwise convolution
    of w_dw's kernel size k (3, 5 or 7), dilated by ``dilation`` (padding k // 2 * dilation: the
    output size does not change), ``activation`` ("relu6" or "relu") after the expand and after
    the depthwise step; y in x's memory format."""
    check_inputs(x, w_expand, b_expand, w_dw, b_dw, w_project, b_project, stride, residual, dilation=dilation,
                 activation=activation)
    w_expand, b_expand, w_dw, b_dw, w_project, b_project = map(
        _contig_w, (w_expand, b_expand, w_dw, b_dw, w_project, b_project))
    ho, wo = output_size(x.shape[2], x.shape[3], stride, dilation, kernel_size=kernel_size(w_dw))
    y = output_like(x, w_project.shape[0], ho, wo)
    if y.numel() == 0:
        return y
    return _launch_forward(traceable, x, w_expand, b_expand, w_dw, b_dw, w_project, b_project,
                           stride, residual, y, dilation, activation)


def backward(grad_y, x, w_expand, b_expand, w_dw, b_dw, w_project, b_project, stride, residual,
             dilation=1, activation="relu6", traceable=False):
    """The 7 gradients (grad_x, grad_w_expand, grad_b_expand, grad_w_dw, grad_b_dw,
    grad_w_project, grad_b_project) of forward(), in the input dtypes. Without w_expand,
    grad_w_expand is (0, 0) and grad_b_expand is (0,)."""
    hidden, cout = check_inputs(x, w_expand, b_expand, w_dw, b_dw, w_project, b_project, stride,
                                residual, grad_y=grad_y, dilation=dilation, activation=activation)
    k = kernel_size(w_dw)
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
                z(hidden, k, k), z(hidden), z(cout, hidden), z(cout))
    grad_x, g_w_expand_parts, g_b_expand_parts, g_w_dw_parts, g_b_dw_parts, g_w_project_parts = _launch_backward(
        traceable, grad_y, x, w_expand, b_expand, w_dw, b_dw, w_project, stride, residual, None, dilation,
        activation)
    dt = x.dtype
    if has_expand:
        g_w_expand = g_w_expand_parts.sum(0).to(dt)
        g_b_expand = g_b_expand_parts.sum(0).to(dt)
    else:
        g_w_expand = x.new_empty((0, 0))
        g_b_expand = x.new_empty((0,))
    g_w_dw = g_w_dw_parts.sum(0).view(hidden, k, k).to(dt)
    g_b_dw = g_b_dw_parts.sum(0).to(dt)
    g_w_project = g_w_project_parts.sum(0).to(dt)
    g_b_project = grad_y.sum(dim=(0, 2, 3), dtype=torch.float32).to(dt)
    return grad_x, g_w_expand, g_b_expand, g_w_dw, g_b_dw, g_w_project, g_b_project


def _launch_backward(traceable, grad_y, x, w_expand, b_expand, w_dw, b_dw, w_project, stride, residual,
                     moments, dilation=1, activation="relu6"):
    """Launches the weight-gradient and input-gradient kernels; returns grad_x and the float32
    per-split partials of (g_w_expand, g_b_expand, g_w_dw, g_b_dw, g_w_project). ``moments`` =
    (alpha, beta): the backward of the depthwise moments instead (grad_y and w_project are then
    not read)."""
    n, cin, h, w = x.shape
    hidden, cout = w_dw.shape[0], w_project.shape[0]
    k = kernel_size(w_dw)
    relu6 = relu6_flag(activation)
    ho, wo = output_size(h, w, stride, dilation, kernel_size=k)
    dilation = _effective_dilation(dilation, h, w)
    lattice_stride, phases = _lattice(stride, dilation)
    # the outputs of a phase, and the input pixels of a phase's lattice (the largest)
    hp, wp = triton.cdiv(ho, phases), triton.cdiv(wo, phases)
    hl, wl = triton.cdiv(h, dilation), triton.cdiv(w, dilation)
    has_expand = w_expand is not None
    w_expand_arg = w_expand if has_expand else w_dw
    b_expand_arg = b_expand if has_expand else b_dw
    alpha, beta = moments if moments is not None else (b_dw, b_dw)  # dummy pointers when not read
    dev = x.device
    f32 = torch.float32
    cin_pad = _pad(cin)
    # (the moments mode reads no grad_y: Cout does not count)
    cout_pad = _pad(cout) if moments is None else 16
    is_fp32 = x.dtype == torch.float32
    sms = _sm_count(dev)

    # (a) weight gradients: about 4 programs per SM in total, at most ~4 items per
    # split (bounded by the number of (image, tile) items).
    # (a smaller budget than the forward's: this kernel holds [Cout, BLOCK_H] and
    # [BLOCK_H, Cin] accumulators and w_project and w_expand chunks besides)
    # Float32 tiles of an NCHW input (channels strided) take a layout change in registers
    # on their way to the dots: half the halo, and grad_y in 32-channel slices.
    budget = _ACC // 2 if is_fp32 else _ACC
    max_halo = 32 if is_fp32 and x.stride(1) != 1 else 64
    th, tw = _out_tile(hp, wp, lattice_stride, cin_pad if has_expand else 0, min(cout_pad, 128), budget,
                       budget if has_expand else 0, max_halo, k)
    halo_h, halo_w = _halo_side(th, lattice_stride, k), _halo_side(tw, lattice_stride, k)
    block_halo = _pow2(halo_h * halo_w)
    block_h = 16  # (its [halo, BLOCK_H] tiles a1, z1, g_a1 and the accumulators)
    n_chunks = triton.cdiv(hidden, block_h)
    items = n * phases * phases * triton.cdiv(hp, th) * triton.cdiv(wp, tw)
    n_splits = max(1, min(items, triton.cdiv(4 * sms, n_chunks), 64 if not INTERPRET else 2))
    he = hidden if has_expand else 1
    g_w_expand_parts = torch.empty((n_splits, he, cin if has_expand else 1), dtype=f32, device=dev)
    g_b_expand_parts = torch.empty((n_splits, he), dtype=f32, device=dev)
    g_w_dw_parts = torch.empty((n_splits, hidden, k * k), dtype=f32, device=dev)
    g_b_dw_parts = torch.empty((n_splits, hidden), dtype=f32, device=dev)
    g_w_project_parts = torch.empty((n_splits, cout, hidden) if moments is None else (1, 1, 1), dtype=f32,
                                    device=dev)
    co_w = min(cout_pad, 128)
    (wrap_triton(_bwd_weight_kernel) if traceable else _bwd_weight_kernel)[(n_chunks, n_splits, triton.cdiv(cout, co_w))](
        grad_y, x, w_expand_arg, b_expand_arg, w_dw, b_dw, w_project, alpha, beta,
        g_w_expand_parts, g_b_expand_parts, g_w_dw_parts, g_b_dw_parts, g_w_project_parts,
        n, h, w, ho, wo, cin, hidden, cout, n_splits,
        x.stride(0), x.stride(1), x.stride(2), x.stride(3),
        grad_y.stride(0), grad_y.stride(1), grad_y.stride(2), grad_y.stride(3),
        STRIDE=lattice_stride, HAS_EXPAND=has_expand, RESIDUAL=bool(residual), IS_FP32=is_fp32, UPCAST=_upcast(x),
        MOMENTS=moments is not None, RELU6=relu6, DW_KERNEL=k, DW_PAD=k // 2, DIL=dilation, PHASES=phases,
        DW_TAPS_PAD=triton.next_power_of_2(k * k),
        CIN_PAD=cin_pad, COUT_PAD=cout_pad, BLOCK_CO=min(cout_pad, 32 if max_halo == 32 else 64), CO_W=co_w,
        TH=th, TW=tw, BLOCK_P=_pow2(th * tw), HALO_H=halo_h, HALO_W=halo_w, BLOCK_HALO=block_halo,
        BLOCK_H=block_h, WARPS=_warps(block_halo, block_h, is_fp32),
    )

    # (b) input gradient
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=dev, memory_format=_memory_format(x))
    if lattice_stride != stride:
        # (stride 2, even dilation: the phases' lattices hold the even rows and columns only; the
        # others are under no depthwise tap, and the kernel does not visit them)
        grad_x.zero_()
    tqh, tqw = _in_tile(hl, wl, lattice_stride, cin_pad if has_expand else 0, cout_pad, _ACC // 2,
                        max_halo if is_fp32 else 256, k)
    oth, otw, ah, aw = _in_halos(tqh, tqw, lattice_stride, k)
    block_a = _pow2(ah * aw)
    n_items = n * phases * phases * triton.cdiv(hl, tqh) * triton.cdiv(wl, tqw)
    nprog = max(1, min(n_items, 4 * sms if not INTERPRET else 2))
    block_h = _hidden_chunk(block_a, is_fp32)
    (wrap_triton(_bwd_input_kernel) if traceable else _bwd_input_kernel)[(nprog,)](
        grad_y, x, w_expand_arg, b_expand_arg, w_dw, b_dw, w_project, alpha, beta, grad_x,
        n, h, w, ho, wo, cin, hidden, cout, nprog,
        x.stride(0), x.stride(1), x.stride(2), x.stride(3),
        grad_y.stride(0), grad_y.stride(1), grad_y.stride(2), grad_y.stride(3),
        grad_x.stride(0), grad_x.stride(1), grad_x.stride(2), grad_x.stride(3),
        STRIDE=lattice_stride, HAS_EXPAND=has_expand, RESIDUAL=bool(residual), IS_FP32=is_fp32, UPCAST=_upcast(x),
        MOMENTS=moments is not None, RELU6=relu6, DW_KERNEL=k, DW_PAD=k // 2, DIL=dilation, PHASES=phases,
        CIN_PAD=cin_pad, BLOCK_CI=_block_ci(cin, x.dtype, block_a), BLOCK_CO=min(cout_pad, 64),
        TQH=tqh, TQW=tqw, BLOCK_Q=_pow2(tqh * tqw), OTH=oth, OTW=otw, BLOCK_O=_pow2(oth * otw),
        AH=ah, AW=aw, BLOCK_A=block_a, BLOCK_H=block_h, WARPS=_warps(block_a, block_h, is_fp32),
    )

    return grad_x, g_w_expand_parts, g_b_expand_parts, g_w_dw_parts, g_b_dw_parts, g_w_project_parts


def moments(x, w_expand, b_expand, w_dw, stride, dilation=1, activation="relu6"):
    """Train-mode bn2 statistics: the per-channel mean and biased variance (float32) of the
    depthwise output z2 = dw(act(x @ w_expand^T + b_expand)) (no bias; z2 = dw(x) when
    w_expand is None; dw: w_dw's k x k, dilated by ``dilation``; act: ``activation``),
    streamed: per-program (count, mean, M2) partials merged with Chan's formula, then
    combined in float64 on the host. Nothing hidden-sized is stored."""
    _check_moments_inputs(x, w_expand, b_expand, w_dw, stride, dilation, activation)
    n, cin, h, w = x.shape
    hidden = w_dw.shape[0]
    k = kernel_size(w_dw)
    ho, wo = output_size(h, w, stride, dilation, kernel_size=k)
    dilation = _effective_dilation(dilation, h, w)
    lattice_stride, phases = _lattice(stride, dilation)
    hp, wp = triton.cdiv(ho, phases), triton.cdiv(wo, phases)
    w_expand, b_expand, w_dw = map(_contig_w, (w_expand, b_expand, w_dw))
    has_expand = w_expand is not None
    dev = x.device
    if n * ho * wo == 0:
        nan = torch.full((hidden,), float("nan"), dtype=torch.float32, device=dev)
        return nan, nan.clone()
    cin_pad = _pad(cin)
    is_fp32 = x.dtype == torch.float32
    th, tw = _out_tile(hp, wp, lattice_stride, cin_pad if has_expand else 0, 16, 0, 0, 64 if is_fp32 else 256, k)
    halo_h, halo_w = _halo_side(th, lattice_stride, k), _halo_side(tw, lattice_stride, k)
    block_halo = _pow2(halo_h * halo_w)
    block_h = _hidden_chunk(block_halo, is_fp32)
    items = n * phases * phases * triton.cdiv(hp, th) * triton.cdiv(wp, tw)
    n_chunks = triton.cdiv(hidden, block_h)
    n_splits = max(1, min(items, triton.cdiv(4 * _sm_count(dev), n_chunks), 2 if INTERPRET else 256))
    part = torch.empty((3, n_splits, hidden), dtype=torch.float32, device=dev)
    _moments_kernel[(n_chunks, n_splits)](
        x, w_expand if has_expand else w_dw, b_expand if has_expand else w_dw, w_dw, part,
        n, h, w, ho, wo, cin, hidden, n_splits,
        x.stride(0), x.stride(1), x.stride(2), x.stride(3),
        STRIDE=lattice_stride, HAS_EXPAND=has_expand, IS_FP32=x.dtype == torch.float32, UPCAST=_upcast(x),
        RELU6=relu6_flag(activation), DW_KERNEL=k, DW_PAD=k // 2, DIL=dilation, PHASES=phases,
        BLOCK_CI=_block_ci(cin, x.dtype),
        TH=th, TW=tw, BLOCK_P=_pow2(th * tw), HALO_H=halo_h, HALO_W=halo_w, BLOCK_HALO=block_halo,
        BLOCK_H=block_h, WARPS=_halo_warps(4, block_halo, block_h, k),
    )
    cnt, mean_s, m2_s = part.double().unbind(0)
    total = cnt.sum(0)
    mean = (cnt * mean_s).sum(0) / total
    m2 = m2_s.sum(0) + (cnt * (mean_s - mean) ** 2).sum(0)
    return mean.float(), (m2 / total).float()


def moments_backward(x, w_expand, b_expand, w_dw, stride, alpha, beta, dilation=1, activation="relu6"):
    """Gradients (x, w_expand, b_expand, w_dw) of sum_c sum_pixels (alpha_c z2 + beta_c z2^2 / 2):
    the backward of moments() with grad_z2 = alpha + beta * z2, recomputed per tile by the
    fused backward kernels in their moments mode. In the input dtypes; None for the absent
    expand."""
    _check_moments_inputs(x, w_expand, b_expand, w_dw, stride, dilation, activation)
    hidden = w_dw.shape[0]
    k = kernel_size(w_dw)
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
        False, x, x, w_expand, b_expand, w_dw, zero_bias, stand_in_project, stride, False, (alpha, beta), dilation,
        activation)
    g_w_dw = g_w_dw_parts.sum(0).view(hidden, k, k).to(dt)
    if not has_expand:
        return grad_x, None, None, g_w_dw
    return grad_x, g_w_expand_parts.sum(0).to(dt), g_b_expand_parts.sum(0).to(dt), g_w_dw


def _check_moments_inputs(x, w_expand, b_expand, w_dw, stride, dilation, activation):
    hidden = w_dw.shape[0] if isinstance(w_dw, torch.Tensor) and w_dw.dim() == 3 else 1
    check_inputs(x, w_expand, b_expand, w_dw, w_dw.new_zeros(hidden) if isinstance(w_dw, torch.Tensor) else None,
                 x.new_zeros((1, hidden)), x.new_zeros(1), stride, False, dilation=dilation, activation=activation)
