"""ReFreeKV configuration: the paper's knobs, validated on construction (SPEC.md §4)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from .errors import bad_input

Ranking = Literal["position", "h2o", "snapkv"]
Halting = Literal["threshold", "ratio", "count"]
NormScope = Literal["candidates", "all"]


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class ReFreeKVConfig:
    """Everything that decides which K/V positions survive prefill.

    Attributes:
        threshold: T, the largest tolerated norm ratio ``1 - ||kept|| / ||full||`` (paper: 1 %).
        sinks: m, attention-sink tokens at the start of the prompt that are always kept.
        retained_layers: layer indices never compressed (paper §2.3 keeps layers 0 and 1).
        norm_scope: "candidates" masks the sinks out of both norms (the research code, which
            produced the published budgets); "all" uses the whole row (the paper's text).
        query_rows: k, how many of the last prompt queries score the positions (paper Eq. 2).
            An int is a count; a float in (0, 1) is a fraction of the prompt length.
        ranking: "position" (sinks, then newest to oldest: ReFreeKV), or the attention rankings
            of the baselines: "h2o" (attention accumulated over all prompt queries) and
            "snapkv" (attention from the last ``window`` queries, max-pooled).
        window: for the attention rankings, the most recent tokens kept first (observation window).
        pool_kernel: SnapKV's max-pool width over positions (odd).
        halting: "threshold" (threshold-free ReFreeKV), or a fixed budget: "ratio" keeps
            ``ceil(budget * n)`` tokens, "count" keeps ``budget`` tokens.
        budget: the fixed budget for halting "ratio" (0 < budget <= 1) or "count" (int >= 1).
    """

    threshold: float = 0.01
    sinks: int = 4
    retained_layers: tuple[int, ...] = (0, 1)
    norm_scope: NormScope = "candidates"
    query_rows: int | float = 1
    ranking: Ranking = "position"
    window: int = 8
    pool_kernel: int = 7
    halting: Halting = "threshold"
    budget: float | int | None = None

    def __post_init__(self) -> None:
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or not 0 <= t < 1:
            raise bad_input("threshold", repr(t), "a number T with 0 <= T < 1 (the paper uses 0.01)")
        if not _is_int(self.sinks) or self.sinks < 0:
            raise bad_input("sinks", repr(self.sinks), "an int >= 0 (default 4)")
        layers = self.retained_layers
        if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
            raise bad_input("retained_layers", repr(layers), "a sequence of layer indices, e.g. (0, 1)")
        layers = tuple(layers)
        if not all(_is_int(i) and i >= 0 for i in layers):
            raise bad_input("retained_layers", repr(layers), "non-negative int layer indices")
        object.__setattr__(self, "retained_layers", tuple(sorted(set(layers))))
        if self.norm_scope not in ("candidates", "all"):
            raise bad_input("norm_scope", repr(self.norm_scope), '"candidates" or "all"')
        k = self.query_rows
        ok_int = _is_int(k) and k >= 1
        ok_frac = isinstance(k, float) and 0 < k < 1
        if not (ok_int or ok_frac):
            raise bad_input("query_rows", repr(k), "an int >= 1 (a count) or a float in (0, 1) (a fraction of n)")
        if self.ranking not in ("position", "h2o", "snapkv"):
            raise bad_input("ranking", repr(self.ranking), '"position", "h2o" or "snapkv"')
        if not _is_int(self.window) or self.window < 1:
            raise bad_input("window", repr(self.window), "an int >= 1")
        if not _is_int(self.pool_kernel) or self.pool_kernel < 1 or self.pool_kernel % 2 == 0:
            raise bad_input("pool_kernel", repr(self.pool_kernel), "an odd int >= 1")
        if self.halting == "threshold":
            if self.budget is not None:
                raise bad_input("budget", repr(self.budget), 'None when halting="threshold" (set halting="ratio" or "count")')
        elif self.halting == "ratio":
            b = self.budget
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 < b <= 1:
                raise bad_input("budget", repr(b), 'a ratio 0 < budget <= 1 for halting="ratio"')
        elif self.halting == "count":
            if not _is_int(self.budget) or self.budget < 1:
                raise bad_input("budget", repr(self.budget), 'an int >= 1 for halting="count"')
        else:
            raise bad_input("halting", repr(self.halting), '"threshold", "ratio" or "count"')

    def rows_for(self, n: int) -> int:
        """k, the number of last prompt queries that score positions for a prompt of n tokens."""
        k = self.query_rows
        rows = k if _is_int(k) else max(1, round(k * n))
        return min(rows, n)

    def rows_needed(self, n: int) -> int:
        """Query rows an engine must capture: k, the SnapKV window, or every row for H2O."""
        if self.ranking == "h2o":
            return n
        if self.ranking == "snapkv":
            return min(n, max(self.rows_for(n), self.window))
        return self.rows_for(n)

    def check_layers(self, num_layers: int) -> None:
        """Raise if a retained layer index does not exist in a model of ``num_layers`` layers."""
        bad = [i for i in self.retained_layers if i >= num_layers]
        if bad:
            raise bad_input("retained_layers", repr(self.retained_layers),
                            f"indices below the model's number of layers ({num_layers})")

    def is_retained(self, layer: int) -> bool:
        return layer in self.retained_layers
