// Portable build of the kernels: no ISA flags beyond the target's baseline.
#define MNV2_VEC_BYTES 16
#define MNV2_MR 4
#include "../kernels/kernel_table.inl"

MNV2_DEFINE_KERNEL_TABLE(Scalar)
