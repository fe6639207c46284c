"""Public functions: validate at the entry, dispatch on the array type, run the core step.

The step functions mirror ``refreekv.reference`` one for one (same names, same semantics,
same shapes), so every step can be compared with the specification. ``plan_layer`` and
``compress_layer`` compose them the way an engine uses them.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import numpy as np

from . import core
from . import validate as v
from .backend import Array, Backend
from .config import ReFreeKVConfig
from .errors import bad_input
from .report import LayerReport


def _step(be: Backend, name: str):
    """The backend's own version of a step if it defines one (a fused kernel), else the core's."""
    own = getattr(type(be), name, None)
    return getattr(be, name) if callable(own) else partial(getattr(core, name), be)


def _rows_default(be: Backend, start_host: np.ndarray, k: int, like: Array) -> Array:
    return be.from_numpy(np.full_like(start_host, k), "int64", like=like)


def _check_finite(be: Backend, **named: Array) -> None:
    names, flags = v.finite_flags(be, named)
    v.raise_non_finite(names, be.to_numpy(be.concat([be.reshape(f, (1,)) for f in flags], axis=0)))


def _config(config: ReFreeKVConfig | None) -> ReFreeKVConfig:
    if config is None:
        return ReFreeKVConfig()
    if not isinstance(config, ReFreeKVConfig):
        raise bad_input("config", f"type {type(config).__name__}", "a refreekv.ReFreeKVConfig")
    return config


def _positive_int(value, argument: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise bad_input(argument, repr(value), f"an int >= {minimum}")
    return int(value)


# ---------------------------------------------------------------------------------------------
# Steps (same names as the reference)
# ---------------------------------------------------------------------------------------------

def _scored_inputs(q_rows: Array, keys: Array, start, rows):
    """The shared entry of the scoring steps: validate, check finiteness, place start and rows."""
    be = v.backend_of(keys, "keys")
    q = v.q_rows_4d(be, q_rows)
    v.layer_inputs(be, q, keys)
    _check_finite(be, q_rows=q, keys=keys)
    B, _, k, _ = be.shape(q)
    host, st = v.start_offsets(be, start, B, be.shape(keys)[2], keys)
    r = _rows_default(be, host, k, st) if rows is None else be.from_numpy(np.asarray(rows), "int64", like=st)
    return be, q, st, r


def attention_rows(q_rows: Array, keys: Array, *, start=None, scale: float | None = None,
                   rows=None) -> Array:
    """Causal attention of the last k prompt queries. q_rows (B, H, k, d) or (B, H, d),
    keys (B, Hkv, n, d) -> (B, H, k, n) float32 (float64 for float64 input). ``rows`` (B,):
    how many of the last rows each sample uses (default all k)."""
    be, q, st, r = _scored_inputs(q_rows, keys, start, rows)
    return _step(be, "attention_rows")(q, keys, st, r, scale)[0]


def attention_row(q_rows: Array, keys: Array, *, start=None, scale: float | None = None,
                  rows=None) -> Array:
    """ReFreeKV's score row a (paper Eq. 2; k = 1: the last token's attention). -> (B, H, n)."""
    be, q, st, r = _scored_inputs(q_rows, keys, start, rows)
    return _step(be, "attention_row")(q, keys, st, r, scale)


def position_ranking(keys: Array, *, sinks: int, start=None) -> Array:
    """Sinks, then newest to oldest (SPEC §3.2), for keys (B, Hkv, n, d) -> (B, Hkv, n) int64."""
    be = v.backend_of(keys, "keys")
    B, Hkv, n, _ = v.float_array(be, keys, "keys", 4, "(B, Hkv, n, d)")
    sinks = _positive_int(sinks, "sinks")
    _, st = v.start_offsets(be, start, B, n, keys)
    return _step(be, "position_ranking")(B, Hkv, n, sinks, st)


def h2o_scores(q_rows: Array, keys: Array, *, start=None, scale: float | None = None) -> Array:
    """H2O: attention accumulated over the given queries, mean per KV group. -> (B, Hkv, n)."""
    be, q, st, r = _scored_inputs(q_rows, keys, start, None)
    return _step(be, "h2o_scores")(q, keys, st, r, scale)


def snapkv_scores(q_rows: Array, keys: Array, *, window: int, pool_kernel: int, start=None,
                  scale: float | None = None) -> Array:
    """SnapKV: last ``window`` queries' attention, max-pooled over ``pool_kernel``. -> (B, Hkv, n)."""
    be = v.backend_of(keys, "keys")
    q = v.q_rows_4d(be, q_rows)
    v.layer_inputs(be, q, keys)
    _check_finite(be, q_rows=q, keys=keys)
    ReFreeKVConfig(window=window, pool_kernel=pool_kernel)  # validates both
    _, st = v.start_offsets(be, start, be.shape(q)[0], be.shape(keys)[2], keys)
    return _step(be, "snapkv_scores")(q, keys, st, window, pool_kernel, scale)


def attention_ranking(scores: Array, *, sinks: int, window: int, start=None) -> Array:
    """Sinks, the last ``window`` tokens, then descending score (ties newest first). (B, Hkv, n)."""
    be = v.backend_of(scores, "scores")
    B, _, n = v.float_array(be, scores, "scores", 3, "(B, Hkv, n)")
    sinks, window = _positive_int(sinks, "sinks"), _positive_int(window, "window")
    _check_finite(be, scores=scores)
    _, st = v.start_offsets(be, start, B, n, scores)
    return _step(be, "attention_ranking")(scores, sinks, window, st)


def norm_ratio_curve(a: Array, order: Array, *, sinks: int, norm_scope: str = "candidates",
                     start=None) -> Array:
    """The Uni-Metric for every prefix length: a (B, H, n), order (B, Hkv, n) -> (B, n)."""
    be = v.backend_of(a, "a")
    B, H, n = v.float_array(be, a, "a", 3, "(B, H, n)")
    o = be.shape(order)
    if len(o) != 3 or o[0] != B or o[2] != n or H % o[1]:
        raise bad_input("order", f"shape {o}", f"(B, Hkv, n) with B = {B}, n = {n} and Hkv dividing H = {H}")
    ReFreeKVConfig(sinks=_positive_int(sinks, "sinks"), norm_scope=norm_scope)
    _check_finite(be, a=a)
    _, st = v.start_offsets(be, start, B, n, a)
    return _step(be, "norm_ratio_curve")(a, order, sinks, norm_scope, st)


def threshold_cut(ratio: Array, *, threshold: float, sinks: int, start=None) -> Array:
    """The shortest prefix with ratio <= T, clamped to [sinks + 1, n_b]. -> (B,) int64."""
    be = v.backend_of(ratio, "ratio")
    B, n = v.float_array(be, ratio, "ratio", 2, "(B, n)")
    ReFreeKVConfig(threshold=threshold, sinks=_positive_int(sinks, "sinks"))
    _, st = v.start_offsets(be, start, B, n, ratio)
    return _step(be, "threshold_cut")(ratio, threshold, sinks, st)


def fixed_budget_cut(batch: int, n: int, *, halting: str, budget, sinks: int, start=None) -> np.ndarray:
    """Keep ceil(budget * n_b) ("ratio") or budget ("count") tokens, clamped to [sinks + 1, n_b].
    Host arithmetic on ints: (B,) int64 NumPy."""
    cfg = ReFreeKVConfig(halting=halting, budget=budget, sinks=_positive_int(sinks, "sinks"))
    n_b = n - (np.zeros(batch, np.int64) if start is None else np.asarray(start, np.int64))
    want = np.array([math.ceil(cfg.budget * x) if halting == "ratio" else cfg.budget for x in n_b], np.int64)
    return np.minimum(np.maximum(want, sinks + 1), n_b)


def kept_positions(order: Array, cut) -> tuple[Array, Array]:
    """First cut[b] ranked positions, sorted, padded to max(cut) with n - 1.
    -> (idx (B, Hkv, J) int64, valid (B, J) bool)."""
    be = v.backend_of(order, "order")
    B, _, n = be.shape(order)
    host = np.asarray(cut if isinstance(cut, (list, tuple, np.ndarray)) else be.to_numpy(cut))
    if host.shape != (B,) or (host < 1).any() or (host > n).any():
        raise bad_input("cut", host.tolist(), f"({B},) counts in [1, {n}]")
    c = be.from_numpy(host.astype(np.int64), "int64", like=order)
    return _step(be, "kept_positions")(order, c, int(host.max()))


def evict(keys: Array, values: Array, idx: Array) -> tuple[Array, Array]:
    """K and V at the kept positions: (B, Hkv, n, d) x2 + idx (B, Hkv, J) -> (B, Hkv, J, d) x2."""
    be = v.backend_of(keys, "keys")
    B, Hkv, n, _ = v.float_array(be, keys, "keys", 4, "(B, Hkv, n, d)")
    v.float_array(be, values, "values", 4, "(B, Hkv, n, d_v)")
    if be.shape(idx)[:2] != (B, Hkv) or len(be.shape(idx)) != 3:
        raise bad_input("idx", f"shape {be.shape(idx)}", f"(B, Hkv, J) = ({B}, {Hkv}, J)")
    return _step(be, "evict")(keys, values, idx)


# ---------------------------------------------------------------------------------------------
# One layer, composed
# ---------------------------------------------------------------------------------------------

@dataclass
class LayerPlan:
    """One layer's decision. ``cut`` and ``prompt_lengths`` are host NumPy (B,); the rest are
    native arrays: a (B, H, n), order (B, Hkv, n), ratio (B, n), idx (B, Hkv, J), valid (B, J)."""

    a: Array
    order: Array
    ratio: Array
    cut: np.ndarray
    idx: Array
    valid: Array
    prompt_lengths: np.ndarray
    #: (start, sinks kept, newest kept) when one sample is ranked by position: the kept set is
    #: two runs, which ``compress_layer`` copies with two slices instead of a gather.
    runs: tuple[int, int, int] | None = None


def plan_layer(q_rows: Array, keys: Array, config: ReFreeKVConfig | None = None, *,
               values: Array | None = None, start=None, scale: float | None = None) -> LayerPlan:
    """Score, rank, measure and cut one layer (SPEC §3 steps 2-4) and list the kept positions.

    q_rows: (B, H, k, d) or (B, H, d) -- the last prompt queries, post-RoPE; at least
    ``config.rows_needed(n)`` rows (1 by default, all n for H2O). keys: (B, Hkv, n, d) post-RoPE.
    ``values`` is only checked for NaN/inf. ``start`` (B,) left-padding offsets (default 0).
    The only host transfer is one read of the cuts together with the finiteness flags.
    """
    return plan_layers([q_rows], [keys], config, values=None if values is None else [values], start=start,
                       scale=scale)[0]


def _layers_inputs(q_rows, keys, values, scale):
    """Validate several layers of one prompt: same backend, same shapes in every layer."""
    if not isinstance(keys, (list, tuple)) or not keys:
        raise bad_input("keys", f"type {type(keys).__name__}", "a non-empty list of (B, Hkv, n, d) arrays, one per layer")
    L = len(keys)
    if not isinstance(q_rows, (list, tuple)) or len(q_rows) != L:
        raise bad_input("q_rows", f"type {type(q_rows).__name__}" if not isinstance(q_rows, (list, tuple))
                        else f"{len(q_rows)} layers", f"a list of {L} query arrays, one per layer of keys")
    if values is not None and (not isinstance(values, (list, tuple)) or len(values) != L):
        raise bad_input("values", f"type {type(values).__name__}" if not isinstance(values, (list, tuple))
                        else f"{len(values)} layers", f"None or a list of {L} arrays, one per layer of keys")
    scales = list(scale) if isinstance(scale, (list, tuple)) else [scale] * L
    if len(scales) != L:
        raise bad_input("scale", f"{len(scales)} values", f"one float, or a list of {L} (one per layer)")
    be = v.backend_of(keys[0], "keys")
    qs = []
    for i in range(L):
        if v.backend_of(keys[i], "keys") is not be:
            raise bad_input("keys", f"layer {i} of another array type ({type(keys[i]).__name__})",
                            "every layer's arrays from one framework")
        q = v.q_rows_4d(be, q_rows[i])
        v.layer_inputs(be, q, keys[i], None if values is None else values[i])
        if qs and (be.shape(q) != be.shape(qs[0]) or be.shape(keys[i]) != be.shape(keys[0])):
            raise bad_input("keys", f"layer {i} with q_rows {be.shape(q)} and keys {be.shape(keys[i])}",
                            f"the shapes of layer 0, {be.shape(qs[0])} and {be.shape(keys[0])} (one prompt)")
        qs.append(q)
    vals = [None] * L if values is None else list(values)
    return be, qs, list(keys), vals, scales


def plan_layers(q_rows: list, keys: list, config: ReFreeKVConfig | None = None, *, values: list | None = None,
                start=None, scale=None) -> list[LayerPlan]:
    """``plan_layer`` for several layers of one prompt at once: lists of per-layer arrays, all of the
    same shapes (the full-attention layers of one model). ``scale``: one float or one per layer.

    Each layer's plan equals ``plan_layer`` on that layer. The steps after scoring run once for all
    layers, with one host read, so an engine that plans every layer after prefill pays the small
    per-operation costs (Python, kernel launches, the sync) once instead of once per layer.
    """
    cfg = _config(config)
    be, qs, ks, vs, scales = _layers_inputs(q_rows, keys, values, scale)
    host = v.start_host(be, start, be.shape(qs[0])[0], be.shape(ks[0])[2])
    return _plan_many(be, qs, ks, vs, cfg, host, scales)


def _plan_many(be: Backend, qs: list, keys: list, values: list, cfg: ReFreeKVConfig, host: np.ndarray,
               scales: list) -> list[LayerPlan]:
    """Plan L validated layers of one prompt, all of the same shapes.

    Scores are computed layer by layer (each layer has its own keys). Everything after them runs
    once for all layers, stacked along the batch axis as (layer, sample) rows: ranking, norm
    ratios, cuts, and the one host read of all cuts and finiteness flags. Each row is computed
    independently, so layer l's results are plan_layer's for that layer; only the number of
    small array operations (and, on a GPU, of kernel launches and syncs) drops about L-fold.
    """
    L = len(qs)
    B, H, k, _ = be.shape(qs[0])
    _, Hkv, n, _ = be.shape(keys[0])
    st = be.from_numpy(host, "int64", like=keys[0])
    st_all = st if L == 1 else be.from_numpy(np.tile(host, L), "int64", like=keys[0])
    n_b = n - host
    need = max(cfg.rows_needed(int(x)) for x in n_b)
    if k < need:
        raise bad_input("q_rows", f"{k} query rows", f"at least {need} for ranking={cfg.ranking!r}, "
                        f"query_rows={cfg.query_rows!r} and n = {n}")
    used = np.array([cfg.rows_for(int(x)) for x in n_b], np.int64)
    rows = be.from_numpy(used, "int64", like=st)
    # Only the last row counts when every sample uses one: score it alone (same a, fewer ops).
    last_only = k > 1 and (used == 1).all()
    stack = (lambda xs: xs[0]) if L == 1 else (lambda xs: be.concat(xs, axis=0))  # noqa: E731
    a = stack([_step(be, "attention_row")(q[:, :, k - 1:, ...] if last_only else q, K, st, rows, sc)
               for q, K, sc in zip(qs, keys, scales)])
    if cfg.ranking == "position":
        order = _step(be, "position_ranking")(L * B, Hkv, n, cfg.sinks, st_all)
    else:
        if cfg.ranking == "h2o":
            n_dev = be.from_numpy(n_b, "int64", like=st)
            scores = [_step(be, "h2o_scores")(q, K, st, n_dev, sc) for q, K, sc in zip(qs, keys, scales)]
        else:
            scores = [_step(be, "snapkv_scores")(q, K, st, cfg.window, cfg.pool_kernel, sc)
                      for q, K, sc in zip(qs, keys, scales)]
        order = _step(be, "attention_ranking")(stack(scores), cfg.sinks, cfg.window, st_all)
    ratio = _step(be, "norm_ratio_curve")(a, order, cfg.sinks, cfg.norm_scope, st_all)
    checked = {}
    for i, (q, K, V) in enumerate(zip(qs, keys, values)):
        tag = "" if L == 1 else f"[{i}]"  # which layer, in an error message
        checked |= {f"q_rows{tag}": q, f"keys{tag}": K} | ({} if V is None else {f"values{tag}": V})
    names, flags = v.finite_flags(be, checked)
    flags = [be.reshape(f, (1,)) for f in flags]
    host_all = np.tile(host, L)
    if cfg.halting == "threshold":
        cut_dev = _step(be, "threshold_cut")(ratio, cfg.threshold, cfg.sinks, st_all)
        packed = be.to_numpy(be.concat([be.astype(cut_dev, "int64")] + flags, axis=0))  # the one read
        cut, ok = packed[:L * B], packed[L * B:]
    else:
        ok = be.to_numpy(be.concat(flags, axis=0))
        cut = fixed_budget_cut(L * B, n, halting=cfg.halting, budget=cfg.budget, sinks=cfg.sinks, start=host_all)
        cut_dev = be.from_numpy(cut, "int64", like=st)
    v.raise_non_finite(names, ok)
    J = int(cut.max())
    if cfg.ranking == "position":
        idx, valid = _step(be, "position_kept_positions")(st_all, cut_dev, cfg.sinks, n, Hkv, J)
    else:
        idx, valid = _step(be, "kept_positions")(order, cut_dev, J)
    plans = []
    for i in range(L):
        rows_i = slice(i * B, (i + 1) * B)
        c = cut[rows_i].astype(np.int64)
        J_i = int(c.max())  # a layer's slots are padded to its own largest cut, as plan_layer does
        runs = None
        if cfg.ranking == "position" and B == 1:
            m = min(cfg.sinks, int(n_b[0]))
            runs = (int(host[0]), m, int(c[0]) - m)
        one = (lambda x, r=rows_i: x) if L == 1 else (lambda x, r=rows_i: x[r, ...])  # noqa: E731
        plans.append(LayerPlan(one(a), one(order), one(ratio), c, one(idx)[..., :J_i],
                               one(valid)[..., :J_i], n_b.astype(np.int64), runs))
    return plans


def evict_plan(keys: Array, values: Array, plan: LayerPlan) -> tuple[Array, Array]:
    """Evict what ``plan`` keeps, the fastest valid way: two slices when the kept set is two
    runs (position ranking, one sample), else one gather. (B, Hkv, J, d) x2."""
    be = v.backend_of(keys, "keys")
    if plan.runs is not None:
        return _step(be, "evict_runs")(keys, values, *plan.runs)
    return _step(be, "evict")(keys, values, plan.idx)


class CompressedLayer(NamedTuple):
    """What ``compress_layer`` returns: keys/values (B, Hkv, J, d), ``valid`` (B, J) bool saying
    which slots hold a kept token (None when nothing was evicted), and the report."""

    keys: Array
    values: Array
    valid: Array | None
    report: LayerReport


def compress_layer(q_rows: Array, keys: Array, values: Array, config: ReFreeKVConfig | None = None,
                   *, layer: int | None = None, start=None, scale: float | None = None) -> CompressedLayer:
    """Plan and evict one layer.

    Nothing is evicted (the inputs come back as they are, ``valid`` is None) for a retained
    layer (``layer`` in ``config.retained_layers``), when every sample is too short
    (n_b <= sinks + 1), or when the cut keeps every token. With a batch, J = max kept count;
    a shorter sample's extra slots hold position n - 1 and are False in ``valid``.
    """
    return compress_layers([q_rows], [keys], [values], config, layers=None if layer is None else [layer],
                           start=start, scale=scale)[0]


def compress_layers(q_rows: list, keys: list, values: list, config: ReFreeKVConfig | None = None, *,
                    layers: list[int] | None = None, start=None, scale=None) -> list[CompressedLayer]:
    """``compress_layer`` for several layers of one prompt (same shapes in every layer), planned
    together by ``plan_layers``: one host read for all of them. ``layers`` holds their indices in the
    model (for ``retained_layers`` and the reports). A layer's ``report.seconds`` is its share of
    the joint planning (split evenly) plus its own eviction.
    """
    t0 = time.perf_counter()
    cfg = _config(config)
    if values is None:
        raise bad_input("values", "None", "a list of (B, Hkv, n, d_v) arrays, one per layer")
    be, qs, ks, vs, scales = _layers_inputs(q_rows, keys, values, scale)
    if layers is not None and (not isinstance(layers, (list, tuple)) or len(layers) != len(ks)):
        raise bad_input("layers", repr(layers), f"None or {len(ks)} layer indices, one per layer")
    index = [-1] * len(ks) if layers is None else [_positive_int(i, "layers") for i in layers]
    B, _, n, _ = be.shape(ks[0])
    host = v.start_host(be, start, B, n)
    n_b = (n - host).tolist()
    out: list[CompressedLayer | None] = [None] * len(ks)

    def unchanged(i: int, reason: str, seconds: float) -> CompressedLayer:
        size = be.nbytes(ks[i]) + be.nbytes(vs[i])
        return CompressedLayer(ks[i], vs[i], None, LayerReport(index[i], False, reason, n_b, n_b, size, size, seconds))

    todo = []
    for i in range(len(ks)):
        if layers is not None and cfg.is_retained(index[i]):
            out[i] = unchanged(i, "retained layer", 0.0)
        elif max(n_b) <= cfg.sinks + 1:
            out[i] = unchanged(i, f"prompt too short (n <= sinks + 1 = {cfg.sinks + 1})", 0.0)
        else:
            todo.append(i)
    if todo:
        plans = _plan_many(be, [qs[i] for i in todo], [ks[i] for i in todo], [vs[i] for i in todo], cfg, host,
                           [scales[i] for i in todo])
        share = (time.perf_counter() - t0) / len(todo)
        for i, plan in zip(todo, plans):
            t1 = time.perf_counter()
            if (plan.cut == n).all():
                out[i] = unchanged(i, "the cut keeps every token", share)
                continue
            k2, v2 = evict_plan(ks[i], vs[i], plan)
            out[i] = CompressedLayer(k2, v2, plan.valid, LayerReport(
                index[i], True, "", n_b, plan.cut.tolist(), be.nbytes(ks[i]) + be.nbytes(vs[i]),
                be.nbytes(k2) + be.nbytes(v2), share + time.perf_counter() - t1))
    return out
