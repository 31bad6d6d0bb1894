#pragma once
// The depthwise k x k convolution (k = 3, 5 or 7) over rows of channels, vectorised
// over channels: one output row forward, and its backward. Each kernel size has its own
// fully unrolled instance (Taps<K>); Depthwise<T> picks one from the block's shape.
#include "simd.inl"

namespace mnv2 {
namespace {

template <typename T>
struct Depthwise {
  using V = Simd<T>;
  using vf = typename V::vf;
  static constexpr int64_t VL = V::VL;

  // One output row. rows[ky] (ky < k) holds input columns [c_lo, c_lo + nvalid) with hc
  // channels each (an all-zero row stands in for rows outside the image); tap (ky, kx)
  // reads rows[ky] at column (oc0 + p) * st - s.dw_pad() + kx * dil. Output columns
  // [oc0, oc0 + tw) go to out[tw][hc]; the weights are w_dw[tap * ldw + c]. act: apply
  // the block's activation (ReLU6 or ReLU, s.relu6), else store the bare sum.
  static void row(const BlockShape& s, const T* const rows[kMaxDwKernel], int64_t c_lo, int64_t in_w,
                  int st, int64_t oc0, int64_t tw, int64_t hc, const T* w_dw, int64_t ldw, const T* b_dw,
                  T* out, bool act) {
    switch (s.kernel) {
      case 3: return Taps<3>::row(rows, c_lo, in_w, st, s.dilation, oc0, tw, hc, w_dw, ldw, b_dw, out, act, s.relu6);
      case 5: return Taps<5>::row(rows, c_lo, in_w, st, s.dilation, oc0, tw, hc, w_dw, ldw, b_dw, out, act, s.relu6);
      default: return Taps<7>::row(rows, c_lo, in_w, st, s.dilation, oc0, tw, hc, w_dw, ldw, b_dw, out, act, s.relu6);
    }
  }

  // Backward of one output row (full width, c_lo = 0): accumulates the weight and bias
  // gradients and scatters gz2 into the input-row gradient accumulators ga1[ky].
  static void row_backward(const BlockShape& s, const T* const rows[kMaxDwKernel], T* const ga1[kMaxDwKernel],
                           const T* gz2, int st, int64_t out_w, int64_t hp, const T* w_dw, T* g_w_dw,
                           T* g_b_dw) {
    switch (s.kernel) {
      case 3: return Taps<3>::row_backward(rows, ga1, gz2, s.in_w, st, s.dilation, out_w, hp, w_dw, g_w_dw, g_b_dw);
      case 5: return Taps<5>::row_backward(rows, ga1, gz2, s.in_w, st, s.dilation, out_w, hp, w_dw, g_w_dw, g_b_dw);
      default: return Taps<7>::row_backward(rows, ga1, gz2, s.in_w, st, s.dilation, out_w, hp, w_dw, g_w_dw, g_b_dw);
    }
  }

 private:
  template <int K>
  struct Taps {
    static constexpr int kTaps = K * K;

    static void row(const T* const rows[kMaxDwKernel], int64_t c_lo, int64_t in_w, int st, int dil, int64_t oc0,
                    int64_t tw, int64_t hc, const T* w_dw, int64_t ldw, const T* b_dw, T* out, bool act,
                    bool relu6) {
      const int64_t pad = int64_t{dil} * (K / 2), reach = int64_t{dil} * (K - 1);
      const int64_t tap_step = dil * hc;
      for (int64_t c = 0; c < hc; c += VL) {
        // (3x3: the 9 weights stay in registers; 5x5 and 7x7 reload them from L1)
        vf w[kTaps];
        MNV2_UNROLL for (int t = 0; t < kTaps; ++t) w[t] = V::load(w_dw + t * ldw + c);
        const vf b = V::load(b_dw + c);
        for (int64_t p = 0; p < tw; ++p) {
          const int64_t q0 = (oc0 + p) * st - pad;  // leftmost input column of the taps
          vf acc = b;
          if (q0 >= 0 && q0 + reach < in_w) {
            MNV2_UNROLL for (int ky = 0; ky < K; ++ky) {
              const T* r = rows[ky] + (q0 - c_lo) * hc + c;
              vf taps = w[ky * K] * V::load(r);
              MNV2_UNROLL for (int kx = 1; kx < K; ++kx) taps += w[ky * K + kx] * V::load(r + kx * tap_step);
              acc += taps;
            }
          } else {
            for (int kx = 0; kx < K; ++kx) {
              const int64_t q = q0 + int64_t{kx} * dil;
              if (q < 0 || q >= in_w) continue;
              MNV2_UNROLL for (int ky = 0; ky < K; ++ky) {
                acc += w[ky * K + kx] * V::load(rows[ky] + (q - c_lo) * hc + c);
              }
            }
          }
          V::store(out + p * hc + c, act ? V::activation(acc, relu6) : acc);
        }
      }
    }

    static void row_backward(const T* const rows[kMaxDwKernel], T* const ga1[kMaxDwKernel], const T* gz2,
                             int64_t in_w, int st, int dil, int64_t out_w, int64_t hp, const T* w_dw, T* g_w_dw,
                             T* g_b_dw) {
      const int64_t pad = int64_t{dil} * (K / 2);
      for (int64_t c = 0; c < hp; c += VL) {
        vf w[kTaps], gw[kTaps];
        MNV2_UNROLL for (int t = 0; t < kTaps; ++t) {
          w[t] = V::load(w_dw + t * hp + c);
          gw[t] = vf{};
        }
        vf gb = {};
        for (int64_t p = 0; p < out_w; ++p) {
          const vf g = V::load(gz2 + p * hp + c);
          gb += g;
          const int64_t q0 = p * st - pad;
          for (int kx = 0; kx < K; ++kx) {
            const int64_t q = q0 + int64_t{kx} * dil;
            if (q < 0 || q >= in_w) continue;
            MNV2_UNROLL for (int ky = 0; ky < K; ++ky) {
              const int64_t off = q * hp + c;
              gw[ky * K + kx] += g * V::load(rows[ky] + off);
              V::store(ga1[ky] + off, V::load(ga1[ky] + off) + g * w[ky * K + kx]);
            }
          }
        }
        MNV2_UNROLL for (int t = 0; t < kTaps; ++t) {
          V::store(g_w_dw + t * hp + c, V::load(g_w_dw + t * hp + c) + gw[t]);
        }
        V::store(g_b_dw + c, V::load(g_b_dw + c) + gb);
      }
    }
  };
};

}  // namespace
}  // namespace mnv2
