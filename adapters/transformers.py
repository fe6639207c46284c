"""ReFreeKV for Hugging Face transformers (5.x) ``generate``.

Usage::

    from refreekv.adapters.transformers import ReFreeKVCache, refreekv_hooks

    cache = ReFreeKVCache(model, ReFreeKVConfig())      # checked against the model here
    with refreekv_hooks(model):                           # forward hooks on, removed on exit
        out = model.generate(**inputs, cache=cache, max_new_tokens=64)
    print(cache.report)                                   # per-layer kept tokens and bytes

What happens: when a full-attention layer has run on the prompt (prefill), a forward hook keeps
that layer's newest input rows; once the last layer has run, the cache recomputes each layer's
newest prompt queries exactly as the model does (q_proj, optional q_norm, RoPE), plans every
layer with ``refreekv.compress_layers`` on the keys it holds, and keeps K/V at the kept positions
only, at ``Hkv`` heads. Prefill itself is untouched, so SDPA works as usual.

To compare configurations on one prompt, prefill once with ``capture_prefill`` and build a
compressed cache per configuration with ``ReFreeKVCache.from_prefill`` (the full cache is never
modified).

After eviction every layer holds a different number of tokens while transformers builds one
attention mask for all layers. Each compressed layer therefore reports its *uncompressed*
length (so positions, RoPE and the shared mask keep counting from ``n``), and a forward
pre-hook hands that layer a mask of its own: its kept slots (per sample) plus the tokens added
since, cut from the shared mask's columns past the prompt.

Nothing is patched at import; the hooks act only on calls whose cache is a ``ReFreeKVCache``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import sys
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

import refreekv
from refreekv.config import ReFreeKVConfig
from refreekv.errors import bad_input
from refreekv.planner import ORDER_FIELDS
from refreekv.report import BudgetReport, LayerReport
from refreekv.rules import REPLANS

from . import engine

SUPPORTED_ATTENTION = ("sdpa", "eager")


def attention_modules(model) -> list[torch.nn.Module]:
    """The self-attention modules, in layer order (they carry ``layer_idx`` and ``q_proj``)."""
    mods = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "q_proj")]
    return sorted(mods, key=lambda m: m.layer_idx)


def _text_config(model):
    return model.config.get_text_config(decoder=True)


def _check_model(model, config) -> ReFreeKVConfig:
    """The engine checks shared by the cache and ``capture_prefill``."""
    if not isinstance(model, torch.nn.Module) or not hasattr(getattr(model, "config", None), "get_text_config"):
        raise bad_input("model", f"type {type(model).__name__}", "a transformers causal LM (a PreTrainedModel)")
    text = _text_config(model)
    cfg = engine.checked_config(config, text.num_hidden_layers, getattr(text, "max_position_embeddings", None))
    impl = getattr(model.config, "_attn_implementation", None)
    if impl not in SUPPORTED_ATTENTION:
        raise bad_input("model", f"attn_implementation {impl!r}",
                        f"one of {SUPPORTED_ATTENTION} (each compressed layer needs its own mask)")
    if not attention_modules(model):
        raise bad_input("model", type(model).__name__, "a causal LM whose attention modules have q_proj")
    return cfg


#: transformers' crop takes a count to remove (``crop(-n)``; 0 removes nothing, as in the decode loop's
#: deferred stop check on "mps") in recent versions, and an absolute length (>= 0) or ``-n`` before.
_CROP_COUNTS = "tokens_to_remove" in inspect.signature(DynamicLayer.crop).parameters


def _tokens_to_crop(value: int, length: int) -> int:
    """How many of ``length`` tokens a ``crop(value)`` removes, in this transformers' semantics."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_input("crop", repr(value), "an int: -(tokens to remove)")
    if value < 0:
        return -value
    if _CROP_COUNTS:
        if value:
            raise bad_input("crop", value, "-(tokens to remove) or 0 (this transformers takes no absolute length)")
        return 0
    return max(0, length - value)


def _check_crop(value: int, removed: int, added: int) -> None:
    """A crop may remove at most the ``added`` tokens that came after a compressed layer's last plan."""
    if removed > added:
        raise bad_input("crop", value, f"at most {added} tokens to remove from this compressed cache (those added "
                        "since its last plan: the kept slots were chosen with the tokens after them)")


def _assisted_step() -> tuple[int, bool] | None:
    """For a model call made by transformers' assisted decoding (prompt lookup, a draft model, early exit):
    how many of the call's last tokens are the candidates it verifies (its ``candidate_length``) and whether
    it is the generation's first call (``is_first_iteration``), read from the ``_assisted_decoding`` frame
    that made the call; None for any other call."""
    frame = sys._getframe(1)
    for _ in range(32):
        if frame is None:
            return None
        if frame.f_globals.get("__name__", "").startswith("transformers."):
            if frame.f_code.co_name == "generate":
                return None  # the nearest generation is not an assisted one (e.g. a draft model's own generate)
            if frame.f_code.co_name == "_assisted_decoding":
                c, first = frame.f_locals.get("candidate_length"), frame.f_locals.get("is_first_iteration")
                ok = isinstance(c, int) and not isinstance(c, bool) and c >= 0 and isinstance(first, bool)
                return (c, first) if ok else None
        frame = frame.f_back
    return None


#: A layer's quantized tail (``config.tail_bits``): codes, scales and biases of K and V, each (B, Hkv, T, ...)
TAIL_FIELDS = ("tail_k", "tail_k_scales", "tail_k_biases", "tail_v", "tail_v_scales", "tail_v_biases")


class ReFreeKVLayer(DynamicLayer):
    """A full-attention cache layer that can be compressed once, after prefill.

    Stores ``(B, Hkv, J + D, d)``: J kept slots (padded to the batch's largest cut; ``slot_valid``
    (B, J) marks the real ones) then D tokens added since the last plan. ``get_seq_length`` returns
    the uncompressed (virtual) length, so positions never drift. With ``config.tail_bits`` it also
    holds what its plans evicted, quantized (``TAIL_FIELDS``, T slots, ``tail_valid`` (B, T)):
    attention sees those T positions dequantized, before the kept slots.
    """

    #: Calls must come through the hooks (``refreekv_hooks`` marks each one): a prompt prefilled
    #: without them is not compressed, and a compressed layer without its own mask attends to the
    #: wrong slots or fails inside the attention kernel. kvpress's layers keep their hooks with the cache.
    needs_hooks = True

    def __init__(self):
        super().__init__()
        self.additive_mask = False    # eager attention takes additive float masks
        self._fresh()

    def _fresh(self) -> None:
        """The state of a layer that has seen no prompt (``__init__`` and ``reset``)."""
        self.hooked = False           # set by the pre-hook for the call under way, cleared by update
        self.evicted = 0              # positions removed so far (the virtual length minus the slots)
        self.compressed_at = 0        # the virtual length when it was last planned (n after the prompt)
        self.kept_slots = 0           # J
        self.slot_valid: torch.Tensor | None = None
        self.all_slots_valid = True   # read once at compression: no host sync while decoding
        self.tail_bits = 0            # bits of the quantized tail's codes (0: no tail)
        self.tail_valid: torch.Tensor | None = None
        for name in TAIL_FIELDS:
            setattr(self, name, None)

    def reset(self) -> None:
        """Empty, as new: the next call is a new prompt (``Cache.reset``)."""
        super().reset()
        self._fresh()

    @property
    def compressed(self) -> bool:
        return self.slot_valid is not None

    @property
    def added(self) -> int:
        """Tokens stored after the kept slots: added since the last plan."""
        return self.keys.shape[-2] - self.kept_slots

    def get_seq_length(self) -> int:
        return super().get_seq_length() + self.evicted

    @property
    def tail_slots(self) -> int:
        """T, the quantized tail's slots (0 without one)."""
        return 0 if self.tail_valid is None else self.tail_valid.shape[1]

    def tail_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The tail's K and V (B, Hkv, T, d), dequantized to the cache's dtype."""
        be = refreekv.builtin_backend("torch")
        out = []
        for p in ("k", "v"):
            codes, scales, biases = (getattr(self, f"tail_{p}{x}") for x in ("", "_scales", "_biases"))
            d = codes.shape[-1] * 8 // self.tail_bits
            out.append(refreekv.core.step(be, "dequantize")(codes, scales, biases, self.tail_bits, d // scales.shape[-1],
                                                            be.dtype_name(self.keys)))
        return out[0], out[1]

    def attended(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Everything attention sees: K and V (B, Hkv, T + J + D, d), the tail dequantized first, and
        which of those slots are real (B, T + J + D) bool."""
        B, D = self.keys.shape[0], self.added
        parts = [torch.ones(B, self.keys.shape[-2], dtype=torch.bool, device=self.keys.device)] \
            if self.slot_valid is None else \
            [self.slot_valid, torch.ones(B, D, dtype=torch.bool, device=self.slot_valid.device)]
        if self.tail_valid is None:
            return self.keys, self.values, torch.cat(parts, dim=1)
        tk, tv = self.tail_kv()
        return (torch.cat([tk, self.keys], dim=-2), torch.cat([tv, self.values], dim=-2),
                torch.cat([self.tail_valid, *parts], dim=1))

    def _tail_map(self, fn) -> None:
        """Apply ``fn`` to every tensor of the tail (batch first), e.g. a beam reorder."""
        if self.tail_valid is not None:
            for name in (*TAIL_FIELDS, "tail_valid"):
                setattr(self, name, fn(getattr(self, name)))

    def update(self, key_states, value_states, *args, **kwargs):
        if self.is_initialized and self.keys is not None and key_states.shape[0] != self.keys.shape[0]:
            raise bad_input("input_ids", f"a batch of {key_states.shape[0]} on a cache that holds {self.keys.shape[0]}",
                            f"a batch of {self.keys.shape[0]}, the one this cache was filled with (a new batch needs a new cache)")
        if self.needs_hooks and not self.hooked:
            raise bad_input("model", "a forward pass with a ReFreeKVCache outside refreekv_hooks(model)",
                            "every call that uses the cache inside `with refreekv_hooks(model):` (or through "
                            "refreekv.adapters.transformers.generate): without the hooks a prompt is not compressed "
                            "and a compressed layer gets no mask of its own")
        self.hooked = False
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        if self.tail_valid is None:
            return keys, values
        tk, tv = self.tail_kv()  # dequantized for this call only: the cache keeps the codes
        return torch.cat([tk, keys], dim=-2), torch.cat([tv, values], dim=-2)

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the newest tokens (``-count``, transformers 5.x; an absolute length >= 0 in older
        versions). On a compressed layer only tokens added since its last plan: the kept slots' set was
        decided with the tokens after them, so a crop into them is refused."""
        if not self.compressed:
            return super().crop(tokens_to_remove)
        r = _tokens_to_crop(tokens_to_remove, self.get_seq_length())
        _check_crop(tokens_to_remove, r, self.added)
        if r:
            self.keys, self.values = self.keys[..., :-r, :], self.values[..., :-r, :]

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.compressed:
            self.slot_valid = self.slot_valid.repeat_interleave(repeats, dim=0)
        self._tail_map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.compressed:
            self.slot_valid = self.slot_valid[indices]
        self._tail_map(lambda t: t[indices])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.compressed:
            self.slot_valid = self.slot_valid.index_select(0, beam_idx.to(self.slot_valid.device))
        self._tail_map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def store_compressed(self, keys, values, valid, virtual_length: int, tail=None) -> None:
        """Keep ``keys``/``values`` (B, Hkv, J, d) for the first ``virtual_length`` positions, and with
        ``tail`` (a ``refreekv.QuantizedTail``) what the plan evicted, quantized, after the tail earlier
        plans left (evicted tokens stay evicted: a re-plan only adds to the tail)."""
        self.keys, self.values = keys, values
        self.compressed_at, self.kept_slots = virtual_length, keys.shape[-2]
        self.evicted = virtual_length - self.kept_slots
        self.slot_valid = valid
        if tail is not None:
            new = dict(zip(TAIL_FIELDS, (tail.keys.codes, tail.keys.scales, tail.keys.biases,
                                         tail.values.codes, tail.values.scales, tail.values.biases)))
            if self.tail_valid is None:  # copies: the planner hands every layer's tail as views of one array
                self.tail_bits, self.tail_valid = tail.keys.bits, tail.valid.clone()
                for name, t in new.items():
                    setattr(self, name, t.clone())
            else:
                self.tail_valid = torch.cat([self.tail_valid, tail.valid], dim=1)
                for name, t in new.items():
                    setattr(self, name, torch.cat([getattr(self, name), t], dim=2))
        self.all_slots_valid = bool(valid.all()) and (self.tail_valid is None or bool(self.tail_valid.all()))

    def layer_mask(self, shared: torch.Tensor | None, q_len: int, dtype: torch.dtype, additive: bool):
        """This layer's mask (B, 1, q, J + D) for a call adding ``q_len`` tokens.

        Kept slots: visible where valid. Added tokens: the shared mask's columns past the last
        plan (they carry causality and any user padding), or plain causality without one.
        """
        slots = self.slot_valid if self.tail_valid is None else torch.cat([self.tail_valid, self.slot_valid], dim=1)
        B, J = slots.shape
        D = self.added + q_len  # tokens added after the last plan, this call's included
        kept = slots[:, None, None, :].expand(B, 1, q_len, J)
        if shared is None:
            t = torch.arange(q_len, device=kept.device)[:, None]
            u = torch.arange(D, device=kept.device)[None, :]
            new = (u <= (D - q_len) + t)[None, None].expand(B, 1, q_len, D)
            mask = torch.cat([kept, new], dim=-1)
            if not additive:
                return mask
            return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
        new = shared[..., self.compressed_at:self.compressed_at + D].expand(B, 1, q_len, D)
        if shared.dtype == torch.bool:
            return torch.cat([kept, new], dim=-1)
        kept_add = torch.zeros(kept.shape, dtype=shared.dtype, device=shared.device)
        return torch.cat([kept_add.masked_fill(~kept, torch.finfo(shared.dtype).min), new], dim=-1)


@dataclass
class Captured:
    """What one layer needs to be planned after prefill: its newest input rows and their RoPE."""

    module: torch.nn.Module
    hidden: torch.Tensor   # (B, R, hidden)
    cos: torch.Tensor      # (B, R, head_dim)
    sin: torch.Tensor
    seconds: float = 0.0   # time spent capturing it (reported with the layer)

    def queries(self, rows: int) -> torch.Tensor:
        """Post-RoPE queries (B, H, rows, d) of the newest ``rows`` positions."""
        return _queries(self.module, self.hidden[:, -rows:], self.cos[:, -rows:], self.sin[:, -rows:])


class ReFreeKVCache(DynamicCache):
    """A ``DynamicCache`` whose full-attention layers ReFreeKV compresses right after prefill.

    Sliding-window layers (Gemma-3) are left alone. ``report`` (a ``BudgetReport``) is filled
    once the prompt has been prefilled. Copy with ``copy.deepcopy`` to answer several questions
    from one compressed context.
    """

    def __init__(self, model, config: ReFreeKVConfig | None = None):
        cfg = _check_model(model, config)
        super().__init__(config=model.config)
        self.module_ids = frozenset(id(m) for m in attention_modules(model))  # ids: a deepcopy copies no module
        self.layers = [ReFreeKVLayer() if type(layer) is DynamicLayer else layer for layer in self.layers]
        self.refreekv_config = cfg
        self.fingerprint = _fingerprint(model)  # which model this cache belongs to (checked by load_cache)
        self.additive_mask = model.config._attn_implementation == "eager"
        self.last_layer = attention_modules(model)[-1].layer_idx
        self._fresh()

    def _fresh(self) -> None:
        """The state of a cache that has seen no prompt (``__init__`` and ``reset``)."""
        self.history = engine.History()
        self.planned_layers: set[int] = set()  # layers seen at prefill (ReFreeKV runs once each)
        self._pending: list[Captured] = []
        self._mask_start: tuple[torch.Tensor | None, list[int]] | None = None
        self._start: list[int] = []
        self._skips: list = []  # reports of layers left alone, added to the next compression's report
        self._generated: dict[int, list] = {}  # replan_every: each layer's newest generated rows
        self._since_plan = 0                   # replan_every: tokens generated since the last plan
        self._turn = 0                         # the newest segment and what was generated after it (history)
        self._segments = 0                     # prompt segments so far (1: the first prompt; chat keeps from 2)
        self._candidates = 0                   # the current call's last tokens that assisted decoding verifies

    def reset(self) -> None:
        """Empty every layer and forget every plan: the cache is as new for the next prompt."""
        super().reset()
        self._fresh()

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the newest tokens (transformers' assisted decoding rolls back rejected candidates):
        exact for tokens added since the last plan; refused, before anything is removed, into planned
        slots or while ``replan_every`` buffers generated rows."""
        r = _tokens_to_crop(tokens_to_remove, self.get_seq_length())
        if r and self.refreekv_config.replan_every > 0:
            raise bad_input("crop", tokens_to_remove, "no crop with replan_every (the buffered rows of generated "
                            "tokens would outlive them)")
        added = [layer.added for layer in self.layers if isinstance(layer, ReFreeKVLayer) and layer.compressed]
        if added:
            _check_crop(tokens_to_remove, r, min(added))
        super().crop(tokens_to_remove)
        self._turn = max(0, self._turn - r)

    def __deepcopy__(self, memo):
        """An independent copy (answer several questions from one context, fork a chat). The model's
        attention modules that the buffered rows point at (``replan_every``) are shared, not copied:
        a copy of the cache is not a copy of the model's weights."""
        modules = [c.module for c in self._pending] + [e[0] for b in self._generated.values() for e in b]
        return engine.copy_sharing(self, memo, objects=modules)

    @property
    def report(self) -> BudgetReport:
        """The newest compression's per-layer report (empty before the prefill)."""
        return self.history.report

    @classmethod
    def from_prefill(cls, prefill: Prefill, config: ReFreeKVConfig | None = None) -> ReFreeKVCache:
        """A compressed cache built from a captured plain prefill, as if ``config`` had been
        active during it: same plan, same K/V, same report. ``prefill`` is not modified (tensors
        it holds are shared, never written), so one prefill serves many configurations."""
        if not isinstance(prefill, Prefill):
            raise bad_input("prefill", f"type {type(prefill).__name__}", "a Prefill from capture_prefill(...)")
        cache = cls(prefill.model, config)
        for i, (mine, src) in enumerate(zip(cache.layers, prefill.cache.layers)):
            if src.keys is None:
                continue
            mine.lazy_initialization(src.keys, src.values)
            mine.keys, mine.values = src.keys, src.values
            cache.planned_layers.add(i)
            cache._turn = int(src.keys.shape[-2])
            cache._segments = 1
        need = cache.refreekv_config.rows_needed(int(prefill.lengths.max()))
        if need > prefill.rows:
            raise bad_input("config", f"a configuration that needs {need} query rows",
                            f"at most the {prefill.rows} rows captured (capture_prefill(..., configs=[config]))")
        items = []
        for cap in prefill.captured:
            layer = cache.layers[cap.module.layer_idx]
            if isinstance(layer, ReFreeKVLayer):
                items.append(cap)
            else:
                cache._record_skip(cap.module.layer_idx, layer)
        cache._compress(items, prefill.start, prefill.plans)
        return cache

    # -- called by the hooks ------------------------------------------------------------------
    def defer(self, module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              mask: torch.Tensor | None) -> None:
        """Keep what layer ``module.layer_idx`` needs (its newest rows and the padding) and, once
        the last layer has run, compress every layer together: after the prefill, and (with
        ``replan="turns"``) after every later segment of two or more tokens.

        Why wait for the last layer: ``compress_layers`` then plans all layers as one batch with
        one host read, instead of once per layer between two layers of the model. The full cache
        exists until the end of the call either way: every layer's K/V is there once the last
        layer has run.
        """
        t0 = time.perf_counter()
        idx = module.layer_idx
        layer = self.layers[idx]
        first = idx not in self.planned_layers
        self.planned_layers.add(idx)
        c = self._candidates  # assisted decoding's candidates end the call: the plan is of what precedes them
        if c:
            hidden, cos, sin = hidden[:, :-c], cos[:, :-c], sin[:, :-c]
        if first:
            self._turn = hidden.shape[1]  # the first prompt is the newest segment
            self._segments = 1
        if isinstance(layer, ReFreeKVLayer):
            B, _, n, _ = layer.keys.shape
            n -= c
            if first and (self._mask_start is None or self._mask_start[0] is not mask):  # layers share one mask
                self._mask_start = (mask, _left_padding(mask, n, B))
            # A retained layer needs no queries: its last row is enough for the report.
            rows = 1 if self.refreekv_config.is_retained(idx) else engine.capture_rows(self.refreekv_config, n)
            self._pending.append(Captured(module, hidden[:, -rows:].clone(), cos[:, -rows:].clone(),
                                          sin[:, -rows:].clone(), time.perf_counter() - t0))
            self._start = self._mask_start[1] if first else [0]
        elif first:
            self._record_skip(idx, layer)
        if idx == self.last_layer:
            self._mask_start = None
            pending, self._pending = self._pending, []
            self._compress(pending, self._start, held_out=c)

    def segment(self, module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """A call on an already planned cache: a new prompt segment (more than ``sinks`` tokens, and
        at least two) is planned when the configuration's ``REPLANS`` rule plans segments ("turns",
        "history", "chat"); generated tokens are counted and buffered for ``replan_every``. ``_turn``
        counts the newest segment and the tokens after it: what "history" (and "chat" from the second
        segment) keeps whole; ``_segments`` counts the prompt segments."""
        cfg = self.refreekv_config
        q_len, B = hidden.shape[1], hidden.shape[0]
        seg = q_len - self._candidates  # assisted decoding's candidates are generated tokens, not a segment
        planned = seg > cfg.sinks and seg >= 2 and REPLANS[cfg.replan].segments
        if planned and module.layer_idx == self.last_layer:
            self._turn = seg  # a new segment starts a new turn (its candidates are added after the plan)
            self._segments += 1
        elif module.layer_idx == self.last_layer:
            self._turn += q_len
        if planned:
            # A segment of at most `sinks` tokens is appended as it is (the n <= sinks + 1 rule of
            # a prompt): too few queries to judge the whole cache by.
            if B != 1:
                raise bad_input("replan", repr(cfg.replan), f'"once" for a batch of {B} (re-planning needs batch size 1)')
            self._generated.clear()
            self.defer(module, hidden, cos, sin, None)
        elif q_len == 1 and cfg.replan_every > 0 and B == 1:
            buf = self._generated.setdefault(module.layer_idx, [])
            buf.append((module, hidden, cos, sin))
            del buf[:-engine.capture_rows(cfg, 1 << 30)]  # only the newest rows can score
            if module.layer_idx == self.last_layer:
                self._since_plan += 1
                if self._since_plan >= cfg.replan_every:
                    items = [Captured(b[0][0], torch.cat([h for _, h, _, _ in b], 1), torch.cat([c for _, _, c, _ in b], 1),
                                      torch.cat([s for _, _, _, s in b], 1)) for b in self._generated.values()
                             if isinstance(self.layers[b[0][0].layer_idx], ReFreeKVLayer)]
                    self._generated.clear()
                    self._compress(items, [0])

    def _record_skip(self, idx: int, layer) -> None:
        n = [int(layer.keys.shape[-2])] * layer.keys.shape[0]
        self._skips.append(engine.skipped(idx, engine.SLIDING, n, layer.keys, layer.values))

    def _compress(self, items: list[Captured], start: list[int], memo: dict | None = None, held_out: int = 0) -> None:
        """Plan the captured layers together (per group of equal shapes; one group after a prefill)
        and store what each keeps. Each layer's report time is its share of the planning, its
        eviction, its query recompute and its capture in the hook. A later segment scores with its
        own rows, at most as many as it has. The newest ``held_out`` tokens (assisted decoding's
        candidates) are left out of the plan and stored after the kept slots, as generated tokens are."""
        if held_out:
            tails = {}
            for cap in items:
                layer = self.layers[cap.module.layer_idx]
                tails[cap.module.layer_idx] = (layer.keys[..., -held_out:, :], layer.values[..., -held_out:, :])
                layer.keys, layer.values = layer.keys[..., :-held_out, :], layer.values[..., :-held_out, :]
            try:
                self._compress(items, start, memo)
            finally:
                for idx, (k, v) in tails.items():
                    layer = self.layers[idx]
                    layer.keys = torch.cat([layer.keys, k], dim=-2)
                    layer.values = torch.cat([layer.values, v], dim=-2)
                self._turn += held_out
            return
        t0 = time.perf_counter()
        cfg = self.refreekv_config
        planned = [c for c in items if not cfg.is_retained(c.module.layer_idx)]
        captured = min((c.hidden.shape[1] for c in planned), default=1)
        most = max((self.layers[c.module.layer_idx].keys.shape[-2] for c in planned), default=1)
        if planned and cfg.rows_needed(most) > captured:
            cfg = dataclasses.replace(cfg, query_rows=min(cfg.rows_for(most), captured))
        if planned and cfg.rows_needed(most) > captured:
            raise bad_input("replan", repr(self.refreekv_config.replan), f"a ranking whose rows a {captured}-token "
                            f"segment holds (ranking={cfg.ranking!r} needs {cfg.rows_needed(most)})")
        qs = {}
        for cap in items:
            n = self.layers[cap.module.layer_idx].keys.shape[-2]
            rows = 1 if cfg.is_retained(cap.module.layer_idx) else cfg.rows_needed(n)
            qs[cap.module.layer_idx] = cap.queries(min(rows, cap.hidden.shape[1]))
        q_s = (time.perf_counter() - t0) / max(1, len(items))  # each layer's share of the recompute
        groups: dict[tuple, list[Captured]] = {}
        for cap in items:
            K, q = self.layers[cap.module.layer_idx].keys, qs[cap.module.layer_idx]
            groups.setdefault(plan_group(K, q), []).append(cap)
        reports, self._skips = self._skips, []
        self._since_plan = 0
        for group in groups.values():
            first = group[0].module.layer_idx
            size = _joint_layers(self.layers[first].keys, qs[first]) or len(group)
            for chunk in (group[i:i + size] for i in range(0, len(group), size)):
                layers = [self.layers[c.module.layer_idx] for c in chunk]
                args = ([qs[c.module.layer_idx] for c in chunk], [lay.keys for lay in layers],
                        [lay.values for lay in layers], cfg)
                kw = dict(start=start, scale=[c.module.scaling for c in chunk])
                reuse = None
                if memo is not None and not all(cfg.is_retained(c.module.layer_idx) for c in chunk):
                    # one prefill, many configurations: score each ranking once
                    key = (tuple(getattr(cfg, f) for f in ORDER_FIELDS), tuple(c.module.layer_idx for c in chunk))
                    if key not in memo:
                        memo[key] = refreekv.plan_layers(*args[:2], cfg, **kw)
                    reuse = memo[key]
                outs = refreekv.compress_layers(*args, layers=[c.module.layer_idx for c in chunk], reuse=reuse,
                                                keep_newest=self._turn if REPLANS[cfg.replan].keeps_turn(self._segments) else None,
                                                **kw)
                for cap, layer, out in zip(chunk, layers, outs):
                    if out.valid is not None:
                        layer.additive_mask = self.additive_mask
                        layer.store_compressed(out.keys, out.values, out.valid, layer.get_seq_length(), out.tail)
                    out.report.seconds += cap.seconds + q_s
                    reports.append(out.report)
        self.history.add(reports)


#: On a CPU, plan at most this many bytes of stacked scores together (scripts/joint_planning_sweep.py,
#: Llama3-8B shapes, 2 cores): at 32k tokens groups of 4-8 MiB were the fastest and larger ones slower
#: (memory-bound once they leave the caches); at 4k, groups of 16-32 layers (8-16 MiB) were 1.5x faster
#: than one by one. Small models and short prompts fit every layer in one group. A GPU has the bandwidth
#: and is bound by launches: no cap there.
CPU_JOINT_BYTES = 8 << 20


def cache_bytes(cache) -> int:
    """K/V bytes a transformers cache (a ``ReFreeKVCache`` or any ``DynamicCache``) holds now, measured
    (a quantized tail's codes, scales and biases included)."""
    return engine.kv_bytes(*(x for layer in cache.layers for x in (layer.keys, layer.values,
                                                                   *(getattr(layer, n, None) for n in TAIL_FIELDS))))


def plan_group(keys: torch.Tensor, q: torch.Tensor) -> tuple:
    """Which layers may be planned in one ``compress_layers`` call: same shapes, dtype and device
    (a model split over devices, ``device_map="auto"``, holds each layer's cache on its layer's device,
    and one call takes arrays of one device)."""
    return tuple(keys.shape), keys.dtype, keys.device, tuple(q.shape), q.dtype


def _joint_layers(keys: torch.Tensor, q: torch.Tensor) -> int | None:
    """How many layers to plan together (their float32 scores are (B, H, k, n) each), or None for all."""
    if keys.device.type != "cpu":
        return None
    B, H, k = q.shape[:3]
    return max(1, CPU_JOINT_BYTES // (B * H * k * keys.shape[-2] * 4))


def _left_padding(mask: torch.Tensor | None, n: int, batch: int) -> list[int]:
    """Per-sample left padding, read from the last prompt token's mask row."""
    if mask is None:
        return [0] * batch
    row = mask[:, 0, -1, :n]
    visible = row if row.dtype == torch.bool else row == 0
    visible = visible.expand(batch, n)
    count = visible.sum(-1)
    start = n - count
    expected = torch.arange(n, device=row.device)[None, :] >= start[:, None]
    if not torch.equal(visible, expected):
        raise bad_input("attention_mask", "padding that is not on the left",
                        "left padding (tokenizer.padding_side = 'left') for batched prompts")
    empty = (count == 0).nonzero().flatten().tolist()
    if empty:
        raise bad_input("attention_mask", f"no token in sample(s) {empty} (a row of 0s)",
                        "at least one token (a 1) in every sample's row")
    return start.tolist()


def _queries(module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Post-RoPE queries of the given positions, computed exactly as the attention module does."""
    B, L, _ = hidden.shape
    q = module.q_proj(hidden).view(B, L, -1, module.head_dim).transpose(1, 2)
    if hasattr(module, "q_norm"):
        q = module.q_norm(q)
    rope = getattr(sys.modules[type(module).__module__], "apply_rotary_pos_emb")
    return rope(q, q, cos, sin)[0]


def _cache_of(kwargs) -> ReFreeKVCache | None:
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    return cache if isinstance(cache, ReFreeKVCache) else None


def layer_mask_kwargs(module, kwargs):
    """If this call's cache holds a compressed ReFreeKV layer for ``module``, the call's kwargs with
    that layer's own mask; else None. Shared by the hooks of every engine built on this cache layer."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    layers = getattr(cache, "layers", None)
    if layers is None or module.layer_idx >= len(layers):
        return None
    layer = layers[module.layer_idx]
    if not isinstance(layer, ReFreeKVLayer):
        return None
    layer.hooked = True
    if not layer.compressed:
        return None
    hidden = kwargs["hidden_states"]
    shared = kwargs.get("attention_mask")
    if shared is None and hidden.shape[1] == 1 and layer.all_slots_valid:
        return None  # one new token, every kept slot real: no mask needed at all
    kwargs["attention_mask"] = layer.layer_mask(shared, hidden.shape[1], hidden.dtype, layer.additive_mask)
    return kwargs


_USE_CACHE = ("True (the default; pass use_cache=True where the model's config sets it False): without it "
              "generate() feeds the whole sequence again at every step, and the cache would append it as a new "
              "segment each time")


def _pre_hook(module, args, kwargs):
    """Give a compressed layer a mask of its own for this call."""
    cache = _cache_of(kwargs)
    if cache is None:
        return None
    if id(module) not in cache.module_ids:
        raise bad_input("cache", "a ReFreeKVCache made for another model (this attention module is not one of its "
                        f"model's; layer {module.layer_idx}, the cache has {len(cache.layers)} layers)",
                        "ReFreeKVCache(model, ...) of the model that runs it")
    if kwargs.get("use_cache") is False:
        raise bad_input("use_cache", "False with a ReFreeKVCache", _USE_CACHE)
    new = layer_mask_kwargs(module, kwargs)
    return None if new is None else (args, new)


def _model_pre_hook(model, args, kwargs):
    """Once per model call: how many of its last tokens are assisted decoding's candidates (0 for any
    other call), so that a plan covers only what precedes them and a rejected candidate can be cropped.

    On a cache that already holds tokens, transformers' assisted decoding (5.2x) sends the whole sequence
    again at its first step (plain generate sends only what the cache lacks): any cache would then hold
    the earlier tokens twice. That call is cut here to the tokens the cache does not hold, as plain
    generate's prefill does."""
    cache = _cache_of(kwargs)
    if cache is None:
        return None
    step = _assisted_step()
    c = step[0] if step else 0
    if c and cache.refreekv_config.replan_every > 0:
        raise bad_input("replan_every", cache.refreekv_config.replan_every, "0 with assisted decoding (its "
                        "rejected candidates are cropped, and replan_every's buffered rows would outlive them)")
    cache._candidates = c
    past = cache.get_seq_length() if step and step[1] else 0
    if not past:
        return None
    name = "input_ids" if kwargs.get("input_ids") is not None else "inputs_embeds"
    new, pos, mask = kwargs.get(name), kwargs.get("position_ids"), kwargs.get("attention_mask")
    if new is None:
        return None
    # Where the call's first token is: its position, or what the 2D mask says precedes it.
    if pos is not None:
        start = int(pos.reshape(-1, pos.shape[-1])[0, 0])  # one host read, at the first assisted step only
    elif mask is not None and mask.dim() == 2:
        start = mask.shape[1] - new.shape[1]
    else:
        return None  # the model counts positions from the cache: the call is taken as what the cache lacks
    if start >= past:
        return None
    cut = past - start
    if new.shape[1] <= cut + c:
        raise bad_input(name, f"{new.shape[1]} tokens from position {start} (with {c} candidates) on a cache that "
                        f"holds {past}", "the cached tokens followed by at least one new token")
    kwargs[name] = new[:, cut:]
    if pos is not None:
        kwargs["position_ids"] = pos[..., cut:]
    return args, kwargs


def _post_hook(module, args, kwargs, output):
    """Capture this layer's newest rows after its prefill (the first call that fills it), and after
    later calls when the configuration re-plans."""
    cache = _cache_of(kwargs)
    if cache is None:
        return None
    cos, sin = kwargs["position_embeddings"]
    cfg = cache.refreekv_config
    with torch.no_grad():
        if module.layer_idx not in cache.planned_layers:
            cache.defer(module, kwargs["hidden_states"], cos, sin, kwargs.get("attention_mask"))
        elif cfg.replan != "once" or cfg.replan_every > 0:
            cache.segment(module, kwargs["hidden_states"], cos, sin)
    return None


def _clear_hooked(module, args, kwargs, output):
    """After every call, also one that raised inside the layer (``always_call``): the layer's "this call
    came through the hooks" mark never outlives its call, so a later call outside the hooks is refused
    at the first layer, before any layer appends to the cache."""
    cache = _cache_of(kwargs)
    if cache is not None and module.layer_idx < len(cache.layers) and isinstance(cache.layers[module.layer_idx], ReFreeKVLayer):
        cache.layers[module.layer_idx].hooked = False
    if cache is not None and module.layer_idx == cache.last_layer:
        cache._candidates = 0  # set per call by the model's pre-hook: never read by a later call
    return None


#: attention modules whose ReFreeKV hooks are on (weak: a deleted model leaves nothing behind)
_HOOKED: weakref.WeakSet = weakref.WeakSet()


@contextmanager
def refreekv_hooks(model):
    """Switch ReFreeKV on for ``model`` inside the block: registers a forward pre-hook and a
    forward hook on every attention module and a forward pre-hook on ``model`` itself (which tells
    assisted decoding's candidates apart), and removes them on exit (also on error or
    KeyboardInterrupt). A nested block on the same model changes nothing: the outer one owns the
    hooks. Every call with a ``ReFreeKVCache`` must run inside such a block (else ``ReFreeKVError``)."""
    modules = attention_modules(model)
    if any(m in _HOOKED for m in modules):  # already on (nested blocks): the outer block owns the hooks
        yield model
        return
    handles = []
    try:
        _HOOKED.update(modules)
        handles.append(model.register_forward_pre_hook(_model_pre_hook, with_kwargs=True))
        for m in modules:
            handles.append(m.register_forward_pre_hook(_pre_hook, with_kwargs=True))
            handles.append(m.register_forward_hook(_post_hook, with_kwargs=True))
            handles.append(m.register_forward_hook(_clear_hooked, with_kwargs=True, always_call=True))
        yield model
    finally:
        for h in handles:
            h.remove()
        for m in modules:
            _HOOKED.discard(m)


def cache_kwarg(model) -> str:
    """``cache`` (transformers >= 5.2x) or ``past_key_values`` (earlier versions)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _check_ids(input_ids, attention_mask=None, model=None) -> None:
    """input_ids (B, n) integer with n >= 1 (ids below ``model``'s vocabulary size when given);
    attention_mask, if given, a tensor of the same shape."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] < 1 \
            or input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        got = (f"{type(input_ids).__name__} of shape {tuple(input_ids.shape)} and dtype {input_ids.dtype}"
               if isinstance(input_ids, torch.Tensor) else f"type {type(input_ids).__name__}")
        raise bad_input("input_ids", got, "a (B, n) LongTensor of token ids with n >= 1")
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor)
                                       or tuple(attention_mask.shape) != tuple(input_ids.shape)):
        raise bad_input("attention_mask", f"{type(attention_mask).__name__} of shape "
                        f"{tuple(getattr(attention_mask, 'shape', ()))}",
                        f"None or a tensor of input_ids' shape {tuple(input_ids.shape)}")
    embeddings = getattr(model, "get_input_embeddings", None)  # not a model: the model check names it later
    vocab = getattr(embeddings(), "num_embeddings", None) if callable(embeddings) else None
    if vocab is not None:
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= vocab:
            raise bad_input("input_ids", f"token ids from {lo} to {hi}", f"ids in [0, {vocab - 1}] (the model's vocabulary)")


def generate(model, config: ReFreeKVConfig | None = None, **generate_kwargs):
    """``model.generate`` with a fresh ReFreeKV cache. Returns (output ids, cache)."""
    for name in ("past_key_values", "cache"):
        if generate_kwargs.get(name) is not None:
            raise bad_input(name, f"a {type(generate_kwargs[name]).__name__}",
                            "nothing: generate() makes a fresh ReFreeKVCache (to continue one, call "
                            "continue_generate(model, cache, ...), or model.generate(..., past_key_values=cache) "
                            "inside refreekv_hooks(model))")
    _check_generate(model, generate_kwargs)
    cache = ReFreeKVCache(model, config)
    with refreekv_hooks(model):
        out = model.generate(**generate_kwargs, **{cache_kwarg(model): cache})
    return out, cache


def continue_generate(model, cache: "ReFreeKVCache", **generate_kwargs):
    """``model.generate`` on ``cache``, a ReFreeKVCache of ``model`` that is fresh or holds a conversation
    whose token ids ``input_ids`` starts with (``generate`` feeds only the ids the cache lacks, and the new
    segment is planned by ``config.replan``), inside ``refreekv_hooks``, with ``generate``'s checks.
    Returns the output ids; the cache then holds them all but the last."""
    if not isinstance(cache, ReFreeKVCache):
        raise bad_input("cache", f"type {type(cache).__name__}", "a ReFreeKVCache (made for this model)")
    for name in ("past_key_values", "cache"):
        if name in generate_kwargs:
            raise bad_input(name, f"a {type(generate_kwargs[name]).__name__}", "nothing: the cache is continue_generate's "
                            "second argument")
    _check_generate(model, generate_kwargs)
    held = cache.get_seq_length()
    ids = generate_kwargs.get("input_ids")
    if held and ids is not None and ids.shape[1] <= held:
        raise bad_input("input_ids", f"{ids.shape[1]} tokens on a cache holding {held}",
                        f"more than {held} tokens: the conversation the cache holds, then the new ones")
    with refreekv_hooks(model):
        return model.generate(**generate_kwargs, **{cache_kwarg(model): cache})


def _check_generate(model, generate_kwargs: dict) -> None:
    """What ``generate``/``continue_generate`` refuse in ``model.generate``'s arguments, by name."""
    if "input_ids" in generate_kwargs:
        _check_ids(generate_kwargs["input_ids"], generate_kwargs.get("attention_mask"), model)
    gen = generate_kwargs.get("generation_config") or getattr(model, "generation_config", None)
    use_cache = generate_kwargs.get("use_cache", getattr(gen, "use_cache", True))
    if use_cache is False:
        raise bad_input("use_cache", repr(use_cache), _USE_CACHE)
    chunk = generate_kwargs.get("prefill_chunk_size", getattr(gen, "prefill_chunk_size", None))
    if chunk is not None:
        raise bad_input("prefill_chunk_size", repr(chunk), "None: ReFreeKV plans once the whole prompt is "
                        "prefilled, and a chunked prefill would plan after its first chunk")
    impl = generate_kwargs.get("cache_implementation", getattr(gen, "cache_implementation", None))
    if impl is not None:
        name = "cache_implementation" if "cache_implementation" in generate_kwargs else "generation_config.cache_implementation"
        raise bad_input(name, repr(impl), "None: generate() passes a ReFreeKVCache (a DynamicCache), which transformers "
                        "does not combine with a cache_implementation (static, offloaded, quantized, ...)")


# -- prefill once, compress many ways ------------------------------------------------------------

@dataclass
class Prefill:
    """A plain full-cache prefill with each full-attention layer's newest input rows captured.

    ``cache`` is the full ``DynamicCache``; ``logits`` (B, V) the last position's; ``captured``
    one ``Captured`` per attention layer; ``start`` per-sample left padding; ``lengths`` the real
    prompt length per sample; ``rows`` how many rows were captured per layer.
    """

    model: torch.nn.Module
    cache: DynamicCache
    logits: torch.Tensor
    captured: list[Captured]
    start: list[int]
    lengths: torch.Tensor
    rows: int
    #: plans already made from this prefill, by ranking settings: reused by ``from_prefill``
    plans: dict = field(default_factory=dict)


@torch.no_grad()
def capture_prefill(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                    configs: ReFreeKVConfig | list[ReFreeKVConfig] | None = None, rows: int | None = None) -> Prefill:
    """Prefill ``input_ids`` (B, n) with a plain cache, keeping what ``ReFreeKVCache.from_prefill``
    needs for every configuration in ``configs`` (or the newest ``rows`` rows per layer)."""
    _check_ids(input_ids, attention_mask, model)
    if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 1):
        raise bad_input("rows", repr(rows), "None (what configs need) or an int >= 1")
    cfgs = [_check_model(model, None)] if configs is None else \
        [_check_model(model, c) for c in ([configs] if isinstance(configs, ReFreeKVConfig) else configs)]
    n = input_ids.shape[1]
    R = rows if rows is not None else engine.capture_rows(cfgs, n)
    R = min(n, int(R))
    captured, masks = [], []

    def grab(module, args, kwargs, output):
        t0 = time.perf_counter()
        cos, sin = kwargs["position_embeddings"]
        hidden = kwargs["hidden_states"]
        captured.append(Captured(module, hidden[:, -R:].clone(), cos[:, -R:].clone(), sin[:, -R:].clone()))
        captured[-1].seconds = time.perf_counter() - t0
        masks.append(kwargs.get("attention_mask"))

    cache = DynamicCache(config=model.config)
    handles = [m.register_forward_hook(grab, with_kwargs=True) for m in attention_modules(model)]
    try:
        kwargs = {cache_kwarg(model): cache}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        logits = model(input_ids=input_ids, **kwargs).logits[:, -1]
    finally:
        for h in handles:
            h.remove()
    B = input_ids.shape[0]
    full = [m for cap, m in zip(captured, masks) if not getattr(cache.layers[cap.module.layer_idx], "is_sliding", False)]
    start = _left_padding(full[0], n, B) if attention_mask is not None and full else [0] * B
    lengths = n - torch.tensor(start)
    return Prefill(model, cache, logits, captured, start, lengths, R)


# -- save and load ------------------------------------------------------------------------------
#: The file layout ``save_cache`` writes (safetensors arrays plus one JSON header).
FORMAT = "refreekv-transformers-cache/1"
#: What a cache carries between calls, besides its layers (``_pending``, ``_mask_start`` and
#: ``_candidates`` belong to one call and must be empty then).
_CACHE_FIELDS = ("_turn", "_segments", "_since_plan", "_start")


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def _fingerprint(model) -> dict:
    """What identifies the model a cache belongs to: its type, layer count, key-projection shape and
    dtype, and digests of two rows of key-projection weights (the first layer's first, the last
    layer's last: cheap at every cache, and another checkpoint of the same shapes differs there)."""
    mods = attention_modules(model)
    cfg = _text_config(model)
    w0, w1 = mods[0].k_proj.weight, mods[-1].k_proj.weight
    return {"model_type": str(getattr(cfg, "model_type", "")), "layers": len(mods), "k_proj": list(w0.shape),
            "dtype": str(w0.dtype).removeprefix("torch."),
            "weights": _digest(torch.cat([w0[0].detach().cpu(), w1[-1].detach().cpu()]))[:16]}


def _encode_layer(i: int, layer, arrays: dict) -> dict:
    """A layer's ``__dict__``: tensors go to ``arrays`` under ``i.<name>``, the rest to JSON."""
    entry = {"class": type(layer).__name__, "attrs": {}}
    for name, value in layer.__dict__.items():
        if isinstance(value, torch.Tensor):
            arrays[f"{i}.{name}"] = value.detach().cpu().contiguous()
            entry["attrs"][name] = {"tensor": f"{i}.{name}"}
        elif isinstance(value, (torch.dtype, torch.device)):
            entry["attrs"][name] = {type(value).__name__: str(value)}
        elif value is None or isinstance(value, (bool, int, float, str)):
            entry["attrs"][name] = {"value": value}
        else:
            raise bad_input("cache", f"layer {i} with a {type(value).__name__} in {name!r}",
                            "layers of tensors, numbers and strings (a ReFreeKVCache's own layers, or transformers' "
                            "dynamic ones)")
    return entry


def save_cache(file_name, cache: ReFreeKVCache, metadata: dict | None = None) -> None:
    """Save a ``ReFreeKVCache`` between calls (a chat between turns, a compressed context to reuse) to
    one safetensors file, no pickle: every layer's tensors, and a JSON header with the configuration,
    every plan's report, each layer's bookkeeping, the model's fingerprint and the SHA-256 of every
    tensor. ``load_cache`` checks all of it before it builds anything. ``metadata``: str to str."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    if not isinstance(cache, ReFreeKVCache):
        raise bad_input("cache", f"type {type(cache).__name__}", "a refreekv.adapters.transformers.ReFreeKVCache")
    if metadata is not None and not (isinstance(metadata, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise bad_input("metadata", repr(metadata), "None or a dict of str to str")
    if cache._pending or cache._candidates or cache._mask_start is not None or cache._skips:
        raise bad_input("cache", "a cache in the middle of a call (its last forward pass did not finish)",
                        "a cache between calls: after a generate, or reset()")
    lengths = {i: layer.get_seq_length() for i, layer in enumerate(cache.layers) if isinstance(layer, ReFreeKVLayer)}
    if len(set(lengths.values())) > 1:
        raise bad_input("cache", f"layers of different lengths {sorted(set(lengths.values()))} (a call failed part-way)",
                        "a cache whose every layer holds the same positions")
    if not getattr(cache, "fingerprint", None):
        raise bad_input("cache", "a cache without its model's fingerprint", "a ReFreeKVCache made with "
                        "ReFreeKVCache(model, ...) or load_cache")
    arrays: dict[str, torch.Tensor] = {}
    layers = [_encode_layer(i, layer, arrays) for i, layer in enumerate(cache.layers)]
    generated = {}
    for idx, rows in cache._generated.items():  # replan_every: generated tokens' rows not planned yet
        for part, j in (("hidden", 1), ("cos", 2), ("sin", 3)):
            arrays[f"generated.{idx}.{part}"] = torch.cat([r[j] for r in rows], dim=1).detach().cpu().contiguous()
        generated[str(idx)] = len(rows)
    header = {"format": FORMAT, "config": cache.refreekv_config.to_dict(), "model": cache.fingerprint,
              "state": {k: getattr(cache, k) for k in _CACHE_FIELDS}, "planned_layers": sorted(cache.planned_layers),
              "plans": [[dataclasses.asdict(r) for r in p.layers] for p in cache.history.plans],
              "layers": layers, "generated": generated, "metadata": metadata or {},
              "digests": {k: _digest(v) for k, v in arrays.items()}}
    try:
        save_file(arrays, str(file_name), metadata={"refreekv": json.dumps(header)})
    except (OSError, RuntimeError, ValueError, SafetensorError) as err:
        raise bad_input("file_name", f"{file_name!r}: unwritable ({type(err).__name__}: {err})",
                        "a path in an existing, writable folder") from err


def load_cache(file_name, model, return_metadata: bool = False):
    """Load a cache saved by ``save_cache`` for ``model`` (the model it was saved from: same
    architecture, shapes and weights, else ``ReFreeKVError``). The whole file is checked first: a
    missing, truncated or tampered file raises ``ReFreeKVError`` and nothing is built. Each layer's
    tensors go to that layer's device and dtype; continue with ``model.generate(..., cache=cache)``
    inside ``refreekv_hooks(model)``, as with the cache that was saved."""
    from safetensors import safe_open

    def corrupt(what: str) -> Exception:
        return bad_input("file_name", f"{file_name!r}: {what}", "a cache written by refreekv.adapters.transformers."
                         "save_cache, intact (nothing was loaded)")

    try:
        with safe_open(str(file_name), framework="pt") as f:
            meta = f.metadata() or {}
            arrays = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types and OSError
        raise corrupt(f"unreadable ({type(err).__name__}: {err})") from err
    try:
        header = json.loads(meta["refreekv"])
        if header.get("format") != FORMAT:
            raise ValueError(f"format {header.get('format')!r}")
        if set(header["digests"]) != set(arrays):
            raise ValueError("the tensors are not the ones listed")
        for k, d in header["digests"].items():
            if _digest(arrays[k]) != d:
                raise ValueError(f"tensor {k} does not match its checksum")
        config = ReFreeKVConfig.from_dict(header["config"])
    except (KeyError, TypeError, ValueError, json.JSONDecodeError, refreekv.ReFreeKVError) as err:
        raise corrupt(f"{type(err).__name__}: {err}") from err
    mine = _fingerprint(model)
    if header["model"] != mine:
        diff = ", ".join(f"{k} {header['model'].get(k)!r} (this model: {mine[k]!r})" for k in mine
                         if header["model"].get(k) != mine[k])
        raise bad_input("model", f"a model other than the one the cache was saved from: {diff}",
                        "the model (architecture, layers and weights) the cache was saved from")
    cache = ReFreeKVCache(model, config)
    try:
        _fill(cache, header, arrays, model)
    except (KeyError, TypeError, ValueError) as err:
        raise corrupt(f"{type(err).__name__}: {err}") from err
    return (cache, header["metadata"]) if return_metadata else cache


def _check_tail(i: int, layer) -> None:
    """A loaded layer's tail fits together: all of it or none, codes of ``tail_bits`` bits, one scale and bias
    per group, T slots everywhere, at most the positions the layer evicted (ValueError otherwise)."""
    parts = [getattr(layer, n) for n in (*TAIL_FIELDS, "tail_valid")]
    if all(p is None for p in parts) and layer.tail_bits == 0:
        return
    if any(p is None for p in parts) or layer.tail_bits not in refreekv.rules.TAIL_BITS or not layer.compressed:
        raise ValueError(f"layer {i}: a partial tail ({layer.tail_bits} bits)")
    B, T = layer.tail_valid.shape
    d = layer.keys.shape[-1]
    for p in ("k", "v"):
        codes, scales, biases = (getattr(layer, f"tail_{p}{x}") for x in ("", "_scales", "_biases"))
        groups = scales.shape[-1]
        ok = (codes.dtype == torch.uint8 and codes.shape == (B, layer.keys.shape[1], T, d * layer.tail_bits // 8)
              and groups >= 1 and d % groups == 0 and scales.shape == biases.shape == (*codes.shape[:-1], groups)
              and scales.dtype == biases.dtype and scales.dtype in (torch.float32, torch.float64))
        if not ok:
            raise ValueError(f"layer {i}: tail {p} codes {tuple(codes.shape)} {codes.dtype}, scales {tuple(scales.shape)} "
                             f"do not fit {T} slots of d = {d} at {layer.tail_bits} bits")
    if layer.tail_valid.dtype != torch.bool or int(layer.tail_valid.sum(1).max()) > layer.evicted:
        raise ValueError(f"layer {i}: a tail of more positions than the {layer.evicted} evicted")


def _fill(cache: ReFreeKVCache, header: dict, arrays: dict, model) -> None:
    """Rebuild a fresh ``cache`` from a checked file's header and tensors (ValueError on anything
    that does not fit the model)."""
    mods = {m.layer_idx: m for m in attention_modules(model)}
    if len(header["layers"]) != len(cache.layers):
        raise ValueError(f"{len(header['layers'])} layers saved, the model's cache has {len(cache.layers)}")
    for i, (entry, layer) in enumerate(zip(header["layers"], cache.layers)):
        if entry["class"] != type(layer).__name__:
            raise ValueError(f"layer {i} is a {entry['class']}, the model's is a {type(layer).__name__}")
        weight = mods[i].k_proj.weight if i in mods else None
        keys, values = (entry["attrs"].get(k, {}).get("tensor") for k in ("keys", "values"))
        if keys is not None and values is not None:  # transformers' own first-use setup (device, dtype, ...)
            dev = weight.device if weight is not None else torch.device("cpu")
            layer.lazy_initialization(arrays[keys].to(dev), arrays[values].to(dev))
        for name, leaf in entry["attrs"].items():
            if name not in layer.__dict__:
                raise ValueError(f"layer {i} has no attribute {name!r}")
            if "tensor" in leaf:
                t = arrays[leaf["tensor"]]
                if t.is_floating_point() and weight is not None and name not in TAIL_FIELDS:
                    if t.dtype != weight.dtype:
                        raise ValueError(f"layer {i}'s {name} is {t.dtype}, the model's weights {weight.dtype}")
                value = t.to(weight.device) if weight is not None else t
            elif "dtype" in leaf:
                value = getattr(torch, leaf["dtype"].removeprefix("torch."))
                if not isinstance(value, torch.dtype):
                    raise ValueError(f"layer {i}: not a dtype {leaf['dtype']!r}")
            elif "device" in leaf:
                value = weight.device if weight is not None else torch.device(leaf["device"])
            else:
                value = leaf["value"]
            old = layer.__dict__[name]
            if old is not None and value is not None and not isinstance(value, type(old)) and not (
                    isinstance(old, float) and isinstance(value, int)):
                raise ValueError(f"layer {i}'s {name} is a {type(value).__name__}, expected a {type(old).__name__}")
            setattr(layer, name, value)
        if isinstance(layer, ReFreeKVLayer):
            layer.hooked = False
            if layer.keys is not None and layer.keys.dim() == 4:
                J = layer.kept_slots
                if layer.keys.shape != layer.values.shape or J > layer.keys.shape[-2] or (
                        layer.compressed and tuple(layer.slot_valid.shape) != (layer.keys.shape[0], J)):
                    raise ValueError(f"layer {i}'s keys {tuple(layer.keys.shape)}, values {tuple(layer.values.shape)} "
                                     f"and {J} kept slots do not fit together")
                if layer.evicted != (layer.compressed_at - J if layer.compressed else 0):
                    raise ValueError(f"layer {i}: {layer.evicted} evicted does not fit {J} slots kept of "
                                     f"{layer.compressed_at}")
            _check_tail(i, layer)
    for k in _CACHE_FIELDS:
        setattr(cache, k, header["state"][k])
    if not all(isinstance(header["state"][k], int) and header["state"][k] >= 0 for k in _CACHE_FIELDS[:3]):
        raise ValueError(f"cache state {header['state']!r}: not counts")
    cache.planned_layers = {int(i) for i in header["planned_layers"]}
    cache.history = engine.History([BudgetReport([LayerReport(**r) for r in p]) for p in header["plans"]])
    for idx, count in header["generated"].items():
        module = mods[int(idx)]
        dev = module.k_proj.weight.device
        h, c, s = (arrays[f"generated.{idx}.{p}"].to(dev) for p in ("hidden", "cos", "sin"))
        if not h.shape[1] == c.shape[1] == s.shape[1] == count:
            raise ValueError(f"layer {idx}: {count} generated rows listed, {h.shape[1]} saved")
        cache._generated[int(idx)] = [(module, h[:, j:j + 1], c[:, j:j + 1], s[:, j:j + 1]) for j in range(count)]
