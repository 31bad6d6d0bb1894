// Every operator schema of the mnv2 library, plus the small non-tensor API
// (build information, CPU ISA) exposed through pybind11. Backends add
// implementations with TORCH_LIBRARY_IMPL(mnv2, <Backend>, m).
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/extension.h>

#include <vector>
#include <torch/library.h>

#include "core/fused_ir.h"

TORCH_LIBRARY(mnv2, m) {
  // y = Wp relu6(dw3x3(relu6(We x + be), stride) + bd) + bp (+ x), all BN folded.
  //   x [N, Cin, H, W]; w_expand [hidden, Cin] and b_expand [hidden], both absent when t == 1;
  //   w_dw [hidden, 3, 3]; b_dw [hidden]; w_project [Cout, hidden]; b_project [Cout].
  // The output keeps the input's memory format.
  m.def(
      "fused_inverted_residual(Tensor x, Tensor? w_expand, Tensor? b_expand, Tensor w_dw, "
      "Tensor b_dw, Tensor w_project, Tensor b_project, int stride, bool residual) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  // Gradients of the above for grad_y; recomputes the hidden activations row by row.
  // grad_w_expand and grad_b_expand are empty when t == 1.
  m.def(
      "fused_inverted_residual_backward(Tensor grad_y, Tensor x, Tensor? w_expand, "
      "Tensor? b_expand, Tensor w_dw, Tensor b_dw, Tensor w_project, Tensor b_project, "
      "int stride, bool residual) -> (Tensor grad_x, Tensor grad_w_expand, Tensor grad_b_expand, "
      "Tensor grad_w_dw, Tensor grad_b_dw, Tensor grad_w_project, Tensor grad_b_project)",
      {at::Tag::pt2_compliant_tag});
  // Inference with cached weights: pack_weights folds nothing, it only lays the
  // (already BN-folded) weights out for this machine's CPU kernel; the result
  // is opaque and valid for this process's ISA and dtype. The packed forward has
  // no autograd.
  m.def(
      "pack_weights(Tensor? w_expand, Tensor? b_expand, Tensor w_dw, Tensor b_dw, "
      "Tensor w_project, Tensor b_project) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "fused_inverted_residual_packed(Tensor x, Tensor packed, int hidden, int cout, "
      "bool has_expand, int stride, bool residual) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  // Pointwise (1x1) convolution for inference with cached weights, the model's head:
  // y = act(conv1x1(x, weight) + bias), act 0 none, 1 ReLU, 2 ReLU6. weight (cout, cin)
  // and bias (cout,) are packed once for this machine's CPU kernel (opaque result); x
  // must be channels_last, and so is y. No autograd.
  m.def("pack_pointwise(Tensor weight, Tensor bias) -> Tensor", {at::Tag::pt2_compliant_tag});
  m.def("pointwise_conv_packed(Tensor x, Tensor packed, int cout, int activation) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  // MobileNetV2's stem and first block in one pass, for inference with cached weights:
  // y = block(relu6(conv3x3(image, stride 2, padding 1) + b)) for a block without
  // expansion or residual. stem_packed is pack_pointwise of the stem weight laid out
  // as a (channels, 9 C) matrix, column (kh * 3 + kw) * C + c; packed is the block's
  // pack_weights. The stem's output is never stored. No autograd.
  m.def(
      "stem_block_packed(Tensor image, Tensor stem_packed, Tensor packed, int channels, int cout, "
      "int stride) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  // The head and global average pooling in one pass, for inference with cached
  // weights: (N, cout) = mean over (H, W) of act(conv1x1(x) + bias), weights from
  // pack_pointwise, x channels_last. The head's output is never stored. No autograd.
  m.def("pointwise_conv_mean_packed(Tensor x, Tensor packed, int cout, int activation) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  // MobileNetV2's whole inference on packed weights in one call: stem_block_packed
  // (first_args: channels, cout, stride), then fused_inverted_residual_packed per block
  // (block_args: hidden, cout, has_expand, stride, residual for each), then
  // pointwise_conv_mean_packed (head_args: cout, activation), then the classifier as
  // pointwise_conv_packed on the pooled rows -> (N, classes). No autograd.
  m.def(
      "mobilenet_v2_packed(Tensor image, Tensor stem_packed, Tensor first_packed, int[] first_args, "
      "Tensor[] blocks, int[] block_args, Tensor head_packed, int[] head_args, "
      "Tensor classifier_packed, int classes) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  // Batch statistics for train-mode batch norm without the hidden tensor in
  // autograd: each op saves only its inputs and recomputes in its backward.
  // Per-channel mean and biased covariance of x over (N, H, W): bn1's statistics
  // follow as W mean and diag(W cov W^T).
  m.def("channel_moments(Tensor x) -> (Tensor mean, Tensor cov)", {at::Tag::pt2_compliant_tag});
  // Per-channel mean and biased variance over (N, Ho, Wo) of the depthwise output
  // (before its bias) of relu6(w_expand x + b_expand): bn2's statistics.
  m.def(
      "depthwise_moments(Tensor x, Tensor? w_expand, Tensor? b_expand, Tensor w_dw, int stride) "
      "-> (Tensor mean, Tensor var)",
      {at::Tag::pt2_compliant_tag});
  // Gradients of depthwise_moments' inputs for grad_z2 = alpha + beta * z2 (alpha, beta:
  // (hidden,) vectors formed from the incoming gradients of mean and var). CPU kernel: the
  // fused backward kernel with the project step replaced; recomputes, allocates nothing
  // hidden-sized.
  m.def(
      "depthwise_moments_backward(Tensor x, Tensor? w_expand, Tensor? b_expand, Tensor w_dw, "
      "int stride, Tensor alpha, Tensor beta) -> (Tensor grad_x, Tensor grad_w_expand, "
      "Tensor grad_b_expand, Tensor grad_w_dw)",
      {at::Tag::pt2_compliant_tag});
}

// The inference-only operators have no derivative: differentiating through
// them raises "derivative for ... is not implemented" instead of silently
// dropping gradients, and the forward stays in C++ (no Python autograd hop).
TORCH_LIBRARY_IMPL(mnv2, Autograd, m) {
  m.impl("pack_weights", torch::autograd::autogradNotImplementedFallback());
  m.impl("fused_inverted_residual_packed", torch::autograd::autogradNotImplementedFallback());
  m.impl("pack_pointwise", torch::autograd::autogradNotImplementedFallback());
  m.impl("pointwise_conv_packed", torch::autograd::autogradNotImplementedFallback());
  m.impl("stem_block_packed", torch::autograd::autogradNotImplementedFallback());
  m.impl("pointwise_conv_mean_packed", torch::autograd::autogradNotImplementedFallback());
  m.impl("mobilenet_v2_packed", torch::autograd::autogradNotImplementedFallback());
}

namespace mnv2 {
int64_t max_scratch_bytes();  // csrc/cpu/fused_ir_cpu.cpp
void reset_max_scratch_bytes();
}  // namespace mnv2

namespace {

std::string active_cpu_isa() {
  try {
    return mnv2::isa_name(mnv2::active_kernels().isa);
  } catch (const std::runtime_error& e) {
    TORCH_CHECK(false, e.what());
  }
}

pybind11::dict build_info() {
  pybind11::dict info;
  pybind11::list compiled, supported;
  for (mnv2::Isa isa : {mnv2::Isa::kScalar, mnv2::Isa::kAvx2, mnv2::Isa::kAvx512,
                        mnv2::Isa::kNeon}) {
    if (mnv2::isa_compiled(isa)) compiled.append(mnv2::isa_name(isa));
    if (mnv2::kernel_table(isa) != nullptr) supported.append(mnv2::isa_name(isa));
  }
  info["cpu_isas_compiled"] = compiled;
  info["cpu_isas_runnable"] = supported;
#ifdef MNV2_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
  return info;
}

int64_t packed_numel(int64_t cin, int64_t hidden, int64_t cout, bool has_expand, bool is_double) {
  mnv2::BlockShape s{};
  s.cin = cin;
  s.hidden = hidden;
  s.cout = cout;
  s.has_expand = has_expand;
  const mnv2::KernelTable& k = mnv2::active_kernels();
  return mnv2::make_layout(s, is_double ? k.f64.vl : k.f32.vl, false).total;
}

// What a cached value (folded or packed weights) was derived from: each tensor's
// Python object, its TensorImpl, version counter and data pointer at stamping.
// valid() says whether every object still holds the same impl (torch.utils.swap_tensors
// changes it), unchanged in place (version) and with the same data (`t.data = ...`
// leaves the version alone). The stamp holds the Python objects (which hold their
// impls) and the storages, so no data address can be reused while it exists; it adds
// no weakref and no impl reference (swap_tensors refuses tensors with either).
// One C++ loop: a module checks its cache on every inference call.
class TensorStamp {
 public:
  explicit TensorStamp(const pybind11::sequence& tensors) {
    for (const pybind11::handle h : tensors) {
      TORCH_CHECK(THPVariable_Check(h.ptr()), "TensorStamp: expected tensors");
      const at::Tensor& t = THPVariable_Unpack(h.ptr());
      Entry e{pybind11::reinterpret_borrow<pybind11::object>(h), t.unsafeGetTensorImpl(),
              t._version(), t.has_storage() ? t.storage() : c10::Storage(), data_of(t)};
      entries_.push_back(std::move(e));
    }
  }

  bool valid() const {
    for (const Entry& e : entries_) {
      PyObject* o = e.object.ptr();
      if (!THPVariable_Check(o)) return false;
      const at::Tensor& t = THPVariable_Unpack(o);
      if (t.unsafeGetTensorImpl() != e.impl || t._version() != e.version || data_of(t) != e.data) {
        return false;
      }
    }
    return true;
  }

 private:
  struct Entry {
    pybind11::object object;
    const c10::TensorImpl* impl;
    int64_t version;
    c10::Storage storage;
    const void* data;
  };
  static const void* data_of(const at::Tensor& t) {
    if (!t.has_storage()) return nullptr;
    return static_cast<const char*>(t.storage().data()) + t.storage_offset() * t.itemsize();
  }
  std::vector<Entry> entries_;
};

// Whether every module of a list is in eval mode without forward hooks or pre-hooks,
// read from each module's __dict__ (where nn.Module keeps `training` and its hook
// dicts) in one C++ loop: the whole-model inference plan checks ~200 modules on
// every call, 0.25 ms as a Python loop over attributes the kernels have evicted
// from the cache.
class ModulesIdle {
 public:
  explicit ModulesIdle(const pybind11::sequence& modules)
      : training_("training"), hooks_("_forward_hooks"), pre_hooks_("_forward_pre_hooks") {
    for (const pybind11::handle h : modules) modules_.push_back(pybind11::reinterpret_borrow<pybind11::object>(h));
  }

  bool operator()() const {
    for (const pybind11::object& m : modules_) {
      PyObject* d = PyObject_GenericGetDict(m.ptr(), nullptr);
      if (d == nullptr) throw pybind11::error_already_set();
      const bool idle = idle_dict(d);
      Py_DECREF(d);
      if (!idle) return false;
    }
    return true;
  }

 private:
  bool idle_dict(PyObject* d) const {
    if (!PyDict_Check(d) || PyDict_GetItemWithError(d, training_.ptr()) != Py_False) return false;
    for (const pybind11::str* key : {&hooks_, &pre_hooks_}) {
      PyObject* hooks = PyDict_GetItemWithError(d, key->ptr());
      if (hooks == nullptr || !PyDict_Check(hooks) || PyDict_Size(hooks) != 0) return false;
    }
    return true;
  }

  pybind11::str training_, hooks_, pre_hooks_;
  std::vector<pybind11::object> modules_;
};

int64_t pointwise_packed_numel(int64_t cin, int64_t cout, bool is_double) {
  const mnv2::KernelTable& k = mnv2::active_kernels();
  return mnv2::make_pointwise_layout(cin, cout, is_double ? k.f64.vl : k.f32.vl).total;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mnv2_kernels compiled backend";
  m.def("cpu_isa", &active_cpu_isa,
        "Instruction set of the CPU kernels in use (the best available, or MNV2_CPU_ISA).");
  m.def("build_info", &build_info, "What this build contains and what this machine can run.");
  m.def("max_scratch_bytes", &mnv2::max_scratch_bytes,
        "Largest per-thread kernel scratch requested since start (or the last reset).");
  m.def("reset_max_scratch_bytes", &mnv2::reset_max_scratch_bytes);
  m.def("packed_numel", &packed_numel,
        "Elements of mnv2::pack_weights' result for a block on this machine's CPU kernel.");
  pybind11::class_<TensorStamp>(m, "TensorStamp",
                                "Stamp of tensors a cached value was derived from (see _cache.py).")
      .def(pybind11::init<const pybind11::sequence&>())
      .def("valid", &TensorStamp::valid);
  pybind11::class_<ModulesIdle>(m, "ModulesIdle",
                                "Callable: whether every module given is in eval mode with no "
                                "forward hook or pre-hook (read from each __dict__).")
      .def(pybind11::init<const pybind11::sequence&>())
      .def("__call__", &ModulesIdle::operator());
  m.def("pointwise_packed_numel", &pointwise_packed_numel,
        "Elements of mnv2::pack_pointwise's result on this machine's CPU kernel.");
}
