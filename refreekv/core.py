"""ReFreeKV once, fast and vectorised, against the ``Backend`` interface.

Every function takes the backend first and native arrays after; validation happens in
``refreekv.api``. Indexing stays within the Python array API standard (every partial index
ends in ``...``), so any standard-conforming array library can be a backend. The names and semantics match ``refreekv.reference`` step by step, but the
code is independent of it: no loops over samples or heads, one batched matmul for the scores,
one cumulative sum for every prefix norm, no search. Scores are computed in float32 (float64
inputs stay float64). ``start`` is a (B,) int64 native array of left-padding offsets.
"""

from __future__ import annotations

import math

from .backend import Array, Backend

NEG_INF = float("-inf")


def compute_dtype(be: Backend, x: Array) -> str:
    """float64 stays float64; every other float dtype is scored in float32 (SPEC §2)."""
    return "float64" if be.dtype_name(x) == "float64" else "float32"


def attention_rows(be: Backend, q_rows: Array, keys: Array, start: Array, rows: Array,
                   scale: float | None = None) -> tuple[Array, Array]:
    """Causal attention of the last k queries: (B, H, k, n), plus the visibility mask (B, 1, k, n).

    GQA by group indexing: the H query heads are viewed as (Hkv, g) so that one matmul reads
    each KV head once; K is never repeated.
    """
    B, H, k, d = be.shape(q_rows)
    _, Hkv, n, _ = be.shape(keys)
    g = H // Hkv
    ct = compute_dtype(be, keys)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    q = be.reshape(be.astype(q_rows, ct), (B, Hkv, g * k, d))
    logits = be.matmul(q, be.swap_last(be.astype(keys, ct))) * scale
    logits = be.reshape(logits, (B, H, k, n))
    pos = be.arange(n, like=start)
    if k == 1:  # the default: the last token sees every real position (fewer small ops)
        visible = ((pos[None, :] >= start[:, None]) & (rows >= 1)[:, None])[:, None, None, :]
    else:
        i = be.arange(k, like=start)
        qpos = i + (n - k)
        row_used = (qpos[None, :] >= start[:, None]) & (i[None, :] >= (k - rows)[:, None])  # (B, k)
        visible = ((pos[None, None, :] >= start[:, None, None])
                   & (pos[None, None, :] <= qpos[None, :, None]) & row_used[:, :, None])[:, None, ...]
    logits = be.where(visible, logits, NEG_INF)
    top = be.amax(logits, axis=-1, keepdims=True)
    top = be.where(top == NEG_INF, 0.0, top)  # an unused row has no visible key: keep it all 0
    e = be.exp(logits - top)
    total = be.sum(e, axis=-1, keepdims=True)
    return e / be.where(total > 0, total, 1.0), visible


def attention_row(be: Backend, q_rows: Array, keys: Array, start: Array, rows: Array,
                  scale: float | None = None) -> Array:
    """ReFreeKV's score row a (B, H, n): paper Eq. 2, the k rows' sum over each column divided
    by the number of rows that see that column (k = 1: the last token's attention row)."""
    A, visible = attention_rows(be, q_rows, keys, start, rows, scale)
    B, H, k, n = be.shape(A)
    if k == 1:  # one row: each visible column is seen once, so a is that row
        return be.reshape(A, (B, H, n))
    count = be.sum(be.astype(visible, be.dtype_name(A)), axis=2)  # (B, 1, n)
    return be.sum(A, axis=2) / be.maximum(count, be.full((1,), 1.0, like=count))


def position_ranking(be: Backend, batch: int, num_kv_heads: int, n: int, sinks: int,
                     start: Array) -> Array:
    """Sinks, then newest to oldest, then padding: pure arithmetic, no sort. (B, Hkv, n)."""
    j = be.arange(n, like=start)[None, :]
    s = start[:, None]
    n_b = n - s
    m_b = be.minimum(n_b, be.full((1, 1), sinks, like=s))
    order = be.where(j < m_b, s + j, be.where(j < n_b, (n - 1 + m_b) - j, j - n_b))
    return be.broadcast_to(order[:, None, :], (batch, num_kv_heads, n))


def h2o_scores(be: Backend, q_rows: Array, keys: Array, start: Array, rows: Array,
               scale: float | None = None) -> Array:
    """Attention accumulated over the given queries, mean over each KV group. (B, Hkv, n)."""
    A, _ = attention_rows(be, q_rows, keys, start, rows, scale)
    B, H, _, n = be.shape(A)
    Hkv = be.shape(keys)[1]
    return be.mean(be.reshape(be.sum(A, axis=2), (B, Hkv, H // Hkv, n)), axis=2)


def snapkv_scores(be: Backend, q_rows: Array, keys: Array, start: Array, window: int,
                  pool_kernel: int, scale: float | None = None) -> Array:
    """Observation-window attention (last ``window`` queries), max-pooled over positions."""
    k = be.shape(q_rows)[2]
    w = min(window, k)
    rows = be.full(be.shape(start), w, like=start)
    raw = h2o_scores(be, q_rows[:, :, k - w:, ...], keys, start, rows, scale)
    r = pool_kernel // 2
    n = be.shape(raw)[-1]
    if r:
        edge = be.full(be.shape(raw)[:2] + (r,), NEG_INF, like=raw)
        padded = be.concat([edge, raw, edge], axis=-1)
        pooled = padded[..., 0:n]
        for t in range(1, 2 * r + 1):
            pooled = be.maximum(pooled, padded[..., t:t + n])
        raw = pooled
    # Scores are >= 0 and padding scores 0, so pooling across the padding edge changes nothing
    # for real tokens; padding positions themselves are zeroed.
    pos = be.arange(n, like=start)
    return be.where(pos[None, None, :] >= start[:, None, None], raw, 0.0)


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
                     start: Array) -> Array:
    """``ratio[b, j-1] = 1 - mean_h ||a[h, first j ranked]|| / mean_h ||a[h, all]||`` for every j
    at once: gather in ranked order, square, one cumulative sum, sqrt. (B, n)."""
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
    # The ratio is unchanged by one scale factor shared by all heads of a sample; dividing by the
    # sample's largest score keeps tiny scores (< 1e-19) from squaring to 0 in float32.
    top = be.amax(be.amax(ranked, axis=-1, keepdims=True), axis=1, keepdims=True)  # (B, 1, 1)
    ranked = ranked / be.where(top > 0, top, 1.0)
    kept = be.mean(be.sqrt(be.cumsum(ranked * ranked, axis=-1)), axis=1)  # (B, n)
    full = kept[:, n - 1:]  # padding ranks last with score 0, so the last prefix is the full norm
    safe = be.where(full > 0, full, 1.0)
    return be.where(full > 0, 1.0 - kept / safe, 0.0)


def threshold_cut(be: Backend, ratio: Array, threshold: float, sinks: int, start: Array) -> Array:
    """The shortest prefix with ``ratio <= T`` (first index, so the rule holds even if a
    parallel cumsum is not perfectly monotone), clamped to ``[m + 1, n_b]``. (B,) int64."""
    n = be.shape(ratio)[-1]
    n_b = n - start
    # The whole prompt (j = n_b) always qualifies, so a curve that never reaches T keeps all.
    ok = (ratio <= threshold) | (be.arange(n, like=start)[None, :] >= (n_b - 1)[:, None])
    first = be.argmax(be.astype(ok, "int64"), axis=-1) + 1
    low = be.minimum(n_b, be.full((1,), sinks + 1, like=n_b))
    return be.minimum(be.maximum(first, low), n_b)


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
