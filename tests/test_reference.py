"""The reference against hand-worked examples and the paper's invariants."""

import math

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from refreekv import ReFreeKVConfig
from refreekv import reference as R
from refreekv.testing import layer_cases


def uniform_case(n, heads=1, kv_heads=1, d=4):
    """q = 0 gives every visible logit 0: the last token attends 1/n to each position."""
    return np.zeros((1, heads, 1, d)), np.random.default_rng(0).normal(size=(1, kv_heads, n, d))


def test_hand_worked_candidates_scope():
    # n = 6, m = 1, a = 1/6 everywhere. Ranking [0, 5, 4, 3, 2, 1]. With the sink masked out,
    # a prefix of length j holds j - 1 candidates: ratio[j] = 1 - sqrt((j - 1) / 5).
    # T = 0.2 needs sqrt((j - 1) / 5) >= 0.8, i.e. j - 1 >= 3.2, so j = 5: keep {0, 2, 3, 4, 5}.
    q, K = uniform_case(6)
    cfg = ReFreeKVConfig.paper(threshold=0.2, sinks=1)
    plan = R.plan_layer(q, K, cfg)
    assert plan["order"][0, 0].tolist() == [0, 5, 4, 3, 2, 1]
    np.testing.assert_allclose(plan["ratio"][0], [1 - math.sqrt((j - 1) / 5) for j in range(1, 7)], atol=1e-12)
    assert plan["cut"].tolist() == [5]
    assert plan["idx"][0, 0].tolist() == [0, 2, 3, 4, 5]


def test_hand_worked_all_scope():
    # Same prompt, norm over the whole row: ratio[j] = 1 - sqrt(j / 6); j / 6 >= 0.64 -> j = 4.
    q, K = uniform_case(6)
    plan = R.plan_layer(q, K, ReFreeKVConfig.paper(threshold=0.2, sinks=1, norm_scope="all"))
    np.testing.assert_allclose(plan["ratio"][0], [1 - math.sqrt(j / 6) for j in range(1, 7)], atol=1e-12)
    assert plan["cut"].tolist() == [4]
    assert plan["idx"][0, 0].tolist() == [0, 3, 4, 5]


def test_hand_worked_eq2_two_rows():
    # Zero keys: the query at position 1 sees {0, 1} (1/2 each), the one at 2 sees {0, 1, 2}
    # (1/3 each). Eq. 2 divides each column by the rows that see it:
    # a = [(1/2 + 1/3) / 2, (1/2 + 1/3) / 2, (1/3) / 1].
    q, K = np.ones((1, 1, 2, 4)), np.zeros((1, 1, 3, 4))
    np.testing.assert_allclose(R.attention_row(q, K)[0, 0], [5 / 12, 5 / 12, 1 / 3], atol=1e-15)


def test_hand_worked_max_combine():
    # The two rows of the Eq. 2 example: max over the rows that see a column.
    q, K = np.ones((1, 1, 2, 4)), np.zeros((1, 1, 3, 4))
    np.testing.assert_allclose(R.attention_row(q, K, combine="max")[0, 0], [1 / 2, 1 / 2, 1 / 3], atol=1e-15)


def test_hand_worked_l1_norm():
    # n = 6, m = 1, a = 1/6: a prefix of length j holds (j - 1) / 5 of the candidates' mass.
    # T = 0.2 needs (j - 1) / 5 >= 0.8, so j = 5 (the L2 norm also gives 5 here: 1 - sqrt(4/5) < 0.2).
    q, K = uniform_case(6)
    plan = R.plan_layer(q, K, ReFreeKVConfig.paper(threshold=0.2, sinks=1, norm="l1"))
    np.testing.assert_allclose(plan["ratio"][0], [1 - (j - 1) / 5 for j in range(1, 7)], atol=1e-12)
    assert plan["cut"].tolist() == [5]
    # T = 0.45: L1 needs (j - 1) / 5 >= 0.55 -> j = 4; L2 needs sqrt((j - 1) / 5) >= 0.55 -> j = 3.
    assert R.plan_layer(q, K, ReFreeKVConfig.paper(threshold=0.45, sinks=1, norm="l1"))["cut"].tolist() == [4]
    assert R.plan_layer(q, K, ReFreeKVConfig.paper(threshold=0.45, sinks=1, norm="l2"))["cut"].tolist() == [3]


def test_hand_worked_max_over_heads():
    # Two heads, candidates only (no sinks), ranking [3, 2, 1, 0]. Head 0 attends to the newest
    # token only, head 1 to the oldest only. Mean: both prefixes hold half the mean norm until the
    # oldest is in; max: head 1 demands every position.
    a = np.array([[[0.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]]])
    order = R.position_ranking(1, 1, 4, sinks=0)
    mean = R.norm_ratio_curve(a, order, sinks=0)
    most = R.norm_ratio_curve(a, order, sinks=0, heads="max")
    np.testing.assert_allclose(mean[0], [0.5, 0.5, 0.5, 0.0])
    np.testing.assert_allclose(most[0], [1.0, 1.0, 1.0, 0.0])


def test_hand_worked_each_head_counts_equally():
    # Ranking [3, 2, 1, 0], no sinks. Head 0 puts 0.9 on the newest token (a large norm), head 1 spreads
    # 0.25 over all four (a small norm). The Uni-Metric ("mean") lets head 0 decide: after the newest
    # token the mean kept norm is (0.9 + 0.25) / (0.9 + 0.5) of the mean full norm. "each" weighs head 1's
    # own ratio, 1 - sqrt(j) / 2, as much as head 0's.
    a = np.array([[[0.0, 0.0, 0.0, 0.9], [0.25, 0.25, 0.25, 0.25]]])
    order = R.position_ranking(1, 1, 4, sinks=0)
    mean = R.norm_ratio_curve(a, order, sinks=0)
    each = R.norm_ratio_curve(a, order, sinks=0, heads="each")
    kept1 = [0.25 * math.sqrt(j) for j in range(1, 5)]
    np.testing.assert_allclose(mean[0], [1 - (0.9 + k) / 1.4 for k in kept1], atol=1e-12)
    np.testing.assert_allclose(each[0], [(1 - k / 0.5) / 2 for k in kept1], atol=1e-12)
    # At T = 20 %: "mean" stops after the newest token (ratio 0.179), "each" needs two (0.25, then 0.146).
    assert R.threshold_cut(mean, threshold=0.2, sinks=0).tolist() == [1]
    assert R.threshold_cut(each, threshold=0.2, sinks=0).tolist() == [2]
    # A head whose row is all 0 counts 0 in the mean of ratios (it needs nothing).
    dead = R.norm_ratio_curve(np.array([[[0.0, 0.0, 0.0, 0.9], [0.0, 0.0, 0.0, 0.0]]]), order, sinks=0, heads="each")
    np.testing.assert_allclose(dead[0], [0.0, 0.0, 0.0, 0.0], atol=1e-12)


def test_norms_of_softmax_tails_do_not_underflow():
    # Scores of 1e-200 square to 0 in float64; the norms are computed as c * ||a / c||, so a head whose
    # only candidate holds 1e-200 still needs it (ratio 1 without it), and with "each" and "max" a head
    # whose scores are 1e-200 of another head's counts by its own ratio (found by the conformance suite:
    # the core scaled, the reference underflowed, on a "large_logits" case).
    order = R.position_ranking(1, 1, 2, sinks=1)
    tail = np.array([[[1.0, 1e-200]]])
    for heads in ("mean", "max", "each"):
        np.testing.assert_allclose(R.norm_ratio_curve(tail, order, sinks=1, heads=heads)[0], [1.0, 0.0])
    two = np.array([[[0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 1e-200, 1e-200]]])  # head 1 needs both its tokens
    order = R.position_ranking(1, 1, 4, sinks=0)
    each = R.norm_ratio_curve(two, order, sinks=0, heads="each")[0]
    np.testing.assert_allclose(each, [(1 - 1 / math.sqrt(2)) / 2, 0.0, 0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(R.norm_ratio_curve(two, order, sinks=0, heads="max")[0], [1 - 1 / math.sqrt(2), 0, 0, 0],
                               atol=1e-12)


def test_pooled_scores_average_the_group_then_pool():
    a = np.array([[[0.0, 0.0, 0.9, 0.0, 0.0], [0.0, 0.3, 0.0, 0.0, 0.0]]])  # two query heads, one KV head
    np.testing.assert_allclose(R.pooled_scores(a, 1, pool_kernel=3)[0, 0], [0.15, 0.45, 0.45, 0.45, 0.0])
    np.testing.assert_allclose(R.pooled_scores(a, 1, pool_kernel=3, start=[2])[0, 0], [0, 0, 0.45, 0.45, 0.0])


def test_gqa_head_reads_its_group():
    rng = np.random.default_rng(1)
    q, K = rng.normal(size=(1, 4, 1, 8)), rng.normal(size=(1, 2, 5, 8))
    a = R.attention_row(q, K)
    for h in range(4):
        logits = K[0, h // 2] @ q[0, h, 0] / math.sqrt(8)
        np.testing.assert_allclose(a[0, h], np.exp(logits) / np.exp(logits).sum(), atol=1e-14)


def test_position_ranking_is_attention_ranking_with_equal_scores():
    for n, m, w, s in [(10, 4, 3, 0), (7, 2, 8, 2), (3, 4, 1, 0), (12, 0, 1, 5)]:
        equal = R.attention_ranking(np.ones((1, 2, n)), sinks=m, window=w, start=[s])
        assert (equal == R.position_ranking(1, 2, n, sinks=m, start=[s])).all()


def test_short_prompt_kept_whole():
    q, K = uniform_case(5)
    assert R.plan_layer(q, K, ReFreeKVConfig.paper(sinks=4, threshold=0.9))["cut"].tolist() == [5]


def _reference_plan(case, **changes):
    q, K, _ = case.arrays()
    cfg = case.config if not changes else ReFreeKVConfig(**{**case.config.__dict__, **changes})
    return R.plan_layer(q, K, cfg, start=case.start)


@given(layer_cases(max_n=200, ranking="position"))
def test_kept_set_is_sinks_plus_newest_suffix(case):
    plan = _reference_plan(case, halting="threshold", budget=None)
    for b, s in enumerate(case.start):
        n_b, c = case.n - s, int(plan["cut"][b])
        m = min(case.config.sinks, n_b)
        kept = plan["idx"][b, 0, :c].tolist()
        assert kept == list(range(s, s + m)) + list(range(case.n - (c - m), case.n))
        assert case.n - 1 in kept
        assert (plan["idx"][b] == plan["idx"][b, :1]).all()  # one cut shared by all heads


@given(layer_cases(max_n=200, ranking="position"), st.floats(0, 0.98), st.floats(0, 0.98))
def test_budget_never_grows_with_threshold(case, t1, t2):
    lo, hi = sorted((t1, t2))
    c_lo = _reference_plan(case, threshold=lo, halting="threshold", budget=None)["cut"]
    c_hi = _reference_plan(case, threshold=hi, halting="threshold", budget=None)["cut"]
    assert (c_hi <= c_lo).all()


@given(layer_cases(max_n=200))
def test_zero_threshold_keeps_every_token(case):
    # T = 0 is the full cache for every ranking, norm and scope, even where the tail's attention
    # is exactly 0 ("local" cases) or below float64's resolution (large_logits rows reach 1e-200).
    plan = _reference_plan(case, threshold=0.0, halting="threshold", budget=None)
    n_b = case.n - np.asarray(case.start)
    assert plan["cut"].tolist() == n_b.tolist()
    for b, s in enumerate(case.start):
        assert sorted(plan["idx"][b, 0, :n_b[b]].tolist()) == list(range(s, case.n))


@given(layer_cases(max_n=200, ranking="position"))
def test_kept_part_holds_enough_attention(case):
    # With one head, 1 - ||kept|| / ||full|| <= T  <=>  kept holds >= (1 - T)^2 of the squared
    # attention (L2 norm), or >= 1 - T of the attention mass (L1).
    assume(case.heads == 1)
    plan = _reference_plan(case, halting="threshold", budget=None)
    T = case.config.threshold
    for b, s in enumerate(case.start):
        a = plan["a"][b, 0]
        m = min(case.config.sinks, case.n - s)
        scope = np.ones(case.n, bool)
        scope[:s] = False
        if case.config.norm_scope == "candidates":
            scope[s:s + m] = False
        kept = np.zeros(case.n, bool)
        kept[plan["idx"][b, 0, :plan["cut"][b]]] = True
        p = 2 if case.config.norm == "l2" else 1
        total = (a[scope] ** p).sum()
        assert (a[scope & kept] ** p).sum() >= (1 - T) ** p * total - 1e-12


@given(layer_cases(max_n=200))
def test_reference_is_batch_invariant(case):
    q, K, _ = case.arrays()
    batch = R.plan_layer(q, K, case.config, start=case.start)
    for b, s in enumerate(case.start):
        k = min(case.rows, case.n - s)
        alone = R.plan_layer(q[b:b + 1, :, case.rows - k:], K[b:b + 1, :, s:], case.config)
        assert batch["cut"][b] == alone["cut"][0]
        c = int(alone["cut"][0])
        assert (batch["idx"][b, :, :c] == alone["idx"][0, :, :c] + s).all()


@given(layer_cases(max_n=200))
def test_ratio_curve_is_non_increasing_and_ends_at_zero(case):
    plan = _reference_plan(case)
    for b, s in enumerate(case.start):
        r = plan["ratio"][b, :case.n - s]
        assert (np.diff(r) <= 1e-12).all() and r[-1] == 0.0


def test_model_budget_counts_retained_layers_as_one():
    kept = np.array([[10, 8], [10, 8], [5, 2]])
    np.testing.assert_allclose(R.model_budget(kept, np.array([10, 8]), retained=(0, 1)),
                               [(1 + 1 + 0.5) / 3, (1 + 1 + 0.25) / 3])


@pytest.mark.parametrize("halting,budget,expected", [("ratio", 0.5, [50, 40]), ("ratio", 0.01, [5, 5]),
                                                     ("count", 30, [30, 30]), ("count", 500, [100, 80])])
def test_fixed_budget_cut(halting, budget, expected):
    cut = R.fixed_budget_cut(2, 100, halting=halting, budget=budget, sinks=4, start=[0, 20])
    assert cut.tolist() == expected


def test_hand_worked_mass_floor():
    # n = 6, m = 1, a = 1/6 everywhere, ranking [0, 5, 4, 3, 2, 1], candidates scope. The L2 rule at
    # T = 0.2 keeps j = 5 (test_hand_worked_candidates_scope). The mass curve is 1 - (j - 1) / 5:
    # at Tm = 0.1 it needs (j - 1) / 5 >= 0.9, so j = 6 (every token) and the floor raises the cut;
    # at Tm = 0.5 it needs j - 1 >= 2.5, j = 4, below the L2 cut, which stays.
    q, K = uniform_case(6)
    raised = R.plan_layer(q, K, ReFreeKVConfig.paper(threshold=0.2, sinks=1, mass_threshold=0.1))
    assert raised["cut"].tolist() == [6] and raised["idx"][0, 0].tolist() == [0, 1, 2, 3, 4, 5]
    np.testing.assert_allclose(raised["ratio"][0], [1 - math.sqrt((j - 1) / 5) for j in range(1, 7)], atol=1e-12)
    kept = R.plan_layer(q, K, ReFreeKVConfig.paper(threshold=0.2, sinks=1, mass_threshold=0.5))
    assert kept["cut"].tolist() == [5]


@given(layer_cases(max_n=200, ranking="position"), st.sampled_from([0.0, 0.01, 0.05, 0.3]) | st.floats(0, 0.99))
def test_mass_floor_is_the_larger_of_two_threshold_cuts(case, mass):
    # The floor's cut is max(the norm rule's cut at T, the mass rule's cut at Tm) on the same order,
    # and its kept part holds at least 1 - Tm of the scoped attention mass.
    assume(case.config.halting == "threshold")
    plain = _reference_plan(case)
    floored = _reference_plan(case, mass_threshold=mass)
    by_mass = _reference_plan(case, norm="l1", threshold=mass)
    assert floored["cut"].tolist() == np.maximum(plain["cut"], by_mass["cut"]).tolist()
    assert (floored["order"] == plain["order"]).all() and np.array_equal(floored["ratio"], plain["ratio"])
    if case.heads == 1:
        for b, s in enumerate(case.start):
            a, m = floored["a"][b, 0], min(case.config.sinks, case.n - s)
            scope = np.zeros(case.n, bool)
            scope[s + (m if case.config.norm_scope == "candidates" else 0):] = True
            kept = np.zeros(case.n, bool)
            kept[floored["idx"][b, 0, :floored["cut"][b]]] = True
            assert a[scope & kept].sum() >= (1 - mass) * a[scope].sum() - 1e-12


@pytest.mark.parametrize("value,expected", [
    (-0.1, "a number Tm with 0 <= Tm < 1"), (1.0, "a number Tm with 0 <= Tm < 1"), (float("nan"), "0 <= Tm < 1"),
    ("0.05", "a number Tm with 0 <= Tm < 1"), (True, "a number Tm with 0 <= Tm < 1"),
])
def test_mass_threshold_is_checked(value, expected):
    from refreekv import ReFreeKVError

    with pytest.raises(ReFreeKVError, match="mass_threshold") as info:
        ReFreeKVConfig(mass_threshold=value)
    assert expected in str(info.value)


def test_mass_threshold_needs_the_threshold_rule_and_round_trips():
    from refreekv import ReFreeKVError

    with pytest.raises(ReFreeKVError, match='mass_threshold: received 0.05; expected None with halting="ratio"'):
        ReFreeKVConfig(halting="ratio", budget=0.5, mass_threshold=0.05)
    assert ReFreeKVConfig(mass_threshold=np.float32(0.25)).mass_threshold == 0.25
    assert ReFreeKVConfig.from_dict(ReFreeKVConfig(mass_threshold=0.03).to_dict()).mass_threshold == 0.03


def test_quantize_by_hand():
    """refreekv.reference.quantize / pack / dequantize on values worked out by hand."""
    from refreekv import reference as ref

    x = np.array([[0.0, 1.0, 2.0, 3.0], [5.0, 5.0, 5.0, 5.0]])
    codes, s, b = ref.quantize(x, 4, 4)                   # s = (3 - 0) / 15 = 0.2; a constant group: s = 0
    assert codes.tolist() == [[0, 5, 10, 15], [0, 0, 0, 0]] and s[:, 0].tolist() == [0.2, 0.0] and b[:, 0].tolist() == [0, 5]
    assert ref.pack(codes, 4).tolist() == [[0 + 16 * 5, 10 + 16 * 15], [0, 0]]
    assert np.allclose(ref.dequantize(ref.pack(codes, 4), s, b, 4, 4), x)
    codes8, s8, _ = ref.quantize(x, 8, 4)                 # s = 3 / 255: codes 0, 85, 170, 255
    assert codes8[0].tolist() == [0, 85, 170, 255] and ref.pack(codes8, 8).dtype == np.uint8
    assert ref.quantize(np.array([0.0, 0.25, 0.5, 1.5]), 1, 4)[0].tolist() == [0, 0, 0, 1]  # 1/6 and 1/3 round to 0
    assert ref.quant_group(128) == 64 and ref.quant_group(80) == 80
    # kept 4 of sample 0 (2 sinks + 8, 9) and 3 of padded sample 1 (3, 4 + 9): the tail is the rest, ascending
    order = ref.position_ranking(2, 1, 10, sinks=2, start=[0, 3])
    idx, valid = ref.tail_positions(order, [4, 3], start=[0, 3])
    assert idx[0, 0].tolist() == [2, 3, 4, 5, 6, 7] and idx[1, 0].tolist() == [5, 6, 7, 8, 9, 9]
    assert valid.tolist() == [[True] * 6, [True] * 4 + [False] * 2]
    assert ref.tail_bytes(1, 3, 10, 64, 8, 4) == 2 * 3 * 10 * (64 + 2 * 4)


@pytest.mark.parametrize("backend", ["numpy", "torch", "mlx"])
def test_a_tail_and_the_kept_slots_hold_every_position(backend):
    """quantize_tail beside evict_plan: every position of every sample once, the tail within half a scale."""
    import refreekv
    from refreekv import builtin_backend

    be = builtin_backend(backend)
    rng = np.random.default_rng(3)
    q, K, V = (be.from_numpy(rng.normal(size=s), "float32") for s in ((2, 6, 1, 64), (2, 2, 40, 64), (2, 2, 40, 64)))
    plan = refreekv.plan_layer(q, K, ReFreeKVConfig.paper(), values=V, start=[0, 9])
    tail = refreekv.quantize_tail(K, V, plan, bits=8)
    kept, kv, tv = be.to_numpy(plan.idx), be.to_numpy(plan.valid), be.to_numpy(tail.valid)
    ti = be.to_numpy(tail.idx)
    for b, s in enumerate([0, 9]):
        for h in range(2):
            both = sorted(kept[b, h][kv[b]].tolist() + ti[b, h][tv[b]].tolist())
            assert both == list(range(s, 40))
    back = be.to_numpy(refreekv.dequantize(tail.values))
    want = np.take_along_axis(be.to_numpy(V), ti[..., None], axis=2)
    assert np.abs(back - want).max() <= be.to_numpy(tail.values.scales).max() / 2 * (1 + 1e-5)
