// AVX2 + FMA build of the kernels (flags in cmake/isa_flags.txt).
#if !defined(__AVX2__) || !defined(__FMA__)
#error "kernels_avx2.cpp must be compiled with -mavx2 -mfma"
#endif
#define MNV2_VEC_BYTES 32
#define MNV2_MR 6  // 6 x 2 vectors: 12 of the 16 ymm registers hold accumulators
#include "../kernels/kernel_table.inl"

MNV2_DEFINE_KERNEL_TABLE(Avx2)
