// CPU operators of the pointwise (1x1) convolution on packed weights: the model's
// head (alone or fused with the global average pooling) and the classifier.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "cpu/common.h"

namespace mnv2 {
namespace cpu {
namespace {

at::Tensor pack_pointwise_cpu(const at::Tensor& weight, const at::Tensor& bias) {
  TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kDouble,
              "mnv2: pack_pointwise supports float32 and float64, got ", weight.scalar_type());
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) >= 1 && weight.size(1) >= 1,
              "mnv2: pack_pointwise needs a (cout, cin) weight, got shape ", weight.sizes());
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == weight.size(0),
              "mnv2: pack_pointwise needs a (cout,) bias, got shape ", bias.sizes(), " for cout ", weight.size(0));
  TORCH_CHECK(bias.scalar_type() == weight.scalar_type() && bias.device() == weight.device(),
              "mnv2: pack_pointwise's bias must have the weight's dtype and device");
  at::Tensor packed;
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "mnv2_pack_pointwise", [&] {
    const PointwiseLayout l = make_pointwise_layout(weight.size(1), weight.size(0), kernels().get<scalar_t>().vl);
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
  TORCH_CHECK(activation >= 0 && activation <= 2, "mnv2: activation must be 0 (none), 1 (ReLU) or 2 (ReLU6), got ",
              activation);
  TORCH_CHECK(cout >= 1, "mnv2: cout must be >= 1, got ", cout);
  TORCH_CHECK(packed.device() == x.device() && packed.scalar_type() == x.scalar_type() && packed.dim() == 1 &&
                  packed.is_contiguous(),
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

}  // namespace

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
                                    x.size(1), packed.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(),
                                    cout};
    // items: column groups (outer, so a thread's range reads only its share of the
    // weights) by row blocks
    constexpr int64_t kCols = 64, kRows = 128;
    const int64_t col_groups = (cout + kCols - 1) / kCols, row_blocks = (rows + kRows - 1) / kRows;
    at::parallel_for(0, col_groups * row_blocks, 1, [&](int64_t begin, int64_t end) {
      scalar_t* scratch = thread_scratch<scalar_t>(kPointwiseScratch);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t g = item / row_blocks, rb = item % row_blocks;
        k.pointwise(a, rb * kRows, std::min(rows, (rb + 1) * kRows), g * kCols, std::min(cout, (g + 1) * kCols),
                    scratch);
      }
    });
  });
  return y;
}

// (N, cout) = mean over (H, W) of act(conv1x1(x) + bias); the head's output is never stored.
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
    // items: images by column groups (each thread reads only its share of the weights at batch 1)
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

TORCH_LIBRARY_IMPL(mnv2, CPU, m) {
  m.impl("pack_pointwise", &pack_pointwise_cpu);
  m.impl("pointwise_conv_packed", &pointwise_conv_packed_cpu);
  m.impl("pointwise_conv_mean_packed", &pointwise_conv_mean_packed_cpu);
}

}  // namespace cpu
}  // namespace mnv2
