// Fused MobileNetV2 inverted-residual block on raw pointers (no torch).
//
//   a1 = relu6(We x + be)              (skipped when t == 1: a1 = x)
//   a2 = relu6(dw3x3(a1, stride) + bd)
//   y  = Wp a2 + bp (+ x)
//
// The hidden tensor a1/a2 never exists in full: rows of it are produced into a
// per-thread ring of three rows and consumed immediately (paper section 5.1).
// Tensors are addressed through element strides, so NCHW, channels_last and
// arbitrary strided views are all read and written in place.
#pragma once

#include <cstddef>
#include <cstdint>

namespace mnv2 {

enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kNeon = 3 };
const char* isa_name(Isa isa);

// Element strides of an (N, C, H, W) tensor.
struct Strides4 {
  int64_t n, c, h, w;
};

struct BlockShape {
  int64_t batch, in_h, in_w;
  int64_t cin, hidden, cout;
  int stride;       // 1 or 2
  bool has_expand;  // false when t == 1 (then hidden == cin)
  bool residual;    // requires stride == 1 and cin == cout
  int64_t out_h() const { return (in_h - 1) / stride + 1; }
  int64_t out_w() const { return (in_w - 1) / stride + 1; }
};

// Returns nullptr when the shape is valid, else a message naming the problem.
const char* validate_shape(const BlockShape& s);

// Channel counts padded to the kernel's vector width, and where each packed
// weight lives inside one float buffer.
struct Layout {
  int64_t vl;                // vector width in floats (channel padding unit)
  int64_t hp, cin_p, cout_p; // padded hidden / input / output channels
  // forward weights
  int64_t we_kn;  // expand  [hp / vl][cin][vl]: panel-major, panel j = channels [j*vl, j*vl + vl)
  int64_t be;     // [hp]
  int64_t wd;     // depthwise [9][hp]
  int64_t bd;     // [hp]
  int64_t wp_kn;  // project [cout_p / vl][hp][vl]: panel-major over output channels
  int64_t bp;     // [cout_p]
  // transposed copies used by the backward
  int64_t we_nk;  // expand  [cin_p / vl][hp][vl]: panel-major
  int64_t wp_nk;  // project [hp / vl][cout][vl]: panel-major
  int64_t trailer;  // kBlockTrailer values: a tag, then cin, hidden, cout (see packed_matches)
  int64_t total;
};
// The packed buffers end with what they were packed for, so that weights packed for
// another shape with the same padded size are refused rather than misread.
constexpr int64_t kBlockTrailer = 4, kPointwiseTrailer = 3;
constexpr double kBlockTag = 7001, kBlockTagNoExpand = 7002, kPointwiseTag = 7101;
// The transposed copies (we_nk, wp_nk) are laid out only `for_backward`, and
// the expand arrays only when s.has_expand.
Layout make_layout(const BlockShape& s, int64_t vl, bool for_backward);

// Weight-gradient accumulators (one set per backward task), padded layout.
struct GradLayout {
  int64_t g_weT;  // [cin][hp]
  int64_t g_be;   // [hp]
  int64_t g_wd;   // [9][hp]
  int64_t g_bd;   // [hp]
  int64_t g_wp;   // [cout][hp]
  int64_t g_bp;   // [cout_p]
  int64_t total;
};
GradLayout make_grad_layout(const BlockShape& s, const Layout& l);

// Repacks hidden channels [h_begin, h_end) of contiguous weights into
// `packed` (l.total elements); the range that ends at s.hidden also writes the
// padding. Disjoint ranges may be packed concurrently. `for_backward` must
// match the layout's (it also writes the transposed copies).
//   w_expand [hidden][cin] (ignored when !has_expand), b_expand [hidden],
//   w_dw [hidden][9], b_dw [hidden], w_project [cout][hidden], b_project [cout]
// T is float or double here and below.
template <typename T>
void pack_weights(const BlockShape& s, const Layout& l, const T* w_expand, const T* b_expand,
                  const T* w_dw, const T* b_dw, const T* w_project, const T* b_project,
                  bool for_backward, int64_t h_begin, int64_t h_end, T* packed);

// Packed pointwise (1x1) weights, see pack_pointwise below.
struct PointwiseLayout {
  int64_t vl, cin, cout, cout_p;
  int64_t w, b;
  int64_t trailer;  // kPointwiseTrailer values: a tag, cin, cout
  int64_t total;
};

// Work split of the forward: items are (image, row band, column tile, hidden
// split). Hidden splits (for small images, where the weights dominate) each
// compute a partial output over their share of the hidden channels into a
// partial buffer that reduce_forward_splits sums in split order.
struct ForwardPlan {
  int64_t rows_per_band, n_bands;
  int64_t cols_per_tile, n_col_tiles;
  int64_t n_splits, split_channels;  // hidden channels per split (multiple of vl)
  int64_t partial_floats;            // whole partial buffer when n_splits > 1
  int64_t rows_per_step;   // output rows whose project is one GEMM
  int64_t hidden_chunk;    // hidden channels per pass (multiple of vl); < hp splits the
                           // block into a sum over chunks (paper section 5.1)
  int64_t window_slots;    // expanded rows held: (rows_per_step - 1) * stride + 3
  int64_t window_cols;     // input columns held at most per tile
  int64_t stem_k = 0;      // with a fused stem: its im2col row length (9 x image channels)
  int64_t scratch_floats;  // per thread, in elements
  int64_t items(const BlockShape& s) const { return s.batch * n_bands * n_col_tiles * n_splits; }
};
// `threads` is how many workers will share the items; the scratch budget keeps
// the ring of expanded rows in L2.
ForwardPlan plan_forward(const BlockShape& s, const Layout& l, int threads);
// Re-derives the dependent fields after a caller overrides the tile sizes.
void finish_forward_plan(const BlockShape& s, const Layout& l, ForwardPlan* p);

template <typename T>
struct ForwardArgs {
  BlockShape shape;
  Layout layout;
  const T* x;
  Strides4 xs;
  const T* packed;
  T* y;
  Strides4 ys;
  T* partial;  // plan.partial_floats elements when plan.n_splits > 1, else unused
  // Fused stem (MobileNetV2's first convolution), optional. When `stem` is set the
  // block (t == 1, no residual) does not read x: each input row it needs is
  // computed from `image` (N, C, H, W; element strides `is`) as
  //   x = relu6(conv3x3(image, stride 2, padding 1) + b),
  // with the weights packed by pack_pointwise as a (s.cin, 9 C) matrix whose
  // column (kh * 3 + kw) * C + c holds w[:, c, kh, kw] (stem_layout). The block's
  // input size is the convolution's output size. plan.stem_k must be 9 C.
  const T* image = nullptr;
  Strides4 is{};
  int64_t image_c = 0, image_h = 0, image_w = 0;
  const T* stem = nullptr;
  PointwiseLayout stem_layout{};
};

// With hidden splits: y = sum of the partial outputs (+ x) for output rows
// [row_begin, row_end) of the flattened (image, row) range. Call after every
// forward item is done; disjoint ranges may run concurrently.
template <typename T>
void reduce_forward_splits(const ForwardArgs<T>& a, const ForwardPlan& p, int64_t row_begin,
                           int64_t row_end);

// Work split of the backward: items are (image, row band). Bands span whole
// rows; an input row shared by two bands is written by the first and the
// second band's share goes to a side buffer added in backward_finish.
constexpr int64_t kMaxBackwardSlots = 64;  // bound of BackwardPlan::window_slots
struct BackwardPlan {
  int64_t rows_per_band, n_bands;
  int64_t rows_per_step;        // output rows whose project GEMMs run as one
  int64_t window_slots;         // a1 rows held: (rows_per_step - 1) * stride + 3
  int64_t scratch_floats;       // per thread
  int64_t pending_pixels;       // pixels gathered per weight-gradient update
  int64_t side_rows_per_item;   // 3 - stride
  int64_t side_floats;          // whole side buffer
  int64_t items(const BlockShape& s) const { return s.batch * n_bands; }
};
BackwardPlan plan_backward(const BlockShape& s, const Layout& l, int threads);
void finish_backward_plan(const BlockShape& s, const Layout& l, BackwardPlan* p);

template <typename T>
struct BackwardArgs {
  BlockShape shape;
  Layout layout;
  const T* x;
  Strides4 xs;
  const T* gy;
  Strides4 gys;
  const T* packed;
  T* gx;  // may be null when the input gradient is not needed
  Strides4 gxs;
  T* side;  // plan.side_floats elements, only used when gx != nullptr
  // Moments mode (the backward of batch statistics of the depthwise output):
  // when non-null, grad_z2 = alpha + beta * z2 per channel (hp-padded arrays)
  // replaces the project step; gy, w_project and b_project are not used, and
  // b_dw must be zero (the statistics are of the depthwise output before its bias).
  const T* moment_alpha = nullptr;
  const T* moment_beta = nullptr;
  // Statistics mode (the forward of those batch statistics): when non-null, the
  // kernel only recomputes z2 (b_dw must be zero) and adds, per hidden channel c,
  // sum z2 to moment_sums[c] and sum z2^2 to moment_sums[hp + c], in double; no
  // gradient is touched. One [2][hp] array per task, so tasks never share one.
  double* moment_sums = nullptr;
};

// Adds the side-buffer rows into gx. Serial; call after every item is done.
template <typename T>
void backward_finish(const BackwardArgs<T>& a, const BackwardPlan& p);

// Sums `tasks` partial gradient buffers in order (deterministic) and writes
// the unpadded gradients of hidden channels [h_begin, h_end) (the range that
// starts at 0 also writes g_bp); disjoint ranges may run concurrently. Any
// output pointer may be null.
//   g_we [hidden][cin], g_be [hidden], g_wd [hidden][9], g_bd [hidden],
//   g_wp [cout][hidden], g_bp [cout]
template <typename T>
void reduce_grads(const BlockShape& s, const Layout& l, const T* partials, int64_t tasks,
                  int64_t h_begin, int64_t h_end, T* g_we, T* g_be, T* g_wd, T* g_bd, T* g_wp,
                  T* g_bp);

// 1x1 convolution (the model's head, or any pointwise layer) on rows of channels:
//   y[m][o] = act(sum_c x[m][c] w[o][c] + b[o]),  act: none, ReLU or ReLU6.
// The weights are packed panel-major [cout_p / vl][cin][vl], then the bias [cout_p].
enum class Activation { kNone = 0, kRelu = 1, kRelu6 = 2 };
PointwiseLayout make_pointwise_layout(int64_t cin, int64_t cout, int64_t vl);
template <typename T>
void pack_pointwise(const PointwiseLayout& l, const T* w, const T* b, T* packed);
// Whether packed buffers' trailers say they were packed for this layout's shape.
template <typename T>
bool packed_matches(const BlockShape& s, const Layout& l, const T* packed);
template <typename T>
bool packed_matches(const PointwiseLayout& l, const T* packed);
template <typename T>
struct PointwiseArgs {
  PointwiseLayout layout;
  Activation act;
  const T* x;   // rows of cin channels, row stride ldx
  int64_t ldx;
  const T* packed;
  T* y;         // rows of cout channels, row stride ldy
  int64_t ldy;
};
// Scratch (elements) of one pointwise call: the tail panel when cout is not a
// multiple of vl goes through it.
constexpr int64_t kPointwiseScratch = 64 * 16;
// A pointwise mean (Kernels::pointwise_mean) covers at most kPoolCols output channels
// and computes its rows kPoolScratch / kPoolCols at a time through scratch.
constexpr int64_t kPoolCols = 64;
constexpr int64_t kPoolScratch = 32 * kPoolCols;

// The kernels of one instruction set for one element type.
template <typename T>
struct Kernels {
  int64_t vl;  // vector width in elements: the Layout's padding unit
  // Processes forward items [begin, end). scratch: plan.scratch_floats elements.
  void (*forward)(const ForwardArgs<T>& a, const ForwardPlan& p, int64_t begin, int64_t end,
                  T* scratch);
  // Processes backward items [begin, end), accumulating weight gradients into
  // grads (GradLayout::total elements, zeroed by the caller).
  void (*backward)(const BackwardArgs<T>& a, const BackwardPlan& p, int64_t begin, int64_t end,
                   T* grads, T* scratch);
  // Rows [m0, m1) and output channels [n0, n1) of a pointwise convolution; n0 is a
  // multiple of vl, n1 one too or cout. scratch: kPointwiseScratch elements.
  void (*pointwise)(const PointwiseArgs<T>& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1,
                    T* scratch);
  // out[j] = the mean over rows [0, rows) of output channel n0 + j of a pointwise
  // convolution, for j < n1 - n0 (n0 a multiple of vl, n1 - n0 <= kPoolCols, n1 <=
  // cout): the head and global average pooling, without storing the head's output.
  // scratch: kPoolScratch elements.
  void (*pointwise_mean)(const PointwiseArgs<T>& a, int64_t rows, int64_t n0, int64_t n1,
                         T* scratch, T* out);
};

// One instruction-set implementation of the kernels.
struct KernelTable {
  Isa isa;
  Kernels<float> f32;
  Kernels<double> f64;
  template <typename T>
  const Kernels<T>& get() const;
};
template <>
inline const Kernels<float>& KernelTable::get<float>() const { return f32; }
template <>
inline const Kernels<double>& KernelTable::get<double>() const { return f64; }

// The table for `isa`, or nullptr when it is not compiled in or the CPU lacks it.
const KernelTable* kernel_table(Isa isa);
bool cpu_supports(Isa isa);
bool isa_compiled(Isa isa);
// The table in use: the best the CPU supports, or the one MNV2_CPU_ISA names
// (scalar|avx2|avx512|neon). Chosen once. Throws std::runtime_error when the
// variable names an unknown ISA or one this CPU or build cannot run.
const KernelTable& active_kernels();

}  // namespace mnv2
