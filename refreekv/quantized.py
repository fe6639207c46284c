"""What the rule evicts, kept at low precision instead of dropped (issue 10, round five).

ReFreeKV's rule splits each layer's positions into the kept set (stored as they are) and the tail
(everything else). Eviction drops the tail; ``refreekv.quantize_tail`` keeps it instead, quantized:
affine codes at 8 or 4 bits with one scale and one bias per group of values along the head
dimension (``quant_group``: 64, the group of mlx-lm's ``mx.quantize`` and transformers' quantized
caches, or the whole vector when d is not a multiple of 64). Scales and biases are stored in
float32 (float64 for float64 inputs). Measured on the packaged model in docs/results.md ("Round
five"): the paper's boundary with an 8-bit tail kept every answer of the full cache on three splits
at about 60 % of the float32 bytes.

The math is ``refreekv.reference.quantize`` / ``pack`` / ``dequantize`` / ``tail_positions``; the
conformance suite holds every backend to it (``check_tail``).
"""

from __future__ import annotations

from typing import NamedTuple

from .backend import Array
from .rules import TAIL_BITS  # noqa: F401  (the code widths a tail can be stored at)


def quant_group(d: int) -> int:
    """Values per scale and bias along a head dimension of ``d``: 64 when d is a multiple of 64, else d."""
    return 64 if d % 64 == 0 else d


class Quantized(NamedTuple):
    """An array stored as affine codes (``refreekv.quantize``).

    codes: (..., d * bits / 8) uint8 (two codes per byte at 4 bits, the even position in the low
    nibble); scales, biases: (..., d / group) float32 (float64 for a float64 input); ``dtype`` is the
    input's dtype name, which ``refreekv.dequantize`` gives back."""

    codes: Array
    scales: Array
    biases: Array
    bits: int
    group: int
    dtype: str

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the array it stands for, (..., d)."""
        from .backend import get_backend

        s = tuple(get_backend(self.codes).shape(self.codes))
        return (*s[:-1], s[-1] * 8 // self.bits)

    @property
    def nbytes(self) -> int:
        """Bytes stored: the codes, the scales and the biases."""
        from .backend import get_backend

        be = get_backend(self.codes)
        return be.nbytes(self.codes) + be.nbytes(self.scales) + be.nbytes(self.biases)


class QuantizedTail(NamedTuple):
    """One layer's tail (``refreekv.quantize_tail``): the positions the plan evicts and their K and V.

    idx: (B, Hkv, T) int64 positions, ascending, padded to T = max over samples with n - 1;
    valid: (B, T) bool, False on the padding slots; keys, values: ``Quantized`` (B, Hkv, T, d)."""

    idx: Array
    valid: Array
    keys: Quantized
    values: Quantized

    @property
    def nbytes(self) -> int:
        """Bytes of the quantized K and V (the positions are bookkeeping, like the kept slots' mask)."""
        return self.keys.nbytes + self.values.nbytes
