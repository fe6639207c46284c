"""ReFreeKV's steps once, fast and vectorised, against the ``Backend`` interface.

Every function takes the backend first and native arrays after; validation happens at the
public entry (``refreekv.api``) and composition in ``refreekv.planner``. Indexing stays within
the Python array API standard (every partial index ends in ``...``), so any standard-conforming
array library can be a backend. Names and semantics match ``refreekv.reference`` step by step,
but the code is independent of it: no loops over samples or heads, one batched matmul for the
scores, one cumulative sum for every prefix norm, no search. Scores are computed in float32
(float64 inputs stay float64). ``start`` is a (B,) int64 native array of left-padding offsets.

Several layers of one prompt are planned as one batch of ``L * B`` rows: every step after the
logits treats a (layer, sample) pair as one row, so the number of array operations does not
grow with the number of layers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

from .backend import Array, Backend

NEG_INF = float("-inf")


def step(be: Backend, name: str) -> Callable:
    """Step ``name`` for backend ``be``: its declared version (``Backend.steps``), else this module's.
    Steps that compose other steps call them through here, so a declared step is used everywhere."""
    own = be.steps.get(name)
    return partial(own, be) if own is not None else partial(globals()[name], be)


def compute_dtype(be: Backend, x: Array) -> str:
    """float64 stays float64; every other float dtype is scored in float32 (SPEC §2)."""
    return "float64" if be.dtype_name(x) == "float64" else "float32"


def attention_scores(be: Backend, q_rows: Array, keys: Array, scale: float | None = None) -> Array:
    """Scaled logits ``q . K^T * scale`` of k query rows: (B, H, k, d) x (B, Hkv, n, d) -> (B, H, k, n).

    GQA by group indexing: the H query heads are viewed as (Hkv, g) so that one matmul reads
    each KV head once; K is never repeated.
    """
    B, H, k, d = be.shape(q_rows)
    _, Hkv, n, _ = be.shape(keys)
    ct = compute_dtype(be, keys)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    q = be.reshape(be.astype(q_rows, ct), (B, Hkv, (H // Hkv) * k, d))
    logits = be.matmul(q, be.swap_last(be.astype(keys, ct)))
    return be.reshape(logits if scale == 1.0 else logits * scale, (B, H, k, n))  # x 1.0 is exact: skip it


def visibility(be: Backend, k: int, n: int, start: Array, rows: Array, lo: int = 0, hi: int | None = None) -> Array:
    """Which position each of query rows ``lo..hi-1`` of the last k sees: (B, 1, hi - lo, n) bool.
    Row i sits at position ``n - k + i``; sample b uses its last ``rows[b]`` rows and positions
    from ``start[b]``."""
    hi = k if hi is None else hi
    pos = be.arange(n, like=start)
    if k == 1:  # the default: the last token sees every real position (fewer small ops)
        return ((pos[None, :] >= start[:, None]) & (rows >= 1)[:, None])[:, None, None, :]
    i = be.arange(hi - lo, like=start) + lo
    qpos = i + (n - k)
    row_used = (qpos[None, :] >= start[:, None]) & (i[None, :] >= (k - rows)[:, None])  # (B, hi - lo)
    return ((pos[None, None, :] >= start[:, None, None])
            & (pos[None, None, :] <= qpos[None, :, None]) & row_used[:, :, None])[:, None, ...]


def softmax_rows(be: Backend, logits: Array, start: Array, rows: Array, k: int | None = None,
                 lo: int = 0) -> tuple[Array, Array]:
    """Causal softmax of logits (B, H, r, n) over the visible positions, max-subtracted: the r rows
    are rows ``lo..lo+r-1`` of the last ``k`` (default: all of them).
    Returns (A (B, H, r, n), visible (B, 1, r, n)); a row that sees nothing is all 0."""
    _, _, r, n = be.shape(logits)
    visible = visibility(be, r if k is None else k, n, start, rows, lo, lo + r)
    logits = be.where(visible, logits, NEG_INF)
    top = be.amax(logits, axis=-1, keepdims=True)
    top = be.where(top == NEG_INF, 0.0, top)  # an unused row has no visible key: keep it all 0
    e = be.exp(logits - top)
    total = be.sum(e, axis=-1, keepdims=True)
    return e / be.where(total > 0, total, 1.0), visible


def attention_rows(be: Backend, q_rows: Array, keys: Array, start: Array, rows: Array,
                   scale: float | None = None) -> tuple[Array, Array]:
    """Causal attention of the last k queries: (B, H, k, n), plus the visibility mask (B, 1, k, n)."""
    return softmax_rows(be, step(be, "attention_scores")(q_rows, keys, scale), start, rows)


def combine_rows(be: Backend, A: Array, visible: Array, combine: str = "mean") -> Array:
    """The score row a (B, H, n) from k attention rows (B, H, k, n).

    ``"mean"`` is the paper's Eq. 2: each column's sum divided by the number of rows that see
    it. ``"max"``: each column's largest attention over the rows. With k = 1 both are the row.
    """
    B, H, k, n = be.shape(A)
    if k == 1:
        return be.reshape(A, (B, H, n))
    if combine == "max":
        return be.amax(A, axis=2)
    count = be.sum(be.astype(visible, be.dtype_name(A)), axis=2)  # (B, 1, n)
    return be.sum(A, axis=2) / be.maximum(count, be.full((1,), 1.0, like=count))


def attention_row(be: Backend, q_rows: Array, keys: Array, start: Array, rows: Array,
                  scale: float | None = None, combine: str = "mean") -> Array:
    """ReFreeKV's score row a (B, H, n) (paper Eq. 2; k = 1: the last token's attention row)."""
    A, visible = step(be, "attention_rows")(q_rows, keys, start, rows, scale)
    return combine_rows(be, A, visible, combine)


def position_ranking(be: Backend, batch: int, num_kv_heads: int, n: int, sinks: int,
                     start: Array) -> Array:
    """Sinks, then newest to oldest, then padding: pure arithmetic, no sort. (B, Hkv, n)."""
    j = be.arange(n, like=start)[None, :]
    s = start[:, None]
    n_b = n - s
    m_b = be.minimum(n_b, be.full((1, 1), sinks, like=s))
    order = be.where(j < m_b, s + j, be.where(j < n_b, (n - 1 + m_b) - j, j - n_b))
    return be.broadcast_to(order[:, None, :], (batch, num_kv_heads, n))


def group_mean(be: Backend, x: Array, num_kv_heads: int) -> Array:
    """(B, H, n) -> (B, Hkv, n): the mean over each KV head's group of query heads."""
    B, H, n = be.shape(x)
    return be.mean(be.reshape(x, (B, num_kv_heads, H // num_kv_heads, n)), axis=2)


#: H2O scores at most this many float32 attention values at once (rows are processed in chunks).
H2O_CHUNK_VALUES = 1 << 25


def h2o_scores(be: Backend, q_rows: Array, keys: Array, start: Array, rows: Array,
               scale: float | None = None) -> Array:
    """Attention accumulated over the given queries, mean over each KV group. (B, Hkv, n).

    The k x n attention of all prompt queries is summed in chunks of rows, so memory stays
    bounded by ``H2O_CHUNK_VALUES`` whatever the prompt length (the visible mask and the
    softmax of a row do not depend on the other rows).
    """
    B, H, k, _ = be.shape(q_rows)
    _, Hkv, n, _ = be.shape(keys)
    chunk = max(1, H2O_CHUNK_VALUES // max(1, B * H * n))
    acc = None
    for lo in range(0, k, chunk):
        hi = min(k, lo + chunk)
        logits = step(be, "attention_scores")(q_rows[:, :, lo:hi, ...], keys, scale)
        A, _ = softmax_rows(be, logits, start, rows, k, lo)
        s = be.sum(A, axis=2)
        acc = s if acc is None else acc + s
    return group_mean(be, acc, Hkv)


def max_pool(be: Backend, x: Array, kernel: int) -> Array:
    """A centred max-pool of width ``kernel`` (odd) along the last axis, edges not padded in."""
    r = kernel // 2
    if not r:
        return x
    n = be.shape(x)[-1]
    edge = be.full(be.shape(x)[:-1] + (r,), NEG_INF, like=x)
    padded = be.concat([edge, x, edge], axis=-1)
    pooled = padded[..., 0:n]
    for t in range(1, 2 * r + 1):
        pooled = be.maximum(pooled, padded[..., t:t + n])
    return pooled


def zero_padding(be: Backend, scores: Array, start: Array) -> Array:
    """Scores (B, Hkv, n) with the left-padding positions set to 0."""
    pos = be.arange(be.shape(scores)[-1], like=start)
    return be.where(pos[None, None, :] >= start[:, None, None], scores, 0.0)


def snapkv_scores(be: Backend, q_rows: Array, keys: Array, start: Array, window: int,
                  pool_kernel: int, scale: float | None = None) -> Array:
    """Observation-window attention (last ``window`` queries, summed), max-pooled over positions."""
    k = be.shape(q_rows)[2]
    w = min(window, k)
    rows = be.full(be.shape(start), w, like=start)
    raw = step(be, "h2o_scores")(q_rows[:, :, k - w:, ...], keys, start, rows, scale)
    # Scores are >= 0 and padding scores 0, so pooling across the padding edge changes nothing
    # for real tokens; padding positions themselves are zeroed.
    return zero_padding(be, max_pool(be, raw, pool_kernel), start)


def window_scores(be: Backend, a: Array, num_kv_heads: int, pool_kernel: int, start: Array) -> Array:
    """The "pooled" ranking's scores: the score row a (B, H, n), averaged over each KV group and
    max-pooled over positions. (B, Hkv, n). Many rows stacked as one batch are fine."""
    return zero_padding(be, max_pool(be, group_mean(be, a, num_kv_heads), pool_kernel), start)


def attention_ranking(be: Backend, scores: Array, sinks: int, window: int, start: Array) -> Array:
    """Sinks (ascending), the last ``window`` tokens (newest first), the rest by descending score
    with ties newest first, then padding. Two stable sorts over the newest-first sequence:
    first by a within-tier key, then by tier. (B, Hkv, n)."""
    B, Hkv, n = be.shape(scores)
    t = be.arange(n, like=start)                 # index in the newest-first sequence
    p = (n - 1) - t                               # its position
    s = start[:, None]
    n_b = n - s
    m_b = be.minimum(n_b, be.full((1, 1), sinks, like=s))
    w_b = be.minimum(n_b - m_b, be.full((1, 1), window, like=s))
    pad, sink = p[None, :] < s, p[None, :] < s + m_b
    win = p[None, :] >= n - w_b
    tier = be.where(win, 1, be.full((B, n), 2, like=start))  # window 1, rest 2
    tier = be.where(pad, 3, be.where(sink, 0, tier))[:, None, :]  # sinks 0, padding 3: (B, 1, n)
    ft = compute_dtype(be, scores)
    flipped = be.flip(be.astype(scores, ft), axis=-1)
    p_f, t_f = be.astype(p, ft)[None, None, :], be.astype(t, ft)[None, None, :]
    # -score + 0.0 turns -0.0 into +0.0 so equal scores compare equal bit for bit.
    key = be.where(tier == 2, (0.0 - flipped) + 0.0, be.where(tier == 1, t_f, p_f))
    perm1 = be.argsort_stable(key, axis=-1)
    tier_b = be.broadcast_to(tier, (B, Hkv, n))
    perm2 = be.argsort_stable(be.take_along_axis(tier_b, perm1, axis=-1), axis=-1)
    return (n - 1) - be.take_along_axis(perm1, perm2, axis=-1)


def norm_ratio_curve(be: Backend, a: Array, order: Array, sinks: int, norm_scope: str,
                     start: Array, norm: str = "l2", heads: str = "mean") -> Array:
    """The halting quantity for every prefix length j at once: gather in ranked order, one
    cumulative sum, (B, n) where ``ratio[b, j-1]`` is prefix length j.

    ``norm="l2"`` (the paper): ``kept[h, j] = sqrt(sum of a[h, p]^2 over the first j ranked p)``;
    ``"l1"``: the attention mass ``sum of a[h, p]``. ``heads="mean"`` (the paper's Uni-Metric):
    ``ratio = 1 - mean_h kept[h, j] / mean_h full[h]``; ``"max"``: ``max_h (1 - kept[h, j] /
    full[h])``, so the layer's cut is that of its most demanding head (a head whose row is all 0
    counts 0); ``"each"``: ``mean_h (1 - kept[h, j] / full[h])``, every head's own ratio weighted
    equally, however concentrated its attention (a head whose row is all 0 counts 0).
    """
    B, H, n = be.shape(a)
    Hkv = be.shape(order)[1]
    g = H // Hkv
    ranked = be.take_along_axis(be.reshape(a, (B, Hkv, g, n)), order[:, :, None, :], axis=-1)
    ranked = be.reshape(ranked, (B, H, n))
    if norm_scope == "candidates":
        j = be.arange(n, like=start)
        n_b = n - start
        m_b = be.minimum(n_b, be.full((1,), sinks, like=n_b))
        ranked = be.where(j[None, None, :] < m_b[:, None, None], 0.0, ranked)  # sinks lead every ranking
    if norm == "l1":
        kept = be.cumsum(ranked, axis=-1)  # (B, H, n)
    else:
        # The ratio is unchanged by one scale factor shared by the heads it compares (all heads of a
        # sample for "mean", each head alone for "max" and "each"); dividing by that largest score keeps
        # tiny scores (< 1e-19) from squaring to 0 in float32.
        top = be.amax(ranked, axis=-1, keepdims=True)  # (B, H, 1)
        if heads == "mean":
            top = be.amax(top, axis=1, keepdims=True)  # (B, 1, 1)
        ranked = ranked / be.where(top > 0, top, 1.0)
        kept = be.sqrt(be.cumsum(ranked * ranked, axis=-1))
    full = kept[..., n - 1:]  # padding ranks last with score 0, so the last prefix is the full norm
    if heads in ("max", "each"):
        safe = be.where(full > 0, full, 1.0)
        per_head = be.where(full > 0, 1.0 - kept / safe, 0.0)
        return be.amax(per_head, axis=1) if heads == "max" else be.mean(per_head, axis=1)
    kept, full = be.mean(kept, axis=1), be.mean(full, axis=1)
    safe = be.where(full > 0, full, 1.0)
    return be.where(full > 0, 1.0 - kept / safe, 0.0)


def threshold_cut(be: Backend, ratio: Array, threshold: float, sinks: int, start: Array) -> Array:
    """The shortest prefix with ``ratio <= T`` (first index, so the rule holds even if a
    parallel cumsum is not perfectly monotone), clamped to ``[m + 1, n_b]``; ``T = 0`` keeps all
    ``n_b`` tokens. (B,) int64."""
    n = be.shape(ratio)[-1]
    n_b = n - start
    if threshold == 0:  # the full cache: in exact arithmetic no shorter prefix has ratio 0, but a
        return n_b      # float32 curve rounds to 0 once the rest holds < ~1e-7 of the squared norm
    # The whole prompt (j = n_b) always qualifies, so a curve that never reaches T keeps all.
    ok = (ratio <= threshold) | (be.arange(n, like=start)[None, :] >= (n_b - 1)[:, None])
    first = be.argmax(be.astype(ok, "int64"), axis=-1) + 1
    low = be.minimum(n_b, be.full((1,), sinks + 1, like=n_b))
    return be.minimum(be.maximum(first, low), n_b)


def mass_floor_cut(be: Backend, a: Array, order: Array, cut: Array, mass_threshold: float | None, sinks: int,
                   norm_scope: str, heads: str, start: Array) -> Array:
    """The threshold rule's ``cut`` (B,) raised, where needed, to the shortest prefix of the same
    ``order`` whose evicted attention mass (the "l1" ratio curve, same scope and heads) is <= Tm
    (``ReFreeKVConfig.mass_threshold``; None: ``cut`` as it is). (B,) int64."""
    if mass_threshold is None:
        return cut
    mass = step(be, "norm_ratio_curve")(a, order, sinks, norm_scope, start, "l1", heads)
    return be.maximum(cut, step(be, "threshold_cut")(mass, mass_threshold, sinks, start))


def decide(be: Backend, logits: Array, start: Array, rows: Array, sinks: int, norm_scope: str, norm: str,
           heads: str, combine: str, threshold: float, num_kv_heads: int,
           mass_threshold: float | None = None) -> tuple[Array, ...]:
    """Everything after the logits for the position ranking and the threshold rule (with its
    optional mass floor), as one step that a backend can fuse or compile
    (``adapters/backends/torch.py``: ``compiled_backend``).
    logits (B, H, k, n) -> (a (B, H, n), order (B, Hkv, n), ratio (B, n), cut (B,), finite (1,))."""
    A, visible = softmax_rows(be, logits, start, rows)
    a = combine_rows(be, A, visible, combine)
    B, _, n = be.shape(a)
    order = step(be, "position_ranking")(B, num_kv_heads, n, sinks, start)
    ratio = step(be, "norm_ratio_curve")(a, order, sinks, norm_scope, start, norm, heads)
    cut = step(be, "threshold_cut")(ratio, threshold, sinks, start)
    cut = step(be, "mass_floor_cut")(a, order, cut, mass_threshold, sinks, norm_scope, heads, start)
    return a, order, ratio, cut, be.all_finite(logits)


def kept_positions(be: Backend, order: Array, cut: Array, J: int) -> tuple[Array, Array]:
    """The first ``cut[b]`` ranked positions, sorted, padded to ``J = max(cut)`` with ``n - 1``.
    Returns (idx (B, Hkv, J) int64, valid (B, J) bool)."""
    n = be.shape(order)[-1]
    top = order[..., :J]
    valid = be.arange(J, like=cut)[None, :] < cut[:, None]
    sorted_top = be.sort(be.where(valid[:, None, :], top, n), axis=-1)  # invalid slots sort last
    return be.where(valid[:, None, :], sorted_top, n - 1), valid


def position_kept_positions(be: Backend, start: Array, cut: Array, sinks: int, n: int, num_kv_heads: int,
                            J: int) -> tuple[Array, Array]:
    """``kept_positions`` for the position ranking, by arithmetic (no sort): sample b keeps
    ``[s, s + m_b)`` and ``[n - (cut_b - m_b), n)``, already ascending. Same outputs."""
    j = be.arange(J, like=cut)[None, :]
    s, c = start[:, None], cut[:, None]
    m_b = be.minimum(n - s, be.full((1, 1), sinks, like=s))
    valid = j < c
    idx = be.where(valid, be.where(j < m_b, s + j, (n - c) + j), n - 1)
    B = be.shape(cut)[0]
    return be.broadcast_to(idx[:, None, :], (B, num_kv_heads, J)), valid


def evict(be: Backend, keys: Array, values: Array, idx: Array) -> tuple[Array, Array]:
    """Gather K and V at the kept positions (one gather each, no repeat over heads)."""
    B, Hkv, J = be.shape(idx)
    d_k, d_v = be.shape(keys)[-1], be.shape(values)[-1]
    gk = be.broadcast_to(idx[..., None], (B, Hkv, J, d_k))
    gv = gk if d_v == d_k else be.broadcast_to(idx[..., None], (B, Hkv, J, d_v))
    return be.take_along_axis(keys, gk, axis=2), be.take_along_axis(values, gv, axis=2)


def evict_runs(be: Backend, keys: Array, values: Array, start: int, sinks: int, recent: int) -> tuple[Array, Array]:
    """Position ranking, one sample: the kept set is two runs (the sinks and the newest
    ``recent`` tokens), so eviction is two slices and a concatenation, a plain copy."""
    n = be.shape(keys)[2]

    def runs(x):
        return be.concat([x[:, :, start:start + sinks, ...], x[:, :, n - recent:, ...]], axis=2)

    return runs(keys), runs(values)


# -- the evicted tail at low precision (refreekv.reference.tail_positions / quantize / dequantize) --

def tail_positions(be: Backend, order: Array, cut: Array, n_b: Array, T: int) -> tuple[Array, Array]:
    """The ranked positions ``cut[b] .. n_b[b] - 1`` (what the rule evicts), sorted, padded to ``T`` with
    ``n - 1``. order (B, Hkv, n), cut and n_b (B,) int64 -> (idx (B, Hkv, T) int64, valid (B, T) bool)."""
    B, Hkv, n = be.shape(order)
    rank = cut[:, None] + be.arange(T, like=cut)[None, :]                      # (B, T)
    valid = rank < n_b[:, None]
    rank = be.where(valid, rank, 0)
    picked = be.take_along_axis(order, be.broadcast_to(rank[:, None, :], (B, Hkv, T)), axis=-1)
    ordered = be.sort(be.where(valid[:, None, :], picked, n), axis=-1)         # padding sorts last
    return be.where(valid[:, None, :], ordered, n - 1), valid


def quantize(be: Backend, x: Array, bits: int, group: int) -> tuple[Array, Array, Array]:
    """Affine quantization per ``group`` values along the last axis: scale ``s = (hi - lo) / (2^bits - 1)``,
    bias ``lo``, codes ``round((x - lo) / s)`` clipped to ``[0, 2^bits - 1]`` (0 where ``s = 0``), packed two
    per byte at 4 bits (even position in the low nibble). Computed in float32 (float64 stays float64).
    x (..., d) -> (codes (..., d * bits / 8) uint8, scales (..., d / group), biases (..., d / group))."""
    shape = tuple(be.shape(x))
    lead, d = shape[:-1], shape[-1]
    g = be.reshape(be.astype(x, compute_dtype(be, x)), (*lead, d // group, group))
    hi = be.amax(g, axis=-1, keepdims=True)
    lo = -be.amax(-g, axis=-1, keepdims=True)
    top = 2 ** bits - 1
    s = (hi - lo) / top
    spread = s > 0
    q = be.round((g - lo) / be.where(spread, s, 1.0))
    q = be.where(spread, be.where(q > top, top, be.where(q < 0, 0, q)), 0)
    codes = be.astype(be.reshape(q, shape), "uint8")
    if bits == 4:
        codes = codes[..., 0::2] + codes[..., 1::2] * 16
    return codes, be.reshape(s, (*lead, d // group)), be.reshape(lo, (*lead, d // group))


def dequantize(be: Backend, codes: Array, scales: Array, biases: Array, bits: int, group: int,
               dtype: str) -> Array:
    """``q s + lo`` per group, for ``quantize``'s outputs, as ``dtype``. -> (..., d)."""
    shape = tuple(be.shape(codes))
    lead = shape[:-1]
    if bits == 4:
        low, high = codes % 16, codes // 16
        codes = be.reshape(be.concat([low[..., None], high[..., None]], axis=-1), (*lead, 2 * shape[-1]))
    d = be.shape(codes)[-1]
    work = be.dtype_name(scales)
    g = be.reshape(be.astype(codes, work), (*lead, d // group, group))
    x = g * scales[..., None] + biases[..., None]
    return be.astype(be.reshape(x, (*lead, d)), dtype)
