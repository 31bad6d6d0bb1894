// Checks every compiled ISA path of the fused block against a naive
// double-precision reference: forward, input gradient and every weight and
// bias gradient, for the 17 MobileNetV2 block shapes and awkward ones, in
// NCHW, NHWC and padded strided layouts, with forced tilings that exercise
// column tiles, row bands, hidden chunks and multi-task reductions.
//
// Inputs and weights are small dyadic rationals (k/16), so the forward sums
// are exact in float: ReLU6 masks agree exactly with the reference, including
// values sitting exactly on 0 or 6.
#include <algorithm>
#include <cmath>
#include <limits>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "fused_ir.h"

using namespace mnv2;

namespace {

int g_failures = 0;
int g_checks = 0;

struct Case {
  int64_t n, cin, h, w, cout, t;
  int stride;
  int dilation = 1;  // of the depthwise taps
  int kernel = 3;    // of the depthwise step: 3, 5 or 7
  bool relu6 = true;  // the activation: ReLU6, else ReLU
};

template <typename T>
struct Tensor4 {
  int64_t N, C, H, W;
  Strides4 st;
  std::vector<T> data;
  T& at(int64_t n, int64_t c, int64_t h, int64_t w) {
    return data[n * st.n + c * st.c + h * st.h + w * st.w];
  }
  T at(int64_t n, int64_t c, int64_t h, int64_t w) const {
    return data[n * st.n + c * st.c + h * st.h + w * st.w];
  }
};

enum class Fmt { kNCHW, kNHWC, kPadded };

template <typename T>
Tensor4<T> make_tensor(int64_t N, int64_t C, int64_t H, int64_t W, Fmt f) {
  Tensor4<T> t{N, C, H, W, {}, {}};
  switch (f) {
    case Fmt::kNCHW: t.st = {C * H * W, H * W, W, 1}; break;
    case Fmt::kNHWC: t.st = {H * W * C, 1, W * C, C}; break;
    case Fmt::kPadded:  // NHWC with two spare channels and a spare column: a sliced view
      t.st = {H * (W + 1) * (C + 2), 1, (W + 1) * (C + 2), C + 2};
      break;
  }
  t.data.assign(static_cast<size_t>(std::max<int64_t>(N, 1) * t.st.n), T(1e30));  // poison gaps
  return t;
}

template <typename T>
struct Weights {
  std::vector<T> we, be, wd, bd, wp, bp;
};

float dyadic(std::mt19937& rng, int lo, int hi) {
  return static_cast<float>(std::uniform_int_distribution<int>(lo, hi)(rng)) / 16.0f;
}

struct Reference {
  // forward
  std::vector<double> a1, z1, z2, a2, y;  // NCHW dense
  // backward
  std::vector<double> gx, gwe, gbe, gwd, gbd, gwp, gbp;
};

double relu6d(double v) { return v < 0 ? 0 : (v > 6 ? 6 : v); }
// The block's activation and its derivative at the pre-activation z: ReLU6 or ReLU.
double act(double v, bool relu6) { return relu6 ? relu6d(v) : (v < 0 ? 0 : v); }
double dmask(double z, bool relu6) { return (z > 0 && (!relu6 || z < 6)) ? 1.0 : 0.0; }

// Dense NCHW indices of the reference's hidden tensors: a1 and z1 are [N][hidden][H][W],
// z2 and a2 [N][hidden][Ho][Wo].
struct HiddenIndex {
  int64_t hidden, H, W, Ho, Wo;
  explicit HiddenIndex(const BlockShape& s)
      : hidden(s.hidden), H(s.in_h), W(s.in_w), Ho(s.out_h()), Wo(s.out_w()) {}
  int64_t a1(int64_t n, int64_t h, int64_t i, int64_t j) const { return ((n * hidden + h) * H + i) * W + j; }
  int64_t z2(int64_t n, int64_t h, int64_t i, int64_t j) const { return ((n * hidden + h) * Ho + i) * Wo + j; }
};

// The gradients below z2 for grad_z2 `gz2` (NCHW dense): r.gwd, r.gbd, r.gx and, with
// an expand step, r.gwe, r.gbe; r holds the forward's a1 and z1.
template <typename T>
void backward_from_gz2(const BlockShape& s, const Tensor4<T>& x, const Weights<T>& wt,
                       const std::vector<double>& gz2, Reference& r) {
  const int64_t N = s.batch, H = s.in_h, W = s.in_w, Ho = s.out_h(), Wo = s.out_w();
  const int64_t C = s.cin, Hd = s.hidden;
  const int d = s.dilation;
  const HiddenIndex ix(s);
  const int K = s.kernel;
  const int64_t taps = s.dw_taps();
  r.gwd.assign(Hd * taps, 0);
  r.gbd.assign(Hd, 0);
  std::vector<double> ga1(N * Hd * H * W, 0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t h = 0; h < Hd; ++h)
      for (int64_t i = 0; i < Ho; ++i)
        for (int64_t j = 0; j < Wo; ++j) {
          const double g = gz2[ix.z2(n, h, i, j)];
          r.gbd[h] += g;
          for (int ky = 0; ky < K; ++ky)
            for (int kx = 0; kx < K; ++kx) {
              const int64_t ii = s.first_input_row(i) + ky * d, jj = s.first_input_row(j) + kx * d;
              if (ii < 0 || ii >= H || jj < 0 || jj >= W) continue;
              r.gwd[h * taps + ky * K + kx] += g * r.a1[ix.a1(n, h, ii, jj)];
              ga1[ix.a1(n, h, ii, jj)] += g * wt.wd[h * taps + ky * K + kx];
            }
        }
  r.gx.assign(N * C * H * W, 0);
  if (s.has_expand) {
    r.gwe.assign(Hd * C, 0);
    r.gbe.assign(Hd, 0);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t h = 0; h < Hd; ++h)
        for (int64_t i = 0; i < H; ++i)
          for (int64_t j = 0; j < W; ++j) {
            const double g = ga1[ix.a1(n, h, i, j)] * dmask(r.z1[ix.a1(n, h, i, j)], s.relu6);
            r.gbe[h] += g;
            for (int64_t c = 0; c < C; ++c) {
              r.gwe[h * C + c] += g * x.at(n, c, i, j);
              r.gx[((n * C + c) * H + i) * W + j] += g * wt.we[h * C + c];
            }
          }
  } else {
    for (int64_t n = 0; n < N; ++n)
      for (int64_t c = 0; c < C; ++c)
        for (int64_t i = 0; i < H; ++i)
          for (int64_t j = 0; j < W; ++j)
            r.gx[((n * C + c) * H + i) * W + j] = ga1[ix.a1(n, c, i, j)];
  }
}

template <typename T>
Reference reference(const BlockShape& s, const Tensor4<T>& x, const Weights<T>& wt,
                    const Tensor4<T>* gy) {
  const int64_t N = s.batch, H = s.in_h, W = s.in_w, Ho = s.out_h(), Wo = s.out_w();
  const int64_t C = s.cin, Hd = s.hidden, O = s.cout;
  const int d = s.dilation;
  Reference r;
  const HiddenIndex ix(s);
  r.a1.assign(N * Hd * H * W, 0);
  r.z1.assign(N * Hd * H * W, 0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t h = 0; h < Hd; ++h)
      for (int64_t i = 0; i < H; ++i)
        for (int64_t j = 0; j < W; ++j) {
          double z;
          if (s.has_expand) {
            z = wt.be[h];
            for (int64_t c = 0; c < C; ++c) z += double(wt.we[h * C + c]) * x.at(n, c, i, j);
            r.a1[ix.a1(n, h, i, j)] = act(z, s.relu6);
          } else {
            z = x.at(n, h, i, j);
            r.a1[ix.a1(n, h, i, j)] = z;
          }
          r.z1[ix.a1(n, h, i, j)] = z;
        }
  r.z2.assign(N * Hd * Ho * Wo, 0);
  r.a2.assign(N * Hd * Ho * Wo, 0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t h = 0; h < Hd; ++h)
      for (int64_t i = 0; i < Ho; ++i)
        for (int64_t j = 0; j < Wo; ++j) {
          double z = wt.bd[h];
          for (int ky = 0; ky < s.kernel; ++ky)
            for (int kx = 0; kx < s.kernel; ++kx) {
              const int64_t ii = s.first_input_row(i) + ky * d, jj = s.first_input_row(j) + kx * d;
              if (ii < 0 || ii >= H || jj < 0 || jj >= W) continue;
              z += double(wt.wd[(h * s.kernel + ky) * s.kernel + kx]) * r.a1[ix.a1(n, h, ii, jj)];
            }
          r.z2[ix.z2(n, h, i, j)] = z;
          r.a2[ix.z2(n, h, i, j)] = act(z, s.relu6);
        }
  r.y.assign(N * O * Ho * Wo, 0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t o = 0; o < O; ++o)
      for (int64_t i = 0; i < Ho; ++i)
        for (int64_t j = 0; j < Wo; ++j) {
          double v = wt.bp[o];
          for (int64_t h = 0; h < Hd; ++h) v += double(wt.wp[o * Hd + h]) * r.a2[ix.z2(n, h, i, j)];
          if (s.residual) v += x.at(n, o, i, j);
          r.y[((n * O + o) * Ho + i) * Wo + j] = v;
        }
  if (gy == nullptr) return r;

  r.gwp.assign(O * Hd, 0);
  r.gbp.assign(O, 0);
  std::vector<double> gz2(N * Hd * Ho * Wo, 0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t i = 0; i < Ho; ++i)
      for (int64_t j = 0; j < Wo; ++j)
        for (int64_t o = 0; o < O; ++o) {
          const double g = gy->at(n, o, i, j);
          r.gbp[o] += g;
          for (int64_t h = 0; h < Hd; ++h) {
            r.gwp[o * Hd + h] += g * r.a2[ix.z2(n, h, i, j)];
            gz2[ix.z2(n, h, i, j)] += g * wt.wp[o * Hd + h];
          }
        }
  for (size_t e = 0; e < gz2.size(); ++e) gz2[e] *= dmask(r.z2[e], s.relu6);
  backward_from_gz2(s, x, wt, gz2, r);
  if (s.residual) {
    for (int64_t n = 0; n < N; ++n)
      for (int64_t c = 0; c < C; ++c)
        for (int64_t i = 0; i < H; ++i)
          for (int64_t j = 0; j < W; ++j) r.gx[((n * C + c) * H + i) * W + j] += gy->at(n, c, i, j);
  }
  return r;
}

// Normwise relative error |got - ref| / |ref|; exact zeros compare absolutely.
double rel_err(const std::vector<double>& ref, const std::function<double(size_t)>& got) {
  double num = 0, den = 0;
  for (size_t e = 0; e < ref.size(); ++e) {
    const double d = got(e) - ref[e];
    if (!std::isfinite(got(e))) return INFINITY;
    num += d * d;
    den += ref[e] * ref[e];
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

void expect_close(const std::string& what, const std::vector<double>& ref,
                  const std::function<double(size_t)>& got, double tol) {
  ++g_checks;
  const double e = rel_err(ref, got);
  if (!(e <= tol)) {
    ++g_failures;
    std::printf("FAIL %s: relative error %.3g > %.1g\n", what.c_str(), e, tol);
  }
}

struct PlanOverride {
  int64_t cols = 0, band_rows = 0, step_rows = 0, chunk = 0, bwd_band_rows = 0;
  int tasks = 1;
  bool threaded = false;
  int64_t splits = 0;
  int64_t bwd_step_rows = 0;  // backward rows per step (0: the planner's)
  CacheSizes caches{};        // plan for these caches (l2 == 0: this machine's)
};

// The planner's forward plan with the override's forced sizes (and a fused stem's
// im2col length) applied.
ForwardPlan forced_forward_plan(const BlockShape& s, const Layout& l, const PlanOverride& ov,
                                int64_t stem_k) {
  ForwardPlan fp = ov.caches.l2 > 0 ? plan_forward(s, l, ov.tasks, ov.caches) : plan_forward(s, l, ov.tasks);
  if (ov.cols) fp.cols_per_tile = ov.cols;
  if (ov.band_rows) fp.rows_per_band = ov.band_rows;
  if (ov.step_rows) fp.rows_per_step = ov.step_rows;
  if (ov.chunk) fp.hidden_chunk = ov.chunk;
  if (ov.splits) fp.n_splits = ov.splits;
  fp.stem_k = stem_k;
  finish_forward_plan(s, l, &fp);
  return fp;
}

// The depthwise statistics of the block's front (no project, no depthwise bias) and
// their backward for grad_z2 = alpha + beta * z2, against the naive reference, split
// into tasks as the glue does.
template <typename T>
void check_stats(const Kernels<T>& kt, const BlockShape& block, const Tensor4<T>& x, const Weights<T>& wt,
                 const Reference& ref, const PlanOverride& ov, const std::string& label) {
  BlockShape s = block;
  s.cout = 0;  // the statistics stop before the project
  s.residual = false;
  const int64_t Hd = s.hidden, Ho = s.out_h(), Wo = s.out_w();
  std::vector<double> z2(ref.z2.size());  // without the depthwise bias
  for (size_t e = 0; e < z2.size(); ++e) z2[e] = ref.z2[e] - double(wt.bd[(e / (Ho * Wo)) % Hd]);
  std::vector<double> sum_ref(2 * Hd, 0);
  for (size_t e = 0; e < z2.size(); ++e) {
    const int64_t h = (e / (Ho * Wo)) % Hd;
    sum_ref[h] += z2[e];
    sum_ref[Hd + h] += z2[e] * z2[e];
  }
  const T* we = s.has_expand ? wt.we.data() : nullptr;
  const T* be = s.has_expand ? wt.be.data() : nullptr;

  const Layout lf = make_layout(s, kt.vl, Packing::kForward);
  std::vector<T> packed(lf.total);
  pack_weights<T>(s, lf, Packing::kForward, we, be, wt.wd.data(), nullptr, nullptr, nullptr, 0, Hd,
                  packed.data());
  const StatsPlan sp = plan_stats(s, lf, ov.tasks);
  const int64_t items = sp.items(s);
  const int tasks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(ov.tasks, items)));
  std::vector<double> sums(tasks * 2 * lf.hp, 0.0);
  for (int t = 0; t < tasks; ++t) {
    std::vector<T> scratch(sp.scratch_floats);
    kt.stats(StatsArgs<T>{s, lf, x.data.data(), x.st, packed.data()}, sp, items * t / tasks,
             items * (t + 1) / tasks, sums.data() + t * 2 * lf.hp, scratch.data());
  }
  auto summed = [&](size_t e) {
    const int64_t off = static_cast<int64_t>(e) < Hd ? e : lf.hp + (e - Hd);
    double v = 0;
    for (int t = 0; t < tasks; ++t) v += sums[t * 2 * lf.hp + off];
    return v;
  };
  expect_close(label + " stats", sum_ref, summed, sizeof(T) == 4 ? 1e-6 : 1e-14);

  std::mt19937 rng(static_cast<unsigned>(Hd * 17 + s.in_h));
  const Layout lb = make_layout(s, kt.vl, Packing::kBackward);
  std::vector<T> packed_b(lb.total), alpha(lb.hp, T(0)), beta(lb.hp, T(0));
  pack_weights<T>(s, lb, Packing::kBackward, we, be, wt.wd.data(), nullptr, nullptr, nullptr, 0, Hd,
                  packed_b.data());
  for (int64_t h = 0; h < Hd; ++h) {
    alpha[h] = dyadic(rng, -8, 8);
    beta[h] = dyadic(rng, -4, 4) / 8;
  }
  std::vector<double> gz2(z2.size());
  for (size_t e = 0; e < z2.size(); ++e) {
    const int64_t h = (e / (Ho * Wo)) % Hd;
    gz2[e] = double(alpha[h]) + double(beta[h]) * z2[e];
  }
  Reference r = ref;
  backward_from_gz2(s, x, wt, gz2, r);
  BackwardPlan bp = plan_backward(s, lb, ov.tasks);
  if (ov.bwd_band_rows || ov.bwd_step_rows) {
    if (ov.bwd_band_rows) bp.rows_per_band = ov.bwd_band_rows;
    if (ov.bwd_step_rows) bp.rows_per_step = ov.bwd_step_rows;
    finish_backward_plan(s, lb, &bp);
  }
  const GradLayout gl = make_grad_layout(s, lb);
  Tensor4<T> gx = make_tensor<T>(s.batch, s.cin, s.in_h, s.in_w, Fmt::kNHWC);
  std::vector<T> side(bp.side_floats);
  const StatsBackwardArgs<T> ba{s, lb, x.data.data(), x.st, packed_b.data(), alpha.data(), beta.data(),
                                gx.data.data(), gx.st, side.data()};
  const int64_t bitems = bp.items(s);
  const int btasks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(ov.tasks, bitems)));
  std::vector<T> partials(btasks * gl.total, T(0));
  for (int t = 0; t < btasks; ++t) {
    std::vector<T> scratch(bp.scratch_floats);
    kt.stats_backward(ba, bp, bitems * t / btasks, bitems * (t + 1) / btasks, partials.data() + t * gl.total,
                      scratch.data());
  }
  backward_finish(s, bp, side.data(), gx.data.data(), gx.st);
  std::vector<T> gwe(Hd * s.cin), gbe(Hd), gwd(Hd * s.dw_taps());
  reduce_grads(s, lb, partials.data(), btasks, 0, Hd, gwe.data(), gbe.data(), gwd.data(),
               static_cast<T*>(nullptr), static_cast<T*>(nullptr), static_cast<T*>(nullptr));
  const double tol = sizeof(T) == 4 ? 1e-5 : 1e-13;
  auto vec = [](const std::vector<T>& v) { return [&v](size_t e) { return double(v[e]); }; };
  expect_close(label + " stats grad_x", r.gx, [&](size_t e) {
    const int64_t j = e % s.in_w, i = (e / s.in_w) % s.in_h, c = (e / (s.in_w * s.in_h)) % s.cin,
                  n = e / (s.in_w * s.in_h * s.cin);
    return double(gx.at(n, c, i, j));
  }, tol);
  if (s.has_expand) {
    expect_close(label + " stats grad_w_expand", r.gwe, vec(gwe), tol);
    expect_close(label + " stats grad_b_expand", r.gbe, vec(gbe), tol);
  }
  expect_close(label + " stats grad_w_dw", r.gwd, vec(gwd), tol);
}

template <typename T>
void run_case(const KernelTable& table, const Case& c, Fmt fmt, const PlanOverride& ov,
              const std::string& label, bool backward) {
  BlockShape s{};
  s.batch = c.n;
  s.in_h = c.h;
  s.in_w = c.w;
  s.cin = c.cin;
  s.hidden = c.cin * c.t;
  s.cout = c.cout;
  s.stride = c.stride;
  s.dilation = c.dilation;
  s.kernel = c.kernel;
  s.relu6 = c.relu6;
  s.has_expand = c.t != 1;
  s.residual = c.stride == 1 && c.cin == c.cout;
  if (const char* err = validate_shape(s)) {
    std::printf("FAIL %s: invalid case: %s\n", label.c_str(), err);
    ++g_failures;
    return;
  }
  const Kernels<T>& kt = table.get<T>();
  std::mt19937 rng(static_cast<unsigned>(c.cin * 131 + c.h * 7 + c.t + c.stride + 1000 * c.dilation + 77 * c.kernel));
  Tensor4<T> x = make_tensor<T>(c.n, c.cin, c.h, c.w, fmt);
  for (int64_t n = 0; n < c.n; ++n)
    for (int64_t ch = 0; ch < c.cin; ++ch)
      for (int64_t i = 0; i < c.h; ++i)
        for (int64_t j = 0; j < c.w; ++j) x.at(n, ch, i, j) = dyadic(rng, -24, 24);
  Weights<T> wt;
  for (int64_t e = 0; e < s.hidden * s.cin; ++e) wt.we.push_back(dyadic(rng, -8, 8));
  for (int64_t e = 0; e < s.hidden; ++e) wt.be.push_back(dyadic(rng, -16, 40));
  for (int64_t e = 0; e < s.hidden * s.dw_taps(); ++e) wt.wd.push_back(dyadic(rng, -12, 12));
  for (int64_t e = 0; e < s.hidden; ++e) wt.bd.push_back(dyadic(rng, -16, 40));
  for (int64_t e = 0; e < s.cout * s.hidden; ++e) wt.wp.push_back(dyadic(rng, -8, 8));
  for (int64_t e = 0; e < s.cout; ++e) wt.bp.push_back(dyadic(rng, -16, 16));
  const int64_t Ho = s.out_h(), Wo = s.out_w();
  Tensor4<T> gy = make_tensor<T>(c.n, c.cout, Ho, Wo, fmt);
  for (int64_t n = 0; n < c.n; ++n)
    for (int64_t o = 0; o < c.cout; ++o)
      for (int64_t i = 0; i < Ho; ++i)
        for (int64_t j = 0; j < Wo; ++j) gy.at(n, o, i, j) = dyadic(rng, -16, 16);

  const Reference ref = reference(s, x, wt, backward ? &gy : nullptr);

  const Layout l = make_layout(s, kt.vl, backward ? Packing::kBackward : Packing::kForward);
  // Packed in two ranges, as the glue does across threads.
  std::vector<T> packed(l.total, std::numeric_limits<T>::quiet_NaN());
  const int64_t mid = s.hidden / 2;
  for (auto [h0, h1] : {std::pair<int64_t, int64_t>{0, mid}, {mid, s.hidden}}) {
    pack_weights<T>(s, l, backward ? Packing::kBackward : Packing::kForward, wt.we.data(), wt.be.data(),
                    wt.wd.data(), wt.bd.data(), wt.wp.data(), wt.bp.data(), h0, h1, packed.data());
  }
  ++g_checks;
  if (std::any_of(packed.begin(), packed.end(), [](T v) { return std::isnan(v); })) {
    ++g_failures;
    std::printf("FAIL %s: pack_weights left elements unwritten\n", label.c_str());
  }

  // forward
  const ForwardPlan fp = forced_forward_plan(s, l, ov, 0);
  std::vector<T> partial(fp.partial_floats);
  Tensor4<T> y = make_tensor<T>(c.n, c.cout, Ho, Wo, fmt);
  ForwardArgs<T> fa{s, l, x.data.data(), x.st, packed.data(), y.data.data(), y.st, partial.data()};
  const int64_t items = fp.items(s);
  auto run_forward_range = [&](int64_t b, int64_t e) {
    std::vector<T> scratch(fp.scratch_floats);
    kt.forward(fa, fp, b, e, scratch.data());
  };
  if (ov.threaded) {
    std::vector<std::thread> pool;
    for (int t = 0; t < ov.tasks; ++t) {
      pool.emplace_back(run_forward_range, items * t / ov.tasks, items * (t + 1) / ov.tasks);
    }
    for (auto& th : pool) th.join();
  } else {
    for (int t = 0; t < ov.tasks; ++t) run_forward_range(items * t / ov.tasks, items * (t + 1) / ov.tasks);
  }
  if (fp.n_splits > 1) {
    const int64_t rows = s.batch * Ho;
    reduce_forward_splits<T>(fa, fp, 0, rows / 2);
    reduce_forward_splits<T>(fa, fp, rows / 2, rows);
  }
  auto dense = [&](const Tensor4<T>& t) {
    return [&t](size_t e) {
      const int64_t j = e % t.W, i = (e / t.W) % t.H, ch = (e / (t.W * t.H)) % t.C,
                    n = e / (t.W * t.H * t.C);
      return double(t.at(n, ch, i, j));
    };
  };
  // The forward is exact with dyadic data up to the project's summation-order
  // rounding; the backward sums are not exact.
  const double fwd_tol = sizeof(T) == 4 ? 1e-6 : 1e-14, tol = sizeof(T) == 4 ? 1e-5 : 1e-13;
  expect_close(label + " forward", ref.y, dense(y), fwd_tol);
  if (!backward) return;

  BackwardPlan bp = plan_backward(s, l, ov.tasks);
  if (ov.bwd_band_rows || ov.bwd_step_rows) {
    if (ov.bwd_band_rows) bp.rows_per_band = ov.bwd_band_rows;
    if (ov.bwd_step_rows) bp.rows_per_step = ov.bwd_step_rows;
    finish_backward_plan(s, l, &bp);
  }
  const GradLayout gl = make_grad_layout(s, l);
  Tensor4<T> gx = make_tensor<T>(c.n, c.cin, c.h, c.w, fmt);
  std::vector<T> side(bp.side_floats);
  BackwardArgs<T> ba{s, l, x.data.data(), x.st, gy.data.data(), gy.st, packed.data(),
                  gx.data.data(), gx.st, side.data()};
  const int64_t bitems = bp.items(s);
  const int tasks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(ov.tasks, bitems)));
  std::vector<T> partials(tasks * gl.total, T(0));
  auto run_backward_task = [&](int t) {
    std::vector<T> scratch(bp.scratch_floats);
    kt.backward(ba, bp, bitems * t / tasks, bitems * (t + 1) / tasks, partials.data() + t * gl.total,
                scratch.data());
  };
  if (ov.threaded) {
    std::vector<std::thread> pool;
    for (int t = 0; t < tasks; ++t) pool.emplace_back(run_backward_task, t);
    for (auto& th : pool) th.join();
  } else {
    for (int t = 0; t < tasks; ++t) run_backward_task(t);
  }
  backward_finish(s, bp, side.data(), gx.data.data(), gx.st);
  std::vector<T> gwe(s.hidden * s.cin), gbe(s.hidden), gwd(s.hidden * s.dw_taps()), gbd(s.hidden),
      gwp(s.cout * s.hidden), gbp(s.cout);
  // in two hidden-channel ranges, the second first (the glue runs them concurrently)
  const int64_t h_mid = s.hidden / 2;
  for (auto [h0, h1] : {std::pair<int64_t, int64_t>{h_mid, s.hidden}, {0, h_mid}}) {
    reduce_grads(s, l, partials.data(), tasks, h0, h1, gwe.data(), gbe.data(), gwd.data(),
                 gbd.data(), gwp.data(), gbp.data());
  }
  auto vec = [](const std::vector<T>& v) { return [&v](size_t e) { return double(v[e]); }; };
  expect_close(label + " grad_x", ref.gx, dense(gx), tol);
  if (s.has_expand) {
    expect_close(label + " grad_w_expand", ref.gwe, vec(gwe), tol);
    expect_close(label + " grad_b_expand", ref.gbe, vec(gbe), tol);
  }
  expect_close(label + " grad_w_dw", ref.gwd, vec(gwd), tol);
  expect_close(label + " grad_b_dw", ref.gbd, vec(gbd), tol);
  expect_close(label + " grad_w_project", ref.gwp, vec(gwp), tol);
  expect_close(label + " grad_b_project", ref.gbp, vec(gbp), tol);
  check_stats(kt, s, x, wt, ref, ov, label);
}

// The pointwise convolution's mean over rows (the head + global average pooling)
// against a naive loop, in column groups of at most kPoolCols (the last one partial
// when cout is not a multiple of it), with a padded row stride; nothing past each
// group's columns is written.
template <typename T>
void run_pointwise_mean(const KernelTable& table, int64_t rows, int64_t cin, int64_t cout, Activation act,
                        const std::string& label) {
  const Kernels<T>& kt = table.get<T>();
  std::mt19937 rng(static_cast<unsigned>(rows * 7 + cin * 131 + cout));
  const int64_t ldx = cin + 3;
  std::vector<T> x(rows * ldx), w(cout * cin), b(cout);
  for (T& v : x) v = dyadic(rng, -24, 24);
  for (T& v : w) v = dyadic(rng, -8, 8);
  for (T& v : b) v = dyadic(rng, -16, 40);
  const PointwiseLayout l = make_pointwise_layout(cin, cout, kt.vl);
  std::vector<T> packed(l.total, T(-7)), out(cout + 5, T(99)), scratch(kPoolScratch, T(-3));
  pack_pointwise<T>(l, w.data(), b.data(), packed.data());
  const PointwiseArgs<T> a{l, act, x.data(), ldx, packed.data(), nullptr, 0};
  for (int64_t n0 = 0; n0 < cout; n0 += kPoolCols) {
    kt.pointwise_mean(a, rows, n0, std::min(cout, n0 + kPoolCols), scratch.data(), out.data() + n0);
  }
  std::vector<double> ref;
  for (int64_t o = 0; o < cout; ++o) {
    double sum = 0;
    for (int64_t m = 0; m < rows; ++m) {
      double v = b[o];
      for (int64_t c = 0; c < cin; ++c) v += double(x[m * ldx + c]) * double(w[o * cin + c]);
      if (act != Activation::kNone) v = std::max(v, 0.0);
      if (act == Activation::kRelu6) v = std::min(v, 6.0);
      sum += v;
    }
    ref.push_back(sum / double(rows));
  }
  expect_close(label, ref, [&](size_t e) { return double(out[e]); }, sizeof(T) == 4 ? 1e-6 : 1e-14);
  ++g_checks;
  for (int64_t o = cout; o < cout + 5; ++o) {
    if (out[o] != T(99)) {
      ++g_failures;
      std::printf("FAIL %s: wrote past the output channels\n", label.c_str());
      return;
    }
  }
}

// The pointwise (1x1) convolution against a naive loop: rows x cin -> cout with
// bias and activation, computed in two row ranges and two column ranges (the
// split at a multiple of vl, as the glue's work items), with padded row strides.
template <typename T>
void run_pointwise(const KernelTable& table, int64_t rows, int64_t cin, int64_t cout, Activation act,
                   const std::string& label) {
  const Kernels<T>& kt = table.get<T>();
  std::mt19937 rng(static_cast<unsigned>(rows * 131 + cin * 17 + cout));
  const int64_t ldx = cin + 3, ldy = cout + 5;
  std::vector<T> x(rows * ldx), w(cout * cin), b(cout);
  for (T& v : x) v = dyadic(rng, -24, 24);
  for (T& v : w) v = dyadic(rng, -8, 8);
  for (T& v : b) v = dyadic(rng, -16, 40);
  const PointwiseLayout l = make_pointwise_layout(cin, cout, kt.vl);
  std::vector<T> packed(l.total, T(-7)), y(rows * ldy, T(99)), scratch(kPointwiseScratch);
  pack_pointwise<T>(l, w.data(), b.data(), packed.data());
  const PointwiseArgs<T> a{l, act, x.data(), ldx, packed.data(), y.data(), ldy};
  const int64_t m_mid = rows / 2, n_mid = std::min(cout, (cout / 2) / kt.vl * kt.vl);
  for (auto [m0, m1] : {std::pair<int64_t, int64_t>{0, m_mid}, {m_mid, rows}}) {
    if (n_mid > 0) kt.pointwise(a, m0, m1, 0, n_mid, scratch.data());
    if (n_mid < cout) kt.pointwise(a, m0, m1, n_mid, cout, scratch.data());
  }
  std::vector<double> ref;
  for (int64_t m = 0; m < rows; ++m) {
    for (int64_t o = 0; o < cout; ++o) {
      double v = b[o];
      for (int64_t c = 0; c < cin; ++c) v += double(x[m * ldx + c]) * double(w[o * cin + c]);
      if (act != Activation::kNone) v = std::max(v, 0.0);
      if (act == Activation::kRelu6) v = std::min(v, 6.0);
      ref.push_back(v);
    }
  }
  expect_close(label, ref, [&](size_t e) { return double(y[(e / cout) * ldy + e % cout]); },
               sizeof(T) == 4 ? 1e-6 : 1e-14);
  // nothing outside the output columns is written
  ++g_checks;
  for (int64_t m = 0; m < rows; ++m) {
    for (int64_t o = cout; o < ldy; ++o) {
      if (y[m * ldy + o] != T(99)) {
        ++g_failures;
        std::printf("FAIL %s: wrote past the output columns\n", label.c_str());
        return;
      }
    }
  }
}

// The block with a fused stem (its t == 1 input rows computed from an image by a
// 3x3 stride-2 pad-1 convolution + bias + ReLU6) against the stem computed
// naively, then the block's naive reference. Dyadic data keep the stem exact, so
// the block sees the same input as the reference.
template <typename T>
void run_stem_case(const KernelTable& table, int64_t N, int64_t C, int64_t IH, int64_t IW,
                   int64_t cin, int64_t cout, int stride, Fmt fmt, const PlanOverride& ov,
                   const std::string& label) {
  const Kernels<T>& kt = table.get<T>();
  std::mt19937 rng(static_cast<unsigned>(C * 31 + IH * 7 + IW + cin * 3 + cout));
  Tensor4<T> img = make_tensor<T>(N, C, IH, IW, fmt);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t i = 0; i < IH; ++i)
        for (int64_t j = 0; j < IW; ++j) img.at(n, c, i, j) = dyadic(rng, -24, 24);
  std::vector<T> sw(cin * C * kStemTaps), sb(cin);  // stem weight (cin, C, kStemKernel, kStemKernel), bias
  for (T& v : sw) v = dyadic(rng, -4, 4);
  for (T& v : sb) v = dyadic(rng, -16, 40);
  BlockShape s{};
  s.batch = N;
  s.in_h = (IH + 2 * kStemPad - kStemKernel) / kStemStride + 1;
  s.in_w = (IW + 2 * kStemPad - kStemKernel) / kStemStride + 1;
  s.cin = cin;
  s.hidden = cin;
  s.cout = cout;
  s.stride = stride;
  s.has_expand = false;
  s.residual = false;
  Tensor4<T> x = make_tensor<T>(N, cin, s.in_h, s.in_w, Fmt::kNHWC);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t o = 0; o < cin; ++o)
      for (int64_t i = 0; i < s.in_h; ++i)
        for (int64_t j = 0; j < s.in_w; ++j) {
          double z = sb[o];
          for (int64_t c = 0; c < C; ++c)
            for (int kh = 0; kh < kStemKernel; ++kh)
              for (int kw = 0; kw < kStemKernel; ++kw) {
                const int64_t ih = kStemStride * i - kStemPad + kh, iw = kStemStride * j - kStemPad + kw;
                if (ih < 0 || ih >= IH || iw < 0 || iw >= IW) continue;
                z += double(sw[((o * C + c) * kStemKernel + kh) * kStemKernel + kw]) * img.at(n, c, ih, iw);
              }
          x.at(n, o, i, j) = static_cast<T>(relu6d(z));
        }
  Weights<T> wt;
  for (int64_t e = 0; e < cin; ++e) wt.be.push_back(0);
  for (int64_t e = 0; e < cin * s.dw_taps(); ++e) wt.wd.push_back(dyadic(rng, -12, 12));
  for (int64_t e = 0; e < cin; ++e) wt.bd.push_back(dyadic(rng, -16, 40));
  for (int64_t e = 0; e < cout * cin; ++e) wt.wp.push_back(dyadic(rng, -8, 8));
  for (int64_t e = 0; e < cout; ++e) wt.bp.push_back(dyadic(rng, -16, 16));
  const Reference ref = reference<T>(s, x, wt, static_cast<const Tensor4<T>*>(nullptr));

  const Layout l = make_layout(s, kt.vl, Packing::kForward);
  std::vector<T> packed(l.total);
  pack_weights<T>(s, l, Packing::kForward, nullptr, nullptr, wt.wd.data(), wt.bd.data(), wt.wp.data(),
                  wt.bp.data(), 0, s.hidden, packed.data());
  // the stem as a (cin, kStemTaps C) matrix, column (kh * kStemKernel + kw) * C + c
  const PointwiseLayout sl = make_pointwise_layout(kStemTaps * C, cin, kt.vl);
  std::vector<T> w2(cin * kStemTaps * C), stem(sl.total);
  for (int64_t o = 0; o < cin; ++o)
    for (int64_t c = 0; c < C; ++c)
      for (int k = 0; k < kStemTaps; ++k) w2[o * kStemTaps * C + k * C + c] = sw[(o * C + c) * kStemTaps + k];
  pack_pointwise<T>(sl, w2.data(), sb.data(), stem.data());

  const ForwardPlan fp = forced_forward_plan(s, l, ov, kStemTaps * C);
  std::vector<T> partial(fp.partial_floats);
  const int64_t Ho = s.out_h(), Wo = s.out_w();
  Tensor4<T> y = make_tensor<T>(N, cout, Ho, Wo, fmt);
  // x is poisoned: the kernel must not read it
  std::vector<T> poison(x.data.size(), std::numeric_limits<T>::quiet_NaN());
  ForwardArgs<T> fa{s, l, poison.data(), x.st, packed.data(), y.data.data(), y.st, partial.data()};
  fa.stem.image = img.data.data();
  fa.stem.strides = img.st;
  fa.stem.channels = C;
  fa.stem.height = IH;
  fa.stem.width = IW;
  fa.stem.packed = stem.data();
  fa.stem.layout = sl;
  const int64_t items = fp.items(s);
  for (int t = 0; t < ov.tasks; ++t) {
    std::vector<T> scratch(fp.scratch_floats);
    kt.forward(fa, fp, items * t / ov.tasks, items * (t + 1) / ov.tasks, scratch.data());
  }
  if (fp.n_splits > 1) reduce_forward_splits<T>(fa, fp, 0, s.batch * Ho);
  expect_close(label, ref.y, [&](size_t e) {
    const int64_t j = e % Wo, i = (e / Wo) % Ho, o = (e / (Wo * Ho)) % cout, n = e / (Wo * Ho * cout);
    return double(y.at(n, o, i, j));
  }, sizeof(T) == 4 ? 1e-6 : 1e-14);
}

// The forward planner's choices for the machines it may meet: the register tile from
// the ISA's register count, the working-set budget from the L2, and the tiles of
// MobileNetV2's blocks (batch 1, two threads) for AVX2, AVX-512 and NEON vector widths
// and L2 sizes from 256 KiB to 2 MiB, against a table, plus the budget's invariants.
void check_planner() {
  auto expect = [](bool ok, const std::string& what) {
    ++g_checks;
    if (!ok) {
      ++g_failures;
      std::printf("FAIL planner: %s\n", what.c_str());
    }
  };
  expect(gemm_tile_rows(16) == 6, "AVX2's 16 registers: a 6-row tile");
  expect(gemm_tile_rows(32) == 14, "AVX-512's and NEON's 32 registers: a 14-row tile");
  for (Isa isa : kAllIsas) {
    if (const KernelTable* kt = kernel_table(isa)) {
      const int regs = isa == Isa::kAvx2 || isa == Isa::kScalar ? 16 : 32;
      expect(kt->f32.tile_rows == gemm_tile_rows(regs) && kt->f64.tile_rows == gemm_tile_rows(regs),
             std::string(isa_name(isa)) + "'s tile rows");
    }
  }
  constexpr int64_t KiB = 1024;
  expect(forward_cache_budget({32 * KiB, 512 * KiB, 4096 * KiB}) == 320 * KiB / 4, "Zen 3's L2: 320 KiB");
  expect(forward_cache_budget({48 * KiB, 2048 * KiB, 4096 * KiB}) == 1280 * KiB / 4, "a 2 MiB L2: 1.25 MiB");
  expect(forward_cache_budget({16 * KiB, 64 * KiB, 0}) == 128 * KiB / 4, "a tiny L2: the 128 KiB floor");
  // (cin, side, cout, t, stride) of blocks 9-12 (96->96 s1 14, 96->160 s2 14, 160->160 and
  // 160->320 at 7x7), where the caches decide the hidden chunk
  struct B { int64_t cin, h, cout, t; int s; };
  const B blocks[] = {{96, 14, 96, 6, 1}, {96, 14, 160, 6, 2}, {160, 7, 160, 6, 1}, {160, 7, 320, 6, 1}};
  struct Row {
    int64_t vl, l2_kib, chunk[4];
  };
  const Row table[] = {
      {8, 512, {144, 144, 160, 96}},   // AVX2 fp32, Zen 3
      {16, 1024, {288, 288, 240, 240}},  // AVX-512 fp32, Zen 4
      {16, 2048, {288, 288, 480, 480}},  // AVX-512 fp32, a 2 MiB L2 (Intel server cores)
      {4, 256, {96, 72, 72, 40}},      // NEON fp32, a 256 KiB L2
  };
  for (const Row& r : table) {
    const CacheSizes caches{32 * KiB, r.l2_kib * KiB, 4096 * KiB};
    for (int i = 0; i < 4; ++i) {
      const B& b = blocks[i];
      BlockShape s{1, b.h, b.h, b.cin, b.cin * b.t, b.cout, b.s, true, b.s == 1 && b.cin == b.cout};
      const Layout l = make_layout(s, r.vl, Packing::kForward);
      const ForwardPlan p = plan_forward(s, l, 2, caches);
      char what[160];
      std::snprintf(what, sizeof what, "vl %lld L2 %lld KiB block %lld->%lld s%d: chunk %lld, expected %lld",
                    (long long)r.vl, (long long)r.l2_kib, (long long)b.cin, (long long)b.cout, b.s,
                    (long long)p.hidden_chunk, (long long)r.chunk[i]);
      expect(p.hidden_chunk == r.chunk[i], what);
    }
  }
  // Over the 17 blocks and every (vector width, L2): the working set fits the budget unless
  // the chunk is already one vector, and a larger L2 never gives a smaller chunk.
  const B all[] = {{32, 112, 16, 1, 1}, {16, 112, 24, 6, 2}, {24, 56, 24, 6, 1}, {24, 56, 32, 6, 2},
                   {32, 28, 32, 6, 1},  {32, 28, 64, 6, 2},  {64, 14, 64, 6, 1}, {64, 14, 96, 6, 1},
                   {96, 14, 96, 6, 1},  {96, 14, 160, 6, 2}, {160, 7, 160, 6, 1}, {160, 7, 320, 6, 1}};
  for (int64_t vl : {4, 8, 16}) {
    for (const B& b : all) {
      BlockShape s{1, b.h, b.h, b.cin, b.cin * b.t, b.cout, b.s, b.t != 1, b.s == 1 && b.cin == b.cout};
      const Layout l = make_layout(s, vl, Packing::kForward);
      int64_t previous = 0;
      for (int64_t l2 : {256, 512, 1024, 2048}) {
        const CacheSizes caches{32 * KiB, l2 * KiB, 4096 * KiB};
        const ForwardPlan p = plan_forward(s, l, 2, caches);
        const int64_t working = (s.cin + l.cout_p + s.dw_taps() + 2) * p.hidden_chunk + p.scratch_floats;
        char what[160];
        std::snprintf(what, sizeof what, "vl %lld L2 %lld KiB block %lld->%lld s%d: working set %lld of %lld, chunk %lld",
                      (long long)vl, (long long)l2, (long long)b.cin, (long long)b.cout, b.s, (long long)working,
                      (long long)forward_cache_budget(caches), (long long)p.hidden_chunk);
        expect(working <= forward_cache_budget(caches) || p.hidden_chunk == vl, what);
        expect(p.hidden_chunk >= previous, std::string(what) + " (smaller than with a smaller L2)");
        previous = p.hidden_chunk;
      }
    }
  }
  // MNV2_CACHE_KIB's format
  const CacheSizes parsed = parse_cache_kib("48,2048,4096");
  expect(parsed.l1d == 48 * KiB && parsed.l2 == 2048 * KiB && parsed.l3_per_core == 4096 * KiB, "parse 48,2048,4096");
  for (const char* bad : {"48,2048", "48,2048,0", "a,b,c", "48,2048,4096,1", "-1,2,3"}) {
    bool threw = false;
    try {
      parse_cache_kib(bad);
    } catch (const std::runtime_error&) {
      threw = true;
    }
    expect(threw, std::string("MNV2_CACHE_KIB=") + bad + " is refused");
  }
  const CacheSizes& m = machine_caches();
  expect(m.l1d > 0 && m.l2 > 0 && m.l3_per_core > 0, "this machine's caches: " + machine_caches_source());
  std::printf("this machine: L1d %lld KiB, L2 %lld KiB, L3 %lld KiB per core (%s)\n", (long long)(m.l1d / KiB),
              (long long)(m.l2 / KiB), (long long)(m.l3_per_core / KiB), machine_caches_source().c_str());
}

std::string describe(const Case& c) {
  char buf[128];
  std::snprintf(buf, sizeof buf, "n%lld c%lld h%lldx%lld o%lld t%lld s%d", (long long)c.n,
                (long long)c.cin, (long long)c.h, (long long)c.w, (long long)c.cout,
                (long long)c.t, c.stride);
  std::string out = buf;
  if (c.dilation != 1) out += " d" + std::to_string(c.dilation);
  if (c.kernel != 3) out += " k" + std::to_string(c.kernel);
  if (!c.relu6) out += " relu";
  return out;
}

const char* fmt_name(Fmt f) {
  return f == Fmt::kNCHW ? "nchw" : (f == Fmt::kNHWC ? "nhwc" : "padded");
}

}  // namespace

int main(int argc, char** argv) {
  // --quick: real shapes above 28x28 only at reduced size; --isa NAME: that path only;
  // --threaded: only the cases whose work runs on real threads (for ThreadSanitizer)
  bool quick = false, threaded_only = false;
  std::string only;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--quick") {
      quick = true;
    } else if (arg == "--threaded") {
      threaded_only = true;
    } else if (arg == "--isa" && i + 1 < argc) {
      only = argv[++i];
    } else {
      std::printf("usage: test_core [--quick] [--threaded] [--isa scalar|avx2|avx512|neon]\n");
      return 2;
    }
  }
  // MobileNetV2-1.0 at 224: (cin, H, cout, t, stride) of the 17 blocks.
  const Case blocks[] = {
      {1, 32, 112, 112, 16, 1, 1},  {1, 16, 112, 112, 24, 6, 2}, {1, 24, 56, 56, 24, 6, 1},
      {1, 24, 56, 56, 32, 6, 2},    {1, 32, 28, 28, 32, 6, 1},   {1, 32, 28, 28, 32, 6, 1},
      {1, 32, 28, 28, 64, 6, 2},    {1, 64, 14, 14, 64, 6, 1},   {1, 64, 14, 14, 64, 6, 1},
      {1, 64, 14, 14, 64, 6, 1},    {1, 64, 14, 14, 96, 6, 1},   {1, 96, 14, 14, 96, 6, 1},
      {1, 96, 14, 14, 96, 6, 1},    {1, 96, 14, 14, 160, 6, 2},  {1, 160, 7, 7, 160, 6, 1},
      {1, 160, 7, 7, 160, 6, 1},    {1, 160, 7, 7, 320, 6, 1},
  };
  const Case awkward[] = {
      {2, 3, 1, 1, 3, 1, 1},  {3, 5, 1, 1, 7, 6, 2},  {2, 7, 7, 7, 7, 6, 1},   {1, 9, 13, 13, 11, 3, 2},
      {2, 13, 13, 5, 13, 6, 1}, {1, 17, 6, 13, 17, 1, 2}, {2, 11, 2, 9, 5, 4, 2}, {0, 8, 5, 5, 8, 6, 1},
      {1, 4, 14, 3, 4, 2, 1},
      // dilated (atrous) depthwise steps, as DeepLab's output strides 16 and 8 make them:
      // sides shorter than the taps' reach, bands and tiles narrower than it, t = 1
      {2, 7, 9, 11, 7, 6, 1, 2}, {1, 6, 10, 7, 8, 6, 2, 2}, {2, 5, 5, 13, 5, 1, 1, 4},
      {1, 8, 3, 2, 8, 6, 1, 4},  {1, 9, 12, 12, 9, 6, 1, 4}, {2, 4, 11, 6, 6, 3, 2, 3},
      // 5x5 and 7x7 depthwise steps, ReLU or ReLU6 (MNASNet's and EfficientNet-Lite's
      // blocks): t = 1 and t > 1, residual, stride 2, sides shorter than the taps' reach,
      // and dilated
      {2, 7, 9, 11, 7, 6, 1, 1, 5, false}, {1, 6, 10, 7, 8, 3, 2, 1, 5, true}, {2, 5, 5, 13, 5, 1, 1, 1, 5, false},
      {1, 8, 3, 2, 8, 6, 1, 1, 5, true},   {2, 9, 12, 12, 9, 6, 1, 1, 7, false}, {1, 4, 11, 6, 6, 3, 2, 1, 7, true},
      {2, 6, 4, 9, 6, 1, 2, 1, 7, false},  {1, 5, 2, 3, 5, 6, 1, 1, 7, false}, {1, 7, 13, 10, 7, 6, 1, 2, 5, false},
      {2, 4, 11, 12, 4, 2, 1, 3, 7, true}, {1, 10, 8, 8, 10, 6, 1, 1, 3, false},
  };
  auto run_all = [&](auto zero, const char* dtype) {
    using T = decltype(zero);
    for (Isa isa : kAllIsas) {
      if (!only.empty() && only != isa_name(isa)) continue;
      const KernelTable* kt = kernel_table(isa);
      if (kt == nullptr) {
        std::printf("skip %s %s: %s\n", isa_name(isa), dtype,
                    isa_compiled(isa) ? "this CPU lacks it" : "not compiled for this target");
        continue;
      }
      const int before = g_failures, checks_before = g_checks;
      // The 17 real shapes: forward on all, backward on the smaller ones (the
      // naive reference is slow), default plan with two tasks.
      for (const Case& c : blocks) {
        if (threaded_only || (quick && c.h > 28)) continue;
        const bool bwd = c.h * c.w * c.cin * c.t <= 28 * 28 * 32 * 6;
        PlanOverride ov;
        ov.tasks = 2;
        run_case<T>(*kt, c, Fmt::kNHWC, ov, std::string(isa_name(isa)) + " " + dtype + " " + describe(c) + " nhwc", bwd);
      }
      // Awkward shapes in every layout, under several forced tilings.
      const PlanOverride tilings[] = {
          {},                                       // the planner's choice
          {2, 1, 1, 0, 1, 3, false, 0, 1},          // column tiles, one-row bands, 3 tasks
          {3, 2, 2, 8, 2, 2, false, 0, 3},          // small hidden chunks (sum over chunks)
          {0, 3, 3, 0, 3, 4, true, 0, 2},           // multi-row steps, real threads
          {0, 0, 0, 8, 0, 3, false, 3},             // hidden splits, chunked within each
          {2, 2, 1, 0, 0, 2, true, 2},              // hidden splits with column tiles, threads
      };
      for (const Case& c : awkward) {
        for (Fmt f : {Fmt::kNCHW, Fmt::kNHWC, Fmt::kPadded}) {
          int k = 0;
          for (const PlanOverride& ov : tilings) {
            if (threaded_only && !ov.threaded) {
              ++k;
              continue;
            }
            run_case<T>(*kt, c, f, ov,
                     std::string(isa_name(isa)) + " " + dtype + " " + describe(c) + " " + fmt_name(f) + " tiling" +
                         std::to_string(k++),
                     true);
          }
        }
      }
      // Real shapes reduced to 7 rows, with forced bands and chunks, NCHW. With
      // --threaded: on threads, and only up to 32 input channels (the same code paths
      // as the wider ones, which take 10x longer under ThreadSanitizer).
      for (const Case& b : blocks) {
        if (threaded_only && b.cin > 32) continue;
        Case c = b;
        c.n = 2;
        c.h = 7;
        c.w = 9;
        run_case<T>(*kt, c, Fmt::kNCHW, {4, 2, 2, 16, 2, 3, threaded_only, 2},
                 std::string(isa_name(isa)) + " " + dtype + " " + describe(c) + " nchw forced", true);
      }
      // The tilings the planner chooses for other machines' caches (a 128 KiB L2: the
      // budget's floor, chunks of a few vectors; 2 MiB: whole splits), real shapes at 7x9.
      if (!threaded_only) {
        for (int64_t l2_kib : {128, 2048}) {
          for (const Case& b : blocks) {
            Case c = b;
            c.n = 2;
            c.h = 7;
            c.w = 9;
            PlanOverride ov;
            ov.tasks = 2;
            ov.caches = CacheSizes{32 * 1024, l2_kib * 1024, 4096 * 1024};
            run_case<T>(*kt, c, Fmt::kNHWC, ov,
                        std::string(isa_name(isa)) + " " + dtype + " " + describe(c) + " nhwc L2 " +
                            std::to_string(l2_kib) + " KiB",
                        false);
          }
        }
      }
      // Pointwise convolutions: the head's shape, then awkward ones (columns not a
      // multiple of the vector width, more rows than one tail chunk, single rows: the
      // matrix-vector path, four panels at a time and the rest).
      if (!threaded_only) {
        const int64_t pw[][3] = {{49, 320, 1280}, {1, 1, 1},   {7, 3, 5},     {70, 17, 21}, {130, 9, 40},
                                 {5, 33, 16},     {33, 10, 100}, {1, 37, 100}, {3, 9, 52}};
        for (const auto& d : pw) {
          for (Activation act : {Activation::kNone, Activation::kRelu, Activation::kRelu6}) {
            run_pointwise<T>(*kt, d[0], d[1], d[2], act,
                             std::string(isa_name(isa)) + " " + dtype + " pointwise " + std::to_string(d[0]) +
                                 "x" + std::to_string(d[1]) + "->" + std::to_string(d[2]) + " act" +
                                 std::to_string(static_cast<int>(act)));
            run_pointwise_mean<T>(*kt, d[0], d[1], d[2], act,
                                  std::string(isa_name(isa)) + " " + dtype + " pointwise mean " +
                                      std::to_string(d[0]) + "x" + std::to_string(d[1]) + "->" +
                                      std::to_string(d[2]) + " act" + std::to_string(static_cast<int>(act)));
          }
        }
      }
      // Fused stem + t == 1 block: MobileNetV2's (3 x 224 x 224 -> 32 -> 16), then awkward
      // sizes (odd image sides, channels not a multiple of the vector width, stride 2)
      // in every layout and several tilings.
      if (!threaded_only) {
        const std::string pre = std::string(isa_name(isa)) + " " + dtype + " stem ";
        if (!quick) {
          PlanOverride two;
          two.tasks = 2;
          run_stem_case<T>(*kt, 1, 3, 224, 224, 32, 16, 1, Fmt::kNHWC, two, pre + "3x224x224->32->16");
        }
        const int64_t sc[][7] = {{2, 3, 9, 7, 5, 3, 1}, {1, 2, 5, 4, 17, 9, 2}, {1, 3, 1, 1, 8, 8, 1},
                                 {2, 4, 13, 11, 16, 7, 1}};
        const PlanOverride tilings[] = {{}, {2, 1, 1, 0, 0, 3}, {3, 2, 2, 8, 0, 2}, {0, 0, 0, 8, 0, 3, false, 2}};
        for (const auto& d : sc) {
          for (Fmt f : {Fmt::kNCHW, Fmt::kNHWC, Fmt::kPadded}) {
            int k = 0;
            for (const PlanOverride& ov : tilings) {
              run_stem_case<T>(*kt, d[0], d[1], d[2], d[3], d[4], d[5], static_cast<int>(d[6]), f, ov,
                               pre + std::to_string(d[1]) + "x" + std::to_string(d[2]) + "x" +
                                   std::to_string(d[3]) + "->" + std::to_string(d[4]) + "->" +
                                   std::to_string(d[5]) + " s" + std::to_string(d[6]) + " " +
                                   fmt_name(f) + " tiling" + std::to_string(k++));
            }
          }
        }
      }
      std::printf("%s %s: %d checks, %d failures\n", isa_name(isa), dtype, g_checks - checks_before,
                  g_failures - before);
    }
  };
  if (!threaded_only) check_planner();
  run_all(float{}, "f32");
  run_all(double{}, "f64");
  if (g_checks == 0) {
    std::printf("FAILED: no ISA path ran%s\n", only.empty() ? "" : (" (--isa " + only + ")").c_str());
    return 1;
  }
  std::fflush(stdout);
  std::printf("%s (%d checks, %d failures)\n", g_failures ? "FAILED" : "OK", g_checks, g_failures);
  return g_failures ? 1 : 0;
}
