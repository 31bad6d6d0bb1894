#pragma once
// MobileNetV2's first convolution fused into the first block: the block's input rows
// computed from the image inside the block's row window, never stored (StemSource).
#include "gemm.inl"

namespace mnv2 {
namespace {

template <typename T>
struct Stem {
  using G = Gemm<T>;
  static constexpr int64_t VL = G::VL;

  // Input row i of the block, columns [c_lo, c_lo + nvalid), channels [h0, h0 + hc):
  // relu6(conv(image) + b) as one GEMM over an im2col row of kStemTaps C values per
  // column, k = (kh * kStemKernel + kw) * C + c, built in cols [nvalid][kStemTaps C].
  static void input_row(const StemSource<T>& stem, int64_t n, int64_t i, int64_t c_lo, int64_t nvalid,
                        int64_t h0, int64_t hc, T* cols, T* dst) {
    const PointwiseLayout& sl = stem.layout;
    const int64_t C = stem.channels, K = sl.cin, IH = stem.height, IW = stem.width;
    const int64_t row_len = kStemKernel * C;  // one kernel row of the im2col row
    const Strides4& is = stem.strides;
    const T* img = stem.image + n * is.n;
    // channels_last image: the pixels of one kernel row are kStemKernel C consecutive values
    const bool dense = is.c == 1 && is.w == C;
    for (int64_t kh = 0; kh < kStemKernel; ++kh) {
      const int64_t ih = kStemStride * i - kStemPad + kh;
      const bool row_in = ih >= 0 && ih < IH;
      const T* src_row = row_in ? img + ih * is.h : img;
      for (int64_t j = 0; j < nvalid; ++j) {
        const int64_t iw0 = kStemStride * (c_lo + j) - kStemPad;
        T* d = cols + j * K + kh * row_len;
        if (!row_in) {
          for (int64_t e = 0; e < row_len; ++e) d[e] = T(0);
        } else if (dense && iw0 >= 0 && iw0 + kStemKernel - 1 < IW) {
          const T* src = src_row + iw0 * C;
          constexpr int kRgb = 3;  // the common image: a fixed-length copy
          if (C == kRgb) {
            MNV2_UNROLL for (int e = 0; e < kStemKernel * kRgb; ++e) d[e] = src[e];
          } else {
            for (int64_t e = 0; e < row_len; ++e) d[e] = src[e];
          }
        } else {
          for (int64_t kw = 0; kw < kStemKernel; ++kw) {
            const int64_t iw = iw0 + kw;
            const bool in = iw >= 0 && iw < IW;
            for (int64_t c = 0; c < C; ++c) d[kw * C + c] = in ? src_row[iw * is.w + c * is.c] : T(0);
          }
        }
      }
    }
    G::run(nvalid, hc, K, cols, K, 1, stem.packed + sl.w + h0 * K, VL, K * VL, dst, hc,
           stem.packed + sl.b + h0, kRelu6);
  }
};

}  // namespace
}  // namespace mnv2
