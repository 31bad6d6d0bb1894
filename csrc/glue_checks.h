// Argument checks shared by the ATen glue of every backend (csrc/cpu, csrc/cuda):
// each names the offending parameter and what was expected.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <array>
#include <cstdint>
#include <optional>
#include <string_view>

#include "core/fused_ir.h"

namespace mnv2 {
namespace glue {

using OptTensor = std::optional<at::Tensor>;

inline Strides4 strides_of(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

inline void check_param(const at::Tensor& p, const char* name, const at::Tensor& ref,
                        at::IntArrayRef expected) {
  TORCH_CHECK(p.device() == ref.device(), "mnv2: ", name, " is on ", p.device(), " but x is on ",
              ref.device());
  TORCH_CHECK(p.scalar_type() == ref.scalar_type(), "mnv2: ", name, " has dtype ", p.scalar_type(),
              " but x has dtype ", ref.scalar_type());
  TORCH_CHECK(p.sizes() == expected, "mnv2: ", name, " must have shape ", expected, ", got ",
              p.sizes());
}

// Validates the expand and depthwise weights against `ref` (x, whose device and dtype
// they must share) and returns their channel counts in a shape (cout 0).
inline BlockShape check_front_weights(const at::Tensor& ref, int64_t cin, const OptTensor& w_expand,
                                      const OptTensor& b_expand, const at::Tensor& w_dw) {
  TORCH_CHECK(w_expand.has_value() == b_expand.has_value(),
              "mnv2: w_expand and b_expand must be given together (or both omitted when t == 1)");
  TORCH_CHECK(w_dw.dim() == 3, "mnv2: w_dw must be 3-D (hidden, k, k), got ", w_dw.sizes());
  TORCH_CHECK(w_dw.size(1) == w_dw.size(2) && is_dw_kernel(static_cast<int>(w_dw.size(1))),
              "mnv2: the depthwise kernel must be 3x3, 5x5 or 7x7: w_dw must be (hidden, k, k) with k 3, 5 "
              "or 7, got ", w_dw.sizes());
  BlockShape s{};
  s.kernel = static_cast<int>(w_dw.size(1));
  s.cin = cin;
  s.hidden = w_dw.size(0);
  s.has_expand = w_expand.has_value();
  if (s.has_expand) {
    check_param(*w_expand, "w_expand", ref, {s.hidden, s.cin});
    check_param(*b_expand, "b_expand", ref, {s.hidden});
  } else {
    TORCH_CHECK(s.hidden == s.cin, "mnv2: without w_expand (t == 1) w_dw must have x's ", s.cin,
                " channels, got ", s.hidden);
  }
  check_param(w_dw, "w_dw", ref, {s.hidden, s.kernel, s.kernel});
  return s;
}

// check_front_weights, and the depthwise bias and the project's weights.
inline BlockShape check_weights(const at::Tensor& ref, int64_t cin, const OptTensor& w_expand,
                                const OptTensor& b_expand, const at::Tensor& w_dw,
                                const at::Tensor& b_dw, const at::Tensor& w_project,
                                const at::Tensor& b_project) {
  TORCH_CHECK(w_project.dim() == 2, "mnv2: w_project must be 2-D (Cout, hidden), got ",
              w_project.sizes());
  BlockShape s = check_front_weights(ref, cin, w_expand, b_expand, w_dw);
  s.cout = w_project.size(0);
  check_param(b_dw, "b_dw", ref, {s.hidden});
  check_param(w_project, "w_project", ref, {s.cout, s.hidden});
  check_param(b_project, "b_project", ref, {s.cout});
  return s;
}

// The depthwise kernel size of packed weights (which do not hold it in a shape).
inline void set_kernel(BlockShape& s, int64_t kernel_size) {
  TORCH_CHECK(kernel_size == 3 || kernel_size == 5 || kernel_size == 7,
              "mnv2: the depthwise kernel size must be 3, 5 or 7, got ", kernel_size);
  s.kernel = static_cast<int>(kernel_size);
}

// The block's activation (after the expand and after the depthwise step) by name.
inline void set_activation(BlockShape& s, std::string_view activation) {
  TORCH_CHECK(activation == "relu6" || activation == "relu",
              "mnv2: activation must be \"relu6\" or \"relu\", got \"", activation, "\"");
  s.relu6 = activation == "relu6";
}

// Completes `s` (whose kernel size is set) with x's geometry, the stride and the
// depthwise dilation.
inline void set_geometry(BlockShape& s, const at::Tensor& x, int64_t stride, int64_t dilation) {
  TORCH_CHECK(stride == 1 || stride == 2, "mnv2: stride must be 1 or 2, got ", stride);
  TORCH_CHECK(dilation >= 1 && dilation <= max_dilation(s.kernel), "mnv2: dilation must be between 1 and ",
              max_dilation(s.kernel), " for a ", s.kernel, "x", s.kernel, " depthwise kernel, got ", dilation);
  s.batch = x.size(0);
  s.in_h = x.size(2);
  s.in_w = x.size(3);
  s.stride = static_cast<int>(stride);
  s.dilation = static_cast<int>(dilation);
}

// Completes a block's `s` with x's geometry, the stride, the residual and the dilation,
// and validates it.
inline void finish_shape(BlockShape& s, const at::Tensor& x, int64_t stride, bool residual, int64_t dilation) {
  set_geometry(s, x, stride, dilation);
  TORCH_CHECK(!residual || (stride == 1 && s.cin == s.cout),
              "mnv2: residual needs stride 1 and Cin == Cout, got stride ", stride, ", Cin ", s.cin,
              ", Cout ", s.cout);
  s.residual = residual;
  const char* err = validate_shape(s);
  TORCH_CHECK(err == nullptr, "mnv2: ", err);
}

// The same for the depthwise statistics' shape (no project).
inline void finish_front_shape(BlockShape& s, const at::Tensor& x, int64_t stride, int64_t dilation) {
  set_geometry(s, x, stride, dilation);
  const char* err = validate_front(s);
  TORCH_CHECK(err == nullptr, "mnv2: ", err);
}

// grad_y of the block's backward: x's device and dtype, dense, the output's shape.
inline void check_grad_y(const at::Tensor& grad_y, const at::Tensor& x, const BlockShape& s) {
  TORCH_CHECK(grad_y.device() == x.device() && grad_y.scalar_type() == x.scalar_type(),
              "mnv2: grad_y must match x's device and dtype");
  const std::array<int64_t, 4> shape{s.batch, s.cout, s.out_h(), s.out_w()};
  const at::IntArrayRef expected(shape);
  TORCH_CHECK(grad_y.dim() == 4 && grad_y.layout() == at::kStrided && grad_y.sizes() == expected,
              "mnv2: grad_y must have shape ", expected, ", got ", grad_y.sizes());
}

}  // namespace glue
}  // namespace mnv2
