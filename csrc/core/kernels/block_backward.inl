#pragma once
// The fused block's backward, and the backward of the depthwise statistics. Per (image,
// band of output rows), walking rows top to bottom in steps of rows_per_step:
//   recompute the a1 rows (row window) and z2 of the step's output rows,
//   gz2 from the gradient source (GradFromOutput: the project's backward; GradFromStats:
//     the statistics' affine gradient),
//   g_w_dw, g_b_dw from gz2 and a1, and scatter gz2 into the ring of a1-row gradients;
// then every input row no later step touches is finished:
//   gz1 = ga1 * relu6'(a1),  g_w_expand += gz1^T x,  g_b_expand += sum gz1,
//   gx = gz1 w_expand (+ gy for the residual).
// The weight-gradient products are rank-K updates of a whole weight-sized accumulator.
// With one row (K = W pixels, 7 for a 7x7 image) the accumulator's traffic would swamp
// the arithmetic, so their operands are gathered in pending buffers of
// plan.pending_pixels pixels and each update runs once per that many pixels.
#include "depthwise.inl"
#include "gemm.inl"
#include "row_window.inl"

namespace mnv2 {
namespace {

// What both backward walks read and write besides their gradient source.
template <typename T>
struct BackwardTensors {
  const BlockShape& s;
  const Layout& l;
  const T* x;
  Strides4 xs;
  const T* packed;
  T* gx;  // null: no input gradient
  Strides4 gxs;
  T* side;
  const T* gy;  // the residual's gradient (null without a residual)
  Strides4 gys;
};

// gz2 from the block's output gradient: g_w_project += gy^T a2, g_b_project += sum gy,
// gz2 = (gy w_project) * act'(z2), act the block's ReLU6 or ReLU.
template <typename T>
class GradFromOutput {
 public:
  using V = Simd<T>;
  static constexpr int64_t VL = V::VL;

  GradFromOutput(const BackwardArgs<T>& a, const BackwardPlan& p, const BackwardScratch& o, T* scratch,
                 T* grads, int64_t n)
      : s_(a.shape), l_(a.layout), gys_(a.gys), gy_n_(a.gy + n * a.gys.n),
        w_project_t_(a.packed + a.layout.w_project_t), pend_cap_(p.pending_pixels),
        pend_a2_(scratch + o.pend_a2), pend_gy_(scratch + o.pend_gy) {
    const GradLayout gl = make_grad_layout(s_, l_);
    g_w_project_ = grads + gl.g_w_project;
    g_b_project_ = grads + gl.g_b_project;
  }

  // Output rows [r, r + rows): z2 and gz2 [rows * out_w][hp].
  void grad_z2(int64_t r, int64_t rows, const T* z2, T* gz2) {
    const int64_t Wo = s_.out_w(), hp = l_.hp, cout = s_.cout, npix = rows * Wo;
    if (pending_ + npix > pend_cap_) flush();
    T* pg = pend_gy_ + pending_ * cout;
    for (int64_t q = 0; q < rows; ++q) {
      const T* gyr = gy_n_ + (r + q) * gys_.h;
      for (int64_t o = 0; o < cout; ++o) {
        T sum = T(0);
        for (int64_t w = 0; w < Wo; ++w) sum += gyr[o * gys_.c + w * gys_.w];
        g_b_project_[o] += sum;
      }
      for (int64_t w = 0; w < Wo; ++w) {
        for (int64_t o = 0; o < cout; ++o) pg[(q * Wo + w) * cout + o] = gyr[o * gys_.c + w * gys_.w];
      }
    }
    T* a2 = pend_a2_ + pending_ * hp;
    for (int64_t e = 0; e < npix * hp; e += VL) V::store(a2 + e, V::activation(V::load(z2 + e), s_.relu6));
    pending_ += npix;
    Gemm<T>::run(npix, hp, cout, pg, cout, 1, w_project_t_, VL, cout * VL, gz2, hp, nullptr, 0);
    for (int64_t e = 0; e < npix * hp; e += VL) {
      V::store(gz2 + e, V::activation_grad(V::load(gz2 + e), V::load(z2 + e), s_.relu6));
    }
  }

  // g_w_project [cout][hp] += gy^T a2 over the pending pixels.
  void flush() {
    if (pending_ > 0) {
      Gemm<T>::run(s_.cout, l_.hp, pending_, pend_gy_, 1, s_.cout, pend_a2_, l_.hp, VL, g_w_project_,
                   l_.hp, nullptr, kAccumulate);
    }
    pending_ = 0;
  }

 private:
  const BlockShape& s_;
  const Layout& l_;
  Strides4 gys_;
  const T* gy_n_;
  const T* w_project_t_;
  int64_t pend_cap_;
  T* pend_a2_;
  T* pend_gy_;
  T* g_w_project_;
  T* g_b_project_;
  int64_t pending_ = 0;
};

// gz2 of the depthwise statistics: alpha + beta * z2, channel by channel.
template <typename T>
class GradFromStats {
 public:
  using V = Simd<T>;
  static constexpr int64_t VL = V::VL;

  GradFromStats(const StatsBackwardArgs<T>& a) : s_(a.shape), l_(a.layout), alpha_(a.alpha), beta_(a.beta) {}

  void grad_z2(int64_t, int64_t rows, const T* z2, T* gz2) {
    const int64_t npix = rows * s_.out_w(), hp = l_.hp;
    for (int64_t q = 0; q < npix; ++q) {
      for (int64_t c = 0; c < hp; c += VL) {
        V::store(gz2 + q * hp + c, V::load(alpha_ + c) + V::load(beta_ + c) * V::load(z2 + q * hp + c));
      }
    }
  }
  void flush() {}

 private:
  const BlockShape& s_;
  const Layout& l_;
  const T* alpha_;
  const T* beta_;
};

// One backward item: (image, band of output rows).
template <typename T, class GradSource>
class BackwardItem {
 public:
  using V = Simd<T>;
  static constexpr int64_t VL = V::VL;

  BackwardItem(const BackwardTensors<T>& t, const BackwardPlan& p, const BackwardScratch& o, T* scratch,
               T* grads, GradSource& source, int64_t item)
      : t_(t), s_(t.s), l_(t.l), p_(p), source_(source), scratch_(scratch), o_(o),
        gl_(make_grad_layout(t.s, t.l)), grads_(grads), n_(item / p.n_bands), band_(item % p.n_bands),
        win_(t.s, t.l, t.x, t.xs, t.packed, nullptr, n_, 0, t.s.in_w, p.window_slots, scratch + o.ring,
             scratch + o.zero_row, nullptr) {
    r0_ = band_ * p.rows_per_band;
    r1_ = imin(s_.out_h(), r0_ + p.rows_per_band);
    i_first_ = backward_band_first_row(s_, p, band_);
    i_last_ = imin(s_.in_h - 1, s_.first_input_row(r1_ - 1) + s_.dw_span() - 1);
    shared_hi_ = backward_band_shared_last_row(s_, p, band_);
    win_.start_chunk(0, l_.hp);
    for (int64_t k = 0; k < p.window_slots; ++k) ga1_tag_[k] = -1;
  }

  void run() {
    const int st = s_.stride;
    const int64_t Wo = s_.out_w(), hp = l_.hp;
    T* z2 = scratch_ + o_.z2;
    T* gz2 = scratch_ + o_.gz2;
    // Steps of rows_per_step output rows: the project GEMMs of a step (gy w_project^T and
    // the input-gradient GEMM of the rows it finishes) run over all its pixels, so the
    // weights are streamed once per step rather than once per row.
    int64_t next_final = i_first_;
    for (int64_t r = r0_; r < r1_; r += p_.rows_per_step) {
      const int64_t rows = imin(p_.rows_per_step, r1_ - r);
      const int64_t i0 = s_.first_input_row(r);
      const int64_t i_hi = s_.first_input_row(r + rows - 1) + s_.dw_span() - 1;
      win_.fill(i0, i_hi);
      clear_new_gradient_rows(i0, i_hi);
      for (int64_t q = 0; q < rows; ++q) {
        const T* in_rows[kMaxDwKernel];
        input_rows(r + q, in_rows);
        Depthwise<T>::row(s_, in_rows, 0, s_.in_w, st, 0, Wo, hp, t_.packed + l_.w_dw, hp, t_.packed + l_.b_dw,
                          z2 + q * Wo * hp, false);
      }
      source_.grad_z2(r, rows, z2, gz2);
      for (int64_t q = 0; q < rows; ++q) {
        const T* in_rows[kMaxDwKernel];
        input_rows(r + q, in_rows);
        const int64_t i = s_.first_input_row(r + q);
        T* ga[kMaxDwKernel];
        for (int ky = 0; ky < s_.kernel; ++ky) ga[ky] = gradient_row(i + ky * s_.dilation);
        Depthwise<T>::row_backward(s_, in_rows, ga, gz2 + q * Wo * hp, st, Wo, hp, t_.packed + l_.w_dw,
                                   grads_ + gl_.g_w_dw, grads_ + gl_.g_b_dw);
      }
      // every input row no later step touches is final
      const int64_t last = r + rows == r1_ ? i_last_ : imin(i_last_, s_.first_input_row(r + rows) - 1);
      finish_rows(next_final, last);
      next_final = imax(next_final, last + 1);
    }
    source_.flush();
    flush_expand();
  }

 private:
  void input_rows(int64_t r, const T* rows[kMaxDwKernel]) const {
    const int64_t i0 = s_.first_input_row(r);
    for (int ky = 0; ky < s_.kernel; ++ky) rows[ky] = win_.row(i0 + ky * s_.dilation);
  }

  // The gradient accumulator of input row i (a ring alongside the window's); rows
  // outside the image scatter into a row that is never read.
  T* gradient_row(int64_t i) const {
    if (i < 0 || i >= s_.in_h) return scratch_ + o_.trash_row;
    return scratch_ + o_.ga1 + (i % p_.window_slots) * s_.in_w * l_.hp;
  }

  // Zeroes the accumulators of rows [i0, i_hi] not yet in the ring.
  void clear_new_gradient_rows(int64_t i0, int64_t i_hi) {
    for (int64_t i = i0; i <= i_hi; ++i) {
      if (i < 0 || i >= s_.in_h || ga1_tag_[i % p_.window_slots] == i) continue;
      std::memset(gradient_row(i), 0, sizeof(T) * s_.in_w * l_.hp);
      ga1_tag_[i % p_.window_slots] = i;
    }
  }

  // g_w_expand^T [cin][hp] += x^T gz1 over the pending pixels.
  void flush_expand() {
    if (pending_ > 0) {
      Gemm<T>::run(s_.cin, l_.hp, pending_, scratch_ + o_.pend_x, 1, s_.cin, scratch_ + o_.pend_gz1, l_.hp,
                   VL, grads_ + gl_.g_w_expand_t, l_.hp, nullptr, kAccumulate);
    }
    pending_ = 0;
  }

  // Finishes input rows [f0, f1] (consecutive, all scattered into): their gz1 rows are
  // appended to the pending expand operands and, with an input gradient, one GEMM over
  // all of them gives their gx rows.
  void finish_rows(int64_t f0, int64_t f1) {
    if (f1 < f0) return;
    const int64_t W = s_.in_w, hp = l_.hp;
    const T* src = nullptr;  // row f's input gradient at src + (f - f0) * W * ld
    int64_t ld = hp;
    if (s_.has_expand) {
      const int64_t nrows = f1 - f0 + 1;
      if (pending_ + nrows * W > p_.pending_pixels) flush_expand();
      T* gz1_0 = scratch_ + o_.pend_gz1 + pending_ * hp;
      T* g_b_expand = grads_ + gl_.g_b_expand;
      const T* x_n = t_.x + n_ * t_.xs.n;
      for (int64_t i = f0; i <= f1; ++i) {
        const T* g = gradient_row(i);
        const T* a1 = win_.row(i);
        T* gz1 = scratch_ + o_.pend_gz1 + pending_ * hp;
        for (int64_t e = 0; e < W * hp; e += VL) V::store(gz1 + e, V::activation_grad(V::load(g + e), V::load(a1 + e), s_.relu6));
        for (int64_t w = 0; w < W; ++w) {
          for (int64_t c = 0; c < hp; c += VL) {
            V::store(g_b_expand + c, V::load(g_b_expand + c) + V::load(gz1 + w * hp + c));
          }
        }
        const T* xr = x_n + i * t_.xs.h;
        T* px = scratch_ + o_.pend_x + pending_ * s_.cin;
        for (int64_t w = 0; w < W; ++w) {
          for (int64_t c = 0; c < s_.cin; ++c) px[w * s_.cin + c] = xr[w * t_.xs.w + c * t_.xs.c];
        }
        pending_ += W;
      }
      if (t_.gx == nullptr) return;
      Gemm<T>::run(nrows * W, l_.cin_p, hp, gz1_0, hp, 1, t_.packed + l_.w_expand_t, VL, hp * VL,
                   scratch_ + o_.gx_rows, l_.cin_p, nullptr, 0);
      src = scratch_ + o_.gx_rows;
      ld = l_.cin_p;
    }
    if (t_.gx == nullptr) return;
    for (int64_t i = f0; i <= f1; ++i) {
      const T* row = src != nullptr ? src + (i - f0) * W * ld : gradient_row(i);  // t == 1: gx = ga1
      if (i <= shared_hi_) {  // the previous band writes this row: keep our share aside
        T* side = t_.side + ((n_ * (p_.n_bands - 1) + band_ - 1) * p_.side_rows_per_item + (i - i_first_)) *
                                W * s_.cin;
        for (int64_t w = 0; w < W; ++w) {
          for (int64_t c = 0; c < s_.cin; ++c) side[w * s_.cin + c] = row[w * ld + c];
        }
        continue;
      }
      T* gx = t_.gx + n_ * t_.gxs.n + i * t_.gxs.h;
      // the residual: stride 1, where input and output rows coincide
      const T* gyr = s_.residual ? t_.gy + n_ * t_.gys.n + i * t_.gys.h : nullptr;
      for (int64_t w = 0; w < W; ++w) {
        for (int64_t c = 0; c < s_.cin; ++c) {
          T v = row[w * ld + c];
          if (s_.residual) v += gyr[w * t_.gys.w + c * t_.gys.c];
          gx[w * t_.gxs.w + c * t_.gxs.c] = v;
        }
      }
    }
  }

  const BackwardTensors<T>& t_;
  const BlockShape& s_;
  const Layout& l_;
  const BackwardPlan& p_;
  GradSource& source_;
  T* scratch_;
  const BackwardScratch& o_;
  const GradLayout gl_;
  T* grads_;
  const int64_t n_, band_;
  int64_t r0_, r1_, i_first_, i_last_;
  int64_t shared_hi_;  // the last input row the previous band writes (-1: none)
  RowWindow<T> win_;   // the a1 rows one step reads
  int64_t ga1_tag_[kMaxBackwardSlots];  // which row each gradient slot holds
  int64_t pending_ = 0;                 // pixels pending in the expand update
};

template <typename T>
struct BlockBackward {
  static void entry(const BackwardArgs<T>& a, const BackwardPlan& p, int64_t begin, int64_t end, T* grads,
                    T* scratch) {
    const BackwardScratch o = prepare(a.shape, a.layout, p, scratch);
    const BackwardTensors<T> t{a.shape, a.layout, a.x, a.xs, a.packed, a.gx, a.gxs, a.side, a.gy, a.gys};
    for (int64_t item = begin; item < end; ++item) {
      GradFromOutput<T> source(a, p, o, scratch, grads, item / p.n_bands);
      BackwardItem<T, GradFromOutput<T>>(t, p, o, scratch, grads, source, item).run();
    }
  }

  static void stats_entry(const StatsBackwardArgs<T>& a, const BackwardPlan& p, int64_t begin, int64_t end,
                          T* grads, T* scratch) {
    const BackwardScratch o = prepare(a.shape, a.layout, p, scratch);
    const BackwardTensors<T> t{a.shape, a.layout, a.x, a.xs, a.packed, a.gx, a.gxs, a.side, nullptr, {}};
    GradFromStats<T> source(a);
    for (int64_t item = begin; item < end; ++item) {
      BackwardItem<T, GradFromStats<T>>(t, p, o, scratch, grads, source, item).run();
    }
  }

 private:
  static BackwardScratch prepare(const BlockShape& s, const Layout& l, const BackwardPlan& p, T* scratch) {
    const BackwardScratch o = backward_scratch(s, l, p);
    std::memset(scratch + o.zero_row, 0, sizeof(T) * s.in_w * l.hp);
    return o;
  }
};

}  // namespace
}  // namespace mnv2
