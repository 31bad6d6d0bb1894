#pragma once
// Vector helpers of one instruction set, written with GCC/Clang vector extensions.
// The ISA translation unit (isa/kernels_<name>.cpp) defines, before including the
// kernels:
//   MNV2_VEC_BYTES  vector register width in bytes
//   MNV2_VEC_REGS   vector registers the ISA has (the GEMM register tile's rows follow:
//                   gemm_tile_rows in kernels.h)
// and is compiled with that ISA's flags. Everything in kernels/ has internal linkage,
// so no code compiled for one ISA can be picked up by another at link time; for the
// same reason nothing here calls inline functions from std headers.
#include <cstring>

#include "../kernels.h"

#if defined(__clang__)
#define MNV2_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define MNV2_UNROLL _Pragma("GCC unroll 16")
#else
#define MNV2_UNROLL
#endif

namespace mnv2 {
namespace {

inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

template <typename T>
struct Simd {
  static constexpr int64_t VL = MNV2_VEC_BYTES / sizeof(T);  // also the channel padding unit
  static constexpr int MR = gemm_tile_rows(MNV2_VEC_REGS);
  typedef T vf __attribute__((vector_size(MNV2_VEC_BYTES)));
  // the same vector at element alignment, allowed to alias T: plain (vmovups) loads and stores
  typedef T vf_unaligned __attribute__((vector_size(MNV2_VEC_BYTES), aligned(sizeof(T)), may_alias));

  static vf load(const T* p) { return *reinterpret_cast<const vf_unaligned*>(p); }
  static void store(T* p, vf v) { *reinterpret_cast<vf_unaligned*>(p) = v; }
  // x - (+0) is x exactly (-0 and NaN included), so this folds to one broadcast
  // (from memory when x is a load); `vf{} + x` would keep an add: 0 + -0 is +0.
  static vf splat(T x) { return x - vf{}; }

  // min/max written as selects so that NaN passes through, as in torch.
  static vf relu6(vf v) {
    const vf zero = {};
    const vf six = zero + T(6);
    v = v < zero ? zero : v;
    return v > six ? six : v;
  }
  static vf relu(vf v) {
    const vf zero = {};
    return v < zero ? zero : v;  // NaN passes through, as in torch
  }
  // The block's activation: ReLU6, else ReLU.
  static vf activation(vf v, bool relu6) { return relu6 ? Simd::relu6(v) : relu(v); }
  // g where the activation's derivative is 1 at a: 0 < a < 6 for ReLU6 (as
  // hardtanh_backward), 0 < a for ReLU (as threshold_backward); else 0.
  static vf activation_grad(vf g, vf a, bool relu6) {
    if (relu6) return relu6_grad(g, a);
    const vf zero = {};
    return a > zero ? g : zero;
  }
  // g where 0 < a < 6 (the ReLU6 derivative, as hardtanh_backward), else 0.
  static vf relu6_grad(vf g, vf a) {
    const vf zero = {};
    const vf six = zero + T(6);
    return ((a > zero) & (a < six)) ? g : zero;
  }
};

}  // namespace
}  // namespace mnv2
