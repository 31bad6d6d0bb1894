// AVX-512F build of the kernels (flags in cmake/isa_flags.txt).
#if !defined(__AVX512F__)
#error "kernels_avx512.cpp must be compiled with -mavx512f"
#endif
#define MNV2_VEC_BYTES 64
#define MNV2_VEC_REGS 32  // zmm0-31: a 14 x 2 register tile
#include "../kernels/kernel_table.inl"

MNV2_DEFINE_KERNEL_TABLE(Avx512)
