"""Mobile DeepLabv3 on MobileNetV2 (Sandler et al., https://arxiv.org/abs/1801.04381, section
6.3 and Table 7), built on torchvision.models.segmentation with fused inverted-residual blocks.

    from mnv2_kernels.segmentation import deeplabv3_mobilenet_v2
    model = deeplabv3_mobilenet_v2(num_classes=21).eval()          # the paper's "MNet V2*", OS 16
    logits = model(torch.rand(1, 3, 513, 513))["out"]               # (1, 21, 513, 513)

The heads sit on the second-to-last feature map, the 320-channel output of the last
inverted-residual block (not the 1280-channel 1x1 convolution, which is dropped), and the
blocks after the output stride is reached run atrous (``dilate_mobilenet_v2``).
"""

from typing import Any, Callable, Optional, Sequence

from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.segmentation.deeplabv3 import ASPP, DeepLabV3

from .detection import _check_no_weights, mobilenet_v2_features
from .modules import depthwise_conv

__all__ = ["DeepLabV3MobileHead", "deeplabv3_mobilenet_v2", "dilate_mobilenet_v2"]

OUTPUT_STRIDES = (8, 16)
# DeepLabv3's ASPP rates at output stride 16, doubled at 8
ATROUS_RATES = {16: (6, 12, 18), 8: (12, 24, 36)}


def _layer_stride(layer: nn.Module) -> int:
    dw = depthwise_conv(layer)
    if dw is not None:
        return dw.stride[0]
    conv = layer[0] if isinstance(layer, nn.Sequential) and len(layer) > 0 else layer
    if isinstance(conv, nn.Conv2d):
        return conv.stride[0]
    raise TypeError(f"dilate_mobilenet_v2: cannot read the stride of {type(layer).__name__}")


def dilate_mobilenet_v2(features: nn.Sequential, output_stride: int) -> None:
    """Atrous MobileNetV2, in place: once the layers' strides reach ``output_stride``, every
    later inverted-residual block's depthwise convolution gets stride 1 and a dilation (and
    padding) of the accumulated rate. As TensorFlow's ``mobilenet_base(output_stride=...)``
    (which DeepLab uses): a block whose stride is removed keeps the previous rate, and the
    rate is multiplied by that stride for the blocks after it. At output stride 16 that is
    block 14 (96 -> 160) at stride 1 and rate 1, blocks 15-17 at rate 2; at 8, block 7
    (32 -> 64) at stride 1 and rate 1, blocks 8-13 at rate 2, block 14 at rate 2, blocks
    15-17 at rate 4. torchvision's dilated MobileNetV3 gives the block whose stride is removed
    the new rate already; the convolution and the parameters are the same either way.

    The surgery is the same for torchvision's InvertedResidual and FusedInvertedResidual
    (which reads stride and dilation from its depthwise convolution); a block's ``stride``
    attribute is set to 1 with its convolution's."""
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"output_stride must be one of {OUTPUT_STRIDES}, got {output_stride!r}")
    current_stride, rate = 1, 1
    for layer in features:
        stride = _layer_stride(layer)
        if current_stride != output_stride:
            current_stride *= stride
            if current_stride > output_stride:
                raise ValueError(f"the layers' strides skip output_stride {output_stride}")
            continue
        layer_rate, rate = rate, rate * stride
        if stride == 1 and layer_rate == 1:
            continue
        dw = depthwise_conv(layer)
        if dw is None:
            if stride != 1:
                raise TypeError(f"dilate_mobilenet_v2: a strided {type(layer).__name__} after output stride "
                                f"{output_stride} is not an inverted-residual block")
            continue  # a 1x1 layer: no spatial extent to dilate
        k = dw.kernel_size[0]
        dw.stride = (1, 1)
        dw.dilation = (layer_rate, layer_rate)
        dw.padding = ((k - 1) // 2 * layer_rate,) * 2
        if stride != 1 and not isinstance(getattr(type(layer), "stride", None), property):
            layer.stride = 1
    if current_stride != output_stride:
        raise ValueError(f"the layers' strides reach {current_stride}, not output_stride {output_stride}")


class DeepLabV3MobileHead(nn.Sequential):
    """DeepLabv3's head as TensorFlow's DeepLab builds it with batch norm (the paper's
    experiments): image pooling and a 1x1 convolution, plus 3x3 atrous convolutions at
    ``atrous_rates`` when given (ASPP), each 256 channels with batch norm and ReLU; the
    concatenation projected to 256 (1x1, batch norm, ReLU, dropout); 1x1 logits with bias.

    Without rates this is the paper's Table 7 "no ASPP" head ("1x1 convolution as well as
    image-pooling feature"). torchvision's DeepLabHead adds a 3x3 convolution (256 -> 256,
    590K parameters) after ASPP, which TensorFlow's model and the paper's parameter counts
    do not have.
    """

    def __init__(self, in_channels: int, num_classes: int, atrous_rates: Sequence[int] = (),
                 dropout: float = 0.1) -> None:
        aspp = ASPP(in_channels, list(atrous_rates), 256)
        aspp.project[len(aspp.project) - 1] = nn.Dropout(dropout)  # TensorFlow's keep_prob 0.9
        super().__init__(aspp, nn.Conv2d(256, num_classes, 1))


def deeplabv3_mobilenet_v2(
    *,
    weights: Any = None,
    progress: bool = True,
    num_classes: int = 21,
    weights_backbone: Any = None,
    output_stride: int = 16,
    aspp: bool = False,
    width_mult: float = 1.0,
    fused: bool = True,
    norm_layer: Optional[Callable[..., nn.Module]] = None,
    dropout: float = 0.1,
) -> DeepLabV3:
    """Mobile DeepLabv3 (the paper's section 6.3, Table 7 "MNet V2*"), as torchvision's DeepLabV3.

    The default (output stride 16, no ASPP) is the paper's efficient candidate: 2.11M
    parameters, 2.74B multiply-adds at 513x513 (the paper: 2.11M, 2.75B). With ASPP, 4.52M
    parameters as in the paper, and 5.36B multiply-adds where the paper counts 5.8B:
    TensorFlow runs a rate-r convolution on space_to_batch blocks and computes
    r * ceil(f / r) positions per side of an f x f map (36 instead of 33 at output stride
    16); counted that way this model gives 5.82B (tests/test_applications.py).

    Args:
        weights, weights_backbone: must be None (nothing is downloaded). An ImageNet
            MobileNetV2 state_dict loads into the backbone with ``model.backbone.load_state_dict(
            {k[9:]: v for k, v in sd.items() if k.startswith("features.") and int(k.split(".")[1])
            < len(model.backbone)})``.
        progress: unused (no download), for torchvision's signature.
        num_classes: classes including the background (PASCAL VOC: 21).
        output_stride: 16 or 8, the input's size over the logits' before upsampling.
        aspp: DeepLabv3's atrous spatial pyramid pooling (3x3 convolutions at rates 6, 12, 18
            at output stride 16, 12, 24, 36 at 8) in the head, besides the image pooling
            and 1x1 branches (DeepLabV3MobileHead).
        width_mult: MobileNetV2's width multiplier.
        fused: FusedInvertedResidual blocks (True) or torchvision's InvertedResidual (False);
            the state_dict keys are the same, so either loads the other's weights.
        norm_layer: the backbone's batch norm (default BatchNorm2d); the head uses BatchNorm2d.
        dropout: after the head's projection (TensorFlow's DeepLab: 0.1).

    The model returns ``{"out": logits}`` upsampled to the input's size (bilinear); train it
    with a pixel-wise cross-entropy. In train mode the image-pooling branch's batch norm sees
    one value per image, so it needs at least 2 images, as torchvision's DeepLabV3.
    """
    _check_no_weights(weights, weights_backbone, "deeplabv3_mobilenet_v2")
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"output_stride must be one of {OUTPUT_STRIDES}, got {output_stride!r}")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    features = mobilenet_v2_features(width_mult, fused, norm_layer or nn.BatchNorm2d)
    # the second-to-last feature map: the last inverted-residual block, before the 1x1 convolution
    last_block = len(features) - 2
    dilate_mobilenet_v2(features[:last_block + 1], output_stride)
    backbone = IntermediateLayerGetter(features, return_layers={str(last_block): "out"})
    in_channels = features[last_block].out_channels
    rates = ATROUS_RATES[output_stride] if aspp else ()
    return DeepLabV3(backbone, DeepLabV3MobileHead(in_channels, num_classes, rates, dropout))
