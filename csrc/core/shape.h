// The geometry of one inverted-residual block and how tensors are addressed.
#pragma once

#include <cstdint>

namespace mnv2 {

// The depthwise convolution: kDwKernel x kDwKernel taps, padding kDwPad on each
// side at dilation 1, so an output row reads kDwKernel input rows. Only 3x3 is built
// today; the kernels and layouts are written in terms of these constants. A dilated
// (atrous) depthwise step spaces its taps `dilation` pixels apart and pads by
// dilation * kDwPad, which keeps the output size of dilation 1.
constexpr int kDwKernel = 3;
constexpr int kDwTaps = kDwKernel * kDwKernel;
constexpr int kDwPad = kDwKernel / 2;

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
  int dilation = 1;  // of the depthwise taps, 1 to kMaxDilation
  // padding of the depthwise step, and the input rows (or columns) one output row spans
  int64_t dw_pad() const { return int64_t{dilation} * kDwPad; }
  int64_t dw_span() const { return int64_t{dilation} * (kDwKernel - 1) + 1; }
  int64_t out_h() const { return (in_h + 2 * dw_pad() - dw_span()) / stride + 1; }
  int64_t out_w() const { return (in_w + 2 * dw_pad() - dw_span()) / stride + 1; }
  bool has_project() const { return cout > 0; }
  // Input rows first_input_row(r) + ky * dilation, ky in [0, kDwKernel), feed output
  // row r (rows outside the image read as zero); the same holds for columns.
  int64_t first_input_row(int64_t r) const { return r * stride - dw_pad(); }
};

// The largest depthwise dilation: a backward step's window of rows
// (kMaxBackwardSlots) must hold one output row's span.
constexpr int kMaxDilation = 31;

// Return nullptr when the shape is valid, else a message naming the problem:
// validate_shape for a whole block, validate_front for the depthwise statistics
// (cout 0, no residual).
const char* validate_shape(const BlockShape& s);
const char* validate_front(const BlockShape& s);

}  // namespace mnv2
