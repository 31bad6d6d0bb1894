// Work splits and per-thread scratch of the kernels. Each scratch layout is
// described once (forward_scratch, backward_scratch, stats_scratch): the planner
// sizes the scratch with it and the kernel carves its buffers with it.
#pragma once

#include <cstdint>

#include "layout.h"
#include "machine.h"
#include "shape.h"

namespace mnv2 {

// Forward items are (image, row band, column tile, hidden split). Hidden splits (for
// small images, where the weights dominate) each compute a partial output over their
// share of the hidden channels into a partial buffer that reduce_forward_splits sums
// in split order.
struct ForwardPlan {
  int64_t rows_per_band, n_bands;
  int64_t cols_per_tile, n_col_tiles;
  int64_t n_splits, split_channels;  // hidden channels per split (multiple of vl)
  int64_t partial_floats;            // whole partial buffer when n_splits > 1
  int64_t rows_per_step;   // output rows whose project is one GEMM
  int64_t hidden_chunk;    // hidden channels per pass (multiple of vl); < split_channels
                           // makes the block a sum over chunks (paper section 5.1)
  int64_t window_slots;    // expanded rows held: (rows_per_step - 1) * stride + dw_span()
  int64_t window_cols;     // input columns held at most per tile
  int64_t stem_k = 0;      // with a fused stem: its im2col row length (kStemTaps x image channels)
  int64_t scratch_floats;  // per thread, in elements
  int64_t items(const BlockShape& s) const { return s.batch * n_bands * n_col_tiles * n_splits; }
  // A split takes several chunks: the project accumulates a whole band.
  bool chunked() const { return hidden_chunk < split_channels; }
};
// `threads` is how many workers will share the items; the scratch budget keeps the
// ring of expanded rows, the weight chunk and the output accumulator in L2
// (forward_cache_budget of `caches`: by default this machine's).
ForwardPlan plan_forward(const BlockShape& s, const Layout& l, int threads);
ForwardPlan plan_forward(const BlockShape& s, const Layout& l, int threads, const CacheSizes& caches);
// The working set a forward thread may take, in 4-byte elements (for either dtype): 5/8
// of its L2, the rest left to the inputs and outputs streaming through, within
// [128 KiB, 4 MiB].
int64_t forward_cache_budget(const CacheSizes& caches);
// Re-derives the dependent fields after a caller overrides the tile sizes.
void finish_forward_plan(const BlockShape& s, const Layout& l, ForwardPlan* p);

// One thread's forward scratch (element offsets).
struct ForwardScratch {
  int64_t ring;      // [window_slots][window_cols][hidden_chunk] expanded input rows
  int64_t zero_row;  // [window_cols][hidden_chunk] zeros: the rows outside the image
  int64_t dw_rows;   // [rows_per_step][cols_per_tile][hidden_chunk] depthwise output
  int64_t acc;       // [rows_per_band or rows_per_step][cols_per_tile][cout_p] project output
  int64_t im2col;    // [window_cols][stem_k] the fused stem's im2col row
  int64_t total;
};
ForwardScratch forward_scratch(const Layout& l, const ForwardPlan& p);

// Backward items are (image, row band). Bands span whole rows; an input row shared by
// two bands is written by the first, and the second band's share goes to a side buffer
// added in backward_finish.
constexpr int64_t kMaxBackwardSlots = 64;  // bound of BackwardPlan::window_slots
struct BackwardPlan {
  int64_t rows_per_band, n_bands;
  int64_t rows_per_step;        // output rows whose project GEMMs run as one
  int64_t window_slots;         // a1 rows held: (rows_per_step - 1) * stride + dw_span()
  int64_t scratch_floats;       // per thread
  int64_t pending_pixels;       // pixels gathered per weight-gradient update
  int64_t side_rows_per_item;   // dw_span() - stride: at most the input rows a band shares with earlier ones
  int64_t side_floats;          // whole side buffer
  int64_t items(const BlockShape& s) const { return s.batch * n_bands; }
};
BackwardPlan plan_backward(const BlockShape& s, const Layout& l, int threads);
void finish_backward_plan(const BlockShape& s, const Layout& l, BackwardPlan* p);
// The input rows of a band that earlier bands also touch: [first, shared_last], -1 for
// none (band 0). The first band to touch a row writes its input gradient; each later
// band keeps its share in its side rows, which backward_finish adds in band order.
int64_t backward_band_first_row(const BlockShape& s, const BackwardPlan& p, int64_t band);
int64_t backward_band_shared_last_row(const BlockShape& s, const BackwardPlan& p, int64_t band);

// One thread's backward scratch (element offsets).
struct BackwardScratch {
  int64_t ring;       // [window_slots][in_w][hp] a1 rows
  int64_t zero_row;   // [in_w][hp]
  int64_t ga1;        // [window_slots][in_w][hp] their gradients
  int64_t trash_row;  // [in_w][hp] scatter target of the rows outside the image
  int64_t z2;         // [rows_per_step][out_w][hp]
  int64_t gz2;        // [rows_per_step][out_w][hp]
  int64_t gx_rows;    // [pending_pixels][cin_p] input-gradient rows of one step
  // pending operands of the weight-gradient updates, pending_pixels rows each
  int64_t pend_a2;    // [.][hp]
  int64_t pend_gy;    // [.][cout]
  int64_t pend_gz1;   // [.][hp]
  int64_t pend_x;     // [.][cin]
  int64_t total;
};
BackwardScratch backward_scratch(const BlockShape& s, const Layout& l, const BackwardPlan& p);

// The depthwise statistics (batch-norm statistics of the depthwise output without the
// expansion in memory): items are (image, row band), split as the backward's.
struct StatsPlan {
  int64_t rows_per_band, n_bands;
  int64_t window_slots;    // dw_span(): one output row at a time
  int64_t scratch_floats;  // per thread
  int64_t items(const BlockShape& s) const { return s.batch * n_bands; }
};
StatsPlan plan_stats(const BlockShape& s, const Layout& l, int threads);

// One thread's statistics scratch (element offsets).
struct StatsScratch {
  int64_t ring;      // [window_slots][in_w][hp] a1 rows
  int64_t zero_row;  // [in_w][hp]
  int64_t z2;        // [out_w][hp] one row of the depthwise output
  int64_t total;
};
StatsScratch stats_scratch(const BlockShape& s, const Layout& l, const StatsPlan& p);

}  // namespace mnv2
