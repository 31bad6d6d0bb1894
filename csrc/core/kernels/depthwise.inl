#pragma once
// The depthwise kDwKernel x kDwKernel convolution over rows of channels,
// vectorised over channels: one output row forward, and its backward.
#include "simd.inl"

namespace mnv2 {
namespace {

template <typename T>
struct Depthwise {
  using V = Simd<T>;
  using vf = typename V::vf;
  static constexpr int64_t VL = V::VL;

  // One output row. rows[ky] holds input columns [c_lo, c_lo + nvalid) with hc channels
  // each (an all-zero row stands in for rows outside the image); tap (ky, kx) reads
  // rows[ky] at column (oc0 + p) * st - dil * kDwPad + kx * dil. Output columns
  // [oc0, oc0 + tw) go to out[tw][hc]; the weights are w_dw[tap * ldw + c].
  static void row(const T* const rows[kDwKernel], int64_t c_lo, int64_t in_w, int st, int dil, int64_t oc0,
                  int64_t tw, int64_t hc, const T* w_dw, int64_t ldw, const T* b_dw, T* out,
                  bool relu) {
    const int64_t pad = int64_t{dil} * kDwPad, reach = int64_t{dil} * (kDwKernel - 1);
    const int64_t tap_step = dil * hc;
    for (int64_t c = 0; c < hc; c += VL) {
      vf w[kDwTaps];
      MNV2_UNROLL for (int t = 0; t < kDwTaps; ++t) w[t] = V::load(w_dw + t * ldw + c);
      const vf b = V::load(b_dw + c);
      for (int64_t p = 0; p < tw; ++p) {
        const int64_t q0 = (oc0 + p) * st - pad;  // leftmost input column of the taps
        vf acc = b;
        if (q0 >= 0 && q0 + reach < in_w) {
          MNV2_UNROLL for (int ky = 0; ky < kDwKernel; ++ky) {
            const T* r = rows[ky] + (q0 - c_lo) * hc + c;
            vf taps = w[ky * kDwKernel] * V::load(r);
            MNV2_UNROLL for (int kx = 1; kx < kDwKernel; ++kx) {
              taps += w[ky * kDwKernel + kx] * V::load(r + kx * tap_step);
            }
            acc += taps;
          }
        } else {
          for (int kx = 0; kx < kDwKernel; ++kx) {
            const int64_t q = q0 + int64_t{kx} * dil;
            if (q < 0 || q >= in_w) continue;
            MNV2_UNROLL for (int ky = 0; ky < kDwKernel; ++ky) {
              acc += w[ky * kDwKernel + kx] * V::load(rows[ky] + (q - c_lo) * hc + c);
            }
          }
        }
        V::store(out + p * hc + c, relu ? V::relu6(acc) : acc);
      }
    }
  }

  // Backward of one output row (full width, c_lo = 0): accumulates the weight and bias
  // gradients and scatters gz2 into the input-row gradient accumulators ga1[ky].
  static void row_backward(const T* const rows[kDwKernel], T* const ga1[kDwKernel], const T* gz2,
                           int64_t in_w, int st, int dil, int64_t out_w, int64_t hp, const T* w_dw,
                           T* g_w_dw, T* g_b_dw) {
    const int64_t pad = int64_t{dil} * kDwPad;
    for (int64_t c = 0; c < hp; c += VL) {
      vf w[kDwTaps], gw[kDwTaps];
      MNV2_UNROLL for (int t = 0; t < kDwTaps; ++t) {
        w[t] = V::load(w_dw + t * hp + c);
        gw[t] = vf{};
      }
      vf gb = {};
      for (int64_t p = 0; p < out_w; ++p) {
        const vf g = V::load(gz2 + p * hp + c);
        gb += g;
        const int64_t q0 = p * st - pad;
        for (int kx = 0; kx < kDwKernel; ++kx) {
          const int64_t q = q0 + int64_t{kx} * dil;
          if (q < 0 || q >= in_w) continue;
          MNV2_UNROLL for (int ky = 0; ky < kDwKernel; ++ky) {
            const int64_t off = q * hp + c;
            gw[ky * kDwKernel + kx] += g * V::load(rows[ky] + off);
            V::store(ga1[ky] + off, V::load(ga1[ky] + off) + g * w[ky * kDwKernel + kx]);
          }
        }
      }
      MNV2_UNROLL for (int t = 0; t < kDwTaps; ++t) {
        V::store(g_w_dw + t * hp + c, V::load(g_w_dw + t * hp + c) + gw[t]);
      }
      V::store(g_b_dw + c, V::load(g_b_dw + c) + gb);
    }
  }
};

}  // namespace
}  // namespace mnv2
