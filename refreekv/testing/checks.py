"""Checks that hold a backend to the reference, step by step and composed.

Continuous results are compared within ``TOLERANCES[dtype]``. Discrete results (the cut, the
kept positions) are compared exactly when the reference's decision margin exceeds the
tolerance; inside the margin the backend's answer must be one of the valid ones. Every failure
raises ``ConformanceError`` saying what was expected, what was found, the backend, the dtype,
the shapes, and a one-line reproducer.
"""

from __future__ import annotations

import dataclasses
import inspect
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

import refreekv
from refreekv import reference as ref
from refreekv.backend import Backend, _registered
from refreekv.rules import RANKINGS

from .cases import LayerCase
from .tolerances import tolerance

ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}


class ConformanceError(AssertionError):
    """A backend disagrees with the reference."""


@dataclass
class Target:
    """A backend under test and the input dtypes it claims to support."""

    backend: Backend
    dtypes: tuple[str, ...] = ("float32",)

    @property
    def name(self) -> str:
        return self.backend.name

    def array(self, a: np.ndarray, dtype: str):
        return self.backend.from_numpy(np.asarray(a), dtype)

    def numpy(self, x) -> np.ndarray:
        out = np.asarray(self.backend.to_numpy(x))
        return out.astype(np.float64) if out.dtype.kind == "f" or out.dtype.name == "bfloat16" else out

    @contextmanager
    def active(self, valid_inputs: bool = True):
        """Dispatch this backend's arrays to it (first) while the checks run. With ``valid_inputs``
        (every check but ``check_errors``) a ReFreeKVError is the backend's failure (e.g. NaN scores)."""
        _registered.insert(0, self.backend)
        try:
            yield self
        except refreekv.ReFreeKVError as err:
            if not valid_inputs:
                raise
            raise ConformanceError(f"refreekv conformance: valid input raised an error\n  backend: {self.name}\n"
                                   f"  expected: no error (the inputs are valid and finite)\n"
                                   f"  found:    ReFreeKVError: {err}\n"
                                   f"  reproduce: refreekv.testing.check_* with the case printed by hypothesis "
                                   f"below (Target(<your backend>))") from err
        finally:
            _registered.remove(self.backend)


def _fail(check: str, target: Target, dtype: str, case, expected, found, detail: str = "") -> None:
    lines = [f"refreekv conformance: {check} differs from the reference",
             f"  backend: {target.name}   dtype: {dtype}",
             f"  case: {case!r}"]
    if isinstance(case, LayerCase):
        lines.append(f"  shapes: q_rows ({case.batch}, {case.heads}, {case.rows}, {case.d}), "
                     f"keys ({case.batch}, {case.kv_heads}, {case.n}, {case.d}), start {case.start}")
    lines += [f"  expected: {expected}", f"  found:    {found}"]
    if detail:
        lines.append(f"  {detail}")
    fn = next((f.function for f in inspect.stack() if f.function.startswith("check_")), "check_plan")
    lines.append(f"  reproduce: refreekv.testing.{fn}(Target(<your backend>), {case!r}, {dtype!r})")
    raise ConformanceError("\n".join(lines))


def _close(check, target, dtype, case, expected, found, *, atol, rtol) -> None:
    expected, found = np.asarray(expected, np.float64), np.asarray(found, np.float64)
    if expected.shape != found.shape:
        _fail(check, target, dtype, case, f"shape {expected.shape}", f"shape {found.shape}")
    err = np.abs(found - expected) - (atol + rtol * np.abs(expected))
    if not np.isfinite(found).all() or (err > 0).any():
        at = np.unravel_index(np.nanargmax(np.where(np.isfinite(err), err, np.inf)), err.shape)
        _fail(check, target, dtype, case, f"{expected[at]!r} at index {tuple(int(i) for i in at)}",
              f"{found[at]!r}", f"tolerance: atol {atol:g} + rtol {rtol:g} (TOLERANCES[{dtype!r}])")


def _equal(check, target, dtype, case, expected, found) -> None:
    expected, found = np.asarray(expected), np.asarray(found)
    if expected.shape != found.shape or not np.array_equal(expected, found):
        if expected.shape == found.shape:
            at = tuple(int(i) for i in np.argwhere(expected != found)[0])
            _fail(check, target, dtype, case, f"{expected[at]!r} at index {at}", f"{found[at]!r}",
                  f"full expected {expected.tolist()}" if expected.size <= 64 else "")
        _fail(check, target, dtype, case, f"shape {expected.shape}", f"shape {found.shape}")


def inputs(target: Target, case: LayerCase, dtype: str):
    """Native q, K, V in ``dtype`` and their float64 read-backs (the reference sees the same
    rounded values as the backend)."""
    q, K, V = case.arrays()
    nq, nK, nV = target.array(q, dtype), target.array(K, dtype), target.array(V, dtype)
    return (nq, nK, nV), (target.numpy(nq), target.numpy(nK), target.numpy(nV))


def valid_cut_range(ratio_row: np.ndarray, threshold: float, tol: float, sinks: int, n_b: int) -> tuple[int, int]:
    """The cuts a correct backend may return given the reference ratio for one sample.

    ``lo``: shortest prefix whose ratio could round to <= T; ``hi``: the first prefix whose
    ratio is surely <= T (by more than ``tol``, or exactly 0: an exactly-zero tail is exact in
    every precision). Both clamped to ``[sinks + 1, n_b]``. ``T = 0`` allows only ``n_b``: the full
    cache, whatever the curve's rounding."""
    if threshold == 0:
        return n_b, n_b
    r = ratio_row[:n_b]
    lo = next((j for j in range(1, n_b + 1) if r[j - 1] <= threshold + tol), n_b)
    hi = next((j for j in range(1, n_b + 1) if r[j - 1] <= threshold - tol or r[j - 1] == 0.0), n_b)
    clamp = lambda j: min(n_b, max(j, sinks + 1))  # noqa: E731
    return clamp(lo), clamp(hi)


def config_cut_range(config, ratio_row: np.ndarray, mass_row: np.ndarray | None, tol: float, n_b: int) -> tuple[int, int]:
    """``valid_cut_range`` for a configuration's threshold rule, its mass floor included: the cut is
    ``max(c_T, c_m)`` with ``c_T`` in the range of the norm curve at T and ``c_m`` in that of the
    attention-mass curve ``mass_row`` at ``config.mass_threshold`` (None: no floor)."""
    lo, hi = valid_cut_range(ratio_row, config.threshold, tol, config.sinks, n_b)
    if config.mass_threshold is None:
        return lo, hi
    lo_m, hi_m = valid_cut_range(mass_row, config.mass_threshold, tol, config.sinks, n_b)
    return max(lo, lo_m), max(hi, hi_m)


def _mass_curve(config, a, order, start) -> np.ndarray | None:
    """The reference attention-mass curve along ``order`` when the configuration has a mass floor."""
    if config.mass_threshold is None:
        return None
    return ref.norm_ratio_curve(a, order, sinks=config.sinks, norm_scope=config.norm_scope, start=start,
                                norm="l1", heads=config.heads)


def _check_order(target, dtype, case, got, want, scores, tol_abs, start, sinks, window) -> None:
    """Attention rankings: head (sinks + window) and padding tail exact; the rest by
    non-increasing reference score, where only near-ties (within tolerance) may swap."""
    B, Hkv, n = want.shape
    for b in range(B):
        s = start[b]
        m = min(sinks, n - s)
        head = m + min(window, n - s - m)
        for j in range(Hkv):
            g, w = got[b, j], want[b, j]
            if not np.array_equal(np.sort(g), np.arange(n)) or not np.array_equal(g[:head], w[:head]) \
                    or not np.array_equal(g[n - s:], w[n - s:]):
                _equal("attention ranking (sinks, window, padding)", target, dtype, case, w, g)
            S = scores[b, j]
            for x, y in zip(g[head:n - s - 1], g[head + 1:n - s]):
                in_order = S[x] > S[y] or (S[x] == S[y] and x > y)
                if not in_order and abs(S[x] - S[y]) > tol_abs:
                    _fail("attention ranking order", target, dtype, case,
                          f"position {y} (score {S[y]!r}) before {x} (score {S[x]!r})",
                          f"{x} before {y}", f"sample {b}, KV head {j}")


def check_attention_row(target: Target, case: LayerCase, dtype: str) -> None:
    """The score row a (Eq. 2, per-sample k) and the raw attention rows."""
    (q, K, _), (qn, Kn, _) = inputs(target, case, dtype)
    tol = tolerance(dtype)
    c = case.config
    rows = [ref.rows_for(c, case.n - s) for s in case.start]
    with target.active():
        got = refreekv.attention_row(q, K, start=list(case.start), rows=rows, combine=c.combine)
        got_rows = refreekv.attention_rows(q, K, start=list(case.start))
    _close("attention_row", target, dtype, case, ref.attention_row(qn, Kn, start=case.start, rows=rows, combine=c.combine),
           target.numpy(got), atol=tol.score_atol, rtol=tol.score_rtol)
    _close("attention_rows", target, dtype, case, ref.attention_rows(qn, Kn, start=case.start),
           target.numpy(got_rows), atol=tol.score_atol, rtol=tol.score_rtol)


def check_scores_and_rankings(target: Target, case: LayerCase, dtype: str) -> None:
    """Position ranking (exact), H2O and SnapKV scores (tolerance), the H2O, SnapKV and pooled
    rankings (a valid order)."""
    (q, K, _), (qn, Kn, _) = inputs(target, case, dtype)
    tol, c, st = tolerance(dtype), case.config, list(case.start)
    rows = [ref.rows_for(c, case.n - s) for s in case.start]
    with target.active():
        pos = target.numpy(refreekv.position_ranking(K, sinks=c.sinks, start=st))
        h2o = target.numpy(refreekv.h2o_scores(q, K, start=st))
        snap = target.numpy(refreekv.snapkv_scores(q, K, window=c.window, pool_kernel=c.pool_kernel, start=st))
        orders = {name: target.numpy(refreekv.attention_ranking(
            target.array(s, "float64" if dtype == "float64" else "float32"), sinks=c.sinks, window=c.window, start=st))
            for name, s in (("h2o", h2o), ("snapkv", snap))}
        pooled = target.numpy(refreekv.plan_layer(q, K, dataclasses.replace(c, ranking="pooled", halting="threshold",
                                                                           budget=None), start=st).order)
    _equal("position_ranking", target, dtype, case,
           ref.position_ranking(case.batch, case.kv_heads, case.n, sinks=c.sinks, start=case.start), pos)
    want_h2o = ref.h2o_scores(qn, Kn, start=case.start)
    want_snap = ref.snapkv_scores(qn, Kn, window=c.window, pool_kernel=c.pool_kernel, start=case.start)
    for name, want, got in (("h2o_scores", want_h2o, h2o), ("snapkv_scores", want_snap, snap)):
        _close(name, target, dtype, case, want, got, atol=tol.score_atol, rtol=tol.score_rtol)
    a = ref.attention_row(qn[:, :, case.rows - max(rows):], Kn, start=case.start, rows=rows, combine=c.combine)
    want_pooled = ref.pooled_scores(a, case.kv_heads, pool_kernel=c.pool_kernel, start=case.start)
    orders["pooled"] = pooled
    for name, want in (("h2o", want_h2o), ("snapkv", want_snap), ("pooled", want_pooled)):
        tol_abs = 2 * (tol.score_atol + tol.score_rtol * float(np.abs(want).max(initial=0)))
        _check_order(target, dtype, case, orders[name],
                     ref.attention_ranking(want, sinks=c.sinks, window=c.window, start=case.start),
                     want, tol_abs, case.start, c.sinks, c.window)


def check_attention_ranking_ties(target: Target, scores: np.ndarray, start, sinks: int, window: int,
                                 dtype: str) -> None:
    """Exact ties must break newest first: scores are exact inputs, so the order is exact."""
    case = f"scores={scores.tolist()}, start={tuple(start)}, sinks={sinks}, window={window}"
    with target.active():
        got = refreekv.attention_ranking(target.array(scores, dtype), sinks=sinks, window=window, start=list(start))
    _equal("attention_ranking ties", target, dtype, case,
           ref.attention_ranking(scores, sinks=sinks, window=window, start=start), target.numpy(got))


def check_ratio_and_cut(target: Target, case: LayerCase, dtype: str) -> None:
    """The norm-ratio curve from the reference's a and order, then the cut from that curve."""
    (_, _, _), (qn, Kn, _) = inputs(target, case, dtype)
    c, st, tol = case.config, list(case.start), tolerance(dtype)
    rows = [ref.rows_for(c, case.n - s) for s in case.start]
    a = ref.attention_row(qn[:, :, case.rows - max(rows):], Kn, start=case.start, rows=rows, combine=c.combine)
    order = ref.position_ranking(case.batch, case.kv_heads, case.n, sinks=c.sinks, start=case.start)
    cdt = "float64" if dtype == "float64" else "float32"
    a_in = target.numpy(target.array(a, cdt))  # what the backend is fed, rounded
    with target.active():
        ratio = refreekv.norm_ratio_curve(target.array(a_in, cdt), target.array(order, "int64"),
                                          sinks=c.sinks, norm_scope=c.norm_scope, start=st, norm=c.norm, heads=c.heads)
    want = ref.norm_ratio_curve(a_in, order, sinks=c.sinks, norm_scope=c.norm_scope, start=case.start,
                                norm=c.norm, heads=c.heads)
    _close("norm_ratio_curve", target, dtype, case, want, target.numpy(ratio), atol=tol.ratio_atol, rtol=0)
    r_in = target.numpy(target.array(want, cdt))
    with target.active():
        cut = target.numpy(refreekv.threshold_cut(target.array(r_in, cdt), threshold=c.threshold,
                                                  sinks=c.sinks, start=st))
    for b, s in enumerate(case.start):
        lo, hi = valid_cut_range(r_in[b], c.threshold, 1e-7 * (cdt != "float64"), c.sinks, case.n - s)
        if not lo <= cut[b] <= hi:
            _fail("threshold_cut", target, dtype, case, f"{lo}" if lo == hi else f"one of {lo}..{hi}",
                  int(cut[b]), f"sample {b}; ratio near the cut: {r_in[b, max(0, lo - 3):hi + 2].tolist()}")


def check_kept_and_evict(target: Target, case: LayerCase, dtype: str) -> None:
    """Kept positions from a given order and cut, and the gather of K and V (both exact)."""
    (_, K, V), (_, Kn, Vn) = inputs(target, case, dtype)
    c = case.config
    order = ref.position_ranking(case.batch, case.kv_heads, case.n, sinks=c.sinks, start=case.start)
    if RANKINGS[c.ranking].scores is not None:  # a per-head order from real scores
        order = ref.attention_ranking(np.abs(Kn).sum(-1), sinks=c.sinks, window=c.window, start=case.start)
    cut = np.array([1 + (case.seed + 7 * b) % (case.n - s) for b, s in enumerate(case.start)])
    want_idx, want_valid = ref.kept_positions(order, cut)
    with target.active():
        idx, valid = refreekv.kept_positions(target.array(order, "int64"), cut)
        k2, v2 = refreekv.evict(K, V, idx)
    _equal("kept_positions idx", target, dtype, case, want_idx, target.numpy(idx))
    _equal("kept_positions valid", target, dtype, case, want_valid, target.numpy(valid))
    wk, wv = ref.evict(Kn, Vn, want_idx)
    _equal("evict keys", target, dtype, case, wk, target.numpy(k2))
    _equal("evict values", target, dtype, case, wv, target.numpy(v2))


def _plan_vs_reference(target: Target, dtype: str, case: LayerCase, plan, qn, Kn, what: str = "plan") -> np.ndarray:
    """One LayerPlan against the reference plan of (qn, Kn); returns the reference's kept idx."""
    c, tol = case.config, tolerance(dtype)
    want = ref.plan_layer(qn, Kn, c, start=case.start)
    _close(f"{what} a", target, dtype, case, want["a"], target.numpy(plan.a), atol=tol.score_atol, rtol=tol.score_rtol)
    order = target.numpy(plan.order)
    scores = ref.ranking_scores(c, qn, Kn, want["a"], start=case.start)
    if scores is None:
        _equal(f"{what} order", target, dtype, case, want["order"], order)
    else:
        tol_abs = 2 * (tol.score_atol + tol.score_rtol * float(np.abs(scores).max(initial=0)))
        _check_order(target, dtype, case, order, want["order"], scores, tol_abs, case.start, c.sinks, c.window)
    # The reference curve along the backend's own (valid) order decides which cuts are right.
    r = ref.norm_ratio_curve(want["a"], order, sinks=c.sinks, norm_scope=c.norm_scope, start=case.start,
                             norm=c.norm, heads=c.heads)
    got_r = np.asarray(target.numpy(plan.ratio), np.float64)
    # A softmax tail below the dtype's smallest number is 0 in the backend and tiny in float64; when a
    # sample's candidate scores are all such tails, 1 - kept/full is a ratio of two numbers the dtype
    # cannot hold. So a sample's curve may also match the reference curve of the backend's own scores
    # (held to the reference's within tolerance above): either way the norm and halting steps are
    # checked by the reference.
    own = ref.norm_ratio_curve(np.asarray(target.numpy(plan.a), np.float64), order, sinks=c.sinks,
                               norm_scope=c.norm_scope, start=case.start, norm=c.norm, heads=c.heads)
    near = lambda x: (np.abs(got_r - x) <= tol.ratio_atol).all(axis=-1)  # noqa: E731
    use_own = ~near(r) & near(own)
    r = np.where(use_own[:, None], own, r)
    _close(f"{what} ratio", target, dtype, case, r, got_r, atol=tol.ratio_atol, rtol=0)
    mass = _mass_curve(c, want["a"], order, case.start)
    if mass is not None:  # the floor's curve, from the same scores as the norm curve it sits under
        mass = np.where(use_own[:, None], _mass_curve(c, np.asarray(target.numpy(plan.a), np.float64), order,
                                                      case.start), mass)
    for b, s in enumerate(case.start):
        if c.halting == "threshold":
            lo, hi = config_cut_range(c, r[b], None if mass is None else mass[b], tol.ratio_atol, case.n - s)
        else:
            lo = hi = int(want["cut"][b])
        if not lo <= plan.cut[b] <= hi:
            _fail(f"{what} cut", target, dtype, case, f"{lo}" if lo == hi else f"one of {lo}..{hi}",
                  int(plan.cut[b]), f"sample {b}; reference ratio near the cut: {r[b, max(0, lo - 3):hi + 2].tolist()}"
                  + ("" if mass is None else f"; mass curve (floor Tm = {c.mass_threshold}): "
                     f"{mass[b, max(0, lo - 3):hi + 2].tolist()}"))
    want_idx, want_valid = ref.kept_positions(order, plan.cut)
    _equal(f"{what} kept positions", target, dtype, case, want_idx, target.numpy(plan.idx))
    _equal(f"{what} valid slots", target, dtype, case, want_valid, target.numpy(plan.valid))
    return want_idx


def _compressed_vs_reference(target: Target, dtype: str, case: LayerCase, plan, out, Kn, Vn, want_idx,
                             what: str = "compress_layer") -> None:
    """What compress_layer(s) returned for a layer, against the reference eviction of ``plan``."""
    c = case.config
    k2, v2, valid, report, tail = out
    _equal(f"{what} kept", target, dtype, case, plan.cut, np.asarray(report.kept))
    n_b = [case.n - s for s in case.start]
    size = 0
    if report.compressed:
        wk, wv = ref.evict(Kn, Vn, want_idx)
        _equal(f"{what} valid slots", target, dtype, case, target.numpy(plan.valid), target.numpy(valid))
        _equal(f"{what} keys", target, dtype, case, wk, target.numpy(k2))
        _equal(f"{what} values", target, dtype, case, wv, target.numpy(v2))
        J = int(plan.cut.max())
        if (tail is None) != (c.tail_bits is None):
            _fail(f"{what} tail", target, dtype, case, f"a tail at {c.tail_bits} bits" if c.tail_bits else "no tail",
                  "none" if tail is None else f"a tail at {tail.keys.bits} bits")
        if tail is not None:  # what the plan evicts, kept quantized: the reference's positions and codes
            t_idx, t_valid = ref.tail_positions(target.numpy(plan.order), plan.cut, start=case.start)
            _equal(f"{what} tail idx", target, dtype, case, t_idx, target.numpy(tail.idx))
            _equal(f"{what} tail valid", target, dtype, case, t_valid, target.numpy(tail.valid))
            tk, tv = ref.evict(Kn, Vn, t_idx)
            _quantized_vs_reference(target, dtype, case, tk, tail.keys, c.tail_bits, f"{what} tail keys")
            _quantized_vs_reference(target, dtype, case, tv, tail.values, c.tail_bits, f"{what} tail values")
            size = ref.tail_bytes(case.batch, case.kv_heads, t_idx.shape[-1], case.d, c.tail_bits,
                                  8 if dtype == "float64" else 4)
    else:
        J = case.n
        if tail is not None:
            _fail(f"{what} tail", target, dtype, case, "no tail on a layer that was not compressed", "a tail")
        if not (max(n_b) <= c.sinks + 1 or (plan.cut == case.n).all()):
            _fail(f"{what} skipped", target, dtype, case, "compression", f"skipped: {report.reason}")
    size += ref.kv_bytes(case.batch, case.kv_heads, J, case.d, ITEMSIZE[dtype])
    _equal(f"{what} report bytes_after", target, dtype, case, size, report.bytes_after)
    _close(f"{what} report budget", target, dtype, case, np.asarray(plan.cut) / np.asarray(n_b), report.budget,
           atol=0, rtol=0)


def check_plan(target: Target, case: LayerCase, dtype: str) -> None:
    """The composed layer: plan_layer and compress_layer against the reference, and the same for
    two layers planned together (plan_layers, compress_layers): each layer as if alone."""
    (q, K, V), (qn, Kn, Vn) = inputs(target, case, dtype)
    c, st = case.config, list(case.start)
    # A second layer of the same shapes with other scores: negated queries, keys reversed along d.
    q2n, K2n, V2n = -qn, Kn[..., ::-1].copy(), Vn[..., ::-1].copy()
    q2, K2, V2 = (target.array(x, dtype) for x in (q2n, K2n, V2n))
    with target.active():
        plan = refreekv.plan_layer(q, K, c, values=V, start=st)
        one = refreekv.compress_layer(q, K, V, c, layer=5, start=st)
        both = refreekv.plan_layers([q, q2], [K, K2], c, values=[V, V2], start=st)
        pair = refreekv.compress_layers([q, q2], [K, K2], [V, V2], c, layers=[5, 6], start=st)
    want_idx = _plan_vs_reference(target, dtype, case, plan, qn, Kn)
    _compressed_vs_reference(target, dtype, case, plan, one, Kn, Vn, want_idx)
    for i, (qi, Ki, Vi) in enumerate(((qn, Kn, Vn), (q2n, K2n, V2n))):
        idx_i = _plan_vs_reference(target, dtype, case, both[i], qi, Ki, f"plan_layers[{i}]")
        _compressed_vs_reference(target, dtype, case, both[i], pair[i], Ki, Vi, idx_i, f"compress_layers[{i}]")


def check_batch_invariance(target: Target, case: LayerCase, dtype: str) -> None:
    """Each sample alone (its padding removed) gets the batch's cut and kept positions, unless
    the reference says the decision is within float noise."""
    (q, K, V), (qn, Kn, _) = inputs(target, case, dtype)
    c = case.config
    with target.active():
        batch = refreekv.plan_layer(q, K, c, values=V, start=list(case.start))
        for b, s in enumerate(case.start):
            k_alone = min(case.rows, case.n - s)  # an engine captures at most n_b query rows
            alone = refreekv.plan_layer(target.array(qn[b:b + 1, :, case.rows - k_alone:], dtype),
                                        target.array(Kn[b:b + 1, :, s:], dtype), c)
            k_b = ref.rows_for(c, case.n - s)
            a_b = ref.attention_row(qn[b:b + 1, :, case.rows - k_b:], Kn[b:b + 1, :, s:], rows=[k_b], combine=c.combine)
            order_b = target.numpy(alone.order)
            r = ref.norm_ratio_curve(a_b, order_b, sinks=c.sinks, norm_scope=c.norm_scope, norm=c.norm, heads=c.heads)
            mass = _mass_curve(c, a_b, order_b, None)
            lo, hi = (config_cut_range(c, r[0], None if mass is None else mass[0], tolerance(dtype).ratio_atol,
                                       case.n - s)
                      if c.halting == "threshold" else (alone.cut[0], alone.cut[0]))
            if lo == hi and batch.cut[b] != alone.cut[0]:
                _fail("batch invariance cut", target, dtype, case, f"sample {b}'s cut alone: {alone.cut[0]}",
                      f"in the batch: {batch.cut[b]}")
            if batch.cut[b] == alone.cut[0] and RANKINGS[c.ranking].newest_run:
                cb = int(batch.cut[b])
                _equal("batch invariance kept positions", target, dtype, case,
                       target.numpy(alone.idx)[0, :, :cb] + s, target.numpy(batch.idx)[b, :, :cb])


def check_errors(target: Target, dtype: str) -> None:
    """Bad input raises ReFreeKVError naming the argument, never a framework error."""
    rng = np.random.default_rng(0)
    q, K = rng.normal(size=(1, 4, 1, 8)), rng.normal(size=(1, 2, 12, 8))
    nan_K, inf_q = K.copy(), q.copy()
    nan_K[0, 1, 3, 2], inf_q[0, 0, 0, 0] = np.nan, np.inf
    A = lambda a, dt=dtype: target.array(a, dt)  # noqa: E731
    # The paper's configuration needs one query row, so each call's error is about the argument at fault.
    P = lambda q_, K_, config=refreekv.ReFreeKVConfig.paper(), **kw: refreekv.plan_layer(q_, K_, config, **kw)  # noqa: E731
    bad = [
        ("NaN in keys", "keys", lambda: P(A(q), A(nan_K))),
        ("inf in q_rows", "q_rows", lambda: P(A(inf_q), A(K))),
        ("integer keys", "keys", lambda: P(A(q), A(np.ones((1, 2, 12, 8)), "int32"))),
        ("H not a multiple of Hkv", "q_rows", lambda: P(A(q[:, :3]), A(K))),
        ("head dims differ", "keys", lambda: P(A(q), A(K[..., :4]))),
        ("empty prompt", "keys", lambda: P(A(q), A(K[:, :, :0]))),
        ("keys of rank 3", "keys", lambda: P(A(q), A(K[0]))),
        ("start past the prompt", "start", lambda: P(A(q), A(K), start=[12])),
        ("too few query rows for H2O", "q_rows",
         lambda: P(A(q), A(K), refreekv.ReFreeKVConfig(ranking="h2o", query_rows=32))),
        ("values of another length", "values", lambda: P(A(q), A(K), values=A(K[:, :, :5]))),
        ("zero query heads", "q_rows", lambda: P(A(q[:, :0]), A(K))),
        ("zero head dim", "q_rows", lambda: P(A(q[..., :0]), A(K[..., :0]))),
        ("scale NaN", "scale", lambda: P(A(q), A(K), scale=float("nan"))),
        ("values None", "values", lambda: refreekv.compress_layer(A(q), A(K), None)),
        ("NaN in values", "values", lambda: refreekv.compress_layer(A(q), A(K), A(nan_K), refreekv.ReFreeKVConfig.paper())),
        ("positions past the prompt", "idx",
         lambda: refreekv.evict(A(K), A(K), target.backend.from_numpy(np.full((1, 2, 3), 12), "int64"))),
        ("an order that is no ranking", "order",
         lambda: refreekv.kept_positions(target.backend.from_numpy(np.zeros((1, 2, 12)), "int64"), [3])),
        ("a ranking without the sinks first", "order",
         lambda: refreekv.norm_ratio_curve(A(np.ones((1, 4, 12))), target.backend.from_numpy(
             np.broadcast_to(np.arange(12)[::-1], (1, 2, 12)).copy(), "int64"), sinks=2)),
        ("NaN in a ratio curve", "ratio",
         lambda: refreekv.threshold_cut(A(np.full((1, 12), np.nan)), threshold=0.01, sinks=2)),
    ]
    big = {"float64": 1e160, "float32": 1e20, "bfloat16": 1e20}.get(dtype)  # finite, but q.K overflows
    if big is not None:  # (float16 inputs cannot overflow the float32 scores)
        bad.append(("finite inputs whose logits overflow", "keys", lambda: P(A(q * big), A(K * big))))
    with target.active(valid_inputs=False):
        for what, argument, call in bad:
            try:
                call()
            except refreekv.ReFreeKVError as err:
                if not str(err).startswith(argument):
                    _fail("error message", target, dtype, what, f"a message starting with {argument!r}", str(err))
            except Exception as err:  # noqa: BLE001 - the point is to report it
                _fail("error type", target, dtype, what, "refreekv.ReFreeKVError", f"{type(err).__name__}: {err}")
            else:
                _fail("error raised", target, dtype, what, "refreekv.ReFreeKVError", "no error")
        # No false alarm: large finite values are finite (a check that sums float16 values in float16
        # overflows past 65504 and would refuse a valid cache).
        big_V = np.full_like(K, 6e4 if dtype in ("float16", "bfloat16") else 1e30)
        try:
            refreekv.compress_layer(A(q), A(K), A(big_V), refreekv.ReFreeKVConfig.paper())
        except refreekv.ReFreeKVError as err:
            _fail("no error on finite values", target, dtype, f"values all {big_V.flat[0]:g} (finite)",
                  "no error", str(err))


def check_threshold_boundary(target: Target, ratio: np.ndarray, start, threshold: float, sinks: int,
                             dtype: str) -> None:
    """The stopping rule exactly at the boundary: curves of exact values with ``T`` equal to one of
    them. The cut is the first prefix with ``ratio <= T`` (SPEC decision 3), with no tolerance."""
    case = f"ratio={ratio.tolist()}, start={tuple(start)}, threshold={threshold!r}, sinks={sinks}"
    cdt = "float64" if dtype == "float64" else "float32"
    with target.active():
        cut = target.numpy(refreekv.threshold_cut(target.array(ratio, cdt), threshold=threshold, sinks=sinks,
                                                  start=list(start)))
    _equal("threshold_cut at ratio == T", target, dtype, case,
           ref.threshold_cut(ratio, threshold=threshold, sinks=sinks, start=start), cut)


def check_retained_layers(target: Target, case: LayerCase, dtype: str) -> None:
    """``compress_layers`` leaves a retained layer as it is (same arrays, a "retained layer"
    report) and compresses the others as the reference does."""
    (q, K, V), (qn, Kn, Vn) = inputs(target, case, dtype)
    c = dataclasses.replace(case.config, retained_layers=(3,))
    st = list(case.start)
    with target.active():
        kept, other = refreekv.compress_layers([q, q], [K, K], [V, V], c, layers=[3, 4], start=st)
        plan = refreekv.plan_layer(q, K, c, start=st)
    if kept.report.compressed or kept.report.reason != "retained layer" or kept.valid is not None:
        _fail("retained layer", target, dtype, case, "layer 3 left alone (report: retained layer)",
              f"compressed={kept.report.compressed}, reason={kept.report.reason!r}")
    _equal("retained layer keys", target, dtype, case, Kn, target.numpy(kept.keys))
    _equal("retained layer values", target, dtype, case, Vn, target.numpy(kept.values))
    idx = _plan_vs_reference(target, dtype, case, plan, qn, Kn, "retained-layers plan")
    _compressed_vs_reference(target, dtype, dataclasses.replace(case, config=c), plan, other, Kn, Vn, idx,
                             "compress_layers next to a retained layer")


def check_keep_newest(target: Target, case: LayerCase, dtype: str) -> None:
    """``keep_newest`` (the turn ``replan="history"`` keeps whole) under the position ranking: the cut
    is the reference's ``newest_floor_cut`` of the same plan's cut without it, the kept positions and
    the evicted K/V follow the reference, and every sample keeps its ``keep_newest`` newest tokens."""
    (q, K, V), (qn, Kn, Vn) = inputs(target, case, dtype)
    c = dataclasses.replace(case.config, ranking="position")
    st = list(case.start)
    keep = np.random.default_rng(case.seed).integers(0, case.n + 1, size=case.batch)
    with target.active():
        free = refreekv.plan_layer(q, K, c, start=st)
        held = refreekv.plan_layer(q, K, c, start=st, keep_newest=keep.tolist())
        out = refreekv.compress_layer(q, K, V, c, start=st, keep_newest=keep.tolist())
    want = ref.newest_floor_cut(free.cut, keep, sinks=c.sinks, n=case.n, start=case.start)
    detail = f"keep_newest={keep.tolist()}, cut without it {free.cut.tolist()}"
    if not np.array_equal(want, held.cut):
        _fail("keep_newest cut", target, dtype, case, want.tolist(), held.cut.tolist(), detail)
    want_idx, want_valid = ref.kept_positions(target.numpy(held.order), held.cut)
    _equal("keep_newest kept positions", target, dtype, case, want_idx, target.numpy(held.idx))
    _equal("keep_newest valid slots", target, dtype, case, want_valid, target.numpy(held.valid))
    for b, s in enumerate(case.start):
        newest = set(range(max(s, case.n - int(keep[b])), case.n))
        for h in range(case.kv_heads):
            kept = set(want_idx[b, h][want_valid[b]].tolist())
            if not newest <= kept:
                _fail("keep_newest keeps the newest", target, dtype, case, sorted(newest),
                      sorted(kept), f"sample {b}, KV head {h}; {detail}")
    _compressed_vs_reference(target, dtype, dataclasses.replace(case, config=c), held, out, Kn, Vn, want_idx,
                             "compress_layer with keep_newest")


def _unpack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes from their stored bytes (``reference.pack``'s layout), int64."""
    codes = np.asarray(codes).astype(np.int64)
    if bits == 8:
        return codes
    return np.stack([codes % 16, codes // 16], axis=-1).reshape(*codes.shape[:-1], 2 * codes.shape[-1])


def _quantized_vs_reference(target: Target, dtype: str, case, x: np.ndarray, q, bits: int, what: str) -> None:
    """A ``Quantized`` of the float64 read-back ``x`` against ``reference.quantize``: biases exact (a
    group's minimum), scales to float32 rounding, every code equal to the reference's except within
    ``code_margin`` of a rounding tie (then one off at most), and ``dequantize`` equal to the reference's
    dequantization of the backend's own codes, and within half a scale of ``x``."""
    tol = tolerance(dtype)
    group = ref.quant_group(x.shape[-1])
    want_codes, want_s, want_b = ref.quantize(x, bits, group)
    if q.bits != bits or q.group != group or q.dtype != dtype:
        _fail(f"{what} fields", target, dtype, case, f"bits {bits}, group {group}, dtype {dtype}",
              f"bits {q.bits}, group {q.group}, dtype {q.dtype}")
    if target.backend.dtype_name(q.codes) != "uint8":
        _fail(f"{what} codes dtype", target, dtype, case, "uint8", target.backend.dtype_name(q.codes))
    _equal(f"{what} biases", target, dtype, case, want_b, target.numpy(q.biases))
    rel = 1e-15 if dtype == "float64" else 2.4e-7
    _close(f"{what} scales", target, dtype, case, want_s, target.numpy(q.scales), atol=0, rtol=4 * rel)
    got = _unpack(target.numpy(q.codes), bits)
    if got.shape != want_codes.shape:
        _fail(f"{what} codes", target, dtype, case, f"shape {want_codes.shape}", f"shape {got.shape}")
    s = np.repeat(want_s, group, axis=-1)
    raw = np.where(s > 0, (x - np.repeat(want_b, group, axis=-1)) / np.where(s > 0, s, 1), 0)
    tie = np.abs(raw - np.floor(raw) - 0.5) <= tol.code_margin
    off = np.abs(got - want_codes)
    bad = (off > 1) | ((off == 1) & ~tie)
    if bad.any():
        at = tuple(int(i) for i in np.argwhere(bad)[0])
        _fail(f"{what} codes", target, dtype, case, f"{want_codes[at]} at index {at}", f"{got[at]}",
              f"(x - bias) / scale = {raw[at]!r} (a code may be one off only within {tol.code_margin:g} of a tie)")
    with target.active():
        back = target.numpy(refreekv.dequantize(q))
    want = ref.dequantize(target.numpy(q.codes), target.numpy(q.scales), target.numpy(q.biases), bits, group)
    _close(f"{what} dequantize", target, dtype, case, want, back, atol=tol.cast_rtol * float(np.abs(want).max(initial=0)),
           rtol=tol.cast_rtol)
    slack = s * (0.5 + 2 * tol.code_margin) + tol.cast_rtol * np.abs(x) + 4 * rel * np.abs(x)
    if (np.abs(back - x) > slack).any():
        at = tuple(int(i) for i in np.argwhere(np.abs(back - x) > slack)[0])
        _fail(f"{what} round trip", target, dtype, case, f"within half a scale ({s[at] / 2!r}) of {x[at]!r}",
              f"{back[at]!r} at index {at}")


def check_tail(target: Target, case: LayerCase, dtype: str, bits: int) -> None:
    """The tail (what a plan evicts, kept at ``bits`` bits): ``tail_positions`` of a given order and
    cut and of a real plan, exact; ``quantize_tail``'s K and V, and ``quantize`` over two groups of 64,
    against the reference (``_quantized_vs_reference``)."""
    (q, K, V), (qn, Kn, Vn) = inputs(target, case, dtype)
    c = case.config
    order = ref.position_ranking(case.batch, case.kv_heads, case.n, sinks=c.sinks, start=case.start)
    if RANKINGS[c.ranking].scores is not None:
        order = ref.attention_ranking(np.abs(Kn).sum(-1), sinks=c.sinks, window=c.window, start=case.start)
    cut = np.array([1 + (case.seed + 7 * b) % (case.n - s) for b, s in enumerate(case.start)])
    want_idx, want_valid = ref.tail_positions(order, cut, start=case.start)
    st = list(case.start)
    with target.active():
        idx, valid = refreekv.tail_positions(target.array(order, "int64"), cut, start=st)
        plan = refreekv.plan_layer(q, K, c, values=V, start=st)
        tail = refreekv.quantize_tail(K, V, plan, bits=bits)
        wide = np.concatenate([Kn[..., :1] * 0 + Kn.sum(-1, keepdims=True)] * 64 + [Vn] * (64 // case.d), axis=-1)
        wide_t = target.array(wide, dtype)
        wide_q = refreekv.quantize(wide_t, bits=bits)
    _equal("tail_positions idx", target, dtype, case, want_idx, target.numpy(idx))
    _equal("tail_positions valid", target, dtype, case, want_valid, target.numpy(valid))
    p_idx, p_valid = ref.tail_positions(target.numpy(plan.order), plan.cut, start=case.start)
    _equal("quantize_tail idx", target, dtype, case, p_idx, target.numpy(tail.idx))
    _equal("quantize_tail valid", target, dtype, case, p_valid, target.numpy(tail.valid))
    tk, tv = ref.evict(Kn, Vn, p_idx)
    _quantized_vs_reference(target, dtype, case, tk, tail.keys, bits, "quantize_tail keys")
    _quantized_vs_reference(target, dtype, case, tv, tail.values, bits, "quantize_tail values")
    _quantized_vs_reference(target, dtype, case, target.numpy(wide_t), wide_q, bits, "quantize (two groups of 64)")
