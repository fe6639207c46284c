"""Entry-point checks: one clear ReFreeKVError naming the argument, what came, what was expected."""

from __future__ import annotations

import numpy as np

from .backend import FLOAT_DTYPES, Array, Backend, get_backend
from .errors import bad_input


def backend_of(x: Array, argument: str) -> Backend:
    try:
        return get_backend(x)
    except ValueError as err:
        raise bad_input(argument, f"an object of type {type(x).__name__}",
                        "a numpy.ndarray, torch.Tensor or mlx.core.array") from err


def float_array(be: Backend, x: Array, argument: str, ndim: int, axes: str) -> tuple[int, ...]:
    shape = be.shape(x)
    if len(shape) != ndim:
        raise bad_input(argument, f"shape {shape}", f"{ndim} dimensions {axes}")
    dt = be.dtype_name(x)
    if dt not in FLOAT_DTYPES:
        raise bad_input(argument, f"dtype {dt}", f"a floating dtype ({', '.join(FLOAT_DTYPES)})")
    return shape


def q_rows_4d(be: Backend, q_rows: Array) -> Array:
    """Accept (B, H, d) for the last token alone, as (B, H, 1, d)."""
    shape = be.shape(q_rows)
    if len(shape) == 3:
        return be.reshape(q_rows, (shape[0], shape[1], 1, shape[2]))
    return q_rows


def layer_inputs(be: Backend, q_rows: Array, keys: Array, values: Array | None = None) -> None:
    """Shapes and dtypes of one layer's query rows, keys and values."""
    B, H, k, d = float_array(be, q_rows, "q_rows", 4, "(B, H, k, d) or (B, H, d)")
    Bk, Hkv, n, dk = float_array(be, keys, "keys", 4, "(B, Hkv, n, d)")
    if Bk != B:
        raise bad_input("keys", f"batch {Bk} (shape {be.shape(keys)})", f"the batch of q_rows, {B}")
    if n < 1:
        raise bad_input("keys", f"shape {be.shape(keys)}", "a non-empty prompt (n >= 1)")
    if dk != d:
        raise bad_input("keys", f"head dim {dk}", f"the head dim of q_rows, {d}")
    if Hkv < 1 or H % Hkv:
        raise bad_input("q_rows", f"{H} query heads with {Hkv} KV heads",
                        "a number of query heads that is a multiple of the KV heads (GQA)")
    if k > n:
        raise bad_input("q_rows", f"{k} query rows", f"at most the prompt length n = {n}")
    if values is not None:
        Bv, Hv, nv, _ = float_array(be, values, "values", 4, "(B, Hkv, n, d_v)")
        if (Bv, Hv, nv) != (B, Hkv, n):
            raise bad_input("values", f"shape {be.shape(values)}", f"(B, Hkv, n) = {(B, Hkv, n)} like keys")


def start_offsets(be: Backend, start, batch: int, n: int, like: Array) -> tuple[np.ndarray, Array]:
    """Left-padding offsets: host copy (tiny) and device int64 copy."""
    host = start_host(be, start, batch, n)
    return host, be.from_numpy(host, "int64", like=like)


def start_host(be: Backend, start, batch: int, n: int) -> np.ndarray:
    """Left-padding offsets (B,) on the host, validated."""
    if start is None:
        host = np.zeros(batch, dtype=np.int64)
    else:
        try:
            host = np.asarray(start if isinstance(start, (list, tuple, np.ndarray)) else be.to_numpy(start))
        except Exception as err:  # an array of another framework
            raise bad_input("start", f"type {type(start).__name__}", "a (B,) int sequence or array") from err
        if host.shape != (batch,) or host.dtype.kind not in "iu":
            raise bad_input("start", f"shape {host.shape} dtype {host.dtype}", f"({batch},) ints (left padding per sample)")
        if (host < 0).any() or (host >= n).any():
            raise bad_input("start", host.tolist(), f"offsets in [0, {n - 1}] so every sample keeps a token")
        host = host.astype(np.int64)
    return host


def finite_flags(be: Backend, named: dict[str, Array]) -> tuple[list[str], list[Array]]:
    return list(named), [be.astype(be.all_finite(x), "int64") for x in named.values()]


def raise_non_finite(names: list[str], flags: np.ndarray) -> None:
    bad = [nm for nm, ok in zip(names, flags) if not ok]
    if bad:
        raise bad_input(bad[0], "NaN or infinite values", "finite values (check the model's prefill)")
