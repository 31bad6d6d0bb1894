// The serial or range-parallel steps after the kernels' items: sums of partial
// results in a fixed order, so that results are bitwise repeatable.
#pragma once

#include <cstdint>

#include "kernels.h"

namespace mnv2 {

// With hidden splits: y = the partial outputs summed in split order (+ x), for output
// rows [row_begin, row_end) of the flattened (image, row) range. Call after every
// forward item is done; disjoint ranges may run concurrently.
template <typename T>
void reduce_forward_splits(const ForwardArgs<T>& a, const ForwardPlan& p, int64_t row_begin,
                           int64_t row_end);

// Adds the side-buffer rows into gx (the input rows two bands share). Serial; call
// after every item is done. Nothing to do without gx or with one band.
template <typename T>
void backward_finish(const BlockShape& s, const BackwardPlan& p, const T* side, T* gx,
                     const Strides4& gxs);

// Sums `tasks` partial gradient buffers in task order and writes the unpadded
// gradients of hidden channels [h_begin, h_end) (the range that starts at 0 also
// writes g_b_project); disjoint ranges may run concurrently. Any output may be null.
//   g_w_expand [hidden][cin], g_b_expand [hidden], g_w_dw [hidden][k * k],
//   g_b_dw [hidden], g_w_project [cout][hidden], g_b_project [cout]
template <typename T>
void reduce_grads(const BlockShape& s, const Layout& l, const T* partials, int64_t tasks,
                  int64_t h_begin, int64_t h_end, T* g_w_expand, T* g_b_expand, T* g_w_dw,
                  T* g_b_dw, T* g_w_project, T* g_b_project);

}  // namespace mnv2
