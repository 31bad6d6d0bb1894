"""SSDLite on MobileNetV2 (Sandler et al., https://arxiv.org/abs/1801.04381, section 6.2 and
Table 6), built on torchvision.models.detection with fused inverted-residual blocks.

    from mnv2_kernels.detection import ssdlite320_mobilenet_v2
    model = ssdlite320_mobilenet_v2(num_classes=91).eval()
    detections = model([torch.rand(3, 480, 640)])   # boxes, scores, labels per image

SSDLite is SSD whose prediction layers use depthwise separable convolutions (3x3 depthwise,
then 1x1). Its first feature map is the expansion of MobileNetV2's 14th inverted-residual
block (TensorFlow's ``layer_15/expansion_output``: 576 channels at output stride 16, the
input of the 96 -> 160 stride-2 block); the second is the last layer (the 1280-channel 1x1
convolution, output stride 32); four extra layers (1x1 to half the depth, 3x3 depthwise
stride 2, 1x1 to 512, 256, 256, 128 channels, as TensorFlow's object detection API's
``ssdlite_mobilenet_v2`` configuration) give the rest. The block whose expansion is a
feature map is an ``ExpansionOutputBlock``: it stores that one expansion, and nothing else
of the network's hidden tensors is ever stored.
"""

import math
from collections import OrderedDict
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.ssd import SSD
from torchvision.models.detection.ssdlite import SSDLiteHead, _extra_block, _normal_init

from . import capture
from .capture import is_fx_proxy
from .model import mobilenet_v2
from .modules import FusedInvertedResidual, depthwise_conv

__all__ = ["ExpansionOutputBlock", "SSDLiteBoxGenerator", "SSDLiteMobileNetV2Backbone", "ssdlite320_mobilenet_v2"]

# the extra layers' depths (TensorFlow's ssdlite_mobilenet_v2 configuration), before width_mult
EXTRA_DEPTHS = (512, 256, 256, 128)
_TAIL = "_mnv2_expansion_tail"  # where the fused depthwise + projection of a block lives on its ``conv``


class ExpansionOutputBlock(nn.Module):
    """An inverted-residual block (torchvision's or fused, with an expansion) that returns
    ``(expansion, output)``: SSDLite's first feature map is the expansion of MobileNetV2's
    14th block.

    It keeps the wrapped block's ``conv`` (the same submodules, so the same state_dict keys:
    ``conv.0.0`` ... ``conv.3``). The expansion (``conv.0``: 1x1 convolution, batch norm,
    ReLU6) runs as ordinary modules and is materialised, since the detector reads it. For a
    fused block the rest (depthwise stage, projection, batch norm) then runs as the fused
    operator in its ``t == 1`` form on the expansion, over the same submodules; for
    torchvision's block, as torchvision's modules. The residual, when the block has one, is
    added here. In train mode the ordinary expansion modules keep what they keep in
    torchvision (the batch norm's input and the activation); nothing of the depthwise stage
    is stored.
    """

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        conv = block.conv
        if len(conv) != 4:
            raise ValueError("ExpansionOutputBlock needs a block with an expansion (expand_ratio > 1), got a "
                             f"block whose conv has {len(conv)} stages")
        self.conv = conv
        self.stride = block.stride
        self.use_res_connect = block.use_res_connect
        self.out_channels = block.out_channels
        self._is_cn = getattr(block, "_is_cn", block.stride > 1)
        self.fused = isinstance(block, FusedInvertedResidual)
        if self.fused:
            _fused_tail(conv, self.out_channels)  # made once here, outside any graph capture

    @property
    def expansion_channels(self) -> int:
        return self.conv[0][0].out_channels

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        c = self.conv
        expansion = c[0](x)
        if not self.fused or (is_fx_proxy(expansion) and capture._UNFUSED[0]):
            y = c[3](c[2](c[1](expansion)))
        elif is_fx_proxy(expansion):
            # one node of the fx graph, a function of the expansion and this block's conv
            tracer = expansion.tracer
            conv = tracer.create_proxy("get_attr", tracer.path_of_module(c), (), {})
            y = tracer.create_proxy("call_function", fused_expansion_tail, (expansion, conv, self.out_channels),
                                    {})
        else:
            y = fused_expansion_tail(expansion, c, self.out_channels)
        if self.use_res_connect:
            y = x + y
        return expansion, y


def fused_expansion_tail(expansion: Tensor, conv: nn.Sequential, out_channels: int) -> Tensor:
    """``conv[3](conv[2](conv[1](expansion)))`` of an inverted-residual block's ``conv`` as the
    fused operator's ``t == 1`` form (depthwise stage and projection in one call, the
    depthwise output never stored)."""
    return _fused_tail(conv, out_channels)(expansion)


def _fused_tail(conv: nn.Sequential, out_channels: int) -> FusedInvertedResidual:
    """The FusedInvertedResidual over ``conv[1:]`` (shared submodules), kept on ``conv`` outside
    the module tree (so state_dict keys do not change), rebuilt when a submodule is replaced
    (e.g. by convert_sync_batchnorm); it follows conv's train/eval mode."""
    tail = getattr(conv, _TAIL, None)
    parts = (conv[1], conv[2], conv[3])
    if tail is None or any(a is not b for a, b in zip(tail.conv._modules.values(), parts)):
        stride = parts[0][0].stride[0]
        tail = FusedInvertedResidual.around(nn.Sequential(*parts), stride, False, out_channels)
        object.__setattr__(conv, _TAIL, tail)  # not a submodule: no new state_dict keys
    if tail.training != conv.training:
        tail.training = tail.conv.training = conv.training
    return tail


class SSDLiteBoxGenerator(DefaultBoxGenerator):
    """SSD's default boxes as TensorFlow's object detection API makes them for
    ``ssdlite_mobilenet_v2`` (``ssd_anchor_generator``: scales from ``min_ratio`` to
    ``max_ratio``, aspect ratios 1, 2, 1/2, 3, 1/3 and a box between this scale and the next;
    ``reduce_boxes_in_lowest_layer``): the lowest layer has 3 boxes per location (scale 0.1 at
    aspect ratio 1, and the layer's scale at 2 and 1/2), the others 6, which torchvision's
    ``DefaultBoxGenerator([[2, 3]] * n)`` also gives."""

    def __init__(self, num_outputs: int = 6, min_ratio: float = 0.2, max_ratio: float = 0.95,
                 clip: bool = True) -> None:
        if num_outputs < 2:
            raise ValueError(f"SSDLiteBoxGenerator needs at least 2 feature maps, got {num_outputs}")
        super().__init__([[2, 3]] * num_outputs, min_ratio=min_ratio, max_ratio=max_ratio, clip=clip)

    def _generate_wh_pairs(self, num_outputs: int, dtype: torch.dtype = torch.float32,
                           device: torch.device = torch.device("cpu")) -> List[Tensor]:
        pairs = super()._generate_wh_pairs(num_outputs, dtype, device)
        s, r = self.scales[0], math.sqrt(2.0)
        pairs[0] = torch.as_tensor([[0.1, 0.1], [s * r, s / r], [s / r, s * r]], dtype=dtype, device=device)
        return pairs

    def num_anchors_per_location(self) -> List[int]:
        return [3] + super().num_anchors_per_location()[1:]


def expansion_block_index(features: nn.Sequential) -> int:
    """The index in MobileNetV2's ``features`` of the last stride-2 inverted-residual block
    (the 14th block, ``features[14]``, 96 -> 160): its expansion is at output stride 16."""
    strided = [i for i, m in enumerate(features)
               if hasattr(m, "use_res_connect") and (dw := depthwise_conv(m)) is not None and dw.stride[0] == 2]
    if not strided:
        raise ValueError("MobileNetV2 features without a stride-2 inverted-residual block")
    return strided[-1]


class SSDLiteMobileNetV2Backbone(nn.Module):
    """MobileNetV2's ``features`` (the same indices, so a classifier's ``features.*``
    state_dict loads into ``features``) with the 14th block an ExpansionOutputBlock, and
    SSDLite's four extra layers. Returns the six feature maps as an OrderedDict
    ("0": the expansion, "1": the last layer, "2"-"5": the extra layers)."""

    def __init__(self, features: nn.Sequential, norm_layer: Callable[..., nn.Module], width_mult: float = 1.0,
                 min_depth: int = 16) -> None:
        super().__init__()
        index = expansion_block_index(features)
        layers = list(features)
        layers[index] = ExpansionOutputBlock(layers[index])
        self.features = nn.Sequential(*layers)
        self.expansion_index = index
        depths = [max(min_depth, int(d * width_mult)) for d in EXTRA_DEPTHS]
        last = _last_channels(features)
        self.extra = nn.ModuleList([_extra_block(c_in, c_out, norm_layer)
                                    for c_in, c_out in zip([last] + depths[:-1], depths)])
        _normal_init(self.extra)
        self.out_channels = [layers[index].expansion_channels, last, *depths]

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        outputs: List[Tensor] = []
        for i, layer in enumerate(self.features):
            if i == self.expansion_index:
                expansion, x = layer(x)
                outputs.append(expansion)
            else:
                x = layer(x)
        outputs.append(x)
        for block in self.extra:
            x = block(x)
            outputs.append(x)
        return OrderedDict([(str(i), v) for i, v in enumerate(outputs)])


def _last_channels(features: nn.Sequential) -> int:
    last = features[len(features) - 1]
    return last.out_channels if hasattr(last, "out_channels") else last[0].out_channels


def _check_no_weights(weights: Any, weights_backbone: Any, builder: str) -> None:
    for name, value in (("weights", weights), ("weights_backbone", weights_backbone)):
        if value is not None:
            raise ValueError(f"{builder}: {name} must be None (no pretrained weights are published for this model); "
                             "load a state_dict with load_state_dict instead")


def mobilenet_v2_features(width_mult: float, fused: bool, norm_layer: Callable[..., nn.Module]) -> nn.Sequential:
    """MobileNetV2's ``features``: the library's (FusedInvertedResidual blocks) or torchvision's
    (InvertedResidual blocks), with the same parameters for the same seed."""
    if not isinstance(width_mult, (int, float)) or isinstance(width_mult, bool) or width_mult <= 0:
        raise ValueError(f"width_mult must be a positive number, got {width_mult!r}")
    build = mobilenet_v2 if fused else torchvision.models.mobilenet_v2
    return build(width_mult=width_mult, norm_layer=norm_layer).features


def ssdlite320_mobilenet_v2(
    *,
    weights: Any = None,
    progress: bool = True,
    num_classes: int = 91,
    weights_backbone: Any = None,
    width_mult: float = 1.0,
    fused: bool = True,
    norm_layer: Optional[Callable[..., nn.Module]] = None,
    anchor_generator: Optional[DefaultBoxGenerator] = None,
    size: Tuple[int, int] = (320, 320),
    **kwargs: Any,
) -> SSD:
    """SSDLite with a MobileNetV2 backbone (the paper's section 6.2), as torchvision's SSD.

    Args:
        weights, weights_backbone: must be None (nothing is downloaded). An ImageNet
            MobileNetV2 state_dict (ours or torchvision's) loads into the backbone with
            ``model.backbone.features.load_state_dict({k[9:]: v for k, v in sd.items()
            if k.startswith("features.")})``.
        progress: unused (no download), for torchvision's signature.
        num_classes: classes including the background (COCO's 90 category ids + background:
            91, torchvision's convention; the paper's Table 5 counts 80 classes + background).
        width_mult: MobileNetV2's width multiplier; the extra layers' depths follow it
            (at least 16), the last layer keeps 1280 channels below 1.0, as in torchvision.
        fused: FusedInvertedResidual blocks (True) or torchvision's InvertedResidual (False);
            the state_dict keys are the same, so either loads the other's weights.
        norm_layer: the batch norm of the backbone, the extra layers and the heads; default
            ``BatchNorm2d(eps=0.001, momentum=0.03)`` as torchvision's SSDLite (TensorFlow's).
        anchor_generator: default SSDLiteBoxGenerator() (TensorFlow's boxes: 3 per location on
            the first feature map, 6 on the others); torchvision's SSDLite layout is
            ``DefaultBoxGenerator([[2, 3]] * 6, min_ratio=0.2, max_ratio=0.95)``.
        size: the (height, width) every image is resized to; the paper's 320x320.
        **kwargs: passed to torchvision's SSD (score_thresh, nms_thresh, detections_per_img,
            topk_candidates, image_mean, image_std, ...).

    The parameters are initialised as torchvision's SSDLite does without a pretrained
    backbone (every convolution normal with std 0.03), and identically for ``fused`` True
    and False under the same seed. In train mode the last extra layer's batch norm sees one
    value per image (1x1 at 320x320), so training needs at least 2 images, as torchvision's
    SSDLite. At 320x320 with 81 classes (80 + background, the paper's) the model has 4.34M
    parameters and computes 0.79B multiply-adds (the paper: 4.3M, 0.8B); with 91, 4.50M and
    0.80B.
    """
    _check_no_weights(weights, weights_backbone, "ssdlite320_mobilenet_v2")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2 (classes including the background), "
                         f"got {num_classes!r}")
    if len(size) != 2 or any(not isinstance(s, int) or s < 1 for s in size):
        raise ValueError(f"size must be (height, width) with positive integers, got {size!r}")
    if norm_layer is None:
        norm_layer = partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)
    features = mobilenet_v2_features(width_mult, fused, norm_layer)
    _normal_init(features)  # torchvision's SSDLite without a pretrained backbone
    backbone = SSDLiteMobileNetV2Backbone(features, norm_layer, width_mult)
    if anchor_generator is None:
        anchor_generator = SSDLiteBoxGenerator(len(backbone.out_channels))
    num_anchors = anchor_generator.num_anchors_per_location()
    if len(num_anchors) != len(backbone.out_channels):
        raise ValueError(f"anchor_generator has {len(num_anchors)} feature maps, the backbone "
                         f"{len(backbone.out_channels)}")
    defaults = {
        "score_thresh": 0.001,
        "nms_thresh": 0.55,
        "detections_per_img": 300,
        "topk_candidates": 300,
        # the backbone's input range, [-1, 1] (TensorFlow's MobileNetV2 preprocessing)
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }
    head = SSDLiteHead(backbone.out_channels, num_anchors, num_classes, norm_layer)
    return SSD(backbone, anchor_generator, tuple(size), num_classes, head=head, **{**defaults, **kwargs})
