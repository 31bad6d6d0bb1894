#include "python/module_state.h"

#include <torch/csrc/autograd/python_variable.h>

#include <vector>

namespace mnv2 {
namespace python {
namespace {

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
      Entry e{pybind11::reinterpret_borrow<pybind11::object>(h), t.unsafeGetTensorImpl(), t._version(),
              t.has_storage() ? t.storage() : c10::Storage(), data_of(t)};
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
// read from each module's instance dictionary (where nn.Module keeps `training` and
// its hook dicts) in one C++ loop: the whole-model inference plan checks ~200 modules
// on every call, where a Python loop over attributes that the kernels have evicted
// from the cache costs a noticeable share of a batch-1 inference.
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

}  // namespace

void bind_module_state(pybind11::module_& m) {
  pybind11::class_<TensorStamp>(m, "TensorStamp",
                                "Stamp of the tensors a cached value was derived from (see inference.py).")
      .def(pybind11::init<const pybind11::sequence&>())
      .def("valid", &TensorStamp::valid);
  pybind11::class_<ModulesIdle>(m, "ModulesIdle",
                                "Callable: whether every module given is in eval mode with no forward hook "
                                "or pre-hook.")
      .def(pybind11::init<const pybind11::sequence&>())
      .def("__call__", &ModulesIdle::operator());
}

}  // namespace python
}  // namespace mnv2
