// CPU operators of the fused block: forward, backward, and the forward on weights
// packed once (inference).
#include <ATen/Dispatch.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <tuple>

#include "cpu/common.h"

namespace mnv2 {
namespace cpu {
namespace {

BlockShape check_block(const at::Tensor& x, const OptTensor& w_expand, const OptTensor& b_expand,
                       const at::Tensor& w_dw, const at::Tensor& b_dw, const at::Tensor& w_project,
                       const at::Tensor& b_project, int64_t stride, bool residual, int64_t dilation,
                       std::string_view activation) {
  check_x(x, "x", Dtypes::kKernelOrHalf);
  BlockShape s = glue::check_weights(x, x.size(1), w_expand, b_expand, w_dw, b_dw, w_project, b_project);
  glue::finish_shape(s, x, stride, residual, dilation);
  glue::set_activation(s, activation);
  return s;
}

at::Tensor fused_inverted_residual_cpu(const at::Tensor& x, const OptTensor& w_expand,
                                       const OptTensor& b_expand, const at::Tensor& w_dw,
                                       const at::Tensor& b_dw, const at::Tensor& w_project,
                                       const at::Tensor& b_project, int64_t stride, bool residual,
                                       int64_t dilation, std::string_view activation) {
  const BlockShape s = check_block(x, w_expand, b_expand, w_dw, b_dw, w_project, b_project, stride, residual,
                                   dilation, activation);
  if (is_half(x)) {  // (the weights have x's dtype: checked)
    return fused_inverted_residual_cpu(x.to(at::kFloat), float32_copy(w_expand), float32_copy(b_expand),
                                       w_dw.to(at::kFloat), b_dw.to(at::kFloat), w_project.to(at::kFloat),
                                       b_project.to(at::kFloat), stride, residual, dilation, activation)
        .to(x.scalar_type());
  }
  at::Tensor y = empty_output(s, x);
  if (s.batch == 0) return y;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mnv2_fused_forward", [&] {
    const Layout l = make_layout(s, kernels().get<scalar_t>().vl, Packing::kForward);
    const at::Tensor packed = pack_block<scalar_t>(s, l, Packing::kForward, dense_options(x), w_expand,
                                                   b_expand, w_dw, b_dw, w_project, b_project);
    run_forward<scalar_t>(s, l, x, packed, y);
  });
  return y;
}

at::Tensor pack_weights_cpu(const OptTensor& w_expand, const OptTensor& b_expand, const at::Tensor& w_dw,
                            const at::Tensor& b_dw, const at::Tensor& w_project, const at::Tensor& b_project) {
  TORCH_CHECK(w_dw.scalar_type() == at::kFloat || w_dw.scalar_type() == at::kDouble,
              "mnv2: the CPU kernel supports float32 and float64, got ", w_dw.scalar_type());
  const int64_t cin = w_expand.has_value() ? w_expand->size(-1) : w_dw.size(0);
  const BlockShape s = glue::check_weights(w_dw, cin, w_expand, b_expand, w_dw, b_dw, w_project, b_project);
  at::Tensor packed;
  AT_DISPATCH_FLOATING_TYPES(w_dw.scalar_type(), "mnv2_pack_weights", [&] {
    const Layout l = make_layout(s, kernels().get<scalar_t>().vl, Packing::kForward);
    packed = pack_block<scalar_t>(s, l, Packing::kForward, dense_options(w_dw), w_expand, b_expand, w_dw, b_dw,
                                  w_project, b_project);
  });
  return packed;
}

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// grad_x (x's memory format) and the weight gradients, to be written (reduce_grads
// writes every element); zeros for an empty batch, which has nothing to reduce. The
// expand's are empty when t == 1.
Grads alloc_grads(const BlockShape& s, const at::Tensor& x) {
  const at::TensorOptions opts = dense_options(x);
  const int64_t he = s.has_expand ? s.hidden : 0;
  auto make = [&](at::IntArrayRef size) { return s.batch == 0 ? at::zeros(size, opts) : at::empty(size, opts); };
  return {at::empty(x.sizes(), x.options().memory_format(x.suggest_memory_format())),
          make({he, s.has_expand ? s.cin : 0}),
          make({he}),
          make({s.hidden, s.kernel, s.kernel}),
          make({s.hidden}),
          make({s.cout, s.hidden}),
          make({s.cout})};
}

template <typename T>
void run_backward(const BlockShape& s, const at::Tensor& grad_y, const at::Tensor& x, const OptTensor& w_expand,
                  const OptTensor& b_expand, const at::Tensor& w_dw, const at::Tensor& b_dw,
                  const at::Tensor& w_project, const at::Tensor& b_project, Grads& out) {
  const Kernels<T>& k = kernels().get<T>();
  const Layout l = make_layout(s, k.vl, Packing::kBackward);
  const at::TensorOptions opts = dense_options(x);
  const at::Tensor packed =
      pack_block<T>(s, l, Packing::kBackward, opts, w_expand, b_expand, w_dw, b_dw, w_project, b_project);
  const BackwardPlan plan = plan_backward(s, l, at::get_num_threads());
  at::Tensor& gx = std::get<0>(out);
  at::Tensor side = at::empty({plan.side_floats}, opts);
  const BackwardArgs<T> args{s, l, x.const_data_ptr<T>(), glue::strides_of(x), grad_y.const_data_ptr<T>(),
                             glue::strides_of(grad_y), packed.const_data_ptr<T>(), gx.mutable_data_ptr<T>(),
                             glue::strides_of(gx), side.mutable_data_ptr<T>()};
  auto ptr = [](at::Tensor& t) { return t.numel() ? t.mutable_data_ptr<T>() : nullptr; };
  run_backward_tasks<T>(
      s, l, plan, opts,
      [&](int64_t begin, int64_t end, T* grads, T* scratch) { k.backward(args, plan, begin, end, grads, scratch); },
      ptr(std::get<1>(out)), ptr(std::get<2>(out)), ptr(std::get<3>(out)), ptr(std::get<4>(out)),
      ptr(std::get<5>(out)), ptr(std::get<6>(out)));
  backward_finish<T>(s, plan, args.side, args.gx, args.gxs);
}

Grads fused_inverted_residual_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x,
                                           const OptTensor& w_expand, const OptTensor& b_expand,
                                           const at::Tensor& w_dw, const at::Tensor& b_dw,
                                           const at::Tensor& w_project, const at::Tensor& b_project,
                                           int64_t stride, bool residual, int64_t dilation,
                                           std::string_view activation) {
  const BlockShape s = check_block(x, w_expand, b_expand, w_dw, b_dw, w_project, b_project, stride, residual,
                                   dilation, activation);
  glue::check_grad_y(grad_y, x, s);
  if (is_half(x)) {
    Grads g = fused_inverted_residual_backward_cpu(
        grad_y.to(at::kFloat), x.to(at::kFloat), float32_copy(w_expand), float32_copy(b_expand),
        w_dw.to(at::kFloat), b_dw.to(at::kFloat), w_project.to(at::kFloat), b_project.to(at::kFloat), stride,
        residual, dilation, activation);
    const at::ScalarType t = x.scalar_type();
    return {std::get<0>(g).to(t), std::get<1>(g).to(t), std::get<2>(g).to(t), std::get<3>(g).to(t),
            std::get<4>(g).to(t), std::get<5>(g).to(t), std::get<6>(g).to(t)};
  }
  Grads out = alloc_grads(s, x);
  if (s.batch == 0) {
    std::get<0>(out).zero_();
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mnv2_fused_backward", [&] {
    run_backward<scalar_t>(s, grad_y, x, w_expand, b_expand, w_dw, b_dw, w_project, b_project, out);
  });
  return out;
}

}  // namespace

at::Tensor fused_inverted_residual_packed_cpu(const at::Tensor& x, const at::Tensor& packed, int64_t hidden,
                                              int64_t cout, bool has_expand, int64_t stride, bool residual,
                                              int64_t dilation, int64_t kernel_size, std::string_view activation) {
  check_x(x);
  TORCH_CHECK(packed.device() == x.device() && packed.scalar_type() == x.scalar_type() && packed.dim() == 1 &&
                  packed.is_contiguous(),
              "mnv2: packed weights must be a contiguous 1-D tensor with x's device and dtype");
  BlockShape s{};
  s.cin = x.size(1);
  s.hidden = hidden;
  s.cout = cout;
  s.has_expand = has_expand;
  glue::set_kernel(s, kernel_size);
  glue::finish_shape(s, x, stride, residual, dilation);
  glue::set_activation(s, activation);
  at::Tensor y = empty_output(s, x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mnv2_fused_forward_packed", [&] {
    const Layout l = make_layout(s, kernels().get<scalar_t>().vl, Packing::kForward);
    TORCH_CHECK(packed.numel() == l.total && packed_matches<scalar_t>(s, l, packed.const_data_ptr<scalar_t>()),
                "mnv2: the packed weights were not packed for this block (Cin ", s.cin, ", hidden ", s.hidden,
                ", Cout ", s.cout, s.has_expand ? "" : ", no expand", ", ",
                s.kernel, "x", s.kernel, " depthwise",
                ") on this machine's kernel; re-pack them for this block");
    if (s.batch > 0) run_forward<scalar_t>(s, l, x, packed, y);
  });
  return y;
}

TORCH_LIBRARY_IMPL(mnv2, CPU, m) {
  m.impl("fused_inverted_residual", &fused_inverted_residual_cpu);
  m.impl("fused_inverted_residual_backward", &fused_inverted_residual_backward_cpu);
  m.impl("pack_weights", &pack_weights_cpu);
  m.impl("fused_inverted_residual_packed", &fused_inverted_residual_packed_cpu);
}

}  // namespace cpu
}  // namespace mnv2
