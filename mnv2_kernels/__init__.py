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
from .model import MobileNetV2, convert_model, mobilenet_v2
from .modules import Conv2dNormActivation, FusedInvertedResidual

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "Conv2dNormActivation",
    "FusedInvertedResidual",
    "MobileNetV2",
    "SyncBatchNorm",
    "build_info",
    "convert_model",
    "convert_sync_batchnorm",
    "cpu_isa",
    "cpu_plans",
    "fold_bn",
    "get_backend",
    "mobilenet_v2",
    "set_backend",
    "trace_unfused",
    "use_backend",
]

ops.register_triton_early()
