// The extension's small non-tensor API, through pybind11: build information, the CPU
// ISA in use, scratch statistics, packed sizes, and the inference caches' state
// classes. Tensor operators go through TORCH_LIBRARY (csrc/ops.cpp).
#include <torch/extension.h>

#include <stdexcept>
#include <string>

#include "core/fused_ir.h"
#include "cpu/common.h"
#include "python/module_state.h"

namespace mnv2 {
namespace python {
namespace {

std::string active_cpu_isa() {
  try {
    return isa_name(active_kernels().isa);
  } catch (const std::runtime_error& e) {
    TORCH_CHECK(false, e.what());
  }
}

pybind11::dict build_info() {
  pybind11::dict info;
  pybind11::list compiled, supported;
  for (Isa isa : kAllIsas) {
    if (isa_compiled(isa)) compiled.append(isa_name(isa));
    if (kernel_table(isa) != nullptr) supported.append(isa_name(isa));
  }
  info["cpu_isas_compiled"] = compiled;
  info["cpu_isas_runnable"] = supported;
  const CacheSizes& caches = machine_caches();
  pybind11::dict c;
  c["l1d"] = caches.l1d;
  c["l2"] = caches.l2;
  c["l3_per_core"] = caches.l3_per_core;
  c["source"] = machine_caches_source();
  info["cpu_caches"] = c;
  info["cpu_forward_cache_budget_bytes"] = forward_cache_budget(caches) * int64_t(sizeof(float));
  try {
    const KernelTable& k = active_kernels();
    info["cpu_gemm_tile"] = std::to_string(k.f32.tile_rows) + " rows x " + std::to_string(kGemmVectorsPerRow) +
                            " vectors of " + std::to_string(k.f32.vl) + " floats";
  } catch (const std::runtime_error&) {
    // MNV2_CPU_ISA names an ISA this machine cannot run: cpu_isa() reports it
  }
#ifdef MNV2_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
  return info;
}

int64_t vector_width(bool is_double) {
  const KernelTable& k = active_kernels();
  return is_double ? k.f64.vl : k.f32.vl;
}

int64_t packed_numel(int64_t cin, int64_t hidden, int64_t cout, bool has_expand, bool is_double,
                     int64_t kernel_size) {
  TORCH_CHECK(is_dw_kernel(static_cast<int>(kernel_size)), "mnv2: the depthwise kernel size must be 3, 5 or 7, got ",
              kernel_size);
  BlockShape s{};
  s.kernel = static_cast<int>(kernel_size);
  s.cin = cin;
  s.hidden = hidden;
  s.cout = cout;
  s.has_expand = has_expand;
  return make_layout(s, vector_width(is_double), Packing::kForward).total;
}

// The forward plan the CPU kernel uses for a block on this machine with `threads` threads.
pybind11::dict cpu_forward_plan(int64_t batch, int64_t cin, int64_t hidden, int64_t cout, int64_t stride,
                                int64_t height, int64_t width, int64_t threads, bool is_double) {
  TORCH_CHECK(stride == 1 || stride == 2, "mnv2: stride must be 1 or 2, got ", stride);
  // (the plan does not depend on the residual)
  const BlockShape s{batch, height, width, cin, hidden, cout, static_cast<int>(stride), hidden != cin, false};
  const char* err = validate_shape(s);
  TORCH_CHECK(err == nullptr, "mnv2: ", err);
  TORCH_CHECK(threads >= 1, "mnv2: threads must be >= 1, got ", threads);
  const Layout l = make_layout(s, vector_width(is_double), Packing::kForward);
  const ForwardPlan p = plan_forward(s, l, static_cast<int>(threads));
  pybind11::dict d;
  d["rows_per_band"] = p.rows_per_band;
  d["bands"] = p.n_bands;
  d["cols_per_tile"] = p.cols_per_tile;
  d["col_tiles"] = p.n_col_tiles;
  d["hidden_splits"] = p.n_splits;
  d["split_channels"] = p.split_channels;
  d["hidden_chunk"] = p.hidden_chunk;
  d["rows_per_step"] = p.rows_per_step;
  d["window_rows"] = p.window_slots;
  d["scratch_bytes"] = p.scratch_floats * (is_double ? 8 : 4);
  d["items"] = p.items(s);
  return d;
}

int64_t pointwise_packed_numel(int64_t cin, int64_t cout, bool is_double) {
  return make_pointwise_layout(cin, cout, vector_width(is_double)).total;
}

}  // namespace
}  // namespace python
}  // namespace mnv2

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace mnv2::python;
  m.doc() = "mnv2_kernels compiled backend";
  m.def("cpu_isa", &active_cpu_isa, "Instruction set of the CPU kernels in use (the best available, or MNV2_CPU_ISA).");
  m.def("build_info", &build_info, "What this build contains and what this machine can run.");
  m.def("max_scratch_bytes", [] { return mnv2::cpu::g_max_scratch_bytes.load(); },
        "Largest per-thread kernel scratch requested since start (or the last reset).");
  m.def("reset_max_scratch_bytes", [] { mnv2::cpu::g_max_scratch_bytes = 0; });
  m.def("packed_numel", &packed_numel,
        "Elements of mnv2::pack_weights' result for a block on this machine's CPU kernel.", pybind11::arg("cin"),
        pybind11::arg("hidden"), pybind11::arg("cout"), pybind11::arg("has_expand"), pybind11::arg("is_double"),
        pybind11::arg("kernel_size") = 3);
  m.def("cpu_forward_plan", &cpu_forward_plan,
        "The CPU kernel's forward plan (tiles, hidden chunk, splits) for a block on this machine.");
  m.def("pointwise_packed_numel", &pointwise_packed_numel,
        "Elements of mnv2::pack_pointwise's result on this machine's CPU kernel.");
  bind_module_state(m);
}
