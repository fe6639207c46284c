"""The float64 NumPy reference of ReFreeKV: the specification as code (see ``steps``)."""

from .steps import (
    attention_ranking,
    attention_row,
    attention_rows,
    evict,
    fixed_budget_cut,
    h2o_scores,
    kept_positions,
    kv_bytes,
    dequantize,
    mass_floor_cut,
    model_budget,
    newest_floor_cut,
    norm_ratio_curve,
    pack,
    plan_layer,
    pooled_scores,
    position_ranking,
    ranking_scores,
    rows_for,
    quant_group,
    quantize,
    snapkv_scores,
    tail_bytes,
    tail_positions,
    threshold_cut,
)

__all__ = [
    "attention_ranking", "attention_row", "attention_rows", "evict", "fixed_budget_cut",
    "h2o_scores", "kept_positions", "kv_bytes", "mass_floor_cut", "model_budget", "newest_floor_cut", "norm_ratio_curve", "plan_layer",
    "pooled_scores", "position_ranking", "ranking_scores", "rows_for",
    "snapkv_scores", "threshold_cut", "dequantize", "pack", "quant_group", "quantize", "tail_bytes",
    "tail_positions",
]
