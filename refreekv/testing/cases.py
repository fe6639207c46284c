"""Generated inputs: a ``LayerCase`` is a few ints and names; its arrays come from a seed.

Hypothesis explores the parameters; the arrays are rebuilt from ``seed`` with NumPy, so any
failing case prints as a one-line, copy-pasteable reproducer (``LayerCase(...)``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
from hypothesis import strategies as st

from refreekv import rules
from refreekv.config import ReFreeKVConfig

#: How the attention of the generated queries looks. ``large_logits``: logits of several hundred
#: (a softmax without max-subtraction overflows); ``sink_dominant``: the sinks take almost all the
#: attention, the candidates get ~1e-30 (their squares underflow float32 unless scaled first).
STYLES = ("random", "flat", "peaked", "sink_heavy", "ties", "near_ties", "local", "large_logits", "sink_dominant")


@dataclass(frozen=True)
class LayerCase:
    """One layer's inputs. ``start`` are left-padding offsets (one per sample)."""

    batch: int
    heads: int
    kv_heads: int
    n: int
    d: int
    style: str
    seed: int
    start: tuple[int, ...]
    config: ReFreeKVConfig = field(default_factory=ReFreeKVConfig)

    @property
    def rows(self) -> int:
        """Query rows an engine would capture for this case."""
        return self.config.rows_needed(self.n)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(q_rows (B, H, k, d), keys (B, Hkv, n, d), values (B, Hkv, n, d)), float64."""
        rng = np.random.default_rng(self.seed)
        B, H, Hkv, n, d, k = self.batch, self.heads, self.kv_heads, self.n, self.d, self.rows
        q = rng.normal(size=(B, H, k, d)) * 1.5
        K = rng.normal(size=(B, Hkv, n, d))
        V = rng.normal(size=(B, Hkv, n, d))
        m = self.config.sinks
        if self.style == "flat":
            q[:] = 0.0  # every visible logit is exactly 0: uniform attention, exact ties
        elif self.style == "peaked":
            q *= 5.0
        elif self.style == "large_logits":
            q *= 200.0
        elif self.style in ("ties", "near_ties"):
            protos = rng.normal(size=(B, Hkv, 3, d))
            K = protos[:, :, np.arange(n) % 3]  # identical keys give bit-identical logits
            if self.style == "near_ties":
                K = K + rng.normal(size=K.shape) * 1e-7
        elif self.style in ("sink_heavy", "local", "sink_dominant"):
            for b, s in enumerate(self.start):
                if self.style == "sink_dominant":
                    direction = q[b].mean(axis=(0, 1))
                    unit = direction / (np.linalg.norm(direction) + 1e-9)
                    q[b] = unit * 20.0                        # every query row points the same way,
                    K[b] = K[b] * 0.01                        # the others' logits are near 0,
                    K[b, :, s:s + max(m, 1)] = unit * 4.0 * np.sqrt(d)  # the sinks' near 80
                elif self.style == "sink_heavy":
                    direction = q[b].mean(axis=(0, 1))
                    K[b, :, s:s + max(m, 1)] = 4.0 * direction / (np.linalg.norm(direction) + 1e-9)
                else:
                    # Keys older than a recent window get logits of -1000: their attention is
                    # exactly 0 in every precision, so small T meet ratio == 0 exactly before the
                    # whole prompt (T = 0 still keeps it all). Every query row lies in the recent
                    # window, so no softmax is ill-conditioned.
                    q[b, :, :, 0] = 4.0
                    recent = max(8, k + 1, (n - s) // 2)  # covers every query row
                    K[b, :, s + m:max(s + m, n - recent), 0] = -1000.0 * np.sqrt(d) / 4.0
        return q, K, V

    def __repr__(self) -> str:
        return (f"LayerCase(batch={self.batch}, heads={self.heads}, kv_heads={self.kv_heads}, "
                f"n={self.n}, d={self.d}, style={self.style!r}, seed={self.seed}, "
                f"start={self.start}, config={self.config!r})")


@st.composite
def configs(draw, ranking: str | None = None, mass: bool = False) -> ReFreeKVConfig:
    """Configurations across the paper's knobs and the baselines' rules; with ``mass``, the
    threshold rule's mass floor too (``mass_threshold``; drawn last, so the other tests' examples
    stay as they were)."""
    others = sorted(set(rules.RANKINGS) - {"position"})
    rk = ranking or draw(st.sampled_from(["position"] * len(others) + others))
    halting = draw(st.sampled_from(["threshold"] * 4 + ["ratio", "count"]))
    budget = None
    if halting == "ratio":
        budget = draw(st.sampled_from([0.2, 0.5, 0.9, 1.0]))
    elif halting == "count":
        budget = draw(st.integers(1, 64))
    config = ReFreeKVConfig(
        threshold=draw(st.sampled_from([0.0, 0.001, 0.01, 0.05, 0.2, 0.6]) | st.floats(0, 0.99)),
        sinks=draw(st.integers(0, 6)),
        retained_layers=(),
        norm_scope=draw(st.sampled_from(["candidates", "all"])),
        query_rows=draw(st.sampled_from([1, 1, 1, 2, 5, 32]) | st.sampled_from([0.01, 0.05, 0.3])),
        combine=draw(st.sampled_from(sorted(rules.COMBINES))),
        norm=draw(st.sampled_from(sorted(rules.NORMS))),
        heads=draw(st.sampled_from(sorted(rules.HEADS))),
        ranking=rk,
        window=draw(st.integers(1, 8)),
        pool_kernel=draw(st.sampled_from([1, 3, 7])),
        halting=halting,
        budget=budget,
        tail_bits=None,  # a tail is drawn by layer_cases, last
    )
    if mass and halting == "threshold":  # the mass floor under the threshold rule (often off, as by default)
        floor = draw(st.sampled_from([None, None, 0.0, 0.01, 0.05, 0.3]) | st.floats(0, 0.99))
        config = replace(config, mass_threshold=floor)
    return config


@st.composite
def layer_cases(draw, max_n: int = 2048, ranking: str | None = None, batch: int | None = None,
                styles: tuple[str, ...] = STYLES, mass: bool = False) -> LayerCase:
    """Shapes (B, H, Hkv with GQA groups 1..8, n from 1 to ``max_n``, d), padding and styles;
    ``mass``: configurations with the mass floor too."""
    cfg = draw(configs(ranking, mass))
    kv = draw(st.integers(1, 4))
    g = draw(st.sampled_from([1, 1, 2, 3, 4, 8]))
    # Attention rankings run the reference's slowest loops (H2O over every query row, pooling,
    # sorting); short prompts keep them fast.
    cap = max_n if rules.RANKINGS[cfg.ranking].newest_run else min(max_n, 48)
    edge = st.sampled_from([cfg.sinks + 1, cfg.sinks + 2]).filter(lambda x: x <= cap)  # a prompt at the edge
    n = draw(st.integers(1, min(cap, 80)) | st.integers(1, cap) | edge)
    B = batch or draw(st.integers(1, 3))
    pads = tuple(draw(st.lists(st.integers(0, max(0, n - 1)), min_size=B, max_size=B))
                 if draw(st.booleans()) else [0] * B)
    d, style, seed = draw(st.sampled_from([4, 8, 16])), draw(st.sampled_from(styles)), draw(st.integers(0, 2**31 - 1))
    # drawn last, so that the examples of every other field are the ones they were before tails existed
    cfg = replace(cfg, tail_bits=draw(st.sampled_from([None, None, 8, 4])))
    return LayerCase(batch=B, heads=kv * g, kv_heads=kv, n=n, d=d, style=style, seed=seed, start=pads, config=cfg)


@st.composite
def tied_scores(draw) -> tuple[np.ndarray, tuple[int, ...], int, int]:
    """Ranking scores drawn from a few exactly representable values: many exact ties.
    Returns (scores (B, Hkv, n) float64, start, sinks, window)."""
    B, Hkv, n = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 60))
    levels = draw(st.lists(st.sampled_from([0.0, 0.125, 0.25, 0.5, 1.0, 2.0]), min_size=1, max_size=4))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    scores = rng.choice(np.array(levels), size=(B, Hkv, n))
    start = tuple(draw(st.integers(0, n - 1)) for _ in range(B)) if draw(st.booleans()) else (0,) * B
    for b, s in enumerate(start):
        scores[b, :, :s] = 0.0
    return scores, start, draw(st.integers(0, 6)), draw(st.integers(1, 8))


@st.composite
def threshold_cases(draw) -> tuple[np.ndarray, tuple[int, ...], float, int]:
    """Norm-ratio curves made of exactly representable levels, and a threshold equal to one of the
    curve's values: the cut sits exactly on the boundary ``ratio == T``.
    Returns (ratio (B, n) float64, start, threshold, sinks)."""
    B, n = draw(st.integers(1, 3)), draw(st.integers(1, 40))
    start = tuple(draw(st.integers(0, n - 1)) for _ in range(B)) if draw(st.booleans()) else (0,) * B
    ratio = np.zeros((B, n))
    for b, s in enumerate(start):
        steps = sorted(draw(st.lists(st.integers(0, 16), min_size=n - s, max_size=n - s)), reverse=True)
        ratio[b, :n - s] = np.array(steps) / 16.0  # non-increasing, multiples of 1/16
        ratio[b, n - s - 1] = 0.0                   # the whole prompt holds the whole norm
    levels = sorted({float(x) for x in ratio.ravel() if x < 1.0})
    threshold = draw(st.sampled_from(levels))
    return ratio, start, threshold, draw(st.integers(0, 6))
