"""A fourth backend, written by following docs/conformance.md: the Python array API standard,
here on ``array_api_strict`` (a strict reference implementation of the standard).

Run the conformance suite against it:

    pytest --pyargs refreekv.testing.suite \
        --refreekv-backend=docs.examples.array_api_backend:ArrayAPIBackend --refreekv-dtypes=float32,float64

(from the repository root, so that ``docs.examples`` is importable).
"""

from __future__ import annotations

import array_api_strict as xp
import numpy as np
from array_api_strict._array_object import Array

from refreekv import Backend

_DTYPES = {"float32": xp.float32, "float64": xp.float64, "int64": xp.int64, "int32": xp.int32, "bool": xp.bool}


class ArrayAPIBackend(Backend):
    name = "array-api-strict"
    framework = "array_api_strict"
    dtypes = ("float32", "float64")  # the standard has no float16 or bfloat16

    def is_appropriate(self, x) -> bool:
        return isinstance(x, Array)

    # conversion
    def from_numpy(self, a, dtype=None, like=None):
        a = np.asarray(a)
        return xp.asarray(a.astype(dtype) if dtype else a)

    def to_numpy(self, x):
        return np.asarray(x)

    def dtype_name(self, x) -> str:
        return str(x.dtype).split(".")[-1]

    def astype(self, x, dtype):
        return xp.astype(x, _DTYPES[dtype])

    def nbytes(self, x) -> int:
        return int(np.asarray(x).nbytes)

    # creation and math
    def arange(self, n, like):
        return xp.arange(n, dtype=xp.int64)

    def matmul(self, a, b):
        return xp.matmul(a, b)

    def swap_last(self, x):
        return xp.matrix_transpose(x)

    def reshape(self, x, shape):
        return xp.reshape(x, shape)

    def where(self, cond, a, b):
        return xp.where(cond, a, b)

    def exp(self, x):
        return xp.exp(x)

    def sqrt(self, x):
        return xp.sqrt(x)

    def maximum(self, a, b):
        return xp.maximum(a, b)

    def minimum(self, a, b):
        return xp.minimum(a, b)

    def amax(self, x, axis, keepdims=False):
        return xp.max(x, axis=axis, keepdims=keepdims)

    def sum(self, x, axis, keepdims=False):
        return xp.sum(x, axis=axis, keepdims=keepdims)

    def mean(self, x, axis, keepdims=False):
        return xp.mean(x, axis=axis, keepdims=keepdims)

    def cumsum(self, x, axis):
        return xp.cumulative_sum(x, axis=axis)

    def all_finite(self, x):
        return xp.reshape(xp.astype(xp.isfinite(xp.sum(x)), xp.int64), (1,))

    # indexing and ordering
    def take_along_axis(self, x, idx, axis):
        # The standard's take_along_axis does not broadcast: expand the size-1 axes first.
        axis = axis % x.ndim
        other = [max(a, b) for a, b in zip(x.shape, idx.shape)]
        xs, ids = list(other), list(other)
        xs[axis], ids[axis] = x.shape[axis], idx.shape[axis]
        return xp.take_along_axis(xp.broadcast_to(x, tuple(xs)), xp.broadcast_to(idx, tuple(ids)), axis=axis)

    def argsort_stable(self, x, axis=-1):
        return xp.argsort(x, axis=axis, stable=True)

    def sort(self, x, axis=-1):
        return xp.sort(x, axis=axis)

    def argmax(self, x, axis):
        return xp.argmax(x, axis=axis)

    def concat(self, xs, axis):
        return xp.concat(xs, axis=axis)

    def full(self, shape, value, like):
        return xp.full(shape, value, dtype=like.dtype)

    def broadcast_to(self, x, shape):
        return xp.broadcast_to(x, shape)

    def flip(self, x, axis):
        return xp.flip(x, axis=axis)
