"""Triton kernels of the fused inverted-residual block (installed as
``mnv2_kernels.triton_kernels``).

Nothing is implemented here yet: the Triton forward and backward are a
later milestone. ``is_available()`` says so, and asking for the "triton"
backend raises a clear error.
"""


def is_available() -> bool:
    """Whether the Triton backend can be used."""
    return False
