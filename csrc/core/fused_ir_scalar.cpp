// Portable build of the fused block: no ISA flags beyond the target's baseline.
#define MNV2_VEC_BYTES 16
#define MNV2_MR 4
#include "fused_ir_impl.inl"

namespace mnv2 {
extern const KernelTable kKernelsScalar = {
    Isa::kScalar,
    {FusedBlock<float>::VL, &FusedBlock<float>::forward_entry, &FusedBlock<float>::backward_entry,
     &FusedBlock<float>::pointwise_entry,
     &FusedBlock<float>::pointwise_mean_entry},
    {FusedBlock<double>::VL, &FusedBlock<double>::forward_entry, &FusedBlock<double>::backward_entry,
     &FusedBlock<double>::pointwise_entry,
     &FusedBlock<double>::pointwise_mean_entry}};
}  // namespace mnv2
