// GEMM and matrix-vector microkernels with the bias and activation in the epilogue.
#pragma once
#include "simd.inl"

namespace mnv2 {
namespace {

// Epilogue flags of the GEMM.
constexpr unsigned kAccumulate = 1u, kRelu6 = 2u, kRelu = 4u;

inline unsigned activation_flags(Activation act) {
  return act == Activation::kRelu6 ? kRelu6 : act == Activation::kRelu ? kRelu : 0u;
}

// C[M x N] (+)= A[M x K] * B[K x N] (+ bias[N]), then the activation. A is addressed by
// strides (A(i,k) = A[i*sam + k*sak]) so a strided tensor or a transposed row can be
// used in place. B is read VL columns at a time: the vector of columns [j*VL, j*VL + VL)
// in row k is at B + k*ldb + j*bjs, so a row-major B has bjs = VL and a packed
// panel-major B (Layout) has ldb = VL and bjs = K*VL, which the kernel streams
// sequentially. C has unit stride along N, and N is a multiple of VL.
template <typename T>
struct Gemm {
  using V = Simd<T>;
  using vf = typename V::vf;
  static constexpr int64_t VL = V::VL;
  static constexpr int MR = V::MR;

  static vf activate(vf v, unsigned flags) {
    if (flags & kRelu6) return V::relu6(v);
    if (flags & kRelu) return V::relu(v);
    return v;
  }

  template <int ROWS, int NV>
  static void tile(int64_t K, const T* A, int64_t sam, int64_t sak, const T* B, int64_t ldb,
                   int64_t bjs, T* C, int64_t ldc, const T* bias, unsigned flags) {
    vf acc[ROWS][NV];
    MNV2_UNROLL for (int i = 0; i < ROWS; ++i) {
      MNV2_UNROLL for (int j = 0; j < NV; ++j) {
        vf v = bias != nullptr ? V::load(bias + j * VL) : vf{};
        if (flags & kAccumulate) v += V::load(C + i * ldc + j * VL);
        acc[i][j] = v;
      }
    }
    for (int64_t k = 0; k < K; ++k) {
      vf b[NV];
      MNV2_UNROLL for (int j = 0; j < NV; ++j) b[j] = V::load(B + j * bjs);
      MNV2_UNROLL for (int i = 0; i < ROWS; ++i) {
        const vf a = V::splat(A[i * sam]);
        MNV2_UNROLL for (int j = 0; j < NV; ++j) acc[i][j] += a * b[j];
      }
      A += sak;
      B += ldb;
    }
    MNV2_UNROLL for (int i = 0; i < ROWS; ++i) {
      MNV2_UNROLL for (int j = 0; j < NV; ++j) {
        V::store(C + i * ldc + j * VL, activate(acc[i][j], flags));
      }
    }
  }

  template <int NV, int ROWS>
  static void rows_tail(int64_t rows, int64_t K, const T* A, int64_t sam, int64_t sak, const T* B,
                        int64_t ldb, int64_t bjs, T* C, int64_t ldc, const T* bias, unsigned flags) {
    if constexpr (ROWS > 0) {
      if (rows == ROWS) {
        tile<ROWS, NV>(K, A, sam, sak, B, ldb, bjs, C, ldc, bias, flags);
      } else {
        rows_tail<NV, ROWS - 1>(rows, K, A, sam, sak, B, ldb, bjs, C, ldc, bias, flags);
      }
    }
  }

  template <int NV>
  static void panel(int64_t M, int64_t K, const T* A, int64_t sam, int64_t sak, const T* B,
                    int64_t ldb, int64_t bjs, T* C, int64_t ldc, const T* bias, unsigned flags) {
    int64_t m = 0;
    for (; m + MR <= M; m += MR) {
      tile<MR, NV>(K, A + m * sam, sam, sak, B, ldb, bjs, C + m * ldc, ldc, bias, flags);
    }
    rows_tail<NV, MR - 1>(M - m, K, A + m * sam, sam, sak, B, ldb, bjs, C + m * ldc, ldc, bias,
                          flags);
  }

  static void run(int64_t M, int64_t N, int64_t K, const T* A, int64_t sam, int64_t sak,
                  const T* B, int64_t ldb, int64_t bjs, T* C, int64_t ldc, const T* bias,
                  unsigned flags) {
    // Panel by panel of B so that each K x NR panel is reused across all of M.
    constexpr int NV = kGemmVectorsPerRow;
    int64_t n = 0;
    for (; n + NV * VL <= N; n += NV * VL) {
      panel<NV>(M, K, A, sam, sak, B + n / VL * bjs, ldb, bjs, C + n, ldc,
                bias ? bias + n : nullptr, flags);
    }
    for (; n < N; n += VL) {
      panel<1>(M, K, A, sam, sak, B + n / VL * bjs, ldb, bjs, C + n, ldc,
               bias ? bias + n : nullptr, flags);
    }
  }

  // One row times whole panels [0, panels) of packed weights (a matrix-vector product,
  // the classifier at batch 1): bound by reading the weights from memory, so four
  // panels stream at once, each with a software prefetch a few lines ahead. Each
  // column sums its even and its odd k apart (two half-length sums: about half the
  // rounding error of one sequential sum over K, and two independent FMA chains).
  static void gemv_panels(int64_t K, const T* x, const T* B, int64_t bjs, int64_t panels, T* y,
                          const T* bias, unsigned flags) {
    constexpr int64_t kAhead = 1024 / sizeof(T);  // elements ahead in each panel's stream
    constexpr int64_t kLine = 64 / sizeof(T);
    int64_t j = 0;
    for (; j + 4 <= panels; j += 4) {
      const T* b = B + j * bjs;
      vf even[4], odd[4];
      MNV2_UNROLL for (int q = 0; q < 4; ++q) {
        even[q] = V::load(bias + (j + q) * VL);
        odd[q] = vf{};
      }
      int64_t k = 0;
      for (; k + 2 <= K; k += 2) {
        const int64_t e = k * VL;
        if (2 * VL >= kLine || e % kLine == 0) {  // each line of the step once
          for (int64_t o = 0; o < 2 * VL; o += kLine) {
            MNV2_UNROLL for (int q = 0; q < 4; ++q) __builtin_prefetch(b + q * bjs + e + o + kAhead, 0, 3);
          }
        }
        const vf x0 = V::splat(x[k]), x1 = V::splat(x[k + 1]);
        MNV2_UNROLL for (int q = 0; q < 4; ++q) {
          even[q] += x0 * V::load(b + q * bjs + e);
          odd[q] += x1 * V::load(b + q * bjs + e + VL);
        }
      }
      if (k < K) {
        const vf x0 = V::splat(x[k]);
        MNV2_UNROLL for (int q = 0; q < 4; ++q) even[q] += x0 * V::load(b + q * bjs + k * VL);
      }
      MNV2_UNROLL for (int q = 0; q < 4; ++q) V::store(y + (j + q) * VL, activate(even[q] + odd[q], flags));
    }
    if (j < panels) {
      run(1, (panels - j) * VL, K, x, 1, 1, B + j * bjs, VL, bjs, y + j * VL, 0, bias + j * VL, flags);
    }
  }
};

}  // namespace
}  // namespace mnv2
