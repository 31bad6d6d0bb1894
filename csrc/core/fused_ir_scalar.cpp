// Portable build of the fused block: no ISA flags beyond the target's baseline.
#define MNV2_VL 4
#define MNV2_MR 4
#include "fused_ir_impl.inl"

namespace mnv2 {
extern const KernelTable kKernelsScalar = {Isa::kScalar, MNV2_VL, &forward_entry, &backward_entry};
}  // namespace mnv2
