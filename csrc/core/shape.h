// The geometry of one inverted-residual block and how tensors are addressed.
#pragma once

#include <cstdint>

namespace mnv2 {

// The depthwise convolution: k x k taps (k = BlockShape::kernel, one of 3, 5 and 7),
// padding k / 2 on each side at dilation 1, so an output row reads k input rows. A
// dilated (atrous) depthwise step spaces its taps `dilation` pixels apart and pads by
// dilation * (k / 2), which keeps the output size of dilation 1. The kernels unroll the
// taps for each kernel size; arrays of rows or taps are sized for the largest.
constexpr int kMaxDwKernel = 7;
constexpr int kMaxDwTaps = kMaxDwKernel * kMaxDwKernel;
constexpr bool is_dw_kernel(int k) { return k == 3 || k == 5 || k == 7; }

// MobileNetV2's first convolution, which the core can fuse into the first block
// (StemSource): kStemKernel x kStemKernel, stride kStemStride, padding kStemPad.
constexpr int kStemKernel = 3;
constexpr int kStemTaps = kStemKernel * kStemKernel;
constexpr int kStemStride = 2;
constexpr int kStemPad = kStemKernel / 2;

// Element strides of an (N, C, H, W) tensor.
struct Strides4 {
  int64_t n, c, h, w;
};

struct BlockShape {
  int64_t batch, in_h, in_w;
  int64_t cin, hidden;
  int64_t cout;     // 0 only for the depthwise statistics, which stop before the project
  int stride;       // 1 or 2
  bool has_expand;  // false when t == 1 (then hidden == cin)
  bool residual;    // requires stride == 1 and cin == cout
  int dilation = 1;  // of the depthwise taps: dw_span() at most kMaxDwSpan
  int kernel = 3;    // of the depthwise step: 3, 5 or 7
  bool relu6 = true;  // the activation after the expand and the depthwise: ReLU6, else ReLU
  int64_t dw_taps() const { return int64_t{kernel} * kernel; }
  // padding of the depthwise step, and the input rows (or columns) one output row spans
  int64_t dw_pad() const { return int64_t{dilation} * (kernel / 2); }
  int64_t dw_span() const { return int64_t{dilation} * (kernel - 1) + 1; }
  int64_t out_h() const { return (in_h + 2 * dw_pad() - dw_span()) / stride + 1; }
  int64_t out_w() const { return (in_w + 2 * dw_pad() - dw_span()) / stride + 1; }
  bool has_project() const { return cout > 0; }
  // Input rows first_input_row(r) + ky * dilation, ky in [0, kernel), feed output
  // row r (rows outside the image read as zero); the same holds for columns.
  int64_t first_input_row(int64_t r) const { return r * stride - dw_pad(); }
};

// The widest depthwise span, dilation * (kernel - 1) + 1: a backward step's window of
// rows (kMaxBackwardSlots) must hold one output row's span. It allows dilations up to 31
// at 3x3, 15 at 5x5 and 10 at 7x7.
constexpr int kMaxDwSpan = 63;
constexpr int max_dilation(int kernel) { return (kMaxDwSpan - 1) / (kernel - 1); }

// Return nullptr when the shape is valid, else a message naming the problem:
// validate_shape for a whole block, validate_front for the depthwise statistics
// (cout 0, no residual).
const char* validate_shape(const BlockShape& s);
const char* validate_front(const BlockShape& s);

}  // namespace mnv2
