// What the CPU operators share: input checks, the kernel table, per-thread scratch,
// packing into a tensor and the forward driver.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>

#include "core/fused_ir.h"
#include "glue_checks.h"

namespace mnv2 {
namespace cpu {

using glue::OptTensor;

// Which dtypes an operator takes: the kernels' own (float32, float64), or those and
// float16/bfloat16, which the block and statistics operators compute in float32,
// converting at their edges (there is no half-precision CPU kernel yet).
enum class Dtypes { kKernel, kKernelOrHalf };

// A dense (strided) 4-D tensor of the given dtypes with height and width >= 1.
void check_x(const at::Tensor& x, const char* name = "x", Dtypes dtypes = Dtypes::kKernel);

// Whether x is float16 or bfloat16: the operator then runs on float32 copies of its
// arguments (float32_copy) and converts its results back.
inline bool is_half(const at::Tensor& x) {
  return x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16;
}

inline OptTensor float32_copy(const OptTensor& t) {
  return t.has_value() ? OptTensor(t->to(at::kFloat)) : OptTensor();
}

// The kernels of the ISA in use (an MNV2_CPU_ISA that cannot be used is a TORCH_CHECK error).
const KernelTable& kernels();

inline at::TensorOptions dense_options(const at::Tensor& t) {
  return t.options().memory_format(at::MemoryFormat::Contiguous);
}

// The largest per-thread scratch requested since start (or the last reset), in bytes.
extern std::atomic<int64_t> g_max_scratch_bytes;

// Per-thread kernel scratch, kept across calls. Its size is bounded by the plan
// (independent of N and H); allocating it afresh on every call cost small blocks more
// than their arithmetic (each large malloc is a fresh mmap and page faults).
template <typename T>
T* thread_scratch(int64_t elements) {
  struct Buffer {
    void* data = nullptr;
    size_t bytes = 0;
    ~Buffer() { std::free(data); }
  };
  thread_local Buffer buffer;
  const size_t bytes = static_cast<size_t>(std::max<int64_t>(elements, 1)) * sizeof(T);
  int64_t seen = g_max_scratch_bytes.load();
  while (static_cast<int64_t>(bytes) > seen &&
         !g_max_scratch_bytes.compare_exchange_weak(seen, static_cast<int64_t>(bytes))) {
  }
  if (bytes > buffer.bytes) {
    std::free(buffer.data);
    buffer.bytes = (bytes + 63) / 64 * 64;
    buffer.data = std::aligned_alloc(64, buffer.bytes);
    TORCH_CHECK(buffer.data != nullptr, "mnv2: cannot allocate ", buffer.bytes, " bytes of scratch");
  }
  return static_cast<T*>(buffer.data);
}

// The block's weights packed for the layout `l` (made with `packing`), hidden-channel
// ranges in parallel. Absent tensors (no expand; no depthwise bias or project for the
// depthwise statistics) are not read.
template <typename T>
at::Tensor pack_block(const BlockShape& s, const Layout& l, Packing packing, const at::TensorOptions& opts,
                      const OptTensor& w_expand, const OptTensor& b_expand, const at::Tensor& w_dw,
                      const OptTensor& b_dw, const OptTensor& w_project, const OptTensor& b_project);

// Runs backward items [0, plan.items(s)) as a fixed number of tasks (at most the thread
// count), each owning a contiguous range of items and its own gradient partials (zeroed
// on the thread that accumulates into them); then sums the partials in task order into
// the unpadded gradients (reduce_grads; any may be null), hidden-channel ranges in
// parallel. Bitwise repeatable for a given thread count. run_items(begin, end, partials,
// scratch) runs the kernel on items [begin, end).
template <typename T, typename RunItems>
void run_backward_tasks(const BlockShape& s, const Layout& l, const BackwardPlan& plan,
                        const at::TensorOptions& opts, RunItems run_items, T* g_w_expand, T* g_b_expand,
                        T* g_w_dw, T* g_b_dw, T* g_w_project, T* g_b_project) {
  const GradLayout gl = make_grad_layout(s, l);
  const int64_t items = plan.items(s);
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), items));
  at::Tensor partials = at::empty({tasks, gl.total}, opts);
  T* parts = partials.mutable_data_ptr<T>();
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    T* scratch = thread_scratch<T>(plan.scratch_floats);
    for (int64_t t = begin; t < end; ++t) {
      std::fill_n(parts + t * gl.total, gl.total, T(0));
      run_items(items * t / tasks, items * (t + 1) / tasks, parts + t * gl.total, scratch);
    }
  });
  at::parallel_for(0, s.hidden, 64, [&](int64_t h0, int64_t h1) {
    reduce_grads<T>(s, l, parts, tasks, h0, h1, g_w_expand, g_b_expand, g_w_dw, g_b_dw, g_w_project, g_b_project);
  });
}

// The fused stem as the block's input source (StemSource).
struct StemInput {
  const at::Tensor& image;
  const at::Tensor& packed;
  PointwiseLayout layout;
};

// Runs the block's forward into y (allocated, s.batch > 0), with hidden splits reduced.
template <typename T>
void run_forward(const BlockShape& s, const Layout& l, const at::Tensor& x, const at::Tensor& packed,
                 const at::Tensor& y, const StemInput* stem = nullptr);

// (N, cout, Ho, Wo) in x's memory format.
at::Tensor empty_output(const BlockShape& s, const at::Tensor& x);

// Operators that others call (the whole-model operator).
at::Tensor fused_inverted_residual_packed_cpu(const at::Tensor& x, const at::Tensor& packed, int64_t hidden,
                                              int64_t cout, bool has_expand, int64_t stride, bool residual,
                                              int64_t dilation, int64_t kernel_size, std::string_view activation);
at::Tensor stem_block_packed_cpu(const at::Tensor& image, const at::Tensor& stem_packed,
                                 const at::Tensor& packed, int64_t channels, int64_t cout, int64_t stride);
at::Tensor pointwise_conv_packed_cpu(const at::Tensor& x, const at::Tensor& packed, int64_t cout,
                                     int64_t activation);
at::Tensor pointwise_conv_mean_packed_cpu(const at::Tensor& x, const at::Tensor& packed, int64_t cout,
                                          int64_t activation);

}  // namespace cpu
}  // namespace mnv2
