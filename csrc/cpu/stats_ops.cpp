// CPU operators of the depthwise statistics (train-mode bn2 statistics without the
// expansion in memory) and their backward.
#include <ATen/Dispatch.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <limits>
#include <tuple>

#include "cpu/common.h"

namespace mnv2 {
namespace cpu {
namespace {

// The shape of x's expand and depthwise steps (no project).
BlockShape check_front(const at::Tensor& x, const OptTensor& w_expand, const OptTensor& b_expand,
                       const at::Tensor& w_dw, int64_t stride, int64_t dilation, std::string_view activation) {
  check_x(x, "x", Dtypes::kKernelOrHalf);
  BlockShape s = glue::check_front_weights(x, x.size(1), w_expand, b_expand, w_dw);
  glue::finish_front_shape(s, x, stride, dilation);
  glue::set_activation(s, activation);
  return s;
}

// Mean and biased variance per hidden channel of z2 = dw(act(w_expand x + b_expand))
// (no depthwise bias): the statistics kernel recomputes z2 row by row and reduces it
// into per-task sums in double, summed in task order; nothing hidden-sized is stored.
// Results in x's dtype.
std::tuple<at::Tensor, at::Tensor> depthwise_moments_cpu(const at::Tensor& x, const OptTensor& w_expand,
                                                         const OptTensor& b_expand, const at::Tensor& w_dw,
                                                         int64_t stride, int64_t dilation,
                                                         std::string_view activation) {
  const BlockShape s = check_front(x, w_expand, b_expand, w_dw, stride, dilation, activation);
  if (is_half(x)) {  // statistics in float32 (the accumulation dtype), as for float32
    return depthwise_moments_cpu(x.to(at::kFloat), float32_copy(w_expand), float32_copy(b_expand),
                                 w_dw.to(at::kFloat), stride, dilation, activation);
  }
  const at::TensorOptions opts = dense_options(x);
  const int64_t count = s.batch * s.out_h() * s.out_w();
  if (count == 0) {  // as torch.var_mean over an empty set
    const at::Tensor nan = at::empty({s.hidden}, opts).fill_(std::numeric_limits<double>::quiet_NaN());
    return {nan, nan.clone()};
  }
  at::Tensor sums;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mnv2_depthwise_moments", [&] {
    const Kernels<scalar_t>& k = kernels().get<scalar_t>();
    const Layout l = make_layout(s, k.vl, Packing::kForward);
    const at::Tensor packed =
        pack_block<scalar_t>(s, l, Packing::kForward, opts, w_expand, b_expand, w_dw, {}, {}, {});
    const StatsPlan plan = plan_stats(s, l, at::get_num_threads());
    const StatsArgs<scalar_t> args{s, l, x.const_data_ptr<scalar_t>(), glue::strides_of(x),
                                   packed.const_data_ptr<scalar_t>()};
    const int64_t items = plan.items(s);
    const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), items));
    at::Tensor task_sums = at::zeros({tasks, 2 * l.hp}, opts.dtype(at::kDouble));
    double* base = task_sums.mutable_data_ptr<double>();
    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
      scalar_t* scratch = thread_scratch<scalar_t>(plan.scratch_floats);
      for (int64_t t = begin; t < end; ++t) {
        k.stats(args, plan, items * t / tasks, items * (t + 1) / tasks, base + t * 2 * l.hp, scratch);
      }
    });
    sums = task_sums.sum(0);
  });
  const int64_t hp = sums.size(0) / 2;
  const at::Tensor mean = sums.narrow(0, 0, s.hidden).div(static_cast<double>(count));
  // E[z^2] - E[z]^2 from double sums: the cancellation costs double's precision, not float's
  const at::Tensor var =
      sums.narrow(0, hp, s.hidden).div(static_cast<double>(count)).sub(mean.mul(mean)).clamp_min(0);
  return {mean.to(x.scalar_type()), var.to(x.scalar_type())};
}

// Gradients of depthwise_moments' inputs for grad_z2 = alpha + beta * z2 per hidden
// channel (alpha and beta carry the incoming gradients of the mean and the variance).
// Recomputes row by row; nothing hidden-sized is allocated.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> depthwise_moments_backward_cpu(
    const at::Tensor& x, const OptTensor& w_expand, const OptTensor& b_expand, const at::Tensor& w_dw,
    int64_t stride, const at::Tensor& alpha, const at::Tensor& beta, int64_t dilation,
    std::string_view activation) {
  const BlockShape s = check_front(x, w_expand, b_expand, w_dw, stride, dilation, activation);
  if (is_half(x)) {  // alpha and beta in float32 (the statistics' dtype) or x's
    auto g = depthwise_moments_backward_cpu(x.to(at::kFloat), float32_copy(w_expand), float32_copy(b_expand),
                                            w_dw.to(at::kFloat), stride, alpha.to(at::kFloat),
                                            beta.to(at::kFloat), dilation, activation);
    const at::ScalarType t = x.scalar_type();
    return {std::get<0>(g).to(t), std::get<1>(g).to(t), std::get<2>(g).to(t), std::get<3>(g).to(t)};
  }
  TORCH_CHECK(alpha.dim() == 1 && alpha.size(0) == s.hidden && beta.dim() == 1 && beta.size(0) == s.hidden,
              "mnv2: alpha and beta must be (hidden,) = (", s.hidden, ",) vectors, got ", alpha.sizes(), " and ",
              beta.sizes());
  TORCH_CHECK(alpha.scalar_type() == x.scalar_type() && beta.scalar_type() == x.scalar_type() &&
                  alpha.device() == x.device() && beta.device() == x.device(),
              "mnv2: alpha and beta must match x's dtype and device");
  const at::TensorOptions opts = dense_options(x);
  const int64_t he = s.has_expand ? s.hidden : 0;
  auto make = [&](at::IntArrayRef size) { return s.batch == 0 ? at::zeros(size, opts) : at::empty(size, opts); };
  at::Tensor g_x = at::empty(x.sizes(), x.options().memory_format(x.suggest_memory_format()));
  at::Tensor g_w_expand = make({he, s.has_expand ? s.cin : 0}), g_b_expand = make({he});
  at::Tensor g_w_dw = make({s.hidden, s.kernel, s.kernel});
  if (s.batch == 0) return {g_x.zero_(), g_w_expand, g_b_expand, g_w_dw};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mnv2_depthwise_moments_backward", [&] {
    const Kernels<scalar_t>& k = kernels().get<scalar_t>();
    const Layout l = make_layout(s, k.vl, Packing::kBackward);
    const at::Tensor packed =
        pack_block<scalar_t>(s, l, Packing::kBackward, opts, w_expand, b_expand, w_dw, {}, {}, {});
    // alpha and beta padded to the layout's hidden width with zeros
    at::Tensor alpha_p = at::zeros({l.hp}, opts), beta_p = at::zeros({l.hp}, opts);
    alpha_p.narrow(0, 0, s.hidden).copy_(alpha);
    beta_p.narrow(0, 0, s.hidden).copy_(beta);
    const BackwardPlan plan = plan_backward(s, l, at::get_num_threads());
    at::Tensor side = at::empty({plan.side_floats}, opts);
    const StatsBackwardArgs<scalar_t> args{
        s, l, x.const_data_ptr<scalar_t>(), glue::strides_of(x), packed.const_data_ptr<scalar_t>(),
        alpha_p.const_data_ptr<scalar_t>(), beta_p.const_data_ptr<scalar_t>(), g_x.mutable_data_ptr<scalar_t>(),
        glue::strides_of(g_x), side.mutable_data_ptr<scalar_t>()};
    auto ptr = [](at::Tensor& t) { return t.numel() ? t.mutable_data_ptr<scalar_t>() : nullptr; };
    run_backward_tasks<scalar_t>(
        s, l, plan, opts,
        [&](int64_t begin, int64_t end, scalar_t* grads, scalar_t* scratch) {
          k.stats_backward(args, plan, begin, end, grads, scratch);
        },
        ptr(g_w_expand), ptr(g_b_expand), ptr(g_w_dw), nullptr, nullptr, nullptr);
    backward_finish<scalar_t>(s, plan, args.side, args.gx, args.gxs);
  });
  return {g_x, g_w_expand, g_b_expand, g_w_dw};
}

}  // namespace

TORCH_LIBRARY_IMPL(mnv2, CPU, m) {
  m.impl("depthwise_moments", &depthwise_moments_cpu);
  m.impl("depthwise_moments_backward", &depthwise_moments_backward_cpu);
}

}  // namespace cpu
}  // namespace mnv2
