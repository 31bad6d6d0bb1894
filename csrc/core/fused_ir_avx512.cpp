// AVX-512F build of the fused block. Compiled with -mavx512f -mfma -ffp-contract=fast.
#if !defined(__AVX512F__)
#error "fused_ir_avx512.cpp must be compiled with -mavx512f"
#endif
#define MNV2_VEC_BYTES 64
#define MNV2_MR 8  // 8 x 2 vectors: 16 of the 32 zmm registers hold accumulators
#include "fused_ir_impl.inl"

namespace mnv2 {
extern const KernelTable kKernelsAvx512 = {
    Isa::kAvx512,
    {FusedBlock<float>::VL, &FusedBlock<float>::forward_entry, &FusedBlock<float>::backward_entry,
     &FusedBlock<float>::pointwise_entry,
     &FusedBlock<float>::pointwise_mean_entry},
    {FusedBlock<double>::VL, &FusedBlock<double>::forward_entry, &FusedBlock<double>::backward_entry,
     &FusedBlock<double>::pointwise_entry,
     &FusedBlock<double>::pointwise_mean_entry}};
}  // namespace mnv2
