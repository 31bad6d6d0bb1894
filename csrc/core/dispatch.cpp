// Chooses the kernel table once from the CPU's features, or from MNV2_CPU_ISA.
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "fused_ir.h"

namespace mnv2 {

extern const KernelTable kKernelsScalar;
#if defined(__x86_64__) || defined(_M_X64)
extern const KernelTable kKernelsAvx2;
extern const KernelTable kKernelsAvx512;
#endif
#if defined(__aarch64__)
extern const KernelTable kKernelsNeon;
#endif

namespace {

const KernelTable* compiled_table(Isa isa) {
  switch (isa) {
    case Isa::kScalar: return &kKernelsScalar;
#if defined(__x86_64__) || defined(_M_X64)
    case Isa::kAvx2: return &kKernelsAvx2;
    case Isa::kAvx512: return &kKernelsAvx512;
#endif
#if defined(__aarch64__)
    case Isa::kNeon: return &kKernelsNeon;
#endif
    default: return nullptr;
  }
}

const KernelTable& choose() {
  const char* forced = std::getenv("MNV2_CPU_ISA");
  if (forced != nullptr && forced[0] != '\0') {
    for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512, Isa::kNeon}) {
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
    throw std::runtime_error(std::string("MNV2_CPU_ISA=") + forced +
                             " is not one of scalar, avx2, avx512, neon");
  }
  for (Isa isa : {Isa::kAvx512, Isa::kAvx2, Isa::kNeon}) {
    if (const KernelTable* t = kernel_table(isa)) return *t;
  }
  return kKernelsScalar;
}

}  // namespace

bool isa_compiled(Isa isa) { return compiled_table(isa) != nullptr; }

bool cpu_supports(Isa isa) {
  switch (isa) {
    case Isa::kScalar: return true;
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
    case Isa::kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case Isa::kAvx512: return __builtin_cpu_supports("avx512f");
#endif
#if defined(__aarch64__)
    case Isa::kNeon: return true;
#endif
    default: return false;
  }
}

const KernelTable* kernel_table(Isa isa) {
  return cpu_supports(isa) ? compiled_table(isa) : nullptr;
}

const KernelTable& active_kernels() {
  static const KernelTable& table = choose();
  return table;
}

}  // namespace mnv2
