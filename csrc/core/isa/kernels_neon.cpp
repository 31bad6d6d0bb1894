// AArch64 build of the kernels (NEON is part of the base ISA there; flags in
// cmake/isa_flags.txt).
#if !defined(__aarch64__)
#error "kernels_neon.cpp is for AArch64"
#endif
#define MNV2_VEC_BYTES 16
#define MNV2_VEC_REGS 32  // v0-v31: a 14 x 2 register tile
#include "../kernels/kernel_table.inl"

MNV2_DEFINE_KERNEL_TABLE(Neon)
