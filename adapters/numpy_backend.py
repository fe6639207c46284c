"""The NumPy backend: the core's first backend and the baseline for the others."""

from __future__ import annotations

import numpy as np

from refreekv.backend import Backend


class NumpyBackend(Backend):
    name = "numpy"
    framework = "numpy"

    def is_appropriate(self, x) -> bool:
        return isinstance(x, np.ndarray)

    def from_numpy(self, a, dtype=None, like=None):
        return np.array(a, dtype=dtype) if dtype else np.array(a)

    def to_numpy(self, x):
        return np.asarray(x)

    def dtype_name(self, x) -> str:
        return x.dtype.name

    def astype(self, x, dtype):
        return x.astype(dtype, copy=False)

    def nbytes(self, x) -> int:
        return int(x.nbytes)

    def arange(self, n, like):
        return np.arange(n, dtype=np.int64)

    def matmul(self, a, b):
        return a @ b

    def swap_last(self, x):
        return np.swapaxes(x, -1, -2)

    def reshape(self, x, shape):
        return x.reshape(shape)

    def where(self, cond, a, b):
        return np.where(cond, a, b)

    def exp(self, x):
        return np.exp(x)

    def sqrt(self, x):
        return np.sqrt(x)

    def maximum(self, a, b):
        return np.maximum(a, b)

    def minimum(self, a, b):
        return np.minimum(a, b)

    def amax(self, x, axis, keepdims=False):
        return x.max(axis=axis, keepdims=keepdims)

    def sum(self, x, axis, keepdims=False):
        return x.sum(axis=axis, keepdims=keepdims)

    def mean(self, x, axis, keepdims=False):
        return x.mean(axis=axis, keepdims=keepdims)

    def cumsum(self, x, axis):
        return np.cumsum(x, axis=axis)

    def all_finite(self, x):
        with np.errstate(all="ignore"):  # NaN and inf survive a float64 sum; no boolean mask needed
            return np.array([np.isfinite(x.sum(dtype=np.float64))], dtype=np.int64)

    def take_along_axis(self, x, idx, axis):
        return np.take_along_axis(x, idx, axis=axis)  # broadcasts size-1 axes itself

    def argsort_stable(self, x, axis=-1):
        return np.argsort(x, axis=axis, kind="stable")

    def sort(self, x, axis=-1):
        return np.sort(x, axis=axis)

    def argmax(self, x, axis):
        return np.argmax(x, axis=axis)

    def concat(self, xs, axis):
        return np.concatenate(xs, axis=axis)

    def full(self, shape, value, like):
        return np.full(shape, value, dtype=like.dtype)

    def broadcast_to(self, x, shape):
        return np.broadcast_to(x, shape)

    def flip(self, x, axis):
        return np.flip(x, axis=axis)
