"""ReFreeKV for mlx-lm: a prompt cache that compresses itself once the prompt is prefilled.

Usage::

    import mlx_lm
    from refreekv.adapters.mlx_lm import make_prompt_cache, budget_report

    model, tokenizer = mlx_lm.load(path)
    cache = make_prompt_cache(model, ReFreeKVConfig())   # also attaches the query probes
    text = mlx_lm.generate(model, tokenizer, prompt, prompt_cache=cache, max_tokens=64)
    print(budget_report(cache))

mlx-lm's attention never shows queries to the cache, so ``attach(model)`` wraps each attention
module's ``rope`` with a small probe that remembers the post-RoPE queries it rotates (models call
``rope(queries)`` then ``rope(keys)`` right before ``cache.update_and_fetch``). ``detach(model)``
puts the original ``rope`` back. Nothing is patched at import.

When compression happens: ``mlx_lm.generate`` prefills the prompt in chunks and sends the last
prompt token together with the first decode step, as a one-token call. The first one-token call
is therefore where the cache knows the whole prompt: it appends that token, decides the budget on
the whole prompt (queries of all chunks are buffered as needed), returns the FULL keys and
values for that call's attention, and stores only the kept ones. ``offset`` always counts every
token seen, so RoPE positions stay true. After a manual prefill (one ``model(prompt, cache)``
call), call ``compress_prompt_cache(cache)``.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import asdict

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import cache as mlx_cache

import refreekv
from refreekv.config import ReFreeKVConfig
from refreekv.errors import bad_input
from refreekv.report import BudgetReport, LayerReport

STEP = 256  # grow storage like mlx-lm's KVCache: in steps, not one concatenation per token


class QueryProbe(nn.Module):
    """Wraps an attention module's ``rope`` and keeps its last two outputs (queries, then keys)."""

    def __init__(self, rope, scale: float):
        super().__init__()
        self.inner = rope
        self.scale = scale
        self._recent: deque = deque(maxlen=2)

    def __call__(self, x, *args, **kwargs):
        out = self.inner(x, *args, **kwargs)
        self._recent.append(out)
        return out

    def take_queries(self, keys: mx.array) -> mx.array | None:
        """The queries rotated in this call (the first of the last two rope outputs)."""
        if len(self._recent) < 2:
            return None
        q, k = self._recent[0], self._recent[1]
        self._recent.clear()
        if k.shape != keys.shape or q.shape[2] != keys.shape[2] or q.shape[1] % keys.shape[1]:
            return None
        return q


def _attention_modules(model) -> list:
    layers = getattr(model, "layers", None) or model.model.layers
    mods = []
    for layer in layers:
        attn = getattr(layer, "self_attn", None) or getattr(layer, "attention", None)
        if attn is None or not hasattr(attn, "rope"):
            raise bad_input("model", type(model).__name__,
                            "an mlx-lm model whose attention modules rotate queries with self.rope")
        mods.append(attn)
    return mods


def attach(model) -> list[QueryProbe]:
    """Wrap every attention module's rope with a QueryProbe (idempotent). Returns the probes."""
    probes = []
    for attn in _attention_modules(model):
        if not isinstance(attn.rope, QueryProbe):
            attn.rope = QueryProbe(attn.rope, float(attn.scale))
        probes.append(attn.rope)
    return probes


def detach(model) -> None:
    """Put the original rope modules back."""
    for attn in _attention_modules(model):
        if isinstance(attn.rope, QueryProbe):
            attn.rope = attn.rope.inner


class ReFreeKVCache(mlx_cache._BaseCache):
    """One full-attention layer's cache (batch size 1), compressed once after the prompt."""

    def __init__(self, config: ReFreeKVConfig | None = None, layer: int = 0, probe: QueryProbe | None = None):
        self.config = config if config is not None else ReFreeKVConfig()
        self.layer = layer
        self.probe = probe
        self.keys = self.values = None
        self.offset = 0            # every token seen: the RoPE position of the next one
        self.stored = 0            # slots in use in keys/values
        self.prompt_length = 0     # n, once compressed
        self.report: LayerReport | None = None
        self._rows: list[mx.array] = []  # buffered query rows until the prompt is complete

    # -- the protocol -------------------------------------------------------------------------
    def update_and_fetch(self, keys: mx.array, values: mx.array):
        if keys.shape[0] != 1:
            raise bad_input("keys", f"batch {keys.shape[0]}", "batch size 1 (the MLX ReFreeKV cache "
                            "does not batch; use one prompt cache per prompt)")
        L = keys.shape[2]
        if self.report is None:
            q = self.probe.take_queries(keys) if self.probe is not None else None
            if q is None:
                raise bad_input("model", "no captured queries", "a model prepared with "
                                "refreekv.adapters.mlx_lm.attach(model) (make_prompt_cache does it)")
            self._buffer_rows(q)
        self._append(keys, values)
        if self.report is None and L == 1:
            # The last prompt token: this call attends to everything; only storage shrinks.
            full = self.keys[..., :self.stored, :], self.values[..., :self.stored, :]
            self.compress()
            return full
        return self.keys[..., :self.stored, :], self.values[..., :self.stored, :]

    def make_mask(self, N: int, window_size=None, return_array: bool = False):
        # Kept slots are all real (batch 1), so a causal mask over stored + N keys is right.
        return mlx_cache.create_attention_mask(N, self.stored, return_array, window_size)

    @property
    def state(self):
        meta = json.dumps({"offset": self.offset, "stored": self.stored, "layer": self.layer,
                           "prompt_length": self.prompt_length, "config": _config_dict(self.config),
                           "report": None if self.report is None else asdict(self.report)})
        if self.keys is None:
            return None, None, meta
        return self.keys[..., :self.stored, :], self.values[..., :self.stored, :], meta

    @state.setter
    def state(self, v):
        keys, values, meta = v
        m = json.loads(meta)
        self.keys, self.values = keys, values
        self.offset, self.stored, self.layer = m["offset"], m["stored"], m["layer"]
        self.prompt_length = m["prompt_length"]
        self.config = ReFreeKVConfig(**{**m["config"], "retained_layers": tuple(m["config"]["retained_layers"])})
        self.report = None if m["report"] is None else LayerReport(**m["report"])
        self.probe, self._rows = None, []

    @property
    def meta_state(self):
        return ""

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        """Exact: removes the last n tokens. Refused (ReFreeKVError) if that would reach into a
        compressed prompt, whose kept set was decided for the whole prompt."""
        n = min(self.stored, n)
        decoded = self.stored - (self.report.kept[0] if self.report and self.report.compressed else 0)
        if self.report is not None and self.report.compressed and n > decoded:
            raise bad_input("trim", n, f"at most {decoded} tokens (those decoded after the compressed prompt)")
        self.stored -= n
        self.offset -= n
        if self.report is None and self._rows:
            rows = mx.concatenate(self._rows, axis=2)
            self._rows = [rows[:, :, :max(0, rows.shape[2] - n)]]  # compress() refuses if too few remain
        return n

    def size(self) -> int:
        return self.stored

    def empty(self) -> bool:
        return self.keys is None

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    @classmethod
    def merge(cls, caches):
        raise bad_input("prompt_cache", "a request to batch ReFreeKV caches",
                        "one prompt at a time (batched generation is not supported by this cache)")

    def to_quantized(self, group_size: int = 64, bits: int = 4):
        raise bad_input("kv_bits", bits, "None (quantizing a ReFreeKV cache is not supported)")

    # -- ReFreeKV -----------------------------------------------------------------------------
    def compress(self) -> LayerReport:
        """Run ReFreeKV on what is stored, using the buffered query rows. Once."""
        if self.report is not None:
            return self.report
        n = self.stored
        keys, values = self.keys[..., :n, :], self.values[..., :n, :]
        rows = self.config.rows_needed(n)
        q = mx.concatenate(self._rows, axis=2)[:, :, -rows:]
        if q.shape[2] < rows:
            raise bad_input("query rows", q.shape[2], f"{rows} captured rows (call attach(model) before prefill)")
        # MLX is lazy: finish the prefill's own work first, so the report times ReFreeKV alone.
        mx.eval(q, keys, values)
        out = refreekv.compress_layer(q.astype(mx.float32), keys, values, self.config, layer=self.layer,
                                      scale=self.probe.scale if self.probe is not None else None)
        self.prompt_length, self.report, self._rows = n, out.report, []
        if out.valid is not None:
            mx.eval(out.keys, out.values)
            self.keys, self.values, self.stored = out.keys, out.values, out.keys.shape[2]
        return self.report

    def _buffer_rows(self, q: mx.array) -> None:
        self._rows.append(q)
        cfg = self.config
        fixed = cfg.ranking != "h2o" and isinstance(cfg.query_rows, int)
        if fixed:  # only the last max(k, window) rows can matter: drop older chunks' rows
            keep = max(cfg.query_rows, cfg.window if cfg.ranking == "snapkv" else 1)
            q_all = mx.concatenate(self._rows, axis=2) if len(self._rows) > 1 else q
            self._rows = [q_all[:, :, -keep:]]

    def _append(self, keys: mx.array, values: mx.array) -> None:
        L = keys.shape[2]
        if self.keys is None or self.stored + L > self.keys.shape[2]:
            grow = ((L + STEP - 1) // STEP) * STEP
            B, H, _, dk = keys.shape
            new_k = mx.zeros((B, H, grow, dk), keys.dtype)
            new_v = mx.zeros((B, H, grow, values.shape[3]), values.dtype)
            if self.keys is None:
                self.keys, self.values = new_k, new_v
            else:
                self.keys = mx.concatenate([self.keys[..., :self.stored, :], new_k], axis=2)
                self.values = mx.concatenate([self.values[..., :self.stored, :], new_v], axis=2)
        self.keys[..., self.stored:self.stored + L, :] = keys
        self.values[..., self.stored:self.stored + L, :] = values
        self.stored += L
        self.offset += L


def _config_dict(cfg: ReFreeKVConfig) -> dict:
    d = asdict(cfg)
    d["retained_layers"] = list(d["retained_layers"])
    return d


def make_prompt_cache(model, config: ReFreeKVConfig | None = None) -> list:
    """mlx-lm's prompt cache for ``model`` with every plain full-attention ``KVCache`` replaced by
    a ReFreeKV cache (sliding-window and other caches are kept as they are). Attaches the probes."""
    cfg = config if config is not None else ReFreeKVConfig()
    if not isinstance(cfg, ReFreeKVConfig):
        raise bad_input("config", f"type {type(cfg).__name__}", "a refreekv.ReFreeKVConfig")
    base = mlx_cache.make_prompt_cache(model)
    cfg.check_layers(len(base))
    probes = attach(model)
    return [ReFreeKVCache(cfg, i, probes[i]) if type(c) is mlx_cache.KVCache else c for i, c in enumerate(base)]


def compress_prompt_cache(prompt_cache: list) -> BudgetReport:
    """Compress after a manual prefill (``model(prompt[None], cache=prompt_cache)``)."""
    for c in prompt_cache:
        if isinstance(c, ReFreeKVCache):
            c.compress()
    return budget_report(prompt_cache)


def budget_report(prompt_cache: list) -> BudgetReport:
    """The per-layer report, in the same form as the torch path (layers not yet compressed and
    non-ReFreeKV layers are reported as skipped)."""
    report = BudgetReport()
    for i, c in enumerate(prompt_cache):
        if isinstance(c, ReFreeKVCache) and c.report is not None:
            report.layers.append(c.report)  # measured on the arrays kept at compression
        else:
            size = getattr(c, "nbytes", 0)
            n = [c.size()]
            why = "not compressed yet" if isinstance(c, ReFreeKVCache) else f"{type(c).__name__} (left alone)"
            report.layers.append(LayerReport(i, False, why, n, n, size, size))
    return report


def save_prompt_cache(file_name: str, prompt_cache: list, metadata: dict | None = None) -> None:
    """Save to safetensors (no pickle): mlx-lm's own format and writer."""
    mlx_cache.save_prompt_cache(file_name, prompt_cache, metadata)


def load_prompt_cache(file_name: str, model=None, return_metadata: bool = False):
    """Load a prompt cache saved by ``save_prompt_cache``. mlx-lm's loader only rebuilds its own
    classes; this one also rebuilds ReFreeKV caches, and re-attaches them to ``model`` (needed
    only if the loaded cache has not been compressed yet)."""
    arrays, meta = mx.load(file_name, return_metadata=True)
    from mlx.utils import tree_unflatten

    metadata, classes, scalars = tree_unflatten(list(meta.items()))
    for pos, kind in scalars[1:]:
        a = arrays[pos]
        arrays[pos] = {"scalar": lambda: a.item(), "string": lambda: "".join(chr(i) for i in a.tolist()),
                       "none": lambda: None}[kind]()
    states = tree_unflatten(list(arrays.items()))
    known = {"ReFreeKVCache": ReFreeKVCache}
    cache = [(known.get(c) or getattr(mlx_cache, c)).from_state(s) for c, s in zip(classes, states)]
    if model is not None:
        probes = attach(model)
        for i, c in enumerate(cache):
            if isinstance(c, ReFreeKVCache):
                c.probe = probes[i]
    return (cache, metadata) if return_metadata else cache
