"""The MLX backend (Apple silicon GPUs, and the CPU on Linux with ``mlx[cpu]``).

MLX is lazy: nothing here evaluates except ``to_numpy``, which the planner calls once per plan.
MLX returns uint32 indices from ``argsort``/``argmax``; they are cast to int64. MLX documents no
sort stability, so ``argsort_stable`` builds an exact (rank, index) key that any sort orders the
same way. Every other primitive is the array-API base on ``mlx.core``.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from refreekv.backend import ArrayAPIBackend

_DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32,
           "float64": mx.float64, "int64": mx.int64, "int32": mx.int32, "uint8": mx.uint8, "bool": mx.bool_}
_NAMES = {v: k for k, v in _DTYPES.items()}


class MLXBackend(ArrayAPIBackend):
    name = "mlx"
    framework = "mlx"
    xp = mx
    # MLX's float64 exp runs at float32 precision (the suite measured 2e-9 relative error in
    # attention rows), so float64 is not claimed.
    dtypes = ("float32", "float16", "bfloat16")

    def is_appropriate(self, x) -> bool:
        return isinstance(x, mx.array)

    def _dtype(self, name):
        return _DTYPES[name]

    def from_numpy(self, a, dtype=None, like=None):
        a = np.asarray(a)
        if dtype == "bfloat16":  # NumPy has no bfloat16: round through float32
            return mx.array(a.astype(np.float32)).astype(mx.bfloat16)
        x = mx.array(a)
        return x.astype(_DTYPES[dtype]) if dtype else x

    def to_numpy(self, x):
        if x.dtype == mx.bfloat16:
            x = x.astype(mx.float32)
        return np.array(x)  # evaluates the lazy graph

    def dtype_name(self, x) -> str:
        return _NAMES.get(x.dtype, str(x.dtype).removeprefix("mlx.core."))

    def nbytes(self, x) -> int:
        return int(x.nbytes)

    def arange(self, n, like):
        return mx.arange(n, dtype=mx.int64)

    def full(self, shape, value, like):
        return mx.full(shape, value, dtype=like.dtype)

    def swap_last(self, x):
        return mx.swapaxes(x, -1, -2)

    def cumsum(self, x, axis):
        return mx.cumsum(x, axis=axis)

    def all_finite(self, x):
        # NaN and inf survive a sum (accumulated in float32).
        return mx.isfinite(mx.sum(x.astype(mx.float32) if x.dtype != mx.float64 else x)).reshape(1).astype(mx.int64)

    def take_along_axis(self, x, idx, axis):
        return mx.take_along_axis(x, idx.astype(mx.int64), axis=axis)  # broadcasts itself

    def argsort_stable(self, x, axis=-1):
        # Exact stability without trusting the sort: rank each value among distinct values,
        # then sort the unique key rank * n + index (int64, no ties left).
        x = mx.moveaxis(x, axis, -1)
        n = x.shape[-1]
        perm = mx.argsort(x, axis=-1).astype(mx.int64)
        sk = mx.take_along_axis(x, perm, axis=-1)
        pos = mx.arange(n, dtype=mx.int64)
        new = mx.concatenate([mx.ones(sk.shape[:-1] + (1,), dtype=mx.bool_), sk[..., 1:] != sk[..., :-1]], axis=-1)
        first = mx.cummax(mx.where(new, pos, 0), axis=-1)
        rank = mx.take_along_axis(first, mx.argsort(perm, axis=-1).astype(mx.int64), axis=-1)
        out = mx.argsort(rank * n + pos, axis=-1).astype(mx.int64)
        return mx.moveaxis(out, -1, axis)

    def argmax(self, x, axis):
        return mx.argmax(x, axis=axis).astype(mx.int64)

    def concat(self, xs, axis):
        return mx.concatenate(xs, axis=axis)

    def flip(self, x, axis):
        n = x.shape[axis]
        return mx.take(x, mx.arange(n - 1, -1, -1), axis=axis)
