#pragma once
// The fused block's forward: per (image, row band, column tile, hidden split), rows of
// the expansion are produced into the row window, filtered by the depthwise step and
// projected into an output accumulator, one hidden chunk at a time.
#include "depthwise.inl"
#include "gemm.inl"
#include "row_window.inl"

namespace mnv2 {
namespace {

template <typename T>
struct BlockForward {
  using G = Gemm<T>;
  static constexpr int64_t VL = G::VL;
  using Args = ForwardArgs<T>;

  static void entry(const Args& a, const ForwardPlan& p, int64_t begin, int64_t end, T* scratch) {
    const ForwardScratch o = forward_scratch(a.layout, p);
    std::memset(scratch + o.zero_row, 0, sizeof(T) * p.window_cols * p.hidden_chunk);
    for (int64_t item = begin; item < end; ++item) run_item(a, p, o, item, scratch);
  }

 private:
  static void run_item(const Args& a, const ForwardPlan& p, const ForwardScratch& o, int64_t item,
                       T* scratch) {
    const BlockShape& s = a.shape;
    const Layout& l = a.layout;
    const int st = s.stride;
    const int64_t Ho = s.out_h(), Wo = s.out_w();
    const int64_t split = item % p.n_splits;
    const int64_t ct = (item / p.n_splits) % p.n_col_tiles;
    const int64_t band = (item / (p.n_splits * p.n_col_tiles)) % p.n_bands;
    const int64_t n = item / (p.n_splits * p.n_col_tiles * p.n_bands);
    const int64_t hs0 = split * p.split_channels;
    const int64_t hs1 = imin(l.hp, hs0 + p.split_channels);
    const int64_t oc0 = ct * p.cols_per_tile;
    const int64_t tw = imin(p.cols_per_tile, Wo - oc0);
    const int64_t c_lo = imax(0, s.first_input_row(oc0));  // (columns map as rows do)
    const int64_t c_hi = imin(s.in_w - 1, s.first_input_row(oc0 + tw - 1) + s.dw_span() - 1);
    const int64_t r0 = band * p.rows_per_band;
    const int64_t r1 = imin(Ho, r0 + p.rows_per_band);
    T* dw_rows = scratch + o.dw_rows;
    T* acc = scratch + o.acc;

    auto store = [&](int64_t r, int64_t rows, const T* accr) {
      if (p.n_splits > 1) {
        store_partial_rows(a, split, n, r, rows, oc0, tw, accr);
      } else {
        store_output_rows(a, n, r, rows, oc0, tw, accr);
      }
    };
    RowWindow<T> win(s, l, a.x, a.xs, a.packed, a.stem.packed != nullptr ? &a.stem : nullptr, n, c_lo,
                     c_hi - c_lo + 1, p.window_slots, scratch + o.ring, scratch + o.zero_row,
                     scratch + o.im2col);
    const int64_t hc_max = p.hidden_chunk;
    for (int64_t h0 = hs0; h0 < hs1; h0 += hc_max) {
      win.start_chunk(h0, imin(hc_max, hs1 - h0));
      if (h0 + hc_max < hs1) prefetch_chunk_weights(a, h0 + hc_max, imin(hc_max, hs1 - h0 - hc_max));
      const bool first = h0 == hs0;
      // the bias goes in once: with the first chunk of the first split
      const T* bias = first && split == 0 ? a.packed + l.b_project : nullptr;
      for (int64_t r = r0; r < r1; r += p.rows_per_step) {
        const int64_t rows = imin(p.rows_per_step, r1 - r);
        win.fill(s.first_input_row(r), s.first_input_row(r + rows - 1) + s.dw_span() - 1);
        for (int64_t q = 0; q < rows; ++q) {
          const int64_t i0 = s.first_input_row(r + q);
          const T* in_rows[kMaxDwKernel];
          for (int ky = 0; ky < s.kernel; ++ky) in_rows[ky] = win.row(i0 + ky * s.dilation);
          Depthwise<T>::row(s, in_rows, c_lo, s.in_w, st, oc0, tw, win.hc, a.packed + l.w_dw + win.h0, l.hp,
                            a.packed + l.b_dw + win.h0, dw_rows + q * tw * win.hc, true);
        }
        T* accr = p.chunked() ? acc + (r - r0) * tw * l.cout_p : acc;
        // panel-major project weights [cout_p / VL][hp][VL]: rows [h0, h0 + hc) of every panel
        G::run(rows * tw, l.cout_p, win.hc, dw_rows, win.hc, 1, a.packed + l.w_project + win.h0 * VL, VL,
               l.hp * VL, accr, l.cout_p, bias, first ? 0u : kAccumulate);
        if (!p.chunked()) store(r, rows, accr);
      }
    }
    if (p.chunked()) store(r0, r1 - r0, acc);
  }

  static void store_output_rows(const Args& a, int64_t n, int64_t r, int64_t rows, int64_t oc0,
                                int64_t tw, const T* acc) {
    const BlockShape& s = a.shape;
    const int64_t cp = a.layout.cout_p;
    const Strides4& ys = a.ys;
    const Strides4& xs = a.xs;
    for (int64_t q = 0; q < rows; ++q) {
      T* y = a.y + n * ys.n + (r + q) * ys.h + oc0 * ys.w;
      // the residual only exists at stride 1, where output and input rows coincide
      const T* x = s.residual ? a.x + n * xs.n + (r + q) * xs.h + oc0 * xs.w : nullptr;
      const T* src = acc + q * tw * cp;
      // walk the output along whichever of channels / columns is contiguous
      if (ys.c == 1 && (x == nullptr || xs.c == 1)) {
        for (int64_t p = 0; p < tw; ++p) {
          T* yp = y + p * ys.w;
          const T* sp = src + p * cp;
          if (x == nullptr) {
            for (int64_t o = 0; o < s.cout; ++o) yp[o] = sp[o];
          } else {
            const T* xp = x + p * xs.w;
            for (int64_t o = 0; o < s.cout; ++o) yp[o] = sp[o] + xp[o];
          }
        }
      } else if (ys.c == 1) {
        for (int64_t p = 0; p < tw; ++p) {
          for (int64_t o = 0; o < s.cout; ++o) {
            T v = src[p * cp + o];
            if (s.residual) v += x[p * xs.w + o * xs.c];
            y[p * ys.w + o] = v;
          }
        }
      } else {
        for (int64_t o = 0; o < s.cout; ++o) {
          for (int64_t p = 0; p < tw; ++p) {
            T v = src[p * cp + o];
            if (s.residual) v += x[p * xs.w + o * xs.c];
            y[p * ys.w + o * ys.c] = v;
          }
        }
      }
    }
  }

  // Copies accumulated rows of one hidden split into the partial buffer
  // [split][n][Ho][Wo][cout_p]; reduce_forward_splits adds them up.
  static void store_partial_rows(const Args& a, int64_t split, int64_t n, int64_t r, int64_t rows,
                                 int64_t oc0, int64_t tw, const T* acc) {
    const BlockShape& s = a.shape;
    const int64_t Ho = s.out_h(), Wo = s.out_w(), cp = a.layout.cout_p;
    for (int64_t q = 0; q < rows; ++q) {
      T* dst = a.partial + (((split * s.batch + n) * Ho + r + q) * Wo + oc0) * cp;
      std::memcpy(dst, acc + q * tw * cp, sizeof(T) * tw * cp);
    }
  }

  // Asks for the weights of hidden channels [h0, h0 + hc) (expand panels, depthwise
  // taps, project rows) to be brought into L2 while the current chunk computes. In a
  // whole model the weights come from L3 or DRAM (their sum exceeds L3), and the
  // project rows are short strided segments that the hardware prefetchers pick up late.
  static void prefetch_range(const T* p, int64_t n) {
    constexpr int64_t kLine = 64 / sizeof(T);
    for (int64_t i = 0; i < n; i += kLine) __builtin_prefetch(p + i, 0, 2);
  }

  static void prefetch_chunk_weights(const Args& a, int64_t h0, int64_t hc) {
    const BlockShape& s = a.shape;
    const Layout& l = a.layout;
    if (s.has_expand) prefetch_range(a.packed + l.w_expand + h0 * s.cin, hc * s.cin);
    for (int64_t t = 0; t < s.dw_taps(); ++t) prefetch_range(a.packed + l.w_dw + t * l.hp + h0, hc);
    for (int64_t j = 0; j < l.cout_p / VL; ++j) {
      prefetch_range(a.packed + l.w_project + j * l.hp * VL + h0 * VL, hc * VL);
    }
  }
};

}  // namespace
}  // namespace mnv2
