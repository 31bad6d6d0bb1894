"""MobileNetV2 built from FusedInvertedResidual, and conversion of torchvision models.

The architecture, module order, parameter initialisation and state_dict keys
are torchvision's (torchvision.models.mobilenetv2), so a torchvision state_dict
loads unchanged and the same seed gives the same initial weights.
"""

from typing import Any, Callable, List, Optional

import torch
from torch import Tensor, nn

from .modules import Conv2dNormActivation, FusedInvertedResidual

# t (expansion), c (output channels), n (repeats), s (first stride)
DEFAULT_SETTING = [
    [1, 16, 1, 1],
    [6, 24, 2, 2],
    [6, 32, 3, 2],
    [6, 64, 4, 2],
    [6, 96, 3, 1],
    [6, 160, 3, 2],
    [6, 320, 1, 1],
]


def _make_divisible(v: float, divisor: int, min_value: Optional[int] = None) -> int:
    """Rounds channels to a multiple of divisor without going more than 10% down."""
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class MobileNetV2(nn.Module):
    def __init__(
        self,
        num_classes: int = 1000,
        width_mult: float = 1.0,
        inverted_residual_setting: Optional[List[List[int]]] = None,
        round_nearest: int = 8,
        block: Optional[Callable[..., nn.Module]] = None,
        norm_layer: Optional[Callable[..., nn.Module]] = None,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        if block is None:
            block = FusedInvertedResidual
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        input_channel = 32
        last_channel = 1280
        if inverted_residual_setting is None:
            inverted_residual_setting = DEFAULT_SETTING
        if len(inverted_residual_setting) == 0 or len(inverted_residual_setting[0]) != 4:
            raise ValueError("inverted_residual_setting should be non-empty and a 4-element list, "
                             f"got {inverted_residual_setting}")
        input_channel = _make_divisible(input_channel * width_mult, round_nearest)
        self.last_channel = _make_divisible(last_channel * max(1.0, width_mult), round_nearest)
        features: List[nn.Module] = [
            Conv2dNormActivation(3, input_channel, stride=2, norm_layer=norm_layer,
                                 activation_layer=nn.ReLU6)
        ]
        for t, c, n, s in inverted_residual_setting:
            output_channel = _make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                stride = s if i == 0 else 1
                features.append(block(input_channel, output_channel, stride, expand_ratio=t,
                                      norm_layer=norm_layer))
                input_channel = output_channel
        features.append(Conv2dNormActivation(input_channel, self.last_channel, kernel_size=1,
                                             norm_layer=norm_layer, activation_layer=nn.ReLU6))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(self.last_channel, num_classes))

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        return self.classifier(x)


def mobilenet_v2(
    num_classes: int = 1000,
    width_mult: float = 1.0,
    round_nearest: int = 8,
    dropout: float = 0.2,
    weights: Any = None,
    progress: bool = True,
    **kwargs: Any,
) -> MobileNetV2:
    """MobileNetV2 (Sandler et al., https://arxiv.org/abs/1801.04381) with fused blocks.

    Args:
        num_classes, width_mult, round_nearest, dropout: as torchvision's mobilenet_v2.
        weights: None, a state_dict, or a torchvision weights enum
            (e.g. ``MobileNet_V2_Weights.IMAGENET1K_V1``).
        progress: download progress bar for a weights enum.
        **kwargs: passed to MobileNetV2 (inverted_residual_setting, norm_layer, block).
    """
    if weights is not None and hasattr(weights, "meta") and "categories" in weights.meta:
        num_classes = len(weights.meta["categories"])
    model = MobileNetV2(num_classes=num_classes, width_mult=width_mult, round_nearest=round_nearest,
                        dropout=dropout, **kwargs)
    if weights is not None:
        state = weights if isinstance(weights, dict) else weights.get_state_dict(progress=progress,
                                                                                 check_hash=True)
        model.load_state_dict(state)
    return model


def _is_torchvision_block(m: nn.Module) -> bool:
    try:
        from torchvision.models.mobilenetv2 import InvertedResidual
    except ImportError:
        return False
    return isinstance(m, InvertedResidual) and not isinstance(m, FusedInvertedResidual)


def convert_model(model: nn.Module) -> nn.Module:
    """Replaces every torchvision InvertedResidual inside ``model`` (in place) by a
    FusedInvertedResidual sharing its parameters and buffers; returns ``model``.

    Hooks registered on the replaced blocks themselves are not carried over; hooks
    on their submodules are (those modules are shared).
    """
    if _is_torchvision_block(model):
        return FusedInvertedResidual.from_torchvision(model)
    for name, child in list(model.named_children()):
        if _is_torchvision_block(child):
            setattr(model, name, FusedInvertedResidual.from_torchvision(child))
        else:
            convert_model(child)
    return model


def mobilenet_block_shapes(width_mult: float = 1.0, resolution: int = 224, round_nearest: int = 8):
    """(inp, oup, stride, expand_ratio, H) of every inverted-residual block of
    mobilenet_v2(width_mult) on a square input of side `resolution`: the block's
    input channels, output channels, stride, expansion and input height."""
    input_channel = _make_divisible(32 * width_mult, round_nearest)
    size = (resolution - 1) // 2 + 1  # the stem is a 3x3 stride-2 convolution
    shapes = []
    for t, c, n, s in DEFAULT_SETTING:
        output_channel = _make_divisible(c * width_mult, round_nearest)
        for i in range(n):
            stride = s if i == 0 else 1
            shapes.append((input_channel, output_channel, stride, t, size))
            size = (size - 1) // stride + 1
            input_channel = output_channel
    return shapes
