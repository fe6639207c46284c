"""The one table of tolerances, keyed by the dtype of the inputs.

The core scores in float32 whatever the model dtype (float64 stays float64), and the reference
is fed the very same rounded inputs, so float16 and bfloat16 inputs share float32's tolerances:
a backend that computes softmax in half precision fails them, as it should.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Tolerance:
    score_atol: float   # attention rows and ranking scores
    score_rtol: float
    ratio_atol: float   # the norm-ratio curve (also the decision margin for the cut)
    code_margin: float = 1e-3  # a quantization code may differ by one only this close to a rounding tie
    cast_rtol: float = 2.4e-7  # one rounding to the dtype (a dequantized value handed back in it)


TOLERANCES: dict[str, Tolerance] = {
    "float64": Tolerance(score_atol=1e-12, score_rtol=1e-9, ratio_atol=1e-9, code_margin=1e-9, cast_rtol=1e-14),
    "float32": Tolerance(score_atol=2e-6, score_rtol=2e-4, ratio_atol=2e-4),
    "float16": Tolerance(score_atol=2e-6, score_rtol=2e-4, ratio_atol=2e-4, cast_rtol=2 ** -10),
    "bfloat16": Tolerance(score_atol=2e-6, score_rtol=2e-4, ratio_atol=2e-4, cast_rtol=2 ** -7),
}


def tolerance(dtype: str) -> Tolerance:
    return TOLERANCES[dtype]
