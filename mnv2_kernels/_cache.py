"""Values derived from a module's parameters and buffers (folded, packed weights),
kept until one of those tensors changes."""

import weakref
from typing import Callable, List, Optional

import torch


class DerivedCache:
    """Holds one value and a stamp of the tensors it was computed from: each
    tensor's identity (weakly) and version counter, plus a key (dtype, layout).
    An optimizer step, load_state_dict, any in-place change or a replaced tensor
    invalidates it. Tensors made under inference_mode have no version counter:
    nothing is cached for them."""

    def __init__(self):
        self._entry = None

    def get(self, key, tensors: List[torch.Tensor], compute: Callable[[], object]) -> Optional[object]:
        entry = self._entry
        if entry is not None and entry[0] == key and len(entry[1]) == len(tensors):
            for (ref, version), t in zip(entry[1], tensors):
                if ref() is not t or version != t._version:
                    break
            else:
                return entry[2]
        # (the same tensor objects matched above: they were checked when cached)
        if any(t.is_inference() for t in tensors):
            return None
        with torch.no_grad():
            value = compute()
        self._entry = (key, [(weakref.ref(t), t._version) for t in tensors], value)  # one assignment: thread-safe
        return value

    def clear(self) -> None:
        self._entry = None

    def __deepcopy__(self, memo):
        return DerivedCache()  # a copy has its own tensors

    def __getstate__(self):
        return {"_entry": None}
