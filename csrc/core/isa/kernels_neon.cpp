// AArch64 build of the kernels (NEON is part of the base ISA there; flags in
// cmake/isa_flags.txt).
#if !defined(__aarch64__)
#error "kernels_neon.cpp is for AArch64"
#endif
#define MNV2_VEC_BYTES 16
#define MNV2_MR 8  // 8 x 2 vectors: 16 of the 32 q registers hold accumulators
#include "../kernels/kernel_table.inl"

MNV2_DEFINE_KERNEL_TABLE(Neon)
