#include "cpu/common.h"

#include <stdexcept>

namespace mnv2 {
namespace cpu {

std::atomic<int64_t> g_max_scratch_bytes{0};

void check_x(const at::Tensor& x, const char* name, Dtypes dtypes) {
  TORCH_CHECK(x.dim() == 4, "mnv2: ", name, " must be 4-D (N, C, H, W), got ", x.dim(), "-D");
  TORCH_CHECK(x.layout() == at::kStrided, "mnv2: ", name, " must be a dense (strided) tensor");
  if (dtypes == Dtypes::kKernelOrHalf) {
    TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble || is_half(x),
                "mnv2: the CPU operator supports float32, float64, float16 and bfloat16 (the last two "
                "computed in float32), got ",
                x.scalar_type());
  } else {
    TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
                "mnv2: the CPU kernel on packed weights supports float32 and float64, got ", x.scalar_type());
  }
  TORCH_CHECK(x.size(2) >= 1 && x.size(3) >= 1, "mnv2: ", name, " must have height and width >= 1, got ",
              x.sizes());
}

const KernelTable& kernels() {
  try {
    return active_kernels();
  } catch (const std::runtime_error& e) {
    TORCH_CHECK(false, "mnv2: ", e.what());
  }
}

template <typename T>
at::Tensor pack_block(const BlockShape& s, const Layout& l, Packing packing, const at::TensorOptions& opts,
                      const OptTensor& w_expand, const OptTensor& b_expand, const at::Tensor& w_dw,
                      const OptTensor& b_dw, const OptTensor& w_project, const OptTensor& b_project) {
  at::Tensor packed = at::empty({l.total}, opts);
  auto dense = [](const OptTensor& t) { return t.has_value() ? t->contiguous() : at::Tensor(); };
  auto ptr = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr<T>() : nullptr; };
  const at::Tensor we = dense(w_expand), be = dense(b_expand), wd = w_dw.contiguous(), bd = dense(b_dw);
  const at::Tensor wp = dense(w_project), bp = dense(b_project);
  T* out = packed.mutable_data_ptr<T>();
  // ranges of hidden channels in parallel; the grain keeps small blocks on one thread
  at::parallel_for(0, s.hidden, 64, [&](int64_t h0, int64_t h1) {
    pack_weights<T>(s, l, packing, ptr(we), ptr(be), wd.const_data_ptr<T>(), ptr(bd), ptr(wp), ptr(bp), h0, h1,
                    out);
  });
  return packed;
}

template <typename T>
void run_forward(const BlockShape& s, const Layout& l, const at::Tensor& x, const at::Tensor& packed,
                 const at::Tensor& y, const StemInput* stem) {
  const Kernels<T>& k = kernels().get<T>();
  ForwardPlan plan = plan_forward(s, l, at::get_num_threads());
  if (stem != nullptr) {
    plan.stem_k = stem->layout.cin;
    finish_forward_plan(s, l, &plan);
  }
  at::Tensor partial = at::empty({plan.partial_floats}, dense_options(x));
  ForwardArgs<T> args{s, l, x.const_data_ptr<T>(), glue::strides_of(x), packed.const_data_ptr<T>(),
                      y.mutable_data_ptr<T>(), glue::strides_of(y), partial.mutable_data_ptr<T>()};
  if (stem != nullptr) {
    args.stem.image = stem->image.const_data_ptr<T>();
    args.stem.strides = glue::strides_of(stem->image);
    args.stem.channels = stem->image.size(1);
    args.stem.height = stem->image.size(2);
    args.stem.width = stem->image.size(3);
    args.stem.packed = stem->packed.const_data_ptr<T>();
    args.stem.layout = stem->layout;
  }
  at::parallel_for(0, plan.items(s), 1, [&](int64_t begin, int64_t end) {
    k.forward(args, plan, begin, end, thread_scratch<T>(plan.scratch_floats));
  });
  if (plan.n_splits > 1) {
    at::parallel_for(0, s.batch * s.out_h(), 1, [&](int64_t begin, int64_t end) {
      reduce_forward_splits<T>(args, plan, begin, end);
    });
  }
}

at::Tensor empty_output(const BlockShape& s, const at::Tensor& x) {
  return at::empty({s.batch, s.cout, s.out_h(), s.out_w()},
                   x.options().memory_format(x.suggest_memory_format()));
}

#define MNV2_INSTANTIATE(T)                                                                            \
  template at::Tensor pack_block<T>(const BlockShape&, const Layout&, Packing, const at::TensorOptions&, \
                                    const OptTensor&, const OptTensor&, const at::Tensor&, const OptTensor&, \
                                    const OptTensor&, const OptTensor&);                                 \
  template void run_forward<T>(const BlockShape&, const Layout&, const at::Tensor&, const at::Tensor&,  \
                               const at::Tensor&, const StemInput*);
MNV2_INSTANTIATE(float)
MNV2_INSTANTIATE(double)
#undef MNV2_INSTANTIATE

}  // namespace cpu
}  // namespace mnv2
