"""Which implementation runs the fused block.

    "auto"       the fastest one that can run the given tensors (default): on the
                 CPU the C++ kernel; on CUDA tensors Triton, else the CUDA kernel
    "cpu"        the C++ CPU kernel (float32/float64 CPU tensors; float16/bfloat16
                 ones are computed in float32, converted at the operator's edges)
    "cuda"       the CUDA kernel (CUDA tensors; needs a build with nvcc)
    "triton"     the Triton kernel (CUDA tensors; CPU tensors too under
                 TRITON_INTERPRET=1, Triton's interpreter, for testing)
    "reference"  plain PyTorch ops: correct everywhere, neither fused nor fast

Choose with ``use_backend(name)`` (a context manager), ``set_backend(name)``,
or the MNV2_BACKEND environment variable, read at import. Asking for a
backend that cannot run the given tensors raises; it never falls back
silently.
"""

import contextlib
import os
import warnings
from typing import Optional

import torch

from . import _extension
from .triton_kernels import interpreting as _triton_interpreting
from .triton_kernels import is_available as _triton_available

BACKENDS = ("auto", "cpu", "cuda", "triton", "reference")
CPU_DTYPES = (torch.float32, torch.float64)  # the CPU kernels' own (the packed inference paths)
# computed by the CPU kernels in float32, converted at the operators' edges
CPU_HALF_DTYPES = (torch.float16, torch.bfloat16)
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _validate(name):
    if name not in BACKENDS:
        raise ValueError(f"mnv2_kernels: unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


# A plain module global (not a thread-local or context variable) so that
# torch.compile can read it and guard on it without a graph break.
_current = _validate(os.environ.get("MNV2_BACKEND", "auto") or "auto")
_warned = set()


def get_backend() -> str:
    """The backend name currently selected (may be "auto")."""
    return _current


def set_backend(name: str) -> None:
    """Selects the backend for every later call."""
    global _current
    _current = _validate(name)


@contextlib.contextmanager
def use_backend(name: str):
    """Selects a backend inside a ``with`` block."""
    global _current
    previous = _current
    _current = _validate(name)
    try:
        yield
    finally:
        _current = previous


def _warn_once(key, message):
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _cannot(name, x, why):
    raise RuntimeError(
        f"mnv2_kernels: backend {name!r} cannot run a {x.dtype} tensor on {x.device}: {why}"
    )


def resolve(x: torch.Tensor, dilation: int = 1, kernel_size: int = 3, activation: str = "relu6") -> str:
    """The concrete backend that will run a block on input ``x`` (with a depthwise step of
    that dilation and kernel size, and that activation) under the selected backend; raises
    when the selected backend cannot run x."""
    return check(_current, x, dilation, kernel_size, activation)


def _cuda_kernel_refuses(dilation: int, kernel_size: int, activation: str) -> Optional[str]:
    """Why the CUDA kernel cannot run such a block (it computes MobileNetV2's: 3x3
    depthwise, undilated, ReLU6), or None."""
    if dilation != 1:
        return f"it runs depthwise dilation 1 only, this block has dilation {dilation}"
    if kernel_size != 3:
        return f"it runs a 3x3 depthwise kernel only, this block's is {kernel_size}x{kernel_size}"
    if activation != "relu6":
        return f"it runs the ReLU6 activation only, this block's is {activation!r}"
    return None


def check(name: str, x: torch.Tensor, dilation: int = 1, kernel_size: int = 3, activation: str = "relu6") -> str:
    """The concrete backend that ``name`` means for input ``x`` and a depthwise step of
    ``dilation`` and ``kernel_size`` with ``activation`` ("auto" picks one); raises when that
    backend cannot run x (a backend never runs another device's kernel)."""
    name = _validate(name)
    device = x.device.type
    if name == "auto":
        if device == "cpu":
            if not _extension.has_cpu_kernels():
                return "reference"  # the import already said so
            if x.dtype not in CPU_DTYPES + CPU_HALF_DTYPES:
                _cannot("auto", x, "the CPU kernel supports float32, float64, float16 and bfloat16")
            return "cpu"
        if device == "cuda":
            # Triton first: every one of its kernels runs its dots on the tensor cores,
            # the CUDA kernel only its fp16/bf16 forward, and Triton was the faster in
            # the only GPU run so far (bench/results/h200-2026-11-26).
            if _triton_available():
                return "triton"
            if (_extension.has_cuda_kernels() and _cuda_capable(x)
                    and _cuda_kernel_refuses(dilation, kernel_size, activation) is None):
                return "cuda"
            _warn_once("cuda", "mnv2_kernels: no fused GPU kernel is available in this build; "
                       "CUDA tensors run on the 'reference' backend")
            return "reference"
        _warn_once(device, f"mnv2_kernels: no fused kernel for device {device!r}; "
                   "using the 'reference' backend")
        return "reference"
    if name == "cpu":
        if not _extension.has_cpu_kernels():
            _cannot(name, x, f"the compiled extension is not available ({_extension.LOAD_ERROR})")
        if device != "cpu":
            _cannot(name, x, "it runs CPU tensors only")
        if x.dtype not in CPU_DTYPES + CPU_HALF_DTYPES:
            _cannot(name, x, "it supports float32, float64, float16 and bfloat16")
    elif name == "cuda":
        if device != "cuda":
            _cannot(name, x, "it runs CUDA tensors only")
        if not _extension.has_cuda_kernels():
            _cannot(name, x, "this build has no CUDA kernels (rebuild with nvcc, MNV2_BUILD_CUDA=1)")
        if not _cuda_capable(x):
            major, minor = torch.cuda.get_device_capability(x.device)
            _cannot(name, x, f"it needs compute capability 8.0 or newer, this GPU has {major}.{minor}")
        why = _cuda_kernel_refuses(dilation, kernel_size, activation)
        if why is not None:
            _cannot(name, x, f"{why} (the 'triton' backend runs it)")
    elif name == "triton":
        if not _triton_available():
            _cannot(name, x, "Triton is not installed, or there is neither a CUDA GPU nor "
                    "TRITON_INTERPRET=1 (the interpreter)")
        if device != "cuda" and not (device == "cpu" and _triton_interpreting()):
            _cannot(name, x, "it runs CUDA tensors (CPU tensors only under TRITON_INTERPRET=1)")
        if x.dtype not in GPU_DTYPES:
            _cannot(name, x, "it supports float32, float16 and bfloat16")
    return name


_capable = {}


def _cuda_capable(x) -> bool:
    """The CUDA kernels need compute capability 8.0 (Ampere) or newer. (Not
    re-checked inside torch.compile'd code; the C++ operator checks it too.)"""
    if torch.compiler.is_compiling():
        return True
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    ok = _capable.get(index)
    if ok is None:
        ok = _capable[index] = torch.cuda.get_device_capability(index)[0] >= 8
    return ok
