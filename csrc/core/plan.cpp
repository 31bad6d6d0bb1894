// ISA-independent parts of the fused block: validation, weight packing, work
// planning and the deterministic reductions of the backward.
#include <algorithm>
#include <cstring>

#include "fused_ir.h"

namespace mnv2 {
namespace {

// Working-set target per thread: this fraction of a 512 KiB L2 keeps the
// expanded-row window, the weight chunk and the output accumulator resident.
constexpr int64_t kCacheBudgetFloats = (320 * 1024) / sizeof(float);

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kScalar: return "scalar";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
    case Isa::kNeon: return "neon";
  }
  return "unknown";
}

const char* validate_shape(const BlockShape& s) {
  if (s.batch < 0) return "batch size must be >= 0";
  if (s.in_h < 1 || s.in_w < 1) return "input height and width must be >= 1";
  if (s.cin < 1 || s.hidden < 1 || s.cout < 1) return "channel counts must be >= 1";
  if (s.stride != 1 && s.stride != 2) return "stride must be 1 or 2";
  if (!s.has_expand && s.hidden != s.cin) return "without an expand step, hidden must equal cin";
  if (s.residual && (s.stride != 1 || s.cin != s.cout)) {
    return "the residual needs stride 1 and cin == cout";
  }
  return nullptr;
}

Layout make_layout(const BlockShape& s, int64_t vl, bool for_backward) {
  Layout l;
  l.vl = vl;
  l.hp = round_up(s.hidden, vl);
  l.cin_p = round_up(s.cin, vl);
  l.cout_p = round_up(s.cout, vl);
  // Arrays follow each other with no gaps and only those the kernels read
  // exist, so pack_weights writes every element.
  int64_t off = 0;
  auto take = [&](int64_t n) {
    const int64_t at = off;
    off += n;
    return at;
  };
  const int64_t ex = s.has_expand ? 1 : 0, bw = for_backward ? 1 : 0;
  l.we_kn = take(ex * s.cin * l.hp);
  l.be = take(ex * l.hp);
  l.wd = take(9 * l.hp);
  l.bd = take(l.hp);
  l.wp_kn = take(l.hp * l.cout_p);
  l.bp = take(l.cout_p);
  l.we_nk = take(ex * bw * l.hp * l.cin_p);
  l.wp_nk = take(bw * s.cout * l.hp);
  l.trailer = take(kBlockTrailer);
  l.total = off;
  return l;
}

GradLayout make_grad_layout(const BlockShape& s, const Layout& l) {
  GradLayout g;
  g.g_weT = 0;
  g.g_be = g.g_weT + s.cin * l.hp;
  g.g_wd = g.g_be + l.hp;
  g.g_bd = g.g_wd + 9 * l.hp;
  g.g_wp = g.g_bd + l.hp;
  g.g_bp = g.g_wp + s.cout * l.hp;
  g.total = g.g_bp + l.cout_p;
  return g;
}

template <typename T>
void pack_weights(const BlockShape& s, const Layout& l, const T* w_expand, const T* b_expand,
                  const T* w_dw, const T* b_dw, const T* w_project, const T* b_project,
                  bool for_backward, int64_t h_begin, int64_t h_end, T* packed) {
  const bool last = h_end == s.hidden;
  const int64_t pad_end = last ? l.hp : h_end;  // the last range also zeroes [hidden, hp)
  constexpr int64_t kBlock = 16;  // transposes go block by block to stay in L1
  for (int64_t h0 = h_begin; h0 < pad_end; h0 += kBlock) {
    const int64_t h1 = std::min(h0 + kBlock, pad_end);
    const int64_t hv = std::min(h1, s.hidden);  // [h0, hv) real, [hv, h1) padding
    if (s.has_expand) {
      // panel-major [hp / vl][cin][vl]: the kernel streams one panel sequentially
      for (int64_t h = h0; h < h1; ++h) {
        T* dst = packed + l.we_kn + (h / l.vl) * s.cin * l.vl + h % l.vl;
        for (int64_t c = 0; c < s.cin; ++c) dst[c * l.vl] = h < hv ? w_expand[h * s.cin + c] : T(0);
      }
      for (int64_t h = h0; h < h1; ++h) packed[l.be + h] = h < hv ? b_expand[h] : T(0);
      if (for_backward) {
        // panel-major [cin_p / vl][hp][vl]
        for (int64_t h = h0; h < h1; ++h) {
          T* dst = packed + l.we_nk + h * l.vl;
          for (int64_t c = 0; c < l.cin_p; ++c) {
            dst[(c / l.vl) * l.hp * l.vl + c % l.vl] = h < hv && c < s.cin ? w_expand[h * s.cin + c] : T(0);
          }
        }
      }
    }
    for (int t = 0; t < 9; ++t) {
      for (int64_t h = h0; h < h1; ++h) packed[l.wd + t * l.hp + h] = h < hv ? w_dw[h * 9 + t] : T(0);
    }
    for (int64_t h = h0; h < h1; ++h) packed[l.bd + h] = h < hv ? b_dw[h] : T(0);
    // panel-major [cout_p / vl][hp][vl]
    for (int64_t o = 0; o < l.cout_p; ++o) {
      T* dst = packed + l.wp_kn + (o / l.vl) * l.hp * l.vl + o % l.vl;
      for (int64_t h = h0; h < h1; ++h) {
        dst[h * l.vl] = h < hv && o < s.cout ? w_project[o * s.hidden + h] : T(0);
      }
    }
    if (for_backward) {
      // panel-major [hp / vl][cout][vl]
      for (int64_t o = 0; o < s.cout; ++o) {
        T* dst = packed + l.wp_nk + o * l.vl;
        for (int64_t h = h0; h < h1; ++h) {
          dst[(h / l.vl) * s.cout * l.vl + h % l.vl] = h < hv ? w_project[o * s.hidden + h] : T(0);
        }
      }
    }
  }
  if (last) {
    for (int64_t o = 0; o < l.cout_p; ++o) packed[l.bp + o] = o < s.cout ? b_project[o] : T(0);
    T* t = packed + l.trailer;
    t[0] = T(s.has_expand ? kBlockTag : kBlockTagNoExpand);
    t[1] = T(s.cin);
    t[2] = T(s.hidden);
    t[3] = T(s.cout);
  }
}

PointwiseLayout make_pointwise_layout(int64_t cin, int64_t cout, int64_t vl) {
  PointwiseLayout l;
  l.vl = vl;
  l.cin = cin;
  l.cout = cout;
  l.cout_p = round_up(cout, vl);
  l.w = 0;
  l.b = l.cout_p * cin;
  l.trailer = l.b + l.cout_p;
  l.total = l.trailer + kPointwiseTrailer;
  return l;
}

template <typename T>
void pack_pointwise(const PointwiseLayout& l, const T* w, const T* b, T* packed) {
  // panel by panel, each written sequentially: [cin][vl] from vl rows of w
  for (int64_t o0 = 0; o0 < l.cout_p; o0 += l.vl) {
    T* dst = packed + l.w + o0 * l.cin;
    for (int64_t c = 0; c < l.cin; ++c) {
      for (int64_t j = 0; j < l.vl; ++j) {
        const int64_t o = o0 + j;
        dst[c * l.vl + j] = o < l.cout ? w[o * l.cin + c] : T(0);
      }
    }
  }
  for (int64_t o = 0; o < l.cout_p; ++o) packed[l.b + o] = o < l.cout ? b[o] : T(0);
  packed[l.trailer] = T(kPointwiseTag);
  packed[l.trailer + 1] = T(l.cin);
  packed[l.trailer + 2] = T(l.cout);
}

// (channel counts are far below 2^24, exact in float)
template <typename T>
bool packed_matches(const BlockShape& s, const Layout& l, const T* packed) {
  const T* t = packed + l.trailer;
  return t[0] == T(s.has_expand ? kBlockTag : kBlockTagNoExpand) && t[1] == T(s.cin) &&
         t[2] == T(s.hidden) && t[3] == T(s.cout);
}

template <typename T>
bool packed_matches(const PointwiseLayout& l, const T* packed) {
  const T* t = packed + l.trailer;
  return t[0] == T(kPointwiseTag) && t[1] == T(l.cin) && t[2] == T(l.cout);
}

void finish_forward_plan(const BlockShape& s, const Layout& l, ForwardPlan* p) {
  const int64_t Ho = s.out_h(), Wo = s.out_w();
  p->cols_per_tile = std::clamp<int64_t>(p->cols_per_tile, 1, Wo);
  p->n_col_tiles = ceil_div(Wo, p->cols_per_tile);
  p->rows_per_band = std::clamp<int64_t>(p->rows_per_band, 1, Ho);
  p->n_bands = ceil_div(Ho, p->rows_per_band);
  p->rows_per_step = std::clamp<int64_t>(p->rows_per_step, 1, p->rows_per_band);
  p->n_splits = std::clamp<int64_t>(p->n_splits, 1, l.hp / l.vl);
  p->split_channels = round_up(ceil_div(l.hp, p->n_splits), l.vl);
  p->n_splits = ceil_div(l.hp, p->split_channels);
  p->hidden_chunk = std::clamp<int64_t>(round_up(p->hidden_chunk, l.vl), l.vl, p->split_channels);
  p->partial_floats = p->n_splits > 1 ? p->n_splits * s.batch * Ho * Wo * l.cout_p : 0;
  p->window_slots = (p->rows_per_step - 1) * s.stride + 3;
  p->window_cols = std::min(s.in_w, (p->cols_per_tile - 1) * s.stride + 3);
  const int64_t hc = p->hidden_chunk;
  const int64_t acc_rows = hc < p->split_channels ? p->rows_per_band : p->rows_per_step;
  // the kernel carves exactly this: window ring + zero row, depthwise rows, accumulator
  // (then the stem's im2col row)
  p->scratch_floats = (p->window_slots + 1) * p->window_cols * hc +
                      p->rows_per_step * p->cols_per_tile * hc + acc_rows * p->cols_per_tile * l.cout_p +
                      p->window_cols * p->stem_k;  // with a fused stem: one im2col row
}

ForwardPlan plan_forward(const BlockShape& s, const Layout& l, int threads) {
  threads = std::max(threads, 1);
  const int64_t Ho = s.out_h(), Wo = s.out_w(), st = s.stride, hp = l.hp;
  ForwardPlan p{};

  // Column tiles only when three rows of the expansion would take more than
  // half the budget at full width.
  const int64_t half = kCacheBudgetFloats / 2;
  p.cols_per_tile = Wo;
  if (3 * std::min(s.in_w, (Wo - 1) * st + 3) * hp > half) {
    p.cols_per_tile = std::max<int64_t>(1, (half / (3 * hp) - 3) / st + 1);
  }
  p.n_col_tiles = ceil_div(Wo, p.cols_per_tile);
  p.cols_per_tile = ceil_div(Wo, p.n_col_tiles);

  // Too few images for the threads: split small images by hidden channels
  // (each thread streams only its share of the weights, which dominate there)
  // and large ones by row bands (the halo rows recomputed per band are few).
  const int64_t per_image = s.batch * p.n_col_tiles;
  const int64_t ways = per_image >= threads || per_image == 0 ? 1 : ceil_div(threads, per_image);
  p.n_splits = 1;
  int64_t bands = 1;
  if (ways > 1) {
    if (Ho * Wo <= 28 * 28 && hp >= 64 * ways) {
      p.n_splits = ways;
    } else {
      bands = std::min(Ho, ways);
    }
  }
  p.rows_per_band = ceil_div(Ho, bands);
  const int64_t split_hp = round_up(ceil_div(hp, p.n_splits), l.vl);

  // Project GEMM over at least ~32 output pixels.
  p.rows_per_step = std::min(p.rows_per_band, ceil_div(32, p.cols_per_tile));

  // Hidden chunk: the fewest chunks of a split whose working set fits the budget.
  const int64_t tw = p.cols_per_tile, R = p.rows_per_step;
  const int64_t slots = (R - 1) * st + 3;
  const int64_t nvalid = std::min(s.in_w, (tw - 1) * st + 3);
  for (int64_t chunks = 1;; ++chunks) {
    const int64_t hc = round_up(ceil_div(split_hp, chunks), l.vl);
    const int64_t acc_rows = hc < split_hp ? p.rows_per_band : R;
    const int64_t ws = (s.cin + l.cout_p + 11) * hc + (slots + 1) * nvalid * hc + R * tw * hc +
                       acc_rows * tw * l.cout_p;
    p.hidden_chunk = hc;
    if (ws <= kCacheBudgetFloats || hc == l.vl) break;
  }
  // A chunked pass accumulates a whole band of output: bound it so scratch
  // never grows with H.
  if (p.hidden_chunk < split_hp) {
    const int64_t max_rows = std::max<int64_t>(R, (kCacheBudgetFloats / 4) / (tw * l.cout_p));
    p.rows_per_band = std::min(p.rows_per_band, max_rows);
  }
  finish_forward_plan(s, l, &p);
  return p;
}

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

void finish_backward_plan(const BlockShape& s, const Layout& l, BackwardPlan* p) {
  const int64_t Ho = s.out_h(), W = s.in_w, Wo = s.out_w();
  p->rows_per_band = std::clamp<int64_t>(p->rows_per_band, 1, Ho);
  p->n_bands = ceil_div(Ho, p->rows_per_band);
  p->rows_per_step = std::clamp<int64_t>(p->rows_per_step, 1, p->rows_per_band);
  p->rows_per_step = std::min<int64_t>(p->rows_per_step, (kMaxBackwardSlots - 3) / s.stride + 1);
  p->window_slots = (p->rows_per_step - 1) * s.stride + 3;
  // a step finishes at most rows_per_step * stride + 2 input rows
  p->pending_pixels = std::max<int64_t>(32, (p->rows_per_step * s.stride + 2) * W);
  p->scratch_floats = (2 * p->window_slots + 2) * W * l.hp + 2 * p->rows_per_step * Wo * l.hp +
                      p->pending_pixels * (l.cin_p + 2 * l.hp + s.cin + s.cout);
  p->side_rows_per_item = 3 - s.stride;
  p->side_floats = s.batch * (p->n_bands - 1) * p->side_rows_per_item * W * s.cin;
}

BackwardPlan plan_backward(const BlockShape& s, const Layout& l, int threads) {
  threads = std::max(threads, 1);
  const int64_t Ho = s.out_h();
  BackwardPlan p{};
  const int64_t bands =
      s.batch >= threads || s.batch == 0 ? 1 : std::min(Ho, ceil_div(threads, s.batch));
  p.rows_per_band = ceil_div(Ho, bands);
  // project GEMMs over at least ~32 output pixels
  p.rows_per_step = ceil_div(32, s.out_w());
  finish_backward_plan(s, l, &p);
  return p;
}

template <typename T>
void backward_finish(const BackwardArgs<T>& a, const BackwardPlan& p) {
  if (a.gx == nullptr || p.n_bands < 2) return;
  const BlockShape& s = a.shape;
  const int64_t W = s.in_w;
  for (int64_t n = 0; n < s.batch; ++n) {
    for (int64_t band = 1; band < p.n_bands; ++band) {
      const int64_t i_first = band * p.rows_per_band * s.stride - 1;
      const T* side =
          a.side + (n * (p.n_bands - 1) + band - 1) * p.side_rows_per_item * W * s.cin;
      for (int64_t j = 0; j < p.side_rows_per_item; ++j) {
        T* gx = a.gx + n * a.gxs.n + (i_first + j) * a.gxs.h;
        const T* src = side + j * W * s.cin;
        for (int64_t w = 0; w < W; ++w) {
          for (int64_t c = 0; c < s.cin; ++c) gx[w * a.gxs.w + c * a.gxs.c] += src[w * s.cin + c];
        }
      }
    }
  }
}

template <typename T>
void reduce_grads(const BlockShape& s, const Layout& l, const T* partials, int64_t tasks,
                  int64_t h_begin, int64_t h_end, T* g_we, T* g_be, T* g_wd, T* g_bd, T* g_wp,
                  T* g_bp) {
  const GradLayout gl = make_grad_layout(s, l);
  // Sum task 0, 1, 2, ... in that order for every element: bitwise repeatable.
  auto sum = [&](int64_t off) {
    T acc = T(0);
    for (int64_t t = 0; t < tasks; ++t) acc += partials[t * gl.total + off];
    return acc;
  };
  for (int64_t h = h_begin; h < h_end; ++h) {
    if (s.has_expand) {
      if (g_we) {
        for (int64_t c = 0; c < s.cin; ++c) g_we[h * s.cin + c] = sum(gl.g_weT + c * l.hp + h);
      }
      if (g_be) g_be[h] = sum(gl.g_be + h);
    }
    if (g_wd) {
      for (int t = 0; t < 9; ++t) g_wd[h * 9 + t] = sum(gl.g_wd + t * l.hp + h);
    }
    if (g_bd) g_bd[h] = sum(gl.g_bd + h);
    if (g_wp) {
      for (int64_t o = 0; o < s.cout; ++o) g_wp[o * s.hidden + h] = sum(gl.g_wp + o * l.hp + h);
    }
  }
  if (g_bp && h_begin == 0) {
    for (int64_t o = 0; o < s.cout; ++o) g_bp[o] = sum(gl.g_bp + o);
  }
}

#define MNV2_INSTANTIATE(T)                                                                \
  template void pack_pointwise<T>(const PointwiseLayout&, const T*, const T*, T*);            \
  template bool packed_matches<T>(const BlockShape&, const Layout&, const T*);                \
  template bool packed_matches<T>(const PointwiseLayout&, const T*);                          \
  template void pack_weights<T>(const BlockShape&, const Layout&, const T*, const T*, const T*, \
                                const T*, const T*, const T*, bool, int64_t, int64_t, T*);    \
  template void reduce_forward_splits<T>(const ForwardArgs<T>&, const ForwardPlan&, int64_t,   \
                                         int64_t);                                             \
  template void backward_finish<T>(const BackwardArgs<T>&, const BackwardPlan&);             \
  template void reduce_grads<T>(const BlockShape&, const Layout&, const T*, int64_t, int64_t,     \
                                int64_t, T*, T*, T*, T*, T*, T*);
MNV2_INSTANTIATE(float)
MNV2_INSTANTIATE(double)
#undef MNV2_INSTANTIATE

}  // namespace mnv2
