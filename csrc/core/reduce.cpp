// The ordered reductions after the kernels' items.
#include "reduce.h"

namespace mnv2 {

template <typename T>
void reduce_forward_splits(const ForwardArgs<T>& a, const ForwardPlan& p, int64_t row_begin,
                           int64_t row_end) {
  const BlockShape& s = a.shape;
  const int64_t Ho = s.out_h(), Wo = s.out_w(), cp = a.layout.cout_p;
  const int64_t split_stride = s.batch * Ho * Wo * cp;
  for (int64_t nr = row_begin; nr < row_end; ++nr) {
    const int64_t n = nr / Ho, r = nr % Ho;
    const T* part = a.partial + nr * Wo * cp;
    T* y = a.y + n * a.ys.n + r * a.ys.h;
    const T* x = s.residual ? a.x + n * a.xs.n + r * a.xs.h : nullptr;
    if (a.ys.c == 1 && (x == nullptr || a.xs.c == 1)) {
      // channels contiguous (channels_last): one vectorisable pass per term, summed in
      // the same order as below
      for (int64_t q = 0; q < Wo; ++q) {
        T* yq = y + q * a.ys.w;
        const T* pq = part + q * cp;
        for (int64_t o = 0; o < s.cout; ++o) yq[o] = pq[o];
        for (int64_t sp = 1; sp < p.n_splits; ++sp) {
          const T* ps = pq + sp * split_stride;
          for (int64_t o = 0; o < s.cout; ++o) yq[o] += ps[o];
        }
        if (x != nullptr) {
          const T* xq = x + q * a.xs.w;
          for (int64_t o = 0; o < s.cout; ++o) yq[o] += xq[o];
        }
      }
      continue;
    }
    for (int64_t q = 0; q < Wo; ++q) {
      for (int64_t o = 0; o < s.cout; ++o) {
        T v = part[q * cp + o];
        for (int64_t sp = 1; sp < p.n_splits; ++sp) v += part[sp * split_stride + q * cp + o];
        if (x != nullptr) v += x[q * a.xs.w + o * a.xs.c];
        y[q * a.ys.w + o * a.ys.c] = v;
      }
    }
  }
}

template <typename T>
void backward_finish(const BlockShape& s, const BackwardPlan& p, const T* side, T* gx,
                     const Strides4& gxs) {
  if (gx == nullptr || p.n_bands < 2) return;
  const int64_t W = s.in_w;
  for (int64_t n = 0; n < s.batch; ++n) {
    for (int64_t band = 1; band < p.n_bands; ++band) {
      const int64_t i_first = backward_band_first_row(s, p, band);
      const int64_t shared = backward_band_shared_last_row(s, p, band) - i_first + 1;
      const T* band_side = side + (n * (p.n_bands - 1) + band - 1) * p.side_rows_per_item * W * s.cin;
      for (int64_t j = 0; j < shared; ++j) {
        T* g = gx + n * gxs.n + (i_first + j) * gxs.h;
        const T* src = band_side + j * W * s.cin;
        for (int64_t w = 0; w < W; ++w) {
          for (int64_t c = 0; c < s.cin; ++c) g[w * gxs.w + c * gxs.c] += src[w * s.cin + c];
        }
      }
    }
  }
}

template <typename T>
void reduce_grads(const BlockShape& s, const Layout& l, const T* partials, int64_t tasks,
                  int64_t h_begin, int64_t h_end, T* g_w_expand, T* g_b_expand, T* g_w_dw,
                  T* g_b_dw, T* g_w_project, T* g_b_project) {
  const GradLayout gl = make_grad_layout(s, l);
  // Sum task 0, 1, 2, ... in that order for every element: bitwise repeatable.
  auto sum = [&](int64_t off) {
    T acc = T(0);
    for (int64_t t = 0; t < tasks; ++t) acc += partials[t * gl.total + off];
    return acc;
  };
  for (int64_t h = h_begin; h < h_end; ++h) {
    if (s.has_expand) {
      if (g_w_expand) {
        for (int64_t c = 0; c < s.cin; ++c) g_w_expand[h * s.cin + c] = sum(gl.g_w_expand_t + c * l.hp + h);
      }
      if (g_b_expand) g_b_expand[h] = sum(gl.g_b_expand + h);
    }
    if (g_w_dw) {
      const int64_t taps = s.dw_taps();
      for (int64_t t = 0; t < taps; ++t) g_w_dw[h * taps + t] = sum(gl.g_w_dw + t * l.hp + h);
    }
    if (g_b_dw) g_b_dw[h] = sum(gl.g_b_dw + h);
    if (g_w_project) {
      for (int64_t o = 0; o < s.cout; ++o) g_w_project[o * s.hidden + h] = sum(gl.g_w_project + o * l.hp + h);
    }
  }
  if (g_b_project && h_begin == 0) {
    for (int64_t o = 0; o < s.cout; ++o) g_b_project[o] = sum(gl.g_b_project + o);
  }
}

#define MNV2_INSTANTIATE(T)                                                                       \
  template void reduce_forward_splits<T>(const ForwardArgs<T>&, const ForwardPlan&, int64_t,       \
                                         int64_t);                                                 \
  template void backward_finish<T>(const BlockShape&, const BackwardPlan&, const T*, T*,           \
                                   const Strides4&);                                               \
  template void reduce_grads<T>(const BlockShape&, const Layout&, const T*, int64_t, int64_t,      \
                                int64_t, T*, T*, T*, T*, T*, T*);
MNV2_INSTANTIATE(float)
MNV2_INSTANTIATE(double)
#undef MNV2_INSTANTIATE

}  // namespace mnv2
