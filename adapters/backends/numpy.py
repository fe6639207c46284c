"""The NumPy backend: the array API standard on ``numpy`` (NumPy >= 2.1), nearly as is."""

from __future__ import annotations

import numpy as np

from refreekv.backend import ArrayAPIBackend


class NumpyBackend(ArrayAPIBackend):
    name = "numpy"
    framework = "numpy"
    xp = np
    dtypes = ("float64", "float32", "float16")

    def is_appropriate(self, x) -> bool:
        return isinstance(x, np.ndarray)

    def from_numpy(self, a, dtype=None, like=None):
        return np.array(a, dtype=dtype) if dtype else np.array(a)

    def nbytes(self, x) -> int:
        return int(x.nbytes)

    def arange(self, n, like):
        return np.arange(n, dtype=np.int64)

    def full(self, shape, value, like):
        return np.full(shape, value, dtype=like.dtype)

    def take_along_axis(self, x, idx, axis):
        return np.take_along_axis(x, idx, axis=axis)  # NumPy broadcasts size-1 axes itself

    def all_finite(self, x):
        with np.errstate(all="ignore"):  # a float64 sum: overflow only past 1e308
            return np.array([np.isfinite(x.sum(dtype=np.float64))], dtype=np.int64)
