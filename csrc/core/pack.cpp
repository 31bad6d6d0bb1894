// Layouts of the packed weights and the packing.
#include <algorithm>

#include "layout.h"

namespace mnv2 {
namespace {

int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

}  // namespace

Layout make_layout(const BlockShape& s, int64_t vl, Packing packing) {
  Layout l;
  l.vl = vl;
  l.hp = round_up(s.hidden, vl);
  l.cin_p = round_up(s.cin, vl);
  l.cout_p = round_up(s.cout, vl);
  // Arrays follow each other with no gaps and only those the kernels read exist, so
  // pack_weights writes every element.
  int64_t off = 0;
  auto take = [&](int64_t n) {
    const int64_t at = off;
    off += n;
    return at;
  };
  const int64_t ex = s.has_expand ? 1 : 0, bw = packing == Packing::kBackward ? 1 : 0;
  l.w_expand = take(ex * s.cin * l.hp);
  l.b_expand = take(ex * l.hp);
  l.w_dw = take(s.dw_taps() * l.hp);
  l.b_dw = take(l.hp);
  l.w_project = take(l.hp * l.cout_p);
  l.b_project = take(l.cout_p);
  l.w_expand_t = take(ex * bw * l.hp * l.cin_p);
  l.w_project_t = take(bw * s.cout * l.hp);
  l.trailer = take(kBlockTrailer);
  l.total = off;
  return l;
}

GradLayout make_grad_layout(const BlockShape& s, const Layout& l) {
  GradLayout g;
  g.g_w_expand_t = 0;
  g.g_b_expand = g.g_w_expand_t + s.cin * l.hp;
  g.g_w_dw = g.g_b_expand + l.hp;
  g.g_b_dw = g.g_w_dw + s.dw_taps() * l.hp;
  g.g_w_project = g.g_b_dw + l.hp;
  g.g_b_project = g.g_w_project + s.cout * l.hp;
  g.total = g.g_b_project + l.cout_p;
  return g;
}

template <typename T>
void pack_weights(const BlockShape& s, const Layout& l, Packing packing, const T* w_expand,
                  const T* b_expand, const T* w_dw, const T* b_dw, const T* w_project,
                  const T* b_project, int64_t h_begin, int64_t h_end, T* packed) {
  const bool backward = packing == Packing::kBackward;
  const bool last = h_end == s.hidden;
  const int64_t pad_end = last ? l.hp : h_end;  // the last range also zeroes [hidden, hp)
  constexpr int64_t kBlock = 16;  // transposes go block by block to stay in L1
  for (int64_t h0 = h_begin; h0 < pad_end; h0 += kBlock) {
    const int64_t h1 = std::min(h0 + kBlock, pad_end);
    const int64_t hv = std::min(h1, s.hidden);  // [h0, hv) real, [hv, h1) padding
    if (s.has_expand) {
      // panel-major [hp / vl][cin][vl]: the kernel streams one panel sequentially
      for (int64_t h = h0; h < h1; ++h) {
        T* dst = packed + l.w_expand + (h / l.vl) * s.cin * l.vl + h % l.vl;
        for (int64_t c = 0; c < s.cin; ++c) dst[c * l.vl] = h < hv ? w_expand[h * s.cin + c] : T(0);
      }
      for (int64_t h = h0; h < h1; ++h) packed[l.b_expand + h] = h < hv ? b_expand[h] : T(0);
      if (backward) {
        // panel-major [cin_p / vl][hp][vl]
        for (int64_t h = h0; h < h1; ++h) {
          T* dst = packed + l.w_expand_t + h * l.vl;
          for (int64_t c = 0; c < l.cin_p; ++c) {
            dst[(c / l.vl) * l.hp * l.vl + c % l.vl] = h < hv && c < s.cin ? w_expand[h * s.cin + c] : T(0);
          }
        }
      }
    }
    const int64_t taps = s.dw_taps();
    for (int64_t t = 0; t < taps; ++t) {
      for (int64_t h = h0; h < h1; ++h) packed[l.w_dw + t * l.hp + h] = h < hv ? w_dw[h * taps + t] : T(0);
    }
    for (int64_t h = h0; h < h1; ++h) packed[l.b_dw + h] = h < hv && b_dw != nullptr ? b_dw[h] : T(0);
    // panel-major [cout_p / vl][hp][vl]
    for (int64_t o = 0; o < l.cout_p; ++o) {
      T* dst = packed + l.w_project + (o / l.vl) * l.hp * l.vl + o % l.vl;
      for (int64_t h = h0; h < h1; ++h) {
        dst[h * l.vl] = h < hv && o < s.cout ? w_project[o * s.hidden + h] : T(0);
      }
    }
    if (backward) {
      // panel-major [hp / vl][cout][vl]
      for (int64_t o = 0; o < s.cout; ++o) {
        T* dst = packed + l.w_project_t + o * l.vl;
        for (int64_t h = h0; h < h1; ++h) {
          dst[(h / l.vl) * s.cout * l.vl + h % l.vl] = h < hv ? w_project[o * s.hidden + h] : T(0);
        }
      }
    }
  }
  if (last) {
    for (int64_t o = 0; o < l.cout_p; ++o) packed[l.b_project + o] = o < s.cout ? b_project[o] : T(0);
    T* t = packed + l.trailer;
    t[0] = T(static_cast<int>(s.has_expand ? PackedTag::kBlock : PackedTag::kBlockNoExpand));
    t[1] = T(s.cin);
    t[2] = T(s.hidden);
    t[3] = T(s.cout);
    t[4] = T(s.kernel);
  }
}

template <typename T>
bool packed_matches(const BlockShape& s, const Layout& l, const T* packed) {
  const T* t = packed + l.trailer;
  const PackedTag tag = s.has_expand ? PackedTag::kBlock : PackedTag::kBlockNoExpand;
  return t[0] == T(static_cast<int>(tag)) && t[1] == T(s.cin) && t[2] == T(s.hidden) &&
         t[3] == T(s.cout) && t[4] == T(s.kernel);
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
  packed[l.trailer] = T(static_cast<int>(PackedTag::kPointwise));
  packed[l.trailer + 1] = T(l.cin);
  packed[l.trailer + 2] = T(l.cout);
}

template <typename T>
bool packed_matches(const PointwiseLayout& l, const T* packed) {
  const T* t = packed + l.trailer;
  return t[0] == T(static_cast<int>(PackedTag::kPointwise)) && t[1] == T(l.cin) && t[2] == T(l.cout);
}

#define MNV2_INSTANTIATE(T)                                                                        \
  template void pack_weights<T>(const BlockShape&, const Layout&, Packing, const T*, const T*,      \
                                const T*, const T*, const T*, const T*, int64_t, int64_t, T*);      \
  template bool packed_matches<T>(const BlockShape&, const Layout&, const T*);                      \
  template void pack_pointwise<T>(const PointwiseLayout&, const T*, const T*, T*);                  \
  template bool packed_matches<T>(const PointwiseLayout&, const T*);
MNV2_INSTANTIATE(float)
MNV2_INSTANTIATE(double)
#undef MNV2_INSTANTIATE

}  // namespace mnv2
