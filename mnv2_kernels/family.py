"""The inverted-residual family beyond MobileNetV2: fused blocks that keep the layout,
submodules and ``state_dict`` keys of torchvision's MNASNet block and of timm's
``InvertedResidual`` and ``DepthwiseSeparableConv`` (MobileNetV2, EfficientNet-Lite,
MNASNet, SPNASNet, FBNet in timm), made by ``convert_model`` around a block's own
submodules (shared, not copied).

Each computes what its block's forward computes, as one fused operator: expand 1x1 +
batch norm + ReLU/ReLU6 (absent in a depthwise-separable block), depthwise k x k
(k = 3, 5, 7) + batch norm + the same activation, project 1x1 + batch norm, and the
residual. A block with anything else in that chain (squeeze-and-excitation,
anti-aliasing, TensorFlow "same" padding, another activation, an activation after the
project) is refused with the reason, and ``convert_model`` leaves it as it is.
"""

from typing import Callable, Optional

from torch import Tensor, nn

from .modules import FusedInvertedResidual, activation_name


def _is_identity(m: Optional[nn.Module]) -> bool:
    return m is None or type(m) is nn.Identity


def _require(ok: bool, why: str) -> None:
    if not ok:
        raise TypeError(why)


def _plain_conv(conv: nn.Module, what: str) -> None:
    """A plain nn.Conv2d: timm's Conv2dSame (TensorFlow "same" padding, computed per input),
    CondConv2d and MixedConv2d compute something else."""
    _require(type(conv) is nn.Conv2d,
             f"its {what} is a {type(conv).__name__}, not an nn.Conv2d (TensorFlow 'same' padding, conditional "
             "or mixed convolutions are not fused)")


class _AroundBlock(FusedInvertedResidual):
    """A fused block made around another library's block: it holds that block's submodules
    and attributes under their own names, and runs the block's own forward (on itself)
    wherever the block runs unfused."""

    @classmethod
    def from_block(cls, block: nn.Module):
        """The fused block sharing ``block``'s submodules (in order: the same state_dict keys)
        and copying its public attributes (apply_residual, has_skip, conv_s2d = None, ...)."""
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        for name, child in block.named_children():
            setattr(fused, name, child)
        for name, value in vars(block).items():
            if not name.startswith("_") and name != "training":
                setattr(fused, name, value)
        fused.training = block.training
        fused._block_forward = type(block).forward
        fused._adopt(block)
        fused._check_structure()
        return fused

    def _adopt(self, block: nn.Module) -> None:
        """What a subclass reads from the block besides its submodules and attributes."""
        raise NotImplementedError

    def _forward_modules(self, x: Tensor) -> Tensor:
        return self._block_forward(self, x)

    def _forward_unfused(self, x: Tensor, parts) -> Tensor:
        return self._block_forward(self, x)


class FusedMNASNetBlock(_AroundBlock):
    """torchvision's MNASNet block (``torchvision.models.mnasnet._InvertedResidual``) as one
    fused operator: same submodules (``layers``: 1x1 conv, BN, ReLU, depthwise 3x3 or 5x5,
    BN, ReLU, 1x1 conv, BN) and ``state_dict`` keys."""

    def _adopt(self, block: nn.Module) -> None:
        self.use_res_connect = bool(block.apply_residual)

    def _parts(self):
        m = self.layers._modules
        return m["0"], m["1"], m["3"], m["4"], m["6"], m["7"]

    def _check_structure(self) -> None:
        layers = self.layers
        _require(isinstance(layers, nn.Sequential) and len(layers) == 8,
                 f"FusedMNASNetBlock: expected 8 layers (conv, BN, ReLU, depthwise, BN, ReLU, conv, BN), got {layers}")
        self._check_parts(self._activation_now())

    def _activation_now(self) -> str:
        m = self.layers._modules
        act = activation_name(m["2"])
        _require(act is not None and activation_name(m["5"]) == act,
                 f"the block's activations must be ReLU or ReLU6 (the same twice), got {type(m['2']).__name__} "
                 f"and {type(m['5']).__name__}")
        return act


class FusedTimmBlock(_AroundBlock):
    """timm's ``InvertedResidual`` or ``DepthwiseSeparableConv`` (timm.models._efficientnet_blocks)
    as one fused operator, with the block's own submodules under their names (``conv_pw``,
    ``bn1``, ``conv_dw``, ..., ``drop_path``), so ``state_dict`` keys are unchanged. Its
    batch norms are timm's ``BatchNormAct2d``, which carry the activation. Stochastic depth
    (``drop_path``, train mode) applies to the branch before the residual add, as in timm.
    """

    def _adopt(self, block: nn.Module) -> None:
        self.use_res_connect = bool(block.has_skip)
        self._separable = not hasattr(block, "conv_pwl")

    def _parts(self):
        m = self._modules
        if self._separable:
            return None, None, m["conv_dw"], m["bn1"], m["conv_pw"], m["bn2"]
        return m["conv_pw"], m["bn1"], m["conv_dw"], m["bn2"], m["conv_pwl"], m["bn3"]

    def _check_structure(self) -> None:
        m = self._modules
        _require(getattr(self, "conv_s2d", None) is None, "it starts with a space-to-depth convolution")
        _require(_is_identity(m.get("se")), f"it has squeeze-and-excitation ({type(m.get('se')).__name__})")
        _require(_is_identity(m.get("aa")), f"it has anti-aliasing ({type(m.get('aa')).__name__})")
        expand, bn1, dw, bn2, proj, bn3 = self._parts()
        for conv, what in ((expand, "expansion"), (dw, "depthwise convolution"), (proj, "projection")):
            if conv is not None:
                _plain_conv(conv, what)
        for norm in (bn1, bn2, bn3):
            if norm is not None:
                _require(_is_identity(getattr(norm, "drop", None)), "a batch norm has dropout")
        _require(_is_identity(getattr(bn3, "act", None)),
                 f"its projection has an activation ({type(getattr(bn3, 'act', None)).__name__})")
        drop = m.get("drop_path")
        _require(_is_identity(drop) or type(drop).__name__ == "DropPath",
                 f"its drop_path is a {type(drop).__name__}")
        self._check_parts(self._activation_now())

    def _activation_now(self) -> str:
        expand, bn1, dw, bn2, proj, bn3 = self._parts()
        acts = [getattr(n, "act", None) for n in ((bn1, bn2) if expand is not None else (bn2,))]
        names = {activation_name(a) for a in acts}
        _require(len(names) == 1 and None not in names,
                 "its activations must be ReLU or ReLU6 (the same after the expansion and the depthwise step), got "
                 + ", ".join(type(a).__name__ for a in acts))
        return names.pop()

    def _drop_path(self) -> Optional[Callable[[Tensor], Tensor]]:
        drop = self._modules.get("drop_path")
        if drop is None or type(drop) is nn.Identity or not drop.training or not getattr(drop, "drop_prob", 0.0):
            return None
        return drop
