"""FusedInvertedResidual: torchvision's InvertedResidual with a fused forward."""

from typing import Callable, Final, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from . import backends, inference, ops
from .capture import (fx_leaf, is_fx_proxy, keeps_torchvision_layers_whole, packed_paths_allowed, recording,
                      unfused_for_export)
from .batch_norm import (BatchNormStep, fold_bn, running_stats, sync_batch_norm, sync_process_group,
                         uses_batch_stats)
from .inference import BlockCache, BlockRecord, ConvCache, PackedBlockArgs


class Conv2dNormActivation(nn.Sequential):
    """Conv2d, then norm, then activation: torchvision.ops.Conv2dNormActivation's
    layout (submodules 0, 1, 2), so state_dict keys match.

    When the batch norm uses its running statistics it is folded into the
    convolution (cached under no_grad until a parameter or buffer changes), a
    1x1 convolution on channels_last input runs as one matrix product, and
    ReLU/ReLU6 are applied in place. Otherwise it runs module by module.
    """

    _mnv2_cache = None  # a ConvCache, made on the first inference call (inference.cache_for)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: Optional[int] = None,
        groups: int = 1,
        norm_layer: Optional[Callable[..., nn.Module]] = nn.BatchNorm2d,
        activation_layer: Optional[Callable[..., nn.Module]] = nn.ReLU,
        dilation: int = 1,
        inplace: Optional[bool] = True,
        bias: Optional[bool] = None,
    ) -> None:
        if padding is None:
            padding = (kernel_size - 1) // 2 * dilation
        if bias is None:
            bias = norm_layer is None
        layers: List[nn.Module] = [
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding,
                      dilation=dilation, groups=groups, bias=bias)
        ]
        if norm_layer is not None:
            layers.append(norm_layer(out_channels))
        if activation_layer is not None:
            layers.append(activation_layer(**({} if inplace is None else {"inplace": inplace})))
        super().__init__(*layers)
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            for module in self:  # torchvision's computation, module by module
                x = module(x)
            return x
        return self._forward_eager(x)

    @torch.jit.unused
    def _forward_eager(self, x: Tensor) -> Tensor:
        m = self._modules
        conv, norm, act = m.get("0"), m.get("1"), m.get("2")
        if is_fx_proxy(x):
            path = x.tracer.path_of_module(self) if keeps_torchvision_layers_whole(x) else ""
            if path:  # one node, as torchvision's tracer records its own layer
                return x.tracer.create_proxy("call_module", path, (x,), {})
            return super().forward(x)
        if unfused_for_export():
            return super().forward(x)
        group = sync_process_group(norm)
        if group is not None and len(m) <= 3 and isinstance(conv, nn.Conv2d):
            # SyncBatchNorm across processes: statistics all-reduced here, on any device
            # (nn.SyncBatchNorm itself refuses CPU tensors)
            y = sync_batch_norm(conv(x), norm, group)
            return y if act is None else act(y)
        if not self._foldable():
            return super().forward(x)
        fmt = torch.channels_last if (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
                                      and not x.is_contiguous()) else torch.contiguous_format
        state = self._state()
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in state))
        fold = lambda: self._fold(conv, norm, fmt)  # noqa: E731
        pointwise = fmt == torch.channels_last and self._is_pointwise(conv)
        if pointwise and not needs_grad:
            packed = self._pointwise_args(x, state)
            if packed is not None:
                return ops.pointwise_conv(x, *packed)
        folded = None if needs_grad else inference.cache_for(self, ConvCache).folded.get(
            (x.dtype, fmt), state, fold, self)
        w, b = folded if folded is not None else fold()
        if pointwise:
            n, c, h, wd = x.shape
            rows = torch.addmm(b, x.permute(0, 2, 3, 1).reshape(n * h * wd, c), w.view(w.shape[0], c).t())
            y = rows.view(n, h, wd, -1).permute(0, 3, 1, 2)  # channels_last, no copy
        else:
            y = nn.functional.conv2d(x, w, b, conv.stride, conv.padding, conv.dilation, conv.groups)
        if act is None:
            return y
        if needs_grad:
            return nn.functional.relu6(y) if type(act) is nn.ReLU6 else nn.functional.relu(y)
        return y.clamp_(0, 6) if type(act) is nn.ReLU6 else y.clamp_(min=0)

    def _foldable(self) -> bool:
        """conv -> batch norm with running statistics (folded) -> ReLU/ReLU6 or nothing,
        outside torch.compile: the layouts forward handles itself."""
        m = self._modules
        conv, norm, act = m.get("0"), m.get("1"), m.get("2")
        return not (len(m) > 3 or not isinstance(conv, nn.Conv2d) or norm is None
                    or not _is_foldable_norm(norm) or uses_batch_stats(norm)
                    or (act is not None and type(act) not in (nn.ReLU, nn.ReLU6))
                    or recording())

    def _state(self) -> List[Tensor]:
        return [t for mod in (self._modules["0"], self._modules["1"])
                for t in (*mod._parameters.values(), *mod._buffers.values()) if t is not None]

    @staticmethod
    def _is_pointwise(conv) -> bool:
        return (conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.padding == (0, 0)
                and conv.groups == 1)

    def _pointwise_args(self, x: Tensor, state):
        """For a foldable 1x1 layer on a CPU input that needs no gradient: (packed weights,
        cout, activation name) for the CPU kernel's 1x1 GEMM (bias and activation in its
        epilogue), the weights cached until a source changes. None when the CPU kernel does
        not run x or the weights cannot be cached (inference-mode tensors)."""
        conv, norm, act = self._modules["0"], self._modules["1"], self._modules.get("2")
        if not (self._is_pointwise(conv) and x.device.type == "cpu" and x.dtype in backends.CPU_DTYPES
                and packed_paths_allowed() and backends.resolve(x) == "cpu"):
            return None
        packed = inference.cache_for(self, ConvCache).packed.get(
            x.dtype, state, lambda: self._pack_pointwise(conv, norm), self)
        return None if packed is None else (packed, conv.out_channels, _ACTIVATION_NAMES[type(act)])

    def stem_packed_weights(self, x: Tensor, state) -> Optional[Tensor]:
        """This layer's weights packed for ops.stem_block (MobileNetV2's first convolution
        fused into the first block), cached until a source changes; None when they
        cannot be cached (inference-mode tensors)."""
        conv, norm = self._modules["0"], self._modules["1"]
        return inference.cache_for(self, ConvCache).stem.get(
            x.dtype, state, lambda: ops.pack_stem(*self._fold(conv, norm, torch.contiguous_format)), self)

    def clear_cache(self) -> None:
        """Drops the cached folded and packed weights (rebuilt on the next inference call)."""
        inference.clear(self)

    @staticmethod
    def _fold(conv, norm, fmt):
        w, b = fold_bn(conv.weight, conv.bias, norm.weight, norm.bias, *running_stats(norm), norm.eps)
        return w.contiguous(memory_format=fmt), b

    @classmethod
    def _pack_pointwise(cls, conv, norm):
        w, b = cls._fold(conv, norm, torch.contiguous_format)
        return ops.pack_pointwise(w.view(w.shape[0], -1), b)


_ACTIVATION_NAMES = {type(None): None, nn.ReLU: "relu", nn.ReLU6: "relu6"}


def _fold_running(weight: Tensor, bias: Optional[Tensor], bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                  mean: Optional[Tensor], var: Optional[Tensor], eps: float) -> Tuple[Tensor, Tensor]:
    """fold_bn with a batch norm's running statistics (TorchScript: they are Optional)."""
    assert mean is not None and var is not None
    return fold_bn(weight, bias, bn_weight, bn_bias, mean, var, eps)


def _is_foldable_norm(m: nn.Module) -> bool:
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return True
    # torchvision.ops.FrozenBatchNorm2d and look-alikes: fixed statistics and affine
    return all(hasattr(m, a) for a in ("weight", "bias", "running_mean", "running_var", "eps"))


def depthwise_conv(layer: nn.Module) -> Optional[nn.Conv2d]:
    """The depthwise convolution of an inverted-residual block, torchvision's or fused
    (``conv.1.0`` with an expansion, ``conv.0.0`` without), or None for another layer."""
    conv = getattr(layer, "conv", None)
    if not isinstance(conv, nn.Sequential) or len(conv) not in (3, 4):
        return None
    stage = conv[len(conv) - 3]
    dw = stage[0] if isinstance(stage, nn.Sequential) and len(stage) > 0 else None
    if isinstance(dw, nn.Conv2d) and dw.groups == dw.in_channels and dw.groups > 1:
        return dw
    return None


def depthwise_geometry(dw: nn.Conv2d) -> Tuple[int, int]:
    """(stride, dilation) of a block's depthwise convolution, read from the module on every
    call, so that atrous surgery on it (DeepLab's: stride 1, dilation and padding d, set
    in place) is followed. Raises when the kernels do not compute that convolution: a
    k x k kernel (k = 3, 5, 7), stride 1 or 2, zero padding d * (k // 2)."""
    st, dil, pad, ks = dw.stride, dw.dilation, dw.padding, dw.kernel_size
    d, k = dil[0], ks[0]
    if (ks[0] != ks[1] or k not in ops.DW_KERNELS or st[0] != st[1] or st[0] not in (1, 2) or dil[0] != dil[1]
            or not isinstance(d, int) or not 1 <= d <= ops.max_dilation(k)
            or pad != (d * (k // 2), d * (k // 2)) or dw.padding_mode != "zeros"):
        raise ValueError(
            f"FusedInvertedResidual: the depthwise convolution must be 3x3, 5x5 or 7x7 with stride 1 or 2, a "
            f"dilation d of 1 to {ops.max_dilation(3)} (3x3), {ops.max_dilation(5)} (5x5) or {ops.max_dilation(7)} "
            f"(7x7) and zero padding d * (k // 2) (the same in both dimensions), got kernel {ks}, stride {st}, "
            f"dilation {dil}, padding {pad}, padding_mode {dw.padding_mode!r}")
    return st[0], d


def activation_name(m: Optional[nn.Module]) -> Optional[str]:
    """"relu6" or "relu" for the block activations the kernels compute (nn.ReLU6,
    nn.ReLU), else None."""
    t = type(m)
    return "relu6" if t is nn.ReLU6 else "relu" if t is nn.ReLU else None


def _activation_layer(activation) -> Callable[..., nn.Module]:
    """nn.ReLU6 or nn.ReLU from a name ("relu6", "relu") or either class."""
    if activation in ("relu6", nn.ReLU6):
        return nn.ReLU6
    if activation in ("relu", nn.ReLU):
        return nn.ReLU
    raise ValueError(f"FusedInvertedResidual: activation must be 'relu6' or 'relu' (or nn.ReLU6 / nn.ReLU), "
                     f"got {activation!r}")


class FusedInvertedResidual(nn.Module):
    """MobileNetV2's inverted-residual block computed by one fused operator.

    Same constructor, submodules and state_dict keys as
    ``torchvision.models.mobilenetv2.InvertedResidual``; the parameters live in
    ordinary Conv2d/BatchNorm2d modules. The keyword arguments ``kernel_size`` (3, 5 or 7:
    the depthwise convolution's, padding kernel_size // 2) and ``activation`` ("relu6" or
    "relu", or nn.ReLU6 / nn.ReLU: after the expand and after the depthwise step) build
    the family's blocks (MNASNet, EfficientNet-Lite, FBNet, ...); their defaults are
    MobileNetV2's. In eval mode the batch norms are folded
    into the convolutions and the whole block is one ``mnv2::fused_inverted_residual``
    call. In train mode the batch statistics are computed without keeping the
    hidden tensor for backward, folded, and the last batch norm runs as usual.

    The depthwise step's stride and dilation are read from the depthwise convolution
    (``conv.1.0``, or ``conv.0.0`` when expand_ratio == 1) on every call, as
    torchvision's modules would use them: an atrous (dilated) block made by setting that
    convolution's stride, dilation and padding (padding = dilation) runs fused too. The
    residual stays as constructed (``use_res_connect``), as in torchvision.
    """

    _mnv2_cache = None  # a BlockCache, made on the first inference call (inference.cache_for)
    # TorchScript: a constant per block, so that the scripted forward indexes only the
    # submodules this block has; the properties are Python-only
    _has_expand: Final[bool]
    _activation: Final[str]  # "relu6" or "relu"
    __jit_unused_properties__ = ["has_expand", "in_channels"]

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int,
                 norm_layer: Optional[Callable[..., nn.Module]] = None, *, kernel_size: int = ops.DW_KERNEL,
                 activation: Union[str, Callable[..., nn.Module]] = "relu6") -> None:
        super().__init__()
        if kernel_size not in ops.DW_KERNELS:
            raise ValueError(f"FusedInvertedResidual: kernel_size must be 3, 5 or 7, got {kernel_size}")
        act = _activation_layer(activation)
        self.stride = stride
        if stride not in (1, 2):
            raise ValueError(f"stride should be 1 or 2 instead of {stride}")
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        hidden_dim = int(round(inp * expand_ratio))
        self.use_res_connect = self.stride == 1 and inp == oup
        layers: List[nn.Module] = []
        if expand_ratio != 1:
            layers.append(Conv2dNormActivation(inp, hidden_dim, kernel_size=1, norm_layer=norm_layer,
                                               activation_layer=act))
        layers.extend([
            Conv2dNormActivation(hidden_dim, hidden_dim, kernel_size=kernel_size, stride=stride, groups=hidden_dim,
                                 norm_layer=norm_layer, activation_layer=act),
            nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False),
            norm_layer(oup),
        ])
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup
        self._is_cn = stride > 1
        self._check_structure()

    @classmethod
    def from_torchvision(cls, block: nn.Module) -> "FusedInvertedResidual":
        """A fused block sharing ``block``'s submodules (parameters and buffers)."""
        fused = cls.around(block.conv, block.stride, block.use_res_connect, block.out_channels)
        fused.train(block.training)
        return fused

    @classmethod
    def around(cls, conv: nn.Sequential, stride: int, residual: bool, out_channels: int) -> "FusedInvertedResidual":
        """A fused block whose ``conv`` submodule is ``conv`` (shared, not copied)."""
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.conv = conv
        fused.stride = stride
        fused.use_res_connect = residual
        fused.out_channels = out_channels
        fused._is_cn = stride > 1
        fused.training = conv.training
        fused._check_structure()
        return fused

    # -- structure ---------------------------------------------------------
    @property
    def has_expand(self) -> bool:
        return self._parts()[0] is not None

    def _parts(self):
        """(expand conv, bn1, depthwise conv, bn2, project conv, bn3); the first two are
        None when expand_ratio == 1. Read from the module dicts on every call (cheap),
        so replaced submodules (e.g. by convert_sync_batchnorm) are always seen."""
        c = self.conv._modules
        if len(c) == 4:
            e, d = c["0"]._modules, c["1"]._modules
            return e["0"], e["1"], d["0"], d["1"], c["2"], c["3"]
        d = c["0"]._modules
        return None, None, d["0"], d["1"], c["1"], c["2"]

    @staticmethod
    def _state(parts):
        """Every parameter and buffer of the six parts, without walking the module tree."""
        state = []
        for m in parts:
            if m is not None:
                for t in m._parameters.values():
                    if t is not None:
                        state.append(t)
                for t in m._buffers.values():
                    if t is not None:
                        state.append(t)
        return state

    def _check_structure(self) -> None:
        c = self.conv
        if len(c) not in (3, 4):
            raise TypeError(f"FusedInvertedResidual: unexpected block layout {c}")
        self._check_parts(self._activation_now())

    def _check_parts(self, activation: str) -> None:
        """Checks the six parts the kernels compute; sets the TorchScript constants."""
        expand, bn1, dw, bn2, proj, bn3 = self._parts()
        self._has_expand = expand is not None
        self._activation = activation
        for norm in (bn1, bn2, bn3):
            if norm is not None and not _is_foldable_norm(norm):
                raise TypeError(
                    "FusedInvertedResidual folds batch norm into the convolutions; norm_layer must "
                    f"build BatchNorm2d (or FrozenBatchNorm2d), got {type(norm).__name__}")
        if not isinstance(dw, nn.Conv2d) or dw.groups != dw.in_channels:
            raise TypeError(f"FusedInvertedResidual: expected a depthwise convolution, got {dw}")
        for conv in (expand, proj):
            if conv is not None and (not isinstance(conv, nn.Conv2d) or conv.kernel_size != (1, 1)
                                     or conv.stride != (1, 1) or conv.groups != 1):
                raise TypeError(f"FusedInvertedResidual: expected a 1x1 convolution, got {conv}")
        try:
            depthwise_geometry(dw)
        except ValueError as e:
            raise TypeError(str(e)) from None

    def _activation_now(self) -> str:
        """The activation of the stages as they are now (a ReLU6 replaced by a ReLU in
        place, as torchvision's quantization preparation does, is followed)."""
        c = self.conv._modules
        stages = (c["0"], c["1"]) if len(c) == 4 else (c["0"],)
        names = {activation_name(stage[2]) if len(stage) == 3 else None for stage in stages}
        if len(names) != 1 or None in names:
            raise TypeError("FusedInvertedResidual: every conv stage must be conv -> norm -> ReLU6 (or ReLU, the "
                            f"same in both stages), got {list(stages)}")
        return names.pop()

    def _drop_path(self) -> Optional[Callable[[Tensor], Tensor]]:
        """Stochastic depth on the branch before the residual add (timm's drop_path), when it
        is active (train mode, a positive rate); None for torchvision's blocks."""
        return None

    @property
    def in_channels(self) -> int:
        expand, _, dw, _, _, _ = self._parts()
        return (expand if expand is not None else dw).in_channels

    # -- forward -------------------------------------------------------------
    def _check_input(self, x: Tensor, parts) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"FusedInvertedResidual expects a Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError("FusedInvertedResidual expects a 4-D input (N, C, H, W), got "
                             f"{x.dim()}-D with shape {tuple(x.shape)}")
        cin = (parts[0] if parts[0] is not None else parts[2]).in_channels
        if x.shape[1] != cin:
            raise ValueError(f"FusedInvertedResidual expects {cin} input channels, "
                             f"got {x.shape[1]} (input shape {tuple(x.shape)})")
        if x.shape[2] < 1 or x.shape[3] < 1:
            raise ValueError(f"FusedInvertedResidual needs height and width >= 1, got {tuple(x.shape)}")
        weight = parts[4].weight
        if x.device != weight.device:
            raise RuntimeError(f"FusedInvertedResidual: the input is on {x.device} but the block's "
                               f"parameters are on {weight.device}")
        # (under autocast the operators cast the input and the weights, as convolutions do)
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise RuntimeError(f"FusedInvertedResidual: the input dtype {x.dtype} does not match the "
                               f"parameters' dtype {weight.dtype}")

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return self._forward_scripted(x)
        else:  # (TorchScript compiles only the branch above)
            if not torch.is_grad_enabled() and packed_paths_allowed():
                y = inference.run_block(self._mnv2_cache, x)  # the last inference call's decisions, re-checked
                if y is not None:
                    return y
            return self._forward_eager(x)

    @torch.jit.unused
    def _forward_eager(self, x: Tensor) -> Tensor:
        if is_fx_proxy(x):
            return fx_leaf(self, x)
        parts = self._parts()
        if not torch.jit.is_tracing():  # (jit.trace: the operators check, shapes are traced values)
            self._check_input(x, parts)
        if unfused_for_export():
            return self._forward_unfused(x, parts)
        stride, dilation = depthwise_geometry(parts[2])
        kernel_size, act = parts[2].kernel_size[0], self._activation_now()
        backend = backends.resolve(x, dilation, kernel_size, act)
        if backend == "reference":
            # torchvision's computation, module by module
            return self._forward_unfused(x, parts)
        if any(n is not None and uses_batch_stats(n) for n in parts[1::2]):
            return self._forward_batch_stats(x, backend, stride, dilation, act)
        weights = None
        if not recording():
            state = self._state(parts)
            if not (torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in state))):
                # inference: fold (and pack, for the CPU kernel) once, reuse until a
                # parameter or buffer changes
                cache = inference.cache_for(self, BlockCache)
                if backend == "cpu" and x.dtype in backends.CPU_DTYPES and packed_paths_allowed():
                    packed = self._packed_weights(x, state)
                    if packed is not None:
                        args = PackedBlockArgs(parts[2].out_channels, parts[4].out_channels, parts[0] is not None,
                                               stride, self.use_res_connect, dilation, kernel_size, act)
                        if not torch.is_grad_enabled():
                            batch_norms = tuple(n for n in parts[1::2]
                                                if isinstance(n, nn.modules.batchnorm._BatchNorm))
                            # (x's channels were checked against the block's above)
                            cache.record = BlockRecord(x.dtype, x.shape[1], backends.get_backend(), batch_norms,
                                                       args, inference.DepthwiseGeometry.of(parts[2]))
                        return ops.fused_inverted_residual_packed(x, packed, *args)
                else:
                    weights = cache.folded.get(x.dtype, state, self.folded_weights, self)
        if weights is None:
            weights = self.folded_weights()
        return self._fused(x, weights, backend, stride, dilation, act)

    def _fused(self, x: Tensor, weights, backend: str, stride: int, dilation: int, activation: str) -> Tensor:
        """The fused operator on folded ``weights``. Under autocast with an input of another
        dtype than autocast's (float32 into a bfloat16 region), the residual is added
        outside the operator, in the wider dtype, as torchvision's ``x + conv(x)`` does;
        and so it is when stochastic depth drops the branch (timm's drop_path, train mode)."""
        if self.use_res_connect:
            drop = self._drop_path()
            if drop is not None or (torch.is_autocast_enabled(x.device.type)
                                    and x.dtype != torch.get_autocast_dtype(x.device.type)):
                y = ops.run_block(backend, x, *weights, stride, False, dilation, activation)
                return x + (drop(y) if drop is not None else y)
        return ops.run_block(backend, x, *weights, stride, self.use_res_connect, dilation, activation)

    def _forward_scripted(self, x: Tensor) -> Tensor:
        """forward under TorchScript: with running statistics, the fused operator (the C++
        kernel of x's device) on the folded weights; with batch statistics (train mode, or
        no running statistics), torchvision's computation, module by module."""
        c = self.conv
        w_expand: Optional[Tensor] = None
        b_expand: Optional[Tensor] = None
        if self._has_expand:
            expand = c[0]
            dw = c[1]
            proj = c[2]
            bn3 = c[3]
            bn1 = expand[1]
            if self.training or bn1.running_mean is None:
                return self._forward_modules(x)
            w_expand, b_expand = _fold_running(expand[0].weight, expand[0].bias, bn1.weight, bn1.bias,
                                               bn1.running_mean, bn1.running_var, bn1.eps)
            w_expand = w_expand.flatten(1)
        else:
            dw = c[0]
            proj = c[1]
            bn3 = c[2]
        bn2 = dw[1]
        dw_conv = dw[0]
        stride = dw_conv.stride[0]
        dilation = dw_conv.dilation[0]
        pad = dilation * (dw_conv.kernel_size[0] // 2)
        if (dw_conv.stride[1] != stride or dw_conv.dilation[1] != dilation
                or dw_conv.padding[0] != pad or dw_conv.padding[1] != pad):
            raise ValueError("FusedInvertedResidual: the depthwise convolution must have the same stride and "
                             "dilation in both dimensions and padding dilation * (kernel_size // 2)")
        if self.training or bn2.running_mean is None or bn3.running_mean is None:
            return self._forward_modules(x)
        w_dw, b_dw = _fold_running(dw[0].weight, dw[0].bias, bn2.weight, bn2.bias, bn2.running_mean,
                                   bn2.running_var, bn2.eps)
        w_project, b_project = _fold_running(proj.weight, proj.bias, bn3.weight, bn3.bias, bn3.running_mean,
                                             bn3.running_var, bn3.eps)
        return torch.ops.mnv2.fused_inverted_residual(x, w_expand, b_expand, w_dw.flatten(0, 1),
                                                      b_dw, w_project.flatten(1), b_project, stride,
                                                      self.use_res_connect, dilation, self._activation)

    def _forward_modules(self, x: Tensor) -> Tensor:
        """torchvision's computation, module by module."""
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)

    def folded_weights(self):
        """The operator's weights with every batch norm folded in with its running statistics:
        (w_expand, b_expand, w_dw, b_dw, w_project, b_project); the first two are None when
        expand_ratio == 1. Differentiable."""
        expand, bn1, dw, bn2, proj, bn3 = self._parts()
        hidden, cout = dw.out_channels, proj.out_channels
        w_expand = b_expand = None
        if expand is not None:
            w_expand, b_expand = fold_bn(expand.weight, expand.bias, bn1.weight, bn1.bias, *running_stats(bn1),
                                         bn1.eps)
            w_expand = w_expand.view(hidden, -1)
        w_dw, b_dw = fold_bn(dw.weight, dw.bias, bn2.weight, bn2.bias, *running_stats(bn2), bn2.eps)
        w_project, b_project = fold_bn(proj.weight, proj.bias, bn3.weight, bn3.bias, *running_stats(bn3), bn3.eps)
        w_dw = w_dw.view(hidden, *dw.kernel_size)
        return w_expand, b_expand, w_dw, b_dw, w_project.view(cout, hidden), b_project

    def _packed_weights(self, x: Tensor, tensors) -> Optional[Tensor]:
        """Folded and packed weights for the CPU kernel, cached until a parameter or buffer
        changes (None for tensors made under inference_mode)."""
        return inference.cache_for(self, BlockCache).packed.get(
            x.dtype, tensors, lambda: ops.pack_weights(*self.folded_weights()), self)

    def clear_cache(self) -> None:
        """Drops the cached folded and packed weights (rebuilt on the next inference call)."""
        inference.clear(self)

    def _forward_unfused(self, x: Tensor, parts) -> Tensor:
        """torchvision's computation, module by module (the stages' SyncBatchNorm is
        handled by Conv2dNormActivation; bn3's here, see sync_batch_norm)."""
        bn3 = parts[5]
        group = sync_process_group(bn3)
        if group is None:
            return x + self.conv(x) if self.use_res_connect else self.conv(x)
        y = x
        for m in list(self.conv)[:-1]:
            y = m(y)
        y = sync_batch_norm(y, bn3, group)
        return x + y if self.use_res_connect else y

    def _forward_batch_stats(self, x: Tensor, backend: str, stride: int, dilation: int, activation: str) -> Tensor:
        """Train mode (or BN without running statistics): exact batch statistics.

        bn1's statistics come from x's channel mean and covariance, bn2's from the
        depthwise_moments operator; both are folded into the fused operator, which then
        produces the pre-bn3 output; bn3 runs as an ordinary module.

        SyncBatchNorm in distributed training: each statistic is this process's
        (mean, variance, count) all-reduced over the group as (sum, sum of squares,
        count) before folding (BatchNormStep), per hidden channel for bn1 and bn2, per
        output channel for bn3; autograd flows through the all-reduce. A process with an
        empty batch takes part with a count of 0.
        """
        expand, bn1, dw, bn2, proj, bn3 = self._parts()
        step1, step2, step3 = BatchNormStep(bn1), BatchNormStep(bn2), BatchNormStep(bn3)
        if x.shape[0] == 0 and step1.group is None and step2.group is None and step3.group is None:
            # an empty batch has no statistics: torch's batch norm returns an empty
            # result and only counts the batch, which the unfused modules reproduce
            return self._forward_modules(x)
        # (an empty batch under SyncBatchNorm runs the fused path below with N = 0, so
        # that this process joins every collective of the others, forward and backward)
        n, _, h, w = x.shape
        hidden, cout = dw.out_channels, proj.out_channels
        w_expand = b_expand = None
        if expand is not None:
            if step1.uses_batch:
                step1.check_count(n * h * w, (n, hidden, h, w))
                mean_x, cov_x = step1.local_moments(*ops.channel_moments(x), n)
                # (in the statistics' dtype, at least float32, which fold_bn takes)
                mean1, var1 = ops.project_moments(mean_x, cov_x, expand.weight.view(hidden, -1), expand.bias)
                mean1, var1 = step1.batch_moments(mean1, var1, n * h * w, (n, hidden, h, w))
            else:
                mean1, var1 = running_stats(bn1)
            w_expand, b_expand = fold_bn(expand.weight, expand.bias, bn1.weight, bn1.bias, mean1, var1, bn1.eps)
            w_expand = w_expand.view(hidden, -1)
        ho, wo = ops.output_size(h, w, stride, dilation)
        if step2.uses_batch:
            step2.check_count(n * ho * wo, (n, hidden, ho, wo))
            w_dw_raw = dw.weight.view(hidden, *dw.kernel_size)
            moments = ops.depthwise_moments(x, w_expand, b_expand, w_dw_raw, stride, dilation, activation)
            mean2, var2 = step2.local_moments(*moments, n)
            if dw.bias is not None:
                mean2 = mean2 + dw.bias
            mean2, var2 = step2.batch_moments(mean2, var2, n * ho * wo, (n, hidden, ho, wo))
        else:
            mean2, var2 = running_stats(bn2)
        w_dw, b_dw = fold_bn(dw.weight, dw.bias, bn2.weight, bn2.bias, mean2, var2, bn2.eps)
        w_dw = w_dw.view(hidden, *dw.kernel_size)
        if step3.uses_batch:
            b_proj = proj.bias if proj.bias is not None else x.new_zeros(cout)
            u = ops.run_block(backend, x, w_expand, b_expand, w_dw, b_dw, proj.weight.view(cout, hidden), b_proj,
                              stride, False, dilation, activation)
            y = step3.normalize(u)
            if not self.use_res_connect:
                return y
            drop = self._drop_path()
            return x + (drop(y) if drop is not None else y)
        w_project, b_project = fold_bn(proj.weight, proj.bias, bn3.weight, bn3.bias, *running_stats(bn3), bn3.eps)
        return self._fused(x, (w_expand, b_expand, w_dw, b_dw, w_project.view(cout, hidden), b_project), backend,
                           stride, dilation, activation)
