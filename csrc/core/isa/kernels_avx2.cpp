// AVX2 + FMA build of the kernels (flags in cmake/isa_flags.txt).
#if !defined(__AVX2__) || !defined(__FMA__)
#error "kernels_avx2.cpp must be compiled with -mavx2 -mfma"
#endif
#define MNV2_VEC_BYTES 32
#define MNV2_VEC_REGS 16  // ymm0-15: a 6 x 2 register tile
#include "../kernels/kernel_table.inl"

MNV2_DEFINE_KERNEL_TABLE(Avx2)
