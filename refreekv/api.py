"""Public functions: validate every argument once at the entry, then run a core step or hand a
validated request to the planner.

The step functions mirror ``refreekv.reference`` one for one (same names, same semantics, same
shapes), so every step can be compared with the specification. ``plan_layers`` and
``compress_layers`` (and their one-layer cases) are what an engine calls.
"""

from __future__ import annotations

import numpy as np

from . import planner
from . import validate as v
from .backend import FLOAT_DTYPES, Array, Backend, find_backend
from .config import ReFreeKVConfig, _int
from .errors import bad_input
from .planner import CompressedLayer, LayerPlan, step
from .quantized import TAIL_BITS, Quantized, QuantizedTail, quant_group
from .rules import COMBINES, NORM_SCOPES, NORMS, HEADS

__all__ = ["CompressedLayer", "LayerPlan", "Quantized", "QuantizedTail", "attention_ranking", "attention_row", "attention_rows", "compress_layer",
           "compress_layers", "evict", "evict_plan", "fixed_budget_cut", "h2o_scores", "kept_positions",
           "norm_ratio_curve", "plan_layer", "plan_layers", "position_ranking", "snapkv_scores", "threshold_cut",
           "dequantize", "quantize", "quantize_tail", "tail_positions"]


#: How far below 0 a ratio curve may round (kept / full can exceed 1 by a few ulps).
RATIO_ROUNDING = 1e-3


def _guarded(be: Backend, out: Array, argument: str) -> Array:
    """A step's output, checked for NaN/inf (one host read): a non-finite input or an overflow
    raises instead of flowing on."""
    if not be.to_numpy(be.all_finite(out)).all():
        raise bad_input(argument, "inputs whose scores are NaN or infinite (non-finite values, or logits that "
                        "overflow)", "finite values whose scaled dot products are finite")
    return out


def _option(name: str, value: object, table: dict) -> str:
    if not isinstance(value, str) or value not in table:
        raise bad_input(name, repr(value), " or ".join(f'"{k}"' for k in table))
    return value


def _scored(q_rows, keys, start, rows, scale):
    """The shared entry of the scoring steps."""
    be = v.backend_of(keys, "keys")
    q = v.layer_inputs(be, q_rows, keys)
    B, _, k, _ = be.shape(q)
    host = v.start_host(be, start, B, be.shape(keys)[2])
    st = be.from_numpy(host, "int64", like=keys)
    if rows is None:
        used = np.full(B, k, np.int64)
    else:
        used = v.host_ints(be, rows, "rows", B)
        if (used < 1).any() or (used > k).any():
            raise bad_input("rows", used.tolist(), f"per-sample row counts in [1, {k}] (the rows given)")
    return be, q, st, be.from_numpy(used, "int64", like=keys), v.scale_value(scale)


def attention_rows(q_rows: Array, keys: Array, *, start=None, scale: float | None = None, rows=None) -> Array:
    """Causal attention of the last k prompt queries. q_rows (B, H, k, d) or (B, H, d),
    keys (B, Hkv, n, d) -> (B, H, k, n) float32 (float64 for float64 input). ``rows`` (B,):
    how many of the last rows each sample uses (default all k)."""
    be, q, st, r, sc = _scored(q_rows, keys, start, rows, scale)
    return _guarded(be, step(be, "attention_rows")(q, keys, st, r, sc)[0], "keys")


def attention_row(q_rows: Array, keys: Array, *, start=None, scale: float | None = None, rows=None,
                  combine: str = "mean") -> Array:
    """ReFreeKV's score row a (paper Eq. 2; k = 1: the last token's attention). -> (B, H, n)."""
    be, q, st, r, sc = _scored(q_rows, keys, start, rows, scale)
    return _guarded(be, step(be, "attention_row")(q, keys, st, r, sc, _option("combine", combine, COMBINES)), "keys")


def position_ranking(keys: Array, *, sinks: int, start=None) -> Array:
    """Sinks, then newest to oldest (SPEC §3.2), for keys (B, Hkv, n, d) -> (B, Hkv, n) int64."""
    be = v.backend_of(keys, "keys")
    B, Hkv, n, _ = v.float_array(be, keys, "keys", 4, "(B, Hkv, n, d)")
    st = be.from_numpy(v.start_host(be, start, B, n), "int64", like=keys)
    return step(be, "position_ranking")(B, Hkv, n, v.integer(sinks, "sinks"), st)


def h2o_scores(q_rows: Array, keys: Array, *, start=None, scale: float | None = None) -> Array:
    """H2O: attention accumulated over the given queries, mean per KV group. -> (B, Hkv, n)."""
    be, q, st, r, sc = _scored(q_rows, keys, start, None, scale)
    return _guarded(be, step(be, "h2o_scores")(q, keys, st, r, sc), "keys")


def snapkv_scores(q_rows: Array, keys: Array, *, window: int, pool_kernel: int, start=None,
                  scale: float | None = None) -> Array:
    """SnapKV: last ``window`` queries' attention, max-pooled over ``pool_kernel``. -> (B, Hkv, n)."""
    cfg = ReFreeKVConfig(window=window, pool_kernel=pool_kernel)  # validates both
    be, q, st, _, sc = _scored(q_rows, keys, start, None, scale)
    return _guarded(be, step(be, "snapkv_scores")(q, keys, st, cfg.window, cfg.pool_kernel, sc), "keys")


def attention_ranking(scores: Array, *, sinks: int, window: int, start=None) -> Array:
    """Sinks, the last ``window`` tokens, then descending score (ties newest first). (B, Hkv, n)."""
    be = v.backend_of(scores, "scores")
    B, _, n = v.float_array(be, scores, "scores", 3, "(B, Hkv, n)")
    sinks, window = v.integer(sinks, "sinks"), v.integer(window, "window")
    _guarded(be, scores, "scores")
    st = be.from_numpy(v.start_host(be, start, B, n), "int64", like=scores)
    return step(be, "attention_ranking")(scores, sinks, window, st)


def norm_ratio_curve(a: Array, order: Array, *, sinks: int, norm_scope: str = "candidates", start=None,
                     norm: str = "l2", heads: str = "mean") -> Array:
    """The halting quantity for every prefix: a (B, H, n), order (B, Hkv, n) -> (B, n)."""
    be = v.backend_of(a, "a")
    B, H, n = v.float_array(be, a, "a", 3, "(B, H, n)")
    v.same_backend(be, order, "order", "a")
    v.same_device(be, a, "a", order, "order")
    sinks = v.integer(sinks, "sinks")
    options = (_option("norm_scope", norm_scope, NORM_SCOPES), _option("norm", norm, NORMS), _option("heads", heads, HEADS))
    host = v.start_host(be, start, B, n)
    v.ranking_order(be, order, "order", B, n, H, host, sinks)
    _guarded(be, a, "a")
    if (np.asarray(be.to_numpy(a)) < 0).any():
        raise bad_input("a", "negative scores", "attention scores >= 0 (a score row from attention_row, or "
                        "scores like h2o_scores / snapkv_scores)")
    st = be.from_numpy(host, "int64", like=a)
    return step(be, "norm_ratio_curve")(a, be.astype(order, "int64"), sinks, options[0], st, options[1], options[2])


def threshold_cut(ratio: Array, *, threshold: float, sinks: int, start=None) -> Array:
    """The shortest prefix with ratio <= T, clamped to [sinks + 1, n_b]. -> (B,) int64."""
    be = v.backend_of(ratio, "ratio")
    B, n = v.float_array(be, ratio, "ratio", 2, "(B, n)")
    cfg = ReFreeKVConfig(threshold=threshold, sinks=v.integer(sinks, "sinks"))
    _guarded(be, ratio, "ratio")
    r = be.to_numpy(ratio)
    if (r > 1).any() or (r < -RATIO_ROUNDING).any():
        raise bad_input("ratio", f"values from {float(r.min()):.6g} to {float(r.max()):.6g}",
                        f"a ratio curve in [0, 1] (norm_ratio_curve's output; down to -{RATIO_ROUNDING:g} "
                        "for rounding)")
    st = be.from_numpy(v.start_host(be, start, B, n), "int64", like=ratio)
    return step(be, "threshold_cut")(ratio, cfg.threshold, cfg.sinks, st)


def fixed_budget_cut(batch: int, n: int, *, halting: str, budget, sinks: int, start=None) -> np.ndarray:
    """Keep ceil(budget * n_b) ("ratio") or budget ("count") tokens, clamped to [sinks + 1, n_b].
    Host arithmetic on ints: (B,) int64 NumPy."""
    batch, n = v.integer(batch, "batch", 1), v.integer(n, "n", 1)
    cfg = ReFreeKVConfig(halting=halting, budget=budget, sinks=v.integer(sinks, "sinks"))
    if cfg.halting == "threshold":
        raise bad_input("halting", repr(halting), '"ratio" or "count" (a fixed budget)')
    host = v.start_host(v.backend_of(np.zeros(1), "start"), start, batch, n)
    return planner.fixed_budget_cut(host, n, cfg.halting, cfg.budget, cfg.sinks)


def kept_positions(order: Array, cut) -> tuple[Array, Array]:
    """First cut[b] ranked positions, sorted, padded to max(cut) with n - 1.
    -> (idx (B, Hkv, J) int64, valid (B, J) bool)."""
    be = v.backend_of(order, "order")
    o = be.shape(order)
    if len(o) != 3 or 0 in o or be.dtype_name(order) not in ("int64", "int32"):
        raise bad_input("order", f"shape {o} dtype {be.dtype_name(order)}", "(B, Hkv, n) int64 positions")
    B, _, n = o
    v.ranking_order(be, order, "order", B, n)
    host = v.host_ints(be, cut, "cut", B)
    if (host < 1).any() or (host > n).any():
        raise bad_input("cut", host.tolist(), f"({B},) counts in [1, {n}]")
    c = be.from_numpy(host, "int64", like=order)
    return step(be, "kept_positions")(be.astype(order, "int64"), c, int(host.max()))


def evict(keys: Array, values: Array, idx: Array) -> tuple[Array, Array]:
    """K and V at the kept positions: (B, Hkv, n, d) x2 + idx (B, Hkv, J) -> (B, Hkv, J, d) x2."""
    be = v.backend_of(keys, "keys")
    B, Hkv, n, _ = v.float_array(be, keys, "keys", 4, "(B, Hkv, n, d)")
    v.same_backend(be, values, "values")
    v.same_device(be, keys, "keys", values, "values")
    Bv, Hv, nv, _ = v.float_array(be, values, "values", 4, "(B, Hkv, n, d_v)")
    if (Bv, Hv, nv) != (B, Hkv, n):
        raise bad_input("values", f"shape {be.shape(values)}", f"(B, Hkv, n) = {(B, Hkv, n)} like keys")
    v.same_backend(be, idx, "idx")
    v.same_device(be, keys, "keys", idx, "idx")
    shape = be.shape(idx)
    if len(shape) != 3 or shape[:2] != (B, Hkv) or be.dtype_name(idx) not in ("int64", "int32"):
        raise bad_input("idx", f"shape {shape} dtype {be.dtype_name(idx)}", f"(B, Hkv, J) = ({B}, {Hkv}, J) int64")
    host = be.to_numpy(idx)
    if host.size and (host.min() < 0 or host.max() >= n):
        raise bad_input("idx", f"positions from {host.min()} to {host.max()}", f"positions in [0, {n - 1}]")
    return step(be, "evict")(keys, values, be.astype(idx, "int64"))


# ---------------------------------------------------------------------------------------------
# Composed: what engines call
# ---------------------------------------------------------------------------------------------

def plan_layer(q_rows: Array, keys: Array, config: ReFreeKVConfig | None = None, *,
               values: Array | None = None, start=None, scale: float | None = None, keep_newest=None) -> LayerPlan:
    """Score, rank, measure and cut one layer (SPEC §3 steps 2-4) and list the kept positions.

    q_rows: (B, H, k, d) or (B, H, d) -- the newest prompt queries, post-RoPE; at least
    ``config.rows_needed(n)`` rows (1 by default for the paper's configuration). keys:
    (B, Hkv, n, d) post-RoPE. ``values`` (B, Hkv, n, d_v) is only checked for its framework and
    shape. ``start`` (B,) left-padding offsets (default 0). ``keep_newest``: None, or an int or
    (B,) ints: that many newest tokens of each sample are kept whatever the rule says (the cut is
    at least ``sinks + keep_newest``, at most n_b; the chat turn being answered with
    ``replan="history"``); a ranking that keeps the newest first ("position") only. One host read.
    """
    return plan_layers([q_rows], [keys], config, values=None if values is None else [values],
                       start=start, scale=scale, keep_newest=keep_newest)[0]


def plan_layers(q_rows: list, keys: list, config: ReFreeKVConfig | None = None, *, values: list | None = None,
                start=None, scale=None, keep_newest=None) -> list[LayerPlan]:
    """``plan_layer`` for several layers of one prompt at once: lists of per-layer arrays, all of the
    same shapes (the full-attention layers of one model). ``scale``: one number or one per layer.

    Each layer's plan equals ``plan_layer`` on that layer. The layers are planned as one batch
    (``refreekv.planner``): a few array operations per layer and one host read in all.
    """
    return planner.plan(v.request(q_rows, keys, values, config, start=start, scale=scale, keep_newest=keep_newest))


def _plan_inputs(keys: Array, values: Array, plan: LayerPlan) -> tuple[Backend, tuple, tuple]:
    """``plan`` is a LayerPlan made for (B, Hkv, n) keys and values like these, of their backend and
    device. Returns the backend and the shapes of keys and values."""
    if not isinstance(plan, LayerPlan):
        raise bad_input("plan", f"type {type(plan).__name__}", "a refreekv.LayerPlan from plan_layer(s)")
    be = v.backend_of(keys, "keys")
    shape = v.float_array(be, keys, "keys", 4, "(B, Hkv, n, d)")
    v.same_backend(be, values, "values")
    v.same_device(be, keys, "keys", values, "values")
    vshape = v.float_array(be, values, "values", 4, "(B, Hkv, n, d_v)")
    if find_backend(plan.order) is not be or len(be.shape(plan.order)) != 3:
        raise bad_input("plan", f"order of type {type(plan.order).__name__}",
                        f"a LayerPlan whose order is a (B, Hkv, n) {be.name} array, as plan_layer made it")
    v.same_device(be, keys, "keys", plan.order, "plan")
    want = tuple(be.shape(plan.order))
    planner.check_plan_fields(plan, be, *want)
    if shape[:3] != want or vshape[:3] != want:
        raise bad_input("keys", f"shape {shape} (values {vshape})", f"(B, Hkv, n) = {want}, the shapes the plan was made for")
    return be, shape, vshape


def evict_plan(keys: Array, values: Array, plan: LayerPlan) -> tuple[Array, Array]:
    """Evict what ``plan`` keeps, the fastest valid way: two slices when the kept set is the sinks
    plus the newest run of one sample, else one gather. (B, Hkv, J, d) x2."""
    be, _, _ = _plan_inputs(keys, values, plan)
    return planner.evict(plan, keys, values, be)


def compress_layer(q_rows: Array, keys: Array, values: Array, config: ReFreeKVConfig | None = None,
                   *, layer: int | None = None, start=None, scale: float | None = None,
                   keep_newest=None) -> CompressedLayer:
    """Plan and evict one layer.

    Nothing is evicted (the inputs come back as they are, ``valid`` is None) for a retained
    layer (``layer`` in ``config.retained_layers``), when every sample is too short
    (n_b <= sinks + 1), or when the cut keeps every token. With a batch, J = max kept count;
    a shorter sample's extra slots hold position n - 1 and are False in ``valid``. ``keep_newest``
    as in ``plan_layer``.
    """
    if values is None:
        raise bad_input("values", "None", "a (B, Hkv, n, d_v) array like keys")
    req = v.request([q_rows], [keys], [values], config, start=start, scale=scale,
                    layers=None if layer is None else [layer], need_values=True, layers_name="layer",
                    keep_newest=keep_newest)
    return planner.compress(req)[0]


def compress_layers(q_rows: list, keys: list, values: list, config: ReFreeKVConfig | None = None, *,
                    layers: list[int] | None = None, start=None, scale=None,
                    reuse: list[LayerPlan] | None = None, keep_newest=None) -> list[CompressedLayer]:
    """``compress_layer`` for several layers of one prompt (same shapes in every layer), planned
    together by the planner: one host read for all of them. ``layers`` holds their indices in the
    model (for ``retained_layers`` and the reports). A layer's ``report.seconds`` is its share of
    the joint planning (split evenly) plus its own eviction.

    ``reuse``: plans of the same layers from ``plan_layers`` under the same ranking settings
    (``refreekv.planner.ORDER_FIELDS``): their orders are reused, so sweeping fixed budgets or
    thresholds over one prompt scores it once. The result equals planning from scratch.
    ``keep_newest`` as in ``plan_layer`` (the same for every layer).
    """
    req = v.request(q_rows, keys, values, config, start=start, scale=scale, layers=layers, need_values=True,
                    keep_newest=keep_newest)
    return planner.compress(req, planner.check_reuse(req, reuse))


# ---------------------------------------------------------------------------------------------
# The tail: what the rule evicts, kept at low precision (refreekv.quantized)
# ---------------------------------------------------------------------------------------------

def _bits(bits: object) -> int:
    if not _int(bits) or int(bits) not in TAIL_BITS:
        raise bad_input("bits", repr(bits), " or ".join(str(b) for b in TAIL_BITS) + " (bits per stored code)")
    return int(bits)


def _finite(be: Backend, x: Array, argument: str) -> None:
    if not int(be.to_numpy(be.all_finite(x))[0]):
        raise bad_input(argument, "values with NaN or infinity", "finite values (a scale computed from them "
                        "would be NaN and every code of the group wrong)")


def tail_positions(order: Array, cut, *, start=None) -> tuple[Array, Array]:
    """What the rule evicts: the ranked positions ``cut[b] .. n_b - 1`` of each sample, ascending,
    padded to T = max(n_b - cut) (at least 1) with n - 1.
    order (B, Hkv, n), cut (B,) -> (idx (B, Hkv, T) int64, valid (B, T) bool)."""
    be = v.backend_of(order, "order")
    o = be.shape(order)
    if len(o) != 3 or 0 in o or be.dtype_name(order) not in ("int64", "int32"):
        raise bad_input("order", f"shape {o} dtype {be.dtype_name(order)}", "(B, Hkv, n) int64 positions")
    B, _, n = o
    st = v.start_host(be, start, B, n)
    v.ranking_order(be, order, "order", B, n)
    host = v.host_ints(be, cut, "cut", B)
    n_b = n - st
    if (host < 1).any() or (host > n_b).any():
        raise bad_input("cut", host.tolist(), f"({B},) counts in [1, n_b] = [1, {n_b.tolist()}]")
    T = max(1, int((n_b - host).max()))
    return step(be, "tail_positions")(be.astype(order, "int64"), be.from_numpy(host, "int64", like=order),
                                      be.from_numpy(n_b, "int64", like=order), T)


def quantize(x: Array, *, bits: int, group: int | None = None) -> Quantized:
    """Affine quantization of ``x`` (..., d) per ``group`` values along the last axis (default
    ``quant_group(d)``): codes at ``bits`` (8 or 4) bits, a scale and a bias per group (the math:
    ``refreekv.reference.quantize``; dequantized values are within half a scale of ``x``)."""
    be = v.backend_of(x, "x")
    shape = be.shape(x)
    if len(shape) < 1:
        raise bad_input("x", f"shape {shape}", "an array (..., d) with at least one axis")
    v.float_array(be, x, "x", len(shape), "(..., d)")
    b, d = _bits(bits), shape[-1]
    g = quant_group(d) if group is None else group
    if not _int(g) or g < 1 or d % g:
        raise bad_input("group", repr(group), f"None or an int >= 1 that divides d = {d}")
    if b == 4 and (d % 2 or g % 2):
        raise bad_input("x", f"shape {shape} with group {g}", "an even d and group at 4 bits (two codes per byte)")
    _finite(be, x, "x")
    codes, scales, biases = step(be, "quantize")(x, b, int(g))
    return Quantized(codes, scales, biases, b, int(g), be.dtype_name(x))


def dequantize(q: Quantized) -> Array:
    """The array ``q`` stands for, as ``q.dtype``: ``code * scale + bias`` per group. (..., d)."""
    if not isinstance(q, Quantized):
        raise bad_input("q", f"type {type(q).__name__}", "a refreekv.Quantized from refreekv.quantize")
    be = v.backend_of(q.codes, "q.codes")
    for name in ("scales", "biases"):
        v.same_backend(be, getattr(q, name), f"q.{name}", "q.codes")
    b = _bits(q.bits)
    cs, ss, bs = be.shape(q.codes), be.shape(q.scales), be.shape(q.biases)
    d = cs[-1] * 8 // b if cs else 0
    ok = (be.dtype_name(q.codes) == "uint8" and len(cs) >= 1 and _int(q.group) and q.group >= 1 and d % q.group == 0
          and ss == bs == (*cs[:-1], d // q.group) and be.dtype_name(q.scales) == be.dtype_name(q.biases)
          and be.dtype_name(q.scales) in ("float32", "float64") and q.dtype in FLOAT_DTYPES)
    if not ok:
        raise bad_input("q", f"codes {cs} {be.dtype_name(q.codes)}, scales {ss}, biases {bs}, bits {q.bits}, "
                        f"group {q.group!r}, dtype {q.dtype!r}", "a Quantized as refreekv.quantize made it (edit no field)")
    return step(be, "dequantize")(q.codes, q.scales, q.biases, b, q.group, q.dtype)


def quantize_tail(keys: Array, values: Array, plan: LayerPlan, *, bits: int) -> QuantizedTail:
    """What ``plan`` evicts from ``keys``/``values`` (B, Hkv, n, d), kept at ``bits`` bits instead of
    dropped: ``tail_positions`` of the plan's order and cut, gathered and ``quantize``-d. Stored beside
    ``evict_plan``'s kept slots, the two hold every position of the prompt."""
    be, shape, vshape = _plan_inputs(keys, values, plan)
    b = _bits(bits)
    for name, s in (("keys", shape), ("values", vshape)):
        if b == 4 and (s[-1] % 2):
            raise bad_input(name, f"shape {s}", "an even head dimension at 4 bits (two codes per byte)")
    _finite(be, keys, "keys")
    _finite(be, values, "values")
    return planner.quantized_tails([plan], [keys], [values], be, b)[0]
