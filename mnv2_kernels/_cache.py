"""Values derived from a module's parameters and buffers (folded, packed weights),
kept until one of those tensors changes."""

from typing import Callable, List, Optional

import torch
from torch.nn.modules import module as _module

from . import _extension

# Bumped whenever any module anywhere registers or replaces a parameter, buffer or
# submodule (`bn.weight = p`, `bn.running_mean = None`, `seq[1] = m`,
# convert_sync_batchnorm, ...): a cache entry made before then is not trusted.
_EPOCH = [0]


def _bump(*_args):
    _EPOCH[0] += 1


for _register in (_module.register_module_parameter_registration_hook,
                  _module.register_module_buffer_registration_hook,
                  _module.register_module_module_registration_hook):
    _register(_bump)


class _PyStamp:
    """TensorStamp in Python, for a build without the compiled extension."""

    def __init__(self, tensors):
        self._items = [(t, t._version, t.data_ptr()) for t in tensors]

    def valid(self) -> bool:
        return all(t._version == version and t.data_ptr() == ptr for t, version, ptr in self._items)


def _stamp(tensors):
    return _extension._C.TensorStamp(tensors) if _extension.LOADED else _PyStamp(tensors)


class DerivedCache:
    """Holds one value, the key it was made for (dtype, layout) and a stamp of the
    tensors it was computed from: each tensor's object and implementation, version
    counter and data pointer (the compiled TensorStamp). An optimizer step,
    load_state_dict, any in-place change, new data swapped in with ``t.data = ...``
    (which leaves the version counter alone) or torch.utils.swap_tensors invalidates
    it, and so does any parameter, buffer or submodule registration in the process
    (a replaced tensor or module). Nothing is cached for tensors made under
    inference_mode (they have no version counter) or for fake tensors (no data).

    The stamp holds the stamped tensors, so until the next get() recomputes, a
    replaced parameter stays alive and no new tensor can take its address.

    Threads: the entry is one immutable tuple, read once and replaced by one
    assignment, so concurrent calls (GIL or free-threaded Python) see either the old
    or the new entry, never a torn one; racing misses each compute and the last
    assignment wins. The stamp is taken before compute() reads the tensors, so an
    in-place change made while it runs (by another thread) leaves an outdated stamp,
    and the next call recomputes: a value is never kept under the stamp of data it
    was not computed from. A call that overlaps an in-place change may still read
    half-updated tensors, as any PyTorch module would.
    """

    def __init__(self):
        self._entry = None

    def peek(self, key) -> Optional[object]:
        """The cached value for ``key`` if nothing it was derived from has changed, else None."""
        entry = self._entry
        if entry is not None and entry[0] == key and entry[3] == _EPOCH[0] and entry[1].valid():
            return entry[2]
        return None

    def get(self, key, tensors: List[torch.Tensor], compute: Callable[[], object]) -> Optional[object]:
        """The cached value for ``key``, or compute() from ``tensors`` (every tensor it reads),
        cached. None (not computed) when the tensors cannot be stamped."""
        entry = self._entry
        if (entry is not None and entry[0] == key and entry[3] == _EPOCH[0] and entry[4] == len(tensors)
                and entry[1].valid()):
            return entry[2]
        if any(t.is_inference() or _is_fake(t) for t in tensors):
            return None
        # stamped before compute() reads the data (see the class comment)
        epoch = _EPOCH[0]
        stamp = _stamp(tensors)
        with torch.no_grad():
            value = compute()
        self._entry = (key, stamp, value, epoch, len(tensors))  # one assignment: thread-safe
        return value

    def clear(self) -> None:
        self._entry = None

    def __deepcopy__(self, memo):
        return DerivedCache()  # a copy has its own tensors

    def __getstate__(self):
        return {"_entry": None}


def cache_of(owner, name: str) -> DerivedCache:
    """owner.__dict__[name], a DerivedCache made on first use (not built on every call,
    as ``__dict__.setdefault(name, DerivedCache())`` would)."""
    cache = owner.__dict__.get(name)
    if cache is None:
        cache = owner.__dict__[name] = DerivedCache()
    return cache


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake  # (imported by torch already)

    return is_fake(t)
