// AArch64 build of the fused block (NEON is part of the base ISA there).
#if !defined(__aarch64__)
#error "fused_ir_neon.cpp is for AArch64"
#endif
#define MNV2_VEC_BYTES 16
#define MNV2_MR 8  // 8 x 2 vectors: 16 of the 32 q registers hold accumulators
#include "fused_ir_impl.inl"

namespace mnv2 {
extern const KernelTable kKernelsNeon = {
    Isa::kNeon,
    {FusedBlock<float>::VL, &FusedBlock<float>::forward_entry, &FusedBlock<float>::backward_entry,
     &FusedBlock<float>::pointwise_entry,
     &FusedBlock<float>::pointwise_mean_entry},
    {FusedBlock<double>::VL, &FusedBlock<double>::forward_entry, &FusedBlock<double>::backward_entry,
     &FusedBlock<double>::pointwise_entry,
     &FusedBlock<double>::pointwise_mean_entry}};
}  // namespace mnv2
