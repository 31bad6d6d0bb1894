"""MobileNetV2 built from FusedInvertedResidual, and conversion of torchvision models.

The architecture, module order, parameter initialisation and state_dict keys
are torchvision's (torchvision.models.mobilenetv2), so a torchvision state_dict
loads unchanged and the same seed gives the same initial weights.
"""

import sys
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from . import backends, family, inference, ops
from .batch_norm import uses_batch_stats
from .capture import is_fx_proxy, packed_paths_allowed, unfused_for_export
from .inference import ModelCache, global_hooks
from .modules import Conv2dNormActivation, FusedInvertedResidual, depthwise_geometry

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
    _mnv2_cache = None  # a ModelCache, made on the first inference call (inference.cache_for)

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
        if torch.jit.is_scripting():
            return self._forward_modules(x)
        return self._forward_eager(x)

    def _forward_modules(self, x: Tensor) -> Tensor:
        """torchvision's forward: the layers as modules (TorchScript, fx and ONNX export)."""
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        return self.classifier(x)

    @torch.jit.unused
    def _forward_eager(self, x: Tensor) -> Tensor:
        if is_fx_proxy(x) or unfused_for_export():
            return self._forward_modules(x)
        if not torch.is_grad_enabled() and packed_paths_allowed():
            plan = inference.cache_for(self, ModelCache).plan
            y = plan.run(x)
            if y is not None:
                return y
            # taken before the layers read their weights (see DerivedCache): a change made
            # while they run leaves an outdated stamp, and the plan is rebuilt next call
            record = plan.start(self, x)
        else:
            record = None
        y = self._forward_layers(x)
        if record is not None:
            self._record_plan(plan, x, record)
        if not torch.is_grad_enabled() and packed_paths_allowed() and plan.entry is None:
            self._warn_without_plan(plan, x)
        return y

    def _warn_without_plan(self, plan: inference.ModelPlan, x: Tensor) -> None:
        """Warns once per reason when CPU inference runs layer by layer for a reason of the
        input's or the model's make (dtype, layout, a layer the one-call path cannot run),
        not for what a user chose (train mode, hooks, another backend, gradients)."""
        reason = self._one_call_blocker(plan, x)
        if reason is not None and reason not in plan.warned:
            plan.warned.add(reason)
            warnings.warn(f"mnv2_kernels: MobileNetV2 inference runs layer by layer, not as the one-call "
                          f"packed path, because {reason}.", stacklevel=4)

    def _one_call_blocker(self, plan: inference.ModelPlan, x: Tensor) -> Optional[str]:
        """Why the one-call path cannot run x on this model, when the call is otherwise
        eligible (a CPU image, eval mode everywhere, no hooks, the CPU backend); else None."""
        from . import _extension

        if (not _extension.LOADED or type(x) is not Tensor or not x.is_cpu or x.dim() != 4 or global_hooks()
                or backends.resolve(x) != "cpu"):
            return None
        if not _extension._C.ModulesIdle(plan._submodules(self))():
            return None  # train mode or hooks: the user's choice
        if x.dtype not in (torch.float32, torch.float64):
            return (f"the input is {x.dtype} (the packed CPU kernels take float32 and float64: convert the "
                    f"model and the input with .float())")
        if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
            return (f"the input (strides {tuple(x.stride())}) is neither NCHW nor channels_last contiguous "
                    f"(pass x.contiguous())")
        feats = self.features
        if type(feats) is not nn.Sequential or len(feats) < 4:
            return "features is not torchvision's Sequential of stem, blocks and head"
        for i in range(2, len(feats) - 1):
            if type(feats[i]) is not FusedInvertedResidual:
                return f"features[{i}] is {type(feats[i]).__name__}, not FusedInvertedResidual"
        first = feats[1]
        if type(first) is not FusedInvertedResidual:
            return f"features[1] is {type(first).__name__}, not FusedInvertedResidual"
        if first._parts()[0] is not None or first.use_res_connect:
            return ("features[1] has an expansion or a residual (as at width_mult 0.25), so the stem cannot be "
                    "fused into it")
        if first._parts()[2].dilation != (1, 1):
            return "features[1]'s depthwise convolution is dilated, so the stem cannot be fused into it"
        stem, head = feats[0], feats[len(feats) - 1]
        if type(stem) is not Conv2dNormActivation or self._stem_block_args(x) is None:
            return "features[0] is not torchvision's stem (3x3 stride-2 convolution, batch norm, ReLU6)"
        if type(head) is not Conv2dNormActivation or not head._foldable():
            return "features[-1] is not a 1x1 convolution with batch norm (and ReLU/ReLU6)"
        if self._packable_classifier(x.new_empty((1, head._modules["0"].out_channels))) is None:
            return "the classifier is not torchvision's Dropout + Linear"
        return None

    def _record_plan(self, plan: inference.ModelPlan, x: Tensor, record) -> None:
        """After a module-by-module inference call: the whole-model plan, when every layer
        took its packed path (the plan checks the blocks' records itself)."""
        feats = self.features
        if len(feats) < 4:
            return
        blocks = [feats[i] for i in range(2, len(feats) - 1)]
        if any(type(b) is not FusedInvertedResidual for b in blocks):
            return
        head = feats[len(feats) - 1]
        if type(head) is not Conv2dNormActivation or not head._foldable():
            return
        head_args = head._pointwise_args(x, head._state())
        # (the pooled features: one row per image, the head's channels)
        classifier = self._classifier_args(x.new_empty((1, head._modules["0"].out_channels)))
        plan.finish(x, record, self._stem_block_args(x), blocks, head_args, classifier,
                    inference.DepthwiseGeometry.of(feats[1]._parts()[2]))

    def clear_cache(self) -> None:
        """Drops the inference plan and every layer's cached folded and packed weights
        (rebuilt on the next inference call)."""
        inference.clear(self)
        for m in self.modules():
            if m is not self and callable(getattr(type(m), "clear_cache", None)):
                m.clear_cache()

    def _forward_layers(self, x: Tensor) -> Tensor:
        y = self._stem_and_first_block(x)
        if y is None:
            x = self.features(x)
        else:
            # CPU inference: the stem and the first block ran as one operator
            for i, m in enumerate(self.features):
                if i >= 2:
                    y = m(y)
            x = y
        x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        return self._classify(x)

    def _classify(self, x: Tensor) -> Tensor:
        """self.classifier(x) on the pooled features."""
        args = self._classifier_args(x)
        if args is not None:
            return _linear_packed(x, *args)
        return self.classifier(x)

    def _classifier_args(self, x: Tensor):
        """(packed weights, out features) when the classifier can run as the CPU kernel's 1x1
        GEMM on packed weights, else None. At batch 1 it is a matrix-vector product whose 5 MB
        of weights come from DRAM in a whole model (they do not stay in L3 between calls);
        the packed panels stream sequentially on both threads."""
        linear = self._packable_classifier(x)
        if linear is None:
            return None
        packed = inference.cache_for(self, ModelCache).classifier.get(
            x.dtype, [t for t in (linear.weight, linear.bias) if t is not None],
            lambda: ops.pack_pointwise(linear.weight, linear.bias if linear.bias is not None
                                       else linear.weight.new_zeros(linear.out_features)), self)
        return None if packed is None else (packed, linear.out_features)

    def _stem_and_first_block(self, x: Tensor) -> Optional[Tensor]:
        """features[1](features[0](x)) computed by one CPU operator (ops.stem_block) that
        never stores the stem's output (1.6 MB per 224x224 image, written to and read
        back from memory otherwise), when that computes exactly what the two modules
        would: CPU inference in float32/float64, torchvision's stem (3x3 stride-2
        convolution, batch norm with running statistics, ReLU6), a first block without
        expansion or residual, no hooks. Else None."""
        args = self._stem_block_args(x)
        return None if args is None else ops.stem_block(x, *args)

    def _stem_block_args(self, x: Tensor):
        """The arguments of ops.stem_block after x when _stem_and_first_block applies, else None."""
        feats = self.features
        if (type(x) is not Tensor or not x.is_cpu or x.dim() != 4 or type(feats) is not nn.Sequential
                or len(feats) < 2 or x.dtype not in backends.CPU_DTYPES or not packed_paths_allowed()):
            return None  # (a Sequential subclass may run its layers its own way)
        stem, block = feats[0], feats[1]
        if type(stem) is not Conv2dNormActivation or type(block) is not FusedInvertedResidual:
            return None
        m = stem._modules
        # (a batch norm in train mode, synchronised or not, is not foldable)
        if len(m) != 3 or not stem._foldable():
            return None
        conv, act = m["0"], m["2"]
        k, st, pad = ops.STEM_KERNEL, ops.STEM_STRIDE, ops.STEM_PAD
        if (type(conv) is not nn.Conv2d or conv.kernel_size != (k, k) or conv.stride != (st, st)
                or conv.padding != (pad, pad) or conv.dilation != (1, 1) or conv.groups != 1
                or conv.padding_mode != "zeros" or conv.in_channels != x.shape[1]
                or conv.weight.dtype != x.dtype or not conv.weight.is_cpu or type(act) is not nn.ReLU6):
            return None
        parts = block._parts()
        if (parts[0] is not None or block.use_res_connect or parts[2].in_channels != conv.out_channels
                or any(uses_batch_stats(n) for n in parts[1::2])):
            return None
        stride, dilation = depthwise_geometry(parts[2])
        # (the fused stem feeds an undilated 3x3 depthwise step with ReLU6)
        if dilation != 1 or parts[2].kernel_size != (3, 3) or block._activation_now() != "relu6":
            return None
        if (any(mod._forward_hooks or mod._forward_pre_hooks for mod in (feats, stem, block))
                or global_hooks()):
            return None
        stem_state = stem._state()
        block_state = block._state(parts)
        if torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in stem_state)
                                        or any(t.requires_grad for t in block_state)):
            return None
        if backends.resolve(x) != "cpu":
            return None
        stem_packed = stem.stem_packed_weights(x, stem_state)
        packed = block._packed_weights(x, block_state)
        if stem_packed is None or packed is None:
            return None
        return stem_packed, packed, conv.out_channels, parts[4].out_channels, stride

    def _packable_classifier(self, x: Tensor) -> Optional[nn.Linear]:
        """The classifier's Linear when the packed CPU kernel computes exactly what the
        classifier module would (torchvision's Dropout + Linear, dropout inactive, no
        hooks, no gradient needed), else None."""
        seq = self.classifier
        if (type(seq) is not nn.Sequential or len(seq) != 2 or type(x) is not Tensor or x.device.type != "cpu"
                or x.dim() != 2 or x.dtype not in backends.CPU_DTYPES or not packed_paths_allowed()):
            return None
        dropout, linear = seq[0], seq[1]
        if (type(dropout) is not nn.Dropout or (dropout.training and dropout.p > 0)
                or type(linear) is not nn.Linear or linear.weight.dtype != x.dtype
                or linear.weight.device != x.device or not x.is_contiguous()):
            return None
        if any(m._forward_hooks or m._forward_pre_hooks for m in (seq, dropout, linear)) or global_hooks():
            return None
        if torch.is_grad_enabled() and (x.requires_grad or linear.weight.requires_grad
                                        or (linear.bias is not None and linear.bias.requires_grad)):
            return None
        if backends.resolve(x) != "cpu":
            return None
        return linear


def _linear_packed(x: Tensor, packed: Tensor, out_features: int) -> Tensor:
    n, c = x.shape
    return ops.pointwise_conv(x.view(n, c, 1, 1), packed, out_features).view(n, -1)


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


def _block_rules() -> Dict[type, Callable[[nn.Module], FusedInvertedResidual]]:
    """The block classes convert_model recognises, each with its fused block's maker:
    torchvision's MobileNetV2 and MNASNet blocks, and timm's InvertedResidual and
    DepthwiseSeparableConv when timm is in use (already imported: a timm model is)."""
    rules: Dict[type, Callable[[nn.Module], FusedInvertedResidual]] = {}
    try:
        from torchvision.models.mnasnet import _InvertedResidual
        from torchvision.models.mobilenetv2 import InvertedResidual
    except ImportError:
        pass
    else:
        rules[InvertedResidual] = FusedInvertedResidual.from_torchvision
        rules[_InvertedResidual] = family.FusedMNASNetBlock.from_block
    timm_blocks = sys.modules.get("timm.models._efficientnet_blocks")
    if timm_blocks is not None:
        rules[timm_blocks.InvertedResidual] = family.FusedTimmBlock.from_block
        rules[timm_blocks.DepthwiseSeparableConv] = family.FusedTimmBlock.from_block
    return rules


def _fuse(m: nn.Module, rules) -> Tuple[Optional[FusedInvertedResidual], Optional[str]]:
    """(the fused block sharing block ``m``'s submodules, None), or (None, why ``m`` cannot
    be fused)."""
    make = rules.get(type(m))
    if make is None:
        # e.g. torchvision.models.quantization's QuantizableInvertedResidual, whose forward
        # adds through a FloatFunctional for quantization, or timm's CondConvResidual
        return None, (f"a {type(m).__name__} (a subclass of a block class: its forward may differ from "
                      "the block's, so it is left as it is)")
    try:
        return make(m), None
    except (TypeError, ValueError, AttributeError) as exc:
        return None, str(exc)


def _find_blocks(module: nn.Module, classes: tuple, prefix: str, found: List[Tuple[str, nn.Module, nn.Module]]):
    """(name, parent, block) of every recognised block inside ``module`` (not inside a block)."""
    for name, child in module.named_children():
        path = f"{prefix}.{name}" if prefix else name
        if isinstance(child, classes):
            found.append((path, module, child))
        elif not isinstance(child, FusedInvertedResidual):
            _find_blocks(child, classes, path, found)


def convert_model(model: nn.Module, strict: bool = False) -> nn.Module:
    """Replaces every inverted-residual block inside ``model`` (in place) by a fused block
    sharing its parameters and buffers, with the same ``state_dict`` keys; returns
    ``model`` (a new block when ``model`` is itself a block).

    The blocks recognised: torchvision's MobileNetV2 ``InvertedResidual`` (made a
    FusedInvertedResidual) and MNASNet ``_InvertedResidual`` (FusedMNASNetBlock), and
    timm's ``InvertedResidual`` and ``DepthwiseSeparableConv`` (FusedTimmBlock): the
    blocks of MobileNetV2, MNASNet, EfficientNet-Lite, SPNASNet and FBNet, with 3x3, 5x5
    or 7x7 depthwise convolutions and ReLU or ReLU6.

    Every block is checked before any is replaced. A block that cannot be fused (a
    depthwise kernel other than 3, 5 or 7, an activation other than ReLU6 or ReLU,
    squeeze-and-excitation, TensorFlow "same" padding, a norm layer that does not fold, a
    subclass such as torchvision's quantizable block) is left as it is, and one warning
    names each block left and why; so does a model with no such block at all. With
    ``strict=True`` either case raises a ValueError instead, before anything is changed.

    Hooks registered on the replaced blocks themselves are not carried over; hooks
    on their submodules are (those modules are shared).
    """
    rules = _block_rules()
    classes = tuple(rules)
    found: List[Tuple[str, nn.Module, nn.Module]] = []
    if isinstance(model, classes):
        found.append((type(model).__name__, None, model))
    elif classes:
        _find_blocks(model, classes, "", found)
    checked = [(path, parent, *_fuse(block, rules)) for path, parent, block in found]
    left = "".join(f"\n  {path}: {why}" for path, _, _, why in checked if why is not None)
    fit = [(path, parent, fused) for path, parent, fused, why in checked if why is None]
    if not fit:
        message = (f"convert_model: nothing to convert in {type(model).__name__}: "
                   + ("no block can be fused:" + left if found else
                      "it has no inverted-residual block (torchvision's MobileNetV2 or MNASNet block, timm's "
                      "InvertedResidual or DepthwiseSeparableConv)"))
    elif left:
        message = (f"convert_model: {len(found) - len(fit)} of {len(found)} blocks left unfused in "
                   f"{type(model).__name__}:" + left)
    else:
        message = None
    if message is not None:
        if strict:
            raise ValueError(message)
        warnings.warn(message, UserWarning, stacklevel=2)
    for path, parent, fused in fit:
        if parent is None:
            return fused  # model is itself a block
        setattr(parent, path.rsplit(".", 1)[-1], fused)
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
