// Python classes that read tensors' and modules' state from C++ in one loop, for
// the inference caches (mnv2_kernels/inference.py).
#pragma once

#include <torch/extension.h>

namespace mnv2 {
namespace python {

// Adds TensorStamp and ModulesIdle to the extension module.
void bind_module_state(pybind11::module_& m);

}  // namespace python
}  // namespace mnv2
