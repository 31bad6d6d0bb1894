#pragma once
// The depthwise statistics: per hidden channel, the sum and the sum of squares of
// z2 = dw(relu6(w_expand x + b_expand)) over the output pixels (bn2's batch statistics
// in training), recomputed row by row through the row window; nothing hidden-sized is
// stored. Sums in double.
#include "depthwise.inl"
#include "row_window.inl"

namespace mnv2 {
namespace {

template <typename T>
struct DepthwiseStats {
  static void entry(const StatsArgs<T>& a, const StatsPlan& p, int64_t begin, int64_t end, double* sums,
                    T* scratch) {
    const StatsScratch o = stats_scratch(a.shape, a.layout, p);
    std::memset(scratch + o.zero_row, 0, sizeof(T) * a.shape.in_w * a.layout.hp);
    for (int64_t item = begin; item < end; ++item) run_item(a, p, o, item, sums, scratch);
  }

 private:
  static void run_item(const StatsArgs<T>& a, const StatsPlan& p, const StatsScratch& o, int64_t item,
                       double* sums, T* scratch) {
    const BlockShape& s = a.shape;
    const Layout& l = a.layout;
    const int64_t W = s.in_w, Wo = s.out_w(), hp = l.hp;
    const int64_t n = item / p.n_bands, band = item % p.n_bands;
    const int64_t r0 = band * p.rows_per_band, r1 = imin(s.out_h(), r0 + p.rows_per_band);
    RowWindow<T> win(s, l, a.x, a.xs, a.packed, nullptr, n, 0, W, p.window_slots, scratch + o.ring,
                     scratch + o.zero_row, nullptr);
    win.start_chunk(0, hp);
    T* z2 = scratch + o.z2;
    double* sum = sums;
    double* sumsq = sums + hp;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t i0 = s.first_input_row(r);
      win.fill(i0, i0 + s.dw_span() - 1);
      const T* in_rows[kMaxDwKernel];
      for (int ky = 0; ky < s.kernel; ++ky) in_rows[ky] = win.row(i0 + ky * s.dilation);
      Depthwise<T>::row(s, in_rows, 0, W, s.stride, 0, Wo, hp, a.packed + l.w_dw, hp, a.packed + l.b_dw, z2, false);
      for (int64_t q = 0; q < Wo; ++q) {
        const T* z = z2 + q * hp;
        for (int64_t c = 0; c < hp; ++c) {
          const double v = static_cast<double>(z[c]);
          sum[c] += v;
          sumsq[c] += v * v;
        }
      }
    }
  }
};

}  // namespace
}  // namespace mnv2
