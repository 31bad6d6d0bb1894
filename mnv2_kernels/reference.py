"""Pure-PyTorch reference of the fused block, on BN-folded weights.

Two forms with the operator's signature:

* ``inverted_residual``: the plain composition, which materialises the
  t-times-wider hidden tensor;
* ``inverted_residual_chunked``: the MobileNetV2 paper's section 5.1 form
  (Sandler et al., https://arxiv.org/abs/1801.04381). The block is a sum over
  hidden-channel chunks, because the expand, activation (ReLU6 or ReLU) and depthwise steps act per
  hidden channel and the project is linear:

      y = b_project + sum_k W_project[:, k] relu6(dw_k(relu6(W_expand[k] x + b_expand[k]))) (+ x)

  so only one chunk of the hidden tensor exists at a time.
"""

from typing import Optional

import torch.nn.functional as F
from torch import Tensor


def activation_fn(activation: str):
    """The block's activation (after the expand and after the depthwise step) by name."""
    if activation == "relu6":
        return F.relu6
    if activation == "relu":
        return F.relu
    raise ValueError(f"mnv2: activation must be 'relu6' or 'relu', got {activation!r}")


def _hidden(x, w_expand, b_expand, w_dw, b_dw, stride, dilation, activation="relu6"):
    act = activation_fn(activation)
    h = x
    if w_expand is not None:
        h = act(F.conv2d(x, w_expand[:, :, None, None], b_expand))
    # padding dilation * (k // 2) for the (hidden, k, k) depthwise weights: the output size of
    # the fused kernels
    pad = dilation * (w_dw.shape[-1] // 2)
    return act(F.conv2d(h, w_dw[:, None], b_dw, stride=stride, padding=pad, dilation=dilation,
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
    activation: str = "relu6",
) -> Tensor:
    """The block as plain PyTorch ops (weights as in ``mnv2::fused_inverted_residual``; the
    depthwise kernel size is w_dw's)."""
    y = F.conv2d(_hidden(x, w_expand, b_expand, w_dw, b_dw, stride, dilation, activation),
                 w_project[:, :, None, None], b_project)
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
    activation: str = "relu6",
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
            a2 = _hidden(x[:, k], None, None, w_dw[k], b_dw[k], stride, dilation, activation)
        else:
            a2 = _hidden(x, w_expand[k], b_expand[k], w_dw[k], b_dw[k], stride, dilation, activation)
        part = F.conv2d(a2, w_project[:, k, None, None])
        y = part if y is None else y + part
    y = y + b_project[None, :, None, None]
    return y + x if residual else y
