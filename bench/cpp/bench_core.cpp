// Times the core forward (single thread, NHWC, batch 1 unless given) on the 17
// MobileNetV2-1.0 block shapes and prints GFLOP/s per block and ISA; with
// "backward", the fused backward too (all gradients, input gradient included).
//   bench_core [isa] [batch] [backward]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "fused_ir.h"

using namespace mnv2;

int main(int argc, char** argv) {
  const std::string want = argc > 1 ? argv[1] : "";
  const int64_t batch = argc > 2 ? std::atoi(argv[2]) : 1;
  const bool backward = argc > 3 && std::string(argv[3]) == "backward";
  struct B { int64_t cin, h, cout, t; int s; };
  const B blocks[] = {{32, 112, 16, 1, 1}, {16, 112, 24, 6, 2}, {24, 56, 24, 6, 1}, {24, 56, 32, 6, 2},
                      {32, 28, 32, 6, 1},  {32, 28, 64, 6, 2},  {64, 14, 64, 6, 1}, {64, 14, 96, 6, 1},
                      {96, 14, 96, 6, 1},  {96, 14, 160, 6, 2}, {160, 7, 160, 6, 1}, {160, 7, 320, 6, 1}};
  std::mt19937 rng(0);
  std::uniform_real_distribution<float> u(-1, 1);
  for (Isa isa : kAllIsas) {
    const KernelTable* kt = kernel_table(isa);
    if (kt == nullptr || (!want.empty() && want != isa_name(isa))) continue;
    double total_s = 0, total_flop = 0;
    for (const B& b : blocks) {
      BlockShape s{batch, b.h, b.h, b.cin, b.cin * b.t, b.cout, b.s, b.t != 1, b.s == 1 && b.cin == b.cout};
      const Packing packing = backward ? Packing::kBackward : Packing::kForward;
      const Layout l = make_layout(s, kt->f32.vl, packing);
      std::vector<float> we(s.hidden * s.cin), be(s.hidden), wd(s.hidden * s.dw_taps()), bd(s.hidden),
          wp(s.cout * s.hidden), bp(s.cout), packed(l.total);
      for (auto* v : {&we, &be, &wd, &bd, &wp, &bp}) for (float& f : *v) f = u(rng) * 0.3f;
      const auto p0 = std::chrono::steady_clock::now();
      pack_weights<float>(s, l, packing, we.data(), be.data(), wd.data(), bd.data(), wp.data(), bp.data(),
                          0, s.hidden, packed.data());
      const double pack_ms =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - p0).count() * 1e3;
      std::vector<float> x(batch * b.h * b.h * b.cin), y(batch * s.out_h() * s.out_w() * b.cout);
      for (float& f : x) f = u(rng);
      const ForwardPlan p = plan_forward(s, l, 1);
      std::vector<float> scratch(p.scratch_floats);
      const Strides4 xs{b.h * b.h * b.cin, 1, b.h * b.cin, b.cin};
      const Strides4 ys{s.out_h() * s.out_w() * b.cout, 1, s.out_w() * b.cout, b.cout};
      ForwardArgs<float> a{s, l, x.data(), xs, packed.data(), y.data(), ys, nullptr};
      auto median_time = [](auto&& fn) {
        std::vector<double> times;
        for (int rep = 0; rep < 25; ++rep) {
          const auto t0 = std::chrono::steady_clock::now();
          fn();
          times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
        }
        std::sort(times.begin(), times.end());
        return times[times.size() / 2];
      };
      const double fwd_t = median_time([&] { kt->f32.forward(a, p, 0, p.items(s), scratch.data()); });
      const double fwd_macs = double(batch) * ((s.has_expand ? b.h * b.h * s.cin * s.hidden : 0) +
                                               s.out_h() * s.out_w() * s.hidden * (s.dw_taps() + s.cout));
      double t = fwd_t, macs = fwd_macs;
      if (backward) {
        // recompute (expand, depthwise), then the project twice (weight and hidden
        // gradients), the depthwise twice and the expand twice
        macs = double(batch) * ((s.has_expand ? 3 * b.h * b.h * s.cin * s.hidden : 0) +
                                s.out_h() * s.out_w() * s.hidden * (3 * s.dw_taps() + 2 * s.cout));
        const BackwardPlan bp = plan_backward(s, l, 1);
        const GradLayout gl = make_grad_layout(s, l);
        std::vector<float> gy(y.size()), gx(x.size()), side(bp.side_floats), grads(gl.total),
            bscratch(bp.scratch_floats);
        for (float& f : gy) f = u(rng);
        BackwardArgs<float> ba{s, l, x.data(), xs, gy.data(), ys, packed.data(), gx.data(), xs, side.data()};
        t = median_time([&] {
          std::fill(grads.begin(), grads.end(), 0.f);
          kt->f32.backward(ba, bp, 0, bp.items(s), grads.data(), bscratch.data());
        });
      }
      total_s += t;
      total_flop += 2 * macs;
      std::printf("%-7s %4lld->%4lld t%lld s%d %3lld: %8.3f ms %7.1f GFLOP/s  (chunk %lld/%lld, step %lld, pack %.3f ms)",
                  isa_name(isa), (long long)b.cin, (long long)b.cout, (long long)b.t, b.s,
                  (long long)b.h, t * 1e3, 2 * macs / t / 1e9, (long long)p.hidden_chunk,
                  (long long)l.hp, (long long)p.rows_per_step, pack_ms);
      if (backward) std::printf("  backward / forward time %.2f", t / fwd_t);
      std::printf("\n");
    }
    std::printf("%-7s all blocks%s: %.3f ms, %.1f GFLOP/s\n", isa_name(isa), backward ? " (backward)" : "", total_s * 1e3,
                total_flop / total_s / 1e9);
  }
  return 0;
}
