"""The torch backend: CPU and CUDA, arrays stay on their device.

torch's namespace is not the array API's (``dim``/``keepdim``, ``gather`` without broadcasting,
``cat``), so this backend overrides most primitives; each is one torch call. Scores are
computed in float32 (float64 stays float64). The only host transfer is ``to_numpy``, which the
planner calls once per plan.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from refreekv import core
from refreekv.backend import ArrayAPIBackend

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
           "float64": torch.float64, "int64": torch.int64, "int32": torch.int32, "uint8": torch.uint8, "bool": torch.bool}
_NAMES = {v: k for k, v in _DTYPES.items()}


class TorchBackend(ArrayAPIBackend):
    """``device`` only places arrays made from NumPy without a ``like`` (the conformance
    suite's inputs); the core always works on the device of the arrays it is given."""

    name = "torch"
    framework = "torch"
    xp = torch
    dtypes = ("float32", "float16", "bfloat16")

    def __init__(self, device: str | None = None):
        self.device = device
        if device is not None:
            self.name = f"torch-{device}"

    def is_appropriate(self, x) -> bool:
        return isinstance(x, torch.Tensor)

    def from_numpy(self, a, dtype=None, like=None):
        a = np.asarray(a)
        device = like.device if like is not None else self.device
        if dtype == "bfloat16":  # NumPy has no bfloat16: round through float32
            return torch.from_numpy(a.astype(np.float32)).to(device=device, dtype=torch.bfloat16)
        t = torch.from_numpy(np.ascontiguousarray(a))
        if dtype:
            t = t.to(_DTYPES[dtype])
        if device is not None and torch.device(device).type == "cuda":
            # Pinned + non_blocking: a small host-to-device copy that does not stall the host.
            return t.pin_memory().to(device, non_blocking=True)
        return t.to(device)

    def to_numpy(self, x):
        x = x.detach()
        if x.dtype == torch.bfloat16:
            x = x.float()
        return x.cpu().numpy()

    def dtype_name(self, x) -> str:
        return _NAMES.get(x.dtype, str(x.dtype).removeprefix("torch."))

    def astype(self, x, dtype):
        return x.to(_DTYPES[dtype])

    def nbytes(self, x) -> int:
        return x.numel() * x.element_size()

    def arange(self, n, like):
        return torch.arange(n, device=like.device, dtype=torch.int64)

    def full(self, shape, value, like):
        return torch.full(shape, value, dtype=like.dtype, device=like.device)

    def swap_last(self, x):
        return x.transpose(-1, -2)

    def where(self, cond, a, b):
        if not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor):
            a = torch.tensor(a, device=cond.device)
        return torch.where(cond, a, b)

    def amax(self, x, axis, keepdims=False):
        return torch.amax(x, dim=axis, keepdim=keepdims)

    def sum(self, x, axis, keepdims=False):
        return torch.sum(x, dim=axis, keepdim=keepdims)

    def mean(self, x, axis, keepdims=False):
        return torch.mean(x, dim=axis, keepdim=keepdims)

    def cumsum(self, x, axis):
        return torch.cumsum(x, dim=axis)

    def all_finite(self, x):
        # One reduction is ~20x cheaper than isfinite(x).all(); NaN and inf survive a sum.
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        return torch.isfinite(torch.sum(x, dtype=acc)).reshape(1).to(torch.int64)

    def take_along_axis(self, x, idx, axis):
        # torch.gather does not broadcast: expand (a view) the size-1 axes of either side.
        axis = axis % x.dim()
        other = [max(a, b) for a, b in zip(x.shape, idx.shape)]
        xs, ids = list(other), list(other)
        xs[axis], ids[axis] = x.shape[axis], idx.shape[axis]
        return torch.gather(x.expand(xs), axis, idx.expand(ids))

    def argsort_stable(self, x, axis=-1):
        return torch.sort(x, dim=axis, stable=True).indices

    def sort(self, x, axis=-1):
        return torch.sort(x, dim=axis).values

    def argmax(self, x, axis):
        return torch.argmax(x, dim=axis)

    def concat(self, xs, axis):
        return torch.cat(xs, dim=axis)

    def broadcast_to(self, x, shape):
        return x.expand(shape)

    def flip(self, x, axis):
        return torch.flip(x, dims=(axis,))


def cuda_backend() -> TorchBackend:
    """The torch backend with conformance inputs on the GPU:
    ``pytest --pyargs refreekv.testing.suite --refreekv-backend=refreekv.adapters.backends.torch:cuda_backend``."""
    return TorchBackend("cuda")


def _compiled_decide(be: "CompiledTorchBackend", *args):
    """``core.decide`` through torch.compile; on the first failure to compile (no compiler, an
    unsupported op), warn once and run eagerly from then on: the results are the same."""
    if be.failure is None:
        try:
            return be.compiled(be, *args)
        except Exception as err:  # noqa: BLE001 - any compile-time failure falls back to eager
            be.failure = err
            warnings.warn(f"refreekv: torch.compile of the planner failed ({type(err).__name__}: {err}); "
                          "planning eagerly", RuntimeWarning, stacklevel=2)
    return core.decide(be, *args)


class CompiledTorchBackend(TorchBackend):
    """The torch backend with the planner's decision (everything after the logits for the position
    ranking and the threshold rule) compiled by ``torch.compile`` with dynamic shapes: a handful of
    fused kernels instead of dozens, and with ``mode="reduce-overhead"`` a CUDA graph per shape.
    Falls back to eager (once, with a warning) if compiling fails. Use it by registering it:
    ``refreekv.register_backend(compiled_backend())``."""

    name = "torch-compiled"
    steps = {"decide": _compiled_decide}

    def __init__(self, device: str | None = None, mode: str | None = None, backend: str = "inductor"):
        super().__init__(device)
        self.name = f"torch-compiled-{backend}" + (f"-{mode}" if mode else "")
        self.compiled = torch.compile(core.decide, dynamic=True, mode=mode, backend=backend)
        self.failure: Exception | None = None


def compiled_backend(device: str | None = None, mode: str | None = None, backend: str = "inductor") -> CompiledTorchBackend:
    """``CompiledTorchBackend`` (the conformance suite takes it as
    ``--refreekv-backend=refreekv.adapters.backends.torch:compiled_backend``)."""
    return CompiledTorchBackend(device, mode, backend)
