#pragma once
// Pointwise (1x1) convolution: one GEMM with the bias and activation in its epilogue,
// over panel-major packed weights; and its mean over rows (the head and the global
// average pooling without storing the head's output).
#include "gemm.inl"

namespace mnv2 {
namespace {

template <typename T>
struct Pointwise {
  using V = Simd<T>;
  using G = Gemm<T>;
  static constexpr int64_t VL = V::VL;

  static void entry(const PointwiseArgs<T>& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1, T* scratch) {
    const PointwiseLayout& l = a.layout;
    const unsigned flags = activation_flags(a.act);
    const T* w = a.packed + l.w;
    const T* bias = a.packed + l.b;
    const int64_t full = imin(n1, l.cout / VL * VL);  // columns [n0, full) are whole panels
    if (full > n0 && m1 - m0 == 1) {
      G::gemv_panels(l.cin, a.x + m0 * a.ldx, w + n0 * l.cin, l.cin * VL, (full - n0) / VL,
                     a.y + m0 * a.ldy + n0, bias + n0, flags);
    } else if (full > n0) {
      G::run(m1 - m0, full - n0, l.cin, a.x + m0 * a.ldx, a.ldx, 1, w + n0 * l.cin, VL, l.cin * VL,
             a.y + m0 * a.ldy + n0, a.ldy, bias + n0, flags);
    }
    if (n1 > full) {
      // the last, partial panel: computed into scratch, its valid columns copied
      const int64_t cols = n1 - full;
      constexpr int64_t kRows = kPointwiseScratch / 16;
      for (int64_t m = m0; m < m1; m += kRows) {
        const int64_t rows = imin(kRows, m1 - m);
        G::run(rows, VL, l.cin, a.x + m * a.ldx, a.ldx, 1, w + full * l.cin, VL, l.cin * VL, scratch, VL,
               bias + full, flags);
        for (int64_t i = 0; i < rows; ++i) {
          for (int64_t j = 0; j < cols; ++j) a.y[(m + i) * a.ldy + full + j] = scratch[i * VL + j];
        }
      }
    }
  }

  // The mean over rows [0, rows) of output channels [n0, n1): the rows' outputs pass
  // through scratch a block at a time and are never stored. The packed weights and bias
  // are padded to whole panels, so the last panel is computed whole and its padded
  // columns are dropped.
  static void mean_entry(const PointwiseArgs<T>& a, int64_t rows, int64_t n0, int64_t n1, T* scratch,
                         T* out) {
    const PointwiseLayout& l = a.layout;
    const unsigned flags = activation_flags(a.act);
    const int64_t cols = (n1 - n0 + VL - 1) / VL * VL;  // <= kPoolCols
    constexpr int64_t kRows = kPoolScratch / kPoolCols;
    alignas(64) T sum[kPoolCols] = {};
    for (int64_t m = 0; m < rows; m += kRows) {
      const int64_t r = imin(kRows, rows - m);
      G::run(r, cols, l.cin, a.x + m * a.ldx, a.ldx, 1, a.packed + l.w + n0 * l.cin, VL, l.cin * VL, scratch,
             cols, a.packed + l.b + n0, flags);
      for (int64_t i = 0; i < r; ++i) {
        for (int64_t j = 0; j < cols; j += VL) V::store(sum + j, V::load(sum + j) + V::load(scratch + i * cols + j));
      }
    }
    for (int64_t j = 0; j < n1 - n0; ++j) out[j] = sum[j] / T(rows);
  }
};

}  // namespace
}  // namespace mnv2
