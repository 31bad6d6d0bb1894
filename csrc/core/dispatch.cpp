// Chooses the kernel table once from the CPU's features, or from MNV2_CPU_ISA.
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "kernels.h"

namespace mnv2 {

// Defined by isa/kernels_<name>.cpp for the ISAs compiled for this target.
#define MNV2_DECLARE_TABLE(Name, name, compiled) extern const KernelTable kKernels##Name;
MNV2_ISAS(MNV2_DECLARE_TABLE)
#undef MNV2_DECLARE_TABLE

namespace {

// Whether the CPU runs each ISA (asked only of ISAs compiled for this target).
bool cpu_runs(Isa isa) {
#if MNV2_TARGET_X86 && (defined(__GNUC__) || defined(__clang__))
  if (isa == Isa::kAvx2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (isa == Isa::kAvx512) return __builtin_cpu_supports("avx512f");
#endif
  return isa == Isa::kScalar || isa == Isa::kNeon;  // NEON: part of AArch64's base ISA
}

const KernelTable* compiled_table(Isa isa) {
#define MNV2_TABLE_CASE(Name, name, compiled) \
  if constexpr (compiled) {                   \
    if (isa == Isa::k##Name) return &kKernels##Name; \
  }
  MNV2_ISAS(MNV2_TABLE_CASE)
#undef MNV2_TABLE_CASE
  return nullptr;
}

const KernelTable& choose() {
  const char* forced = std::getenv("MNV2_CPU_ISA");
  if (forced != nullptr && forced[0] != '\0') {
    for (Isa isa : kAllIsas) {
      if (std::strcmp(forced, isa_name(isa)) != 0) continue;
      if (!isa_compiled(isa)) {
        throw std::runtime_error(std::string("MNV2_CPU_ISA=") + forced +
                                 ": this build has no kernels for that ISA");
      }
      if (!cpu_supports(isa)) {
        throw std::runtime_error(std::string("MNV2_CPU_ISA=") + forced +
                                 ": this CPU does not support that ISA");
      }
      return *compiled_table(isa);
    }
    throw std::runtime_error(std::string("MNV2_CPU_ISA=") + forced + " is not one of " + isa_names());
  }
  const KernelTable* best = nullptr;
  for (Isa isa : kAllIsas) {  // later entries are preferred
    if (const KernelTable* t = kernel_table(isa)) best = t;
  }
  return *best;  // scalar at least
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
#define MNV2_NAME_CASE(Name, name, compiled) \
  case Isa::k##Name: return #name;
    MNV2_ISAS(MNV2_NAME_CASE)
#undef MNV2_NAME_CASE
  }
  return "unknown";
}

const char* isa_names() {
  static const std::string names = [] {
    std::string s;
    for (Isa isa : kAllIsas) s += (s.empty() ? "" : ", ") + std::string(isa_name(isa));
    return s;
  }();
  return names.c_str();
}

bool isa_compiled(Isa isa) { return compiled_table(isa) != nullptr; }

bool cpu_supports(Isa isa) { return isa_compiled(isa) && cpu_runs(isa); }

const KernelTable* kernel_table(Isa isa) {
  return cpu_supports(isa) ? compiled_table(isa) : nullptr;
}

const KernelTable& active_kernels() {
  static const KernelTable& table = choose();
  return table;
}

}  // namespace mnv2
