"""Autocast of the fused operators, as torch's convolutions follow it: inside
``torch.autocast(device, dtype)`` an operator casts its floating-point tensor arguments
on that device to autocast's dtype (bfloat16 or float16, whichever the region asked
for) and runs with autocast off, so the result has that dtype.

``torch.library.register_autocast`` casts to one dtype fixed at registration; the
kernels here read the region's dtype (``torch.get_autocast_dtype``) on every call, as
torch's own lower-precision operators do. Each is registered twice: with the C++
dispatcher (eager calls) and as the operator's Python kernel for that key (torch.compile
and the other tracers that run the Python dispatcher).
"""

from typing import Iterable

import torch

from . import _extension

_LIBS = {}  # namespace -> Library: the registrations live as long as the process


def _cast(value, device_type: str, dtype: torch.dtype):
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.device.type == device_type:
        return value.to(dtype)
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, device_type, dtype) for v in value)
    return value


def register(qualname: str, device_types: Iterable[str] = ("cpu", "cuda"), cast: bool = True) -> None:
    """Registers autocast kernels for the operator ``qualname`` ("mnv2::name") on each
    device type. ``cast=False``: the operator runs in its inputs' dtypes with autocast
    off inside, as torch's batch norm does (its PyTorch kernel's matrix products would
    otherwise run in autocast's dtype)."""
    op = torch._library.utils.lookup_op(qualname)
    namespace, name = qualname.split("::")
    lib = _LIBS.get(namespace)
    if lib is None:
        lib = _LIBS[namespace] = torch.library.Library(namespace, "IMPL")
    for device_type in device_types:
        key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        key = getattr(torch._C.DispatchKey, key_name)
        if op.has_kernel_for_dispatch_key(key):
            continue  # registered already

        def run(*args, _device=device_type, _key=key):
            if cast:
                dtype = torch.get_autocast_dtype(_device)
                args = tuple(_cast(a, _device, dtype) for a in args)
            with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(_key)), \
                    torch.autocast(_device, enabled=False):
                return op(*args)

        op.py_impl(key)(run)
        lib.impl(name, lambda _keyset, *args, _run=run: _run(*args), key_name, with_keyset=True)


if _extension.LOADED:
    register("mnv2::fused_inverted_residual")
    register("mnv2::depthwise_moments")
    # batch-norm statistics: in the input's dtype, accumulated in at least float32
    register("mnv2::channel_moments", cast=False)
    register("mnv2::project_moments", cast=False)
