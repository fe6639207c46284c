"""ReFreeKV as a readable float64 specification: one function per step of the paper.

This module is the spec as code. It shares no code with ``refreekv`` (the fast core): a bug in
shared code would pass every comparison. Everything is float64 NumPy with explicit loops over
batch samples and heads; speed is irrelevant here, clarity is the point.

Shapes: ``B`` batch, ``H`` query heads, ``Hkv`` KV heads (``g = H / Hkv``; query head ``h``
reads KV head ``h // g``), ``k`` query rows, ``n`` prompt length, ``d`` head dim.
``start[b]`` is the number of left-padding positions of sample ``b``: its prompt occupies
positions ``start[b] .. n-1`` and has ``n_b = n - start[b]`` tokens. A padded sample is computed
exactly as if it were alone (its own prompt, then mapped back to batch positions).
"""

from __future__ import annotations

import math

import numpy as np


def _q4(q_rows) -> np.ndarray:
    """Query rows as (B, H, k, d); (B, H, d) means the last token alone (k = 1)."""
    q = np.asarray(q_rows, dtype=np.float64)
    return q[:, :, None, :] if q.ndim == 3 else q


def _starts(start, batch: int) -> list[int]:
    return [0] * batch if start is None else [int(s) for s in np.asarray(start).reshape(-1)]


def attention_rows(q_rows, keys, *, start=None, scale=None, rows=None) -> np.ndarray:
    """Causal attention of the last ``k`` prompt queries (SPEC §2).

    ``A[b, h, i, p] = softmax_p(q[b, h, i] . K[b, h // g, p] / sqrt(d))`` over the positions
    the query at position ``n - k + i`` can see (``start[b] <= p <= n - k + i``); 0 elsewhere.
    Sample ``b`` uses only its last ``rows[b]`` rows (default: all ``k``); unused rows and rows
    whose query lies in the padding are all 0.

    q_rows: (B, H, k, d); keys: (B, Hkv, n, d) -> (B, H, k, n) float64.
    """
    q = _q4(q_rows)
    K = np.asarray(keys, dtype=np.float64)
    B, H, k, d = q.shape
    Hkv, n = K.shape[1], K.shape[2]
    g = H // Hkv
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    used = [k] * B if rows is None else [int(r) for r in np.asarray(rows).reshape(-1)]
    out = np.zeros((B, H, k, n))
    for b, s in enumerate(_starts(start, B)):
        for h in range(H):
            for i in range(k - used[b], k):
                pos = n - k + i
                if pos < s:
                    continue  # a padding query attends to nothing
                logits = K[b, h // g, s:pos + 1] @ q[b, h, i] * scale  # one logit per visible p
                e = np.exp(logits - logits.max())
                out[b, h, i, s:pos + 1] = e / e.sum()
    return out


def attention_row(q_rows, keys, *, start=None, scale=None, rows=None, combine="mean") -> np.ndarray:
    """The score row ``a`` of ReFreeKV (SPEC §2, paper Eq. 2).

    With ``k = 1`` this is the attention row of the last prompt token. With ``k > 1`` and
    ``combine="mean"`` it is the mean of the last ``k`` causal rows where each column is divided
    by its number of causally visible rows: ``a[p] = sum_i A[i, p] / #{used rows i : p <= n - k + i}``.
    With ``combine="max"``: ``a[p] = max_i A[i, p]`` over the used rows. ``rows`` as in
    ``attention_rows``.

    q_rows: (B, H, k, d); keys: (B, Hkv, n, d) -> (B, H, n) float64.
    """
    A = attention_rows(q_rows, keys, start=start, scale=scale, rows=rows)
    B, H, k, n = A.shape
    used = [k] * B if rows is None else [int(r) for r in np.asarray(rows).reshape(-1)]
    a = np.zeros((B, H, n))
    for b, s in enumerate(_starts(start, B)):
        for p in range(s, n):
            visible = [i for i in range(k - used[b], k) if n - k + i >= p and n - k + i >= s]
            if not visible:
                continue
            for h in range(H):
                column = [A[b, h, i, p] for i in visible]
                a[b, h, p] = max(column) if combine == "max" else sum(column) / len(column)
    return a


def position_ranking(batch: int, num_kv_heads: int, n: int, *, sinks: int, start=None) -> np.ndarray:
    """The ReFreeKV ranking (SPEC §3.2): ``[0, .., m-1, n-1, n-2, .., m]`` per sample.

    Sinks first, then newest to oldest; the same order for every head. Padding positions come
    last (ascending) so that a prefix of length ``j <= n_b`` holds only real tokens.
    -> (B, Hkv, n) int64.
    """
    order = np.zeros((batch, num_kv_heads, n), dtype=np.int64)
    for b, s in enumerate(_starts(start, batch)):
        n_b = n - s
        m = min(sinks, n_b)
        ranked = [s + p for p in range(m)] + [s + p for p in range(n_b - 1, m - 1, -1)]
        order[b, :] = ranked + list(range(s))
    return order


def h2o_scores(q_rows, keys, *, start=None, scale=None) -> np.ndarray:
    """H2O's importance: attention accumulated over the given prompt queries (all of them for
    H2O proper), averaged over the query heads of each KV group. -> (B, Hkv, n)."""
    A = attention_rows(q_rows, keys, start=start, scale=scale)
    B, H, _, n = A.shape
    Hkv = np.asarray(keys).shape[1]
    g = H // Hkv
    acc = A.sum(axis=2)
    return np.stack([acc[:, j * g:(j + 1) * g].mean(axis=1) for j in range(Hkv)], axis=1)


def snapkv_scores(q_rows, keys, *, window: int, pool_kernel: int, start=None, scale=None) -> np.ndarray:
    """SnapKV's importance: attention from the last ``window`` queries (the observation window),
    summed, averaged over each KV group's query heads, then max-pooled over positions with a
    centred window of ``pool_kernel`` (clipped at the sample's ends). -> (B, Hkv, n)."""
    q = _q4(q_rows)
    k = q.shape[2]
    w = min(window, k)
    raw = h2o_scores(q[:, :, k - w:], keys, start=start, scale=scale)
    B, Hkv, n = raw.shape
    r = pool_kernel // 2
    pooled = np.zeros_like(raw)
    for b, s in enumerate(_starts(start, B)):
        for j in range(Hkv):
            for p in range(s, n):
                pooled[b, j, p] = raw[b, j, max(s, p - r):min(n, p + r + 1)].max()
    return pooled


def pooled_scores(a, num_kv_heads: int, *, pool_kernel: int, start=None) -> np.ndarray:
    """The "pooled" ranking's importance: the score row ``a`` itself, averaged over each KV
    group's query heads, then max-pooled over positions with a centred window of
    ``pool_kernel`` (clipped at the sample's ends). a: (B, H, n) -> (B, Hkv, n)."""
    a = np.asarray(a, dtype=np.float64)
    B, H, n = a.shape
    g = H // num_kv_heads
    out = np.zeros((B, num_kv_heads, n))
    r = pool_kernel // 2
    for b, s in enumerate(_starts(start, B)):
        for j in range(num_kv_heads):
            mean = [sum(a[b, h, p] for h in range(j * g, (j + 1) * g)) / g for p in range(n)]
            for p in range(s, n):
                out[b, j, p] = max(mean[max(s, p - r):min(n, p + r + 1)])
    return out


def attention_ranking(scores, *, sinks: int, window: int, start=None) -> np.ndarray:
    """An attention-based ranking (the baselines' and the paper's ablation, SPEC §5).

    Per sample and KV head: the sinks (ascending), then the last ``window`` tokens (newest first),
    then the remaining positions by descending score, ties broken newest first (the tie order is
    part of the spec). With all scores equal this is exactly ``position_ranking``.
    scores: (B, Hkv, n) -> (B, Hkv, n) int64.
    """
    S = np.asarray(scores, dtype=np.float64)
    B, Hkv, n = S.shape
    order = np.zeros((B, Hkv, n), dtype=np.int64)
    for b, s in enumerate(_starts(start, B)):
        n_b = n - s
        m = min(sinks, n_b)
        w = min(window, n_b - m)
        head = [s + p for p in range(m)] + [n - 1 - t for t in range(w)]
        rest_newest_first = [p for p in range(n - 1 - w, s + m - 1, -1)]
        for j in range(Hkv):
            # sorted() is stable, so equal scores keep their newest-first order.
            rest = sorted(rest_newest_first, key=lambda p: -S[b, j, p])
            order[b, j] = head + rest + list(range(s))
    return order


def norm_ratio_curve(a, order, *, sinks: int, norm_scope: str = "candidates", start=None, norm: str = "l2",
                     heads: str = "mean") -> np.ndarray:
    """The halting quantity for every prefix length (SPEC §3.3-3.4).

    For head ``h`` and a prefix of length ``j`` of its KV group's ranking, with ``norm="l2"``
    (the paper): ``kept[h, j] = sqrt(sum_{first j ranked p} a[h, p]^2)``; with ``norm="l1"``:
    ``kept[h, j] = sum_{first j ranked p} a[h, p]`` (the attention mass). ``full[h] = kept[h, n_b]``.
    ``heads="mean"`` (the paper's Uni-Metric): ``ratio[j] = 1 - mean_h kept[h, j] / mean_h full[h]``
    (0 when the full norm is 0). ``heads="max"``: ``ratio[j] = max_h (1 - kept[h, j] / full[h])``,
    a head with ``full[h] = 0`` counting 0. ``heads="each"``: ``ratio[j] = (1/H) sum_h (1 - kept[h, j] / full[h])``,
    every head's own ratio weighted equally, a head with ``full[h] = 0`` counting 0.
    With ``norm_scope="candidates"`` the sinks contribute 0 to both norms (research code);
    with ``"all"`` every position counts (paper text).
    a: (B, H, n), order: (B, Hkv, n) -> ratio (B, n) where ``ratio[b, j-1]`` is prefix length j
    (0 for j > n_b).
    """
    a = np.asarray(a, dtype=np.float64)
    order = np.asarray(order)
    B, H, n = a.shape
    g = H // order.shape[1]
    ratio = np.zeros((B, n))
    for b, s in enumerate(_starts(start, B)):
        n_b = n - s
        m = min(sinks, n_b)
        kept = np.zeros((H, n_b))
        # The L2 norm is computed as ||x|| = c * ||x / c|| with c the largest in-scope score, so that
        # scores below ~1e-154 (a softmax tail) do not square to 0. The ratio does not depend on c as long
        # as the heads it compares share it: one c per sample for "mean" (a mean over heads' norms), one
        # per head for "max" and "each" (each head's own ratio).
        in_scope_scores = [[a[b, h, order[b, h // g, j]] for j in range(n_b) if norm_scope == "all" or j >= m]
                           for h in range(H)]
        per_head_c = [max(x, default=0.0) for x in in_scope_scores]
        for h in range(H):
            c = per_head_c[h] if heads in ("max", "each") else max(per_head_c, default=0.0)
            c = c if c > 0 else 1.0
            total = 0.0
            for j in range(n_b):
                p = order[b, h // g, j]
                in_scope = norm_scope == "all" or j >= m  # sinks are the first m ranked positions
                if in_scope:
                    total += (a[b, h, p] / c) ** 2 if norm == "l2" else a[b, h, p]
                kept[h, j] = math.sqrt(total) if norm == "l2" else total
        if heads in ("max", "each"):
            for j in range(n_b):
                per_head = [1.0 - kept[h, j] / kept[h, -1] if kept[h, -1] > 0 else 0.0 for h in range(H)]
                ratio[b, j] = max(per_head) if heads == "max" else sum(per_head) / H
            continue
        mean_kept = [sum(kept[h, j] for h in range(H)) / H for j in range(n_b)]
        full = mean_kept[-1]  # mean_h full[h], with full[h] = kept[h, n_b]
        if full > 0:
            ratio[b, :n_b] = [1.0 - x / full for x in mean_kept]
    return ratio


def threshold_cut(ratio, *, threshold: float, sinks: int, start=None) -> np.ndarray:
    """ReFreeKV's stopping rule (SPEC §3.4, decision 3): the shortest prefix ``j`` with
    ``ratio[j] <= T``, never fewer than the sinks plus the last token (``m + 1``), never more
    than ``n_b``. Prompts with ``n_b <= m + 1`` are kept whole, and every prompt at ``T = 0``
    (the full cache: only rounding, or attention that underflowed to exactly 0, lets a shorter
    prefix reach ratio 0). -> (B,) int64."""
    R = np.asarray(ratio)
    B, n = R.shape
    cut = np.zeros(B, dtype=np.int64)
    for b, s in enumerate(_starts(start, B)):
        n_b = n - s
        if threshold == 0:  # T = 0 is the full cache, whatever the rounding of the curve
            cut[b] = n_b
            continue
        j = next((j for j in range(1, n_b + 1) if R[b, j - 1] <= threshold), n_b)
        cut[b] = min(n_b, max(j, sinks + 1))
    return cut


def mass_floor_cut(a, order, cut, *, mass_threshold, sinks: int, norm_scope: str = "candidates", heads: str = "mean",
                   start=None) -> np.ndarray:
    """The mass floor under the threshold rule (``ReFreeKVConfig.mass_threshold``, docs/spec.md):
    per sample, ``max(cut[b], c_m[b])`` where ``c_m`` is the threshold rule's own cut on the
    attention-mass curve of the same order (``norm_ratio_curve(..., norm="l1")``, same scope and
    heads) at ``T = mass_threshold``. ``mass_threshold`` None leaves ``cut`` as it is. -> (B,) int64."""
    cut = np.asarray(cut, dtype=np.int64)
    if mass_threshold is None:
        return cut.copy()
    mass = norm_ratio_curve(a, order, sinks=sinks, norm_scope=norm_scope, start=start, norm="l1", heads=heads)
    floor = threshold_cut(mass, threshold=mass_threshold, sinks=sinks, start=start)
    return np.array([max(int(x), int(y)) for x, y in zip(cut, floor)], dtype=np.int64)


def newest_floor_cut(cut, keep_newest, *, sinks: int, n: int, start=None) -> np.ndarray:
    """The newest tokens a caller protects (``keep_newest``, e.g. the chat turn being answered with
    ``replan="history"``) under a ranking that puts the newest tokens right after the sinks: per
    sample ``min(n_b, max(cut[b], min(m, n_b) + keep_newest[b]))``, so the kept prefix of the order
    holds the sinks and at least the ``keep_newest`` newest tokens. ``keep_newest`` None leaves
    ``cut`` as it is. -> (B,) int64."""
    cut = np.asarray(cut, dtype=np.int64)
    if keep_newest is None:
        return cut.copy()
    out = np.zeros_like(cut)
    for b, s in enumerate(_starts(start, len(cut))):
        n_b = n - s
        out[b] = min(n_b, max(int(cut[b]), min(sinks, n_b) + int(keep_newest[b])))
    return out


def fixed_budget_cut(batch: int, n: int, *, halting: str, budget, sinks: int, start=None) -> np.ndarray:
    """The fixed-budget halting rule of the baselines (SPEC §5): keep ``ceil(budget * n_b)``
    tokens (halting "ratio") or ``budget`` tokens ("count"), clamped to ``[m + 1, n_b]``.
    -> (B,) int64."""
    cut = np.zeros(batch, dtype=np.int64)
    for b, s in enumerate(_starts(start, batch)):
        n_b = n - s
        j = math.ceil(budget * n_b) if halting == "ratio" else int(budget)
        cut[b] = min(n_b, max(j, sinks + 1))
    return cut


def kept_positions(order, cut):
    """The kept set (SPEC §3.5): the first ``cut[b]`` ranked positions, sorted ascending.

    Samples keep different counts; the result is padded to ``J = max(cut)``: slots at or past
    ``cut[b]`` hold position ``n - 1`` (a valid index) and are False in ``valid``.
    order: (B, Hkv, n), cut: (B,) -> (idx (B, Hkv, J) int64, valid (B, J) bool).
    """
    order = np.asarray(order)
    B, Hkv, n = order.shape
    J = int(max(cut))
    idx = np.full((B, Hkv, J), n - 1, dtype=np.int64)
    valid = np.zeros((B, J), dtype=bool)
    for b in range(B):
        c = int(cut[b])
        valid[b, :c] = True
        for j in range(Hkv):
            idx[b, j, :c] = sorted(order[b, j, :c])
    return idx, valid


def evict(keys, values, idx):
    """Keep K and V at the kept positions, at ``Hkv`` granularity (SPEC §3.5).
    keys, values: (B, Hkv, n, d); idx: (B, Hkv, J) -> two (B, Hkv, J, d) arrays."""
    K, V = np.asarray(keys), np.asarray(values)
    B, Hkv, J = idx.shape
    outK = np.zeros((B, Hkv, J, K.shape[-1]), dtype=K.dtype)
    outV = np.zeros((B, Hkv, J, V.shape[-1]), dtype=V.dtype)
    for b in range(B):
        for j in range(Hkv):
            for t in range(J):
                outK[b, j, t] = K[b, j, idx[b, j, t]]
                outV[b, j, t] = V[b, j, idx[b, j, t]]
    return outK, outV


def kv_bytes(batch: int, num_kv_heads: int, length: int, head_dim: int, itemsize: int) -> int:
    """Bytes of one layer's K plus V stored at ``Hkv`` heads (SPEC decision 7)."""
    return 2 * batch * num_kv_heads * length * head_dim * itemsize


def model_budget(kept, prompt_lengths, retained) -> np.ndarray:
    """The paper's budget (SPEC decision 7): per sample, the mean over layers of
    ``kept / n_b``, retained layers counting 1.0.
    kept: (L, B) kept counts; prompt_lengths: (B,); retained: layer indices -> (B,)."""
    kept = np.asarray(kept, dtype=np.float64)
    L, B = kept.shape
    out = np.zeros(B)
    for b in range(B):
        fr = [1.0 if layer in retained else kept[layer, b] / prompt_lengths[b] for layer in range(L)]
        out[b] = sum(fr) / L
    return out


def rows_for(config, n: int) -> int:
    """k, the newest prompt queries that make the score row for a prompt of ``n`` tokens: the
    count ``query_rows``, or the fraction ``query_rows`` of n rounded (at least 1), at most n."""
    k = config.query_rows
    rows = k if isinstance(k, int) else max(1, round(k * n))
    return min(rows, n)


def ranking_scores(config, q_rows, keys, a, *, start=None, scale=None):
    """The scores an attention ranking orders by (None for the position ranking): H2O over
    every given query, SnapKV over the last ``window`` queries, or "pooled" from the score row a.
    -> (B, Hkv, n) or None."""
    if config.ranking == "position":
        return None
    if config.ranking == "h2o":
        return h2o_scores(q_rows, keys, start=start, scale=scale)
    if config.ranking == "snapkv":
        return snapkv_scores(q_rows, keys, window=config.window, pool_kernel=config.pool_kernel,
                             start=start, scale=scale)
    if config.ranking == "pooled":
        return pooled_scores(a, np.asarray(keys).shape[1], pool_kernel=config.pool_kernel, start=start)
    raise ValueError(f"the reference has no ranking {config.ranking!r}")


def plan_layer(q_rows, keys, config, *, start=None, scale=None, keep_newest=None) -> dict:
    """One layer's decision, composed from the steps above exactly as SPEC §3 orders them.

    ``config`` is any object with the attributes of ``refreekv.ReFreeKVConfig``; ``q_rows`` must
    hold the newest prompt queries (at least as many as the configuration needs). ``keep_newest``:
    None, or (B,) counts of newest tokens kept whatever the rule says (``newest_floor_cut``).
    Returns ``{"a", "order", "ratio", "cut", "idx", "valid"}``.
    """
    q = _q4(q_rows)
    K = np.asarray(keys, dtype=np.float64)
    B, Hkv, n = K.shape[0], K.shape[1], K.shape[2]
    rows = [rows_for(config, n - s) for s in _starts(start, B)]  # k per sample, from its own n_b
    k_score = max(rows)
    if q.shape[2] < k_score:
        raise ValueError(f"q_rows holds {q.shape[2]} rows; the configuration scores with {k_score}")
    a = attention_row(q[:, :, q.shape[2] - k_score:], K, start=start, scale=scale, rows=rows,
                      combine=config.combine)
    scores = ranking_scores(config, q, K, a, start=start, scale=scale)
    if scores is None:
        order = position_ranking(B, Hkv, n, sinks=config.sinks, start=start)
    else:
        order = attention_ranking(scores, sinks=config.sinks, window=config.window, start=start)
    ratio = norm_ratio_curve(a, order, sinks=config.sinks, norm_scope=config.norm_scope, start=start,
                             norm=config.norm, heads=config.heads)
    if config.halting == "threshold":
        cut = threshold_cut(ratio, threshold=config.threshold, sinks=config.sinks, start=start)
        cut = mass_floor_cut(a, order, cut, mass_threshold=getattr(config, "mass_threshold", None),
                             sinks=config.sinks, norm_scope=config.norm_scope, heads=config.heads, start=start)
    else:
        cut = fixed_budget_cut(B, n, halting=config.halting, budget=config.budget,
                               sinks=config.sinks, start=start)
    cut = newest_floor_cut(cut, keep_newest, sinks=config.sinks, n=n, start=start)
    idx, valid = kept_positions(order, cut)
    return {"a": a, "order": order, "ratio": ratio, "cut": cut, "idx": idx, "valid": valid}


# ---------------------------------------------------------------------------------------------
# The evicted tail kept at low precision (issue 10, round five): what the rule evicts, quantized
# ---------------------------------------------------------------------------------------------

def quant_group(d: int) -> int:
    """The group size along the head dimension: 64 values when ``d`` is a multiple of 64 (the
    group of mlx-lm's ``mx.quantize`` and of transformers' quantized caches), else the whole vector."""
    return 64 if d % 64 == 0 else d


def tail_positions(order, cut, *, start=None):
    """The tail: what the rule evicts, i.e. the ranked positions ``cut[b] .. n_b - 1`` of each
    sample (its prompt's positions outside the kept set), sorted ascending.

    Padded to ``T = max(n_b - cut)`` (at least 1): slots past ``n_b - cut[b]`` hold position
    ``n - 1`` and are False in ``valid``. order: (B, Hkv, n), cut: (B,) ->
    (idx (B, Hkv, T) int64, valid (B, T) bool).
    """
    order = np.asarray(order)
    B, Hkv, n = order.shape
    starts = _starts(start, B)
    counts = [n - s - int(c) for s, c in zip(starts, cut)]
    T = max(1, max(counts))
    idx = np.full((B, Hkv, T), n - 1, dtype=np.int64)
    valid = np.zeros((B, T), dtype=bool)
    for b, s in enumerate(starts):
        c, n_b = int(cut[b]), n - s
        valid[b, :n_b - c] = True
        for j in range(Hkv):
            idx[b, j, :n_b - c] = sorted(order[b, j, c:n_b])
    return idx, valid


def quantize(x, bits: int, group: int):
    """Affine quantization per group of ``group`` consecutive values along the last axis.

    For a group g with ``lo = min(g)`` and ``hi = max(g)``: the scale ``s = (hi - lo) / (2^bits - 1)``,
    the bias ``lo``, and each value's code ``q = round((x - lo) / s)`` (half to even), clipped to
    ``[0, 2^bits - 1]``; ``q = 0`` where ``s = 0`` (a constant group). Dequantized: ``x' = q s + lo``,
    so ``|x - x'| <= s / 2``.

    x: (..., d) -> (codes (..., d) int64, scales (..., d / group), biases (..., d / group)) float64.
    """
    x = np.asarray(x, dtype=np.float64)
    d = x.shape[-1]
    top = 2 ** bits - 1
    flat = x.reshape(-1, d)
    codes = np.zeros(flat.shape, dtype=np.int64)
    scales = np.zeros((flat.shape[0], d // group))
    biases = np.zeros((flat.shape[0], d // group))
    for r in range(flat.shape[0]):
        for g in range(d // group):
            vals = flat[r, g * group:(g + 1) * group]
            lo, hi = vals.min(), vals.max()
            s = (hi - lo) / top
            scales[r, g], biases[r, g] = s, lo
            for i, value in enumerate(vals):
                codes[r, g * group + i] = 0 if s == 0 else min(top, max(0, int(np.round((value - lo) / s))))
    lead = x.shape[:-1]
    return codes.reshape(*lead, d), scales.reshape(*lead, d // group), biases.reshape(*lead, d // group)


def pack(codes, bits: int):
    """Codes as stored: one byte per code at 8 bits; at 4 bits two codes per byte, the even
    position in the low nibble: ``byte = q[2i] + 16 q[2i + 1]``. (..., d) -> (..., d * bits / 8) uint8."""
    codes = np.asarray(codes, dtype=np.int64)
    if bits == 8:
        return codes.astype(np.uint8)
    d = codes.shape[-1]
    out = np.zeros((*codes.shape[:-1], d // 2), dtype=np.uint8)
    for i in range(d // 2):
        out[..., i] = codes[..., 2 * i] + 16 * codes[..., 2 * i + 1]
    return out


def dequantize(packed, scales, biases, bits: int, group: int):
    """``x' = q s + lo`` for the codes ``packed`` holds (``pack``'s layout), per group.
    -> (..., d) float64."""
    packed = np.asarray(packed, dtype=np.int64)
    if bits == 8:
        codes = packed
    else:
        codes = np.zeros((*packed.shape[:-1], 2 * packed.shape[-1]), dtype=np.int64)
        for i in range(packed.shape[-1]):
            codes[..., 2 * i] = packed[..., i] % 16
            codes[..., 2 * i + 1] = packed[..., i] // 16
    d = codes.shape[-1]
    out = np.zeros(codes.shape)
    for g in range(d // group):
        sl = slice(g * group, (g + 1) * group)
        out[..., sl] = codes[..., sl] * np.asarray(scales, np.float64)[..., g:g + 1] \
            + np.asarray(biases, np.float64)[..., g:g + 1]
    return out


def tail_bytes(batch: int, num_kv_heads: int, length: int, head_dim: int, bits: int, scale_itemsize: int) -> int:
    """Bytes of one layer's quantized tail, K plus V: the packed codes, and a scale and a bias per
    group, in the scales' dtype."""
    groups = head_dim // quant_group(head_dim)
    return 2 * batch * num_kv_heads * length * (head_dim * bits // 8 + 2 * groups * scale_itemsize)
