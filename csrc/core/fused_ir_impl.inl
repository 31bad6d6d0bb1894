// Fused inverted-residual forward and backward, written once with GCC/Clang
// vector extensions for T and double, and compiled once per instruction
// set. Each ISA translation unit defines, before including this file:
//   MNV2_VEC_BYTES  vector register width in bytes
//   MNV2_MR         rows of the GEMM register tile
// and is compiled with that ISA's flags. Everything here has internal linkage
// so no code compiled for one ISA can be picked up by another at link time;
// for the same reason nothing here calls inline functions from std headers.
#include <cstring>

#include "fused_ir.h"

#if defined(__clang__)
#define MNV2_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define MNV2_UNROLL _Pragma("GCC unroll 16")
#else
#define MNV2_UNROLL
#endif

namespace mnv2 {
namespace {

inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

template <typename T>
struct FusedBlock {
  static constexpr int64_t VL = MNV2_VEC_BYTES / sizeof(T);  // also the channel padding unit
  static constexpr int MR = MNV2_MR;
  typedef T vf __attribute__((vector_size(MNV2_VEC_BYTES)));
  // the same vector at element alignment, allowed to alias T: plain (vmovups) loads and stores
  typedef T vf_unaligned __attribute__((vector_size(MNV2_VEC_BYTES), aligned(sizeof(T)), may_alias));
  using FArgs = ForwardArgs<T>;
  using BArgs = BackwardArgs<T>;

static vf vload(const T* p) { return *reinterpret_cast<const vf_unaligned*>(p); }
static void vstore(T* p, vf v) { *reinterpret_cast<vf_unaligned*>(p) = v; }
// x - (+0) is x exactly (-0 and NaN included), so this folds to one broadcast
// (from memory when x is a load); `vf{} + x` would keep an add: 0 + -0 is +0.
static vf vsplat(T x) { return x - vf{}; }

// min/max written as selects so that NaN passes through, as in torch.
static vf relu6(vf v) {
  const vf zero = {};
  const vf six = zero + T(6);
  v = v < zero ? zero : v;
  return v > six ? six : v;
}

// g where 0 < a < 6 (the ReLU6 derivative, as hardtanh_backward), else 0.
static vf relu6_grad(vf g, vf a) {
  const vf zero = {};
  const vf six = zero + T(6);
  return ((a > zero) & (a < six)) ? g : zero;
}

// ---------------------------------------------------------------------------
// GEMM: C[M x N] (+)= A[M x K] * B[K x N] (+ bias[N]), optional ReLU6.
// A is addressed by strides (A(i,k) = A[i*sam + k*sak]) so a strided tensor or
// a transposed row can be used in place. B is read VL columns at a time: the
// vector of columns [j*VL, j*VL + VL) in row k is at B + k*ldb + j*bjs, so a
// row-major B has bjs = VL and a packed panel-major B (Layout) has ldb = VL
// and bjs = K*VL, which the kernel streams sequentially. C has unit stride
// along N, and N is a multiple of VL.
static constexpr unsigned kAccumulate = 1u, kRelu6 = 2u, kRelu = 4u;

static vf activate(vf v, unsigned flags) {
  if (flags & kRelu6) return relu6(v);
  if (flags & kRelu) {
    const vf zero = {};
    return v < zero ? zero : v;  // NaN passes through, as in torch
  }
  return v;
}

template <int ROWS, int NV>
static void gemm_tile(int64_t K, const T* A, int64_t sam, int64_t sak, const T* B,
                      int64_t ldb, int64_t bjs, T* C, int64_t ldc, const T* bias,
                      unsigned flags) {
  vf acc[ROWS][NV];
  MNV2_UNROLL for (int i = 0; i < ROWS; ++i) {
    MNV2_UNROLL for (int j = 0; j < NV; ++j) {
      vf v = bias != nullptr ? vload(bias + j * VL) : vf{};
      if (flags & kAccumulate) v += vload(C + i * ldc + j * VL);
      acc[i][j] = v;
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    vf b[NV];
    MNV2_UNROLL for (int j = 0; j < NV; ++j) b[j] = vload(B + j * bjs);
    MNV2_UNROLL for (int i = 0; i < ROWS; ++i) {
      const vf a = vsplat(A[i * sam]);
      MNV2_UNROLL for (int j = 0; j < NV; ++j) acc[i][j] += a * b[j];
    }
    A += sak;
    B += ldb;
  }
  MNV2_UNROLL for (int i = 0; i < ROWS; ++i) {
    MNV2_UNROLL for (int j = 0; j < NV; ++j) {
      vstore(C + i * ldc + j * VL, activate(acc[i][j], flags));
    }
  }
}

template <int NV, int ROWS>
static void gemm_rows_tail(int64_t rows, int64_t K, const T* A, int64_t sam, int64_t sak,
                           const T* B, int64_t ldb, int64_t bjs, T* C, int64_t ldc,
                           const T* bias, unsigned flags) {
  if constexpr (ROWS > 0) {
    if (rows == ROWS) {
      gemm_tile<ROWS, NV>(K, A, sam, sak, B, ldb, bjs, C, ldc, bias, flags);
    } else {
      gemm_rows_tail<NV, ROWS - 1>(rows, K, A, sam, sak, B, ldb, bjs, C, ldc, bias, flags);
    }
  }
}

template <int NV>
static void gemm_panel(int64_t M, int64_t K, const T* A, int64_t sam, int64_t sak,
                       const T* B, int64_t ldb, int64_t bjs, T* C, int64_t ldc,
                       const T* bias, unsigned flags) {
  int64_t m = 0;
  for (; m + MR <= M; m += MR) {
    gemm_tile<MR, NV>(K, A + m * sam, sam, sak, B, ldb, bjs, C + m * ldc, ldc, bias, flags);
  }
  gemm_rows_tail<NV, MR - 1>(M - m, K, A + m * sam, sam, sak, B, ldb, bjs, C + m * ldc, ldc,
                             bias, flags);
}

static void gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t sam, int64_t sak,
                 const T* B, int64_t ldb, int64_t bjs, T* C, int64_t ldc, const T* bias,
                 unsigned flags) {
  // Panel by panel of B so that each K x NR panel is reused across all of M.
  int64_t n = 0;
  for (; n + 2 * VL <= N; n += 2 * VL) {
    gemm_panel<2>(M, K, A, sam, sak, B + n / VL * bjs, ldb, bjs, C + n, ldc,
                  bias ? bias + n : nullptr, flags);
  }
  for (; n < N; n += VL) {
    gemm_panel<1>(M, K, A, sam, sak, B + n / VL * bjs, ldb, bjs, C + n, ldc,
                  bias ? bias + n : nullptr, flags);
  }
}

// ---------------------------------------------------------------------------
// Depthwise 3x3 for one output row, vectorised over channels.
// rows[ky] holds input columns [c_lo, c_lo + nvalid) with hc channels each
// (an all-zero row stands in for rows outside the image). Output columns
// [oc0, oc0 + tw) go to out[tw][hc].
static void dw3x3_row(const T* const rows[3], int64_t c_lo, int64_t in_w, int st, int64_t oc0,
               int64_t tw, int64_t hc, const T* wd, int64_t ldw, const T* bd, T* out,
               bool relu) {
  for (int64_t c = 0; c < hc; c += VL) {
    vf w[9];
    MNV2_UNROLL for (int t = 0; t < 9; ++t) w[t] = vload(wd + t * ldw + c);
    const vf b = vload(bd + c);
    for (int64_t p = 0; p < tw; ++p) {
      const int64_t q0 = (oc0 + p) * st - 1;  // leftmost input column of the tap
      vf acc = b;
      if (q0 >= 0 && q0 + 2 < in_w) {
        MNV2_UNROLL for (int ky = 0; ky < 3; ++ky) {
          const T* r = rows[ky] + (q0 - c_lo) * hc + c;
          acc += w[ky * 3 + 0] * vload(r) + w[ky * 3 + 1] * vload(r + hc) +
                 w[ky * 3 + 2] * vload(r + 2 * hc);
        }
      } else {
        for (int kx = 0; kx < 3; ++kx) {
          const int64_t q = q0 + kx;
          if (q < 0 || q >= in_w) continue;
          MNV2_UNROLL for (int ky = 0; ky < 3; ++ky) {
            acc += w[ky * 3 + kx] * vload(rows[ky] + (q - c_lo) * hc + c);
          }
        }
      }
      vstore(out + p * hc + c, relu ? relu6(acc) : acc);
    }
  }
}

// Backward of the depthwise step for one output row (full width, c_lo = 0):
// accumulates the weight and bias gradients and scatters gz2 into the three
// input-row gradient accumulators ga1[ky].
static void dw3x3_row_backward(const T* const rows[3], T* const ga1[3], const T* gz2,
                        int64_t in_w, int st, int64_t out_w, int64_t hp, const T* wd,
                        T* g_wd, T* g_bd) {
  for (int64_t c = 0; c < hp; c += VL) {
    vf w[9], gw[9];
    MNV2_UNROLL for (int t = 0; t < 9; ++t) {
      w[t] = vload(wd + t * hp + c);
      gw[t] = vf{};
    }
    vf gb = {};
    for (int64_t p = 0; p < out_w; ++p) {
      const vf g = vload(gz2 + p * hp + c);
      gb += g;
      const int64_t q0 = p * st - 1;
      for (int kx = 0; kx < 3; ++kx) {
        const int64_t q = q0 + kx;
        if (q < 0 || q >= in_w) continue;
        MNV2_UNROLL for (int ky = 0; ky < 3; ++ky) {
          const int64_t off = q * hp + c;
          gw[ky * 3 + kx] += g * vload(rows[ky] + off);
          vstore(ga1[ky] + off, vload(ga1[ky] + off) + g * w[ky * 3 + kx]);
        }
      }
    }
    MNV2_UNROLL for (int t = 0; t < 9; ++t) {
      vstore(g_wd + t * hp + c, vload(g_wd + t * hp + c) + gw[t]);
    }
    vstore(g_bd + c, vload(g_bd + c) + gb);
  }
}

// ---------------------------------------------------------------------------
// A window of expanded input rows (a1) for one image, one column range and one
// chunk of hidden channels. Rows are kept in a ring of `slots`; rows outside
// the image read as the zero row.
struct Window {
  const FArgs* a;  // shape, layout, x, packed weights
  int64_t n;             // image
  int64_t c_lo, nvalid;  // input columns held
  int64_t h0, hc;        // hidden channels [h0, h0 + hc)
  int64_t slots;
  T* ring;        // [slots][nvalid][hc]
  const T* zero;  // [nvalid][hc] zeros
  int64_t have_hi;    // highest row held (rows have_hi - slots + 1 .. have_hi)
  T* cols;        // [nvalid][stem_k]: the fused stem's im2col row (unused without a stem)

  int64_t row_floats() const { return nvalid * hc; }
  T* slot(int64_t i) const { return ring + (i % slots) * row_floats(); }

  const T* row(int64_t i) const {
    const int64_t H = a->shape.in_h;
    if (i < 0 || i >= H) return zero;
    return slot(i);
  }

  // Makes input rows [lo, hi] available (rows are requested in increasing order).
  void fill(int64_t lo, int64_t hi) {
    const int64_t H = a->shape.in_h;
    lo = imax(imax(lo, have_hi + 1), 0);
    hi = imin(hi, H - 1);
    while (lo <= hi) {
      // rows [lo, seg_hi] occupy consecutive slots
      const int64_t seg_hi = imin(hi, lo + (slots - lo % slots) - 1);
      compute_rows(lo, seg_hi);
      lo = seg_hi + 1;
    }
    have_hi = imax(have_hi, hi);
  }

  void compute_rows(int64_t lo, int64_t hi) {
    const BlockShape& s = a->shape;
    const Layout& l = a->layout;
    const Strides4& xs = a->xs;
    const T* xrow = a->x + n * xs.n + c_lo * xs.w;
    T* dst = slot(lo);
    const int64_t rows = hi - lo + 1;
    if (s.has_expand) {
      // panel-major [hp / VL][cin][VL]: the panels of channels [h0, h0 + hc)
      const T* B = a->packed + l.we_kn + h0 * s.cin;
      const T* bias = a->packed + l.be + h0;
      if (rows == 1 || xs.h == nvalid * xs.w) {
        // consecutive rows are one uniformly strided matrix: a single GEMM
        gemm(rows * nvalid, hc, s.cin, xrow + lo * xs.h, xs.w, xs.c, B, VL, s.cin * VL, dst, hc,
             bias, kRelu6);
      } else {
        for (int64_t i = lo; i <= hi; ++i) {
          gemm(nvalid, hc, s.cin, xrow + i * xs.h, xs.w, xs.c, B, VL, s.cin * VL,
               dst + (i - lo) * row_floats(), hc, bias, kRelu6);
        }
      }
      zero_padded_channels(dst, rows * nvalid);
    } else if (a->stem != nullptr) {
      for (int64_t i = lo; i <= hi; ++i) stem_row(i, dst + (i - lo) * row_floats());
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

  // Input row i of the block (columns [c_lo, c_lo + nvalid), channels [h0, h0 + hc))
  // computed by the fused stem: relu6(conv3x3 stride 2 pad 1 of the image + b) as one
  // GEMM over an im2col row, k = (kh * 3 + kw) * C + c.
  void stem_row(int64_t i, T* dst) const {
    const PointwiseLayout& sl = a->stem_layout;
    const int64_t C = a->image_c, K = sl.cin, IH = a->image_h, IW = a->image_w;
    const Strides4& is = a->is;
    const T* img = a->image + n * is.n;
    // channels_last image: the three pixels of one kernel row are 3 C consecutive values
    const bool dense = is.c == 1 && is.w == C;
    for (int64_t kh = 0; kh < 3; ++kh) {
      const int64_t ih = 2 * i - 1 + kh;
      const bool row_in = ih >= 0 && ih < IH;
      const T* src_row = row_in ? img + ih * is.h : img;
      for (int64_t j = 0; j < nvalid; ++j) {
        const int64_t iw0 = 2 * (c_lo + j) - 1;
        T* d = cols + j * K + kh * 3 * C;
        if (!row_in) {
          for (int64_t e = 0; e < 3 * C; ++e) d[e] = T(0);
        } else if (dense && iw0 >= 0 && iw0 + 2 < IW) {
          const T* src = src_row + iw0 * C;
          if (C == 3) {
            MNV2_UNROLL for (int e = 0; e < 9; ++e) d[e] = src[e];
          } else {
            for (int64_t e = 0; e < 3 * C; ++e) d[e] = src[e];
          }
        } else {
          for (int64_t kw = 0; kw < 3; ++kw) {
            const int64_t iw = iw0 + kw;
            const bool in = iw >= 0 && iw < IW;
            for (int64_t c = 0; c < C; ++c) d[kw * C + c] = in ? src_row[iw * is.w + c * is.c] : T(0);
          }
        }
      }
    }
    gemm(nvalid, hc, K, cols, K, 1, a->stem + sl.w + h0 * K, VL, K * VL, dst, hc,
         a->stem + sl.b + h0, kRelu6);
    zero_padded_channels(dst, nvalid);
  }

  // After a GEMM into `pixels` rows of the window: the padded channels (past
  // s.hidden, which is s.cin when t == 1) must be exactly zero. With an infinite
  // input the GEMM leaves inf * 0 = NaN there, and the project would spread it.
  void zero_padded_channels(T* dst, int64_t pixels) const {
    const int64_t valid = a->shape.hidden - h0;
    if (valid >= hc) return;
    for (int64_t p = 0; p < pixels; ++p) std::memset(dst + p * hc + valid, 0, sizeof(T) * (hc - valid));
  }
};

// ---------------------------------------------------------------------------
// Forward.

static void store_output_rows(const FArgs& a, int64_t n, int64_t r, int64_t rows, int64_t oc0,
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

struct ForwardGeometry {
  int64_t slots, nvalid_max, hc;
  bool chunked;  // a split takes several chunks: accumulate a whole band
};

static ForwardGeometry forward_geometry(const ForwardPlan& p) {
  ForwardGeometry g;
  g.slots = p.window_slots;
  g.nvalid_max = p.window_cols;
  g.hc = p.hidden_chunk;
  g.chunked = g.hc < p.split_channels;
  return g;
}

// Copies accumulated rows of one hidden split into the partial buffer
// [split][n][Ho][Wo][cout_p]; reduce_forward_splits adds them up.
static void store_partial_rows(const FArgs& a, int64_t split, int64_t n, int64_t r, int64_t rows,
                               int64_t oc0, int64_t tw, const T* acc) {
  const BlockShape& s = a.shape;
  const int64_t Ho = s.out_h(), Wo = s.out_w(), cp = a.layout.cout_p;
  for (int64_t q = 0; q < rows; ++q) {
    T* dst = a.partial + (((split * s.batch + n) * Ho + r + q) * Wo + oc0) * cp;
    std::memcpy(dst, acc + q * tw * cp, sizeof(T) * tw * cp);
  }
}

// Asks for the weights of hidden channels [h0, h0 + hc) (expand panels, depthwise
// taps, project rows) to be brought into L2 while the current chunk computes.
// In a whole model the weights come from L3 or DRAM (their sum exceeds L3),
// and the project rows are short strided segments that the hardware
// prefetchers pick up late.
static void prefetch_range(const T* p, int64_t n) {
  constexpr int64_t kLine = 64 / sizeof(T);
  for (int64_t i = 0; i < n; i += kLine) __builtin_prefetch(p + i, 0, 2);
}

static void prefetch_chunk_weights(const FArgs& a, int64_t h0, int64_t hc) {
  const BlockShape& s = a.shape;
  const Layout& l = a.layout;
  if (s.has_expand) prefetch_range(a.packed + l.we_kn + h0 * s.cin, hc * s.cin);
  for (int64_t t = 0; t < 9; ++t) prefetch_range(a.packed + l.wd + t * l.hp + h0, hc);
  for (int64_t j = 0; j < l.cout_p / VL; ++j) {
    prefetch_range(a.packed + l.wp_kn + j * l.hp * VL + h0 * VL, hc * VL);
  }
}

static void forward_item(const FArgs& a, const ForwardPlan& p, const ForwardGeometry& g,
                  int64_t item, T* scratch) {
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
  const int64_t c_lo = imax(0, oc0 * st - 1);
  const int64_t c_hi = imin(s.in_w - 1, (oc0 + tw - 1) * st + 1);
  const int64_t r0 = band * p.rows_per_band;
  const int64_t r1 = imin(Ho, r0 + p.rows_per_band);

  T* ring = scratch;
  T* zero = ring + g.slots * g.nvalid_max * g.hc;
  T* dwbuf = zero + g.nvalid_max * g.hc;
  T* acc = dwbuf + p.rows_per_step * p.cols_per_tile * g.hc;
  T* cols = acc + (g.chunked ? p.rows_per_band : p.rows_per_step) * p.cols_per_tile * l.cout_p;

  auto store = [&](int64_t r, int64_t rows, const T* accr) {
    if (p.n_splits > 1) {
      store_partial_rows(a, split, n, r, rows, oc0, tw, accr);
    } else {
      store_output_rows(a, n, r, rows, oc0, tw, accr);
    }
  };
  Window win{&a, n, c_lo, c_hi - c_lo + 1, 0, 0, g.slots, ring, zero, 0, cols};
  for (int64_t h0 = hs0; h0 < hs1; h0 += g.hc) {
    win.h0 = h0;
    win.hc = imin(g.hc, hs1 - h0);
    if (h0 + g.hc < hs1) prefetch_chunk_weights(a, h0 + g.hc, imin(g.hc, hs1 - h0 - g.hc));
    win.have_hi = -1 - 2 * int64_t{st};  // nothing held
    const bool first = h0 == hs0;
    // the bias goes in once: with the first chunk of the first split
    const T* bias = first && split == 0 ? a.packed + l.bp : nullptr;
    for (int64_t r = r0; r < r1; r += p.rows_per_step) {
      const int64_t rows = imin(p.rows_per_step, r1 - r);
      win.fill(r * st - 1, (r + rows - 1) * st + 1);
      for (int64_t q = 0; q < rows; ++q) {
        const int64_t i = (r + q) * st;
        const T* rr[3] = {win.row(i - 1), win.row(i), win.row(i + 1)};
        dw3x3_row(rr, c_lo, s.in_w, st, oc0, tw, win.hc, a.packed + l.wd + win.h0, l.hp,
                  a.packed + l.bd + win.h0, dwbuf + q * tw * win.hc, true);
      }
      T* accr = g.chunked ? acc + (r - r0) * tw * l.cout_p : acc;
      // panel-major project weights [cout_p / VL][hp][VL]: rows [h0, h0 + hc) of every panel
      gemm(rows * tw, l.cout_p, win.hc, dwbuf, win.hc, 1, a.packed + l.wp_kn + win.h0 * VL, VL,
           l.hp * VL, accr, l.cout_p, bias, first ? 0u : kAccumulate);
      if (!g.chunked) store(r, rows, accr);
    }
  }
  if (g.chunked) store(r0, r1 - r0, acc);
}

static void forward_entry(const FArgs& a, const ForwardPlan& p, int64_t begin, int64_t end,
                   T* scratch) {
  const ForwardGeometry g = forward_geometry(p);
  std::memset(scratch + g.slots * g.nvalid_max * g.hc, 0, sizeof(T) * g.nvalid_max * g.hc);
  for (int64_t item = begin; item < end; ++item) forward_item(a, p, g, item, scratch);
}

// ---------------------------------------------------------------------------
// Backward. Per (image, band of output rows), walking rows top to bottom:
//   recompute a1 rows (window) and z2 for output row r,
//   g_wp += gy^T a2,  g_bp += sum gy,  gz2 = (gy Wp) * relu6'(z2),
//   g_wd, g_bd from gz2 and a1, and scatter gz2 into the ga1 row ring;
// then every input row no later output row touches is finished:
//   gz1 = ga1 * relu6'(a1),  g_we += gz1^T x,  g_be += sum gz1,  gx = gz1 We.
// The two weight-gradient products are rank-K updates of a whole weight-sized
// accumulator. With one row (K = W pixels, 7 for a 7x7 image) the accumulator's
// traffic would swamp the arithmetic, so the rows' operands (a2 and gy; gz1 and
// x) are gathered in pending buffers of plan.pending_pixels pixels and each
// update runs once per that many pixels.

struct BackwardBuffers {
  T* ring;   // [slots][W][hp] a1 rows
  T* zero;   // [W][hp]
  T* ga1;    // [slots][W][hp] their gradients
  T* trash;  // [W][hp] scatter target for rows outside the image
  T* z2;     // [rows_per_step][Wo][hp]
  T* gz2;    // [rows_per_step][Wo][hp]
  T* gxrow;  // [pending_pixels][cin_p] input-gradient rows of one step
  // pending operands of the weight-gradient updates, pending_pixels rows each
  T* pend_a2;   // [.][hp]
  T* pend_gy;   // [.][cout]
  T* pend_gz1;  // [.][hp]
  T* pend_x;    // [.][cin]
};

static BackwardBuffers carve_backward(const BlockShape& s, const Layout& l,
                                      const BackwardPlan& p, T* scratch) {
  const int64_t row = s.in_w * l.hp, pend = p.pending_pixels;
  const int64_t step = p.rows_per_step * s.out_w() * l.hp;
  BackwardBuffers b;
  b.ring = scratch;
  b.zero = b.ring + p.window_slots * row;
  b.ga1 = b.zero + row;
  b.trash = b.ga1 + p.window_slots * row;
  b.z2 = b.trash + row;
  b.gz2 = b.z2 + step;
  b.gxrow = b.gz2 + step;
  b.pend_a2 = b.gxrow + pend * l.cin_p;
  b.pend_gy = b.pend_a2 + pend * l.hp;
  b.pend_gz1 = b.pend_gy + pend * s.cout;
  b.pend_x = b.pend_gz1 + pend * l.hp;
  return b;
}

static void backward_item(const BArgs& a, const BackwardPlan& p, int64_t item, T* grads,
                   const BackwardBuffers& buf) {
  const BlockShape& s = a.shape;
  const Layout& l = a.layout;
  const GradLayout gl = make_grad_layout(s, l);
  const int st = s.stride;
  const int64_t H = s.in_h, W = s.in_w, Ho = s.out_h(), Wo = s.out_w(), hp = l.hp;
  const int64_t n = item / p.n_bands, band = item % p.n_bands;
  const int64_t r0 = band * p.rows_per_band, r1 = imin(Ho, r0 + p.rows_per_band);
  const int64_t i_first = imax(0, r0 * st - 1), i_last = imin(H - 1, (r1 - 1) * st + 1);
  const int64_t shared_hi = band > 0 ? (r0 - 1) * st + 1 : -1;  // rows the previous band wrote

  const FArgs fa{s, l, a.x, a.xs, a.packed, nullptr, {}, nullptr};
  // rings of the a1 rows and their gradients: the rows one step reads
  const int64_t slots = p.window_slots;
  Window win{&fa, n, 0, W, 0, hp, slots, buf.ring, buf.zero, -1 - 2 * int64_t{st}, nullptr};
  int64_t ga1_tag[kMaxBackwardSlots];
  for (int64_t k = 0; k < slots; ++k) ga1_tag[k] = -1;
  auto ga1_row = [&](int64_t i) -> T* {
    if (i < 0 || i >= H) return buf.trash;
    return buf.ga1 + (i % slots) * W * hp;
  };

  const T* wd = a.packed + l.wd;
  const T* gy_n = a.gy != nullptr ? a.gy + n * a.gys.n : nullptr;
  const T* x_n = a.x + n * a.xs.n;

  // pending pixels of the two weight-gradient updates
  const int64_t pend_cap = p.pending_pixels;
  int64_t pend1 = 0, pend2 = 0;
  auto flush_expand = [&] {  // g_we^T[cin][hp] += x^T gz1 over the pending pixels
    if (pend1 > 0) {
      gemm(s.cin, hp, pend1, buf.pend_x, 1, s.cin, buf.pend_gz1, hp, VL, grads + gl.g_weT, hp,
           nullptr, kAccumulate);
    }
    pend1 = 0;
  };
  auto flush_project = [&] {  // g_wp[cout][hp] += gy^T a2 over the pending pixels
    if (pend2 > 0) {
      gemm(s.cout, hp, pend2, buf.pend_gy, 1, s.cout, buf.pend_a2, hp, VL, grads + gl.g_wp, hp,
           nullptr, kAccumulate);
    }
    pend2 = 0;
  };

  // Finishes input rows [f0, f1] (consecutive, all scattered into): their gz1 rows
  // are appended to the pending expand operands and, with an input gradient, one
  // GEMM over all of them gives their gx rows.
  auto finish_rows = [&](int64_t f0, int64_t f1) {
    if (f1 < f0) return;
    const int64_t nrows = f1 - f0 + 1;
    const T* src = nullptr;  // row f's input gradient at src + (f - f0) * W * ld
    int64_t ld = hp;
    if (s.has_expand) {
      if (pend1 + nrows * W > pend_cap) flush_expand();
      T* gz1_0 = buf.pend_gz1 + pend1 * hp;
      T* g_be = grads + gl.g_be;
      for (int64_t i = f0; i <= f1; ++i) {
        const T* g = ga1_row(i);
        const T* a1 = win.row(i);
        T* gz1 = buf.pend_gz1 + pend1 * hp;
        for (int64_t e = 0; e < W * hp; e += VL) vstore(gz1 + e, relu6_grad(vload(g + e), vload(a1 + e)));
        for (int64_t w = 0; w < W; ++w) {
          for (int64_t c = 0; c < hp; c += VL) vstore(g_be + c, vload(g_be + c) + vload(gz1 + w * hp + c));
        }
        const T* xr = x_n + i * a.xs.h;
        T* px = buf.pend_x + pend1 * s.cin;
        for (int64_t w = 0; w < W; ++w) {
          for (int64_t c = 0; c < s.cin; ++c) px[w * s.cin + c] = xr[w * a.xs.w + c * a.xs.c];
        }
        pend1 += W;
      }
      if (a.gx == nullptr) return;
      gemm(nrows * W, l.cin_p, hp, gz1_0, hp, 1, a.packed + l.we_nk, VL, hp * VL, buf.gxrow, l.cin_p,
           nullptr, 0);
      src = buf.gxrow;
      ld = l.cin_p;
    }
    if (a.gx == nullptr) return;
    for (int64_t i = f0; i <= f1; ++i) {
      const T* row = src != nullptr ? src + (i - f0) * W * ld : ga1_row(i);  // t == 1: gx = ga1
      if (i <= shared_hi) {
        T* side = a.side + ((n * (p.n_bands - 1) + band - 1) * p.side_rows_per_item + (i - i_first)) *
                                   W * s.cin;
        for (int64_t w = 0; w < W; ++w) {
          for (int64_t c = 0; c < s.cin; ++c) side[w * s.cin + c] = row[w * ld + c];
        }
        continue;
      }
      T* gx = a.gx + n * a.gxs.n + i * a.gxs.h;
      const T* gyr = s.residual ? gy_n + i * a.gys.h : nullptr;  // residual: stride 1, same row
      for (int64_t w = 0; w < W; ++w) {
        for (int64_t c = 0; c < s.cin; ++c) {
          T v = row[w * ld + c];
          if (s.residual) v += gyr[w * a.gys.w + c * a.gys.c];
          gx[w * a.gxs.w + c * a.gxs.c] = v;
        }
      }
    }
  };

  if (a.moment_sums != nullptr) {  // statistics mode: z2 rows only
    double* sum = a.moment_sums;
    double* sumsq = a.moment_sums + hp;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t i0 = r * st - 1;
      win.fill(i0, i0 + 2);
      const T* rr[3] = {win.row(i0), win.row(i0 + 1), win.row(i0 + 2)};
      dw3x3_row(rr, 0, W, st, 0, Wo, hp, wd, hp, a.packed + l.bd, buf.z2, false);
      for (int64_t q = 0; q < Wo; ++q) {
        const T* z = buf.z2 + q * hp;
        for (int64_t c = 0; c < hp; ++c) {
          const double v = static_cast<double>(z[c]);
          sum[c] += v;
          sumsq[c] += v * v;
        }
      }
    }
    return;
  }

  // Steps of rows_per_step output rows: the project GEMMs of a step (gy Wp^T and
  // the input-gradient GEMM of the rows it finishes) run over all its pixels, so
  // the weights are streamed once per step rather than once per row.
  int64_t next_final = i_first;
  for (int64_t r = r0; r < r1; r += p.rows_per_step) {
    const int64_t rows = imin(p.rows_per_step, r1 - r);
    const int64_t i0 = r * st - 1, i_hi = (r + rows - 1) * st + 1;
    win.fill(i0, i_hi);
    for (int64_t i = i0; i <= i_hi; ++i) {
      if (i < 0 || i >= H || ga1_tag[i % slots] == i) continue;
      std::memset(ga1_row(i), 0, sizeof(T) * W * hp);
      ga1_tag[i % slots] = i;
    }
    for (int64_t q = 0; q < rows; ++q) {
      const int64_t iq = (r + q) * st - 1;
      const T* rr[3] = {win.row(iq), win.row(iq + 1), win.row(iq + 2)};
      dw3x3_row(rr, 0, W, st, 0, Wo, hp, wd, hp, a.packed + l.bd, buf.z2 + q * Wo * hp, false);
    }
    const int64_t npix = rows * Wo;
    if (a.moment_alpha != nullptr) {
      // d(statistics)/d z2: affine in z2, channel by channel
      for (int64_t q = 0; q < npix; ++q) {
        for (int64_t c = 0; c < hp; c += VL) {
          vstore(buf.gz2 + q * hp + c,
                 vload(a.moment_alpha + c) + vload(a.moment_beta + c) * vload(buf.z2 + q * hp + c));
        }
      }
    } else {
      if (pend2 + npix > pend_cap) flush_project();
      T* g_bp = grads + gl.g_bp;
      T* pg = buf.pend_gy + pend2 * s.cout;
      for (int64_t q = 0; q < rows; ++q) {
        const T* gyr = gy_n + (r + q) * a.gys.h;
        for (int64_t o = 0; o < s.cout; ++o) {
          T sum = T(0);
          for (int64_t w = 0; w < Wo; ++w) sum += gyr[o * a.gys.c + w * a.gys.w];
          g_bp[o] += sum;
        }
        for (int64_t w = 0; w < Wo; ++w) {
          for (int64_t o = 0; o < s.cout; ++o) pg[(q * Wo + w) * s.cout + o] = gyr[o * a.gys.c + w * a.gys.w];
        }
      }
      T* a2 = buf.pend_a2 + pend2 * hp;
      for (int64_t e = 0; e < npix * hp; e += VL) vstore(a2 + e, relu6(vload(buf.z2 + e)));
      pend2 += npix;
      gemm(npix, hp, s.cout, pg, s.cout, 1, a.packed + l.wp_nk, VL, s.cout * VL, buf.gz2, hp, nullptr,
           0);
      for (int64_t e = 0; e < npix * hp; e += VL) {
        vstore(buf.gz2 + e, relu6_grad(vload(buf.gz2 + e), vload(buf.z2 + e)));
      }
    }
    for (int64_t q = 0; q < rows; ++q) {
      const int64_t iq = (r + q) * st - 1;
      const T* rr[3] = {win.row(iq), win.row(iq + 1), win.row(iq + 2)};
      T* const ga[3] = {ga1_row(iq), ga1_row(iq + 1), ga1_row(iq + 2)};
      dw3x3_row_backward(rr, ga, buf.gz2 + q * Wo * hp, W, st, Wo, hp, wd, grads + gl.g_wd,
                         grads + gl.g_bd);
    }
    // every input row no later step touches is final
    const int64_t last = r + rows == r1 ? i_last : imin(i_last, (r + rows) * st - 2);
    finish_rows(next_final, last);
    next_final = imax(next_final, last + 1);
  }
  flush_project();
  flush_expand();
}

// ---------------------------------------------------------------------------
// Pointwise (1x1) convolution: one GEMM with the bias and activation in its
// epilogue, over panel-major packed weights.
static unsigned activation_flags(Activation act) {
  return act == Activation::kRelu6 ? kRelu6 : act == Activation::kRelu ? kRelu : 0u;
}

// One row times whole panels [0, panels) of packed weights (a matrix-vector product,
// the classifier at batch 1): bound by reading the weights from memory, so four panels
// stream at once, each with a software prefetch a few lines ahead. Each column sums
// its even and its odd k apart (two half-length sums: about half the rounding error
// of one sequential sum over K, and two independent FMA chains).
static void gemv_panels(int64_t K, const T* x, const T* B, int64_t bjs, int64_t panels, T* y,
                        const T* bias, unsigned flags) {
  constexpr int64_t kAhead = 1024 / sizeof(T);  // elements ahead in each panel's stream
  constexpr int64_t kLine = 64 / sizeof(T);
  int64_t j = 0;
  for (; j + 4 <= panels; j += 4) {
    const T* b = B + j * bjs;
    vf even[4], odd[4];
    MNV2_UNROLL for (int q = 0; q < 4; ++q) {
      even[q] = vload(bias + (j + q) * VL);
      odd[q] = vf{};
    }
    int64_t k = 0;
    for (; k + 2 <= K; k += 2) {
      const int64_t e = k * VL;
      if (2 * VL >= kLine || e % kLine == 0) {  // each line of the step once
        for (int64_t o = 0; o < 2 * VL; o += kLine) {
          MNV2_UNROLL for (int q = 0; q < 4; ++q) __builtin_prefetch(b + q * bjs + e + o + kAhead, 0, 3);
        }
      }
      const vf x0 = vsplat(x[k]), x1 = vsplat(x[k + 1]);
      MNV2_UNROLL for (int q = 0; q < 4; ++q) {
        even[q] += x0 * vload(b + q * bjs + e);
        odd[q] += x1 * vload(b + q * bjs + e + VL);
      }
    }
    if (k < K) {
      const vf x0 = vsplat(x[k]);
      MNV2_UNROLL for (int q = 0; q < 4; ++q) even[q] += x0 * vload(b + q * bjs + k * VL);
    }
    MNV2_UNROLL for (int q = 0; q < 4; ++q) vstore(y + (j + q) * VL, activate(even[q] + odd[q], flags));
  }
  if (j < panels) {
    gemm(1, (panels - j) * VL, K, x, 1, 1, B + j * bjs, VL, bjs, y + j * VL, 0, bias + j * VL, flags);
  }
}

static void pointwise_entry(const PointwiseArgs<T>& a, int64_t m0, int64_t m1, int64_t n0,
                            int64_t n1, T* scratch) {
  const PointwiseLayout& l = a.layout;
  const unsigned flags = activation_flags(a.act);
  const T* w = a.packed + l.w;
  const T* bias = a.packed + l.b;
  const int64_t full = imin(n1, l.cout / VL * VL);  // columns [n0, full) are whole panels
  if (full > n0 && m1 - m0 == 1) {
    gemv_panels(l.cin, a.x + m0 * a.ldx, w + n0 * l.cin, l.cin * VL, (full - n0) / VL,
                a.y + m0 * a.ldy + n0, bias + n0, flags);
  } else if (full > n0) {
    gemm(m1 - m0, full - n0, l.cin, a.x + m0 * a.ldx, a.ldx, 1, w + n0 * l.cin, VL, l.cin * VL,
         a.y + m0 * a.ldy + n0, a.ldy, bias + n0, flags);
  }
  if (n1 > full) {
    // the last, partial panel: computed into scratch, its valid columns copied
    const int64_t cols = n1 - full;
    constexpr int64_t kRows = kPointwiseScratch / 16;
    for (int64_t m = m0; m < m1; m += kRows) {
      const int64_t rows = imin(kRows, m1 - m);
      gemm(rows, VL, l.cin, a.x + m * a.ldx, a.ldx, 1, w + full * l.cin, VL, l.cin * VL, scratch, VL,
           bias + full, flags);
      for (int64_t i = 0; i < rows; ++i) {
        for (int64_t j = 0; j < cols; ++j) a.y[(m + i) * a.ldy + full + j] = scratch[i * VL + j];
      }
    }
  }
}

// The mean over rows [0, rows) of a pointwise convolution's output channels [n0, n1)
// (the model's head followed by global average pooling): the rows' outputs pass
// through scratch a block at a time and are never stored. The packed weights and
// bias are padded to whole panels, so the last panel is computed whole and its
// padded columns are dropped.
static void pointwise_mean_entry(const PointwiseArgs<T>& a, int64_t rows, int64_t n0, int64_t n1,
                                 T* scratch, T* out) {
  const PointwiseLayout& l = a.layout;
  const unsigned flags = activation_flags(a.act);
  const int64_t cols = (n1 - n0 + VL - 1) / VL * VL;  // <= kPoolCols
  constexpr int64_t kRows = kPoolScratch / kPoolCols;
  alignas(64) T sum[kPoolCols] = {};
  for (int64_t m = 0; m < rows; m += kRows) {
    const int64_t r = imin(kRows, rows - m);
    gemm(r, cols, l.cin, a.x + m * a.ldx, a.ldx, 1, a.packed + l.w + n0 * l.cin, VL, l.cin * VL,
         scratch, cols, a.packed + l.b + n0, flags);
    for (int64_t i = 0; i < r; ++i) {
      for (int64_t j = 0; j < cols; j += VL) vstore(sum + j, vload(sum + j) + vload(scratch + i * cols + j));
    }
  }
  for (int64_t j = 0; j < n1 - n0; ++j) out[j] = sum[j] / T(rows);
}

static void backward_entry(const BArgs& a, const BackwardPlan& p, int64_t begin, int64_t end,
                    T* grads, T* scratch) {
  const BackwardBuffers buf = carve_backward(a.shape, a.layout, p, scratch);
  std::memset(buf.zero, 0, sizeof(T) * a.shape.in_w * a.layout.hp);
  for (int64_t item = begin; item < end; ++item) backward_item(a, p, item, grads, buf);
}

};  // struct FusedBlock

}  // namespace
}  // namespace mnv2
