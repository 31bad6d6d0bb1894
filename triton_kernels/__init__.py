"""Triton kernels of the fused inverted-residual block (installed as
``mnv2_kernels.triton_kernels``).

* ``fused_ir``: the kernels and their host-side ``forward``/``backward``.
* ``ops``: ``register()`` defines the ``mnv2::triton_fused_inverted_residual``
  operator (and its backward operator) with autograd.

Importing this package does not import triton: the submodules do, on demand,
because TRITON_INTERPRET=1 (the Triton interpreter, for CPU tensors) must be
set before triton is first imported.
"""

import os


def interpreting() -> bool:
    """Whether Triton kernels run under the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _triton_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def is_available() -> bool:
    """Whether the Triton backend can be used: triton is installed and either a
    CUDA GPU is present or the interpreter is on."""
    if not _triton_importable():
        return False
    import torch

    return torch.cuda.is_available() or interpreting()
