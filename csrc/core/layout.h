// Packed weights: how the BN-folded weights of a block (or a pointwise layer) are
// laid out in one buffer for the kernels, and the packing itself.
//
// One vocabulary for the weights everywhere (Python, glue, core, CUDA, Triton):
//   w_expand [hidden][cin], b_expand [hidden]      the 1x1 expand (absent when t == 1)
//   w_dw [hidden][k * k], b_dw [hidden]            the depthwise k x k (k = 3, 5 or 7)
//   w_project [cout][hidden], b_project [cout]     the 1x1 linear project
#pragma once

#include <cstdint>

#include "shape.h"

namespace mnv2 {

// What a packed block buffer is for: the forward reads the weights as the GEMMs
// stream them; the backward also needs transposed copies of the two 1x1 weights.
enum class Packing { kForward, kBackward };

// Channel counts padded to the kernel's vector width, and where each packed
// array lives inside one buffer (element offsets).
struct Layout {
  int64_t vl;                 // vector width in elements (the channel padding unit)
  int64_t hp, cin_p, cout_p;  // padded hidden / input / output channels (cout_p 0: no project)
  int64_t w_expand;     // [hp / vl][cin][vl]: panel-major, panel j = channels [j*vl, j*vl + vl)
  int64_t b_expand;     // [hp]
  int64_t w_dw;         // [k * k][hp]
  int64_t b_dw;         // [hp]
  int64_t w_project;    // [cout_p / vl][hp][vl]: panel-major over output channels
  int64_t b_project;    // [cout_p]
  int64_t w_expand_t;   // backward only: [cin_p / vl][hp][vl], panel-major
  int64_t w_project_t;  // backward only: [hp / vl][cout][vl], panel-major
  int64_t trailer;      // kBlockTrailer values, see PackedTag
  int64_t total;
};

// Packed buffers end with what they were packed for (a tag, then channel counts),
// so that weights packed for another shape with the same padded size are refused
// rather than misread. The tag values only need to differ from each other; they
// are exact in float, as are channel counts far below 2^24.
enum class PackedTag : int { kBlock = 7001, kBlockNoExpand = 7002, kPointwise = 7101 };
constexpr int64_t kBlockTrailer = 5;      // tag, cin, hidden, cout, depthwise kernel size
constexpr int64_t kPointwiseTrailer = 3;  // tag, cin, cout

// The expand arrays exist only when s.has_expand, the transposed copies only for
// Packing::kBackward, the project arrays only when s.has_project().
Layout make_layout(const BlockShape& s, int64_t vl, Packing packing);

// Repacks hidden channels [h_begin, h_end) of contiguous weights into `packed`
// (l.total elements); the range that ends at s.hidden also writes the padding and
// the trailer. Disjoint ranges may be packed concurrently. `packing` must be the
// layout's. Pointers of arrays the layout lacks are not read; a null b_dw packs
// zeros (the depthwise statistics are of the output before its bias).
// T is float or double here and below.
template <typename T>
void pack_weights(const BlockShape& s, const Layout& l, Packing packing, const T* w_expand,
                  const T* b_expand, const T* w_dw, const T* b_dw, const T* w_project,
                  const T* b_project, int64_t h_begin, int64_t h_end, T* packed);

// Whether a packed buffer's trailer says it was packed for this shape.
template <typename T>
bool packed_matches(const BlockShape& s, const Layout& l, const T* packed);

// Weight-gradient accumulators of the backward (one set per task), padded layout.
// The project's are empty without a project step.
struct GradLayout {
  int64_t g_w_expand_t;  // [cin][hp]
  int64_t g_b_expand;    // [hp]
  int64_t g_w_dw;        // [k * k][hp]
  int64_t g_b_dw;        // [hp]
  int64_t g_w_project;   // [cout][hp]
  int64_t g_b_project;   // [cout_p]
  int64_t total;
};
GradLayout make_grad_layout(const BlockShape& s, const Layout& l);

// A 1x1 convolution (the model's head, the classifier, the stem as an im2col GEMM):
// weights packed panel-major [cout_p / vl][cin][vl], then the bias [cout_p].
struct PointwiseLayout {
  int64_t vl, cin, cout, cout_p;
  int64_t w, b;
  int64_t trailer;  // kPointwiseTrailer values
  int64_t total;
};
PointwiseLayout make_pointwise_layout(int64_t cin, int64_t cout, int64_t vl);
// w [cout][cin], b [cout].
template <typename T>
void pack_pointwise(const PointwiseLayout& l, const T* w, const T* b, T* packed);
template <typename T>
bool packed_matches(const PointwiseLayout& l, const T* packed);

}  // namespace mnv2
