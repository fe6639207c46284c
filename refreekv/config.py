"""ReFreeKV configuration: every knob that decides which K/V positions survive prefill, validated
on construction against the rule tables of ``refreekv.rules`` (SPEC.md §4, docs/spec.md)."""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields

from . import rules
from .errors import bad_input


def _int(x: object) -> bool:
    """A Python or NumPy integer, not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool) and type(x).__name__ != "bool_"


def _real(x: object) -> bool:
    """A Python or NumPy real number, not a bool (strings are refused, never parsed)."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and type(x).__name__ != "bool_"


def _length(n: object) -> int:
    if not _int(n) or n < 1:
        raise bad_input("n", repr(n), "an int >= 1 (a prompt length in tokens)")
    return int(n)


def _choice(name: str, value: object, table: dict) -> None:
    if not isinstance(value, str) or value not in table:
        raise bad_input(name, repr(value), " or ".join(f'"{k}"' for k in table))


@dataclass(frozen=True)
class ReFreeKVConfig:
    """Everything that decides which K/V positions survive prefill.

    ``ReFreeKVConfig()`` is the library's default since round five of issue 10 (2026-12-07): the
    paper's boundary (position ranking, L2 norm ratio of the last prompt query, T = 1 %, mean over
    heads, layers 0 and 1 retained, 4 sinks), and **what that boundary evicts is kept as 8-bit codes
    instead of dropped** (``tail_bits=8``), re-planned after every later prompt segment of a live
    cache. Through the engine it kept every needle, code and open answer of the full cache on the
    test and holdout splits (continuation KL 0.0000) at 59.5 / 58.4 % of the float32 bytes, and the
    demo's five answers word for word (docs/results.md). It is lossless, not the smallest: decoding
    still reads every position, and a chat's tail grows with it. ``ReFreeKVConfig.evicting()`` is the
    eviction default of round four (every head's ratio counted equally, 32 score rows, T = 0.125 %:
    what it evicts is dropped, so memory and decoding shrink; needles kept, free answers not always
    the full cache's); the kvpress press uses it, since kvpress holds only what a press returns.
    ``ReFreeKVConfig.paper()`` is the paper's exact configuration. NumPy scalars are accepted wherever
    a Python number is, and stored as one.

    Attributes:
        threshold: T, the largest tolerated norm ratio ``1 - ||kept|| / ||full||`` (default 1 %,
            the paper's, with the tail; ``evicting()``: 0.125 % with ``heads="each"``; before round
            four 0.05 %, before round three 0.1 %, both with ``heads="mean"``).
        sinks: m, attention-sink tokens at the start of the prompt that are always kept.
        retained_layers: layer indices never compressed (paper §2.3 keeps layers 0 and 1).
        norm_scope: "candidates" masks the sinks out of both norms (the research code, which
            produced the published budgets); "all" uses the whole row (the paper's text).
        query_rows: k, how many of the newest prompt queries make the score row a (paper Eq. 2;
            default 1, the paper's; ``evicting()``: 32). An int is a count; a float in (0, 1) is a fraction of the
            prompt length.
        combine: how those rows combine into a: "mean" (Eq. 2) or "max" (``rules.COMBINES``).
        norm: the halting quantity: "l2" (the paper's norm) or "l1" (attention mass).
        heads: how a layer's heads share one cut: "mean" (the paper's Uni-Metric: the ratio of
            the mean per-head norms; the default), "max" (the most demanding head decides) or "each"
            (the mean of the per-head ratios: every head counts equally; ``evicting()``).
        ranking: a rule of ``refreekv.rules.RANKINGS``: "position" (sinks, then newest to oldest:
            the paper), "h2o", "snapkv" (the baselines' attention rankings) or "pooled".
        window: for the attention rankings, the newest tokens kept first (and SnapKV's
            observation window).
        pool_kernel: the max-pool width over positions of "snapkv" and "pooled" (odd).
        halting: "threshold" (threshold-free ReFreeKV), or a fixed budget: "ratio" keeps
            ``ceil(budget * n)`` tokens, "count" keeps ``budget`` tokens.
        budget: the fixed budget for halting "ratio" (0 < budget <= 1) or "count" (int >= 1).
        replan: for engines whose cache lives on (chats, agents): "turns" (the default) plans again
            after every later prompt segment of two or more tokens, over the kept slots plus the
            segment, with the segment's queries; "once" plans after the first prompt only (the paper);
            "history" plans like "turns" but never evicts from the newest segment (the turn being
            answered, and what is generated for it): each answer is computed with its own turn whole
            and the rest compressed, and a single prompt is not compressed at all until a second
            segment comes; "chat" plans the first prompt as "turns" does (a single prompt is
            compressed) and every later segment as "history" does. "history" and "chat": position
            ranking only. The rule table is ``refreekv.rules.REPLANS``.
        replan_every: also plan again every this many generated tokens, with the newest generated
            tokens' queries (0: never; opt-in for one long generation: in a chat, plans made with an
            answer's queries evict facts that later turns ask about, measured in docs/results.md).
        mass_threshold: None (the default: off), or Tm with 0 <= Tm < 1: a floor under the threshold
            rule's cut. The layer also keeps at least the shortest prefix of the same ranking whose
            evicted attention mass (``norm="l1"``'s ratio, same scope and heads) is <= Tm, so a
            layer whose L2 norm hardly moves while its score rows' mass goes (attention on a few
            recent tokens, thousands of tiny entries evicted) keeps more. Halting "threshold" only.
        tail_bits: 8 (the default) or 4: keep what the rule evicts, quantized to that many bits per
            value; None: drop it (``evicting()``, ``paper()``) (``refreekv.quantize_tail``; round five of issue 10:
            with the paper's boundary an 8-bit tail kept every answer of the full cache at ~60 % of the
            float32 bytes, docs/results.md). ``compress_layer(s)`` then return the tail beside the kept
            slots, and the transformers and mlx-lm caches store it and attend to it, dequantized (the
            kvpress press refuses it); the kept count and budget still count full-precision positions,
            the bytes count both.
    """

    threshold: float = 0.01
    sinks: int = 4
    retained_layers: tuple[int, ...] = (0, 1)
    norm_scope: str = "candidates"
    query_rows: int | float = 1
    combine: str = "mean"
    norm: str = "l2"
    heads: str = "mean"
    ranking: str = "position"
    window: int = 8
    pool_kernel: int = 7
    halting: str = "threshold"
    budget: float | int | None = None
    replan: str = "turns"
    replan_every: int = 0
    mass_threshold: float | None = None
    tail_bits: int | None = 8

    @classmethod
    def paper(cls, **changes) -> ReFreeKVConfig:
        """The paper's exact configuration: T = 1 %, 4 sinks, one query row (the last prompt
        token), position ranking, L2 norm, mean over heads, layers 0 and 1 retained, the research
        code's "candidates" scope. Per layer it keeps what the authors' code keeps."""
        return cls(**{**dict(threshold=0.01, sinks=4, retained_layers=(0, 1), norm_scope="candidates",
                             query_rows=1, combine="mean", norm="l2", heads="mean", ranking="position",
                             halting="threshold", budget=None, replan="once", replan_every=0,
                             mass_threshold=None, tail_bits=None), **changes})

    @classmethod
    def evicting(cls, **changes) -> ReFreeKVConfig:
        """The eviction default of round four of issue 10 (the library's default until 2026-12-07):
        what the rule evicts is dropped. The newest 32 prompt queries score the positions (Eq. 2),
        every head's own norm ratio counts equally (``heads="each"``), T = 0.125 %, re-planned after
        every later prompt segment. Memory and decoding shrink with the kept slots and a chat's cache
        stays about flat; on the holdout split it kept the full cache's needles and codes with a
        continuation KL of 0.0055 at 74 % of the cache, but 1 of 4 open answers word for word
        (docs/results.md). The kvpress press's default."""
        return cls(**{**dict(threshold=0.00125, query_rows=32, heads="each", replan="turns", tail_bits=None),
                      **changes})

    def __post_init__(self) -> None:
        t = self.threshold
        if not _real(t) or not math.isfinite(t) or not 0 <= t < 1:
            raise bad_input("threshold", repr(t), "a number T with 0 <= T < 1 (the paper uses 0.01)")
        object.__setattr__(self, "threshold", float(t))
        for name, low in (("sinks", 0), ("window", 1)):
            value = getattr(self, name)
            if not _int(value) or value < low:
                raise bad_input(name, repr(value), f"an int >= {low}")
            object.__setattr__(self, name, int(value))
        layers = self.retained_layers
        if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
            raise bad_input("retained_layers", repr(layers), "a sequence of layer indices, e.g. (0, 1)")
        layers = tuple(layers)
        if not all(_int(i) and i >= 0 for i in layers):
            raise bad_input("retained_layers", repr(layers), "non-negative int layer indices")
        object.__setattr__(self, "retained_layers", tuple(sorted({int(i) for i in layers})))
        _choice("norm_scope", self.norm_scope, rules.NORM_SCOPES)
        _choice("combine", self.combine, rules.COMBINES)
        _choice("norm", self.norm, rules.NORMS)
        _choice("heads", self.heads, rules.HEADS)
        _choice("ranking", self.ranking, rules.RANKINGS)
        _choice("halting", self.halting, rules.HALTINGS)
        _choice("replan", self.replan, rules.REPLANS)
        if rules.REPLANS[self.replan].keep_from is not None and not rules.RANKINGS[self.ranking].newest_run:
            raise bad_input("replan", repr(self.replan), f'"turns" or "once" with ranking={self.ranking!r} ({self.replan!r} keeps '
                            'the newest segment whole, which needs a ranking that keeps the newest tokens first: "position")')
        if not _int(self.replan_every) or self.replan_every < 0:
            raise bad_input("replan_every", repr(self.replan_every), "an int >= 0 (0: never during generation)")
        object.__setattr__(self, "replan_every", int(self.replan_every))
        k = self.query_rows
        if _int(k) and k >= 1:
            object.__setattr__(self, "query_rows", int(k))
        elif _real(k) and not _int(k) and 0 < k < 1:
            object.__setattr__(self, "query_rows", float(k))
        else:
            raise bad_input("query_rows", repr(k), "an int >= 1 (a count) or a float in (0, 1) (a fraction of n)")
        p = self.pool_kernel
        if not _int(p) or p < 1 or p % 2 == 0:
            raise bad_input("pool_kernel", repr(p), "an odd int >= 1")
        object.__setattr__(self, "pool_kernel", int(p))
        mt = self.mass_threshold
        if mt is not None:
            if not _real(mt) or not math.isfinite(mt) or not 0 <= mt < 1:
                raise bad_input("mass_threshold", repr(mt), "None (off) or a number Tm with 0 <= Tm < 1, e.g. 0.03")
            if self.halting != "threshold":
                raise bad_input("mass_threshold", repr(mt), f'None with halting="{self.halting}" (a floor under the '
                                'threshold rule\'s cut: set halting="threshold")')
            object.__setattr__(self, "mass_threshold", float(mt))
        tb = self.tail_bits
        if tb is not None:
            if not _int(tb) or int(tb) not in rules.TAIL_BITS:
                raise bad_input("tail_bits", repr(tb), "None (drop what the rule evicts) or " + " or ".join(
                    str(b) for b in rules.TAIL_BITS) + " (keep it quantized to that many bits)")
            object.__setattr__(self, "tail_bits", int(tb))
        b = self.budget
        if self.halting == "threshold":
            if b is not None:
                raise bad_input("budget", repr(b), 'None when halting="threshold" (set halting="ratio" or "count")')
        elif self.halting == "ratio":
            if not _real(b) or not math.isfinite(b) or not 0 < b <= 1:
                raise bad_input("budget", repr(b), 'a ratio 0 < budget <= 1 for halting="ratio"')
            object.__setattr__(self, "budget", float(b))
        elif not _int(b) or b < 1:
            raise bad_input("budget", repr(b), 'an int >= 1 for halting="count"')
        else:
            object.__setattr__(self, "budget", int(b))

    # -- what engines ask ---------------------------------------------------------------------
    def rows_for(self, n: int) -> int:
        """k, the newest prompt queries that make the score row a, for a prompt of n tokens."""
        return rules.rows_for(self, _length(n))

    def rows_needed(self, n: int) -> int:
        """Query rows an engine must capture for a prompt of n tokens (``rules.rows_needed``)."""
        return rules.rows_needed(self, _length(n))

    def check_layers(self, num_layers: int) -> None:
        """Raise if a retained layer index does not exist in a model of ``num_layers`` layers."""
        bad = [i for i in self.retained_layers if i >= num_layers]
        if bad:
            raise bad_input("retained_layers", repr(self.retained_layers),
                            f"indices below the model's number of layers ({num_layers})")

    def is_retained(self, layer: int) -> bool:
        """Whether layer index ``layer`` (an int >= 0) is never compressed."""
        if not _int(layer) or layer < 0:
            raise bad_input("layer", repr(layer), "an int >= 0 (a layer index)")
        return layer in self.retained_layers

    # -- plain data (saved caches, the CLI, results files) ------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["retained_layers"] = list(d["retained_layers"])
        return d

    @classmethod
    def from_dict(cls, data: dict) -> ReFreeKVConfig:
        """The inverse of ``to_dict``; unknown keys are an error (a file from another version)."""
        if not isinstance(data, dict):
            raise bad_input("config", f"type {type(data).__name__}", "a dict from ReFreeKVConfig.to_dict()")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise bad_input("config", f"unknown keys {unknown}", f"keys among {sorted(names)}")
        return cls(**data)
