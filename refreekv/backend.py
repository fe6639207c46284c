"""The small array interface the core is written against, and dispatch by array type.

Like einops' ``_backends``: a backend is a small class, its framework is imported in its
``__init__``, and dispatch looks at ``sys.modules`` first so that nothing unused is imported.
Arithmetic, comparisons and basic indexing (``x[:, None]``, ``x[..., :J]``) use the arrays' own
operators, which NumPy, torch and MLX share; everything else goes through these methods.

An adapter may also override a whole step of ``refreekv.core`` (e.g. with a fused kernel) by
defining a method of the same name; the conformance suite then holds it to the same results.
"""

from __future__ import annotations

import importlib
import sys
from abc import ABC, abstractmethod
from typing import Any

Array = Any

#: dtype names the core accepts as model tensors.
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


class Backend(ABC):
    """Array operations for one framework. Subclass, implement every abstract method, and
    ``register_backend`` the class (or name it to the conformance suite)."""

    #: short name used in messages and reports ("numpy", "torch", "mlx", ...)
    name: str = "abstract"
    #: the module that must already be imported for this backend to be considered
    framework: str = ""

    @abstractmethod
    def is_appropriate(self, x: Array) -> bool: ...

    # -- conversion ---------------------------------------------------------------------------
    @abstractmethod
    def from_numpy(self, a, dtype: str | None = None, like: Array | None = None) -> Array:
        """A native array from a NumPy array (on ``like``'s device when given)."""

    @abstractmethod
    def to_numpy(self, x: Array):
        """A NumPy copy (the only host transfer the core makes is of the cut)."""

    @abstractmethod
    def dtype_name(self, x: Array) -> str: ...

    @abstractmethod
    def astype(self, x: Array, dtype: str) -> Array: ...

    def shape(self, x: Array) -> tuple[int, ...]:
        return tuple(int(s) for s in x.shape)

    @abstractmethod
    def nbytes(self, x: Array) -> int: ...

    # -- creation -----------------------------------------------------------------------------
    @abstractmethod
    def arange(self, n: int, like: Array) -> Array:
        """int64 ``[0, n)`` on ``like``'s device."""

    # -- math ---------------------------------------------------------------------------------
    @abstractmethod
    def matmul(self, a: Array, b: Array) -> Array: ...

    @abstractmethod
    def swap_last(self, x: Array) -> Array:
        """Swap the last two axes (a view where the framework has views)."""

    @abstractmethod
    def reshape(self, x: Array, shape: tuple[int, ...]) -> Array: ...

    @abstractmethod
    def where(self, cond: Array, a: Array | float, b: Array | float) -> Array: ...

    @abstractmethod
    def exp(self, x: Array) -> Array: ...

    @abstractmethod
    def sqrt(self, x: Array) -> Array: ...

    @abstractmethod
    def maximum(self, a: Array, b: Array) -> Array: ...

    @abstractmethod
    def minimum(self, a: Array, b: Array) -> Array: ...

    @abstractmethod
    def amax(self, x: Array, axis: int, keepdims: bool = False) -> Array: ...

    @abstractmethod
    def sum(self, x: Array, axis: int, keepdims: bool = False) -> Array: ...

    @abstractmethod
    def mean(self, x: Array, axis: int, keepdims: bool = False) -> Array: ...

    @abstractmethod
    def cumsum(self, x: Array, axis: int) -> Array: ...

    @abstractmethod
    def all_finite(self, x: Array) -> Array:
        """A 1-element int array: 1 if every value is finite (stays on device). A float sum is
        enough: NaN and inf propagate through it (it could only overflow for values near 1e33)."""

    # -- indexing and ordering ----------------------------------------------------------------
    @abstractmethod
    def take_along_axis(self, x: Array, idx: Array, axis: int) -> Array:
        """``idx`` has x's rank; sizes other than ``axis`` may be 1 and broadcast."""

    @abstractmethod
    def argsort_stable(self, x: Array, axis: int = -1) -> Array:
        """Ascending, equal keys keep their order (int64). Tie order is part of the spec."""

    @abstractmethod
    def sort(self, x: Array, axis: int = -1) -> Array: ...

    @abstractmethod
    def argmax(self, x: Array, axis: int) -> Array:
        """Index of the FIRST maximum (int64)."""

    @abstractmethod
    def concat(self, xs: list[Array], axis: int) -> Array: ...

    @abstractmethod
    def full(self, shape: tuple[int, ...], value: float, like: Array) -> Array:
        """An array of ``like``'s dtype and device."""

    @abstractmethod
    def broadcast_to(self, x: Array, shape: tuple[int, ...]) -> Array: ...

    @abstractmethod
    def flip(self, x: Array, axis: int) -> Array: ...


# Built-in backends, imported only once their framework is (einops' trick).
_BUILTIN = {
    "numpy": "refreekv.adapters.numpy_backend:NumpyBackend",
    "torch": "refreekv.adapters.torch_backend:TorchBackend",
    "mlx": "refreekv.adapters.mlx_backend:MLXBackend",
}
_registered: list[Backend] = []
_builtin_loaded: dict[str, Backend] = {}


def register_backend(backend: Backend | type[Backend]) -> Backend:
    """Make refreekv dispatch arrays of another framework to ``backend`` (tried first)."""
    inst = backend() if isinstance(backend, type) else backend
    _registered.insert(0, inst)
    return inst


def load_backend(path: str) -> Backend:
    """A backend from ``"module:attribute"``: an instance, a class or a factory function."""
    mod, _, attr = path.partition(":")
    obj = getattr(importlib.import_module(mod), attr or "backend")
    return obj if isinstance(obj, Backend) else obj()


def builtin_backend(name: str) -> Backend:
    """The built-in backend ``"numpy"``, ``"torch"`` or ``"mlx"`` (imports its framework)."""
    if name not in _builtin_loaded:
        _builtin_loaded[name] = load_backend(_BUILTIN[name])
    return _builtin_loaded[name]


def get_backend(x: Array) -> Backend:
    """The backend for array ``x``: registered ones first, then the built-ins whose
    framework is already imported."""
    for be in _registered:
        if be.is_appropriate(x):
            return be
    for name in _BUILTIN:
        if name in sys.modules:
            be = builtin_backend(name)
            if be.is_appropriate(x):
                return be
    from .errors import bad_input

    raise bad_input("array", f"an object of type {type(x).__module__}.{type(x).__name__}",
                    "a numpy.ndarray, torch.Tensor or mlx.core.array (or a registered backend's array)")
