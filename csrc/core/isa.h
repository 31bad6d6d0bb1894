// The CPU instruction sets the core has kernels for: the one list that the
// dispatch, build_info() and the error messages read.
#pragma once

namespace mnv2 {

#if defined(__x86_64__) || defined(_M_X64)
#define MNV2_TARGET_X86 1
#else
#define MNV2_TARGET_X86 0
#endif
#if defined(__aarch64__)
#define MNV2_TARGET_AARCH64 1
#else
#define MNV2_TARGET_AARCH64 0
#endif

// X(Name, name, compiled for this target). Later entries are preferred when the CPU
// runs them. Each compiled ISA has a translation unit isa/kernels_<name>.cpp that
// defines kKernels<Name>, built with that ISA's flags (cmake/isa_flags.txt).
#define MNV2_ISAS(X)                       \
  X(Scalar, scalar, 1)                     \
  X(Avx2, avx2, MNV2_TARGET_X86)           \
  X(Avx512, avx512, MNV2_TARGET_X86)       \
  X(Neon, neon, MNV2_TARGET_AARCH64)

enum class Isa {
#define MNV2_ISA_ENUM(Name, name, compiled) k##Name,
  MNV2_ISAS(MNV2_ISA_ENUM)
#undef MNV2_ISA_ENUM
};

constexpr Isa kAllIsas[] = {
#define MNV2_ISA_VALUE(Name, name, compiled) Isa::k##Name,
    MNV2_ISAS(MNV2_ISA_VALUE)
#undef MNV2_ISA_VALUE
};

const char* isa_name(Isa isa);
// "scalar, avx2, ...": every name of the list, for messages.
const char* isa_names();
bool cpu_supports(Isa isa);
bool isa_compiled(Isa isa);

}  // namespace mnv2
