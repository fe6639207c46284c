"""ReFreeKV for Hugging Face transformers (5.x) ``generate``.

Usage::

    from refreekv.adapters.transformers import ReFreeKVCache, refreekv_hooks

    cache = ReFreeKVCache(model, ReFreeKVConfig())      # checked against the model here
    with refreekv_hooks(model):                           # forward hooks on, removed on exit
        out = model.generate(**inputs, cache=cache, max_new_tokens=64)
    print(cache.report)                                   # per-layer kept tokens and bytes

What happens: when a full-attention layer has run on the prompt (prefill), a forward hook keeps
that layer's last input rows; once the last layer has run, the hook recomputes each layer's last
prompt queries exactly as the model does (q_proj, optional q_norm, RoPE), runs ReFreeKV on the
keys the cache holds, and keeps K/V at the kept positions only, at ``Hkv`` heads. Prefill itself
is untouched, so SDPA works as usual.

After eviction every layer holds a different number of tokens while transformers builds one
attention mask for all layers. Each compressed layer therefore reports its *uncompressed*
length (so positions, RoPE and the shared mask keep counting from ``n``), and a forward
pre-hook hands that layer a mask of its own: its kept slots (per sample) plus the decoded
tokens, cut from the shared mask's columns past the prompt.

Nothing is patched at import; the hooks act only on calls whose cache is a ``ReFreeKVCache``.
"""

from __future__ import annotations

import inspect
import sys
import time
from contextlib import contextmanager

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

import refreekv
from refreekv.config import ReFreeKVConfig
from refreekv.errors import bad_input
from refreekv.report import BudgetReport, LayerReport

SUPPORTED_ATTENTION = ("sdpa", "eager")


def attention_modules(model) -> list[torch.nn.Module]:
    """The self-attention modules, in layer order (they carry ``layer_idx`` and ``q_proj``)."""
    mods = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "q_proj")]
    return sorted(mods, key=lambda m: m.layer_idx)


def _text_config(model):
    return model.config.get_text_config(decoder=True)


class ReFreeKVLayer(DynamicLayer):
    """A full-attention cache layer that can be compressed once, after prefill.

    Stores ``(B, Hkv, J + D, d)``: J kept prompt slots (padded to the batch's largest cut;
    ``slot_valid`` (B, J) marks the real ones) then D decoded tokens. ``get_seq_length``
    returns the uncompressed length ``n + D`` so that positions never drift.
    """

    def __init__(self):
        super().__init__()
        self.evicted = 0              # n - J: slots removed from the prompt
        self.prompt_length = 0        # n
        self.kept_slots = 0           # J
        self.slot_valid: torch.Tensor | None = None
        self.all_slots_valid = True   # read once at compression: no host sync while decoding

    @property
    def compressed(self) -> bool:
        return self.slot_valid is not None

    def get_seq_length(self) -> int:
        return super().get_seq_length() + self.evicted

    def crop(self, tokens_to_remove: int) -> None:
        if self.compressed:
            raise bad_input("crop", tokens_to_remove, "no crop of a compressed ReFreeKV layer "
                            "(assisted decoding and rollback are not supported)")
        super().crop(tokens_to_remove)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.compressed:
            self.slot_valid = self.slot_valid.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.compressed:
            self.slot_valid = self.slot_valid[indices]

    def store_compressed(self, keys, values, valid, prompt_length: int) -> None:
        self.keys, self.values = keys, values
        self.prompt_length, self.kept_slots = prompt_length, keys.shape[-2]
        self.evicted = prompt_length - self.kept_slots
        self.slot_valid = valid
        self.all_slots_valid = bool(valid.all())

    def layer_mask(self, shared: torch.Tensor | None, q_len: int, dtype: torch.dtype, additive: bool):
        """This layer's mask (B, 1, q, J + D) for a call adding ``q_len`` tokens.

        Kept slots: visible where valid. Decoded tokens: the shared mask's columns past the
        prompt (they carry causality and any user padding), or plain causality without one.
        """
        B, J = self.slot_valid.shape
        D = self.keys.shape[-2] - J + q_len  # decoded tokens after this call's update
        kept = self.slot_valid[:, None, None, :].expand(B, 1, q_len, J)
        if shared is None:
            t = torch.arange(q_len, device=kept.device)[:, None]
            u = torch.arange(D, device=kept.device)[None, :]
            new = (u <= (D - q_len) + t)[None, None].expand(B, 1, q_len, D)
            mask = torch.cat([kept, new], dim=-1)
            if not additive:
                return mask
            return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
        new = shared[..., self.prompt_length:self.prompt_length + D].expand(B, 1, q_len, D)
        if shared.dtype == torch.bool:
            return torch.cat([kept, new], dim=-1)
        kept_add = torch.zeros(kept.shape, dtype=shared.dtype, device=shared.device)
        return torch.cat([kept_add.masked_fill(~kept, torch.finfo(shared.dtype).min), new], dim=-1)


class ReFreeKVCache(DynamicCache):
    """A ``DynamicCache`` whose full-attention layers ReFreeKV compresses right after prefill.

    Sliding-window layers (Gemma-3) are left alone. ``report`` (a ``BudgetReport``) is filled
    once the prompt has been prefilled. Copy with ``copy.deepcopy`` to answer several questions
    from one compressed context.
    """

    def __init__(self, model, config: ReFreeKVConfig | None = None):
        cfg = config if config is not None else ReFreeKVConfig()
        if not isinstance(cfg, ReFreeKVConfig):
            raise bad_input("config", f"type {type(cfg).__name__}", "a refreekv.ReFreeKVConfig")
        text = _text_config(model)
        cfg.check_layers(text.num_hidden_layers)
        impl = getattr(model.config, "_attn_implementation", None)
        if impl not in SUPPORTED_ATTENTION:
            raise bad_input("model", f"attn_implementation {impl!r}",
                            f"one of {SUPPORTED_ATTENTION} (each compressed layer needs its own mask)")
        max_pos = getattr(text, "max_position_embeddings", None)
        if max_pos is not None and cfg.sinks >= max_pos:
            raise bad_input("sinks", cfg.sinks, f"fewer sinks than the model's context ({max_pos})")
        if not attention_modules(model):
            raise bad_input("model", type(model).__name__, "a causal LM whose attention modules have q_proj")
        super().__init__(config=model.config)
        self.layers = [ReFreeKVLayer() if type(layer) is DynamicLayer else layer for layer in self.layers]
        self.refreekv_config = cfg
        self.additive_mask = impl == "eager"
        self.report = BudgetReport()
        self.planned_layers: set[int] = set()  # layers seen at prefill (ReFreeKV runs once each)
        self.last_layer = attention_modules(model)[-1].layer_idx
        # Layers prefilled but not compressed yet: (module, queries' inputs, start, seconds spent).
        self._pending: list[tuple] = []
        self._mask_start: tuple[torch.Tensor | None, list[int]] | None = None

    # -- called by the hooks ------------------------------------------------------------------
    def defer(self, module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              mask: torch.Tensor | None) -> None:
        """Keep what layer ``module.layer_idx`` needs for ReFreeKV (its last prompt rows and the
        padding) and, once the last layer has been prefilled, compress every layer together.

        Why wait: ``compress_layers`` then plans all layers with one sequence of small array
        operations and one host read, instead of one per layer run between two layers of the
        model (where, on a CPU, they also found the caches cold). The full cache exists until
        the end of prefill either way: every layer's K/V is there once the last layer has run.
        """
        t0 = time.perf_counter()
        idx = module.layer_idx
        self.planned_layers.add(idx)
        layer = self.layers[idx]
        if isinstance(layer, ReFreeKVLayer):
            B, _, n, _ = layer.keys.shape
            if self._mask_start is None or self._mask_start[0] is not mask:  # layers share one mask
                self._mask_start = (mask, _left_padding(mask, n, B))
            # A retained layer needs no queries: the last row is enough for compress_layers' report.
            rows = 1 if self.refreekv_config.is_retained(idx) else self.refreekv_config.rows_needed(n)
            saved = (hidden[:, -rows:].clone(), cos[:, -rows:].clone(), sin[:, -rows:].clone())
            self._pending.append((module, saved, self._mask_start[1], time.perf_counter() - t0))
        else:
            self._record_skip(idx, layer, "sliding-window layer (left alone)")
        if idx == self.last_layer:
            self._mask_start = None
            pending, self._pending = self._pending, []
            self.compress(pending)

    def compress(self, pending: list[tuple]) -> None:
        """ReFreeKV on the prefilled layers in ``pending``, planned together (per group of equal
        shapes; one group in the usual model). Each layer's report time is its share of the
        planning, plus its eviction, its query recompute and its capture in the hook."""
        t0 = time.perf_counter()
        qs = {module.layer_idx: _queries(module, *saved) for module, saved, _, _ in pending}
        q_s = (time.perf_counter() - t0) / max(1, len(pending))  # each layer's share of the recompute
        groups: dict[tuple, list[tuple]] = {}
        for item in pending:
            module, _, start, _ = item
            K, q = self.layers[module.layer_idx].keys, qs[module.layer_idx]
            groups.setdefault((tuple(K.shape), K.dtype, tuple(q.shape), tuple(start)), []).append(item)
        for items in groups.values():
            first = items[0][0].layer_idx
            size = _joint_layers(self.layers[first].keys, qs[first]) or len(items)
            for chunk in (items[i:i + size] for i in range(0, len(items), size)):
                layers = [self.layers[m.layer_idx] for m, _, _, _ in chunk]
                outs = refreekv.compress_layers(
                    [qs[m.layer_idx] for m, _, _, _ in chunk], [lay.keys for lay in layers],
                    [lay.values for lay in layers], self.refreekv_config,
                    layers=[m.layer_idx for m, _, _, _ in chunk], start=chunk[0][2],
                    scale=[m.scaling for m, _, _, _ in chunk])
                for (_, _, _, spent), layer, out in zip(chunk, layers, outs):
                    if out.valid is not None:
                        layer.store_compressed(out.keys, out.values, out.valid, layer.keys.shape[-2])
                    out.report.seconds += spent + q_s
                    self.report.layers.append(out.report)
        self.report.layers.sort(key=lambda r: r.layer)  # sliding-window layers were reported first

    def _record_skip(self, idx: int, layer, reason: str) -> None:
        k = layer.keys
        size = k.numel() * k.element_size() * 2
        n = [int(k.shape[-2])] * k.shape[0]
        self.report.layers.append(LayerReport(idx, False, reason, n, n, size, size, 0.0))


#: On a CPU, plan at most this many bytes of stacked scores together (scripts/joint_planning_sweep.py,
#: Llama3-8B shapes, 2 cores): at 32k tokens groups of 4-8 MiB were the fastest and larger ones slower
#: (memory-bound once they leave the caches); at 4k, groups of 16-32 layers (8-16 MiB) were 1.5x faster
#: than one by one. Small models and short prompts fit every layer in one group. A GPU has the bandwidth
#: and is bound by launches: no cap there.
CPU_JOINT_BYTES = 8 << 20


def _joint_layers(keys: torch.Tensor, q: torch.Tensor) -> int | None:
    """How many layers to plan together (their float32 scores are (B, H, n) each), or None for all."""
    if keys.device.type != "cpu":
        return None
    B, H = q.shape[:2]
    return max(1, CPU_JOINT_BYTES // (B * H * keys.shape[-2] * 4))


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


def _pre_hook(module, args, kwargs):
    """Give a compressed layer a mask of its own for this decode call."""
    cache = _cache_of(kwargs)
    if cache is None or module.layer_idx >= len(cache.layers):
        return None
    layer = cache.layers[module.layer_idx]
    if not isinstance(layer, ReFreeKVLayer) or not layer.compressed:
        return None
    hidden = kwargs["hidden_states"]
    shared = kwargs.get("attention_mask")
    if shared is None and hidden.shape[1] == 1 and layer.all_slots_valid:
        return None  # one new token, every kept slot real: no mask needed at all
    kwargs["attention_mask"] = layer.layer_mask(shared, hidden.shape[1], hidden.dtype, cache.additive_mask)
    return args, kwargs


def _post_hook(module, args, kwargs, output):
    """Compress this layer right after its prefill (the first call that fills it)."""
    cache = _cache_of(kwargs)
    if cache is None:
        return None
    if module.layer_idx in cache.planned_layers:
        return None
    cos, sin = kwargs["position_embeddings"]
    with torch.no_grad():
        cache.defer(module, kwargs["hidden_states"], cos, sin, kwargs.get("attention_mask"))
    return None


@contextmanager
def refreekv_hooks(model):
    """Switch ReFreeKV on for ``model`` inside the block: registers a forward pre-hook and a
    forward hook on every attention module, and removes them on exit (also on error)."""
    handles = []
    try:
        for m in attention_modules(model):
            handles.append(m.register_forward_pre_hook(_pre_hook, with_kwargs=True))
            handles.append(m.register_forward_hook(_post_hook, with_kwargs=True))
        yield model
    finally:
        for h in handles:
            h.remove()


def cache_kwarg(model) -> str:
    """``cache`` (transformers >= 5.2x) or ``past_key_values`` (earlier 5.x)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def generate(model, config: ReFreeKVConfig | None = None, **generate_kwargs):
    """``model.generate`` with a fresh ReFreeKV cache. Returns (output ids, cache)."""
    cache = ReFreeKVCache(model, config)
    with refreekv_hooks(model):
        out = model.generate(**generate_kwargs, **{cache_kwarg(model): cache})
    return out, cache
