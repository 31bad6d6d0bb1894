// CPU operators of MobileNetV2's inference beyond the blocks: the stem fused into the
// first block, and the whole model in one call.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "cpu/common.h"

namespace mnv2 {
namespace cpu {

// MobileNetV2's stem and first block in one pass: y = block(relu6(conv(image) + b)) for a
// t == 1 block without residual, conv being the stem (kStemKernel, stride kStemStride).
// The stem's output (the block's input) is computed row by row inside the block's window
// and never stored.
// out_format: the output's memory format (the operator: the image's; the whole model:
// channels_last, whatever the image's layout, since the stem reads the image by strides).
at::Tensor stem_block_packed(const at::Tensor& image, const at::Tensor& stem_packed, const at::Tensor& packed,
                             int64_t channels, int64_t cout, int64_t stride, at::MemoryFormat out_format) {
  check_x(image, "image");
  TORCH_CHECK(image.size(1) >= 1, "mnv2: image must have channels, height and width >= 1, got ", image.sizes());
  TORCH_CHECK(channels >= 1 && cout >= 1, "mnv2: channels and cout must be >= 1, got ", channels, " and ", cout);
  for (const at::Tensor* t : {&stem_packed, &packed}) {
    TORCH_CHECK(t->device() == image.device() && t->scalar_type() == image.scalar_type() && t->dim() == 1 &&
                    t->is_contiguous(),
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
  s.in_h = (image.size(2) + 2 * kStemPad - kStemKernel) / kStemStride + 1;
  s.in_w = (image.size(3) + 2 * kStemPad - kStemKernel) / kStemStride + 1;
  const char* err = validate_shape(s);
  TORCH_CHECK(err == nullptr, "mnv2: ", err);
  at::Tensor y = at::empty({s.batch, s.cout, s.out_h(), s.out_w()}, image.options().memory_format(out_format));
  AT_DISPATCH_FLOATING_TYPES(image.scalar_type(), "mnv2_stem_block_packed", [&] {
    const int64_t vl = kernels().get<scalar_t>().vl;
    const Layout l = make_layout(s, vl, Packing::kForward);
    TORCH_CHECK(packed.numel() == l.total && packed_matches<scalar_t>(s, l, packed.const_data_ptr<scalar_t>()),
                "mnv2: the packed block weights were not packed for a ", channels, " -> ", cout,
                " block without expansion on this machine's kernel; re-pack them");
    const int64_t k = kStemTaps * image.size(1);
    const PointwiseLayout sl = make_pointwise_layout(k, channels, vl);
    TORCH_CHECK(stem_packed.numel() == sl.total && packed_matches<scalar_t>(sl, stem_packed.const_data_ptr<scalar_t>()),
                "mnv2: the packed stem weights were not packed for a ", kStemKernel, "x", kStemKernel,
                " convolution from ", image.size(1), " to ", channels, " channels (a (", channels, ", ", k,
                ") matrix) on this machine's kernel; re-pack them");
    const StemInput stem{image, stem_packed, sl};
    if (s.batch > 0) run_forward<scalar_t>(s, l, image, packed, y, &stem);
  });
  return y;
}

at::Tensor stem_block_packed_cpu(const at::Tensor& image, const at::Tensor& stem_packed,
                                 const at::Tensor& packed, int64_t channels, int64_t cout, int64_t stride) {
  return stem_block_packed(image, stem_packed, packed, channels, cout, stride, image.suggest_memory_format());
}

namespace {

// MobileNetV2's whole inference on packed weights in one call, without a return to
// Python between layers, on an image of any layout (NCHW or channels_last; the
// activations are channels_last from the stem on): stem + first block, the other blocks, the head with global
// average pooling and the classifier (pointwise on the pooled rows; its dropout is the
// identity in inference). first_args: (channels, cout, stride) of stem_block_packed;
// block_args: (hidden, cout, has_expand, stride, residual, dilation, kernel_size, relu6) per
// block (relu6 1: ReLU6, 0: ReLU); head_args:
// (cout, activation).
at::Tensor mobilenet_v2_packed_cpu(const at::Tensor& image, const at::Tensor& stem_packed,
                                   const at::Tensor& first_packed, at::IntArrayRef first_args, at::TensorList blocks,
                                   at::IntArrayRef block_args, const at::Tensor& head_packed,
                                   at::IntArrayRef head_args, const at::Tensor& classifier_packed, int64_t classes) {
  constexpr size_t kFirstArgs = 3, kBlockArgs = 8, kHeadArgs = 2;
  TORCH_CHECK(first_args.size() == kFirstArgs, "mnv2: first_args must be (channels, cout, stride), got ",
              first_args.size(), " values");
  TORCH_CHECK(block_args.size() == kBlockArgs * blocks.size(), "mnv2: block_args must hold ", kBlockArgs,
              " values per block (hidden, cout, has_expand, stride, residual, dilation, kernel_size, relu6): ", blocks.size(), " blocks need ",
              kBlockArgs * blocks.size(), ", got ", block_args.size());
  TORCH_CHECK(head_args.size() == kHeadArgs, "mnv2: head_args must be (cout, activation), got ", head_args.size(),
              " values");
  at::Tensor h = stem_block_packed(image, stem_packed, first_packed, first_args[0], first_args[1], first_args[2],
                                   at::MemoryFormat::ChannelsLast);
  for (size_t b = 0; b < blocks.size(); ++b) {
    const int64_t* a = block_args.data() + kBlockArgs * b;
    TORCH_CHECK((a[2] == 0 || a[2] == 1) && (a[4] == 0 || a[4] == 1) && (a[7] == 0 || a[7] == 1), "mnv2: block ",
                b, "'s has_expand, residual and relu6 must be 0 or 1, got ", a[2], ", ", a[4], " and ", a[7]);
    h = fused_inverted_residual_packed_cpu(h, blocks[b], a[0], a[1], a[2] != 0, a[3], a[4] != 0, a[5], a[6],
                                           a[7] != 0 ? "relu6" : "relu");
  }
  if (!h.is_contiguous(at::MemoryFormat::ChannelsLast)) h = h.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor pooled = pointwise_conv_mean_packed_cpu(h, head_packed, head_args[0], head_args[1]);
  const int64_t n = pooled.size(0), c = pooled.size(1);
  return pointwise_conv_packed_cpu(pooled.view({n, c, 1, 1}), classifier_packed, classes, 0).view({n, classes});
}

}  // namespace

TORCH_LIBRARY_IMPL(mnv2, CPU, m) {
  m.impl("stem_block_packed", &stem_block_packed_cpu);
  m.impl("mobilenet_v2_packed", &mobilenet_v2_packed_cpu);
}

}  // namespace cpu
}  // namespace mnv2
