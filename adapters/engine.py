"""The half every engine integration shares: the configuration check, the query-row capture
policy, the per-layer report and the KV-bytes accounting. The engines (``transformers``,
``mlx_lm``, ``kvpress``) keep only what is specific to their framework: where queries come
from, where K/V live, and how a compressed layer is stored and masked.

Every engine decides through ``refreekv.compress_layers`` (the planner): there is no second
implementation of the rule anywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from refreekv.config import ReFreeKVConfig
from refreekv.errors import bad_input
from refreekv.report import BudgetReport, LayerReport

#: The reason a sliding-window layer is reported as left alone.
SLIDING = "sliding-window layer (left alone)"


def checked_config(config: object, num_layers: int, context: int | None = None,
                   without_tail: str | None = None) -> ReFreeKVConfig:
    """The configuration an engine will use (the library's default for None), checked against
    the model: retained layers must exist, sinks must fit the context. ``without_tail``: the name of an
    engine that stores no quantized tail, which then refuses ``tail_bits`` by name (never drops the tail
    silently)."""
    cfg = ReFreeKVConfig() if config is None else config
    if not isinstance(cfg, ReFreeKVConfig):
        raise bad_input("config", f"type {type(cfg).__name__}", "a refreekv.ReFreeKVConfig (or None for the default)")
    if without_tail:
        refuse_tail(cfg, without_tail)
    cfg.check_layers(num_layers)
    if context is not None and cfg.sinks >= context:
        raise bad_input("sinks", cfg.sinks, f"fewer sinks than the model's context ({context})")
    return cfg


def refuse_tail(config: ReFreeKVConfig, engine_name: str) -> None:
    """``engine_name`` stores no quantized tail: a configuration with ``tail_bits`` is refused by name,
    never run with the tail dropped."""
    if isinstance(config, ReFreeKVConfig) and config.tail_bits is not None:
        raise bad_input("tail_bits", repr(config.tail_bits), f"None with {engine_name}, which stores no quantized "
                        "tail (the transformers and mlx-lm caches do): e.g. ReFreeKVConfig.evicting(), the eviction "
                        "rule, or ReFreeKVConfig(tail_bits=None)")


def copy_sharing(obj, memo: dict, names: Sequence[str] = (), objects: Sequence[object] = ()):
    """``copy.deepcopy`` of an engine's cache object (``__deepcopy__``) that shares, instead of copying,
    the attributes in ``names`` and the objects in ``objects`` wherever they appear (the model's own
    modules and probes: a copy of a cache is not a copy of the model)."""
    import copy

    for o in objects:
        memo[id(o)] = o
    new = obj.__class__.__new__(obj.__class__)
    memo[id(obj)] = new
    for name, value in obj.__dict__.items():
        setattr(new, name, value if name in names else copy.deepcopy(value, memo))
    return new


def capture_rows(configs: ReFreeKVConfig | Sequence[ReFreeKVConfig], n: int) -> int:
    """How many of the newest prompt rows to keep per layer so that every configuration in
    ``configs`` can be planned for a prompt of n tokens (``ReFreeKVConfig.rows_needed``)."""
    configs = [configs] if isinstance(configs, ReFreeKVConfig) else list(configs)
    return max(1, max(c.rows_needed(n) for c in configs))


def kv_bytes(*arrays) -> int:
    """Bytes held by K/V arrays of any framework (``None`` counts 0)."""
    total = 0
    for x in arrays:
        if x is None:
            continue
        nbytes = getattr(x, "nbytes", None)
        total += int(nbytes) if isinstance(nbytes, int) else int(x.numel() * x.element_size())
    return total


def skipped(layer: int, reason: str, lengths: list[int], keys=None, values=None) -> LayerReport:
    """The report of a layer an engine left alone (sliding window, not a KV cache, ...)."""
    size = kv_bytes(keys, values)
    return LayerReport(layer, False, reason, list(lengths), list(lengths), size, size, 0.0)


@dataclass
class History:
    """Reports of every compression a cache went through (one per prefill or re-plan), newest last.
    ``report`` is the newest; ``plans`` all of them."""

    plans: list[BudgetReport] = field(default_factory=list)

    @property
    def report(self) -> BudgetReport:
        return self.plans[-1] if self.plans else BudgetReport()

    def add(self, layers: list[LayerReport]) -> BudgetReport:
        rep = BudgetReport(sorted(layers, key=lambda r: r.layer))
        self.plans.append(rep)
        return rep
