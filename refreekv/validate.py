"""Entry-point checks: one clear ReFreeKVError naming the argument, what came, what was expected.

Every public function of ``refreekv.api`` validates all of its arguments here, once, before any
array work: the framework of every array (all must match the keys'), ranks, dtypes, degenerate
sizes, ``scale``, ``start``, Python containers and the configuration. What passes is a
``Request`` the planner trusts.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from .backend import FLOAT_DTYPES, Array, Backend, find_backend
from .config import ReFreeKVConfig
from .errors import bad_input
from .rules import RANKINGS

_ARRAYS = "a numpy.ndarray, torch.Tensor or mlx.core.array"


def _describe(x: object) -> str:
    t = type(x)
    return f"{t.__module__}.{t.__qualname__}" if t.__module__ != "builtins" else t.__qualname__


def backend_of(x: Array, argument: str) -> Backend:
    """The backend of the array ``x``, or an error naming ``argument``."""
    be = find_backend(x)
    if be is None:
        hint = " (convert Python lists with numpy.asarray)" if isinstance(x, (list, tuple)) else ""
        raise bad_input(argument, f"an object of type {_describe(x)}", f"{_ARRAYS} (or a registered backend's array){hint}")
    return be


def same_backend(be: Backend, x: Array, argument: str, like: str = "keys") -> None:
    """``x`` must be an array of ``be``'s framework (the one ``like`` came in)."""
    other = find_backend(x)
    if other is not be:
        what = f"an object of type {_describe(x)}" if other is None else f"a {other.name} array ({_describe(x)})"
        raise bad_input(argument, what, f"a {be.name} array like {like} (every array argument from one framework)")


def same_device(be: Backend, keys: Array, keys_name: str, x: Array, argument: str) -> None:
    """``x`` on the device of ``keys``, and neither on a device without data (torch's "meta")."""
    dk, dx = be.device_name(keys), be.device_name(x)
    for name, d in ((keys_name, dk), (argument, dx)):
        if d == "meta":
            raise bad_input(name, "a tensor on the meta device (shapes without data)",
                            "arrays holding the model's values (on cpu, cuda, ...)")
    if dk != dx:
        raise bad_input(argument, f"an array on {dx}", f"the device of {keys_name}, {dk} (one device per call)")


def float_array(be: Backend, x: Array, argument: str, ndim: int, axes: str) -> tuple[int, ...]:
    """Rank ``ndim``, a floating dtype, and no zero-sized axis. Returns the shape."""
    shape = be.shape(x)
    if len(shape) != ndim:
        raise bad_input(argument, f"shape {shape}", f"{ndim} dimensions {axes}")
    dt = be.dtype_name(x)
    if dt not in FLOAT_DTYPES:
        raise bad_input(argument, f"dtype {dt}", f"a floating dtype ({', '.join(FLOAT_DTYPES)})")
    if 0 in shape:
        raise bad_input(argument, f"shape {shape}", f"no empty axis in {axes}")
    return shape


def integer(value: object, argument: str, minimum: int = 0) -> int:
    """A Python or NumPy int >= minimum (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise bad_input(argument, repr(value), f"an int >= {minimum}")
    return int(value)


def scale_value(value: object, argument: str = "scale") -> float | None:
    """None (1 / sqrt(d)) or a finite positive number."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise bad_input(argument, repr(value), "None (1 / sqrt(head dim)) or a finite number > 0")
    return float(value)


def config_value(config: object) -> ReFreeKVConfig:
    if config is None:
        return ReFreeKVConfig()
    if not isinstance(config, ReFreeKVConfig):
        raise bad_input("config", f"type {_describe(config)}", "a refreekv.ReFreeKVConfig (or None for the default)")
    return config


def host_ints(be: Backend, value: object, argument: str, batch: int) -> np.ndarray:
    """A (B,) int vector given as a list, tuple, NumPy array or an array of ``be``'s framework."""
    if isinstance(value, (list, tuple)):
        if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value):
            raise bad_input(argument, repr(list(value)), f"({batch},) ints")
        host = np.asarray(value, dtype=np.int64).reshape(-1) if value else np.zeros(0, np.int64)
    elif isinstance(value, np.ndarray):
        host = value
    elif find_backend(value) is be:
        host = np.asarray(be.to_numpy(value))
    else:
        raise bad_input(argument, f"an object of type {_describe(value)}",
                        f"({batch},) ints as a list, tuple or numpy array" + ("" if be.name == "numpy" else f" or {be.name} array"))
    if host.shape != (batch,) or host.dtype.kind not in "iu":
        raise bad_input(argument, f"shape {host.shape} dtype {host.dtype}", f"({batch},) ints")
    return host.astype(np.int64)


def start_host(be: Backend, start, batch: int, n: int) -> np.ndarray:
    """Left-padding offsets (B,) on the host, validated: every sample keeps a token."""
    if start is None:
        return np.zeros(batch, dtype=np.int64)
    host = host_ints(be, start, "start", batch)
    if (host < 0).any() or (host >= n).any():
        raise bad_input("start", host.tolist(), f"offsets in [0, {n - 1}] so every sample keeps a token")
    return host


def ranking_order(be: Backend, order: Array, argument: str, batch: int, n: int, hkv_divides: int | None = None,
                  start: np.ndarray | None = None, sinks: int | None = None) -> None:
    """A ranking (B, Hkv, n) int: each row a permutation of the positions 0..n-1 (one host read).
    With ``start`` and ``sinks`` also the order every ranking of this library has: the sinks
    ``[s, s + m_b)`` first, the left padding ``[0, s)`` last (SPEC §3.2)."""
    o = be.shape(order)
    if (len(o) != 3 or o[0] != batch or o[2] != n or 0 in o or (hkv_divides is not None and hkv_divides % o[1])
            or be.dtype_name(order) not in ("int64", "int32")):
        heads = f" and Hkv dividing H = {hkv_divides}" if hkv_divides is not None else ""
        raise bad_input(argument, f"shape {o} dtype {be.dtype_name(order)}",
                        f"(B, Hkv, n) int64 with B = {batch}, n = {n}{heads}")
    host = np.asarray(be.to_numpy(order))
    bad = np.argwhere((np.sort(host, axis=-1) != np.arange(n)).any(axis=-1))
    if len(bad):
        b, h = bad[0]
        raise bad_input(argument, f"row [{b}, {h}] = {_short(host[b, h])}",
                        f"each row a permutation of the positions 0..{n - 1} (a ranking)")
    if start is None or sinks is None:
        return
    for b, s in enumerate(start.tolist()):
        m = min(sinks, n - s)
        lead, tail = np.sort(host[b, :, :m], axis=-1), np.sort(host[b, :, n - s:], axis=-1)
        if (lead != np.arange(s, s + m)).any() or (tail != np.arange(s)).any():
            raise bad_input(argument, f"row [{b}, ...] = {_short(host[b, 0])} with start {s} and sinks {sinks}",
                            f"the {m} sinks (positions {s}..{s + m - 1}) ranked first and the {s} padding "
                            f"positions last, as position_ranking and attention_ranking order them")


def _short(row: np.ndarray) -> str:
    """A ranking row for a message: whole if short, else its ends."""
    r = row.tolist()
    return str(r) if len(r) <= 12 else f"[{', '.join(map(str, r[:6]))}, ..., {', '.join(map(str, r[-4:]))}]"


def q_rows_4d(be: Backend, q_rows: Array, argument: str = "q_rows") -> Array:
    """(B, H, k, d), or (B, H, d) for the last token alone, as (B, H, 1, d)."""
    shape = be.shape(q_rows)
    if len(shape) == 3:
        return be.reshape(q_rows, (shape[0], shape[1], 1, shape[2]))
    return q_rows


def layer_inputs(be: Backend, q_rows: Array, keys: Array, values: Array | None = None, tag: str = "") -> Array:
    """Frameworks, shapes and dtypes of one layer's query rows, keys and values; returns the
    query rows as (B, H, k, d). ``tag`` ("[2]") names the layer in messages."""
    same_backend(be, q_rows, f"q_rows{tag}")
    same_device(be, keys, f"keys{tag}", q_rows, f"q_rows{tag}")
    q_rows = q_rows_4d(be, q_rows)
    B, H, k, d = float_array(be, q_rows, f"q_rows{tag}", 4, "(B, H, k, d) or (B, H, d)")
    Bk, Hkv, n, dk = float_array(be, keys, f"keys{tag}", 4, "(B, Hkv, n, d)")
    if Bk != B:
        raise bad_input(f"keys{tag}", f"batch {Bk} (shape {be.shape(keys)})", f"the batch of q_rows, {B}")
    if dk != d:
        raise bad_input(f"keys{tag}", f"head dim {dk}", f"the head dim of q_rows, {d}")
    if H % Hkv:
        raise bad_input(f"q_rows{tag}", f"{H} query heads with {Hkv} KV heads",
                        "a number of query heads that is a multiple of the KV heads (GQA)")
    if k > n:
        raise bad_input(f"q_rows{tag}", f"{k} query rows", f"at most the prompt length n = {n}")
    if values is not None:
        same_backend(be, values, f"values{tag}")
        same_device(be, keys, f"keys{tag}", values, f"values{tag}")
        Bv, Hv, nv, _ = float_array(be, values, f"values{tag}", 4, "(B, Hkv, n, d_v)")
        if (Bv, Hv, nv) != (B, Hkv, n):
            raise bad_input(f"values{tag}", f"shape {be.shape(values)}", f"(B, Hkv, n) = {(B, Hkv, n)} like keys")
    return q_rows


@dataclass(frozen=True)
class Request:
    """Validated inputs of several layers of one prompt (all of the same shapes)."""

    be: Backend
    config: ReFreeKVConfig
    q_rows: list          # L arrays (B, H, k, d)
    keys: list            # L arrays (B, Hkv, n, d)
    values: list | None   # L arrays (B, Hkv, n, d_v), or None when only planning
    start: np.ndarray     # (B,) int64 host left-padding offsets
    scales: list          # L floats or None
    layers: list[int] | None  # model layer indices (retained layers, reports), or None
    keep_newest: np.ndarray | None = None  # (B,) newest tokens kept whatever the rule says, or None

    @property
    def shape(self) -> tuple[int, int, int, int, int, int]:
        """(L, B, H, Hkv, n, k)."""
        B, H, k, _ = self.be.shape(self.q_rows[0])
        return len(self.keys), B, H, self.be.shape(self.keys[0])[1], self.be.shape(self.keys[0])[2], k


def _layer_list(value, argument: str, length: int | None) -> list:
    if not isinstance(value, (list, tuple)) or not value:
        raise bad_input(argument, f"type {_describe(value)}" if not isinstance(value, (list, tuple)) else "an empty list",
                        "a non-empty list of arrays, one per layer" if length is None else
                        f"a list of {length} arrays, one per layer of keys")
    if length is not None and len(value) != length:
        raise bad_input(argument, f"{len(value)} layers", f"a list of {length} arrays, one per layer of keys")
    return list(value)


def keep_newest_host(be: Backend, value, batch: int, cfg: ReFreeKVConfig) -> np.ndarray | None:
    """``keep_newest`` as (B,) host ints >= 0 (an int is the same for every sample), or None. Only a
    ranking that puts the newest tokens right after the sinks can protect them."""
    if value is None:
        return None
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        host = np.full(batch, int(value), np.int64)
    elif isinstance(value, (numbers.Number, str, bytes)):
        raise bad_input("keep_newest", repr(value), f"None, an int >= 0, or ({batch},) ints >= 0")
    else:
        host = host_ints(be, value, "keep_newest", batch)
    if (host < 0).any():
        raise bad_input("keep_newest", host.tolist(), "counts >= 0 of newest tokens to keep")
    if host.any() and not RANKINGS[cfg.ranking].newest_run:
        raise bad_input("keep_newest", host.tolist(), f'None or 0 with ranking={cfg.ranking!r} (only a ranking that '
                        'keeps the newest tokens first, "position", can protect them)')
    return host


def request(q_rows, keys, values, config, *, start=None, scale=None, layers=None,
            need_values: bool = False, layers_name: str = "layers", keep_newest=None) -> Request:
    """Validate the arguments of ``plan_layers`` / ``compress_layers`` into a ``Request``.
    ``layers_name`` is what the caller called the layer indices ("layer" for one layer)."""
    cfg = config_value(config)
    ks = _layer_list(keys, "keys", None)
    L = len(ks)
    qs = _layer_list(q_rows, "q_rows", L)
    if values is None and need_values:
        raise bad_input("values", "None", f"a list of {L} (B, Hkv, n, d_v) arrays, one per layer")
    vs = None if values is None else _layer_list(values, "values", L)
    missing = None if vs is None else next((i for i, x in enumerate(vs) if x is None), None)
    if missing is not None:
        raise bad_input(f"values[{missing}]", "None", "a (B, Hkv, n, d_v) array like keys, in every layer")
    if isinstance(scale, (list, tuple)):
        if len(scale) != L:
            raise bad_input("scale", f"{len(scale)} values", f"one number, or a list of {L} (one per layer)")
        scales = [scale_value(s, f"scale[{i}]") for i, s in enumerate(scale)]
    else:
        scales = [scale_value(scale)] * L
    be = backend_of(ks[0], "keys" if L == 1 else "keys[0]")
    checked = []
    for i in range(L):
        tag = "" if L == 1 else f"[{i}]"
        same_backend(be, ks[i], f"keys{tag}", "keys[0]")
        if i:
            same_device(be, ks[0], "keys[0]", ks[i], f"keys{tag}")
        q = layer_inputs(be, qs[i], ks[i], None if vs is None else vs[i], tag)
        if checked and (be.shape(q) != be.shape(checked[0]) or be.shape(ks[i]) != be.shape(ks[0])):
            raise bad_input(f"keys{tag}", f"layer {i} with q_rows {be.shape(q)} and keys {be.shape(ks[i])}",
                            f"the shapes of layer 0, {be.shape(checked[0])} and {be.shape(ks[0])} (one prompt)")
        checked.append(q)
    B, _, k, _ = be.shape(checked[0])
    n = be.shape(ks[0])[2]
    host = start_host(be, start, B, n)
    if layers is not None:
        if not isinstance(layers, (list, tuple)) or len(layers) != L:
            raise bad_input(layers_name, repr(layers), f"None or {L} layer indices, one per layer")
        layers = [integer(x, layers_name) for x in layers]
        if len(set(layers)) != len(layers):
            raise bad_input(layers_name, repr(layers), "distinct layer indices (each layer planned once per call)")
    # Retained layers and prompts too short to compress (n_b <= sinks + 1) need no queries.
    planned = (layers is None or not all(cfg.is_retained(i) for i in layers)) and int(n - host.min()) > cfg.sinks + 1
    need = max(cfg.rows_needed(int(n - s)) for s in host)
    if planned and k < need:
        raise bad_input("q_rows", f"{k} query rows", f"at least {need} for ranking={cfg.ranking!r}, "
                        f"query_rows={cfg.query_rows!r} and n = {n} (ReFreeKVConfig.rows_needed)")
    return Request(be, cfg, checked, ks, vs, host, scales, layers, keep_newest_host(be, keep_newest, B, cfg))
