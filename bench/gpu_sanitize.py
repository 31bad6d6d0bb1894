"""A small forward + backward of every CUDA kernel specialisation, for
compute-sanitizer (bench/gpu_check.sh --sanitize): stride 1 and 2, t == 1 and 6,
residual or not, fp32/fp16/bf16, odd sizes."""

import torch

import mnv2_kernels
from mnv2_kernels import FusedInvertedResidual

with mnv2_kernels.use_backend("cuda"):
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for inp, oup, stride, t, hw in [(16, 16, 1, 6, (7, 5)), (24, 32, 2, 6, (9, 6)),
                                        (32, 16, 1, 1, (5, 5)), (8, 12, 2, 1, (3, 4))]:
            m = FusedInvertedResidual(inp, oup, stride, t).cuda().to(dtype).eval()
            for cl in (False, True):
                x = torch.randn(2, inp, *hw, device="cuda", dtype=dtype, requires_grad=True)
                if cl:
                    x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
                y = m(x)
                y.backward(torch.randn_like(y))
torch.cuda.synchronize()
print("gpu_sanitize: done")
