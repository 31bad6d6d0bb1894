// AVX2 + FMA build of the fused block. Compiled with -mavx2 -mfma -ffp-contract=fast.
#if !defined(__AVX2__) || !defined(__FMA__)
#error "fused_ir_avx2.cpp must be compiled with -mavx2 -mfma"
#endif
#define MNV2_VEC_BYTES 32
#define MNV2_MR 6  // 6 x 2 vectors: 12 of the 16 ymm registers hold accumulators
#include "fused_ir_impl.inl"

namespace mnv2 {
extern const KernelTable kKernelsAvx2 = {
    Isa::kAvx2,
    {FusedBlock<float>::VL, &FusedBlock<float>::forward_entry, &FusedBlock<float>::backward_entry,
     &FusedBlock<float>::pointwise_entry,
     &FusedBlock<float>::pointwise_mean_entry},
    {FusedBlock<double>::VL, &FusedBlock<double>::forward_entry, &FusedBlock<double>::backward_entry,
     &FusedBlock<double>::pointwise_entry,
     &FusedBlock<double>::pointwise_mean_entry}};
}  // namespace mnv2
