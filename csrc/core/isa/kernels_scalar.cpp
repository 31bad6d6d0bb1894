// Portable build of the kernels: no ISA flags beyond the target's baseline.
#define MNV2_VEC_BYTES 16
#define MNV2_VEC_REGS 16  // SSE2's xmm0-15 on x86-64 (AArch64 has more): a 6 x 2 register tile
#include "../kernels/kernel_table.inl"

MNV2_DEFINE_KERNEL_TABLE(Scalar)
