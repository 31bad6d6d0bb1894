// Every operator schema of the mnv2 library. Backends add implementations with
// TORCH_LIBRARY_IMPL(mnv2, <Backend>, m) (csrc/cpu, csrc/cuda); the Python side adds
// fake kernels, autograd and FLOP formulas (mnv2_kernels/ops.py).
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

TORCH_LIBRARY(mnv2, m) {
  // y = w_project act(dw(act(w_expand x + b_expand), stride) + b_dw) + b_project (+ x),
  // all BN folded; dw the depthwise k x k convolution (k = 3, 5 or 7, from w_dw's shape)
  // with its taps `dilation` pixels apart (atrous), padding dilation * (k // 2); act
  // "relu6" or "relu".
  //   x [N, Cin, H, W]; w_expand [hidden, Cin] and b_expand [hidden], both absent when t == 1;
  //   w_dw [hidden, k, k]; b_dw [hidden]; w_project [Cout, hidden]; b_project [Cout].
  // The output keeps the input's memory format.
  m.def(
      "fused_inverted_residual(Tensor x, Tensor? w_expand, Tensor? b_expand, Tensor w_dw, "
      "Tensor b_dw, Tensor w_project, Tensor b_project, int stride, bool residual, int dilation=1, "
      "str activation=\"relu6\") -> Tensor",
      {at::Tag::pt2_compliant_tag});
  // Gradients of the above for grad_y; recomputes the hidden activations row by row.
  // grad_w_expand and grad_b_expand are empty when t == 1.
  m.def(
      "fused_inverted_residual_backward(Tensor grad_y, Tensor x, Tensor? w_expand, "
      "Tensor? b_expand, Tensor w_dw, Tensor b_dw, Tensor w_project, Tensor b_project, "
      "int stride, bool residual, int dilation=1, str activation=\"relu6\") -> (Tensor grad_x, "
      "Tensor grad_w_expand, Tensor grad_b_expand, "
      "Tensor grad_w_dw, Tensor grad_b_dw, Tensor grad_w_project, Tensor grad_b_project)",
      {at::Tag::pt2_compliant_tag});
  // Inference with cached weights: pack_weights folds nothing, it only lays the
  // (already BN-folded) weights out for this machine's CPU kernel; the result
  // is opaque and valid for this process's ISA and dtype. The packed forward has
  // no autograd.
  m.def(
      "pack_weights(Tensor? w_expand, Tensor? b_expand, Tensor w_dw, Tensor b_dw, "
      "Tensor w_project, Tensor b_project) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "fused_inverted_residual_packed(Tensor x, Tensor packed, int hidden, int cout, "
      "bool has_expand, int stride, bool residual, int dilation=1, int kernel_size=3, "
      "str activation=\"relu6\") -> Tensor",
      {at::Tag::pt2_compliant_tag});
  // Pointwise (1x1) convolution for inference with cached weights, the model's head:
  // y = act(conv1x1(x, weight) + bias), act 0 none, 1 ReLU, 2 ReLU6. weight (cout, cin)
  // and bias (cout,) are packed once for this machine's CPU kernel (opaque result); x
  // must be channels_last, and so is y. No autograd.
  m.def("pack_pointwise(Tensor weight, Tensor bias) -> Tensor", {at::Tag::pt2_compliant_tag});
  m.def("pointwise_conv_packed(Tensor x, Tensor packed, int cout, int activation) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  // MobileNetV2's stem and first block in one pass, for inference with cached weights:
  // y = block(relu6(conv(image, k x k, stride 2, padding 1) + b)) for a block without
  // expansion or residual (the stem: k = 3). stem_packed is pack_pointwise of the stem
  // weight laid out as a (channels, k * k * C) matrix, column (kh * k + kw) * C + c;
  // packed is the block's pack_weights. The stem's output is never stored. No autograd.
  m.def(
      "stem_block_packed(Tensor image, Tensor stem_packed, Tensor packed, int channels, int cout, "
      "int stride) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  // The head and global average pooling in one pass, for inference with cached
  // weights: (N, cout) = mean over (H, W) of act(conv1x1(x) + bias), weights from
  // pack_pointwise, x channels_last. The head's output is never stored. No autograd.
  m.def("pointwise_conv_mean_packed(Tensor x, Tensor packed, int cout, int activation) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  // MobileNetV2's whole inference on packed weights in one call: stem_block_packed
  // (first_args: channels, cout, stride), then fused_inverted_residual_packed per block
  // (block_args: hidden, cout, has_expand, stride, residual, dilation, kernel_size and relu6
  // (1: ReLU6, 0: ReLU) for each), then
  // pointwise_conv_mean_packed (head_args: cout, activation), then the classifier as
  // pointwise_conv_packed on the pooled rows -> (N, classes). No autograd.
  m.def(
      "mobilenet_v2_packed(Tensor image, Tensor stem_packed, Tensor first_packed, int[] first_args, "
      "Tensor[] blocks, int[] block_args, Tensor head_packed, int[] head_args, "
      "Tensor classifier_packed, int classes) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  // Batch statistics for train-mode batch norm without the hidden tensor in
  // autograd: each op saves only its inputs and recomputes in its backward.
  // Per-channel mean and biased covariance of x over (N, H, W): bn1's statistics
  // follow as W mean and diag(W cov W^T).
  m.def("channel_moments(Tensor x) -> (Tensor mean, Tensor cov)", {at::Tag::pt2_compliant_tag});
  // bn1's statistics from x's: mean = w mean_x (+ b) and var = diag(w cov_x w^T), in
  // cov_x's dtype (w: (hidden, C), b: (hidden,)). An operator of its own so that, like
  // torch's batch norm, the statistics count no FLOPs in FlopCounterMode.
  m.def("project_moments(Tensor mean, Tensor cov, Tensor w, Tensor? b) -> (Tensor mean, Tensor var)",
        {at::Tag::pt2_compliant_tag});
  // Per-channel mean and biased variance over (N, Ho, Wo) of the depthwise output
  // (before its bias) of act(w_expand x + b_expand): bn2's statistics.
  m.def(
      "depthwise_moments(Tensor x, Tensor? w_expand, Tensor? b_expand, Tensor w_dw, int stride, "
      "int dilation=1, str activation=\"relu6\") "
      "-> (Tensor mean, Tensor var)",
      {at::Tag::pt2_compliant_tag});
  // Gradients of depthwise_moments' inputs for grad_z2 = alpha + beta * z2 (alpha, beta:
  // (hidden,) vectors formed from the incoming gradients of mean and var). CPU kernel: the
  // fused backward kernel with the project step replaced; recomputes, allocates nothing
  // hidden-sized.
  m.def(
      "depthwise_moments_backward(Tensor x, Tensor? w_expand, Tensor? b_expand, Tensor w_dw, "
      "int stride, Tensor alpha, Tensor beta, int dilation=1, str activation=\"relu6\") -> (Tensor grad_x, "
      "Tensor grad_w_expand, "
      "Tensor grad_b_expand, Tensor grad_w_dw)",
      {at::Tag::pt2_compliant_tag});
}

// The inference-only operators have no derivative: differentiating through
// them raises "derivative for ... is not implemented" instead of silently
// dropping gradients, and the forward stays in C++ (no Python autograd hop).
TORCH_LIBRARY_IMPL(mnv2, Autograd, m) {
  m.impl("pack_weights", torch::autograd::autogradNotImplementedFallback());
  m.impl("fused_inverted_residual_packed", torch::autograd::autogradNotImplementedFallback());
  m.impl("pack_pointwise", torch::autograd::autogradNotImplementedFallback());
  m.impl("pointwise_conv_packed", torch::autograd::autogradNotImplementedFallback());
  m.impl("stem_block_packed", torch::autograd::autogradNotImplementedFallback());
  m.impl("pointwise_conv_mean_packed", torch::autograd::autogradNotImplementedFallback());
  m.impl("mobilenet_v2_packed", torch::autograd::autogradNotImplementedFallback());
}
