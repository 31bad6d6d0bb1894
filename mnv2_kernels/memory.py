"""Memory measurements of a module's calls: the peak above what was in use before, and
what autograd saves for backward. The memory report (python -m bench.memory_report)
compares the fused model with torchvision's through these.

On the CPU the peak is resident memory (Linux only): the kernel is asked to reset the
high-water mark (/proc/self/clear_refs). Start the process with
MALLOC_MMAP_THRESHOLD_=65536 so that malloc serves every large block with mmap and
resident memory follows live tensors, including allocations inside C++ kernels and on
worker threads. On CUDA it is the caching allocator's allocated bytes.
"""

import gc
from typing import Callable, Dict

import torch
from torch import nn


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def peak_bytes(fn: Callable[[], object], device: str = "cpu") -> int:
    """High-water mark during fn above what was in use before it: resident memory on
    the CPU, the caching allocator's allocated bytes on CUDA."""
    gc.collect()
    if device != "cpu":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        result = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del result
        return max(peak, 0)
    base = _status("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current VmRSS
    result = fn()
    peak = _status("VmHWM:") - base
    del result
    return max(peak, 0)


def saved_bytes(module: nn.Module, fn: Callable[[], torch.Tensor]) -> int:
    """Bytes autograd saves for backward during fn, each storage once, the module's own
    parameters and buffers excluded."""
    own = {t.untyped_storage().data_ptr() for t in (*module.parameters(), *module.buffers())}
    saved: Dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in own:
            saved[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(saved.values())
