"""Pure-PyTorch reference of the fused block, on BN-folded weights.

Two forms with the operator's signature:

* ``inverted_residual``: the plain composition, which materialises the
  t-times-wider hidden tensor;
* ``inverted_residual_chunked``: the MobileNetV2 paper's section 5.1 form
  (Sandler et al., https://arxiv.org/abs/1801.04381). The block is a sum over
  hidden-channel chunks, because the expand, ReLU6 and depthwise steps act per
  hidden channel and the project is linear:

      y = b_project + sum_k W_project[:, k] relu6(dw_k(relu6(W_expand[k] x + b_expand[k]))) (+ x)

  so only one chunk of the hidden tensor exists at a time.
"""

from typing import Optional

import torch.nn.functional as F
from torch import Tensor


def _hidden(x, w_expand, b_expand, w_dw, b_dw, stride, dilation):
    h = x
    if w_expand is not None:
        h = F.relu6(F.conv2d(x, w_expand[:, :, None, None], b_expand))
    # padding dilation * (k // 2) for the (hidden, k, k) depthwise weights: the output size of
    # the fused kernels
    pad = dilation * (w_dw.shape[-1] // 2)
    return F.relu6(F.conv2d(h, w_dw[:, None], b_dw, stride=stride, padding=pad, dilation=dilation,
                            groups=w_dw.shape[0]))


def inverted_residual(
    x: Tensor,
    w_expand: Optional[Tensor],
    b_expand: Optional[Tensor],
    w_dw: Tensor,
    b_dw: Tensor,
    w_project: Tensor,
    b_project: Tensor,
    stride: int,
    residual: bool,
    dilation: int = 1,
) -> Tensor:
    """The block as plain PyTorch ops (weights as in ``mnv2::fused_inverted_residual``)."""
    y = F.conv2d(_hidden(x, w_expand, b_expand, w_dw, b_dw, stride, dilation), w_project[:, :, None, None],
                 b_project)
    return y + x if residual else y


def inverted_residual_chunked(
    x: Tensor,
    w_expand: Optional[Tensor],
    b_expand: Optional[Tensor],
    w_dw: Tensor,
    b_dw: Tensor,
    w_project: Tensor,
    b_project: Tensor,
    stride: int,
    residual: bool,
    dilation: int = 1,
    chunk: int = 16,
) -> Tensor:
    """The paper's section 5.1 form: sums the project over hidden chunks of ``chunk`` channels."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    hidden = w_dw.shape[0]
    y = None
    for k0 in range(0, hidden, chunk):
        k = slice(k0, min(k0 + chunk, hidden))
        if w_expand is None:  # t == 1: the chunk is a slice of the input channels
            a2 = _hidden(x[:, k], None, None, w_dw[k], b_dw[k], stride, dilation)
        else:
            a2 = _hidden(x, w_expand[k], b_expand[k], w_dw[k], b_dw[k], stride, dilation)
        part = F.conv2d(a2, w_project[:, k, None, None])
        y = part if y is None else y + part
    y = y + b_project[None, :, None, None]
    return y + x if residual else y
