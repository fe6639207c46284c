"""The conformance suite as pytest tests: subclass ``ConformanceSuite`` or point the plugin at
a backend (``pytest --pyargs refreekv.testing.suite --refreekv-backend=pkg.mod:MyBackend``).

Every test draws inputs with hypothesis and calls one check from ``refreekv.testing.checks``.
The backend under test comes from the ``refreekv_target`` fixture (see ``refreekv.pytest_plugin``); override
that fixture to test your own backend.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from . import checks
from .cases import layer_cases, threshold_cases, tied_scores

# A fixture shared by every example is what we want here, not a per-example one; the reference
# is slow by design, so no deadline. Other settings come from the active profile (this module is
# imported at collection, after pytest loads ``--hypothesis-profile``).
# Subclasses for several backends share these methods (hence differing_executors).
_fixture_ok = settings(deadline=None, suppress_health_check=[
    HealthCheck.function_scoped_fixture, HealthCheck.differing_executors, HealthCheck.too_slow,
    HealthCheck.data_too_large])


class ConformanceSuite:
    """Subclass with a ``refreekv_target`` fixture (a ``refreekv.testing.Target``) to run all
    checks against that backend."""

    @_fixture_ok
    @given(data=st.data())
    def test_attention_row(self, refreekv_target, data):
        case = data.draw(layer_cases(ranking="position"), label="case")
        checks.check_attention_row(refreekv_target, case, data.draw(st.sampled_from(refreekv_target.dtypes)))

    @_fixture_ok
    @given(data=st.data())
    def test_scores_and_rankings(self, refreekv_target, data):
        case = data.draw(layer_cases(max_n=48, ranking="snapkv"), label="case")
        checks.check_scores_and_rankings(refreekv_target, case, data.draw(st.sampled_from(refreekv_target.dtypes)))

    @_fixture_ok
    @given(data=st.data())
    def test_attention_ranking_ties(self, refreekv_target, data):
        scores, start, sinks, window = data.draw(tied_scores(), label="scores")
        checks.check_attention_ranking_ties(refreekv_target, scores, start, sinks, window,
                                            data.draw(st.sampled_from(refreekv_target.dtypes)))

    @_fixture_ok
    @given(data=st.data())
    def test_ratio_and_cut(self, refreekv_target, data):
        case = data.draw(layer_cases(ranking="position"), label="case")
        checks.check_ratio_and_cut(refreekv_target, case, data.draw(st.sampled_from(refreekv_target.dtypes)))

    @_fixture_ok
    @given(data=st.data())
    def test_kept_positions_and_evict(self, refreekv_target, data):
        case = data.draw(layer_cases(max_n=256), label="case")
        checks.check_kept_and_evict(refreekv_target, case, data.draw(st.sampled_from(refreekv_target.dtypes)))

    @_fixture_ok
    @given(data=st.data())
    def test_plan_matches_reference(self, refreekv_target, data):
        case = data.draw(layer_cases(mass=True), label="case")
        checks.check_plan(refreekv_target, case, data.draw(st.sampled_from(refreekv_target.dtypes)))

    @_fixture_ok
    @given(data=st.data())
    def test_batch_invariance(self, refreekv_target, data):
        case = data.draw(layer_cases(max_n=300, batch=3, mass=True), label="case")
        checks.check_batch_invariance(refreekv_target, case, data.draw(st.sampled_from(refreekv_target.dtypes)))

    @_fixture_ok
    @given(data=st.data())
    def test_threshold_boundary(self, refreekv_target, data):
        ratio, start, threshold, sinks = data.draw(threshold_cases(), label="curve")
        checks.check_threshold_boundary(refreekv_target, ratio, start, threshold, sinks,
                                        data.draw(st.sampled_from(refreekv_target.dtypes)))

    @_fixture_ok
    @given(data=st.data())
    def test_retained_layers(self, refreekv_target, data):
        case = data.draw(layer_cases(max_n=300), label="case")
        checks.check_retained_layers(refreekv_target, case, data.draw(st.sampled_from(refreekv_target.dtypes)))

    @_fixture_ok
    @given(data=st.data())
    def test_keep_newest(self, refreekv_target, data):
        case = data.draw(layer_cases(max_n=300, ranking="position", mass=True), label="case")
        checks.check_keep_newest(refreekv_target, case, data.draw(st.sampled_from(refreekv_target.dtypes)))

    @_fixture_ok
    @given(data=st.data())
    def test_tail_matches_reference(self, refreekv_target, data):
        case = data.draw(layer_cases(max_n=256), label="case")
        checks.check_tail(refreekv_target, case, data.draw(st.sampled_from(refreekv_target.dtypes)),
                          data.draw(st.sampled_from([8, 4]), label="bits"))

    def test_errors(self, refreekv_target):
        for dtype in refreekv_target.dtypes:
            checks.check_errors(refreekv_target, dtype)


class TestConformance(ConformanceSuite):
    """Collected by ``pytest --pyargs refreekv.testing.suite --refreekv-backend=...``."""
