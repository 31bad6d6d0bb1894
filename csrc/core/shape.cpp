#include "shape.h"

namespace mnv2 {
namespace {

// The input, expand and depthwise part of a shape.
const char* front_error(const BlockShape& s) {
  if (s.batch < 0) return "batch size must be >= 0";
  if (s.in_h < 1 || s.in_w < 1) return "input height and width must be >= 1";
  if (s.cin < 1 || s.hidden < 1) return "channel counts must be >= 1";
  if (s.stride != 1 && s.stride != 2) return "stride must be 1 or 2";
  if (!is_dw_kernel(s.kernel)) return "the depthwise kernel size must be 3, 5 or 7";
  if (s.dilation < 1 || s.dilation > max_dilation(s.kernel)) {
    return "dilation must be at least 1 and at most 31 (3x3), 15 (5x5) or 10 (7x7)";
  }
  if (!s.has_expand && s.hidden != s.cin) return "without an expand step, hidden must equal cin";
  return nullptr;
}

}  // namespace

const char* validate_front(const BlockShape& s) {
  if (const char* err = front_error(s)) return err;
  if (s.cout != 0 || s.residual) return "the depthwise statistics have no project step (cout 0, no residual)";
  return nullptr;
}

const char* validate_shape(const BlockShape& s) {
  if (const char* err = front_error(s)) return err;
  if (s.cout < 1) return "channel counts must be >= 1";
  if (s.residual && (s.stride != 1 || s.cin != s.cout)) {
    return "the residual needs stride 1 and cin == cout";
  }
  return nullptr;
}

}  // namespace mnv2
