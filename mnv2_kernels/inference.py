"""Inference caches and fast paths: the one owner of every value derived from a
module's parameters for inference, and of the records that let a later call skip
re-deriving it.

* ``DerivedCache``: one value (folded or packed weights) and a stamp of the tensors it
  was computed from; any change to those tensors, or any registration of a
  parameter, buffer or submodule anywhere, invalidates it.
* ``ConvCache``, ``BlockCache``, ``ModelCache``: the caches of a
  ``Conv2dNormActivation``, a ``FusedInvertedResidual`` and a ``MobileNetV2``, held
  by the module (``cache_for``) and dropped by ``clear``.
* ``BlockRecord``: what a block's last inference call decided (dtype, channels,
  backend, batch norms, the packed operator's arguments); ``run_block`` replays it
  after re-checking only what could have changed.
* ``ModelPlan``: the whole model's CPU inference as one ``mnv2::mobilenet_v2_packed``
  call on the layers' packed weights.
"""

from dataclasses import dataclass
from typing import Callable, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module

from . import _extension, backends, ops

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


def global_hooks() -> bool:
    """Whether any global forward hook or pre-hook is registered."""
    return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks)


class _PyStamp:
    """TensorStamp in Python, for a build without the compiled extension."""

    def __init__(self, tensors):
        self._items = [(t, t._version, t.data_ptr()) for t in tensors]

    def valid(self) -> bool:
        return all(t._version == version and t.data_ptr() == ptr for t, version, ptr in self._items)


def _stamp(tensors):
    return _extension._C.TensorStamp(tensors) if _extension.LOADED else _PyStamp(tensors)


def _is_fake(t: Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake  # (imported by torch already)

    return is_fake(t)


_ADOPTION_WARNING = (
    "mnv2_kernels: {owner} had parameters or buffers made under torch.inference_mode() "
    "(inference tensors: {names}). Their in-place changes cannot be tracked, so packed "
    "weights derived from them could not be cached and every call re-derived them. They "
    "were replaced, once, by ordinary tensors with the same values (parameters keep their "
    "Parameter objects where PyTorch allows): reach them through the module from now on, "
    "not through references taken before.")


def adopt_inference_tensors(module: nn.Module) -> bool:
    """Replaces the inference tensors among the parameters and buffers of ``module`` and
    its submodules by ordinary copies (same values, dtype, device and strides), so that
    their changes can be tracked (version counters) and derived weights cached. A
    Parameter keeps its object (``.data`` swapped) where PyTorch allows that, else a new
    Parameter with the same ``requires_grad`` is registered. Warns once per call that
    replaced anything, naming the tensors. Returns whether any was replaced."""
    names = []
    with torch.inference_mode(False):
        for prefix, m in module.named_modules():
            for name, t in list(m._parameters.items()):
                if t is None or not t.is_inference():
                    continue
                copy = t.detach().clone(memory_format=torch.preserve_format)
                try:
                    t.data = copy
                    t._version  # noqa: B018 - raises when the Parameter itself has no version counter
                except RuntimeError:  # the Parameter itself was made under inference_mode
                    setattr(m, name, nn.Parameter(copy, requires_grad=t.requires_grad))
                names.append(f"{prefix}.{name}" if prefix else name)
            for name, t in list(m._buffers.items()):
                if t is not None and t.is_inference():
                    m._buffers[name] = t.clone(memory_format=torch.preserve_format)
                    names.append(f"{prefix}.{name}" if prefix else name)
    if not names:
        return False
    _bump()  # (swapping .data registers nothing): every derived value is re-checked
    import warnings

    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    warnings.warn(_ADOPTION_WARNING.format(owner=type(module).__name__, names=shown), stacklevel=3)
    return True


class _Entry(NamedTuple):
    key: object
    stamp: object
    value: object
    epoch: int
    count: int  # how many tensors were stamped


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

    __slots__ = ("_entry",)

    def __init__(self):
        self._entry: Optional[_Entry] = None

    def peek(self, key) -> Optional[object]:
        """The cached value for ``key`` if nothing it was derived from has changed, else None."""
        entry = self._entry
        if entry is not None and entry.key == key and entry.epoch == _EPOCH[0] and entry.stamp.valid():
            return entry.value
        return None

    def get(self, key, tensors: List[Tensor], compute: Callable[[], object],
            owner: Optional[nn.Module] = None) -> Optional[object]:
        """The cached value for ``key``, or compute() from ``tensors`` (every tensor it reads),
        cached. None (not computed) when the tensors cannot be stamped: fake tensors, or
        inference tensors, which are then replaced in ``owner`` (the module they belong
        to) by ordinary ones (adopt_inference_tensors), so that the next call caches."""
        entry = self._entry
        if (entry is not None and entry.key == key and entry.epoch == _EPOCH[0] and entry.count == len(tensors)
                and entry.stamp.valid()):
            return entry.value
        if any(_is_fake(t) for t in tensors):
            return None
        if any(t.is_inference() for t in tensors):
            if owner is not None:
                adopt_inference_tensors(owner)
            return None
        # stamped before compute() reads the data (see the class comment)
        epoch = _EPOCH[0]
        stamp = _stamp(tensors)
        with torch.no_grad():
            value = compute()
        self._entry = _Entry(key, stamp, value, epoch, len(tensors))  # one assignment: thread-safe
        return value


class _Cache:
    """A module's caches: a copy (deepcopy, pickle) starts empty, for it has its own tensors."""

    __slots__ = ()

    def __deepcopy__(self, memo):
        return type(self)()

    def __reduce__(self):
        return type(self), ()


class ConvCache(_Cache):
    """Of a Conv2dNormActivation: its folded weights, its packed pointwise weights (a 1x1
    layer), and the packed weights of the stem fused into the first block."""

    __slots__ = ("folded", "packed", "stem")

    def __init__(self):
        self.folded = DerivedCache()
        self.packed = DerivedCache()
        self.stem = DerivedCache()


class PackedBlockArgs(NamedTuple):
    """The arguments of mnv2::fused_inverted_residual_packed after x and the packed weights."""
    hidden: int
    cout: int
    has_expand: bool
    stride: int
    residual: bool
    dilation: int
    kernel_size: int
    activation: str

    def model_args(self) -> List[int]:
        """The whole-model operator's integers for this block (activation 1: ReLU6, 0: ReLU)."""
        return [self.hidden, self.cout, int(self.has_expand), self.stride, int(self.residual), self.dilation,
                self.kernel_size, int(self.activation == "relu6")]


@dataclass(frozen=True)
class DepthwiseGeometry:
    """A block's depthwise convolution and its stride, dilation and padding when a call was
    recorded: set in place (atrous surgery), they change no tensor and register nothing,
    so a record checks them itself."""
    conv: nn.Module
    stride: tuple
    dilation: tuple
    padding: tuple

    @classmethod
    def of(cls, conv: nn.Module) -> "DepthwiseGeometry":
        return cls(conv, conv.stride, conv.dilation, conv.padding)

    def holds(self) -> bool:
        c = self.conv
        return c.stride == self.stride and c.dilation == self.dilation and c.padding == self.padding


@dataclass(frozen=True)
class BlockRecord:
    """A block's last inference call that took the packed CPU path."""
    dtype: torch.dtype
    channels: int
    backend: str  # the backend setting then (may be "auto")
    batch_norms: Tuple[nn.Module, ...]  # any of them in train mode changes the path
    args: PackedBlockArgs
    geometry: DepthwiseGeometry


class BlockCache(_Cache):
    """Of a FusedInvertedResidual: folded weights (GPU backends), packed weights (the CPU
    kernel) and the record of its last packed inference call."""

    __slots__ = ("folded", "packed", "record")

    def __init__(self):
        self.folded = DerivedCache()
        self.packed = DerivedCache()
        self.record: Optional[BlockRecord] = None


@dataclass(frozen=True)
class PlanEntry:
    """What the whole model's plan runs, and what it was recorded for."""
    dtype: torch.dtype
    channels: int
    backend: str
    epoch: int
    stamp: object  # of every parameter and buffer of the model
    idle: Callable[[], bool]  # every submodule in eval mode without hooks
    args: tuple  # mnv2::mobilenet_v2_packed's arguments after the image
    geometry: Tuple[DepthwiseGeometry, ...]  # of every block's depthwise convolution


def _plan_layout(x: Tensor) -> bool:
    """Whether the whole-model operator takes x's layout: NCHW or channels_last (its stem
    reads the image by strides; the activations after it are channels_last either way)."""
    return x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)


class ModelPlan:
    """The whole model's CPU inference as one operator call (mnv2::mobilenet_v2_packed)
    on the layers' packed weights, without the modules in between.

    Every layer caches its packed weights, but between two operators each module call
    still re-derives its decisions in Python, where the interpreter's own data has been
    pushed out of the cache by the kernels; and even a bare replay of the ~20 operators
    from Python costs each a dispatcher call. After an inference call in which every
    layer took its packed path (an NCHW or channels_last CPU input, float32/float64, no
    gradient),
    the packed weights and every layer's arguments are recorded here, and a later call
    runs them in one C++ call (which also fuses the head with the average pooling) when
    all of this still holds, else the modules run (and the plan is rebuilt):
      * gradients disabled and not compiling; the input a CPU tensor of the same dtype and
        channel count, NCHW or channels_last; the same backend setting;
      * no module in train mode and no forward hook or pre-hook on any submodule, none
        global (hooks on the model itself run as usual, around forward);
      * one TensorStamp over every parameter and buffer of the model (object,
        implementation, version counter, data pointer) and the process-wide registration
        epoch: any change of a weight, statistic or submodule;
      * every block's depthwise stride, dilation and padding (set in place, they change
        nothing the stamp sees).
    """

    def __init__(self):
        self.entry: Optional[PlanEntry] = None
        self._submodule_list = (None, None)  # (registration epoch, the model's submodules then)
        self.warned = set()  # the reasons already warned of why no plan could be recorded

    def _submodules(self, model: nn.Module):
        epoch, modules = self._submodule_list
        if epoch != _EPOCH[0]:
            modules = [m for m in model.modules() if m is not model]
            self._submodule_list = (_EPOCH[0], modules)
        return modules

    def run(self, x: Tensor) -> Optional[Tensor]:
        """The model's output through the recorded plan, or None when it does not apply."""
        e = self.entry
        if e is None:
            return None
        if (type(x) is not Tensor or x.dtype is not e.dtype or not x.is_cpu or x.dim() != 4
                or x.shape[1] != e.channels or not _plan_layout(x)
                or backends.get_backend() != e.backend or _EPOCH[0] != e.epoch
                or global_hooks() or not e.stamp.valid() or not e.idle()):
            return None
        for g in e.geometry:
            if not g.holds():
                return None
        return ops.MODEL_PACKED(x, *e.args)

    def start(self, model: nn.Module, x: Tensor):
        """Before a module-by-module inference call: what a plan needs from before it (the
        epoch and the stamp), or None when x cannot have a plan. (A plan this call cannot
        use is kept: run() re-checks everything, and finish() replaces it.)"""
        if (not _extension.LOADED or type(x) is not Tensor or not x.is_cpu or x.dim() != 4
                or x.dtype not in (torch.float32, torch.float64) or not _plan_layout(x)
                or global_hooks()):
            return None
        modules = self._submodules(model)
        # (every submodule in eval mode without forward hooks: one C++ loop, which run() repeats)
        idle = _extension._C.ModulesIdle(modules)
        if not idle():
            return None
        tensors = [t for m in (model, *modules) for d in (m._parameters, m._buffers) for t in d.values()
                   if t is not None]
        if any(t.is_inference() for t in tensors) and adopt_inference_tensors(model):
            return self.start(model, x)  # (with the ordinary tensors now registered)
        epoch = _EPOCH[0]
        try:
            return epoch, idle, _stamp(tensors)
        except RuntimeError:
            return None  # inference-mode or fake tensors: nothing to stamp (as DerivedCache)

    def finish(self, x: Tensor, record, stem_args, blocks: List[nn.Module], head_args,
               classifier_args, first_geometry: Optional[DepthwiseGeometry] = None) -> None:
        """After that call: records the plan when every layer took its packed path.

        stem_args: ops.stem_block's arguments after the image; blocks: the other blocks;
        head_args: (packed, cout, activation name) of the head; classifier_args: (packed,
        classes). Each None when its layer cannot take the packed path. first_geometry: the
        first block's depthwise geometry (the stem's block)."""
        if record is None or stem_args is None or head_args is None or classifier_args is None:
            return
        epoch, idle, stamp = record
        backend = backends.get_backend()
        packed_blocks, block_args = [], []
        geometry = [first_geometry] if first_geometry is not None else []
        for block in blocks:
            cache = block._mnv2_cache
            rec = cache.record if isinstance(cache, BlockCache) else None
            if rec is None or rec.dtype is not x.dtype or rec.backend != backend:
                return
            packed = cache.packed.peek(x.dtype)
            if packed is None:
                return
            packed_blocks.append(packed)
            block_args.extend(rec.args.model_args())
            geometry.append(rec.geometry)
        head_packed, head_cout, activation = head_args
        stem_packed, first_packed, *first_args = stem_args
        args = (stem_packed, first_packed, list(first_args), packed_blocks, block_args, head_packed,
                [head_cout, ops.ACTIVATIONS[activation]], *classifier_args)
        self.entry = PlanEntry(x.dtype, x.shape[1], backend, epoch, stamp, idle, args, tuple(geometry))


class ModelCache(_Cache):
    """Of a MobileNetV2: the classifier's packed weights and the whole-model plan (a copy
    starts with an empty plan: a stamp does not pickle, and the copy has its own tensors)."""

    __slots__ = ("classifier", "plan")

    def __init__(self):
        self.classifier = DerivedCache()
        self.plan = ModelPlan()


def cache_for(module: nn.Module, kind):
    """The module's cache of type ``kind`` (ConvCache, BlockCache or ModelCache), made on
    first use. The module's class declares ``_mnv2_cache = None``."""
    cache = module._mnv2_cache
    if cache is None:
        cache = kind()
        module._mnv2_cache = cache
    return cache


def clear(module: nn.Module) -> None:
    """Drops the module's cache (rebuilt on the next inference call)."""
    module._mnv2_cache = None


def run_block(cache: Optional[BlockCache], x: Tensor) -> Optional[Tensor]:
    """The packed CPU operator on the block's cached weights when its last inference call's
    decisions all still hold, else None (the full path runs): the same dtype and channels
    on a CPU tensor, the same backend setting, no batch norm in train mode, and packed
    weights none of whose sources changed."""
    rec = cache.record if cache is not None else None
    if rec is None:
        return None
    if (type(x) is not Tensor or x.dtype is not rec.dtype or not x.is_cpu or x.dim() != 4
            or x.shape[1] != rec.channels or backends.get_backend() != rec.backend):
        return None
    for bn in rec.batch_norms:
        if bn.training:
            return None
    if not rec.geometry.holds():
        return None
    packed = cache.packed.peek(rec.dtype)
    if packed is None:
        return None
    return ops.BLOCK_PACKED(x, packed, *rec.args)
