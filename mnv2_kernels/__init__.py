"""mnv2_kernels: MobileNetV2's inverted-residual block as one fused operator.

    from mnv2_kernels import FusedInvertedResidual, mobilenet_v2, convert_model

See README.md for backends and environment switches.
"""

from . import _extension  # noqa: F401  (loads the compiled operators, or warns once)
from . import autocast, autograd, decompositions, fake, flops, moments, ops, reference  # noqa: F401  (registrations at import)
from ._extension import build_info, cpu_isa, cpu_plans
from .backends import BACKENDS, get_backend, set_backend, use_backend
from .batch_norm import SyncBatchNorm, convert_sync_batchnorm, fold_bn
from .capture import trace_unfused
from .family import FusedMNASNetBlock, FusedTimmBlock
from .model import MobileNetV2, convert_model, mobilenet_v2
from .modules import Conv2dNormActivation, FusedInvertedResidual

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "Conv2dNormActivation",
    "ExpansionOutputBlock",
    "FusedInvertedResidual",
    "FusedMNASNetBlock",
    "FusedTimmBlock",
    "MobileNetV2",
    "SyncBatchNorm",
    "build_info",
    "convert_model",
    "convert_sync_batchnorm",
    "cpu_isa",
    "cpu_plans",
    "deeplabv3_mobilenet_v2",
    "fold_bn",
    "get_backend",
    "mobilenet_v2",
    "set_backend",
    "ssdlite320_mobilenet_v2",
    "trace_unfused",
    "use_backend",
]

# The paper's applications, imported on first use: torchvision's detection package takes
# about a second to import.
_APPLICATIONS = {"ExpansionOutputBlock": "detection", "ssdlite320_mobilenet_v2": "detection",
                 "deeplabv3_mobilenet_v2": "segmentation"}


def __getattr__(name):
    if name in _APPLICATIONS:
        import importlib

        return getattr(importlib.import_module(f".{_APPLICATIONS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


ops.register_triton_early()
