"""Ahead-of-time compiles of the Triton kernels for a GPU target, on a machine without one.

``recorded_launches()`` runs the real host launchers of ``triton_kernels/fused_ir.py`` on
CPU tensors, deciding grids, splits and constexprs as for a GPU with a given number of
SMs, and records each kernel launch instead of running it. ``compile_launch()`` then binds
a recorded launch's arguments as ``JITFunction.run`` does on a GPU (an integer argument
equal to 1 becomes a constant, 16-divisible integers and aligned pointers are marked as
such) and runs Triton's whole pipeline for the target, ptxas included; ptxas's report
gives registers, spill bytes and the stack frame, the compiled metadata the shared memory.

Needs Triton without its interpreter (TRITON_INTERPRET unset) and nvcc's ptxas, which
Triton ships.
"""

import contextlib
import io
import os
import re
from dataclasses import dataclass
from typing import List, Optional

import torch

KERNELS = ("_fwd_kernel", "_bwd_weight_kernel", "_bwd_input_kernel", "_moments_kernel")
# cudaDevAttrMaxSharedMemoryPerBlockOptin: A100 (sm_80) and H100/H200 (sm_90)
SHARED_LIMIT = {80: 166912, 90: 232448}


@dataclass
class Launch:
    kernel: str
    autotuner: object  # the @triton.autotune object: .fn is the JITFunction, .configs the configs
    grid: object
    args: tuple
    kwargs: dict

    def configs(self):
        """The configs the autotuner would consider for this launch, the default first."""
        from mnv2_kernels.triton_kernels import fused_ir

        return fused_ir.configs_for(self.autotuner.configs, self.kwargs)


@dataclass
class Report:
    registers: Optional[int]
    spill_bytes: int  # stores + loads
    stack_bytes: int
    shared_bytes: int


@contextlib.contextmanager
def recorded_launches(sm_count: int = 132):
    """Inside: fused_ir's launchers run on CPU tensors as for a GPU with ``sm_count`` SMs
    (an H100 by default), and the yielded list fills with their launches."""
    from mnv2_kernels.triton_kernels import fused_ir

    launches: List[Launch] = []

    class Recorder:
        def __init__(self, name, autotuner):
            self.name, self.autotuner = name, autotuner

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(Launch(self.name, self.autotuner, grid, args, kwargs))

    saved = {name: getattr(fused_ir, name) for name in KERNELS}
    saved_sm_count = fused_ir._sm_count
    try:
        for name, kernel in saved.items():
            setattr(fused_ir, name, Recorder(name, kernel))
        fused_ir._sm_count = lambda device: sm_count
        fused_ir.RECORDING = True
        yield launches
    finally:
        fused_ir.RECORDING = False
        fused_ir._sm_count = saved_sm_count
        for name, kernel in saved.items():
            setattr(fused_ir, name, kernel)


_REGISTERS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_STACK = re.compile(r"(\d+) bytes stack frame")


def compile_launch(launch: Launch, config, capability: int, ptxas_report: bool = True) -> Optional[Report]:
    """Compiles ``launch`` with autotune ``config`` for compute capability ``capability``
    (80, 90); raises what Triton raises when it does not compile. With ``ptxas_report``
    the compile bypasses Triton's cache (a cached kernel has no ptxas log) and the report
    is returned; without, a cached compile is reused and None returned."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    jit = launch.autotuner.fn
    kwargs = {**launch.kwargs, **config.all_kwargs(), "debug": False, "instrumentation_mode": ""}
    bind = create_function_from_signature(jit.signature, jit.params, backend)
    bound, specialization, options = bind(*launch.args, **kwargs)
    options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound, specialization, options)
    log = io.StringIO()
    previous = {k: os.environ.get(k) for k in ("TRITON_DUMP_PTXAS_LOG", "TRITON_ALWAYS_COMPILE")}
    if ptxas_report:
        os.environ.update(TRITON_DUMP_PTXAS_LOG="1", TRITON_ALWAYS_COMPILE="1")
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(jit, signature, constexprs, attrs), target=target,
                                      options=options.__dict__)
    finally:
        for k, v in previous.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if not ptxas_report:
        return None
    text = log.getvalue()
    registers, spills, stack = _REGISTERS.search(text), _SPILLS.search(text), _STACK.search(text)
    return Report(int(registers.group(1)) if registers else None,
                  int(spills.group(1)) + int(spills.group(2)) if spills else 0,
                  int(stack.group(1)) if stack else 0, compiled.metadata.shared)


def block_args(n, cin, hidden, cout, stride, h, w, dtype, channels_last, dilation=1, kernel_size=3,
               activation="relu6"):
    """A block's operator arguments (CPU tensors) for the launchers, the dilation and the
    activation last; a kernel_size x kernel_size depthwise step."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, cin, h, w, generator=g).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def r(*shape):
        return (0.1 * torch.randn(*shape, generator=g)).to(dtype)

    we, be = (r(hidden, cin), r(hidden)) if hidden != cin else (None, None)
    return (x, we, be, r(hidden, kernel_size, kernel_size), r(hidden), r(cout, hidden), r(cout), stride,
            stride == 1 and cin == cout, dilation, activation)
