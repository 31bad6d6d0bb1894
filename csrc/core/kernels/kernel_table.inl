#pragma once
// Every kernel of one instruction set, gathered into its KernelTable:
// MNV2_DEFINE_KERNEL_TABLE(Name) defines kKernels<Name> (see isa.h).
#include "block_backward.inl"
#include "block_forward.inl"
#include "depthwise_stats.inl"
#include "pointwise.inl"

#define MNV2_KERNELS_OF(T)                                                                     \
  {                                                                                             \
    ::mnv2::Simd<T>::VL, ::mnv2::Simd<T>::MR, &::mnv2::BlockForward<T>::entry,                 \
        &::mnv2::BlockBackward<T>::entry,                                                       \
        &::mnv2::DepthwiseStats<T>::entry, &::mnv2::BlockBackward<T>::stats_entry,              \
        &::mnv2::Pointwise<T>::entry, &::mnv2::Pointwise<T>::mean_entry                         \
  }

#define MNV2_DEFINE_KERNEL_TABLE(Name)                                                         \
  namespace mnv2 {                                                                              \
  extern const KernelTable kKernels##Name = {Isa::k##Name, MNV2_KERNELS_OF(float),              \
                                             MNV2_KERNELS_OF(double)};                          \
  }
