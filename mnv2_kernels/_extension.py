"""Loads the compiled extension (mnv2_kernels._C) if it was built.

Without it the package still works, through the pure-PyTorch reference
backend, and says so once at import.
"""

import warnings

import torch  # noqa: F401  (loads libc10/libtorch, which _C links against)

try:
    from . import _C  # noqa: F401  (registers the mnv2:: operators)

    LOADED = True
    LOAD_ERROR = None
except ImportError as exc:  # not built, or built against another torch
    _C = None
    LOADED = False
    LOAD_ERROR = exc
    warnings.warn(
        "mnv2_kernels: the compiled extension is not available "
        f"({exc}); every block runs on the pure-PyTorch 'reference' backend, which is "
        "correct but neither fused nor fast. Build it with "
        "`pip install -e . --no-build-isolation` (or `make test`).",
        RuntimeWarning,
        stacklevel=2,
    )


def has_cpu_kernels() -> bool:
    return LOADED


# read once: resolve() runs inside torch.compile'd code, where a pybind call breaks the graph
_HAS_CUDA = LOADED and bool(_C.build_info()["cuda"])


def has_cuda_kernels() -> bool:
    return _HAS_CUDA


def cpu_isa() -> str:
    """The instruction set the CPU kernels use ('avx2', ...), honouring MNV2_CPU_ISA."""
    if not LOADED:
        raise RuntimeError(f"mnv2_kernels: the compiled extension is not available ({LOAD_ERROR})")
    return _C.cpu_isa()


def build_info() -> dict:
    """What the compiled extension contains and what this machine can run."""
    if not LOADED:
        return {"extension": False, "error": str(LOAD_ERROR)}
    return {"extension": True, **_C.build_info()}
