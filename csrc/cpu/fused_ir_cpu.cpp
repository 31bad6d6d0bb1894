// CPU implementations of the mnv2 operators: argument checks, memory format,
// at::parallel_for over the core's work items.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <limits>
#include <optional>
#include <stdexcept>
#include <tuple>

#include "core/fused_ir.h"
#include "glue_checks.h"

namespace mnv2 {
namespace {

using glue::check_weights;
using glue::finish_shape;
using glue::OptTensor;
using glue::strides_of;

void check_x(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4, "mnv2: x must be 4-D (N, C, H, W), got ", x.dim(), "-D");
  TORCH_CHECK(x.layout() == at::kStrided, "mnv2: x must be a dense (strided) tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "mnv2: the CPU kernel supports float32 and float64, got ", x.scalar_type());
  TORCH_CHECK(x.size(2) >= 1 && x.size(3) >= 1, "mnv2: x must have height and width >= 1, got ",
              x.sizes());
}

BlockShape check_block(const at::Tensor& x, const OptTensor& w_expand, const OptTensor& b_expand,
                       const at::Tensor& w_dw, const at::Tensor& b_dw,
                       const at::Tensor& w_project, const at::Tensor& b_project, int64_t stride,
                       bool residual) {
  check_x(x);
  BlockShape s = check_weights(x, x.size(1), w_expand, b_expand, w_dw, b_dw, w_project, b_project);
  finish_shape(s, x, stride, residual);
  return s;
}

const KernelTable& kernels() {
  try {
    return active_kernels();
  } catch (const std::runtime_error& e) {
    TORCH_CHECK(false, "mnv2: ", e.what());
  }
}

template <typename T>
at::Tensor pack(const BlockShape& s, const Layout& l, const at::TensorOptions& opts,
                const OptTensor& w_expand, const OptTensor& b_expand, const at::Tensor& w_dw,
                const at::Tensor& b_dw, const at::Tensor& w_project, const at::Tensor& b_project,
                bool for_backward) {
  at::Tensor packed = at::empty({l.total}, opts);
  const at::Tensor we = s.has_expand ? w_expand->contiguous() : at::Tensor();
  const at::Tensor be = s.has_expand ? b_expand->contiguous() : at::Tensor();
  const at::Tensor wd = w_dw.contiguous(), bd = b_dw.contiguous();
  const at::Tensor wp = w_project.contiguous(), bp = b_project.contiguous();
  const T* pwe = s.has_expand ? we.const_data_ptr<T>() : nullptr;
  const T* pbe = s.has_expand ? be.const_data_ptr<T>() : nullptr;
  T* out = packed.mutable_data_ptr<T>();
  // ranges of hidden channels in parallel; the grain keeps small blocks on one thread
  at::parallel_for(0, s.hidden, 64, [&](int64_t h0, int64_t h1) {
    pack_weights<T>(s, l, pwe, pbe, wd.const_data_ptr<T>(), bd.const_data_ptr<T>(),
                    wp.const_data_ptr<T>(), bp.const_data_ptr<T>(), for_backward, h0, h1, out);
  });
  return packed;
}

at::TensorOptions dense_options(const at::Tensor& t) {
  return t.options().memory_format(at::MemoryFormat::Contiguous);
}

std::atomic<int64_t> g_max_scratch_bytes{0};

// Per-thread kernel scratch, kept across calls. Its size is bounded by the
// plan (independent of N and H); allocating it afresh on every call cost
// small blocks more than their arithmetic (each large malloc is a fresh mmap
// and page faults). The largest size ever requested is reported by
// max_scratch_bytes() so tests can check the bound.
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

// A fused stem for run_forward: the block's input rows come from `image` through
// the packed 3x3 stride-2 convolution (ForwardArgs::stem).
struct StemInput {
  const at::Tensor& image;
  const at::Tensor& packed;
  PointwiseLayout layout;
};

template <typename T>
void run_forward(const BlockShape& s, const Layout& l, const at::Tensor& x,
                 const at::Tensor& packed, const at::Tensor& y,
                 const StemInput* stem = nullptr) {
  const Kernels<T>& k = kernels().get<T>();
  ForwardPlan plan = plan_forward(s, l, at::get_num_threads());
  if (stem != nullptr) {
    plan.stem_k = stem->layout.cin;
    finish_forward_plan(s, l, &plan);
  }
  const at::TensorOptions opts = dense_options(x);
  at::Tensor partial = at::empty({plan.partial_floats}, opts);
  ForwardArgs<T> args{s, l, x.const_data_ptr<T>(), strides_of(x), packed.const_data_ptr<T>(),
                      y.mutable_data_ptr<T>(), strides_of(y), partial.mutable_data_ptr<T>()};
  if (stem != nullptr) {
    args.image = stem->image.const_data_ptr<T>();
    args.is = strides_of(stem->image);
    args.image_c = stem->image.size(1);
    args.image_h = stem->image.size(2);
    args.image_w = stem->image.size(3);
    args.stem = stem->packed.const_data_ptr<T>();
    args.stem_layout = stem->layout;
  }
  at::parallel_for(0, plan.items(s), 1, [&](int64_t begin, int64_t end) {
    k.forward(args, plan, begin, end, thread_scratch<T>(plan.scratch_floats));
  });
  if (plan.n_splits > 1) {
    at::parallel_for(0, s.batch * s.out_h(), 1, [&](int64_t begin, int64_t end) {
      reduce_forward_splits<T>(args, plan, begin, end);
    });
  }
}

at::Tensor empty_output(const BlockShape& s, const at::Tensor& x) {
  return at::empty({s.batch, s.cout, s.out_h(), s.out_w()},
                   x.options().memory_format(x.suggest_memory_format()));
}

at::Tensor fused_inverted_residual_cpu(const at::Tensor& x, const OptTensor& w_expand,
                                       const OptTensor& b_expand, const at::Tensor& w_dw,
                                       const at::Tensor& b_dw, const at::Tensor& w_project,
                                       const at::Tensor& b_project, int64_t stride, bool residual) {
  const BlockShape s =
      check_block(x, w_expand, b_expand, w_dw, b_dw, w_project, b_project, stride, residual);
  at::Tensor y = empty_output(s, x);
  if (s.batch == 0) return y;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mnv2_fused_forward", [&] {
    const Layout l = make_layout(s, kernels().get<scalar_t>().vl, false);
    const at::Tensor packed = pack<scalar_t>(s, l, dense_options(x), w_expand, b_expand, w_dw, b_dw,
                                             w_project, b_project, false);
    run_forward<scalar_t>(s, l, x, packed, y);
  });
  return y;
}

at::Tensor pack_weights_cpu(const OptTensor& w_expand, const OptTensor& b_expand,
                            const at::Tensor& w_dw, const at::Tensor& b_dw,
                            const at::Tensor& w_project, const at::Tensor& b_project) {
  TORCH_CHECK(w_dw.scalar_type() == at::kFloat || w_dw.scalar_type() == at::kDouble,
              "mnv2: the CPU kernel supports float32 and float64, got ", w_dw.scalar_type());
  const int64_t cin = w_expand.has_value() ? w_expand->size(-1) : w_dw.size(0);
  BlockShape s = check_weights(w_dw, cin, w_expand, b_expand, w_dw, b_dw, w_project, b_project);
  at::Tensor packed;
  AT_DISPATCH_FLOATING_TYPES(w_dw.scalar_type(), "mnv2_pack_weights", [&] {
    const Layout l = make_layout(s, kernels().get<scalar_t>().vl, false);
    packed = pack<scalar_t>(s, l, dense_options(w_dw), w_expand, b_expand, w_dw, b_dw, w_project,
                            b_project, false);
  });
  return packed;
}

at::Tensor fused_inverted_residual_packed_cpu(const at::Tensor& x, const at::Tensor& packed,
                                              int64_t hidden, int64_t cout, bool has_expand,
                                              int64_t stride, bool residual) {
  check_x(x);
  TORCH_CHECK(packed.device() == x.device() && packed.scalar_type() == x.scalar_type() &&
                  packed.dim() == 1 && packed.is_contiguous(),
              "mnv2: packed weights must be a contiguous 1-D tensor with x's device and dtype");
  BlockShape s{};
  s.cin = x.size(1);
  s.hidden = hidden;
  s.cout = cout;
  s.has_expand = has_expand;
  finish_shape(s, x, stride, residual);
  at::Tensor y = empty_output(s, x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mnv2_fused_forward_packed", [&] {
    const Layout l = make_layout(s, kernels().get<scalar_t>().vl, false);
    TORCH_CHECK(packed.numel() == l.total &&
                    packed_matches<scalar_t>(s, l, packed.const_data_ptr<scalar_t>()),
                "mnv2: the packed weights were not packed for this block (Cin ", s.cin, ", hidden ",
                s.hidden, ", Cout ", s.cout, s.has_expand ? "" : ", no expand",
                ") on this machine's kernel; re-pack them for this block");
    if (s.batch > 0) run_forward<scalar_t>(s, l, x, packed, y);
  });
  return y;
}

// MobileNetV2's stem and first block in one pass: y = block(relu6(conv3x3 s2(image) + b))
// for a t == 1 block without residual. The stem's output (the block's input) is
// computed row by row inside the block's window and never stored.
at::Tensor stem_block_packed_cpu(const at::Tensor& image, const at::Tensor& stem_packed,
                                 const at::Tensor& packed, int64_t channels, int64_t cout,
                                 int64_t stride) {
  TORCH_CHECK(image.dim() == 4, "mnv2: image must be 4-D (N, C, H, W), got ", image.dim(), "-D");
  TORCH_CHECK(image.layout() == at::kStrided, "mnv2: image must be a dense (strided) tensor");
  TORCH_CHECK(image.scalar_type() == at::kFloat || image.scalar_type() == at::kDouble,
              "mnv2: the CPU kernel supports float32 and float64, got ", image.scalar_type());
  TORCH_CHECK(image.size(1) >= 1 && image.size(2) >= 1 && image.size(3) >= 1,
              "mnv2: image must have channels, height and width >= 1, got ", image.sizes());
  TORCH_CHECK(channels >= 1 && cout >= 1, "mnv2: channels and cout must be >= 1, got ", channels,
              " and ", cout);
  for (const at::Tensor* t : {&stem_packed, &packed}) {
    TORCH_CHECK(t->device() == image.device() && t->scalar_type() == image.scalar_type() &&
                    t->dim() == 1 && t->is_contiguous(),
                "mnv2: packed weights must be contiguous 1-D tensors with the image's device and dtype");
  }
  BlockShape s{};
  s.cin = channels;
  s.hidden = channels;
  s.cout = cout;
  s.has_expand = false;
  TORCH_CHECK(stride == 1 || stride == 2, "mnv2: stride must be 1 or 2, got ", stride);
  s.stride = static_cast<int>(stride);
  s.residual = false;
  s.batch = image.size(0);
  s.in_h = (image.size(2) - 1) / 2 + 1;
  s.in_w = (image.size(3) - 1) / 2 + 1;
  const char* err = validate_shape(s);
  TORCH_CHECK(err == nullptr, "mnv2: ", err);
  at::Tensor y = at::empty({s.batch, s.cout, s.out_h(), s.out_w()},
                           image.options().memory_format(image.suggest_memory_format()));
  AT_DISPATCH_FLOATING_TYPES(image.scalar_type(), "mnv2_stem_block_packed", [&] {
    const int64_t vl = kernels().get<scalar_t>().vl;
    const Layout l = make_layout(s, vl, false);
    TORCH_CHECK(packed.numel() == l.total && packed_matches<scalar_t>(s, l, packed.const_data_ptr<scalar_t>()),
                "mnv2: the packed block weights were not packed for a ", channels, " -> ", cout,
                " block without expansion on this machine's kernel; re-pack them");
    const PointwiseLayout sl = make_pointwise_layout(9 * image.size(1), channels, vl);
    TORCH_CHECK(stem_packed.numel() == sl.total &&
                    packed_matches<scalar_t>(sl, stem_packed.const_data_ptr<scalar_t>()),
                "mnv2: the packed stem weights were not packed for a 3x3 convolution from ",
                image.size(1), " to ", channels, " channels (a (", channels, ", ", 9 * image.size(1),
                ") matrix) on this machine's kernel; re-pack them");
    const StemInput stem{image, stem_packed, sl};
    if (s.batch > 0) run_forward<scalar_t>(s, l, image, packed, y, &stem);
  });
  return y;
}

// Pointwise (1x1) convolution with packed weights: the model's head.
at::Tensor pack_pointwise_cpu(const at::Tensor& weight, const at::Tensor& bias) {
  TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kDouble,
              "mnv2: pack_pointwise supports float32 and float64, got ", weight.scalar_type());
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) >= 1 && weight.size(1) >= 1,
              "mnv2: pack_pointwise needs a (cout, cin) weight, got shape ", weight.sizes());
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == weight.size(0),
              "mnv2: pack_pointwise needs a (cout,) bias, got shape ", bias.sizes(), " for cout ",
              weight.size(0));
  TORCH_CHECK(bias.scalar_type() == weight.scalar_type() && bias.device() == weight.device(),
              "mnv2: pack_pointwise's bias must have the weight's dtype and device");
  at::Tensor packed;
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "mnv2_pack_pointwise", [&] {
    const PointwiseLayout l =
        make_pointwise_layout(weight.size(1), weight.size(0), kernels().get<scalar_t>().vl);
    packed = at::empty({l.total}, dense_options(weight));
    const at::Tensor w = weight.contiguous(), b = bias.contiguous();
    pack_pointwise<scalar_t>(l, w.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(),
                             packed.mutable_data_ptr<scalar_t>());
  });
  return packed;
}

// The checks shared by the pointwise operators (op: the operator's name).
void check_pointwise(const char* op, const at::Tensor& x, const at::Tensor& packed, int64_t cout,
                     int64_t activation) {
  check_x(x);
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast), "mnv2: ", op,
              " needs a channels_last (NHWC-contiguous) input, got strides ", x.strides());
  TORCH_CHECK(activation >= 0 && activation <= 2,
              "mnv2: activation must be 0 (none), 1 (ReLU) or 2 (ReLU6), got ", activation);
  TORCH_CHECK(cout >= 1, "mnv2: cout must be >= 1, got ", cout);
  TORCH_CHECK(packed.device() == x.device() && packed.scalar_type() == x.scalar_type() &&
                  packed.dim() == 1 && packed.is_contiguous(),
              "mnv2: packed weights must be a contiguous 1-D tensor with x's device and dtype");
}

template <typename T>
PointwiseLayout checked_pointwise_layout(const at::Tensor& x, const at::Tensor& packed, int64_t cout) {
  const PointwiseLayout l = make_pointwise_layout(x.size(1), cout, kernels().get<T>().vl);
  TORCH_CHECK(packed.numel() == l.total && packed_matches<T>(l, packed.const_data_ptr<T>()),
              "mnv2: the packed weights were not packed for a ", x.size(1), " -> ", cout,
              " pointwise convolution on this machine's kernel; re-pack them for this layer");
  return l;
}

at::Tensor pointwise_conv_packed_cpu(const at::Tensor& x, const at::Tensor& packed, int64_t cout,
                                     int64_t activation) {
  check_pointwise("pointwise_conv_packed", x, packed, cout, activation);
  at::Tensor y = at::empty({x.size(0), cout, x.size(2), x.size(3)},
                           x.options().memory_format(at::MemoryFormat::ChannelsLast));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mnv2_pointwise_conv", [&] {
    const Kernels<scalar_t>& k = kernels().get<scalar_t>();
    const PointwiseLayout l = checked_pointwise_layout<scalar_t>(x, packed, cout);
    const int64_t rows = x.size(0) * x.size(2) * x.size(3);
    if (rows == 0) return;
    const PointwiseArgs<scalar_t> a{l, static_cast<Activation>(activation), x.const_data_ptr<scalar_t>(),
                                    x.size(1), packed.const_data_ptr<scalar_t>(),
                                    y.mutable_data_ptr<scalar_t>(), cout};
    // items: column groups (outer, so a thread's range reads only its share of the
    // weights) by row blocks
    constexpr int64_t kCols = 64, kRows = 128;
    const int64_t col_groups = (cout + kCols - 1) / kCols, row_blocks = (rows + kRows - 1) / kRows;
    at::parallel_for(0, col_groups * row_blocks, 1, [&](int64_t begin, int64_t end) {
      scalar_t* scratch = thread_scratch<scalar_t>(kPointwiseScratch);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t g = item / row_blocks, rb = item % row_blocks;
        k.pointwise(a, rb * kRows, std::min(rows, (rb + 1) * kRows), g * kCols,
                    std::min(cout, (g + 1) * kCols), scratch);
      }
    });
  });
  return y;
}

// The model's head and global average pooling in one pass: (N, cout) =
// mean over (H, W) of act(conv1x1(x) + bias). The head's output is never stored.
at::Tensor pointwise_conv_mean_packed_cpu(const at::Tensor& x, const at::Tensor& packed, int64_t cout,
                                          int64_t activation) {
  check_pointwise("pointwise_conv_mean_packed", x, packed, cout, activation);
  at::Tensor y = at::empty({x.size(0), cout}, x.options().memory_format(at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mnv2_pointwise_conv_mean", [&] {
    const Kernels<scalar_t>& k = kernels().get<scalar_t>();
    const PointwiseLayout l = checked_pointwise_layout<scalar_t>(x, packed, cout);
    const int64_t rows = x.size(2) * x.size(3), n = x.size(0);
    const PointwiseArgs<scalar_t> a0{l, static_cast<Activation>(activation), x.const_data_ptr<scalar_t>(),
                                     x.size(1), packed.const_data_ptr<scalar_t>(), nullptr, 0};
    scalar_t* out = y.mutable_data_ptr<scalar_t>();
    // items: images by column groups (each thread reads only its share of the weights
    // at batch 1)
    const int64_t groups = (cout + kPoolCols - 1) / kPoolCols;
    at::parallel_for(0, n * groups, 1, [&](int64_t begin, int64_t end) {
      scalar_t* scratch = thread_scratch<scalar_t>(kPoolScratch);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t i = item / groups, n0 = item % groups * kPoolCols;
        PointwiseArgs<scalar_t> a = a0;
        a.x += i * x.stride(0);
        k.pointwise_mean(a, rows, n0, std::min(cout, n0 + kPoolCols), scratch, out + i * cout + n0);
      }
    });
  });
  return y;
}

// MobileNetV2's whole inference on packed weights in one call, without a return to
// Python between layers: stem + first block (stem_block_packed), the other blocks
// (fused_inverted_residual_packed), the head with global average pooling
// (pointwise_conv_mean_packed) and the classifier (pointwise_conv_packed on the
// pooled rows; its dropout is the identity in inference). first_args: (channels,
// cout, stride) of stem_block_packed; block_args: (hidden, cout, has_expand, stride,
// residual) per block; head_args: (cout, activation).
at::Tensor mobilenet_v2_packed_cpu(const at::Tensor& image, const at::Tensor& stem_packed,
                                   const at::Tensor& first_packed, at::IntArrayRef first_args,
                                   at::TensorList blocks, at::IntArrayRef block_args,
                                   const at::Tensor& head_packed, at::IntArrayRef head_args,
                                   const at::Tensor& classifier_packed, int64_t classes) {
  TORCH_CHECK(first_args.size() == 3, "mnv2: first_args must be (channels, cout, stride), got ",
              first_args.size(), " values");
  TORCH_CHECK(block_args.size() == 5 * blocks.size(), "mnv2: block_args must hold 5 values per block ",
              "(hidden, cout, has_expand, stride, residual): ", blocks.size(), " blocks need ",
              5 * blocks.size(), ", got ", block_args.size());
  TORCH_CHECK(head_args.size() == 2, "mnv2: head_args must be (cout, activation), got ",
              head_args.size(), " values");
  at::Tensor h = stem_block_packed_cpu(image, stem_packed, first_packed, first_args[0], first_args[1],
                                       first_args[2]);
  for (size_t b = 0; b < blocks.size(); ++b) {
    const int64_t* a = block_args.data() + 5 * b;
    TORCH_CHECK((a[2] == 0 || a[2] == 1) && (a[4] == 0 || a[4] == 1), "mnv2: block ", b,
                "'s has_expand and residual must be 0 or 1, got ", a[2], " and ", a[4]);
    h = fused_inverted_residual_packed_cpu(h, blocks[b], a[0], a[1], a[2] != 0, a[3], a[4] != 0);
  }
  if (!h.is_contiguous(at::MemoryFormat::ChannelsLast)) h = h.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor pooled = pointwise_conv_mean_packed_cpu(h, head_packed, head_args[0], head_args[1]);
  const int64_t n = pooled.size(0), c = pooled.size(1);
  return pointwise_conv_packed_cpu(pooled.view({n, c, 1, 1}), classifier_packed, classes, 0).view({n, classes});
}

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                         at::Tensor>;

// grad_x (x's memory format) and the weight gradients, to be written (reduce_grads
// writes every element); zeros for an empty batch, which has nothing to reduce. The
// expand's are empty when t == 1.
Grads alloc_grads(const BlockShape& s, const at::Tensor& x) {
  const at::TensorOptions opts = dense_options(x);
  const int64_t he = s.has_expand ? s.hidden : 0;
  auto make = [&](at::IntArrayRef size) {
    return s.batch == 0 ? at::zeros(size, opts) : at::empty(size, opts);
  };
  return {at::empty(x.sizes(), x.options().memory_format(x.suggest_memory_format())),
          make({he, s.has_expand ? s.cin : 0}),
          make({he}),
          make({s.hidden, 3, 3}),
          make({s.hidden}),
          make({s.cout, s.hidden}),
          make({s.cout})};
}

template <typename T>
void backward_impl(const BlockShape& s, const at::Tensor& grad_y, const at::Tensor& x,
                   const OptTensor& w_expand, const OptTensor& b_expand, const at::Tensor& w_dw,
                   const at::Tensor& b_dw, const at::Tensor& w_project,
                   const at::Tensor& b_project, Grads& out,
                   const at::Tensor* moment_alpha = nullptr, const at::Tensor* moment_beta = nullptr,
                   at::Tensor* moment_sums = nullptr) {
  const Kernels<T>& k = kernels().get<T>();
  const Layout l = make_layout(s, k.vl, true);
  const GradLayout gl = make_grad_layout(s, l);
  const at::Tensor packed = pack<T>(s, l, dense_options(x), w_expand, b_expand, w_dw, b_dw,
                                    w_project, b_project, true);
  const BackwardPlan plan = plan_backward(s, l, at::get_num_threads());
  const at::TensorOptions opts = dense_options(x);
  at::Tensor& gx = std::get<0>(out);
  at::Tensor side = at::empty({plan.side_floats}, opts);
  const bool moments = moment_alpha != nullptr;
  BackwardArgs<T> args{s, l, x.const_data_ptr<T>(), strides_of(x),
                       moments ? nullptr : grad_y.const_data_ptr<T>(),
                       moments ? strides_of(x) : strides_of(grad_y), packed.const_data_ptr<T>(),
                       gx.mutable_data_ptr<T>(), strides_of(gx), side.mutable_data_ptr<T>()};
  at::Tensor alpha_p, beta_p;
  if (moments) {  // padded to the layout's hidden width with zeros
    alpha_p = at::zeros({l.hp}, dense_options(x));
    beta_p = at::zeros({l.hp}, dense_options(x));
    alpha_p.narrow(0, 0, s.hidden).copy_(*moment_alpha);
    beta_p.narrow(0, 0, s.hidden).copy_(*moment_beta);
    args.moment_alpha = alpha_p.const_data_ptr<T>();
    args.moment_beta = beta_p.const_data_ptr<T>();
  }
  // A fixed number of tasks, each owning a contiguous range of items and its own
  // gradient partials, reduced in task order: bitwise repeatable for a given
  // thread count.
  const int64_t items = plan.items(s);
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), items));
  if (moment_sums != nullptr) {  // statistics mode: per-task sums, summed in task order
    at::Tensor sums = at::zeros({tasks, 2 * l.hp}, opts.dtype(at::kDouble));
    double* base = sums.mutable_data_ptr<double>();
    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
      T* scratch = thread_scratch<T>(plan.scratch_floats);
      for (int64_t t = begin; t < end; ++t) {
        BackwardArgs<T> task_args = args;
        task_args.moment_sums = base + t * 2 * l.hp;
        k.backward(task_args, plan, items * t / tasks, items * (t + 1) / tasks, nullptr, scratch);
      }
    });
    *moment_sums = sums.sum(0);
    return;
  }
  // each task zeroes its own partials, on the thread that accumulates into them
  at::Tensor partials = at::empty({tasks, gl.total}, opts);
  T* parts = partials.mutable_data_ptr<T>();
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    T* scratch = thread_scratch<T>(plan.scratch_floats);
    for (int64_t t = begin; t < end; ++t) {
      std::fill_n(parts + t * gl.total, gl.total, T(0));
      k.backward(args, plan, items * t / tasks, items * (t + 1) / tasks, parts + t * gl.total, scratch);
    }
  });
  backward_finish<T>(args, plan);
  auto ptr = [](at::Tensor& t) { return t.numel() ? t.mutable_data_ptr<T>() : nullptr; };
  // hidden-channel ranges in parallel (the sums per element stay in task order)
  at::parallel_for(0, s.hidden, 64, [&](int64_t h0, int64_t h1) {
    reduce_grads<T>(s, l, parts, tasks, h0, h1, ptr(std::get<1>(out)), ptr(std::get<2>(out)),
                    ptr(std::get<3>(out)), ptr(std::get<4>(out)), ptr(std::get<5>(out)),
                    ptr(std::get<6>(out)));
  });
}

Grads fused_inverted_residual_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x,
                                           const OptTensor& w_expand, const OptTensor& b_expand,
                                           const at::Tensor& w_dw, const at::Tensor& b_dw,
                                           const at::Tensor& w_project,
                                           const at::Tensor& b_project, int64_t stride,
                                           bool residual) {
  const BlockShape s =
      check_block(x, w_expand, b_expand, w_dw, b_dw, w_project, b_project, stride, residual);
  glue::check_grad_y(grad_y, x, s);
  Grads out = alloc_grads(s, x);
  if (s.batch == 0) {
    std::get<0>(out).zero_();
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mnv2_fused_backward", [&] {
    backward_impl<scalar_t>(s, grad_y, x, w_expand, b_expand, w_dw, b_dw, w_project, b_project, out);
  });
  return out;
}

// The block the moments operators run through the fused kernels: x's expand and
// depthwise, no depthwise bias (the statistics are of the depthwise output before
// it), and a one-channel zero project step standing in for the absent one.
struct MomentsBlock {
  BlockShape shape;
  at::Tensor b_dw, w_project, b_project;
};

MomentsBlock moments_block(const at::Tensor& x, const OptTensor& w_expand, const OptTensor& b_expand,
                           const at::Tensor& w_dw, int64_t stride) {
  check_x(x);
  const int64_t hidden = w_dw.size(0);
  const at::TensorOptions opts = dense_options(x);
  MomentsBlock mb{{}, at::zeros({hidden}, opts), at::zeros({1, hidden}, opts), at::zeros({1}, opts)};
  mb.shape = check_block(x, w_expand, b_expand, w_dw, mb.b_dw, mb.w_project, mb.b_project, stride, false);
  return mb;
}

// depthwise_moments (train-mode bn2 statistics): mean and biased variance per
// hidden channel of z2 = dw3x3(relu6(w_expand x + b_expand)) (no dw bias), by
// the fused backward kernel's row walk in statistics mode: z2 is recomputed row
// by row and reduced into per-task sums in double, nothing hidden-sized is
// stored. Results in float32 for float32 input (float64 for float64).
std::tuple<at::Tensor, at::Tensor> depthwise_moments_cpu(const at::Tensor& x,
                                                         const OptTensor& w_expand,
                                                         const OptTensor& b_expand,
                                                         const at::Tensor& w_dw, int64_t stride) {
  const MomentsBlock mb = moments_block(x, w_expand, b_expand, w_dw, stride);
  const BlockShape& s = mb.shape;
  const at::Tensor &b_dw = mb.b_dw, &w_project = mb.w_project, &b_project = mb.b_project;
  const int64_t hidden = s.hidden;
  const at::TensorOptions opts = dense_options(x);
  const int64_t count = s.batch * s.out_h() * s.out_w();
  if (count == 0) {  // as torch.var_mean over an empty set
    const at::Tensor nan = at::empty({hidden}, opts).fill_(std::numeric_limits<double>::quiet_NaN());
    return {nan, nan.clone()};
  }
  at::Tensor sums;
  Grads unused = alloc_grads(s, x);
  std::get<0>(unused) = at::empty({0, 0, 0, 0}, opts);  // no input gradient in statistics mode
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mnv2_depthwise_moments", [&] {
    backward_impl<scalar_t>(s, x, x, w_expand, b_expand, w_dw, b_dw, w_project, b_project, unused,
                            nullptr, nullptr, &sums);
  });
  const int64_t hp = sums.size(0) / 2;
  const at::Tensor mean = sums.narrow(0, 0, hidden).div(static_cast<double>(count));
  // E[z^2] - E[z]^2 from double sums: the cancellation costs double's precision, not float's
  const at::Tensor var =
      sums.narrow(0, hp, hidden).div(static_cast<double>(count)).sub(mean.mul(mean)).clamp_min(0);
  return {mean.to(x.scalar_type()), var.to(x.scalar_type())};
}

// Backward of depthwise_moments (train-mode bn2 statistics) through the fused
// backward kernel: grad_z2 = alpha + beta * z2 per hidden channel, where
// z2 = dw3x3(relu6(w_expand x + b_expand)) without bias, and alpha, beta carry
// the incoming gradients of the mean and variance. Recomputes row by row;
// nothing hidden-sized is allocated.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> depthwise_moments_backward_cpu(
    const at::Tensor& x, const OptTensor& w_expand, const OptTensor& b_expand,
    const at::Tensor& w_dw, int64_t stride, const at::Tensor& alpha, const at::Tensor& beta) {
  const MomentsBlock mb = moments_block(x, w_expand, b_expand, w_dw, stride);
  const BlockShape& s = mb.shape;
  const at::Tensor &b_dw = mb.b_dw, &w_project = mb.w_project, &b_project = mb.b_project;
  const int64_t hidden = s.hidden;
  TORCH_CHECK(alpha.dim() == 1 && alpha.size(0) == hidden && beta.dim() == 1 && beta.size(0) == hidden,
              "mnv2: alpha and beta must be (hidden,) = (", hidden, ",) vectors, got ", alpha.sizes(),
              " and ", beta.sizes());
  TORCH_CHECK(alpha.scalar_type() == x.scalar_type() && beta.scalar_type() == x.scalar_type() &&
                  alpha.device() == x.device() && beta.device() == x.device(),
              "mnv2: alpha and beta must match x's dtype and device");
  Grads out = alloc_grads(s, x);
  if (s.batch == 0) {
    std::get<0>(out).zero_();
  } else {
    const at::Tensor a = alpha.contiguous(), b = beta.contiguous();
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mnv2_depthwise_moments_backward", [&] {
      backward_impl<scalar_t>(s, x, x, w_expand, b_expand, w_dw, b_dw, w_project, b_project, out, &a, &b);
    });
  }
  return {std::get<0>(out), std::get<1>(out), std::get<2>(out), std::get<3>(out)};
}

}  // namespace

int64_t max_scratch_bytes() { return g_max_scratch_bytes.load(); }
void reset_max_scratch_bytes() { g_max_scratch_bytes = 0; }

TORCH_LIBRARY_IMPL(mnv2, CPU, m) {
  m.impl("fused_inverted_residual", &fused_inverted_residual_cpu);
  m.impl("fused_inverted_residual_backward", &fused_inverted_residual_backward_cpu);
  m.impl("pack_weights", &pack_weights_cpu);
  m.impl("fused_inverted_residual_packed", &fused_inverted_residual_packed_cpu);
  m.impl("depthwise_moments", &depthwise_moments_cpu);
  m.impl("depthwise_moments_backward", &depthwise_moments_backward_cpu);
  m.impl("pack_pointwise", &pack_pointwise_cpu);
  m.impl("pointwise_conv_packed", &pointwise_conv_packed_cpu);
  m.impl("stem_block_packed", &stem_block_packed_cpu);
  m.impl("pointwise_conv_mean_packed", &pointwise_conv_mean_packed_cpu);
  m.impl("mobilenet_v2_packed", &mobilenet_v2_packed_cpu);
}

}  // namespace mnv2
