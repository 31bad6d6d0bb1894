// The kernels of one instruction set, their arguments, and the table the
// dispatch picks from.
#pragma once

#include <cstdint>

#include "isa.h"
#include "layout.h"
#include "plan.h"
#include "shape.h"

namespace mnv2 {

// Optional source of a block's input: MobileNetV2's first convolution, fused. When
// `packed` is set the block (t == 1, no residual) does not read x: each input row it
// needs is computed from `image` (N, C, H, W; element strides `strides`) as
//   x = relu6(conv(image, kStemKernel, stride kStemStride, padding kStemPad) + b),
// with the weights packed by pack_pointwise as a (cin, kStemTaps C) matrix whose column
// (kh * kStemKernel + kw) * C + c holds w[:, c, kh, kw] (`layout`). The block's input
// size is the convolution's output size. ForwardPlan::stem_k must be kStemTaps C.
template <typename T>
struct StemSource {
  const T* image = nullptr;
  Strides4 strides{};
  int64_t channels = 0, height = 0, width = 0;
  const T* packed = nullptr;
  PointwiseLayout layout{};
};

// The fused block:
//   a1 = act(w_expand x + b_expand)               (a1 = x when t == 1)
//   a2 = act(dw(a1, stride) + b_dw)               (dw: k x k, k = shape.kernel)
// with act ReLU6 (shape.relu6) or ReLU.
//   y  = w_project a2 + b_project (+ x)
// Tensors are addressed through element strides, so NCHW, channels_last and strided
// views are read and written in place.
template <typename T>
struct ForwardArgs {
  BlockShape shape;
  Layout layout;
  const T* x;
  Strides4 xs;
  const T* packed;
  T* y;
  Strides4 ys;
  T* partial;  // plan.partial_floats elements when plan.n_splits > 1, else unused
  StemSource<T> stem{};
};

template <typename T>
struct BackwardArgs {
  BlockShape shape;
  Layout layout;  // Packing::kBackward
  const T* x;
  Strides4 xs;
  const T* gy;
  Strides4 gys;
  const T* packed;
  T* gx;  // may be null when the input gradient is not needed
  Strides4 gxs;
  T* side;  // plan.side_floats elements, only used when gx != nullptr
};

// Per hidden channel c, the sum of z2 and of z2^2 over the block's output pixels,
// z2 = dw(act(w_expand x + b_expand)) without its bias: bn2's batch statistics.
// The shape has no project (cout 0) and the layout Packing::kForward.
template <typename T>
struct StatsArgs {
  BlockShape shape;
  Layout layout;
  const T* x;
  Strides4 xs;
  const T* packed;  // b_dw packed as zeros
};

// Backward of those statistics: the gradients for grad_z2 = alpha + beta * z2 per
// hidden channel (alpha, beta hp-padded). The shape has no project, the layout is
// Packing::kBackward.
template <typename T>
struct StatsBackwardArgs {
  BlockShape shape;
  Layout layout;
  const T* x;
  Strides4 xs;
  const T* packed;  // b_dw packed as zeros
  const T* alpha;
  const T* beta;
  T* gx;
  Strides4 gxs;
  T* side;
};

// 1x1 convolution on rows of channels:
//   y[m][o] = act(sum_c x[m][c] w[o][c] + b[o]),  act: none, ReLU or ReLU6.
enum class Activation { kNone = 0, kRelu = 1, kRelu6 = 2 };
template <typename T>
struct PointwiseArgs {
  PointwiseLayout layout;
  Activation act;
  const T* x;  // rows of cin channels, row stride ldx
  int64_t ldx;
  const T* packed;
  T* y;  // rows of cout channels, row stride ldy
  int64_t ldy;
};
// Scratch (elements) of one pointwise call: the tail panel when cout is not a
// multiple of vl goes through it.
constexpr int64_t kPointwiseScratch = 64 * 16;
// A pointwise mean covers at most kPoolCols output channels and computes its rows
// kPoolScratch / kPoolCols at a time through scratch.
constexpr int64_t kPoolCols = 64;
constexpr int64_t kPoolScratch = 32 * kPoolCols;

// The GEMM microkernel's register tile: kGemmVectorsPerRow vectors of output columns per
// row, and as many rows as the vector registers hold besides those columns of B and one
// broadcast of A: AVX2's 16 registers give 6 rows (12 accumulators), AVX-512's and
// NEON's 32 give 14 (28).
constexpr int kGemmVectorsPerRow = 2;
constexpr int gemm_tile_rows(int vector_registers) {
  return (vector_registers - kGemmVectorsPerRow - 1) / kGemmVectorsPerRow;
}

template <typename T>
struct Kernels {
  int64_t vl;  // vector width in elements: the layouts' padding unit
  int tile_rows;  // rows of the GEMM register tile (gemm_tile_rows of the ISA's registers)
  // Forward items [begin, end). scratch: plan.scratch_floats elements.
  void (*forward)(const ForwardArgs<T>& a, const ForwardPlan& p, int64_t begin, int64_t end,
                  T* scratch);
  // Backward items [begin, end), accumulating weight gradients into grads
  // (GradLayout::total elements, zeroed by the caller).
  void (*backward)(const BackwardArgs<T>& a, const BackwardPlan& p, int64_t begin, int64_t end,
                   T* grads, T* scratch);
  // Statistics items [begin, end), adding into sums [2][hp] (sum, then sum of squares).
  void (*stats)(const StatsArgs<T>& a, const StatsPlan& p, int64_t begin, int64_t end,
                double* sums, T* scratch);
  // Backward items [begin, end) of the statistics, as backward.
  void (*stats_backward)(const StatsBackwardArgs<T>& a, const BackwardPlan& p, int64_t begin,
                         int64_t end, T* grads, T* scratch);
  // Rows [m0, m1) and output channels [n0, n1) of a pointwise convolution; n0 is a
  // multiple of vl, n1 one too or cout. scratch: kPointwiseScratch elements.
  void (*pointwise)(const PointwiseArgs<T>& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1,
                    T* scratch);
  // out[j] = the mean over rows [0, rows) of output channel n0 + j of a pointwise
  // convolution, for j < n1 - n0 (n0 a multiple of vl, n1 - n0 <= kPoolCols, n1 <=
  // cout): the head and global average pooling, without storing the head's output.
  // scratch: kPoolScratch elements.
  void (*pointwise_mean)(const PointwiseArgs<T>& a, int64_t rows, int64_t n0, int64_t n1,
                         T* scratch, T* out);
};

// One instruction set's kernels.
struct KernelTable {
  Isa isa;
  Kernels<float> f32;
  Kernels<double> f64;
  template <typename T>
  const Kernels<T>& get() const;
};
template <>
inline const Kernels<float>& KernelTable::get<float>() const { return f32; }
template <>
inline const Kernels<double>& KernelTable::get<double>() const { return f64; }

// The table for `isa`, or nullptr when it is not compiled in or the CPU lacks it.
const KernelTable* kernel_table(Isa isa);
// The table in use: the best the CPU supports, or the one MNV2_CPU_ISA names.
// Chosen once. Throws std::runtime_error when the variable names an unknown ISA or
// one this CPU or build cannot run.
const KernelTable& active_kernels();

}  // namespace mnv2
