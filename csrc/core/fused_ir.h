// The torch-free core of the fused MobileNetV2 inverted-residual block: what the
// ATen glue, the C++ tests and the benchmarks include.
//
//   shape.h    the block's geometry, the depthwise kernel size
//   layout.h   packed weights and their layouts
//   plan.h     work splits and scratch layouts
//   machine.h  the caches the plans are sized for
//   kernels.h  the kernels' arguments and the per-ISA tables
//   reduce.h   the ordered reductions after the kernels
//   isa.h      the instruction sets
#pragma once

#include "isa.h"
#include "kernels.h"
#include "layout.h"
#include "machine.h"
#include "plan.h"
#include "reduce.h"
#include "shape.h"
