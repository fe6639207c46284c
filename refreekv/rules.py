"""Ranking rules as parts: one object per rule, one table that everything reads.

A ranking orders a layer's positions from most to least worth keeping; the halting rule keeps
a prefix of that order. A rule says which extra query rows it needs, how it scores positions
(or that it needs no scores), and whether its kept set is always "sinks + the newest run" (the
fast path: kept positions by arithmetic, eviction as two slices).

Config validation (``ReFreeKVConfig.ranking``), the CLI's ``--ranking`` choices, the planner, the
engines' query capture and the conformance strategies all read ``RANKINGS``. The reference
keeps its own independent twin of each rule (``refreekv.reference``); adding a rule is one
entry here, one scoring function in ``refreekv.core``, one function in the reference, and a
line in docs/spec.md (see docs/architecture.md).

Re-planning policies are parts the same way: ``REPLANS`` holds one ``Replan`` per value of
``ReFreeKVConfig.replan`` (whether later prompt segments are planned, and from which segment on a
plan keeps the newest one whole); the config, the CLI, both engines, the kvpress press and the
eval's results cache read it. The smaller option tables (``COMBINES``, ``NORMS``, ...) name the
choices of one step each.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .backend import Array, Backend
    from .config import ReFreeKVConfig


@dataclass(frozen=True)
class Scoring:
    """What a score-based ranking's scores are computed from, for one validated prompt."""

    be: Backend
    config: ReFreeKVConfig
    q_rows: list          # per layer (B, H, k, d), the newest k prompt queries
    keys: list            # per layer (B, Hkv, n, d)
    scales: list          # per layer float or None
    start: Array          # (B,) int64
    start_all: Array      # (L * B,) int64: start repeated for every layer
    n_b: Array            # (B,) int64 real tokens per sample
    a: Array              # (L * B, H, n) the score row of every layer, stacked
    step: Callable[[str], Callable]  # the backend's version of a core step


@dataclass(frozen=True)
class Ranking:
    """One ranking rule.

    Attributes:
        name: the value of ``ReFreeKVConfig.ranking``.
        summary: one line, for ``--help`` and the docs.
        extra_rows: query rows the rule needs besides the score rows, for a prompt of n tokens.
        scores: (L * B, Hkv, n) scores, higher = keep, or None for a pure position order.
        newest_run: the kept set is always the sinks plus the newest tokens.
    """

    name: str
    summary: str
    extra_rows: Callable[[ReFreeKVConfig, int], int]
    scores: Callable[[Scoring], Array] | None = None
    newest_run: bool = False


def _per_layer(s: Scoring, fn: Callable) -> Array:
    parts = [fn(q, K, sc) for q, K, sc in zip(s.q_rows, s.keys, s.scales)]
    return parts[0] if len(parts) == 1 else s.be.concat(parts, axis=0)


def _h2o(s: Scoring) -> Array:
    return _per_layer(s, lambda q, K, sc: s.step("h2o_scores")(q, K, s.start, s.n_b, sc))


def _snapkv(s: Scoring) -> Array:
    c = s.config
    return _per_layer(s, lambda q, K, sc: s.step("snapkv_scores")(q, K, s.start, c.window, c.pool_kernel, sc))


def _pooled(s: Scoring) -> Array:
    Hkv = s.be.shape(s.keys[0])[1]
    return s.step("window_scores")(s.a, Hkv, s.config.pool_kernel, s.start_all)


RANKINGS: dict[str, Ranking] = {r.name: r for r in (
    Ranking("position", "sinks, then newest to oldest (the paper's ReFreeKV ranking)",
            extra_rows=lambda c, n: 0, newest_run=True),
    Ranking("h2o", "sinks, the newest `window` tokens, then attention summed over every prompt query (H2O)",
            extra_rows=lambda c, n: n, scores=_h2o),
    Ranking("snapkv", "sinks, the newest `window` tokens, then the last `window` queries' attention, "
            "max-pooled (SnapKV)", extra_rows=lambda c, n: c.window, scores=_snapkv),
    Ranking("pooled", "sinks, the newest `window` tokens, then the score rows' own attention, "
            "averaged per KV head and max-pooled", extra_rows=lambda c, n: 0, scores=_pooled),
)}

#: How the score rows combine into the score row a (``ReFreeKVConfig.combine``).
COMBINES = {"mean": "the paper's Eq. 2: each column's sum over the rows that see it, divided by their count",
            "max": "each column's largest attention over the rows"}
#: The halting quantity (``ReFreeKVConfig.norm``).
NORMS = {"l2": "the L2 norm of the kept scores (the paper's Frobenius norm)",
         "l1": "the attention mass of the kept scores"}
#: How heads share one cut (``ReFreeKVConfig.heads``).
HEADS = {"mean": "ratio of the mean per-head norms (the paper's Uni-Metric)",
         "max": "the most demanding head decides (the largest per-head ratio)",
         "each": "the mean of the per-head ratios: every head counts equally, however concentrated its attention"}
#: Code widths the evicted tail may be kept at (``ReFreeKVConfig.tail_bits``; None drops it).
TAIL_BITS = (8, 4)
#: Halting rules (``ReFreeKVConfig.halting``).
HALTINGS = {"threshold": "the shortest prefix whose norm ratio is <= T (threshold-free ReFreeKV)",
            "ratio": "a fixed fraction `budget` of the prompt (the fixed-budget baselines)",
            "count": "a fixed number `budget` of tokens"}


@dataclass(frozen=True)
class Replan:
    """When an engine whose cache lives on (chats, agents, tool results) plans again, and what a plan
    keeps whole (``ReFreeKVConfig.replan``).

    Attributes:
        name: the value of ``ReFreeKVConfig.replan``.
        summary: one line, for ``--help`` and the docs.
        segments: every later prompt segment (two or more tokens, more than ``sinks``) is planned
            again, over the kept slots plus the segment, with the segment's queries.
        keep_from: the plan of prompt segment number ``keep_from`` (1 = the first prompt) and every
            later one keeps the newest segment whole (and what is generated after it: the turn being
            answered; the planner's ``keep_newest``); None: never.
    """

    name: str
    summary: str
    segments: bool
    keep_from: int | None = None

    def keeps_turn(self, segment: int) -> bool:
        """Whether a plan made while prompt segment number ``segment`` (1 = the first prompt) is the
        newest keeps that segment whole."""
        return self.keep_from is not None and segment >= self.keep_from


#: When an engine plans again (``ReFreeKVConfig.replan``).
REPLANS: dict[str, Replan] = {r.name: r for r in (
    Replan("once", "after the first prompt only (the paper)", segments=False),
    Replan("turns", "again after every later prompt segment (chat turns, tool results)", segments=True),
    Replan("history", "like turns, but the turn being answered is kept whole: only what came before it is "
           "compressed (the first prompt stays whole until the next segment)", segments=True, keep_from=1),
    Replan("chat", "the first prompt as turns (compressed before it is answered), every later turn as "
           "history (kept whole while it is answered, compressed with the history at the next)",
           segments=True, keep_from=2),
)}

#: Norm scopes (``ReFreeKVConfig.norm_scope``).
NORM_SCOPES = {"candidates": "the sinks are masked out of both norms (the research code)",
               "all": "the whole row (the paper's text)"}


def rows_for(config: ReFreeKVConfig, n: int) -> int:
    """k, the newest prompt queries that make the score row a, for a prompt of n tokens."""
    k = config.query_rows
    rows = k if isinstance(k, int) else max(1, round(k * n))
    return min(rows, n)


def rows_needed(config: ReFreeKVConfig, n: int) -> int:
    """Query rows an engine must capture for a prompt of n tokens: the score rows and any the
    ranking needs (the SnapKV window, every row for H2O)."""
    return min(n, max(rows_for(config, n), RANKINGS[config.ranking].extra_rows(config, n)))


