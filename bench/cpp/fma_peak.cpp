// Measures the machine's fp32 FMA peak: independent FMA chains on every thread,
// with the widest vectors the CPU supports. Prints GFLOP/s (2 flops per FMA lane).
//   fma_peak [threads]
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>

namespace {

constexpr int kChains = 12;  // > FMA latency x issue width, so the pipes never wait

__attribute__((target("avx2,fma"))) double fma_loop_avx2(long iters) {
  __m256 acc[kChains];
  const __m256 a = _mm256_set1_ps(0.999f), b = _mm256_set1_ps(1e-6f);
  for (int i = 0; i < kChains; ++i) acc[i] = _mm256_set1_ps(float(i));
  for (long n = 0; n < iters; ++n) {
    for (int i = 0; i < kChains; ++i) acc[i] = _mm256_fmadd_ps(acc[i], a, b);
  }
  __m256 s = acc[0];
  for (int i = 1; i < kChains; ++i) s = _mm256_add_ps(s, acc[i]);
  float out[8];
  _mm256_storeu_ps(out, s);
  return out[0];  // keep the chains alive
}

__attribute__((target("avx512f"))) double fma_loop_avx512(long iters) {
  __m512 acc[kChains];
  const __m512 a = _mm512_set1_ps(0.999f), b = _mm512_set1_ps(1e-6f);
  for (int i = 0; i < kChains; ++i) acc[i] = _mm512_set1_ps(float(i));
  for (long n = 0; n < iters; ++n) {
    for (int i = 0; i < kChains; ++i) acc[i] = _mm512_fmadd_ps(acc[i], a, b);
  }
  __m512 s = acc[0];
  for (int i = 1; i < kChains; ++i) s = _mm512_add_ps(s, acc[i]);
  return _mm512_reduce_add_ps(s);
}

}  // namespace
#endif

int main(int argc, char** argv) {
  const int threads = argc > 1 ? std::atoi(argv[1]) : int(std::thread::hardware_concurrency());
  int lanes = 1;
  double (*loop)(long) = nullptr;
#if defined(__x86_64__)
  if (__builtin_cpu_supports("avx512f")) {
    lanes = 16, loop = fma_loop_avx512;
  } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    lanes = 8, loop = fma_loop_avx2;
  }
#endif
  if (loop == nullptr) {
    std::printf("fma_peak: no AVX2/AVX-512 on this machine\n");
    return 1;
  }
  const long iters = 20'000'000;
  double best = 0;
  for (int rep = 0; rep < 5; ++rep) {
    std::atomic<double> sink{0};
    const auto t0 = std::chrono::steady_clock::now();
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t) pool.emplace_back([&] { sink = sink + loop(iters); });
    for (auto& th : pool) th.join();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const double gflops = double(iters) * kChains * lanes * 2 * threads / s / 1e9;
    if (gflops > best) best = gflops;
  }
  std::printf("fma_peak_gflops %.1f threads %d lanes %d\n", best, threads, lanes);
  return 0;
}
