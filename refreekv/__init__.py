"""refreekv: threshold-free KV-cache compression (ReFreeKV, arXiv 2502.16886).

After prefill, each layer keeps the attention sinks plus the shortest run of newest tokens whose
attention norm, seen from the newest prompt queries, is within T of the full norm. No budget
to choose. ``import refreekv`` imports NumPy only; torch, MLX, transformers, mlx-lm and kvpress
load when you touch their adapters (``refreekv.adapters.transformers``, ``.mlx_lm``, ``.kvpress``).
See docs/architecture.md for where each rule, step and engine lives.
"""

from pathlib import Path as _Path

from .api import (
    CompressedLayer,
    LayerPlan,
    Quantized,
    QuantizedTail,
    attention_ranking,
    attention_row,
    attention_rows,
    compress_layer,
    compress_layers,
    dequantize,
    evict,
    evict_plan,
    fixed_budget_cut,
    h2o_scores,
    kept_positions,
    norm_ratio_curve,
    plan_layer,
    plan_layers,
    position_ranking,
    quantize,
    quantize_tail,
    snapkv_scores,
    tail_positions,
    threshold_cut,
)
from .backend import ArrayAPIBackend, Backend, builtin_backend, get_backend, register_backend
from .config import ReFreeKVConfig
from .errors import ReFreeKVError
from .report import BudgetReport, LayerReport
from .rules import RANKINGS, Ranking

__version__ = "0.4.0"

# From a source checkout (no install), the top-level reference/ and adapters/ folders are this
# package's refreekv.reference and refreekv.adapters, as an install maps them (pyproject's
# package-dir). Only those two names resolve there: a finder for exactly them, nothing else.
_root = _Path(__file__).resolve().parent.parent
if (_root / "reference" / "steps.py").is_file() and (_root / "adapters" / "backends").is_dir():
    from ._checkout import install_finder as _install_finder

    _install_finder(__name__, _root)

__all__ = [
    "ArrayAPIBackend", "Backend", "BudgetReport", "CompressedLayer", "LayerPlan", "LayerReport", "Quantized",
    "QuantizedTail", "RANKINGS",
    "Ranking", "ReFreeKVConfig", "ReFreeKVError", "attention_ranking", "attention_row", "attention_rows",
    "builtin_backend", "compress_layer", "compress_layers", "dequantize", "evict", "evict_plan", "fixed_budget_cut",
    "get_backend", "h2o_scores", "kept_positions", "norm_ratio_curve", "plan_layer", "plan_layers",
    "position_ranking", "quantize", "quantize_tail", "register_backend", "snapkv_scores", "tail_positions",
    "threshold_cut",
]
