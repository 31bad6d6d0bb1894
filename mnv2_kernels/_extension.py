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


def cpu_plans(module, input_shape, threads=None, dtype=None):
    """The CPU kernel's forward plan on this machine for every FusedInvertedResidual in
    ``module`` (a block or a model), for an input of ``input_shape`` (N, C, H, W): a list
    of dicts, one per block in call order, with the block's name and shape and the plan
    (row bands, column tiles, hidden splits and chunk, rows per step, scratch bytes),
    for ``threads`` threads (default torch.get_num_threads()) and ``dtype`` (default
    float32). The blocks' input sizes are found by one forward call on zeros."""
    import torch

    from .modules import FusedInvertedResidual

    if not LOADED:
        raise RuntimeError(f"mnv2_kernels: the compiled extension is not loaded: {LOAD_ERROR}")
    threads = torch.get_num_threads() if threads is None else int(threads)
    dtype = torch.float32 if dtype is None else dtype
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"mnv2_kernels: the CPU kernel plans float32 and float64, got {dtype}")
    names = {m: n for n, m in module.named_modules()}
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, args: seen.append((m, tuple(args[0].shape))))
             for m in module.modules() if isinstance(m, FusedInvertedResidual)]
    try:
        with torch.no_grad():
            module(torch.zeros(input_shape, dtype=next(module.parameters()).dtype))
    finally:
        for h in hooks:
            h.remove()
    plans = []
    for m, (n, c, h, w) in seen:
        parts = m._parts()
        dw, project = parts[2], parts[4]
        hidden, cout = dw.out_channels, project.out_channels
        plan = _C.cpu_forward_plan(n, c, hidden, cout, m.stride, h, w, threads, dtype == torch.float64)
        plans.append({"block": names[m] or type(m).__name__, "shape": f"{c}->{hidden}->{cout} s{m.stride} {h}x{w}",
                      **plan})
    return plans
