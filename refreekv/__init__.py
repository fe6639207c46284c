"""refreekv: threshold-free KV-cache compression (ReFreeKV, arXiv 2502.16886).

After prefill, each layer keeps the attention sinks plus the shortest run of newest tokens whose
attention norm, seen from the last prompt token, is within T = 1 % of the full norm. No budget
to choose. ``import refreekv`` imports NumPy only; torch, MLX, transformers and mlx-lm load when
you touch their adapters (``refreekv.adapters.transformers``, ``refreekv.adapters.mlx_lm``).
"""

from .api import (
    CompressedLayer,
    LayerPlan,
    attention_ranking,
    attention_row,
    attention_rows,
    compress_layer,
    compress_layers,
    evict,
    evict_plan,
    fixed_budget_cut,
    h2o_scores,
    kept_positions,
    norm_ratio_curve,
    plan_layer,
    plan_layers,
    position_ranking,
    snapkv_scores,
    threshold_cut,
)
from .backend import Backend, builtin_backend, get_backend, register_backend
from .config import ReFreeKVConfig
from .errors import ReFreeKVError
from .report import BudgetReport, LayerReport

__version__ = "0.1.0"

__all__ = [
    "Backend", "BudgetReport", "CompressedLayer", "LayerPlan", "LayerReport", "ReFreeKVConfig", "ReFreeKVError",
    "attention_ranking", "attention_row", "attention_rows", "builtin_backend", "compress_layer", "compress_layers",
    "evict", "evict_plan", "fixed_budget_cut", "get_backend", "h2o_scores", "kept_positions", "norm_ratio_curve",
    "plan_layer", "plan_layers", "position_ranking", "register_backend", "snapkv_scores", "threshold_cut",
]
