#pragma once
// A window of expanded input rows (a1) of one image, one column range and one chunk
// of hidden channels, kept in a ring of slots: the hidden tensor never exists in full,
// its rows are produced here and consumed by the depthwise step (paper section 5.1).
#include "gemm.inl"
#include "stem.inl"

namespace mnv2 {
namespace {

template <typename T>
struct RowWindow {
  using G = Gemm<T>;
  static constexpr int64_t VL = G::VL;

  // where the rows come from
  const BlockShape& s;
  const Layout& l;
  const T* x;
  Strides4 xs;
  const T* packed;
  const StemSource<T>* stem;  // non-null: rows from the fused stem instead of x
  // what the window holds
  int64_t n;             // image
  int64_t c_lo, nvalid;  // input columns [c_lo, c_lo + nvalid)
  int64_t slots;
  T* ring;         // [slots][nvalid][hc]
  const T* zero;   // [nvalid][hc] zeros
  T* cols;         // the stem's im2col row (unused without a stem)
  int64_t h0 = 0, hc = 0;  // hidden channels [h0, h0 + hc)
  int64_t have_hi = -1;    // highest row held (rows have_hi - slots + 1 .. have_hi)

  RowWindow(const BlockShape& s_, const Layout& l_, const T* x_, Strides4 xs_, const T* packed_,
            const StemSource<T>* stem_, int64_t n_, int64_t c_lo_, int64_t nvalid_, int64_t slots_,
            T* ring_, const T* zero_, T* cols_)
      : s(s_), l(l_), x(x_), xs(xs_), packed(packed_), stem(stem_), n(n_), c_lo(c_lo_),
        nvalid(nvalid_), slots(slots_), ring(ring_), zero(zero_), cols(cols_) {}

  // Holds nothing, for hidden channels [h0_, h0_ + hc_).
  void start_chunk(int64_t h0_, int64_t hc_) {
    h0 = h0_;
    hc = hc_;
    have_hi = -1;
  }

  int64_t row_floats() const { return nvalid * hc; }
  T* slot(int64_t i) const { return ring + (i % slots) * row_floats(); }

  const T* row(int64_t i) const {
    if (i < 0 || i >= s.in_h) return zero;
    return slot(i);
  }

  // Makes input rows [lo, hi] available (rows are requested in increasing order).
  void fill(int64_t lo, int64_t hi) {
    lo = imax(imax(lo, have_hi + 1), 0);
    hi = imin(hi, s.in_h - 1);
    while (lo <= hi) {
      // rows [lo, seg_hi] occupy consecutive slots
      const int64_t seg_hi = imin(hi, lo + (slots - lo % slots) - 1);
      compute_rows(lo, seg_hi);
      lo = seg_hi + 1;
    }
    have_hi = imax(have_hi, hi);
  }

 private:
  void compute_rows(int64_t lo, int64_t hi) {
    const T* xrow = stem == nullptr ? x + n * xs.n + c_lo * xs.w : nullptr;
    T* dst = slot(lo);
    const int64_t rows = hi - lo + 1;
    if (s.has_expand) {
      // panel-major [hp / VL][cin][VL]: the panels of channels [h0, h0 + hc)
      const T* B = packed + l.w_expand + h0 * s.cin;
      const T* bias = packed + l.b_expand + h0;
      if (rows == 1 || xs.h == nvalid * xs.w) {
        // consecutive rows are one uniformly strided matrix: a single GEMM
        G::run(rows * nvalid, hc, s.cin, xrow + lo * xs.h, xs.w, xs.c, B, VL, s.cin * VL, dst, hc,
               bias, s.relu6 ? kRelu6 : kRelu);
      } else {
        for (int64_t i = lo; i <= hi; ++i) {
          G::run(nvalid, hc, s.cin, xrow + i * xs.h, xs.w, xs.c, B, VL, s.cin * VL,
                 dst + (i - lo) * row_floats(), hc, bias, s.relu6 ? kRelu6 : kRelu);
        }
      }
      zero_padded_channels(dst, rows * nvalid);
    } else if (stem != nullptr) {
      for (int64_t i = lo; i <= hi; ++i) {
        T* d = dst + (i - lo) * row_floats();
        Stem<T>::input_row(*stem, n, i, c_lo, nvalid, h0, hc, cols, d);
        zero_padded_channels(d, nvalid);
      }
    } else {
      // t == 1: the window holds x itself, channels [h0, h0 + hc), zero-padded
      const int64_t real = imin(hc, s.cin - h0);
      for (int64_t i = lo; i <= hi; ++i) {
        T* d = dst + (i - lo) * row_floats();
        const T* src = xrow + i * xs.h + h0 * xs.c;
        for (int64_t p = 0; p < nvalid; ++p) {
          if (xs.c == 1) {
            std::memcpy(d + p * hc, src + p * xs.w, sizeof(T) * real);
          } else {
            for (int64_t c = 0; c < real; ++c) d[p * hc + c] = src[p * xs.w + c * xs.c];
          }
          for (int64_t c = real; c < hc; ++c) d[p * hc + c] = T(0);
        }
      }
    }
  }

  // After a GEMM into `pixels` rows of the window: the padded channels (past s.hidden,
  // which is s.cin when t == 1) must be exactly zero. With an infinite input the GEMM
  // leaves inf * 0 = NaN there, and the project would spread it.
  void zero_padded_channels(T* dst, int64_t pixels) const {
    const int64_t valid = s.hidden - h0;
    if (valid >= hc) return;
    for (int64_t p = 0; p < pixels; ++p) std::memset(dst + p * hc + valid, 0, sizeof(T) * (hc - valid));
  }
};

}  // namespace
}  // namespace mnv2
