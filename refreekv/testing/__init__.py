"""refreekv's conformance suite: hold any backend to the float64 reference.

Needs the ``[test]`` extra (pytest, hypothesis). See docs/conformance.md.
"""

from .cases import STYLES, LayerCase, configs, layer_cases, threshold_cases, tied_scores
from .checks import (
    ConformanceError,
    Target,
    check_attention_ranking_ties,
    check_attention_row,
    check_batch_invariance,
    check_errors,
    check_kept_and_evict,
    check_plan,
    check_ratio_and_cut,
    check_retained_layers,
    check_threshold_boundary,
    check_scores_and_rankings,
    valid_cut_range,
)
from .suite import ConformanceSuite
from .tolerances import TOLERANCES, Tolerance

__all__ = [
    "STYLES", "TOLERANCES", "ConformanceError", "ConformanceSuite", "LayerCase", "Target",
    "Tolerance", "check_attention_ranking_ties", "check_attention_row", "check_batch_invariance",
    "check_errors", "check_kept_and_evict", "check_plan", "check_ratio_and_cut", "check_retained_layers",
    "check_threshold_boundary", "threshold_cases",
    "check_scores_and_rankings", "configs", "layer_cases", "tied_scores", "valid_cut_range",
]
