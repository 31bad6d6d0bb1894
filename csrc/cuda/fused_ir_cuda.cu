// CUDA implementation of mnv2::fused_inverted_residual and its backward.
//
//   a1 = relu6(w_expand x + b_expand)   (a1 = x when t == 1)   hidden channels, never in HBM
//   a2 = relu6(dw(a1, w_dw) + b_dw)                             hidden channels, never in HBM
//   y  = w_project a2 + b_project (+ x)
//
// dw is the depthwise convolution of core/shape.h at k = 3: kDwKernel x kDwKernel taps
// (kDwTaps in all), stride 1 or 2, zero padding kDwPad. Other kernel sizes, and ReLU
// instead of ReLU6, are refused (the Triton backend runs them).
//
// Conventions shared by every kernel
// ----------------------------------
// * 256 threads per block (8 warps). Hidden channels are processed in chunks of
//   KC = 32, one chunk channel per lane: element e of a [pixels x KC] shared
//   array is (pixel e / 32, channel e % 32), so a warp works on one pixel and 32
//   consecutive channels (conflict-free shared accesses, coalesced global
//   accesses for channels_last tensors).
// * All arithmetic and all shared memory use the accumulation type A (fp32 for
//   fp32/fp16/bf16, fp64 for fp64); inputs are converted on load and outputs
//   cast once on store. The small GEMMs (expand, project, grad_a2) are
//   register-blocked FFMA, 4 rows x 1 column per thread with 16-byte shared
//   loads of the activation rows, except in the fp16 / bf16 forward (below).
// * Tensor cores (fp16 / bf16 forward only, kTensorCores<T>): the expand and the
//   project run as TF32 WMMA (m16n16k8, fp32 accumulators) on the same fp32
//   shared arrays, 16 x 16 output tiles spread over the 8 warps (mma_expand,
//   mma_project). fp16 and bf16 values are exact in TF32 (11- and 8-bit
//   significands vs TF32's 11, and TF32 has fp32's exponent range), so the
//   expand's products are exact; only a2, an fp32 intermediate, is rounded to
//   TF32 for the project: the same relative precision (2^-11) as the fp16
//   rounding cuDNN applies to its intermediate activations. Accumulation stays
//   fp32. The fp32 / fp64 forward and every backward kernel keep the FFMA code
//   (the kTC branches are compile-time; their code is unchanged). The WMMA
//   operand arrays get rows of KT = 36 floats (project weights: transposed,
//   rows of round16(Cout) + 8), row counts padded to 16 and the padding zeroed
//   (see fwd_layout, mma_expand, mma_project and the kernel).
// * Global tensors are addressed through their element strides (x, y, grad_y,
//   grad_x): NCHW, channels_last and arbitrary strided views are read and
//   written in place, nothing is converted. channels_last is the fast layout
//   (channel loads are contiguous across a warp); NCHW is correct but its loads
//   are strided. Weights are made contiguous by the host glue (tiny copies).
// * The K dimension of every small GEMM (Cin for the expand, Cout for grad_a2)
//   is walked in sub-chunks of KI = 32: the activation sub-tile [pixels x 32]
//   goes to As, the weight sub-tile [32 x 32] (padded to 33) to Bs.
// * a1 is exactly 0 at padded positions (outside the image), never relu6(b_expand).
//   ReLU6 gradient masks are recovered from the activations: 0 < z < 6 iff
//   0 < relu6(z) < 6, so only a1 / a2 are kept.
//
// Forward (fused_ir_fwd_kernel): one block per (image, TH x TW output tile).
//   Region of a1 needed: RH x RW = ((TH-1)s+kDwKernel) x ((TW-1)s+kDwKernel)
//   input pixels (tile plus halo). Per hidden chunk: a1 (expand over Cin
//   sub-chunks, bias, ReLU6, zero outside the image) -> a1s; depthwise + bias +
//   ReLU6 -> a2s; project ys[P x Cout] += a2s w_project[:, chunk]^T (fp32 in
//   shared memory). Epilogue: + b_project (+ x), cast, store. Shared memory
//   (elements of A, see fwd_layout):
//     FFMA (fp32, fp64):
//       P*Cout + M*KC + P*KC + M*KI + KC*33 + Cout*33 + KC*(kDwTaps+1),  P = TH*TW, M = RH*RW
//     tensor cores (fp16, bf16), with P', M', C' = P, M, Cout rounded up to 16:
//       P'*C' + M'*KC + P'*36 + M'*36 + KC*36 + KC*(C'+8) + KC*(kDwTaps+1)
//       (ys [P'][C'], a1s [M'][KC], a2s [P'][36], As [M'][36], Bs [KC][36],
//       project weights transposed [KC][C'+8])
//   (each array rounded up to 8 elements). Output tile 8x8, or 7x7 on 7x7
//   images, 3x3 depthwise; fp32 (A = fp32) / fp16 and bf16 (A = fp32,
//   tensor-core layout):
//     Cin  32 hidden  32 Cout  16 s1 112x112:  44 /  52 KB
//     Cin  24 hidden 144 Cout  24 s1  56x56:   48 /  58 KB
//     Cin  64 hidden 384 Cout  64 s1  14x14:   63 /  70 KB
//     Cin 160 hidden 960 Cout 320 s1   7x7:   135 / 161 KB
//     Cin  16 hidden  96 Cout  24 s2:          95 / 109 KB
//     Cin  24 hidden 144 Cout  32 s2:          98 / 109 KB
//     Cin  96 hidden 576 Cout 160 s2:         119 / 140 KB
//   (the padding grows the fp16 / bf16 sizes by 7-27 KB; they all still fit
//   sm_80's 163 KB at the 8x8 / 7x7 tile, the largest with under 2 KB to spare).
//   The tile starts at 8x8 (narrower for W < 8, taller up to 64 pixels when
//   W < 8) and is halved until it fits the device's opt-in shared memory per
//   block (227 KB on sm_90, 163 KB on sm_80); a TORCH_CHECK fires if even a 1x1
//   tile does not fit (only for channel counts far beyond MobileNetV2's).
//
// Backward, weight gradients (fused_ir_bwd_weights_kernel): grid (n_parts,
//   n_chunks). A block owns one hidden chunk and a contiguous range of the
//   (image, output tile) items; per item it recomputes a1 (tile + halo) and a2,
//   forms g_a2 = grad_y w_project[:, chunk] (GEMM over Cout sub-chunks, grad_y
//   loaded per sub-chunk), accumulates g_w_project += grad_y^T a2, masks g_z2,
//   accumulates g_b_dw and g_w_dw (per-warp partial sums combined in fixed warp
//   order), gathers g_a1 on the halo from the block's own g_z2 (no cross-block
//   traffic), masks g_z1 = g_a1 (0 < a1 < 6) (zero outside the image) and
//   accumulates g_b_expand and g_w_expand += g_z1^T x. The partial sums of the
//   CTAs that share a chunk are combined deterministically (every element owned by one
//   thread, parts added in a fixed order), in one of two modes (bwdw_ordered):
//   - ordered (whenever the accumulators fit beside the full tile, which they do for
//     every MobileNetV2 block): a CTA accumulates its chunk's gradients in shared
//     memory (chunk_grad_floats: 32*(Cout+Cin+11) elements, e.g. 63 KB for 160->960->320
//     in fp32), then waits for its turn (a ticket from an atomic counter gives each CTA
//     its (chunk, part); the part before it has started, so the wait cannot deadlock)
//     and adds them into a single slot [Cout*hidden + (kDwTaps+2)*hidden + hidden*Cin]
//     (see GradOffsets) in part order; that slot is the result. One slot at any number
//     of parts, so the grid is free to fill the GPU.
//   - private slots: each CTA adds into its own part's slot of a zero-initialised buffer
//     [n_parts][slot], which the host reduces with at::sum over dim 0.
//   n_parts: plan_bwd_weights_grid (host-pure, see plan_split): the fewest parts that
//   give at least two full waves of CTAs (SMs x CTAs resident per SM, from the occupancy
//   API) and come within 10% of the ideal modelled time, with the buffer at most a
//   quarter of the hidden tensor's element count N*hidden*Ho*Wo (nothing hidden-sized is
//   allocated; private slots only: an eighth when two waves are out of reach).
//   grad_b_project = grad_y summed over (N, H, W) by at::sum. Shared memory
//   (elements of A):
//     2*M*KC + 2*P*KC + M*KI + KC*33 + KC*(kDwTaps+1) + 8*KC*(kDwTaps+1),
//   independent of the channel counts (3x3: 69 KB (s1, 8x8 tile), 140 KB (s2,
//   8x8), 58 KB (s1, 7x7), 112 KB (s2, 7x7)), plus the ordered mode's accumulators.
//
// Backward, grad_x (fused_ir_bwd_input_kernel): grid (N * tiles, n_splits), a
//   block per (image, TQH x TQW input tile Q, range of hidden chunks). The output
//   pixels whose windows touch Q form an OH x OW box
//   (OH <= (TQH+2*kDwPad-1)/s + 1); their a1 region is ((OH-1)s+kDwKernel) x
//   ((OW-1)s+kDwKernel) (Q plus a 2*kDwPad-pixel halo). Per chunk: stage
//   w_expand[chunk] ([KC][Cin], coalesced) in shared memory, recompute a1
//   (region), a2 (box), g_z2 (box, via the same Cout sub-chunk GEMM), gather
//   g_a1 on Q (stride 2: only taps with an integral output position), mask with
//   0 < a1 < 6, and accumulate gxs[Q x Cin] += g_z1 w_expand[chunk] (register-
//   blocked like gemm_acc, 4 rows of a column per thread, the terms added in
//   chunk-channel order; t == 1: gxs[:, chunk] += g_a1). Epilogue: + grad_y when
//   residual (split 0 only), then with one split (n_splits == 1) cast and store; with
//   more, the splits of an item take turns as the weight kernel's ordered mode does:
//   split 0 stores its sums into an A-typed buffer [N][H][W][Cin], the middle ones add
//   theirs, the last adds its own, casts and stores into grad_x (deterministic).
//   n_splits: plan_bwd_input_grid, the same rule as n_parts with the chunks as the units
//   split and the one buffer bounded by a quarter of the hidden tensor (every stride-1
//   block with an expand of 6: a sixth), so the 14x14 and 7x7 blocks split their chunks
//   to fill two waves.
//   Shared memory (elements of A):
//     QP*Cin + KC*Cin (expand only) + QP*KC + R*KC + 2*O*KC + R*KI + KC*33 + KC*(kDwTaps+1)
//   e.g. 8x8 or 7x7 input tile, 3x3: 56-113 KB over the MobileNetV2 blocks (113 KB for Cin 160).
//
// Backward tiles are balanced: after the halving above, a tile shrinks to the
//   smallest one with the same tile counts (a 14- or 28-pixel side: 7-pixel tiles
//   rather than 8 + 6 or 8 + 8 + 8 + 4), so that no CTA's item is cut short and
//   the largest does less work (plan_tile; the forward keeps its tiles).
//
// Streams and errors: every launch goes to the current stream
// (c10::cuda::getCurrentCUDAStream(), the same object at::cuda:: returns; the
// ATen/cuda/CUDAContext.h header is avoided because it includes cusparse.h,
// which the build machine's toolkit lacks) under a CUDAGuard for x's device,
// followed by C10_CUDA_KERNEL_LAUNCH_CHECK(); cudaFuncSetAttribute and the
// device-attribute and occupancy queries go through C10_CUDA_CHECK.
//
// Layout of this file: the launch planning (shared-memory layouts and sizes,
// tiles, backward grids) comes first and is host-pure C++; compiled with
// -DMNV2_CUDA_PLAN_ONLY the file keeps only that part, which
// tests/test_cuda_compile.py builds into a host program to check the plans
// without a GPU. Then the device code, the launchers and the registration.
#ifndef MNV2_CUDA_PLAN_ONLY
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda/atomic>
#include <cuda_runtime.h>
#include <mma.h>
#include <torch/library.h>
#endif

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>

#include "core/fused_ir.h"
#ifndef MNV2_CUDA_PLAN_ONLY
#include "glue_checks.h"
#endif

namespace mnv2 {
namespace cuda {
namespace {

// The CUDA kernel computes the 3x3 depthwise step with ReLU6 only (check_block refuses
// other kernel sizes and activations; the Triton backend runs them).
constexpr int kDwKernel = 3;
constexpr int kDwTaps = kDwKernel * kDwKernel;
constexpr int kDwPad = kDwKernel / 2;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int KC = 32;      // hidden channels per chunk (one per lane)
constexpr int KI = 32;      // K sub-chunk of the small GEMMs
constexpr int KB = KI + 1;  // padded row of the weight sub-tile Bs
constexpr int KP = KC + 1;  // padded row of the staged project weights
// Per-channel sums of the weight-gradient kernel's depthwise reduction: the
// kDwTaps taps of g_w_dw, then g_b_dw.
constexpr int kDwSums = kDwTaps + 1;
// Tensor-core forward (fp16 / bf16): row length of the WMMA operand arrays As,
// a2s and Bs (a multiple of 4 floats as WMMA needs; 36 rather than 32 makes the
// fragment loads conflict-free; the transposed project weights use
// fwd_ldw_tc), and the row-count granularity of every array a 16 x 16 WMMA
// tile covers.
constexpr int KT = KC + 4;
constexpr int kTile = 16;
static_assert(KI == KC && KC % 16 == 0 && KT % 4 == 0, "WMMA tiling assumes KI == KC == 32");

// ---------------------------------------------------------------------------
// Launch planning: shared-memory layouts and sizes, tiles, grids. Host-pure (no
// CUDA or ATen calls), so that tests/test_cuda_compile.py can compile this part
// alone (-DMNV2_CUDA_PLAN_ONLY, everything after it is left out) and check it
// without a GPU.
// ---------------------------------------------------------------------------

// Shared-memory layouts (element offsets, each array 32-byte aligned), shared by
// the kernels and the host-side size computation.
__host__ __device__ constexpr int64_t align8(int64_t n) { return (n + 7) / 8 * 8; }
__host__ __device__ constexpr int64_t round16(int64_t n) { return (n + kTile - 1) / kTile * kTile; }

// Row stride of the forward's ys: Cout (FFMA), Cout rounded up to 16 (tensor cores).
// fwd_ldw_tc: row stride of the tensor-core path's transposed project weights
// w_project_s[j][co], round16(Cout) + 8 (8 or 24 mod 32: conflict-free row-major B fragments).
template <bool kTC>
__host__ __device__ inline int fwd_ldy(int Cout) {
  return kTC ? static_cast<int>(round16(Cout)) : Cout;
}
__host__ __device__ inline int fwd_ldw_tc(int Cout) { return fwd_ldy<true>(Cout) + 8; }

struct FwdLayout {
  int64_t ys, a1s, a2s, As, Bs, w_project, w_dw, b_dw, total;
};
template <bool kTC>
__host__ __device__ inline FwdLayout fwd_layout(int P, int M, int Cout) {
  FwdLayout l{};
  int64_t o = 0;
  if constexpr (kTC) {  // rows padded to 16 (WMMA tiles), operand rows of KT floats
    const int64_t Pp = round16(P), Mp = round16(M), Cp = fwd_ldy<true>(Cout);
    const int64_t ldw = fwd_ldw_tc(Cout);
    l.ys = o;  o = align8(o + Pp * Cp);    // [Pp][Cp] fp32 output accumulators (C of the project)
    l.a1s = o; o = align8(o + Mp * KC);    // [Mp][KC] a1 of the chunk (C of the expand)
    l.a2s = o; o = align8(o + Pp * KT);    // [Pp][KT] a2 of the chunk (A of the project)
    l.As = o;  o = align8(o + Mp * KT);    // [Mp][KT] x sub-tile (A of the expand)
    l.Bs = o;  o = align8(o + KC * KT);    // [KC][KT] w_expand sub-tile (B, col-major)
    l.w_project = o; o = align8(o + KC * ldw);  // [KC][Cp + 8] w_project[:, chunk]^T (B, row-major)
  } else {
    l.ys = o;  o = align8(o + int64_t(P) * Cout);            // [P][Cout] fp32 output accumulators
    l.a1s = o; o = align8(o + int64_t(M) * KC);              // [M][KC] a1 (tile + halo)
    l.a2s = o; o = align8(o + int64_t((P + 3) / 4 * 4) * KC); // [P rounded to 4][KC] a2
    l.As = o;  o = align8(o + int64_t(M) * KI);              // [M][KI] x sub-tile
    l.Bs = o;  o = align8(o + KC * KB);                      // [KC][KB] w_expand sub-tile
    l.w_project = o; o = align8(o + int64_t(Cout) * KP);  // [Cout][KP] w_project[:, chunk]
  }
  l.w_dw = o; o = align8(o + KC * kDwTaps);
  l.b_dw = o; o = align8(o + KC);
  l.total = o;
  return l;
}

struct BwdWLayout {
  int64_t a1s, ga1s, a2s, gz2s, As, Bs, w_dw, b_dw, red, acc, total;
};
// acc_floats: the chunk's weight-gradient accumulators of the ordered mode
// (chunk_grad_floats), 0 in the private-slot mode.
__host__ __device__ inline BwdWLayout bwdw_layout(int P, int M, int64_t acc_floats) {
  BwdWLayout l{};
  int64_t o = 0;
  l.a1s = o;  o = align8(o + int64_t(M) * KC);         // [M][KC] a1 (tile + halo)
  l.ga1s = o; o = align8(o + int64_t(M) * KC);         // [M][KC] g_z1 (tile + halo)
  l.a2s = o;  o = align8(o + int64_t(P) * KC);         // [P][KC] a2
  l.gz2s = o; o = align8(o + int64_t(P) * KC);         // [P][KC] g_z2
  l.As = o;   o = align8(o + int64_t(M) * KI);         // [M][KI] x or grad_y sub-tile
  l.Bs = o;   o = align8(o + KC * KB);                 // [KC][KB] weight sub-tile
  l.w_dw = o; o = align8(o + KC * kDwTaps);
  l.b_dw = o; o = align8(o + KC);
  l.red = o;  o = align8(o + kWarps * kDwSums * KC);  // per-warp partial sums
  l.acc = o;  o = align8(o + acc_floats);              // see ChunkGrads
  l.total = o;
  return l;
}

struct BwdXLayout {
  int64_t gxs, w_expand, ga1s, a1s, a2s, gz2s, As, Bs, w_dw, b_dw, total;
};
__host__ __device__ inline BwdXLayout bwdx_layout(int QP, int RP, int OP, int Cin,
                                                  bool has_expand) {
  BwdXLayout l{};
  int64_t o = 0;
  l.gxs = o;  o = align8(o + int64_t(QP) * Cin);  // [QP][Cin] grad_x accumulators
  l.w_expand = o;                                 // [KC][Cin] w_expand[chunk] (expand only)
  o = align8(o + (has_expand ? int64_t(KC) * Cin : 0));
  l.ga1s = o; o = align8(o + int64_t(QP) * KC);   // [QP][KC] g_z1 on Q
  l.a1s = o;  o = align8(o + int64_t(RP) * KC);   // [RP][KC] a1 on the region
  l.a2s = o;  o = align8(o + int64_t(OP) * KC);   // [OP][KC] a2 on the output box
  l.gz2s = o; o = align8(o + int64_t(OP) * KC);   // [OP][KC] g_z2 on the output box
  l.As = o;   o = align8(o + int64_t(RP) * KI);   // [RP][KI] (RP >= OP)
  l.Bs = o;   o = align8(o + KC * KB);
  l.w_dw = o; o = align8(o + KC * kDwTaps);
  l.b_dw = o; o = align8(o + KC);
  l.total = o;
  return l;
}

__host__ __device__ inline int ceil_div_signed(int a, int b) {  // b > 0
  return a >= 0 ? (a + b - 1) / b : -((-a) / b);
}

// Largest output box touching a TQ-pixel input span, and its a1 region.
__host__ __device__ inline int box_max(int TQ, int s) { return (TQ + 2 * kDwPad - 1) / s + 1; }
__host__ __device__ inline int region_max(int TQ, int s) {
  return (box_max(TQ, s) - 1) * s + kDwKernel;
}

struct Geo {
  int N, Cin, H, W, hidden, Cout, Ho, Wo, s;
  bool has_expand, residual;
  int TH, TW, tiles_h, tiles_w;  // tile of the kernel (output tile, or input tile for grad_x)
};

Geo geo_of(const BlockShape& s) {
  Geo g{};
  g.N = static_cast<int>(s.batch);
  g.Cin = static_cast<int>(s.cin);
  g.H = static_cast<int>(s.in_h);
  g.W = static_cast<int>(s.in_w);
  g.hidden = static_cast<int>(s.hidden);
  g.Cout = static_cast<int>(s.cout);
  g.Ho = static_cast<int>(s.out_h());
  g.Wo = static_cast<int>(s.out_w());
  g.s = s.stride;
  g.has_expand = s.has_expand;
  g.residual = s.residual;
  return g;
}

template <bool kTC>
int64_t fwd_smem_floats(const Geo& g, int TH, int TW) {
  const int P = TH * TW;
  const int M = ((TH - 1) * g.s + kDwKernel) * ((TW - 1) * g.s + kDwKernel);
  return fwd_layout<kTC>(P, M, g.Cout).total;
}

// Offsets inside one partial slot (elements of A).
struct GradOffsets {
  int64_t w_project, w_dw, b_dw, w_expand, b_expand, total;
};

GradOffsets grad_offsets(int64_t cin, int64_t hidden, int64_t cout, bool has_expand) {
  GradOffsets o;
  o.w_project = 0;
  o.w_dw = o.w_project + cout * hidden;
  o.b_dw = o.w_dw + hidden * kDwTaps;
  o.w_expand = o.b_dw + hidden;
  o.b_expand = o.w_expand + (has_expand ? hidden * cin : 0);
  o.total = o.b_expand + (has_expand ? hidden : 0);
  return o;
}

// The weight gradients of one hidden chunk, compact: g_w_project[:, chunk] as [Cout][KC],
// g_w_dw [KC][kDwTaps], g_b_dw [KC], then with an expand g_b_expand [KC] and
// g_w_expand [KC][Cin].
__host__ __device__ inline int64_t chunk_grad_floats(const Geo& g) {
  return int64_t(KC) * (g.Cout + kDwSums + (g.has_expand ? 1 + g.Cin : 0));
}

// Shared memory of the weight-gradient kernel in the private-slot mode, and in the
// ordered mode (plus the chunk's accumulators).
int64_t bwdw_smem_floats(const Geo& g, int TH, int TW) {
  const int P = TH * TW;
  const int M = ((TH - 1) * g.s + kDwKernel) * ((TW - 1) * g.s + kDwKernel);
  return bwdw_layout(P, M, 0).total;
}
int64_t bwdw_ordered_smem_floats(const Geo& g, int TH, int TW) {
  const int P = TH * TW;
  const int M = ((TH - 1) * g.s + kDwKernel) * ((TW - 1) * g.s + kDwKernel);
  return bwdw_layout(P, M, chunk_grad_floats(g)).total;
}

int64_t bwdx_smem_floats(const Geo& g, int TQH, int TQW) {
  const int QP = TQH * TQW;
  const int OP = box_max(TQH, g.s) * box_max(TQW, g.s);
  const int RP = region_max(TQH, g.s) * region_max(TQW, g.s);
  return bwdx_layout(QP, RP, OP, g.Cin, g.has_expand).total;
}

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }  // a >= 0, b > 0

// The tile of a kernel: the largest of at most 8 x 8 pixels (TW <= width, TH <= height;
// taller, up to 64 pixels, when width < 8) whose shared memory fits `limit` bytes,
// halved until it does. balance: then shrunk to the smallest tile with the same tile
// counts (a 14-pixel side: 7 + 7 rather than 8 + 6), so that no tile is cut short and
// the largest does less work; the sizes only shrink, so it still fits.
// bytes > limit: not even a 1 x 1 tile fits.
struct TilePlan {
  int TH, TW, tiles_h, tiles_w;
  int64_t bytes;
};

template <typename F>
TilePlan plan_tile(const Geo& g, int height, int width, int64_t elem, int64_t limit, F floats,
                   bool balance) {
  int TW = std::min(width, 8);
  int TH = std::min(height, 64 / TW);
  int64_t bytes = floats(g, TH, TW) * elem;
  while (bytes > limit && (TH > 1 || TW > 1)) {
    if (TH >= TW) {
      TH = (TH + 1) / 2;
    } else {
      TW = (TW + 1) / 2;
    }
    bytes = floats(g, TH, TW) * elem;
  }
  if (balance) {
    TH = static_cast<int>(ceil_div(height, ceil_div(height, TH)));
    TW = static_cast<int>(ceil_div(width, ceil_div(width, TW)));
    bytes = floats(g, TH, TW) * elem;
  }
  return TilePlan{TH, TW, static_cast<int>(ceil_div(height, TH)),
                  static_cast<int>(ceil_div(width, TW)), bytes};
}

// How a backward launch divides its work: `outer` independent pieces of `inner` equal
// units each; the units of a piece are split into `splits` contiguous ranges (at most
// ceil(inner / splits) units each), one CTA per (piece, range), outer * splits CTAs.
// Several ranges per piece give partial results, combined in a fixed order through a
// buffer of buffer(splits) = fixed + splits * per_split elements (one_free: a single
// range needs none). The CTAs run in ceil(ctas / resident) rounds, resident = SMs x CTAs
// resident per SM, so the modelled time is rounds * ceil(inner / splits) units, against
// the ideal outer * inner / resident.
//
// The choice: the fewest splits that give at least two full waves (ctas >= 2 * resident)
// and come within 10% of the ideal time, searched up to four waves with the buffer at
// most big_cap elements; when none comes within 10%, the fastest of those (the fewest
// splits on ties). When two waves cannot be had under big_cap, the same search from one
// split with the buffer at most small_cap (buffer(1) always allowed).
// Pure integer arithmetic, at most ~4 * resident / outer steps.
struct SplitPlan {
  int64_t splits, ctas, buffer;
};

inline SplitPlan plan_split(int64_t resident, int64_t outer, int64_t inner, int64_t fixed,
                            int64_t per_split, bool one_free, int64_t big_cap,
                            int64_t small_cap) {
  resident = std::max<int64_t>(resident, 1);
  outer = std::max<int64_t>(outer, 1);
  inner = std::max<int64_t>(inner, 1);
  auto buffer = [&](int64_t s) { return one_free && s == 1 ? int64_t(0) : fixed + s * per_split; };
  auto cost = [&](int64_t s) { return ceil_div(outer * s, resident) * ceil_div(inner, s); };
  auto search = [&](int64_t lo, int64_t hi, int64_t cap) {
    int64_t best = 0;  // 0: not even lo fits cap
    for (int64_t s = lo; s <= hi && buffer(s) <= cap; ++s) {
      if (10 * outer * inner >= 9 * resident * cost(s)) return s;  // within 10% of the ideal
      if (best == 0 || cost(s) < cost(best)) best = s;
    }
    return best;
  };
  const int64_t hi = std::min(inner, std::max<int64_t>(1, ceil_div(4 * resident, outer)));
  const int64_t two_waves = ceil_div(2 * resident, outer);
  int64_t s = two_waves <= hi ? search(two_waves, hi, big_cap) : 0;
  if (s == 0) s = search(1, hi, std::max(small_cap, buffer(1)));
  return SplitPlan{s, outer * s, buffer(s)};
}

// Bounds of the backward's buffers, in fractions of the hidden tensor's element count
// N * hidden * Ho * Wo (the memory contract: nothing hidden-sized is allocated): where
// two full waves need them, a quarter (float32: half the bytes of a 16-bit hidden
// tensor); elsewhere an eighth (the weight gradients: or one slot).
constexpr int64_t kBigPartsDivisor = 4;
constexpr int64_t kSmallPartsDivisor = 8;

inline int64_t hidden_elems(const Geo& g) { return int64_t(g.N) * g.hidden * g.Ho * g.Wo; }

// The weight-gradient kernel's two ways of combining its CTAs' partial sums.
// - Ordered (preferred): a CTA accumulates its chunk's gradients in shared memory
//   (chunk_grad_floats) and, in part order, adds them into one [go.total] slot, which is
//   then the result: the buffer is a single slot at any split count.
// - Private slots (when the accumulators would shrink the tile): a CTA adds into its
//   part's slot of [n_parts][go.total] in global memory, and the host sums the slots.
// Both are deterministic: every element is owned by one thread of a CTA, and the parts
// are added in a fixed order.
inline bool bwdw_ordered(const Geo& g, int64_t elem, int64_t limit) {
  const TilePlan priv = plan_tile(g, g.Ho, g.Wo, elem, limit, bwdw_smem_floats, true);
  const TilePlan ord = plan_tile(g, g.Ho, g.Wo, elem, limit, bwdw_ordered_smem_floats, true);
  return ord.bytes <= limit && ord.TH == priv.TH && ord.TW == priv.TW;
}

// Grid of the weight-gradient kernel (tile chosen): (n_parts, n_chunks). A CTA owns one
// hidden chunk and a contiguous range of the N * tiles (image, tile) items: plan_split
// with the chunks as pieces and the items as units; the buffer is one slot when ordered,
// a slot per part otherwise.
struct WeightsGrid {
  int64_t n_parts, n_chunks, buffer;  // buffer: elements of A
};
inline WeightsGrid plan_bwd_weights_grid(int sms, int ctas_per_sm, const Geo& g,
                                         const GradOffsets& go, bool ordered) {
  const int64_t n_chunks = ceil_div(g.hidden, KC);
  const int64_t items = int64_t(g.N) * g.tiles_h * g.tiles_w;
  // (ordered: the one slot is the result itself, whatever the split count)
  const int64_t big = hidden_elems(g) / kBigPartsDivisor;
  const SplitPlan p = plan_split(int64_t(sms) * ctas_per_sm, n_chunks, items,
                                 ordered ? go.total : 0, ordered ? 0 : go.total, false,
                                 ordered ? std::max(big, go.total) : big,
                                 hidden_elems(g) / kSmallPartsDivisor);
  return WeightsGrid{p.splits, n_chunks, p.buffer};
}

// Grid of the grad_x kernel (tile chosen): (items, n_splits), items = N * tiles. A CTA owns
// one (image, input tile) and a contiguous range of the hidden chunks: plan_split with the
// items as pieces and the chunks as units. One split writes grad_x itself; with more, the
// splits of an item add, in split order, into one float [N][H][W][Cin] buffer, and the
// last one writes grad_x.
struct InputGrid {
  int64_t items, n_splits, buffer;  // buffer: elements of A, 0 for one split
};
inline InputGrid plan_bwd_input_grid(int sms, int ctas_per_sm, const Geo& g) {
  const int64_t items = int64_t(g.N) * g.tiles_h * g.tiles_w;
  const int64_t x_elems = int64_t(g.N) * g.H * g.W * g.Cin;
  const SplitPlan p = plan_split(int64_t(sms) * ctas_per_sm, items, ceil_div(g.hidden, KC),
                                 x_elems, 0, true, hidden_elems(g) / kBigPartsDivisor,
                                 hidden_elems(g) / kSmallPartsDivisor);
  return InputGrid{items, p.splits, p.buffer};
}

#ifndef MNV2_CUDA_PLAN_ONLY

// Whether the forward kernel of element type T uses tensor cores (TF32 WMMA).
template <typename T>
constexpr bool kTensorCores = std::is_same_v<T, at::Half> || std::is_same_v<T, at::BFloat16>;

// ---------------------------------------------------------------------------
// Device helpers
// ---------------------------------------------------------------------------

// A 4-D (N, C, H, W) tensor addressed by element strides.
template <typename T>
struct Img {
  const T* p;
  int64_t sn, sc, sh, sw;
  int C, H, W;
};

template <typename A>
__device__ __forceinline__ A relu6(A v) {
  return v < A(0) ? A(0) : (v > A(6) ? A(6) : v);
}

template <typename A>
__device__ __forceinline__ bool active(A a) {  // 0 < z < 6, recovered from a = relu6(z)
  return a > A(0) && a < A(6);
}

template <typename T, typename A>
__device__ __forceinline__ A ld(const T* p) {
  return static_cast<A>(p[0]);
}

// dst[m * LD + kk] = img[n, ch0 + kk, r0 + m / RW, c0 + m % RW] for m < RH * RW,
// kk < KI; 0 outside the image and for kk >= nch. Columns [KI, LD) are not written.
template <typename T, typename A, int LD = KI>
__device__ void load_region(A* __restrict__ dst, const Img<T>& img, int n, int ch0, int nch,
                            int r0, int c0, int RH, int RW) {
  const int total = RH * RW * KI;
  for (int e = threadIdx.x; e < total; e += kThreads) {
    const int m = e / KI, kk = e - m * KI;
    const int r = r0 + m / RW, c = c0 + m % RW;
    A v = A(0);
    if (kk < nch && r >= 0 && r < img.H && c >= 0 && c < img.W) {
      v = ld<T, A>(img.p + n * img.sn + static_cast<int64_t>(ch0 + kk) * img.sc +
                   static_cast<int64_t>(r) * img.sh + static_cast<int64_t>(c) * img.sw);
    }
    if constexpr (LD == KI) {
      dst[e] = v;
    } else {
      dst[m * LD + kk] = v;
    }
  }
}

// Bs[j * LD + kk] = w[(n0 + j) * sn + (k0 + kk) * sk] for j < nj, kk < nk; 0 elsewhere
// (j < KC, kk < KI). Columns [KI, LD) are not written.
template <typename T, typename A, int LD = KB>
__device__ void load_wtile(A* __restrict__ Bs, const T* __restrict__ w, int n0, int nj,
                           int64_t sn, int64_t sk, int k0, int nk) {
  for (int e = threadIdx.x; e < KC * KI; e += kThreads) {
    const int j = e / KI, kk = e - j * KI;
    A v = A(0);
    if (j < nj && kk < nk) v = ld<T, A>(w + (n0 + j) * sn + (k0 + kk) * sk);
    Bs[j * LD + kk] = v;
  }
}

// Four consecutive elements, loaded with one vector instruction (float: 16 bytes).
template <typename A>
struct alignas(4 * sizeof(A)) V4 {
  A x, y, z, w;
};

// Ordered hand-off between the CTAs that add into one buffer. A CTA's place in the
// order is a ticket, taken from an atomic counter when it starts: every lower ticket
// belongs to a CTA that has already started, so waiting for it cannot deadlock,
// whatever order the hardware dispatches CTAs in. CTA `rank` of a group waits until the
// group's flag equals rank, adds (reading and writing through L2: __ldcg / __stcg), and
// sets the flag to rank + 1 (release, after every thread's stores are fenced). Two rules
// keep the waits finite: no CTA returns before its pass_turn, and the counter and flags
// are zeroed afresh for every launch (at::zeros on the launch's stream).
__device__ __forceinline__ int take_ticket(int* counter) {
  __shared__ int ticket;
  if (threadIdx.x == 0) ticket = atomicAdd(counter, 1);
  __syncthreads();
  return ticket;
}

__device__ __forceinline__ void wait_turn(int* flag, int rank) {
  if (threadIdx.x == 0) {
    ::cuda::atomic_ref<int, ::cuda::thread_scope_device> f(*flag);
    while (f.load(::cuda::memory_order_acquire) != rank) __nanosleep(64);
  }
  __syncthreads();  // also: this CTA's own shared-memory results are complete
}

__device__ __forceinline__ void pass_turn(int* flag, int rank) {
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    ::cuda::atomic_ref<int, ::cuda::thread_scope_device> f(*flag);
    f.store(rank + 1, ::cuda::memory_order_release);
  }
}

// dst[r * dst_ld + c] += src[r * src_ld + c] for r < rows, c < cols, in L2. A thread
// loads kFlushDepth elements before it stores any (the loads and stores are ordered
// memory operations: one at a time, each would wait for its own L2 round trip).
constexpr int kFlushDepth = 8;
template <typename A>
__device__ void add_through_l2(A* dst, int64_t dst_ld, const A* src, int src_ld, int rows,
                               int cols) {
  const int total = rows * cols;
  for (int e0 = threadIdx.x; e0 < total; e0 += kThreads * kFlushDepth) {
    A v[kFlushDepth];
#pragma unroll
    for (int u = 0; u < kFlushDepth; ++u) {
      const int e = e0 + u * kThreads, r = e / cols, c = e - r * cols;
      if (e < total) v[u] = __ldcg(dst + r * dst_ld + c) + src[r * src_ld + c];
    }
#pragma unroll
    for (int u = 0; u < kFlushDepth; ++u) {
      const int e = e0 + u * kThreads, r = e / cols, c = e - r * cols;
      if (e < total) __stcg(dst + r * dst_ld + c, v[u]);
    }
  }
}

// Where the weight-gradient kernel adds one hidden chunk's gradients: in its part's
// global slot (private mode) or in shared memory (ordered mode, compact; see
// chunk_grad_floats). Element (co, j) of g_w_project[:, chunk] is wp[co * wp_ld + j];
// g_w_dw[j][tap] is wdw[j * kDwTaps + tap]; g_w_expand[j][i] is we[j * Cin + i].
template <typename A>
struct ChunkGrads {
  A* wp;
  int64_t wp_ld;
  A *wdw, *bdw, *be, *we;
};

// acc[m * KC + j] += sum_{kk < nk} As[m * KI + kk] * Bs[j * KB + kk], m < M, j < KC.
// A thread owns rows 4 mg .. 4 mg + 3 of column j (a warp: one row group, 32
// columns). As must be 16-byte aligned (rows of KI = 32 elements) and, like Bs,
// zero for kk in [nk, KI): the loop runs over whole groups of four.
template <typename A>
__device__ void gemm_acc(A* __restrict__ acc, const A* __restrict__ As, const A* __restrict__ Bs,
                         int M, int nk) {
  const int MG = (M + 3) / 4;
  for (int e = threadIdx.x; e < MG * KC; e += kThreads) {
    const int mg = e / KC, j = e - mg * KC;
    const int m0 = mg * 4, nm = min(4, M - m0);
    const A* b = Bs + j * KB;
    const A* a[4];
    A s[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      a[i] = As + min(m0 + i, M - 1) * KI;  // rows past M are read but not stored
      s[i] = i < nm ? acc[(m0 + i) * KC + j] : A(0);
    }
#pragma unroll 2
    for (int kk = 0; kk < nk; kk += 4) {
      const A b0 = b[kk], b1 = b[kk + 1], b2 = b[kk + 2], b3 = b[kk + 3];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const V4<A> v = *reinterpret_cast<const V4<A>*>(a[i] + kk);
        s[i] += v.x * b0 + v.y * b1 + v.z * b2 + v.w * b3;
      }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if (i < nm) acc[(m0 + i) * KC + j] = s[i];
    }
  }
}

// Tensor-core GEMMs of the fp16 / bf16 forward: TF32 WMMA (m16n16k8, fp32
// accumulators) on the fp32 shared-memory arrays. Fragment element ownership is
// opaque; only load/store_matrix_sync touch memory. Every pointer below is 16
// (or 8) rows times a row stride plus a multiple of 8 floats from a 32-byte
// aligned array start, so it is 32-byte (256-bit) aligned, and every ldm is a
// multiple of 4 floats (16 bytes), as WMMA needs; every tile read or written
// lies inside its array (rows padded to 16, see fwd_layout). The A and B
// fragments are rounded with __float_to_tf32 after the load, as the CUDA guide
// asks for tf32 operands (a no-op for fp16 / bf16 values, which are exact in
// TF32). The loops are uniform across each warp (they depend on the warp index
// and block-wide values only), as the *_sync calls require.
namespace wmma = nvcuda::wmma;
using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::col_major>;
using FragBr = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
using FragC = wmma::fragment<wmma::accumulator, 16, 16, 8, float>;

template <typename Frag>
__device__ __forceinline__ void to_tf32(Frag& f) {
#pragma unroll
  for (int i = 0; i < f.num_elements; ++i) f.x[i] = wmma::__float_to_tf32(f.x[i]);
}

// acc[m * KC + j] = (first ? 0 : acc[m * KC + j]) + sum_{kk < nk} As[m * KT + kk] Bs[j * KT + kk]
// for every m < round16(M), j < KC: A = As row-major (ldm KT), B(kk, j) = Bs[j * KT + kk]
// col-major (ldm KT), C = acc row-major (ldm KC). Warp w owns the row tiles w, w + 8, ...
// and both 16-column halves (one A fragment per k step serves both). The k loop
// runs in steps of 8 up to round8(nk) <= KI: columns [nk, KI) of As and Bs must be
// zero, and rows [M, round16(M)) of As finite (they are zero: a row of A only
// reaches its own row of acc, which nothing reads).
__device__ void mma_expand(float* __restrict__ acc, const float* __restrict__ As,
                           const float* __restrict__ Bs, int M, int nk, bool first) {
  const int warp = threadIdx.x / 32;
  const int MT = (M + kTile - 1) / kTile;
  for (int mt = warp; mt < MT; mt += kWarps) {
    float* c_ptr = acc + mt * kTile * KC;
    FragC c[KC / kTile];
#pragma unroll
    for (int nt = 0; nt < KC / kTile; ++nt) {
      if (first) {
        wmma::fill_fragment(c[nt], 0.0f);
      } else {
        wmma::load_matrix_sync(c[nt], c_ptr + nt * kTile, KC, wmma::mem_row_major);
      }
    }
    for (int k = 0; k < nk; k += 8) {
      FragA a;
      wmma::load_matrix_sync(a, As + mt * kTile * KT + k, KT);
      to_tf32(a);
#pragma unroll
      for (int nt = 0; nt < KC / kTile; ++nt) {
        FragB b;
        wmma::load_matrix_sync(b, Bs + nt * kTile * KT + k, KT);
        to_tf32(b);
        wmma::mma_sync(c[nt], a, b, c[nt]);
      }
    }
#pragma unroll
    for (int nt = 0; nt < KC / kTile; ++nt) {
      wmma::store_matrix_sync(c_ptr + nt * kTile, c[nt], KC, wmma::mem_row_major);
    }
  }
}

// ys[p * ldy + co] += sum_{j < kc} a2s[p * KT + j] w_project_s[j * ldw + co] for
// every p < round16(P), co < ldy = round16(Cout): A = a2s row-major (ldm KT),
// B(j, co) = w_project_s[j * ldw + co] row-major (the project weights staged
// transposed, ldm ldw = ldy + 8: conflict-free fragment loads and fewer floats
// than [ldy][KT]), C = ys row-major (ldm ldy). Warp w owns the 16 x 16 tiles w,
// w + 8, ... (column tiles fastest). Columns [kc, KC) of a2s, rows [kc, KC) of
// w_project_s and its columns [Cout, ldy) must be zero; rows [P, round16(P)) of
// a2s finite (zero).
__device__ void mma_project(float* __restrict__ ys, int ldy, const float* __restrict__ a2s,
                            const float* __restrict__ w_project_s, int ldw, int P, int kc) {
  const int warp = threadIdx.x / 32;
  const int CT = ldy / kTile;
  const int tiles = (P + kTile - 1) / kTile * CT;
  for (int t = warp; t < tiles; t += kWarps) {
    const int pt = t / CT, ct = t - pt * CT;
    float* c_ptr = ys + pt * kTile * ldy + ct * kTile;
    FragC c;
    wmma::load_matrix_sync(c, c_ptr, ldy, wmma::mem_row_major);
    for (int k = 0; k < kc; k += 8) {
      FragA a;
      FragBr b;
      wmma::load_matrix_sync(a, a2s + pt * kTile * KT + k, KT);
      wmma::load_matrix_sync(b, w_project_s + k * ldw + ct * kTile, ldw);
      to_tf32(a);
      to_tf32(b);
      wmma::mma_sync(c, a, b, c);
    }
    wmma::store_matrix_sync(c_ptr, c, ldy, wmma::mem_row_major);
  }
}

// a1 of hidden channels [cc, cc + kc) on the RH x RW region whose top-left input
// pixel is (r0, c0): a1s[m * KC + j]. 0 outside the image and for j >= kc.
// Syncs before touching As/Bs and before returning. kTC (the fp16 / bf16
// forward): the expand runs on tensor cores (mma_expand) with As / Bs rows of
// KT floats; rows [M, round16(M)) of As must be zero (the caller zeroes them
// once) and rows [M, round16(M)) of a1s are written with values nothing reads.
template <typename T, typename A, bool kTC = false>
__device__ void compute_a1(A* __restrict__ a1s, A* __restrict__ As, A* __restrict__ Bs,
                           const Img<T>& x, int n, const T* __restrict__ w_expand,
                           const T* __restrict__ b_expand, bool has_expand, int cc, int kc, int r0,
                           int c0, int RH, int RW) {
  const int M = RH * RW;
  const int Cin = x.C;
  static_assert(!kTC || std::is_same_v<A, float>, "the tensor-core path accumulates in fp32");
  if (has_expand) {
    // (kTC: the first sub-chunk starts its accumulators from 0 instead; Cin >= 1)
    if constexpr (!kTC) {
      for (int e = threadIdx.x; e < M * KC; e += kThreads) a1s[e] = A(0);
    }
    for (int k0 = 0; k0 < Cin; k0 += KI) {
      const int nk = min(KI, Cin - k0);
      __syncthreads();  // earlier readers of As / Bs are done
      if constexpr (kTC) {
        load_region<T, A, KT>(As, x, n, k0, nk, r0, c0, RH, RW);
        load_wtile<T, A, KT>(Bs, w_expand, cc, kc, Cin, 1, k0, nk);
        __syncthreads();
        mma_expand(a1s, As, Bs, M, nk, k0 == 0);
      } else {
        load_region<T, A>(As, x, n, k0, nk, r0, c0, RH, RW);
        load_wtile<T, A>(Bs, w_expand, cc, kc, Cin, 1, k0, nk);
        __syncthreads();
        gemm_acc<A>(a1s, As, Bs, M, nk);
      }
    }
    __syncthreads();  // gemm_acc's element ownership differs from the loop below
    for (int e = threadIdx.x; e < M * KC; e += kThreads) {
      const int m = e / KC, j = e - m * KC;
      const int r = r0 + m / RW, c = c0 + m % RW;
      const bool in = j < kc && r >= 0 && r < x.H && c >= 0 && c < x.W;
      a1s[e] = in ? relu6(a1s[e] + ld<T, A>(b_expand + cc + j)) : A(0);
    }
  } else {
    for (int e = threadIdx.x; e < M * KC; e += kThreads) {
      const int m = e / KC, j = e - m * KC;
      const int r = r0 + m / RW, c = c0 + m % RW;
      A v = A(0);
      if (j < kc && r >= 0 && r < x.H && c >= 0 && c < x.W) {
        v = ld<T, A>(x.p + n * x.sn + static_cast<int64_t>(cc + j) * x.sc +
                     static_cast<int64_t>(r) * x.sh + static_cast<int64_t>(c) * x.sw);
      }
      a1s[e] = v;
    }
  }
  __syncthreads();
}

// a2 on the OH x OW box of output pixels starting at (or0, oc0): a2s[p * LD + j]
// (columns [KC, LD) are not written); a1s holds the region starting at input
// (or0 * s - kDwPad, oc0 * s - kDwPad) with row length RW.
// 0 outside the output image and for j >= kc. Does not sync.
template <typename A, int LD = KC>
__device__ void compute_a2(A* __restrict__ a2s, const A* __restrict__ a1s,
                           const A* __restrict__ w_dw_s, const A* __restrict__ b_dw_s, int s,
                           int OH, int OW, int RW, int or0, int oc0, int Ho, int Wo, int kc) {
  for (int e = threadIdx.x; e < OH * OW * KC; e += kThreads) {
    const int p = e / KC, j = e - p * KC;
    const int py = p / OW, px = p - py * OW;
    const int oh = or0 + py, ow = oc0 + px;
    A v = A(0);
    if (j < kc && oh >= 0 && oh < Ho && ow >= 0 && ow < Wo) {
      A acc = b_dw_s[j];
#pragma unroll
      for (int ky = 0; ky < kDwKernel; ++ky) {
#pragma unroll
        for (int kx = 0; kx < kDwKernel; ++kx) {
          acc += w_dw_s[j * kDwTaps + ky * kDwKernel + kx] *
                 a1s[((py * s + ky) * RW + px * s + kx) * KC + j];
        }
      }
      v = relu6(acc);
    }
    if constexpr (LD == KC) {
      a2s[e] = v;
    } else {
      a2s[p * LD + j] = v;
    }
  }
}

// Stages the depthwise weights and biases of chunk [cc, cc + kc) (0 beyond kc).
template <typename T, typename A>
__device__ void stage_dw(A* __restrict__ w_dw_s, A* __restrict__ b_dw_s,
                         const T* __restrict__ w_dw, const T* __restrict__ b_dw, int cc, int kc) {
  for (int e = threadIdx.x; e < KC * kDwTaps; e += kThreads) {
    const int j = e / kDwTaps;
    w_dw_s[e] = j < kc ? ld<T, A>(w_dw + static_cast<int64_t>(cc) * kDwTaps + e) : A(0);
  }
  for (int j = threadIdx.x; j < KC; j += kThreads) {
    b_dw_s[j] = j < kc ? ld<T, A>(b_dw + cc + j) : A(0);
  }
}

// ---------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads, 1)
    fused_ir_fwd_kernel(Img<T> x, const T* __restrict__ w_expand, const T* __restrict__ b_expand,
                        const T* __restrict__ w_dw, const T* __restrict__ b_dw,
                        const T* __restrict__ w_project, const T* __restrict__ b_project,
                        T* __restrict__ y, Strides4 ys_, Geo g) {
  // fp16 / bf16: expand and project on tensor cores (TF32 WMMA), see mma_expand
  constexpr bool kTC = kTensorCores<T>;
  extern __shared__ __align__(32) unsigned char smem_raw[];
  A* sm = reinterpret_cast<A*>(smem_raw);
  const int s = g.s;
  const int P = g.TH * g.TW;
  const int RH = (g.TH - 1) * s + kDwKernel, RW = (g.TW - 1) * s + kDwKernel, M = RH * RW;
  const FwdLayout L = fwd_layout<kTC>(P, M, g.Cout);
  const int ldy = fwd_ldy<kTC>(g.Cout);  // row stride of ys
  A* ys = sm + L.ys;
  A* a1s = sm + L.a1s;
  A* a2s = sm + L.a2s;
  A* As = sm + L.As;
  A* Bs = sm + L.Bs;
  A* w_project_s = sm + L.w_project;
  A* w_dw_s = sm + L.w_dw;
  A* b_dw_s = sm + L.b_dw;
  const int PG = (P + 3) / 4;  // pixel groups of the project

  const int tiles = g.tiles_h * g.tiles_w;
  const int n = blockIdx.x / tiles;
  const int t = blockIdx.x - n * tiles;
  const int oh0 = (t / g.tiles_w) * g.TH, ow0 = (t % g.tiles_w) * g.TW;
  const int r0 = oh0 * s - kDwPad, c0 = ow0 * s - kDwPad;

  if constexpr (kTC) {
    // Every element a WMMA tile reads must be finite: ys is zeroed whole (its
    // padding rows / columns included); rows P .. round16(P) - 1 of a2s and
    // M .. round16(M) - 1 of As are read and never written: zero them once
    // (their columns KC .. KT - 1 are never read). Rows past P of ys and past M
    // of a1s receive values nothing reads.
    const int Pp = static_cast<int>(round16(P)), Mp = static_cast<int>(round16(M));
    for (int e = threadIdx.x; e < Pp * ldy; e += kThreads) ys[e] = A(0);
    for (int e = P * KT + threadIdx.x; e < Pp * KT; e += kThreads) a2s[e] = A(0);
    if (g.has_expand) {
      for (int e = M * KT + threadIdx.x; e < Mp * KT; e += kThreads) As[e] = A(0);
    }
  } else {
    for (int e = threadIdx.x; e < P * g.Cout; e += kThreads) ys[e] = A(0);
    // a2 rows P .. 4 PG - 1 are read by the project and never written: zero them once
    for (int e = P * KC + threadIdx.x; e < PG * 4 * KC; e += kThreads) a2s[e] = A(0);
  }

  for (int cc = 0; cc < g.hidden; cc += KC) {
    const int kc = min(KC, g.hidden - cc);
    // the previous chunk's readers of w_dw_s, b_dw_s, w_project_s, a1s, a2s are done
    __syncthreads();
    stage_dw<T, A>(w_dw_s, b_dw_s, w_dw, b_dw, cc, kc);
    if constexpr (kTC) {
      // w_project_s[j * ldw + co] for j < KC, co < ldy = round16(Cout): zero for co >= Cout and
      // j >= kc. e = ((j / 8) * ldy + co) * 8 + j % 8: a warp reads 8 consecutive j of 4
      // weight rows (16-byte runs of fp16 / bf16) and its shared stores are at most
      // 2-way conflicted (ldw = 8 or 24 mod 32); one j per lane would be 8-way.
      const int ldw = fwd_ldw_tc(g.Cout);
      for (int e = threadIdx.x; e < ldy * KC; e += kThreads) {
        const int r = e / 8, jb = r / ldy, co = r - jb * ldy;
        const int j = jb * 8 + (e - r * 8);
        w_project_s[j * ldw + co] =
            co < g.Cout && j < kc
                ? ld<T, A>(w_project + static_cast<int64_t>(co) * g.hidden + cc + j)
                : A(0);
      }
      compute_a1<T, A, true>(a1s, As, Bs, x, n, w_expand, b_expand, g.has_expand, cc, kc, r0, c0,
                             RH, RW);  // syncs
      compute_a2<A, KT>(a2s, a1s, w_dw_s, b_dw_s, s, g.TH, g.TW, RW, oh0, ow0, g.Ho, g.Wo, kc);
      __syncthreads();
      // ys[p][co] += sum_j a2s[p][j] w_project_s[co][j] on tensor cores: a2 (fp32) is rounded
      // to TF32 here, the weights are exact (fp16 / bf16 values)
      mma_project(ys, ldy, a2s, w_project_s, ldw, P, kc);
    } else {
      for (int e = threadIdx.x; e < g.Cout * KC; e += kThreads) {
        const int co = e / KC, j = e - co * KC;
        w_project_s[co * KP + j] =
            j < kc ? ld<T, A>(w_project + static_cast<int64_t>(co) * g.hidden + cc + j) : A(0);
      }
      compute_a1<T, A>(a1s, As, Bs, x, n, w_expand, b_expand, g.has_expand, cc, kc, r0, c0, RH,
                       RW);  // syncs
      compute_a2<A>(a2s, a1s, w_dw_s, b_dw_s, s, g.TH, g.TW, RW, oh0, ow0, g.Ho, g.Wo, kc);
      __syncthreads();
      // ys[p][co] += sum_j a2s[p][j] w_project_s[co][j]; a thread owns pixels 4 pg ..
      // 4 pg + 3 of one output channel (a2s rows are broadcast across the warp,
      // w_project_s rows are conflict-free with their padding). a2s and w_project_s
      // are zero for j >= kc.
      for (int e = threadIdx.x; e < PG * g.Cout; e += kThreads) {
        const int pg = e / g.Cout, co = e - pg * g.Cout;
        const int p0 = pg * 4, np = min(4, P - p0);
        const A* a = a2s + p0 * KC;
        const A* w = w_project_s + co * KP;
        A acc[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[i] = i < np ? ys[(p0 + i) * g.Cout + co] : A(0);
#pragma unroll 2
        for (int j = 0; j < kc; j += 4) {
          const A w0 = w[j], w1 = w[j + 1], w2 = w[j + 2], w3 = w[j + 3];
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const V4<A> v = *reinterpret_cast<const V4<A>*>(a + i * KC + j);
            acc[i] += v.x * w0 + v.y * w1 + v.z * w2 + v.w * w3;
          }
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          if (i < np) ys[(p0 + i) * g.Cout + co] = acc[i];
        }
      }
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < P * g.Cout; e += kThreads) {
    const int p = e / g.Cout, co = e - p * g.Cout;
    const int oh = oh0 + p / g.TW, ow = ow0 + p % g.TW;
    if (oh < g.Ho && ow < g.Wo) {
      A v = (kTC ? ys[p * ldy + co] : ys[e]) + ld<T, A>(b_project + co);
      if (g.residual) {  // stride 1 and Cin == Cout: (oh, ow) is an input pixel
        v += ld<T, A>(x.p + n * x.sn + static_cast<int64_t>(co) * x.sc +
                      static_cast<int64_t>(oh) * x.sh + static_cast<int64_t>(ow) * x.sw);
      }
      y[n * ys_.n + static_cast<int64_t>(co) * ys_.c + static_cast<int64_t>(oh) * ys_.h +
        static_cast<int64_t>(ow) * ys_.w] = static_cast<T>(v);
    }
  }
}

// ---------------------------------------------------------------------------
// Backward: weight gradients
// ---------------------------------------------------------------------------

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads, 1)
    fused_ir_bwd_weights_kernel(Img<T> x, Img<T> gy, const T* __restrict__ w_expand,
                                const T* __restrict__ b_expand, const T* __restrict__ w_dw,
                                const T* __restrict__ b_dw, const T* __restrict__ w_project,
                                A* __restrict__ out, int* __restrict__ sync, GradOffsets go,
                                int n_parts, Geo g) {
  extern __shared__ __align__(32) unsigned char smem_raw[];
  A* sm = reinterpret_cast<A*>(smem_raw);
  const int s = g.s;
  const int P = g.TH * g.TW;
  const int RH = (g.TH - 1) * s + kDwKernel, RW = (g.TW - 1) * s + kDwKernel, M = RH * RW;
  const bool ordered = sync != nullptr;
  const BwdWLayout L = bwdw_layout(P, M, ordered ? chunk_grad_floats(g) : 0);
  A* a1s = sm + L.a1s;
  A* ga1s = sm + L.ga1s;
  A* a2s = sm + L.a2s;
  A* gz2s = sm + L.gz2s;
  A* As = sm + L.As;
  A* Bs = sm + L.Bs;
  A* w_dw_s = sm + L.w_dw;
  A* b_dw_s = sm + L.b_dw;
  A* red = sm + L.red;  // [kWarps][kDwSums][KC]

  // ordered: (chunk, part) from the ticket, sync = [counter, flag per chunk]
  int part = blockIdx.x, chunk = blockIdx.y;
  if (ordered) {
    const int ticket = take_ticket(sync);
    chunk = ticket / n_parts;
    part = ticket - chunk * n_parts;
  }
  const int cc = chunk * KC;
  const int kc = min(KC, g.hidden - cc);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  ChunkGrads<A> cg;
  if (ordered) {
    A* acc = sm + L.acc;
    cg = ChunkGrads<A>{acc, KC, acc + int64_t(g.Cout) * KC, nullptr, nullptr, nullptr};
    cg.bdw = cg.wdw + KC * kDwTaps;
    cg.be = cg.bdw + KC;
    cg.we = cg.be + KC;
    // visible after the first item's syncs
    for (int64_t e = threadIdx.x; e < chunk_grad_floats(g); e += kThreads) acc[e] = A(0);
  } else {
    A* slot = out + static_cast<int64_t>(part) * go.total;
    cg = ChunkGrads<A>{slot + go.w_project + cc, g.hidden, slot + go.w_dw + int64_t(cc) * kDwTaps,
                       slot + go.b_dw + cc, slot + go.b_expand + cc,
                       slot + go.w_expand + int64_t(cc) * g.Cin};
  }
  const int tiles = g.tiles_h * g.tiles_w;
  const int64_t items = static_cast<int64_t>(g.N) * tiles;
  const int64_t i_begin = items * part / n_parts, i_end = items * (part + 1) / n_parts;

  stage_dw<T, A>(w_dw_s, b_dw_s, w_dw, b_dw, cc, kc);  // visible after compute_a1's syncs

  for (int64_t item = i_begin; item < i_end; ++item) {
    const int n = static_cast<int>(item / tiles);
    const int t = static_cast<int>(item - static_cast<int64_t>(n) * tiles);
    const int oh0 = (t / g.tiles_w) * g.TH, ow0 = (t % g.tiles_w) * g.TW;
    const int r0 = oh0 * s - kDwPad, c0 = ow0 * s - kDwPad;
    __syncthreads();  // the previous item's readers of every buffer are done

    compute_a1<T, A>(a1s, As, Bs, x, n, w_expand, b_expand, g.has_expand, cc, kc, r0, c0, RH,
                     RW);  // syncs
    compute_a2<A>(a2s, a1s, w_dw_s, b_dw_s, s, g.TH, g.TW, RW, oh0, ow0, g.Ho, g.Wo, kc);
    for (int e = threadIdx.x; e < P * KC; e += kThreads) gz2s[e] = A(0);

    // g_a2 = grad_y w_project[:, chunk] and g_w_project[:, chunk] += grad_y^T a2, over
    // Cout sub-chunks
    for (int co0 = 0; co0 < g.Cout; co0 += KI) {
      const int nco = min(KI, g.Cout - co0);
      __syncthreads();  // a2s complete; earlier readers of As / Bs done
      load_region<T, A>(As, gy, n, co0, nco, oh0, ow0, g.TH, g.TW);  // [P][KI], 0 outside
      // Bs[j][kk] = w_project[co0 + kk][cc + j]
      load_wtile<T, A>(Bs, w_project, cc, kc, 1, g.hidden, co0, nco);
      __syncthreads();
      gemm_acc<A>(gz2s, As, Bs, P, nco);
      for (int e = threadIdx.x; e < nco * KC; e += kThreads) {
        const int kk = e / KC, j = e - kk * KC;
        if (j < kc) {
          A acc = A(0);
          for (int p = 0; p < P; ++p) acc += As[p * KI + kk] * a2s[p * KC + j];
          cg.wp[(co0 + kk) * cg.wp_ld + j] += acc;
        }
      }
    }
    __syncthreads();
    for (int e = threadIdx.x; e < P * KC; e += kThreads) {
      if (!active(a2s[e])) gz2s[e] = A(0);  // g_z2; a2 == 0 off the image
    }
    __syncthreads();

    // g_b_dw and g_w_dw: warp w sums pixels w, w + 8, ...; then fixed-order combine
    {
      const int j = lane;
      A acc[kDwSums];
#pragma unroll
      for (int q = 0; q < kDwSums; ++q) acc[q] = A(0);
      for (int p = warp; p < P; p += kWarps) {
        const A gz = gz2s[p * KC + j];
        const int py = p / g.TW, px = p - py * g.TW;
#pragma unroll
        for (int ky = 0; ky < kDwKernel; ++ky) {
#pragma unroll
          for (int kx = 0; kx < kDwKernel; ++kx) {
            acc[ky * kDwKernel + kx] += gz * a1s[((py * s + ky) * RW + px * s + kx) * KC + j];
          }
        }
        acc[kDwTaps] += gz;
      }
#pragma unroll
      for (int q = 0; q < kDwSums; ++q) red[(warp * kDwSums + q) * KC + j] = acc[q];
    }
    __syncthreads();
    if (threadIdx.x < kc) {
      const int j = threadIdx.x;
      for (int q = 0; q < kDwSums; ++q) {
        A acc = A(0);
        for (int w = 0; w < kWarps; ++w) acc += red[(w * kDwSums + q) * KC + j];
        if (q < kDwTaps) {
          cg.wdw[j * kDwTaps + q] += acc;
        } else {
          cg.bdw[j] += acc;
        }
      }
    }

    if (g.has_expand) {
      // g_z1 on the halo region, gathered from this tile's g_z2
      for (int e = threadIdx.x; e < M * KC; e += kThreads) {
        const int m = e / KC, j = e - m * KC;
        const int hy = m / RW, hx = m - hy * RW;
        A acc = A(0);
#pragma unroll
        for (int ky = 0; ky < kDwKernel; ++ky) {
          const int ty = hy - ky;
          if (ty < 0 || ty % s != 0 || ty / s >= g.TH) continue;
#pragma unroll
          for (int kx = 0; kx < kDwKernel; ++kx) {
            const int tx = hx - kx;
            if (tx < 0 || tx % s != 0 || tx / s >= g.TW) continue;
            acc += w_dw_s[j * kDwTaps + ky * kDwKernel + kx] *
                   gz2s[((ty / s) * g.TW + tx / s) * KC + j];
          }
        }
        ga1s[e] = active(a1s[e]) ? acc : A(0);  // a1 == 0 off the image
      }
      __syncthreads();  // ga1s complete; red readers (g_b_dw/g_w_dw combine) done
      {
        A acc = A(0);
        for (int m = warp; m < M; m += kWarps) acc += ga1s[m * KC + lane];
        red[warp * KC + lane] = acc;
      }
      __syncthreads();
      if (threadIdx.x < kc) {
        A acc = A(0);
        for (int w = 0; w < kWarps; ++w) acc += red[w * KC + threadIdx.x];
        cg.be[threadIdx.x] += acc;
      }
      // g_w_expand[chunk] += g_z1^T x over Cin sub-chunks
      for (int k0 = 0; k0 < g.Cin; k0 += KI) {
        const int nk = min(KI, g.Cin - k0);
        __syncthreads();  // earlier readers of As done
        load_region<T, A>(As, x, n, k0, nk, r0, c0, RH, RW);
        __syncthreads();
        for (int e = threadIdx.x; e < KC * KI; e += kThreads) {
          const int j = e / KI, i = e - j * KI;
          if (j < kc && i < nk) {
            A acc = A(0);
            for (int m = 0; m < M; ++m) acc += ga1s[m * KC + j] * As[m * KI + i];
            cg.we[j * g.Cin + k0 + i] += acc;
          }
        }
      }
    }
  }
  if (ordered) {  // add this part's sums into the single slot, in part order
    int* flag = sync + 1 + chunk;
    wait_turn(flag, part);
    add_through_l2(out + go.w_project + cc, g.hidden, cg.wp, KC, g.Cout, kc);
    add_through_l2(out + go.w_dw + int64_t(cc) * kDwTaps, 0, cg.wdw, 0, 1, kc * kDwTaps);
    add_through_l2(out + go.b_dw + cc, 0, cg.bdw, 0, 1, kc);
    if (g.has_expand) {
      add_through_l2(out + go.b_expand + cc, 0, cg.be, 0, 1, kc);
      add_through_l2(out + go.w_expand + int64_t(cc) * g.Cin, 0, cg.we, 0, 1, kc * g.Cin);
    }
    pass_turn(flag, part);
  }
}

// ---------------------------------------------------------------------------
// Backward: grad_x
// ---------------------------------------------------------------------------

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads, 1)
    fused_ir_bwd_input_kernel(Img<T> x, Img<T> gy, const T* __restrict__ w_expand,
                              const T* __restrict__ b_expand, const T* __restrict__ w_dw,
                              const T* __restrict__ b_dw, const T* __restrict__ w_project,
                              T* __restrict__ gx, Strides4 gxs_, A* __restrict__ gx_acc,
                              int* __restrict__ sync, int n_splits, Geo g) {
  extern __shared__ __align__(32) unsigned char smem_raw[];
  A* sm = reinterpret_cast<A*>(smem_raw);
  const int s = g.s;
  const int TQH = g.TH, TQW = g.TW, QP = TQH * TQW;
  const int OPmax = box_max(TQH, s) * box_max(TQW, s);
  const int RPmax = region_max(TQH, s) * region_max(TQW, s);
  const BwdXLayout L = bwdx_layout(QP, RPmax, OPmax, g.Cin, g.has_expand);
  A* gxs = sm + L.gxs;
  A* w_expand_s = sm + L.w_expand;  // [KC][Cin], has_expand only
  A* ga1s = sm + L.ga1s;
  A* a1s = sm + L.a1s;
  A* a2s = sm + L.a2s;
  A* gz2s = sm + L.gz2s;
  A* As = sm + L.As;
  A* Bs = sm + L.Bs;
  A* w_dw_s = sm + L.w_dw;
  A* b_dw_s = sm + L.b_dw;

  const int tiles = g.tiles_h * g.tiles_w;
  // (item, split); with several splits from the ticket, sync = [counter, flag per item]
  int item = blockIdx.x, split = blockIdx.y;
  if (n_splits > 1) {
    const int ticket = take_ticket(sync);
    split = ticket / gridDim.x;
    item = ticket - split * gridDim.x;
  }
  const int n = item / tiles;
  const int t = item - n * tiles;
  const int q0r = (t / g.tiles_w) * TQH, q0c = (t % g.tiles_w) * TQW;
  // this CTA's hidden chunks: [c_begin, c_end) of n_chunks (all of them when n_splits == 1)
  const int64_t n_chunks = (g.hidden + KC - 1) / KC;
  const int c_begin = static_cast<int>(n_chunks * split / n_splits);
  const int c_end = static_cast<int>(n_chunks * (split + 1) / n_splits);
  // output pixels o with o * s in [q - kDwPad, q + kDwPad] for some q of the tile
  const int or0 = ceil_div_signed(q0r - kDwPad, s), or1 = (q0r + TQH - 1 + kDwPad) / s;
  const int oc0 = ceil_div_signed(q0c - kDwPad, s), oc1 = (q0c + TQW - 1 + kDwPad) / s;
  const int OH = or1 - or0 + 1, OW = oc1 - oc0 + 1;  // <= box_max
  const int RH = (OH - 1) * s + kDwKernel, RW = (OW - 1) * s + kDwKernel;
  const int rr0 = or0 * s - kDwPad, rc0 = oc0 * s - kDwPad;  // region origin (input coordinates)

  for (int e = threadIdx.x; e < QP * g.Cin; e += kThreads) gxs[e] = A(0);

  for (int cc = c_begin * KC; cc < c_end * KC; cc += KC) {
    const int kc = min(KC, g.hidden - cc);
    __syncthreads();  // the previous chunk's readers are done
    stage_dw<T, A>(w_dw_s, b_dw_s, w_dw, b_dw, cc, kc);
    if (g.has_expand) {
      // w_expand_s[j * Cin + i] = w_expand[cc + j][i] (coalesced), 0 for j >= kc; read after
      // compute_a1's syncs
      const T* w = w_expand + static_cast<int64_t>(cc) * g.Cin;
      for (int e = threadIdx.x; e < KC * g.Cin; e += kThreads) {
        w_expand_s[e] = e < kc * g.Cin ? ld<T, A>(w + e) : A(0);
      }
    }
    compute_a1<T, A>(a1s, As, Bs, x, n, w_expand, b_expand, g.has_expand, cc, kc, rr0, rc0, RH,
                     RW);  // syncs
    compute_a2<A>(a2s, a1s, w_dw_s, b_dw_s, s, OH, OW, RW, or0, oc0, g.Ho, g.Wo, kc);
    for (int e = threadIdx.x; e < OH * OW * KC; e += kThreads) gz2s[e] = A(0);
    for (int co0 = 0; co0 < g.Cout; co0 += KI) {
      const int nco = min(KI, g.Cout - co0);
      __syncthreads();
      load_region<T, A>(As, gy, n, co0, nco, or0, oc0, OH, OW);
      load_wtile<T, A>(Bs, w_project, cc, kc, 1, g.hidden, co0, nco);
      __syncthreads();
      gemm_acc<A>(gz2s, As, Bs, OH * OW, nco);
    }
    __syncthreads();
    for (int e = threadIdx.x; e < OH * OW * KC; e += kThreads) {
      if (!active(a2s[e])) gz2s[e] = A(0);
    }
    __syncthreads();
    // g_a1 on Q, masked into g_z1 when there is an expand
    for (int e = threadIdx.x; e < QP * KC; e += kThreads) {
      const int q = e / KC, j = e - q * KC;
      const int qy = q / TQW, qx = q - qy * TQW;
      const int ir = q0r + qy, ic = q0c + qx;
      A acc = A(0);
      if (j < kc && ir < g.H && ic < g.W) {
#pragma unroll
        for (int ky = 0; ky < kDwKernel; ++ky) {
          const int ty = ir + kDwPad - ky;  // = oh * s
          if (ty < 0 || ty % s != 0 || ty / s >= g.Ho) continue;
          const int py = ty / s - or0;
#pragma unroll
          for (int kx = 0; kx < kDwKernel; ++kx) {
            const int tx = ic + kDwPad - kx;
            if (tx < 0 || tx % s != 0 || tx / s >= g.Wo) continue;
            const int px = tx / s - oc0;
            acc += w_dw_s[j * kDwTaps + ky * kDwKernel + kx] * gz2s[(py * OW + px) * KC + j];
          }
        }
        if (g.has_expand) {
          const A a = a1s[((ir - rr0) * RW + (ic - rc0)) * KC + j];
          if (!active(a)) acc = A(0);
        }
      }
      ga1s[e] = acc;
    }
    __syncthreads();
    if (g.has_expand) {
      // gxs[q][i] += sum_{j < kc} ga1s[q][j] w_expand_s[j][i]. A thread owns rows 4 qg ..
      // 4 qg + 3 of column i (ga1s rows: 16-byte loads, broadcast across the warp;
      // w_expand_s: consecutive across the warp) and adds the terms in order of j, as one
      // row at a time would. j runs on to kc4: ga1s columns and w_expand_s rows [kc, kc4)
      // are zero, and acc + 0 * 0 == acc.
      const int QG = (QP + 3) / 4;
      const int kc4 = (kc + 3) / 4 * 4;
      for (int e = threadIdx.x; e < QG * g.Cin; e += kThreads) {
        const int qg = e / g.Cin, i = e - qg * g.Cin;
        const int q0 = qg * 4, nq = min(4, QP - q0);
        const A* gz[4];
        A acc[4];
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          gz[r] = ga1s + min(q0 + r, QP - 1) * KC;  // rows past QP are read but not stored
          acc[r] = r < nq ? gxs[(q0 + r) * g.Cin + i] : A(0);
        }
        const A* w = w_expand_s + i;
#pragma unroll 2
        for (int j = 0; j < kc4; j += 4) {
          const A w0 = w[j * g.Cin], w1 = w[(j + 1) * g.Cin], w2 = w[(j + 2) * g.Cin],
                  w3 = w[(j + 3) * g.Cin];
#pragma unroll
          for (int r = 0; r < 4; ++r) {
            const V4<A> v = *reinterpret_cast<const V4<A>*>(gz[r] + j);
            acc[r] += v.x * w0;
            acc[r] += v.y * w1;
            acc[r] += v.z * w2;
            acc[r] += v.w * w3;
          }
        }
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          if (r < nq) gxs[(q0 + r) * g.Cin + i] = acc[r];
        }
      }
    } else {
      for (int e = threadIdx.x; e < QP * KC; e += kThreads) {
        const int q = e / KC, j = e - q * KC;
        if (j < kc) gxs[q * g.Cin + cc + j] += ga1s[e];
      }
    }
  }
  // Epilogue. Several splits: in split order, split 0 stores its sums into gx_acc
  // [N][H][W][Cin], the next ones add theirs, the last one writes gx.
  int* flag = n_splits > 1 ? sync + 1 + item : nullptr;
  if (flag != nullptr) {
    wait_turn(flag, split);
  } else {
    __syncthreads();
  }
  const bool last = split == n_splits - 1;
  for (int e = threadIdx.x; e < QP * g.Cin; e += kThreads) {
    const int q = e / g.Cin, i = e - q * g.Cin;
    const int ir = q0r + q / TQW, ic = q0c + q % TQW;
    if (ir < g.H && ic < g.W) {
      A v = gxs[e];
      if (g.residual && split == 0) {  // stride 1, Cout == Cin: grad_y has x's geometry
        v += ld<T, A>(gy.p + n * gy.sn + static_cast<int64_t>(i) * gy.sc +
                      static_cast<int64_t>(ir) * gy.sh + static_cast<int64_t>(ic) * gy.sw);
      }
      A* acc = flag != nullptr
                   ? gx_acc + ((static_cast<int64_t>(n) * g.H + ir) * g.W + ic) * g.Cin + i
                   : nullptr;
      if (split > 0) v = __ldcg(acc) + v;
      if (last) {
        gx[n * gxs_.n + static_cast<int64_t>(i) * gxs_.c + static_cast<int64_t>(ir) * gxs_.h +
           static_cast<int64_t>(ic) * gxs_.w] = static_cast<T>(v);
      } else {
        __stcg(acc, v);
      }
    }
  }
  if (flag != nullptr && !last) pass_turn(flag, split);
}

// ---------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------

using glue::OptTensor;
using glue::strides_of;

template <typename T>
Img<T> img_of(const at::Tensor& t) {
  return Img<T>{t.const_data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2), t.stride(3),
                static_cast<int>(t.size(1)), static_cast<int>(t.size(2)),
                static_cast<int>(t.size(3))};
}

BlockShape check_block(const at::Tensor& x, const OptTensor& w_expand, const OptTensor& b_expand,
                       const at::Tensor& w_dw, const at::Tensor& b_dw,
                       const at::Tensor& w_project, const at::Tensor& b_project, int64_t stride,
                       bool residual, int64_t dilation, std::string_view activation) {
  TORCH_CHECK(dilation == 1, "mnv2: the CUDA kernel supports only dilation 1, got ", dilation,
              "; the Triton backend (\"triton\", which \"auto\" picks for dilated blocks) runs "
              "dilated depthwise steps");
  TORCH_CHECK(w_dw.dim() != 3 || (w_dw.size(1) == 3 && w_dw.size(2) == 3),
              "mnv2: the CUDA kernel supports only a 3x3 depthwise kernel, got w_dw of shape ", w_dw.sizes(),
              "; the Triton backend (\"triton\", which \"auto\" picks for them) runs 5x5 and 7x7");
  TORCH_CHECK(activation == "relu6", "mnv2: the CUDA kernel supports only the ReLU6 activation, got \"",
              activation, "\"; the Triton backend (\"triton\", which \"auto\" picks for it) runs ReLU");
  TORCH_CHECK(x.dim() == 4, "mnv2: x must be 4-D (N, C, H, W), got ", x.dim(), "-D");
  TORCH_CHECK(x.layout() == at::kStrided, "mnv2: x must be a dense (strided) tensor");
  TORCH_CHECK(x.is_cuda(), "mnv2: the CUDA kernel needs x on a CUDA device, got ", x.device());
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble,
              "mnv2: the CUDA kernel supports float32, float16, bfloat16 and float64, got ", st);
  TORCH_CHECK(x.size(2) >= 1 && x.size(3) >= 1, "mnv2: x must have height and width >= 1, got ",
              x.sizes());
  BlockShape s = glue::check_weights(x, x.size(1), w_expand, b_expand, w_dw, b_dw, w_project,
                                     b_project);
  glue::finish_shape(s, x, stride, residual, dilation);
  constexpr int64_t kIntMax = std::numeric_limits<int>::max() / 16;
  TORCH_CHECK(s.batch < kIntMax && s.in_h < kIntMax && s.in_w < kIntMax && s.cin < kIntMax &&
                  s.hidden < kIntMax && s.cout < kIntMax,
              "mnv2: the CUDA kernel needs every dimension below ", kIntMax, ", got x ", x.sizes(),
              ", hidden ", s.hidden, ", Cout ", s.cout);
  return s;
}

// What the launchers need to know about the current device (x's, set by the
// guard). Queried with cudaDeviceGetAttribute rather than
// at::cuda::getDeviceProperties: ATen/cuda/CUDAContext.h pulls in cusparse.h,
// which this toolkit install lacks.
struct DeviceInfo {
  int major, minor, sms;
  size_t smem_optin;
};

DeviceInfo device_info(const at::Tensor& x) {
  const int dev = x.get_device();
  DeviceInfo d{};
  int smem = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.major, cudaDevAttrComputeCapabilityMajor, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.minor, cudaDevAttrComputeCapabilityMinor, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  d.smem_optin = static_cast<size_t>(smem);
  TORCH_CHECK(d.major >= 8, "mnv2: the CUDA kernels need compute capability 8.0 or newer; device ",
              dev, " has ", d.major, ".", d.minor);
  return d;
}

// plan_tile for the device's opt-in shared memory per block: sets g.TH/TW/tiles_* and
// returns the shared-memory bytes.
template <typename F>
size_t choose_tile(Geo& g, int height, int width, size_t elem, size_t limit, F floats,
                   bool balance, const char* what) {
  const TilePlan t = plan_tile(g, height, width, static_cast<int64_t>(elem),
                               static_cast<int64_t>(limit), floats, balance);
  TORCH_CHECK(t.bytes <= static_cast<int64_t>(limit), "mnv2: the CUDA ", what, " kernel needs ",
              t.bytes, " bytes of shared memory even with a 1x1 tile, more than the device's ",
              limit, " (channels too large: Cin ", g.Cin, ", Cout ", g.Cout, ")");
  g.TH = t.TH;
  g.TW = t.TW;
  g.tiles_h = t.tiles_h;
  g.tiles_w = t.tiles_w;
  const int64_t blocks = int64_t(g.N) * g.tiles_h * g.tiles_w;
  TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), "mnv2: too many tiles (", blocks, ")");
  return static_cast<size_t>(t.bytes);
}

// The dynamic shared memory a block of `kernel` may take: the device's opt-in limit less
// the kernel's static shared memory (the backward kernels' ticket).
template <typename K>
size_t dynamic_smem_limit(K kernel, const DeviceInfo& prop) {
  cudaFuncAttributes attr{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  return prop.smem_optin - std::min(prop.smem_optin, attr.sharedSizeBytes);
}

template <typename K>
void set_smem(K kernel, size_t bytes) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(bytes)));
}

// CTAs of `kernel` resident per SM with `bytes` of dynamic shared memory (after set_smem),
// at least 1: the backward grids are planned in waves of SMs x this.
template <typename K>
int resident_ctas(K kernel, size_t bytes) {
  int n = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kThreads, bytes));
  return std::max(n, 1);
}

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

at::Tensor fused_inverted_residual_cuda(const at::Tensor& x, const OptTensor& w_expand,
                                        const OptTensor& b_expand, const at::Tensor& w_dw,
                                        const at::Tensor& b_dw, const at::Tensor& w_project,
                                        const at::Tensor& b_project, int64_t stride,
                                        bool residual, int64_t dilation, std::string_view activation) {
  const BlockShape s = check_block(x, w_expand, b_expand, w_dw, b_dw, w_project, b_project, stride,
                                   residual, dilation, activation);
  const c10::cuda::CUDAGuard guard(x.device());
  const DeviceInfo prop = device_info(x);
  at::Tensor y = at::empty({s.batch, s.cout, s.out_h(), s.out_w()},
                           x.options().memory_format(x.suggest_memory_format()));
  if (s.batch == 0) return y;
  const at::Tensor w_expand_contig = s.has_expand ? w_expand->contiguous() : at::Tensor();
  const at::Tensor b_expand_contig = s.has_expand ? b_expand->contiguous() : at::Tensor();
  const at::Tensor w_dw_contig = w_dw.contiguous(), b_dw_contig = b_dw.contiguous();
  const at::Tensor w_project_contig = w_project.contiguous();
  const at::Tensor b_project_contig = b_project.contiguous();
  Geo g = geo_of(s);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mnv2_fwd_cuda", [&] {
    using A = typename AccOf<scalar_t>::type;
    auto kernel = fused_ir_fwd_kernel<scalar_t, A>;
    const size_t bytes = choose_tile(g, g.Ho, g.Wo, sizeof(A), dynamic_smem_limit(kernel, prop),
                                     fwd_smem_floats<kTensorCores<scalar_t>>, false, "forward");
    set_smem(kernel, bytes);
    const int blocks = g.N * g.tiles_h * g.tiles_w;
    kernel<<<blocks, kThreads, bytes, c10::cuda::getCurrentCUDAStream()>>>(
        img_of<scalar_t>(x), ptr_or_null<scalar_t>(w_expand_contig),
        ptr_or_null<scalar_t>(b_expand_contig), w_dw_contig.const_data_ptr<scalar_t>(),
        b_dw_contig.const_data_ptr<scalar_t>(), w_project_contig.const_data_ptr<scalar_t>(),
        b_project_contig.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), strides_of(y),
        g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                         at::Tensor>;

Grads fused_inverted_residual_backward_cuda(const at::Tensor& grad_y, const at::Tensor& x,
                                            const OptTensor& w_expand, const OptTensor& b_expand,
                                            const at::Tensor& w_dw, const at::Tensor& b_dw,
                                            const at::Tensor& w_project,
                                            const at::Tensor& b_project, int64_t stride,
                                            bool residual, int64_t dilation, std::string_view activation) {
  const BlockShape s = check_block(x, w_expand, b_expand, w_dw, b_dw, w_project, b_project, stride,
                                   residual, dilation, activation);
  glue::check_grad_y(grad_y, x, s);
  const c10::cuda::CUDAGuard guard(x.device());
  const DeviceInfo prop = device_info(x);
  const at::TensorOptions opts = x.options().memory_format(at::MemoryFormat::Contiguous);
  const int64_t he = s.has_expand ? s.hidden : 0;
  at::Tensor gx = at::empty(x.sizes(), x.options().memory_format(x.suggest_memory_format()));
  if (s.batch == 0) {
    return Grads{gx, at::zeros({he, s.has_expand ? s.cin : 0}, opts), at::zeros({he}, opts),
                 at::zeros({s.hidden, kDwKernel, kDwKernel}, opts), at::zeros({s.hidden}, opts),
                 at::zeros({s.cout, s.hidden}, opts), at::zeros({s.cout}, opts)};
  }
  const at::Tensor w_expand_contig = s.has_expand ? w_expand->contiguous() : at::Tensor();
  const at::Tensor b_expand_contig = s.has_expand ? b_expand->contiguous() : at::Tensor();
  const at::Tensor w_dw_contig = w_dw.contiguous(), b_dw_contig = b_dw.contiguous();
  const at::Tensor w_project_contig = w_project.contiguous();
  const at::ScalarType acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const GradOffsets go = grad_offsets(s.cin, s.hidden, s.cout, s.has_expand);
  at::Tensor reduced;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mnv2_bwd_cuda", [&] {
    using A = typename AccOf<scalar_t>::type;
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    // (a) weight gradients, ordered into one slot, or into per-part slots summed here
    {
      Geo g = geo_of(s);
      auto kernel = fused_ir_bwd_weights_kernel<scalar_t, A>;
      const size_t limit = dynamic_smem_limit(kernel, prop);
      const bool ordered = bwdw_ordered(g, sizeof(A), static_cast<int64_t>(limit));
      const size_t bytes =
          ordered ? choose_tile(g, g.Ho, g.Wo, sizeof(A), limit, bwdw_ordered_smem_floats, true,
                                "backward (weights)")
                  : choose_tile(g, g.Ho, g.Wo, sizeof(A), limit, bwdw_smem_floats, true,
                                "backward (weights)");
      set_smem(kernel, bytes);
      const WeightsGrid wg =
          plan_bwd_weights_grid(prop.sms, resident_ctas(kernel, bytes), g, go, ordered);
      TORCH_CHECK(wg.n_chunks <= 65535, "mnv2: hidden too large for the CUDA backward (", s.hidden,
                  ")");
      const int64_t n_parts = wg.n_parts;
      at::Tensor out = at::zeros({ordered ? 1 : n_parts, go.total}, opts.dtype(acc_type));
      at::Tensor sync;
      if (ordered) sync = at::zeros({1 + wg.n_chunks}, opts.dtype(at::kInt));
      const dim3 grid(static_cast<unsigned>(n_parts), static_cast<unsigned>(wg.n_chunks));
      kernel<<<grid, kThreads, bytes, stream>>>(
          img_of<scalar_t>(x), img_of<scalar_t>(grad_y), ptr_or_null<scalar_t>(w_expand_contig),
          ptr_or_null<scalar_t>(b_expand_contig), w_dw_contig.const_data_ptr<scalar_t>(),
          b_dw_contig.const_data_ptr<scalar_t>(), w_project_contig.const_data_ptr<scalar_t>(),
          out.mutable_data_ptr<A>(), ordered ? sync.mutable_data_ptr<int>() : nullptr, go,
          static_cast<int>(n_parts), g);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      reduced = out.size(0) == 1 ? out[0] : out.sum(0);
    }
    // (b) grad_x
    {
      Geo g = geo_of(s);
      auto kernel = fused_ir_bwd_input_kernel<scalar_t, A>;
      const size_t bytes = choose_tile(g, g.H, g.W, sizeof(A), dynamic_smem_limit(kernel, prop),
                                       bwdx_smem_floats, true, "backward (input)");
      set_smem(kernel, bytes);
      const InputGrid xg = plan_bwd_input_grid(prop.sms, resident_ctas(kernel, bytes), g);
      TORCH_CHECK(xg.n_splits <= 65535, "mnv2: hidden too large for the CUDA backward (",
                  s.hidden, ")");
      // n_splits > 1: the splits of an item hand their sums on through gx_acc, in order
      at::Tensor gx_acc, sync;
      if (xg.n_splits > 1) {
        gx_acc = at::empty({s.batch, s.in_h, s.in_w, s.cin}, opts.dtype(acc_type));
        sync = at::zeros({1 + xg.items}, opts.dtype(at::kInt));
      }
      const dim3 grid(static_cast<unsigned>(xg.items), static_cast<unsigned>(xg.n_splits));
      kernel<<<grid, kThreads, bytes, stream>>>(
          img_of<scalar_t>(x), img_of<scalar_t>(grad_y), ptr_or_null<scalar_t>(w_expand_contig),
          ptr_or_null<scalar_t>(b_expand_contig), w_dw_contig.const_data_ptr<scalar_t>(),
          b_dw_contig.const_data_ptr<scalar_t>(), w_project_contig.const_data_ptr<scalar_t>(),
          gx.mutable_data_ptr<scalar_t>(), strides_of(gx),
          xg.n_splits > 1 ? gx_acc.mutable_data_ptr<A>() : nullptr,
          xg.n_splits > 1 ? sync.mutable_data_ptr<int>() : nullptr,
          static_cast<int>(xg.n_splits), g);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  const at::ScalarType dt = x.scalar_type();
  auto piece = [&](int64_t off, int64_t numel, at::IntArrayRef shape) {
    // a fresh tensor per gradient: op outputs must not alias each other
    return reduced.narrow(0, off, numel).view(shape).to(dt, false, true, at::MemoryFormat::Contiguous);
  };
  at::Tensor g_w_project = piece(go.w_project, s.cout * s.hidden, {s.cout, s.hidden});
  at::Tensor g_w_dw = piece(go.w_dw, s.hidden * kDwTaps, {s.hidden, kDwKernel, kDwKernel});
  at::Tensor g_b_dw = piece(go.b_dw, s.hidden, {s.hidden});
  at::Tensor g_w_expand = s.has_expand
                              ? piece(go.w_expand, s.hidden * s.cin, {s.hidden, s.cin})
                              : at::zeros({0, 0}, opts);
  at::Tensor g_b_expand =
      s.has_expand ? piece(go.b_expand, s.hidden, {s.hidden}) : at::zeros({0}, opts);
  at::Tensor g_b_project = at::sum(grad_y, {0, 2, 3}, false, acc_type).to(dt).contiguous();
  return Grads{gx, g_w_expand, g_b_expand, g_w_dw, g_b_dw, g_w_project, g_b_project};
}

#endif  // MNV2_CUDA_PLAN_ONLY

}  // namespace

#ifndef MNV2_CUDA_PLAN_ONLY
TORCH_LIBRARY_IMPL(mnv2, CUDA, m) {
  m.impl("fused_inverted_residual", &fused_inverted_residual_cuda);
  m.impl("fused_inverted_residual_backward", &fused_inverted_residual_backward_cuda);
}
#endif

}  // namespace cuda
}  // namespace mnv2
