"""The small array interface the core is written against, and dispatch by array type.

Like einops' ``_backends``: a backend is a small class, its framework is imported in its module,
and dispatch looks at ``sys.modules`` first so that nothing unused is imported.

Two levels:

- ``Backend`` names every primitive the core uses (about 25: conversion, ``matmul``, ``where``,
  ``cumsum``, a stable ``argsort``, ...). Arithmetic, comparisons and basic indexing
  (``x[:, None]``, ``x[..., :J]``) use the arrays' own operators.
- ``ArrayAPIBackend`` implements all of them with the Python array API standard's names on a
  namespace ``xp``. A library that follows the standard needs only ``name``, ``framework``,
  ``xp`` and ``is_appropriate``; NumPy, torch and MLX override only what differs
  (``refreekv/adapters/backends/``).

A backend may replace whole steps of ``refreekv.core`` (a fused kernel) by *declaring* them:
``steps = {"evict": my_evict}``, each function taking the backend first, like the core's. Only
names in ``STEPS`` are accepted, checked when the class is created: a misspelt step is an
error, never a silent fallback. The conformance suite holds a declared step to the reference.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, ClassVar

import numpy as np

Array = Any

#: dtype names the core accepts as model tensors.
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")

#: The steps of ``refreekv.core`` a backend may replace with its own function (same signature).
STEPS = ("attention_scores", "attention_rows", "attention_row", "position_ranking", "h2o_scores",
         "snapkv_scores", "window_scores", "attention_ranking", "norm_ratio_curve", "threshold_cut", "mass_floor_cut",
         "decide",
         "kept_positions", "position_kept_positions", "evict", "evict_runs", "tail_positions", "quantize",
         "dequantize")


class Backend:
    """Array operations for one framework: the contract the core relies on.

    Subclass ``ArrayAPIBackend`` when your arrays follow the array API standard (override what
    differs), or this class to write every primitive yourself. Register it with
    ``refreekv.register_backend`` or name it to the conformance suite.
    """

    #: short name used in messages and reports ("numpy", "torch", "mlx", ...)
    name: ClassVar[str] = "abstract"
    #: the module that must already be imported for this backend to be considered
    framework: ClassVar[str] = ""
    #: input dtypes the conformance suite tests by default
    dtypes: ClassVar[tuple[str, ...]] = ("float32",)
    #: declared fused steps: step name (one of ``STEPS``) -> function(backend, *step args)
    steps: ClassVar[Mapping[str, Callable]] = MappingProxyType({})

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        unknown = sorted(set(cls.steps) - set(STEPS))
        if unknown:
            raise TypeError(f"{cls.__name__}.steps: received {unknown}; expected step names from "
                            f"refreekv.backend.STEPS {STEPS}")
        cls.steps = MappingProxyType(dict(cls.steps))

    def is_appropriate(self, x: Array) -> bool:
        raise NotImplementedError

    # -- conversion ---------------------------------------------------------------------------
    def from_numpy(self, a, dtype: str | None = None, like: Array | None = None) -> Array:
        """A native array from a NumPy array (on ``like``'s device when given)."""
        raise NotImplementedError

    def to_numpy(self, x: Array) -> np.ndarray:
        """A NumPy copy (the core reads the host once per plan: the cuts and the finiteness flags)."""
        raise NotImplementedError

    def dtype_name(self, x: Array) -> str:
        raise NotImplementedError

    def device_name(self, x: Array) -> str | None:
        """Where ``x`` lives ("cpu", "cuda:0", ...; None for frameworks without per-array devices).
        Every array argument of one call must live on one device; "meta" (no data) is refused."""
        device = getattr(x, "device", None)
        return None if device is None else str(device)

    def astype(self, x: Array, dtype: str) -> Array:
        raise NotImplementedError

    def shape(self, x: Array) -> tuple[int, ...]:
        return tuple(int(s) for s in x.shape)

    def nbytes(self, x: Array) -> int:
        raise NotImplementedError

    def arange(self, n: int, like: Array) -> Array:
        """int64 ``[0, n)`` on ``like``'s device."""
        raise NotImplementedError

    def full(self, shape: tuple[int, ...], value: float, like: Array) -> Array:
        """An array of ``like``'s dtype and device."""
        raise NotImplementedError

    # -- math ---------------------------------------------------------------------------------
    def matmul(self, a: Array, b: Array) -> Array: raise NotImplementedError
    def swap_last(self, x: Array) -> Array: raise NotImplementedError
    def reshape(self, x: Array, shape: tuple[int, ...]) -> Array: raise NotImplementedError
    def where(self, cond: Array, a, b) -> Array: raise NotImplementedError
    def exp(self, x: Array) -> Array: raise NotImplementedError
    def sqrt(self, x: Array) -> Array: raise NotImplementedError
    def round(self, x: Array) -> Array: raise NotImplementedError  # half to even
    def maximum(self, a: Array, b: Array) -> Array: raise NotImplementedError
    def minimum(self, a: Array, b: Array) -> Array: raise NotImplementedError
    def amax(self, x: Array, axis: int, keepdims: bool = False) -> Array: raise NotImplementedError
    def sum(self, x: Array, axis: int, keepdims: bool = False) -> Array: raise NotImplementedError
    def mean(self, x: Array, axis: int, keepdims: bool = False) -> Array: raise NotImplementedError
    def cumsum(self, x: Array, axis: int) -> Array: raise NotImplementedError

    def all_finite(self, x: Array) -> Array:
        """A 1-element int64 array: 1 if every value of ``x`` is finite (stays on device)."""
        raise NotImplementedError

    # -- indexing and ordering ----------------------------------------------------------------
    def take_along_axis(self, x: Array, idx: Array, axis: int) -> Array:
        """``idx`` has x's rank; sizes other than ``axis`` may be 1 and broadcast."""
        raise NotImplementedError

    def argsort_stable(self, x: Array, axis: int = -1) -> Array:
        """Ascending, equal keys keep their order (int64). Tie order is part of the spec."""
        raise NotImplementedError

    def sort(self, x: Array, axis: int = -1) -> Array: raise NotImplementedError

    def argmax(self, x: Array, axis: int) -> Array:
        """Index of the FIRST maximum (int64)."""
        raise NotImplementedError

    def concat(self, xs: list[Array], axis: int) -> Array: raise NotImplementedError
    def broadcast_to(self, x: Array, shape: tuple[int, ...]) -> Array: raise NotImplementedError
    def flip(self, x: Array, axis: int) -> Array: raise NotImplementedError


class ArrayAPIBackend(Backend):
    """Every primitive through the array API standard's names on the namespace ``xp``."""

    #: the array namespace (``numpy``, ``array_api_strict``, ...)
    xp: ClassVar[Any] = None

    def _dtype(self, name: str):
        return getattr(self.xp, name)

    def from_numpy(self, a, dtype=None, like=None):
        a = np.asarray(a)
        x = self.xp.asarray(a if dtype in (None, "bfloat16") else a.astype(dtype))
        return x if dtype != "bfloat16" else self.astype(x, dtype)

    def to_numpy(self, x):
        return np.asarray(x)

    def dtype_name(self, x) -> str:
        return str(x.dtype).rsplit(".", 1)[-1]

    def astype(self, x, dtype):
        return self.xp.astype(x, self._dtype(dtype))

    def nbytes(self, x) -> int:
        return int(np.prod(x.shape, dtype=np.int64)) * np.dtype(self.dtype_name(x)).itemsize

    def arange(self, n, like):
        return self.xp.arange(n, dtype=self.xp.int64, device=getattr(like, "device", None))

    def full(self, shape, value, like):
        return self.xp.full(shape, value, dtype=like.dtype, device=getattr(like, "device", None))

    def matmul(self, a, b):
        return self.xp.matmul(a, b)

    def swap_last(self, x):
        return self.xp.matrix_transpose(x)

    def reshape(self, x, shape):
        return self.xp.reshape(x, shape)

    def where(self, cond, a, b):
        return self.xp.where(cond, a, b)

    def exp(self, x):
        return self.xp.exp(x)

    def sqrt(self, x):
        return self.xp.sqrt(x)

    def round(self, x):
        return self.xp.round(x)

    def maximum(self, a, b):
        return self.xp.maximum(a, b)

    def minimum(self, a, b):
        return self.xp.minimum(a, b)

    def amax(self, x, axis, keepdims=False):
        return self.xp.max(x, axis=axis, keepdims=keepdims)

    def sum(self, x, axis, keepdims=False):
        return self.xp.sum(x, axis=axis, keepdims=keepdims)

    def mean(self, x, axis, keepdims=False):
        return self.xp.mean(x, axis=axis, keepdims=keepdims)

    def cumsum(self, x, axis):
        return self.xp.cumulative_sum(x, axis=axis)

    def all_finite(self, x):
        # NaN and inf survive a sum, so one reduction replaces an element-wise isfinite pass. The sum
        # accumulates in float32 at least (a float16 sum of finite values overflows past 65504);
        # finite float32 inputs could overflow it only near 1e38.
        xp = self.xp
        acc = xp.float64 if self.dtype_name(x) == "float64" else xp.float32
        return xp.reshape(xp.astype(xp.isfinite(xp.sum(x, dtype=acc)), xp.int64), (1,))

    def take_along_axis(self, x, idx, axis):
        # The standard's take_along_axis does not broadcast: expand the size-1 axes first.
        axis = axis % len(x.shape)
        other = [max(a, b) for a, b in zip(x.shape, idx.shape)]
        xs, ids = list(other), list(other)
        xs[axis], ids[axis] = x.shape[axis], idx.shape[axis]
        xp = self.xp
        return xp.take_along_axis(xp.broadcast_to(x, tuple(xs)), xp.broadcast_to(idx, tuple(ids)), axis=axis)

    def argsort_stable(self, x, axis=-1):
        return self.xp.argsort(x, axis=axis, stable=True)

    def sort(self, x, axis=-1):
        return self.xp.sort(x, axis=axis)

    def argmax(self, x, axis):
        return self.xp.argmax(x, axis=axis)

    def concat(self, xs, axis):
        return self.xp.concat(xs, axis=axis)

    def broadcast_to(self, x, shape):
        return self.xp.broadcast_to(x, shape)

    def flip(self, x, axis):
        return self.xp.flip(x, axis=axis)


# Built-in backends, imported only once their framework is (einops' trick).
_BUILTIN = {
    "numpy": "refreekv.adapters.backends.numpy:NumpyBackend",
    "torch": "refreekv.adapters.backends.torch:TorchBackend",
    "mlx": "refreekv.adapters.backends.mlx:MLXBackend",
}
_registered: list[Backend] = []
_builtin_loaded: dict[str, Backend] = {}


def register_backend(backend: Backend | type[Backend]) -> Backend:
    """Make refreekv dispatch arrays of another framework to ``backend`` (tried first)."""
    inst = backend() if isinstance(backend, type) else backend
    if not isinstance(inst, Backend):
        from .errors import bad_input

        raise bad_input("backend", f"an object of type {type(inst).__name__}", "a refreekv.Backend subclass or instance")
    _registered.insert(0, inst)
    return inst


def load_backend(path: str) -> Backend:
    """A backend from ``"module:attribute"``: an instance, a class or a factory function
    (``attribute`` defaults to ``backend``). ReFreeKVError naming ``backend`` if the module does not
    import, lacks the attribute, or the attribute does not give a ``refreekv.Backend``."""
    from .errors import bad_input

    expected = '"module:attribute" naming a refreekv.Backend instance, subclass or factory'
    if not isinstance(path, str) or not path or path.startswith(":"):
        raise bad_input("backend", repr(path), expected)
    mod, _, attr = path.partition(":")
    try:
        module = importlib.import_module(mod)
    except ImportError as e:
        raise bad_input("backend", f"{path!r}, whose module does not import ({e})", expected) from e
    if not hasattr(module, attr or "backend"):
        raise bad_input("backend", f"{path!r}: module {mod!r} has no attribute {attr or 'backend'!r}", expected)
    obj = getattr(module, attr or "backend")
    if isinstance(obj, Backend):
        return obj
    if isinstance(obj, type) and not issubclass(obj, Backend):
        raise bad_input("backend", f"{path!r}, the class {obj.__name__} (not a refreekv.Backend subclass)", expected)
    if not callable(obj):
        raise bad_input("backend", f"{path!r}, an object of type {type(obj).__name__}", expected)
    try:
        inst = obj()
    except Exception as e:
        raise bad_input("backend", f"{path!r}, whose call with no arguments failed ({type(e).__name__}: {e})",
                        expected) from e
    if not isinstance(inst, Backend):
        raise bad_input("backend", f"{path!r}, which returned an object of type {type(inst).__name__}", expected)
    return inst


def builtin_backend(name: str) -> Backend:
    """The built-in backend ``"numpy"``, ``"torch"`` or ``"mlx"`` (imports its framework)."""
    if not isinstance(name, str) or name not in _BUILTIN:
        from .errors import bad_input

        raise bad_input("name", repr(name), " or ".join(f'"{k}"' for k in _BUILTIN))
    if name not in _builtin_loaded:
        _builtin_loaded[name] = load_backend(_BUILTIN[name])
    return _builtin_loaded[name]


def find_backend(x: Array) -> Backend | None:
    """The backend for array ``x`` (registered ones first, then the built-ins whose framework is
    already imported), or None."""
    for be in _registered:
        if be.is_appropriate(x):
            return be
    for name, path in _BUILTIN.items():
        if name in sys.modules:
            be = builtin_backend(name)
            if be.is_appropriate(x):
                return be
    return None


def get_backend(x: Array) -> Backend:
    """The backend for array ``x``; ReFreeKVError if no backend takes it."""
    be = find_backend(x)
    if be is None:
        from .errors import bad_input

        raise bad_input("array", f"an object of type {type(x).__module__}.{type(x).__name__}",
                        "a numpy.ndarray, torch.Tensor or mlx.core.array (or a registered backend's array)")
    return be
