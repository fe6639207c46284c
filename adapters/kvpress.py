"""ReFreeKV as a kvpress press: threshold-free compression one line away for kvpress users.

Usage (kvpress's pipeline, or as a context manager like every press)::

    from refreekv.adapters.kvpress import ReFreeKVPress

    pipe = transformers.pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer)
    answer = pipe(context, question=question, press=ReFreeKVPress())["answer"]

    with ReFreeKVPress()(model):
        model(input_ids, past_key_values=cache)      # prefill: the cache is compressed

Every decision is refreekv's: during prefill the press keeps each full-attention layer's newest
input rows, and when the last layer has run it plans every layer with one
``refreekv.compress_layers`` call, exactly as ``refreekv.adapters.transformers`` does. Layers keep
variable lengths (the memory is really freed), at ``Hkv`` heads, with layers 0 and 1 retained by
default.

kvpress builds one attention mask for all layers from the first layer's length, which is wrong
for a shorter layer under SDPA or eager attention whenever a call adds several tokens (a
question after the context): kvpress itself documents per-layer lengths as flash-attention only.
So, with SDPA or eager attention, the press gives each compressed layer its own mask through a
forward pre-hook (the same one the transformers integration uses). That hook must outlive the
``with press(model)`` block, because kvpress's pipeline asks its questions after it: one set of
hooks per model, acting only on the compressed layers (``PressLayer``) this press made for that
model, copies included (``copy.deepcopy`` of the cache, to ask several questions), and removed when
the last of those layers is garbage-collected (``weakref.finalize``). The first full-attention layer
must be retained then (kvpress reads positions from its length), which the default configuration does.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field

import torch
from kvpress.presses.base_press import BasePress
from transformers.cache_utils import DynamicLayer

import refreekv
from refreekv.config import ReFreeKVConfig
from refreekv.errors import bad_input
from refreekv.report import BudgetReport
from refreekv.rules import REPLANS

from . import engine
from .transformers import ReFreeKVLayer, _left_padding, _queries, attention_modules, layer_mask_kwargs, plan_group


class PressLayer(ReFreeKVLayer):
    """A compressed layer as kvpress expects: ``get_seq_length`` is the stored length (kvpress
    trims questions and answers back to it and passes true positions itself)."""

    needs_hooks = False  # its mask hooks live as long as it does (MaskHooks)
    mask_hooks: MaskHooks | None = None

    def get_seq_length(self) -> int:
        return 0 if self.keys is None or not self.is_initialized else self.keys.shape[-2]

    def __deepcopy__(self, memo):
        """A copy with its own arrays, masked by the same hooks (which then also wait for it)."""
        new = engine.copy_sharing(self, memo, names=("mask_hooks",))
        if new.mask_hooks is not None:
            new.mask_hooks.hold(new)
        return new


class MaskHooks:
    """Per-layer mask pre-hooks on one model's attention modules, for the ``PressLayer``s made for it
    (and their copies): registered with the first such layer, removed once the last is gone."""

    _by_model: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @classmethod
    def of(cls, modules: list) -> MaskHooks:
        key = modules[0]
        if key not in cls._by_model:
            cls._by_model[key] = cls(modules)
        return cls._by_model[key]

    def __init__(self, modules: list):
        self.modules = [weakref.ref(m) for m in modules]  # weak: the registry must not keep the model alive
        self.handles: list = []
        self.live = 0

    def hold(self, layer: PressLayer) -> None:
        """Keep the hooks while ``layer`` lives."""
        if not self.handles:
            self.handles = [m().register_forward_pre_hook(self._pre_hook, with_kwargs=True) for m in self.modules]
        self.live += 1
        layer.mask_hooks = self
        weakref.finalize(layer, self._release)

    def _release(self) -> None:
        self.live -= 1
        if self.live == 0:
            for h in self.handles:
                h.remove()
            self.handles = []

    def _pre_hook(self, module, args, kwargs):
        layers = getattr(kwargs.get("past_key_values", kwargs.get("cache")), "layers", None)
        if layers is None or module.layer_idx >= len(layers):
            return None
        layer = layers[module.layer_idx]
        if not isinstance(layer, PressLayer) or layer.mask_hooks is not self:
            return None  # another cache, or a layer this press did not make: not ours to mask
        new = layer_mask_kwargs(module, kwargs)
        return None if new is None else (args, new)


@dataclass
class ReFreeKVPress(BasePress):
    """ReFreeKV for kvpress: no compression ratio to choose.

    Parameters
    ----------
    config : ReFreeKVConfig
        The refreekv configuration (default: ``ReFreeKVConfig.evicting()``, the eviction rule: kvpress's
        cache holds only what a press returns, so the library's default, which keeps what it evicts as an
        8-bit tail, is refused by name here).

    After a prefill, ``report`` is the per-layer ``BudgetReport`` (kept tokens, budget, bytes), and
    ``compression_ratio`` the fraction of prompt tokens evicted, as kvpress's evaluation reads it.
    """

    config: ReFreeKVConfig = field(default_factory=ReFreeKVConfig.evicting)
    report: BudgetReport = field(default_factory=BudgetReport, init=False, repr=False)

    def __post_init__(self):
        if not isinstance(self.config, ReFreeKVConfig):
            raise bad_input("config", f"type {type(self.config).__name__}", "a refreekv.ReFreeKVConfig")
        engine.refuse_tail(self.config, "the kvpress press (kvpress's cache holds what a press returns)")
        if REPLANS[self.config.replan].keeps_turn(1):  # it would keep every prompt whole; a press compresses the prompt it gets
            raise bad_input("replan", repr(self.config.replan), '"turns", "chat" or "once" in a kvpress press (it compresses '
                            f'each prompt once, after prefill; {self.config.replan!r} keeps the newest segment whole, i.e. the prompt)')
        self._pending: list = []
        self._modules: list = []
        self._start: list[int] | None = None

    @property
    def compression_ratio(self) -> float:
        """1 - the paper's budget of the last prefill (0 before any)."""
        return 1.0 - self.report.budget[0] if self.report.layers else 0.0

    @compression_ratio.setter
    def compression_ratio(self, value):
        raise AttributeError("ReFreeKVPress has no compression ratio to set: the budget is decided per input")

    def post_init_from_model(self, model):
        self._modules = attention_modules(model)
        text = model.config.get_text_config(decoder=True)
        engine.checked_config(self.config, text.num_hidden_layers, getattr(text, "max_position_embeddings", None),
                              without_tail="the kvpress press (kvpress's cache holds what a press returns)")
        self._impl = getattr(model.config, "_attn_implementation", None)
        self._additive = self._impl == "eager"
        if self._impl in ("sdpa", "eager"):
            first_full = next((m.layer_idx for m in self._modules if not getattr(m, "is_sliding", False)), 0)
            if not self.config.is_retained(first_full):
                raise bad_input("retained_layers", repr(self.config.retained_layers),
                                f"to include layer {first_full} with {self._impl} attention in kvpress (kvpress "
                                "builds every layer's mask and positions from that layer's length)")

    def compress(self, module, hidden_states, keys, values, attentions, kwargs):
        raise NotImplementedError("ReFreeKVPress plans every layer together after prefill (forward_hook); "
                                  "it does not compress layer by layer")

    def forward_hook(self, module, input, kwargs, output):
        hidden = kwargs["hidden_states"]
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        q_len = hidden.shape[1]
        cache_position = kwargs["cache_position"]
        if int(cache_position[-1]) + 1 != q_len:  # not the prefill (kvpress's is_prefilling)
            return output
        t0 = time.perf_counter()
        layer = cache.layers[module.layer_idx]
        if module.layer_idx == self._modules[0].layer_idx:
            self._pending, self._start = [], None
        if not getattr(layer, "is_sliding", False):
            _whole_prompt(layer, module.layer_idx, q_len)
            n = layer.keys.shape[-2]
            if self._start is None:
                self._start = _left_padding(kwargs.get("attention_mask"), n, hidden.shape[0])
            rows = 1 if self.config.is_retained(module.layer_idx) else engine.capture_rows(self.config, n)
            cos, sin = kwargs["position_embeddings"]
            self._pending.append((module, hidden[:, -rows:].clone(), cos[:, -rows:].clone(), sin[:, -rows:].clone(),
                                  time.perf_counter() - t0, layer.keys))
        if module.layer_idx == self._modules[-1].layer_idx:
            self._compress(cache)
        return output

    @torch.no_grad()
    def _compress(self, cache) -> None:
        """Plan every captured layer together and store what each keeps."""
        pending, self._pending = self._pending, []
        groups: dict[tuple, list] = {}
        for module, hidden, cos, sin, spent, seen in pending:
            if cache.layers[module.layer_idx].keys is not seen:
                raise bad_input("press", f"layer {module.layer_idx}'s keys replaced after ReFreeKVPress captured them "
                                "(another press compressed the layer, e.g. after it in a ComposedPress)", _ALONE)
            q = _queries(module, hidden, cos, sin)
            K = cache.layers[module.layer_idx].keys
            groups.setdefault(plan_group(K, q), []).append((module, q, spent))
        reports = []
        for group in groups.values():
            layers = [cache.layers[m.layer_idx] for m, _, _ in group]
            outs = refreekv.compress_layers([q for _, q, _ in group], [lay.keys for lay in layers],
                                            [lay.values for lay in layers], self.config,
                                            layers=[m.layer_idx for m, _, _ in group], start=self._start,
                                            scale=[m.scaling for m, _, _ in group])
            for (module, _, spent), layer, out in zip(group, layers, outs):
                out.report.seconds += spent
                reports.append(out.report)
                if out.valid is None:
                    continue
                kept = PressLayer()
                kept.lazy_initialization(out.keys, out.values)
                kept.additive_mask = self._additive
                kept.store_compressed(out.keys, out.values, out.valid, layer.keys.shape[-2])
                if self._impl in ("sdpa", "eager"):
                    MaskHooks.of(self._modules).hold(kept)
                cache.layers[module.layer_idx] = kept
        self.report = BudgetReport(sorted(reports, key=lambda r: r.layer))


_ALONE = ("ReFreeKVPress as the only press that compresses the prompt: it plans every layer at the end of "
          "prefill on the whole prompt's keys, and a composed press would change them under its plan")


def _whole_prompt(layer, idx: int, q_len: int) -> None:
    """At prefill, a full-attention layer must be a plain full-precision layer holding the whole prompt."""
    if type(layer) is not DynamicLayer:
        raise bad_input("cache", f"layer {idx} of type {type(layer).__name__}",
                        "a DynamicCache: ReFreeKVPress plans on the full-precision keys of the whole prompt "
                        "(quantized and other cache layers are not supported)")
    if layer.keys is None or layer.keys.shape[-2] != q_len:
        held = 0 if layer.keys is None else layer.keys.shape[-2]
        raise bad_input("press", f"layer {idx} holding {held} of the prompt's {q_len} tokens when ReFreeKVPress saw it "
                        "(another press compressed it first, e.g. before it in a ComposedPress)", _ALONE)


