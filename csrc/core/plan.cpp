// Work planning: tile sizes, splits and the scratch layouts of the kernels.
#include "plan.h"

#include <algorithm>

namespace mnv2 {
namespace {

// Output pixels a project GEMM should cover at least.
constexpr int64_t kMinStepPixels = 32;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// Weights of one hidden channel that the forward streams: its expand row, project
// column, depthwise taps and two biases (the expand row counted even when t == 1).
int64_t weight_floats_per_hidden(const BlockShape& s, const Layout& l) {
  return s.cin + l.cout_p + s.dw_taps() + 2;
}

// Consecutive arrays of a scratch buffer: each call returns the next offset.
struct Carver {
  int64_t off = 0;
  int64_t take(int64_t n) {
    const int64_t at = off;
    off += n;
    return at;
  }
};

// Row bands of the backward and the statistics: one band per image, unless there are
// fewer images than threads.
int64_t rows_per_band_for(const BlockShape& s, int threads) {
  const int64_t Ho = s.out_h();
  const int64_t bands =
      s.batch >= threads || s.batch == 0 ? 1 : std::min(Ho, ceil_div(threads, s.batch));
  return ceil_div(Ho, bands);
}

}  // namespace

ForwardScratch forward_scratch(const Layout& l, const ForwardPlan& p) {
  const int64_t hc = p.hidden_chunk, tw = p.cols_per_tile;
  Carver c;
  ForwardScratch f;
  f.ring = c.take(p.window_slots * p.window_cols * hc);
  f.zero_row = c.take(p.window_cols * hc);
  f.dw_rows = c.take(p.rows_per_step * tw * hc);
  f.acc = c.take((p.chunked() ? p.rows_per_band : p.rows_per_step) * tw * l.cout_p);
  f.im2col = c.take(p.window_cols * p.stem_k);
  f.total = c.off;
  return f;
}

void finish_forward_plan(const BlockShape& s, const Layout& l, ForwardPlan* p) {
  const int64_t Ho = s.out_h(), Wo = s.out_w();
  p->cols_per_tile = std::clamp<int64_t>(p->cols_per_tile, 1, Wo);
  p->n_col_tiles = ceil_div(Wo, p->cols_per_tile);
  p->rows_per_band = std::clamp<int64_t>(p->rows_per_band, 1, Ho);
  p->n_bands = ceil_div(Ho, p->rows_per_band);
  p->rows_per_step = std::clamp<int64_t>(p->rows_per_step, 1, p->rows_per_band);
  p->n_splits = std::clamp<int64_t>(p->n_splits, 1, l.hp / l.vl);
  p->split_channels = round_up(ceil_div(l.hp, p->n_splits), l.vl);
  p->n_splits = ceil_div(l.hp, p->split_channels);
  p->hidden_chunk = std::clamp<int64_t>(round_up(p->hidden_chunk, l.vl), l.vl, p->split_channels);
  p->partial_floats = p->n_splits > 1 ? p->n_splits * s.batch * Ho * Wo * l.cout_p : 0;
  p->window_slots = (p->rows_per_step - 1) * s.stride + s.dw_span();
  p->window_cols = std::min(s.in_w, (p->cols_per_tile - 1) * s.stride + s.dw_span());
  p->scratch_floats = forward_scratch(l, *p).total;
}

int64_t forward_cache_budget(const CacheSizes& caches) {
  constexpr int64_t kMin = 128 * 1024, kMax = 4 * 1024 * 1024;
  return std::clamp<int64_t>(caches.l2 / 8 * 5, kMin, kMax) / static_cast<int64_t>(sizeof(float));
}

ForwardPlan plan_forward(const BlockShape& s, const Layout& l, int threads) {
  return plan_forward(s, l, threads, machine_caches());
}

ForwardPlan plan_forward(const BlockShape& s, const Layout& l, int threads, const CacheSizes& caches) {
  threads = std::max(threads, 1);
  const int64_t budget = forward_cache_budget(caches);
  const int64_t Ho = s.out_h(), Wo = s.out_w(), st = s.stride, hp = l.hp, span = s.dw_span();
  ForwardPlan p{};

  // Column tiles only when the rows of the expansion one output row reads would take
  // more than half the budget at full width.
  const int64_t half = budget / 2;
  p.cols_per_tile = Wo;
  if (span * std::min(s.in_w, (Wo - 1) * st + span) * hp > half) {
    p.cols_per_tile = std::max<int64_t>(1, (half / (span * hp) - span) / st + 1);
  }
  p.n_col_tiles = ceil_div(Wo, p.cols_per_tile);
  p.cols_per_tile = ceil_div(Wo, p.n_col_tiles);

  // Too few images for the threads: split by hidden channels where the block's weights
  // outweigh an image's input and output (each thread then streams only its share of
  // the weights, and the partial outputs it adds up are small), else by row bands (each
  // thread streams its share of the activations; the halo rows recomputed per band are
  // few). MobileNetV2: the blocks with 14x14 outputs and smaller split by channels.
  const int64_t per_image = s.batch * p.n_col_tiles;
  const int64_t ways = per_image >= threads || per_image == 0 ? 1 : ceil_div(threads, per_image);
  p.n_splits = 1;
  int64_t bands = 1;
  if (ways > 1) {
    const int64_t weights = weight_floats_per_hidden(s, l) * hp;
    const int64_t activations = s.in_h * s.in_w * s.cin + Ho * Wo * s.cout;
    if (weights > activations && hp >= 64 * ways) {
      p.n_splits = ways;
    } else {
      bands = std::min(Ho, ways);
    }
  }
  p.rows_per_band = ceil_div(Ho, bands);
  const int64_t split_hp = round_up(ceil_div(hp, p.n_splits), l.vl);
  p.rows_per_step = std::min(p.rows_per_band, ceil_div(kMinStepPixels, p.cols_per_tile));

  // Hidden chunk: the fewest chunks of a split whose weights and scratch fit the budget.
  for (int64_t chunks = 1;; ++chunks) {
    p.hidden_chunk = round_up(ceil_div(split_hp, chunks), l.vl);
    ForwardPlan trial = p;
    finish_forward_plan(s, l, &trial);
    const int64_t working_set = weight_floats_per_hidden(s, l) * p.hidden_chunk + trial.scratch_floats;
    if (working_set <= budget || p.hidden_chunk == l.vl) break;
  }
  // A chunked pass accumulates a whole band of output: bound it so that scratch
  // never grows with H.
  if (p.hidden_chunk < split_hp) {
    const int64_t max_rows =
        std::max<int64_t>(p.rows_per_step, (budget / 4) / (p.cols_per_tile * l.cout_p));
    p.rows_per_band = std::min(p.rows_per_band, max_rows);
  }
  finish_forward_plan(s, l, &p);
  return p;
}

BackwardScratch backward_scratch(const BlockShape& s, const Layout& l, const BackwardPlan& p) {
  const int64_t row = s.in_w * l.hp, step = p.rows_per_step * s.out_w() * l.hp;
  const int64_t pend = p.pending_pixels;
  Carver c;
  BackwardScratch b;
  b.ring = c.take(p.window_slots * row);
  b.zero_row = c.take(row);
  b.ga1 = c.take(p.window_slots * row);
  b.trash_row = c.take(row);
  b.z2 = c.take(step);
  b.gz2 = c.take(step);
  b.gx_rows = c.take(pend * l.cin_p);
  b.pend_a2 = c.take(pend * l.hp);
  b.pend_gy = c.take(pend * s.cout);
  b.pend_gz1 = c.take(pend * l.hp);
  b.pend_x = c.take(pend * s.cin);
  b.total = c.off;
  return b;
}

void finish_backward_plan(const BlockShape& s, const Layout& l, BackwardPlan* p) {
  const int64_t Ho = s.out_h(), W = s.in_w;
  p->rows_per_band = std::clamp<int64_t>(p->rows_per_band, 1, Ho);
  p->n_bands = ceil_div(Ho, p->rows_per_band);
  p->rows_per_step = std::clamp<int64_t>(p->rows_per_step, 1, p->rows_per_band);
  p->rows_per_step =
      std::min<int64_t>(p->rows_per_step, (kMaxBackwardSlots - s.dw_span()) / s.stride + 1);
  p->window_slots = (p->rows_per_step - 1) * s.stride + s.dw_span();
  // a step finishes at most rows_per_step * stride + span - 1 input rows
  p->pending_pixels =
      std::max<int64_t>(kMinStepPixels, (p->rows_per_step * s.stride + s.dw_span() - 1) * W);
  p->scratch_floats = backward_scratch(s, l, *p).total;
  p->side_rows_per_item = s.dw_span() - s.stride;
  p->side_floats = s.batch * (p->n_bands - 1) * p->side_rows_per_item * W * s.cin;
}

BackwardPlan plan_backward(const BlockShape& s, const Layout& l, int threads) {
  BackwardPlan p{};
  p.rows_per_band = rows_per_band_for(s, std::max(threads, 1));
  p.rows_per_step = ceil_div(kMinStepPixels, s.out_w());
  finish_backward_plan(s, l, &p);
  return p;
}

int64_t backward_band_first_row(const BlockShape& s, const BackwardPlan& p, int64_t band) {
  return std::max<int64_t>(0, s.first_input_row(band * p.rows_per_band));
}

int64_t backward_band_shared_last_row(const BlockShape& s, const BackwardPlan& p, int64_t band) {
  if (band == 0) return -1;
  return std::min(s.in_h - 1, s.first_input_row(band * p.rows_per_band - 1) + s.dw_span() - 1);
}

StatsScratch stats_scratch(const BlockShape& s, const Layout& l, const StatsPlan& p) {
  const int64_t row = s.in_w * l.hp;
  Carver c;
  StatsScratch st;
  st.ring = c.take(p.window_slots * row);
  st.zero_row = c.take(row);
  st.z2 = c.take(s.out_w() * l.hp);
  st.total = c.off;
  return st;
}

StatsPlan plan_stats(const BlockShape& s, const Layout& l, int threads) {
  StatsPlan p{};
  p.rows_per_band = rows_per_band_for(s, std::max(threads, 1));
  p.n_bands = ceil_div(s.out_h(), p.rows_per_band);
  p.window_slots = s.dw_span();
  p.scratch_floats = stats_scratch(s, l, p).total;
  return p;
}

}  // namespace mnv2
