"""The conformance suite catches realistic porting bugs, each at the ``ci`` profile.

Every bug below is planted in a copy of the NumPy backend, by declaring a step (``steps = {...}``)
or overriding a primitive, the way a porting mistake would enter a real backend. Each one is run
through the shipped suite's own test (its own strategies, the ``ci`` profile's derandomized
examples, no shrinking) and must fail it with a ConformanceError that says expected, found and how
to reproduce. docs/conformance.md lists which check catches which bug.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import Phase, settings

from refreekv import core
from refreekv.adapters.backends.numpy import NumpyBackend
from refreekv.testing import ConformanceError, ConformanceSuite, Target

try:
    BaseExceptionGroup
except NameError:  # Python 3.10: hypothesis depends on the backport
    from exceptiongroup import BaseExceptionGroup


class UnstableTies(NumpyBackend):
    name = "broken-unstable-ties"

    def argsort_stable(self, x, axis=-1):  # equal keys come out in reverse order
        n = x.shape[axis]
        return (n - 1) - np.flip(np.argsort(np.flip(x, axis), axis=axis, kind="stable"), axis)


def _off_by_one(be, ratio, threshold, sinks, start):
    return np.minimum(core.threshold_cut(be, ratio, threshold, sinks, start) + 1, ratio.shape[-1] - start)


class OffByOneCut(NumpyBackend):
    name = "broken-off-by-one"
    steps = {"threshold_cut": _off_by_one}


class SinksDropped(NumpyBackend):
    name = "broken-no-sinks"
    steps = {"position_ranking": lambda be, batch, num_kv_heads, n, sinks, start:
             core.position_ranking(be, batch, num_kv_heads, n, 0, start)}


def _interleaved_scores(be, q_rows, keys, scale=None):
    # Query head h reads KV head h % Hkv (interleaved) instead of h // g.
    B, H, k, d = q_rows.shape
    Hkv = keys.shape[1]
    perm = np.arange(H).reshape(H // Hkv, Hkv).T.reshape(-1)  # new head order grouped by h % Hkv
    return core.attention_scores(be, q_rows[:, perm], keys, scale)[:, np.argsort(perm)]


class WrongGroup(NumpyBackend):
    name = "broken-gqa-group"
    steps = {"attention_scores": _interleaved_scores}


class HalfSoftmax(NumpyBackend):
    name = "broken-half-softmax"

    def exp(self, x):
        return np.exp(x.astype(np.float16)).astype(x.dtype)


def _first_prefix(meets):
    """threshold_cut with ``meets(ratio, T)`` for ``ratio <= T`` and no T = 0 case."""
    def cut(be, ratio, threshold, sinks, start):
        n = ratio.shape[-1]
        n_b = n - start
        ok = meets(ratio, threshold) | (np.arange(n)[None, :] >= (n_b - 1)[:, None])
        return np.minimum(np.maximum(np.argmax(ok, axis=-1) + 1, np.minimum(n_b, sinks + 1)), n_b)
    return cut


_strict_less = _first_prefix(np.less)


class StrictLess(NumpyBackend):
    name = "broken-strict-less"
    steps = {"threshold_cut": _strict_less}


def _batch_leak(be, ratio, threshold, sinks, start):
    cut = core.threshold_cut(be, ratio, threshold, sinks, start)
    return np.minimum(np.full_like(cut, cut.max()), ratio.shape[-1] - start)  # one cut for all


class BatchLeak(NumpyBackend):
    name = "broken-batch-leak"
    steps = {"threshold_cut": _batch_leak}


def _softmax_unshifted(be, q_rows, keys, start, rows, scale=None):
    # exp(logits) / sum without subtracting the row maximum: overflows for logits above ~88.
    logits = core.attention_scores(be, q_rows, keys, scale)
    _, _, k, n = logits.shape
    visible = core.visibility(be, k, n, start, rows)
    with np.errstate(all="ignore"):
        e = np.where(visible, np.exp(logits.astype(np.float32)), 0.0)
        return (e / np.where(e.sum(-1, keepdims=True) > 0, e.sum(-1, keepdims=True), 1.0)), visible


class NoMaxSubtraction(NumpyBackend):
    name = "broken-softmax-without-max"
    steps = {"attention_rows": _softmax_unshifted}


def _unscaled_norms(be, a, order, sinks, norm_scope, start, norm="l2", heads="mean"):
    # Squares the raw scores: in float32, scores under ~1e-19 square to 0.
    B, H, n = a.shape
    g = H // order.shape[1]
    ranked = np.take_along_axis(a.reshape(B, order.shape[1], g, n), order[:, :, None, :], -1).reshape(B, H, n)
    if norm_scope == "candidates":
        m = np.minimum(n - start, sinks)
        ranked = np.where(np.arange(n)[None, None, :] < m[:, None, None], 0.0, ranked).astype(a.dtype)
    kept = np.cumsum(ranked, -1) if norm == "l1" else np.sqrt(np.cumsum(ranked * ranked, -1))
    full = kept[..., -1:]
    if heads == "max":
        return np.max(np.where(full > 0, 1 - kept / np.where(full > 0, full, 1), 0.0), axis=1)
    kept, full = kept.mean(1), full.mean(1)
    return np.where(full > 0, 1 - kept / np.where(full > 0, full, 1), 0.0)


class NoScaleBeforeSquares(NumpyBackend):
    name = "broken-unscaled-squares"
    steps = {"norm_ratio_curve": _unscaled_norms}


def _rows_without_causality(be, q_rows, keys, start, rows, scale=None):
    # Eq. 2's rows without the causal mask: every row sees every real position (the research code's bug).
    logits = core.attention_scores(be, q_rows, keys, scale)
    B, H, k, n = logits.shape
    visible = np.broadcast_to((np.arange(n)[None, :] >= start[:, None])[:, None, None, :], (B, 1, k, n))
    m = np.where(visible, logits, -np.inf)
    e = np.exp(m - m.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True), visible


class NoCausalMask(NumpyBackend):
    name = "broken-eq2-no-causal-mask"
    steps = {"attention_rows": _rows_without_causality}


def _mean_over_k(be, q_rows, keys, start, rows, scale=None, combine="mean"):
    # Eq. 2 divided by k instead of each column's count of rows that see it.
    A, visible = core.attention_rows(be, q_rows, keys, start, rows, scale)
    if A.shape[2] == 1 or combine == "max":
        return core.combine_rows(be, A, visible, combine)
    return A.sum(2) / np.maximum(rows, 1)[:, None, None]


class EqTwoDividedByK(NumpyBackend):
    name = "broken-eq2-divided-by-k"
    steps = {"attention_row": _mean_over_k}


class PaddingIgnored(NumpyBackend):
    name = "broken-padding-ignored"
    steps = {"position_ranking": lambda be, batch, num_kv_heads, n, sinks, start:
             core.position_ranking(be, batch, num_kv_heads, n, sinks, np.zeros_like(start))}


class SinksInTheNorm(NumpyBackend):
    name = "broken-sinks-in-candidates-norm"
    steps = {"norm_ratio_curve": lambda be, a, order, sinks, norm_scope, start, norm="l2", heads="mean":
             core.norm_ratio_curve(be, a, order, sinks, "all", start, norm, heads)}


def _mean_of_ratios(be, a, order, sinks, norm_scope, start, norm="l2", heads="mean"):
    # Averages per-head ratios instead of taking the ratio of the mean norms (the Uni-Metric).
    if heads == "max":
        return core.norm_ratio_curve(be, a, order, sinks, norm_scope, start, norm, heads)
    per_head = [core.norm_ratio_curve(be, a[:, h:h + 1], order[:, h // (a.shape[1] // order.shape[1])][:, None],
                                      sinks, norm_scope, start, norm, heads) for h in range(a.shape[1])]
    return np.mean(per_head, axis=0)


class MeanOfRatios(NumpyBackend):
    name = "broken-mean-of-ratios"
    steps = {"norm_ratio_curve": _mean_of_ratios}


def _unsorted_kept(be, order, cut, J):
    idx, valid = core.kept_positions(be, order, cut, J)
    return np.flip(idx, -1).copy() if J > 1 else idx, valid  # in rank order, not ascending


class UnsortedKept(NumpyBackend):
    name = "broken-unsorted-kept-positions"
    steps = {"kept_positions": _unsorted_kept,
             "position_kept_positions": lambda be, start, cut, sinks, n, Hkv, J: _unsorted_kept(
                 be, core.position_ranking(be, len(cut), Hkv, n, sinks, start), cut, J)}


def _values_from_keys(be, keys, values, idx):
    k2, _ = core.evict(be, keys, values, idx)
    return k2, k2.copy()


class ValuesFromKeys(NumpyBackend):
    name = "broken-values-gathered-from-keys"
    steps = {"evict": _values_from_keys, "evict_runs": lambda be, keys, values, start, sinks, recent:
             (core.evict_runs(be, keys, values, start, sinks, recent)[0],) * 2}


class ScaleByD(NumpyBackend):
    name = "broken-scale-1-over-d"
    steps = {"attention_scores": lambda be, q, K, scale=None: core.attention_scores(
        be, q, K, 1.0 / q.shape[-1] if scale is None else scale)}


class HalfCumsum(NumpyBackend):
    name = "broken-cumsum-in-half"

    def cumsum(self, x, axis):
        return np.cumsum(x.astype(np.float16), axis=axis).astype(x.dtype)


class LongestPrefix(NumpyBackend):
    name = "broken-last-crossing"
    steps = {"threshold_cut": lambda be, ratio, threshold, sinks, start: np.minimum(np.maximum(
        ratio.shape[-1] - np.argmax(np.flip(ratio > threshold, -1), -1), np.minimum(ratio.shape[-1] - start, sinks + 1)),
        ratio.shape[-1] - start)}


# The rule without its T = 0 case: the first prefix whose (rounded) ratio is 0 is cut, so a tail
# below the dtype's resolution, or with exactly-zero attention, goes at T = 0.
_zero_threshold_evicts = _first_prefix(np.less_equal)


class ZeroThresholdEvicts(NumpyBackend):
    name = "broken-zero-threshold-evicts"
    steps = {"threshold_cut": _zero_threshold_evicts}


class MassFloorAsCeiling(NumpyBackend):
    # The mass floor combined with min instead of max: the floor lowers the cut it should raise.
    name = "broken-mass-floor-min"
    steps = {"mass_floor_cut": lambda be, a, order, cut, mass_threshold, sinks, norm_scope, heads, start:
             cut if mass_threshold is None else np.minimum(cut, core.threshold_cut(
                 be, core.norm_ratio_curve(be, a, order, sinks, norm_scope, start, "l1", heads), mass_threshold,
                 sinks, start))}


class ArgmaxLast(NumpyBackend):
    # A framework whose argmax returns the last of equal maxima (the core's first-index rule needs the first).
    name = "broken-argmax-last-of-ties"

    def argmax(self, x, axis=-1):
        return x.shape[axis] - 1 - np.argmax(np.flip(x, axis), axis=axis)


class FusedDecideWithoutFloor(NumpyBackend):
    # A fused decide written before the mass floor existed: it drops the new config field.
    name = "broken-fused-decide-drops-mass-floor"
    steps = {"decide": lambda be, logits, start, rows, sinks, scope, norm, heads, combine, threshold, hkv,
             mass_threshold=None: core.decide(be, logits, start, rows, sinks, scope, norm, heads, combine, threshold,
                                              hkv, None)}


class RecentRunShifted(NumpyBackend):
    # The two-run eviction of the position ranking takes the recent run one token early.
    name = "broken-recent-run-shifted"
    steps = {"evict_runs": lambda be, keys, values, start, sinks, recent: tuple(
        np.concatenate([x[:, :, start:start + sinks], x[:, :, x.shape[2] - recent - 1:x.shape[2] - 1]], axis=2)
        for x in (keys, values))}


class ObservationWindowShort(NumpyBackend):
    # SnapKV's observation window one query short.
    name = "broken-snapkv-window-short"
    steps = {"snapkv_scores": lambda be, q, K, start, window, pool_kernel, scale=None: core.snapkv_scores(
        be, q, K, start, max(1, window - 1), pool_kernel, scale)}


class FiniteCheckInHalf(NumpyBackend):
    # The finiteness guard summed in the input's own dtype: float16 values of a valid cache overflow
    # the sum, and the entry refuses them as NaN or infinite.
    name = "broken-finite-check-sums-in-half"

    def all_finite(self, x):
        with np.errstate(all="ignore"):
            return np.array([np.isfinite(x.sum())], dtype=np.int64)


def _combine_as_mean(be, q_rows, keys, start, rows, scale=None, combine="mean"):
    # combine="max" silently computed as the mean (a port that implements one combine only).
    A, visible = core.step(be, "attention_rows")(q_rows, keys, start, rows, scale)
    return core.combine_rows(be, A, visible, "mean")


class CombineMaxAsMean(NumpyBackend):
    name = "broken-combine-max-as-mean"
    steps = {"attention_row": _combine_as_mean}


class PoolShifted(NumpyBackend):
    # The pooled ranking's max-pool window one position off (an asymmetric padding).
    name = "broken-pool-shifted"
    steps = {"window_scores": lambda be, a, hkv, kernel, start: np.concatenate(
        [(w := core.window_scores(be, a, hkv, kernel, start))[..., 1:], w[..., -1:]], axis=-1)}


class GroupMax(NumpyBackend):
    # Query heads of a KV group combined by max instead of mean.
    name = "broken-group-max"
    steps = {"window_scores": lambda be, a, hkv, kernel, start: core.zero_padding(be, core.max_pool(
        be, a.reshape(a.shape[0], hkv, -1, a.shape[-1]).max(axis=2), kernel), start)}


class SnapKVNoPool(NumpyBackend):
    # SnapKV's scores not max-pooled (pool_kernel ignored).
    name = "broken-snapkv-no-pool"
    steps = {"snapkv_scores": lambda be, q, keys, start, window, kernel, scale=None:
             core.snapkv_scores(be, q, keys, start, window, 1, scale)}


class RunsValuesFromKeys(NumpyBackend):
    # The two-run eviction (the position ranking's fast path) returns the kept keys as values.
    name = "broken-runs-values-from-keys"
    steps = {"evict_runs": lambda be, keys, values, start, sinks, recent:
             (lambda kv: (kv[0], kv[0]))(core.evict_runs(be, keys, values, start, sinks, recent))}


class KeptDescending(NumpyBackend):
    # Kept positions (and their validity) listed newest first.
    name = "broken-kept-descending"
    steps = {"kept_positions": lambda be, order, cut, J:
             tuple(x[..., ::-1].copy() for x in core.kept_positions(be, order, cut, J))}


class MassFloorIgnored(NumpyBackend):
    # mass_threshold accepted and never applied.
    name = "broken-mass-floor-ignored"
    steps = {"mass_floor_cut": lambda be, a, order, cut, *args: cut}


class NormAlwaysL2(NumpyBackend):
    # norm="l1" (attention mass) computed as the L2 norm.
    name = "broken-norm-always-l2"
    steps = {"norm_ratio_curve": lambda be, a, order, sinks, scope, start, norm="l2", heads="mean":
             core.norm_ratio_curve(be, a, order, sinks, scope, start, "l2", heads)}


class HeadsAlwaysMean(NumpyBackend):
    # heads="max" (the most demanding head) computed as the mean over heads.
    name = "broken-heads-always-mean"
    steps = {"norm_ratio_curve": lambda be, a, order, sinks, scope, start, norm="l2", heads="mean":
             core.norm_ratio_curve(be, a, order, sinks, scope, start, norm, "mean")}


def _each_per_kv_group(be, a, order, sinks, scope, start, norm="l2", heads="mean"):
    # heads="each" averaged over KV groups (each group's Uni-Metric ratio) instead of over query heads.
    if heads != "each":
        return core.norm_ratio_curve(be, a, order, sinks, scope, start, norm, heads)
    Hkv = order.shape[1]
    g = a.shape[1] // Hkv
    return np.mean([core.norm_ratio_curve(be, a[:, j * g:(j + 1) * g], order[:, j:j + 1], sinks, scope, start,
                                          norm, "mean") for j in range(Hkv)], axis=0)


class EachPerKVGroup(NumpyBackend):
    name = "broken-each-per-kv-group"
    steps = {"norm_ratio_curve": _each_per_kv_group}


def _scale_ignored(be, q_rows, keys, scale=None):
    # The engine's scale (Gemma's query_pre_attn_scalar, a tuned softmax temperature) dropped for 1/sqrt(d).
    return core.attention_scores(be, q_rows, keys, None)


class ScaleIgnored(NumpyBackend):
    name = "broken-scale-ignored"
    steps = {"attention_scores": _scale_ignored}


class EvictFirstHeadIndex(NumpyBackend):
    # Every KV head gathered at KV head 0's kept positions (right for the position ranking, where all
    # heads keep the same positions; wrong for an attention ranking).
    name = "broken-evict-head0"
    steps = {"evict": lambda be, keys, values, idx:
             core.evict(be, keys, values, np.broadcast_to(idx[:, :1], idx.shape).copy())}


def _causal_plus_one(be, q_rows, keys, start, rows, scale=None):
    # Each score row also sees the key one position after its own (a causal mask off by one).
    logits = core.attention_scores(be, q_rows, keys, scale)
    _, _, k, n = logits.shape
    i = np.arange(k)
    qpos = i + (n - k) + 1
    pos = np.arange(n)
    visible = ((pos[None, None, :] >= start[:, None, None]) & (pos[None, None, :] <= qpos[None, :, None])
               & (qpos[None, :] - 1 >= start[:, None])[..., None] & (i[None, :] >= (k - rows)[:, None])[..., None])[:, None]
    masked = np.where(visible, logits, -np.inf)
    top = masked.max(-1, keepdims=True)
    e = np.exp(masked - np.where(np.isinf(top), 0, top))
    total = e.sum(-1, keepdims=True)
    return (e / np.where(total > 0, total, 1)).astype(logits.dtype), visible


class CausalOffByOne(NumpyBackend):
    name = "broken-causal-off-by-one"
    steps = {"attention_rows": _causal_plus_one}


def _mask_after_softmax(be, q_rows, keys, start, rows, scale=None):
    # The softmax taken over every position, the invisible ones zeroed afterwards (rows no longer sum to 1).
    logits = core.attention_scores(be, q_rows, keys, scale)
    _, visible = core.softmax_rows(be, logits, start, rows)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return np.where(visible, e / e.sum(-1, keepdims=True), 0.0).astype(logits.dtype), visible


class MaskAfterSoftmax(NumpyBackend):
    name = "broken-mask-after-softmax"
    steps = {"attention_rows": _mask_after_softmax}


def _quantize_floor(be, x, bits, group):
    # codes truncated instead of rounded: every value one code low half the time
    real_round = be.round
    be.round = np.floor
    try:
        return core.quantize(be, x, bits, group)
    finally:
        be.round = real_round


class QuantizeFloor(NumpyBackend):
    name = "broken-quantize-floor"
    steps = {"quantize": _quantize_floor}


def _scale_over_levels(be, x, bits, group):
    # s = (hi - lo) / 2^bits (the number of levels) instead of / (2^bits - 1): the top code is never reached
    codes, scales, biases = core.quantize(be, x, bits, group)
    return codes, scales * (2 ** bits - 1) / 2 ** bits, biases


class ScaleOverLevels(NumpyBackend):
    name = "broken-scale-over-levels"
    steps = {"quantize": _scale_over_levels}


def _nibbles_swapped(be, x, bits, group):
    # at 4 bits the even position packed into the high nibble (another layout than the spec's)
    codes, scales, biases = core.quantize(be, x, bits, group)
    return (codes % 16 * 16 + codes // 16 if bits == 4 else codes), scales, biases


class NibblesSwapped(NumpyBackend):
    name = "broken-nibbles-swapped"
    steps = {"quantize": _nibbles_swapped}


def _tail_skips_first(be, order, cut, n_b, T):
    # the tail starts one rank late: the first evicted position is neither kept nor in the tail
    return core.tail_positions(be, order, cut + 1, n_b, T)


class TailSkipsFirst(NumpyBackend):
    name = "broken-tail-skips-first"
    steps = {"tail_positions": _tail_skips_first}


def _tail_unsorted(be, order, cut, n_b, T):
    # the tail in rank order (newest first for the position ranking) instead of ascending positions
    B, Hkv, n = order.shape
    rank = np.minimum(cut[:, None] + np.arange(T)[None, :], n - 1)
    valid = (cut[:, None] + np.arange(T)[None, :]) < n_b[:, None]
    picked = np.take_along_axis(order, np.broadcast_to(rank[:, None, :], (B, Hkv, T)), axis=-1)
    return np.where(valid[:, None, :], picked, n - 1), valid


class TailUnsorted(NumpyBackend):
    name = "broken-tail-unsorted"
    steps = {"tail_positions": _tail_unsorted}


#: bug -> the shipped suite test that must catch it (docs/conformance.md lists the same table)
PLANTED = [
    (UnstableTies, "test_attention_ranking_ties"),
    (OffByOneCut, "test_plan_matches_reference"),
    (SinksDropped, "test_plan_matches_reference"),
    (WrongGroup, "test_attention_row"),
    (HalfSoftmax, "test_attention_row"),
    (StrictLess, "test_threshold_boundary"),
    (BatchLeak, "test_batch_invariance"),
    (NoMaxSubtraction, "test_attention_row"),
    (NoScaleBeforeSquares, "test_ratio_and_cut"),
    (NoCausalMask, "test_attention_row"),
    (EqTwoDividedByK, "test_attention_row"),
    (PaddingIgnored, "test_plan_matches_reference"),
    (SinksInTheNorm, "test_ratio_and_cut"),
    (MeanOfRatios, "test_ratio_and_cut"),
    (UnsortedKept, "test_plan_matches_reference"),
    (ValuesFromKeys, "test_plan_matches_reference"),
    (ScaleByD, "test_attention_row"),
    (HalfCumsum, "test_ratio_and_cut"),
    (LongestPrefix, "test_threshold_boundary"),
    (ZeroThresholdEvicts, "test_threshold_boundary"),
    (MassFloorAsCeiling, "test_plan_matches_reference"),
    (ArgmaxLast, "test_threshold_boundary"),
    (FusedDecideWithoutFloor, "test_plan_matches_reference"),
    (RecentRunShifted, "test_plan_matches_reference"),
    (ObservationWindowShort, "test_scores_and_rankings"),
    (FiniteCheckInHalf, "test_errors"),
    (CombineMaxAsMean, "test_attention_row"),
    (PoolShifted, "test_scores_and_rankings"),
    (GroupMax, "test_scores_and_rankings"),
    (SnapKVNoPool, "test_scores_and_rankings"),
    (RunsValuesFromKeys, "test_keep_newest"),
    (KeptDescending, "test_kept_positions_and_evict"),
    (MassFloorIgnored, "test_plan_matches_reference"),
    (NormAlwaysL2, "test_ratio_and_cut"),
    (HeadsAlwaysMean, "test_ratio_and_cut"),
    (EachPerKVGroup, "test_ratio_and_cut"),
    (ScaleIgnored, "test_plan_matches_reference"),
    (EvictFirstHeadIndex, "test_kept_positions_and_evict"),
    (CausalOffByOne, "test_attention_row"),
    (MaskAfterSoftmax, "test_attention_row"),
    (QuantizeFloor, "test_tail_matches_reference"),
    (ScaleOverLevels, "test_tail_matches_reference"),
    (NibblesSwapped, "test_tail_matches_reference"),
    (TailSkipsFirst, "test_tail_matches_reference"),
    (TailUnsorted, "test_tail_matches_reference"),
]
#: bugs that only a float16 target shows (every other bug is run on float32)
HALF_ONLY = {FiniteCheckInHalf}

# The ci profile's examples, without the shrink phase (a bug is caught or not before shrinking).
settings.register_profile("ci-no-shrink", settings.get_profile("ci"), phases=[Phase.explicit, Phase.generate],
                          database=None)


@pytest.mark.parametrize("backend,test", PLANTED, ids=[b.name for b, _ in PLANTED])
def test_planted_bug_is_caught_at_the_ci_profile(backend, test):
    settings.load_profile("ci-no-shrink")
    try:
        target = Target(backend(), ("float16",) if backend in HALF_ONLY else ("float32",))
        with pytest.raises((ConformanceError, BaseExceptionGroup)) as info:
            getattr(ConformanceSuite(), test)(target)
    finally:
        settings.load_profile("ci")
    errors = _leaves(info.value)  # hypothesis reports several distinct failures as one group
    assert all(isinstance(e, ConformanceError) for e in errors), errors
    msg = str(errors[0])
    assert f"backend: {backend.name}" in msg
    assert "expected:" in msg and "found:" in msg and "reproduce: refreekv.testing.check_" in msg


def _leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for e in error.exceptions for leaf in _leaves(e)]
    return [error]


def test_enough_planted_bugs():
    assert len(PLANTED) >= 15 and len({b for b, _ in PLANTED}) == len(PLANTED)


def test_the_real_backend_passes_the_same_tests():
    """Guard against checks that fail everything: the unbroken NumPy backend passes each test used above."""
    settings.load_profile("ci-no-shrink")
    try:
        for name in sorted({t for _, t in PLANTED}):
            getattr(ConformanceSuite(), name)(Target(NumpyBackend(), ("float32",)))
        getattr(ConformanceSuite(), "test_errors")(Target(NumpyBackend(), ("float16",)))
    finally:
        settings.load_profile("ci")
