"""The conformance suite catches deliberately broken backends, each with a clear message."""

import numpy as np
import pytest
from hypothesis import Phase, given, settings

from refreekv import core
from refreekv.adapters.numpy_backend import NumpyBackend
from refreekv.testing import (ConformanceError, Target, check_attention_ranking_ties, check_attention_row,
                              check_plan, check_ratio_and_cut, layer_cases, tied_scores)


class UnstableTies(NumpyBackend):
    name = "broken-unstable-ties"

    def argsort_stable(self, x, axis=-1):  # equal keys come out in reverse order
        n = x.shape[axis]
        return (n - 1) - np.flip(np.argsort(np.flip(x, axis), axis=axis, kind="stable"), axis)


class OffByOneCut(NumpyBackend):
    name = "broken-off-by-one"

    def threshold_cut(self, ratio, threshold, sinks, start):
        return np.minimum(core.threshold_cut(self, ratio, threshold, sinks, start) + 1, ratio.shape[-1] - start)


class SinksDropped(NumpyBackend):
    name = "broken-no-sinks"

    def position_ranking(self, batch, num_kv_heads, n, sinks, start):
        return core.position_ranking(self, batch, num_kv_heads, n, 0, start)


class WrongGroup(NumpyBackend):
    name = "broken-gqa-group"

    def attention_rows(self, q_rows, keys, start, rows, scale=None):
        # Query head h reads KV head h % Hkv (interleaved) instead of h // g.
        B, H, k, d = q_rows.shape
        Hkv = keys.shape[1]
        perm = np.arange(H).reshape(H // Hkv, Hkv).T.reshape(-1)  # new head order grouped by h % Hkv
        A, vis = core.attention_rows(self, q_rows[:, perm], keys, start, rows, scale)
        return A[:, np.argsort(perm)], vis


class HalfSoftmax(NumpyBackend):
    name = "broken-half-softmax"

    def exp(self, x):
        return np.exp(x.astype(np.float16)).astype(x.dtype)


class StrictLess(NumpyBackend):
    name = "broken-strict-less"

    def threshold_cut(self, ratio, threshold, sinks, start):
        n = ratio.shape[-1]
        n_b = n - start
        ok = (ratio < threshold) | (np.arange(n)[None, :] >= (n_b - 1)[:, None])
        return np.minimum(np.maximum(np.argmax(ok, axis=-1) + 1, np.minimum(n_b, sinks + 1)), n_b)


class BatchLeak(NumpyBackend):
    name = "broken-batch-leak"

    def threshold_cut(self, ratio, threshold, sinks, start):
        cut = core.threshold_cut(self, ratio, threshold, sinks, start)
        return np.minimum(np.full_like(cut, cut.max()), ratio.shape[-1] - start)  # one cut for all


def first_failure(check, backend, strategy, dtype="float32", unpack=False) -> str:
    target = Target(backend, (dtype,))

    @settings(max_examples=400, derandomize=True, deadline=None, database=None, phases=[Phase.generate])
    @given(case=strategy)
    def run(case):
        if unpack:
            check(target, *case, dtype)
        else:
            check(target, case, dtype)

    with pytest.raises(ConformanceError) as info:
        run()
    return str(info.value)


def _assert_clear(msg: str, backend, what: str) -> None:
    assert what in msg
    assert f"backend: {backend.name}" in msg and "expected:" in msg and "found:" in msg and "reproduce:" in msg


def test_unstable_tie_order_is_caught():
    be = UnstableTies()
    _assert_clear(first_failure(check_attention_ranking_ties, be, tied_scores(), unpack=True), be, "attention_ranking ties")


def test_off_by_one_cut_is_caught():
    be = OffByOneCut()
    _assert_clear(first_failure(check_plan, be, layer_cases(ranking="position")), be, "cut")


def test_dropped_sinks_are_caught():
    be = SinksDropped()
    _assert_clear(first_failure(check_plan, be, layer_cases(ranking="position")), be, "plan order")


def test_wrong_gqa_group_is_caught():
    be = WrongGroup()
    _assert_clear(first_failure(check_attention_row, be, layer_cases(ranking="position")), be, "attention_row")


def test_half_precision_softmax_is_caught():
    be = HalfSoftmax()
    _assert_clear(first_failure(check_attention_row, be, layer_cases(ranking="position")), be, "attention_row")


def test_strict_less_than_is_caught():
    be = StrictLess()
    _assert_clear(first_failure(check_ratio_and_cut, be, layer_cases(ranking="position", styles=("local",))),
                  be, "threshold_cut")


def test_batch_leak_is_caught():
    be = BatchLeak()
    _assert_clear(first_failure(check_plan, be, layer_cases(ranking="position", batch=3)), be, "cut")
