"""Values derived from a module's parameters and buffers (folded, packed weights),
kept until one of those tensors changes."""

import weakref
from typing import Callable, List, Optional

import torch


class DerivedCache:
    """Holds one value and a stamp of the tensors it was computed from: each
    tensor's identity (weakly), version counter and data pointer, plus a key
    (dtype, layout). An optimizer step, load_state_dict, any in-place change, a
    replaced tensor or new data swapped in with ``t.data = ...`` (which leaves the
    version counter alone) invalidates it. Nothing is cached for tensors made under
    inference_mode (they have no version counter) or for fake tensors (no data).

    Threads: the entry is one immutable tuple, read once and replaced by one
    assignment, so concurrent get() calls (GIL or free-threaded Python) see either
    the old or the new entry, never a torn one; racing misses each compute and the
    last assignment wins. The stamp is taken before compute() reads the tensors,
    so an in-place change made while it runs (by another thread) leaves an
    outdated stamp, and the next call recomputes: a value is never kept under the
    stamp of data it was not computed from. A call that overlaps an in-place
    change may still read half-updated tensors, as any PyTorch module would.
    """

    def __init__(self):
        self._entry = None

    def get(self, key, tensors: List[torch.Tensor], compute: Callable[[], object]) -> Optional[object]:
        entry = self._entry
        if entry is not None and entry[0] == key and len(entry[1]) == len(tensors):
            for (ref, version, ptr), t in zip(entry[1], tensors):
                if ref() is not t or version != t._version or ptr != t.data_ptr():
                    break
            else:
                return entry[2]
        # (the same tensor objects matched above: they were checked when cached)
        if any(t.is_inference() or _is_fake(t) for t in tensors):
            return None
        # stamped before compute() reads the data (see the class comment)
        stamp = [(weakref.ref(t), t._version, t.data_ptr()) for t in tensors]
        # aliases that keep the stamped storages alive, so that no new data can
        # take one of their addresses while this entry exists
        keep = [t.detach() for t in tensors]
        with torch.no_grad():
            value = compute()
        self._entry = (key, stamp, value, keep)  # one assignment: thread-safe
        return value

    def clear(self) -> None:
        self._entry = None

    def __deepcopy__(self, memo):
        return DerivedCache()  # a copy has its own tensors

    def __getstate__(self):
        return {"_entry": None}


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake  # (imported by torch already)

    return is_fake(t)
