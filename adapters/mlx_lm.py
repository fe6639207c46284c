"""ReFreeKV for mlx-lm: a prompt cache that compresses itself once a prompt segment is prefilled.

Usage::

    import mlx_lm
    from refreekv.adapters.mlx_lm import make_prompt_cache, budget_report

    model, tokenizer = mlx_lm.load(path)
    cache = make_prompt_cache(model, ReFreeKVConfig())   # also attaches the query probes
    text = mlx_lm.generate(model, tokenizer, prompt, prompt_cache=cache, max_tokens=64)
    print(budget_report(cache))

The cache follows mlx-lm's duck-typed cache protocol (``update_and_fetch``, ``offset``,
``make_mask``, ``state``, ``is_trimmable``/``trim``, ``size``, ``empty``, ``nbytes``); it
subclasses nothing of mlx-lm's. mlx-lm's attention never shows queries to the cache, so
``attach(model)`` wraps each attention module's ``rope`` with a small probe that remembers the
post-RoPE queries it rotates (models call ``rope(queries)`` then ``rope(keys)`` right before
``cache.update_and_fetch``). ``detach(model)`` puts the original ``rope`` back. Nothing is
patched at import.

When compression happens: ``mlx_lm.generate`` prefills a prompt in chunks and sends the last
prompt token together with the first decode step, as a one-token call. That first one-token call
is where a layer knows the whole prompt: it appends the token, returns the FULL keys and values
for that call's attention, and hands itself to the prompt cache's planner. When the last layer has
done so, every layer is planned together with one ``refreekv.compress_layers`` call (one host
read) and each stores only what it keeps. ``offset`` always counts every token seen, so RoPE
positions stay true. With ``replan="turns"`` the same happens again after every later prompt
segment (a chat turn): the rule runs over the kept slots plus the new segment, with the new
segment's queries; evicted tokens stay evicted. ``replan="history"`` does the same but keeps the newest
segment and what is generated after it whole (``keep_newest``). After a manual prefill (one
``model(prompt, cache)`` call), call ``compress_prompt_cache(cache)``.

Save and load use our own safetensors layout with per-array SHA-256 digests: a truncated or
tampered file raises ``ReFreeKVError`` and loads nothing.

``mlx_lm.server`` with these caches: ``with server_caches(config): ...`` makes the server build
ReFreeKV prompt caches while the block runs (``serve(argv, config)`` runs the server so; the CLI's
``refreekv serve``). ``chat_caches`` / ``chat(argv, config)`` do the same for mlx-lm's terminal chat
``mlx_lm.chat`` (the CLI's ``refreekv chat``). Every plan is logged on the ``refreekv`` logger.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import inspect
import json
import logging
import sys
import threading
from collections import deque

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models import cache as mlx_cache

import refreekv
from refreekv.config import ReFreeKVConfig
from refreekv.errors import bad_input
from refreekv.report import BudgetReport, LayerReport
from refreekv.rules import RANKINGS, REPLANS
from refreekv.validate import config_value

from . import engine

log = logging.getLogger("refreekv")

STEP = 256  # grow storage like mlx-lm's KVCache: in steps, not one concatenation per token
FORMAT = "refreekv-mlx-prompt-cache/1"


class QueryProbe(nn.Module):
    """Wraps an attention module's ``rope`` and keeps its last two outputs with the offset each was
    rotated at (queries, then keys, in mlx-lm's Llama-family models). What it keeps is per thread:
    two generations on one model in two threads each see their own rotations."""

    def __init__(self, rope, scale: float):
        super().__init__()
        self.inner = rope
        self.scale = scale
        self._local = threading.local()

    @property
    def _recent(self) -> deque:
        """This thread's last two rotations."""
        recent = getattr(self._local, "recent", None)
        if recent is None:
            recent = self._local.recent = deque(maxlen=2)
        return recent

    def __deepcopy__(self, memo):  # a copied model gets its own probe (a thread-local does not copy)
        return QueryProbe(copy.deepcopy(self.inner, memo), self.scale)

    def __call__(self, x, *args, **kwargs):
        out = self.inner(x, *args, **kwargs)
        self._recent.append((out, kwargs.get("offset", args[0] if args else 0)))
        return out

    def take_queries(self, keys: mx.array, offset: int) -> mx.array | None:
        """The queries rotated in this call, or None if what was rotated is not exactly "queries, then
        these keys, both at ``offset``": keys rotated after the cache update, queries rotated after it
        (a previous call's would be stale), a rope applied elsewhere, or shapes that do not fit."""
        if len(self._recent) < 2:
            self._recent.clear()
            return None
        (q, q_at), (k, k_at) = self._recent
        self._recent.clear()
        if q is keys or (k is not keys and k.shape != keys.shape):
            return None  # keys rotated first (q would be the keys), or the second output is not these keys
        if not (_same_offset(q_at, offset) and _same_offset(k_at, offset)):
            return None  # e.g. queries rotated after the cache update: these are the previous call's
        if q.ndim != 4 or q.shape[0] != keys.shape[0] or q.shape[2] != keys.shape[2] or q.shape[3] != keys.shape[3] \
                or q.shape[1] % keys.shape[1]:
            return None
        return q


def _same_offset(at, offset: int) -> bool:
    """Whether a rope offset (an int or a one-element array) is ``offset``."""
    try:
        return int(at.item() if isinstance(at, mx.array) else at) == offset
    except (TypeError, ValueError):
        return False


def _attention_modules(model) -> list:
    layers = getattr(model, "layers", None) or getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(model, nn.Module) or not layers:
        raise bad_input("model", f"type {type(model).__name__}", "an mlx-lm model (an mlx.nn.Module from mlx_lm.load)")
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


class Planner:
    """Shared by the ReFreeKV caches of one prompt cache: collects the layers that are ready to be
    planned and plans all of them together once the last one is."""

    def __init__(self, caches: list):
        self.caches = caches          # the ReFreeKV caches, in layer order
        self.ready: dict[int, ReFreeKVCache] = {}
        self.history = engine.History()

    def submit(self, cache: ReFreeKVCache) -> None:
        self.ready[cache.layer] = cache
        if len(self.ready) == len(self.caches):
            self.run()

    def run(self) -> BudgetReport:
        """Plan every ready layer with one ``compress_layers`` call per group of equal shapes."""
        ready, self.ready = [self.ready[c.layer] for c in self.caches if c.layer in self.ready], {}
        if not ready:
            return self.history.report
        items = [(c, c.planning_inputs()) for c in ready]
        groups: dict[tuple, list] = {}
        for c, (q, K, V, cfg) in items:
            groups.setdefault((tuple(q.shape), tuple(K.shape), tuple(V.shape), cfg, c.keep_newest),
                              []).append((c, q, K, V))
        reports = []
        for (_, _, _, cfg, keep_newest), group in groups.items():
            mx.eval([x for _, q, K, V in group for x in (q, K, V)])  # the prefill's own lazy work, not timed
            outs = refreekv.compress_layers([q for _, q, _, _ in group], [K for _, _, K, _ in group],
                                            [V for _, _, _, V in group], cfg, layers=[c.layer for c, *_ in group],
                                            scale=[c.scale for c, *_ in group], keep_newest=keep_newest)
            for (c, *_), out in zip(group, outs):
                c.store(out)
                reports.append(out.report)
        return _logged(self.history.add(reports), ready[0].offset)


def _logged(report: BudgetReport, offset: int) -> BudgetReport:
    log.info("refreekv: planned %d layers at %d tokens: budget %.1f%%, KV %.2f -> %.2f MB", len(report.layers), offset,
             100 * report.budget[0], report.bytes_before / 2**20, report.bytes_after / 2**20)
    return report


def _slots(runs: list, a: int, b: int) -> list:
    """The position runs ([first position, count], in slot order) of storage slots [a, b)."""
    out, i = [], 0
    for p, c in runs:
        lo, hi = max(a, i), min(b, i + c)
        if lo < hi:
            out.append([p + lo - i, hi - lo])
        i += c
    return out


def _joined(runs: list) -> list:
    """Runs with adjacent ones merged and empty ones dropped."""
    out: list = []
    for p, c in runs:
        if out and out[-1][0] + out[-1][1] == p:
            out[-1][1] += c
        elif c:
            out.append([p, c])
    return out


#: The quantized tail's arrays (``config.tail_bits``): codes, scales and biases of K and V.
TAIL_PARTS = ("k", "k_scales", "k_biases", "v", "v_scales", "v_biases")


class ReFreeKVCache:
    """One full-attention layer's cache (batch size 1), compressed after each planned segment. With
    ``config.tail_bits`` what a plan evicts is kept quantized and attended to (``tail``)."""

    def __init__(self, config: ReFreeKVConfig | None = None, layer: int = 0, probe: QueryProbe | None = None):
        self.config = config if config is not None else ReFreeKVConfig()
        self.layer = layer
        self.probe = probe
        self.planner: Planner | None = None
        self.keys = self.values = None
        self.offset = 0            # every token seen: the RoPE position of the next one
        self.stored = 0            # slots in use in keys/values
        self.planned = 0           # slots that were present at the last plan (0: never planned)
        self.plans = 0             # how many plans this layer went through
        self.reports: list[LayerReport] = []
        self._rows: list[mx.array] = []  # the current segment's query rows, buffered until it is planned
        self._segment = 0          # tokens added since the last plan
        self._last_call = 0        # tokens added by the previous call
        self._segment_prompt = 0   # prompt tokens (multi-token calls) of the segment not planned yet
        self._turn = 0             # the newest prompt segment and the tokens generated after it (history)
        self._segments = 0         # prompt segments so far (1: the first prompt; replan="chat" keeps from 2)
        self._calls_since_trim = 0  # calls since the last trim (speculative decoding trims after each verification)
        # The position of every stored slot, as runs [first position, count] in slot order; None once
        # a plan kept a set this cache cannot follow (rankings other than sinks + newest run).
        self.runs: list | None = []
        # config.tail_bits: what plans evicted, quantized (TAIL_PARTS -> (1, Hkv, T, ...) arrays), attended to
        # dequantized before the stored slots; tail_runs are its positions (ascending), as runs are the slots'.
        self.tail: dict | None = None
        self.tail_runs: list | None = []

    def __deepcopy__(self, memo):
        """A copy that continues on its own (fork a chat; mlx-lm's ``LRUPromptCache`` copies the caches it
        hands out): K, V, rows, reports and the prompt cache's shared planner are copied, but the query
        probe stays the model's own, since the copy's calls go through the same model."""
        return engine.copy_sharing(self, memo, names=("probe",))

    @property
    def scale(self) -> float | None:
        return None if self.probe is None else self.probe.scale

    @property
    def report(self) -> LayerReport | None:
        return self.reports[-1] if self.reports else None

    @property
    def tail_slots(self) -> int:
        """T, the quantized tail's slots (0 without one)."""
        return 0 if self.tail is None else self.tail["k"].shape[2]

    def _fetched(self) -> tuple[mx.array, mx.array]:
        """What attention sees: the tail dequantized (if any), then the stored slots."""
        k, v = self.keys[..., :self.stored, :], self.values[..., :self.stored, :]
        if self.tail is None:
            return k, v
        be = refreekv.builtin_backend("mlx")
        out = []
        for p, x in (("k", k), ("v", v)):
            codes, scales = self.tail[p], self.tail[f"{p}_scales"]
            d = codes.shape[-1] * 8 // self.config.tail_bits
            out.append(mx.concatenate([refreekv.core.step(be, "dequantize")(
                codes, scales, self.tail[f"{p}_biases"], self.config.tail_bits, d // scales.shape[-1],
                be.dtype_name(x)), x], axis=2))
        return out[0], out[1]

    # -- the protocol -------------------------------------------------------------------------
    def update_and_fetch(self, keys: mx.array, values: mx.array):
        if keys.shape[0] != 1:
            raise bad_input("keys", f"batch {keys.shape[0]}", "batch size 1 (the MLX ReFreeKV cache "
                            "does not batch; use one prompt cache per prompt)")
        if self.planner is not None and self.layer in self.planner.ready:
            # The previous call submitted this layer and the call ended before every layer had: the model
            # ran only some layers (mlx-lm zips a model's layers with the list it gets, so a shortened
            # list, or one made for a model of another depth, silently skips the rest).
            waiting = [c.layer for c in self.planner.caches if c.layer not in self.planner.ready]
            raise bad_input("prompt_cache", f"a call that did not reach layer(s) {waiting[:8]}"
                            f"{' ...' if len(waiting) > 8 else ''} (layer {self.layer} is called again first)",
                            "the whole list from make_prompt_cache(model) for this model, one cache per layer")
        L = keys.shape[2]
        cfg = self.config
        plans_segments = self.plans == 0 or REPLANS[cfg.replan].segments
        # A one-token call right after a multi-token one ends a prompt segment (mlx-lm sends the last
        # prompt token with the first decode step); replan_every counts generated tokens.
        segment_end = L == 1 and self._last_call > 1 and plans_segments
        if segment_end and self.plans and self._segment_prompt + 1 <= cfg.sinks:
            # A later segment of at most `sinks` tokens is appended as it is (the n <= sinks + 1
            # rule of a prompt): too few queries to judge the whole cache by.
            segment_end, self._segment_prompt = False, 0
            if cfg.replan_every == 0:
                self._rows = []
        # Rows that can score a plan: a prompt segment's (its last token included) and, with
        # replan_every, generated tokens'. Decode steps' rows are not kept otherwise.
        wants_rows = (plans_segments and (L > 1 or segment_end)) or cfg.replan_every > 0
        q = self.probe.take_queries(keys, self.offset) if self.probe is not None else None
        if wants_rows:
            if q is None:
                raise bad_input("model", f"no captured queries for layer {self.layer}",
                                "the model this prompt cache was made for, prepared with refreekv.adapters.mlx_lm."
                                "attach(model) (make_prompt_cache and load_prompt_cache(file, model) do it)")
            self._buffer_rows(q)
        if segment_end:
            self._turn = self._segment_prompt + 1  # this segment, its last token included
            self._segments += 1
        elif L == 1:
            self._turn += 1
        self._append(keys, values)
        if L > 1:
            self._segment_prompt += L
        generated = L == 1 and cfg.replan_every > 0 and self.plans > 0 and self._segment >= cfg.replan_every
        self._last_call = L
        self._calls_since_trim += 1
        if segment_end or generated:
            # This call attends to everything; only storage shrinks, once every layer has come.
            full = self._fetched()
            if self.planner is None:
                self.compress()
            else:
                self.planner.submit(self)
            return full
        return self._fetched()

    def make_mask(self, N: int, window_size=None, return_array: bool = False):
        # Kept slots and tail slots are all real (batch 1), so a causal mask over tail + stored + N keys is right.
        return mlx_cache.create_attention_mask(N, self.stored + self.tail_slots, return_array, window_size)

    @property
    def state(self):
        """The stored K and V and the tail's arrays (what ``mx.eval`` needs after each prefill chunk)."""
        if self.keys is None:
            return []
        return [self.keys[..., :self.stored, :], self.values[..., :self.stored, :],
                *([] if self.tail is None else [self.tail[p] for p in TAIL_PARTS])]

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        """Removes the newest n tokens (positions ``offset - n`` on): the cache becomes the one of the
        shorter sequence, at true positions. Tokens added since the last plan go exactly. A trim that
        reaches into planned slots drops the kept slots at those positions and keeps what the earlier
        plans evicted from the rest evicted (mlx-lm's LRUPromptCache and server trim a cached
        conversation back to a shorter prompt, e.g. to regenerate an answer); it is refused
        (ReFreeKVError) when a ranking other than sinks + newest run decided the kept set.

        Speculative decoding (mlx-lm's ``draft_model``) verifies drafts in one multi-token call and then
        trims the rejected ones, so its decoding never makes the one-token call that ends a prompt
        segment. A trim right after a multi-token call therefore ends the segment instead: when the
        calls since the last trim were a prompt (one call or more) and then that call, the segment with
        the accepted tokens is planned after the trim; when that call was all (a later verification),
        its accepted tokens are generated ones, not prompt."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise bad_input("trim", repr(n), "a number of tokens, an int >= 0")
        if self.runs is None:
            if self.plans and min(self.stored, n) > self.stored - self.planned_kept:
                raise bad_input("trim", n, f"at most {self.stored - self.planned_kept} tokens (those added after the "
                                f"last plan; ranking={self.config.ranking!r} kept a set whose positions are not tracked)")
            n = min(self.stored, n)
            self.stored -= n
        else:
            n = min(self.offset, n)
            self.runs = _joined([[p, max(0, min(c, self.offset - n - p))] for p, c in self.runs])
            self.stored = sum(c for _, c in self.runs)
            self.planned = min(self.planned, self.stored)
            if self.tail is not None:  # tail positions at or past the new end go too (the tail is ascending)
                self.tail_runs = _joined([[p, max(0, min(c, self.offset - n - p))] for p, c in self.tail_runs])
                keep = sum(c for _, c in self.tail_runs)
                self.tail = {p: a[:, :, :keep] for p, a in self.tail.items()} if keep else None
        self.offset -= n
        self._segment = max(0, self._segment - n)
        self._segment_prompt = max(0, self._segment_prompt - n)
        self._turn = max(0, self._turn - n)
        if self._rows:
            rows = mx.concatenate(self._rows, axis=2)
            self._rows = [rows[:, :, :max(0, rows.shape[2] - n)]]
        after_call, calls = self._last_call > 1, self._calls_since_trim
        self._calls_since_trim = 0
        plans_segments = self.plans == 0 or REPLANS[self.config.replan].segments
        if after_call and calls == 1 and self._segment_prompt:  # a verification: generated tokens
            accepted = min(self._segment_prompt, self._last_call - n)
            self._segment_prompt -= accepted
            self._turn += accepted
            if self._rows and self.config.replan_every == 0:
                rows = self._rows[0] if len(self._rows) == 1 else mx.concatenate(self._rows, axis=2)
                self._rows = [rows[:, :, :max(0, rows.shape[2] - accepted)]]
        elif after_call and calls >= 2 and plans_segments and self._rows and \
                (self.plans == 0 or self._segment_prompt > self.config.sinks):
            self._turn = self._segment_prompt  # the segment, its accepted tokens included
            self._segments += 1
            self._last_call = 1
            if self.planner is None:
                self.compress()
            else:
                self.planner.submit(self)
        return n

    @property
    def planned_kept(self) -> int:
        """Slots kept by the last plan (the part of storage that ``trim`` may not touch)."""
        return 0 if not self.reports else self.reports[-1].kept[0]

    def size(self) -> int:
        return self.stored

    def empty(self) -> bool:
        return self.keys is None

    @property
    def nbytes(self) -> int:
        tail = 0 if self.tail is None else sum(a.nbytes for a in self.tail.values())
        return tail + (0 if self.keys is None else self.keys.nbytes + self.values.nbytes)

    def to_quantized(self, group_size: int = 64, bits: int = 4):
        raise bad_input("kv_bits", bits, "None (quantizing a ReFreeKV cache is not supported)")

    # -- ReFreeKV -----------------------------------------------------------------------------
    def planning_inputs(self):
        """(q rows, K, V, config) for planning what is stored now with the buffered rows. A later
        segment scores with its own rows, at most as many as it has."""
        n = self.stored
        q = mx.concatenate(self._rows, axis=2) if len(self._rows) > 1 else self._rows[0]
        cfg = self.config
        if cfg.rows_needed(n) > q.shape[2] and self.plans:
            cfg = dataclasses.replace(cfg, query_rows=min(cfg.rows_for(n), q.shape[2]))
        rows = cfg.rows_needed(n)
        if q.shape[2] < rows:
            raise bad_input("query rows", q.shape[2], f"{rows} captured rows for ranking={cfg.ranking!r} "
                            "(call attach(model) before prefill; a later segment must hold the ranking's rows)")
        return q[:, :, -rows:].astype(mx.float32), self.keys[..., :n, :], self.values[..., :n, :], cfg

    @property
    def keep_newest(self) -> int | None:
        """What a plan must keep whole: the newest segment and what was generated after it when the
        configuration's ``REPLANS`` rule keeps this segment ("history"; "chat" from the second
        segment on); else None."""
        return self._turn if REPLANS[self.config.replan].keeps_turn(self._segments) else None

    def compress(self) -> LayerReport:
        """Plan this layer alone on what is stored, with the buffered query rows."""
        q, K, V, cfg = self.planning_inputs()
        mx.eval(q, K, V)  # the prefill's own lazy work, not timed
        out = refreekv.compress_layers([q], [K], [V], cfg, layers=[self.layer], scale=[self.scale],
                                       keep_newest=self.keep_newest)[0]
        self.store(out)
        return out.report

    def store(self, out) -> None:
        """Keep what a plan kept; reset the segment."""
        if out.valid is not None:
            mx.eval(out.keys, out.values)
            if self.runs is not None and RANKINGS[self.config.ranking].newest_run:
                # the kept set is the sinks and a newest run (batch 1: no padded slots)
                sinks = min(self.config.sinks, self.stored)
                recent = out.keys.shape[2] - sinks
                evicted = _slots(self.runs, sinks, self.stored - recent)
                self.runs = _joined(_slots(self.runs, 0, sinks) + _slots(self.runs, self.stored - recent, self.stored))
            else:
                evicted = self.runs = None
            if out.tail is not None:  # what this plan evicted joins the tail (its positions after the tail's)
                new = dict(zip(TAIL_PARTS, (out.tail.keys.codes, out.tail.keys.scales, out.tail.keys.biases,
                                            out.tail.values.codes, out.tail.values.scales, out.tail.values.biases)))
                self.tail = new if self.tail is None else \
                    {p: mx.concatenate([self.tail[p], new[p]], axis=2) for p in TAIL_PARTS}
                mx.eval(list(self.tail.values()))
                self.tail_runs = None if evicted is None or self.tail_runs is None else _joined(self.tail_runs + evicted)
            self.keys, self.values, self.stored = out.keys, out.values, out.keys.shape[2]
        self.reports.append(out.report)
        self.planned, self.plans = self.stored, self.plans + 1
        self._rows, self._segment, self._segment_prompt = [], 0, 0

    def _buffer_rows(self, q: mx.array) -> None:
        self._rows.append(q)
        cfg = self.config
        if isinstance(cfg.query_rows, int) and cfg.ranking != "h2o":
            # Only the newest rows can matter: drop older chunks' rows.
            keep = cfg.rows_needed(10 ** 9)
            q_all = mx.concatenate(self._rows, axis=2) if len(self._rows) > 1 else q
            self._rows = [q_all[:, :, -keep:]]

    def _append(self, keys: mx.array, values: mx.array) -> None:
        L = keys.shape[2]
        if self.keys is None or self.stored + L > self.keys.shape[2]:
            # Capacity is the next multiple of STEP that holds them all (after a plan storage is
            # exactly the kept tokens; growing by whole steps from there would leave it kept + STEP).
            grow = -(-(self.stored + L) // STEP) * STEP - self.stored
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
        if self.runs is not None:
            self.runs = _joined(self.runs + [[self.offset, L]])
        self.stored += L
        self.offset += L
        self._segment += L


def make_prompt_cache(model, config: ReFreeKVConfig | None = None) -> list:
    """mlx-lm's prompt cache for ``model`` with every plain full-attention ``KVCache`` replaced by a
    ReFreeKV cache (sliding-window and other caches are kept as they are), all planned together
    (``config.replan`` says when). Attaches the probes."""
    _attention_modules(model)  # the model is one we can plan for, before mlx-lm reads it
    base = mlx_cache.make_prompt_cache(model)
    cfg = engine.checked_config(config, len(base))
    probes = attach(model)
    cache = [ReFreeKVCache(cfg, i, probes[i]) if type(c) is mlx_cache.KVCache else c
             for i, c in enumerate(base)]
    _connect(cache)
    return cache


@contextlib.contextmanager
def _caches_in(module, label: str, config: ReFreeKVConfig | None):
    """While the block runs, ``module.make_prompt_cache`` (mlx-lm's own factory, imported by name into an
    mlx-lm entry point) makes ReFreeKV prompt caches with ``config``; mlx-lm's factory is put back on exit,
    errors included. A second switch-on while one is active is refused."""
    cfg = config_value(config)
    own = getattr(module, "make_prompt_cache", None)
    if own is not mlx_cache.make_prompt_cache:
        raise bad_input(label, f"make_prompt_cache = {own!r}", "mlx-lm's own mlx_lm.models.cache.make_prompt_cache"
                        f" ({label} ReFreeKV caches are already on, or this mlx-lm makes caches elsewhere)")

    def factory(model, max_kv_size=None):
        if max_kv_size is not None:
            raise bad_input("max_kv_size", max_kv_size, "None (a rotating window and ReFreeKV do not combine)")
        return make_prompt_cache(model, cfg)

    module.make_prompt_cache = factory
    try:
        yield
    finally:
        module.make_prompt_cache = own


def server_caches(config: ReFreeKVConfig | None = None):
    """While the block runs, ``mlx_lm.server`` makes ReFreeKV prompt caches (``make_prompt_cache(model,
    config)``) instead of mlx-lm's. The server then serves one request at a time (the cache does not
    batch), and its ``LRUPromptCache`` reuses, copies and trims our caches like its own: a chat's next
    turn extends the cached conversation and is planned again; regenerating an answer trims back into
    the planned prompt (``ReFreeKVCache.trim``). Each plan is logged on the ``refreekv`` logger.
    Restores mlx-lm's own factory on exit, errors included."""
    from mlx_lm import server

    return _caches_in(server, "mlx_lm.server", config)


def chat_caches(config: ReFreeKVConfig | None = None):
    """While the block runs, ``mlx_lm.chat`` (mlx-lm's terminal chat) makes ReFreeKV prompt caches: its
    one cache follows the conversation, each user turn is appended and planned again (``config.replan``),
    and its ``r`` (reset) makes a fresh one. Each plan is logged on the ``refreekv`` logger. Restores
    mlx-lm's own factory on exit, errors included."""
    from mlx_lm import chat

    return _caches_in(chat, "mlx_lm.chat", config)


def _run_main(module, prog: str, argv: list[str] | None) -> None:
    saved = sys.argv
    sys.argv = [prog, *(sys.argv[1:] if argv is None else argv)]
    try:
        module.main()
    finally:
        sys.argv = saved


def serve(argv: list[str] | None = None, config: ReFreeKVConfig | None = None) -> None:
    """Run ``mlx_lm.server`` with ``argv`` (its own options: ``--model``, ``--port``, ...) and ReFreeKV
    prompt caches (``server_caches``); plans are logged at INFO."""
    from mlx_lm import server

    with server_caches(config):
        _run_main(server, "mlx_lm.server", argv)


def chat(argv: list[str] | None = None, config: ReFreeKVConfig | None = None) -> None:
    """Run ``mlx_lm.chat`` with ``argv`` (its own options: ``--model``, ``--max-tokens``, ...) and a
    ReFreeKV prompt cache (``chat_caches``). Plans are logged on the ``refreekv`` logger (the CLI's
    ``refreekv chat`` shows them on stderr)."""
    from mlx_lm import chat as mlx_chat

    with chat_caches(config):
        _run_main(mlx_chat, "mlx_lm.chat", argv)


def _checked(prompt_cache, ours: bool = False) -> None:
    """``prompt_cache`` must be a non-empty list of mlx-lm or ReFreeKV caches (with ``ours``: at least
    one ReFreeKV cache, i.e. one made by ``make_prompt_cache`` or ``load_prompt_cache``)."""
    if not isinstance(prompt_cache, (list, tuple)) or not prompt_cache:
        got = "an empty list" if isinstance(prompt_cache, (list, tuple)) else f"type {type(prompt_cache).__name__}"
        raise bad_input("prompt_cache", got, "the list from make_prompt_cache(model), one cache per layer")
    for i, c in enumerate(prompt_cache):
        if not isinstance(c, (ReFreeKVCache, mlx_cache._BaseCache)):
            raise bad_input("prompt_cache", f"layer {i} of class {type(c).__name__}",
                            "caches of mlx_lm.models.cache or ReFreeKV")
    if ours and not any(isinstance(c, ReFreeKVCache) for c in prompt_cache):
        raise bad_input("prompt_cache", "mlx-lm caches without a ReFreeKV layer",
                        "a prompt cache from refreekv.adapters.mlx_lm.make_prompt_cache(model)")


def _connect(prompt_cache: list) -> Planner:
    ours = [c for c in prompt_cache if isinstance(c, ReFreeKVCache)]
    planner = Planner(ours)
    for c in ours:
        c.planner = planner
    return planner


def compress_prompt_cache(prompt_cache: list) -> BudgetReport:
    """Compress after a manual prefill (``model(prompt[None], cache=prompt_cache)``): every layer
    with buffered rows is planned, all together."""
    _checked(prompt_cache, ours=True)
    planner = next((c.planner for c in prompt_cache if isinstance(c, ReFreeKVCache) and c.planner), None)
    if planner is None:
        planner = _connect(prompt_cache)
    for c in prompt_cache:
        if isinstance(c, ReFreeKVCache) and c._rows and c.layer not in planner.ready:
            if c._segment_prompt:  # the manual prefill is the newest segment (replan="history" keeps it)
                c._turn = c._segment_prompt
                c._segments += 1
            planner.ready[c.layer] = c
    planner.run()
    return budget_report(prompt_cache)


def budget_report(prompt_cache: list) -> BudgetReport:
    """The newest plan's per-layer report, in the same form as the torch path (layers not planned
    yet and non-ReFreeKV layers are reported as skipped)."""
    _checked(prompt_cache)
    report = BudgetReport()
    for i, c in enumerate(prompt_cache):
        if isinstance(c, ReFreeKVCache) and c.report is not None:
            report.layers.append(c.report)  # measured on the arrays kept at compression
        else:
            why = "not compressed yet" if isinstance(c, ReFreeKVCache) else f"{type(c).__name__} (left alone)"
            size = int(getattr(c, "nbytes", 0))
            report.layers.append(LayerReport(i, False, why, [c.size()], [c.size()], size, size))
    return report


def plan_history(prompt_cache: list) -> list[BudgetReport]:
    """Every plan the prompt cache went through (one per planned segment), oldest first."""
    _checked(prompt_cache, ours=True)
    ours = [c for c in prompt_cache if isinstance(c, ReFreeKVCache)]
    plans = max((len(c.reports) for c in ours), default=0)
    return [BudgetReport([c.reports[p] for c in ours if p < len(c.reports)]) for p in range(plans)]


# -- save and load: our own layout, checked on load ----------------------------------------------

def _digest(a: mx.array) -> str:
    return hashlib.sha256(np.ascontiguousarray(np.array(a.astype(mx.float32) if a.dtype == mx.bfloat16 else a)).tobytes()).hexdigest()


def _encode_state(i: int, state) -> tuple[dict, list]:
    """Arrays of a non-ReFreeKV cache's ``state`` under ``i.state.j`` keys; other leaves as JSON."""
    arrays, leaves = {}, []
    for j, x in enumerate(state if isinstance(state, (list, tuple)) else [state]):
        if isinstance(x, mx.array):
            arrays[f"{i}.state.{j}"] = x
            leaves.append({"array": f"{i}.state.{j}"})
        elif x is None or isinstance(x, (bool, int, float, str)):
            leaves.append({"value": x})
        else:
            raise bad_input("prompt_cache", f"layer {i} state with a {type(x).__name__}", "arrays, numbers or strings")
    return arrays, leaves


def save_prompt_cache(file_name: str, prompt_cache: list, metadata: dict | None = None) -> None:
    """Save to safetensors (no pickle): every layer's arrays, and a JSON header with the layers'
    bookkeeping and the SHA-256 of every array (``load_prompt_cache`` checks them)."""
    if metadata is not None and not (isinstance(metadata, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise bad_input("metadata", repr(metadata), "None or a dict of str to str")
    _checked(prompt_cache)
    arrays: dict[str, mx.array] = {}
    layers = []
    for i, c in enumerate(prompt_cache):
        if isinstance(c, ReFreeKVCache):
            entry = {"class": "ReFreeKVCache", "offset": c.offset, "stored": c.stored, "planned": c.planned,
                     "plans": c.plans, "layer": c.layer, "config": c.config.to_dict(),
                     "reports": [r.__dict__ for r in c.reports], "segment": c._segment, "last_call": c._last_call,
                     "segment_prompt": c._segment_prompt, "turn": c._turn, "segments": c._segments,
                     "runs": c.runs, "tail_runs": c.tail_runs}
            if c.tail is not None:
                arrays.update({f"{i}.tail_{p}": a for p, a in c.tail.items()})
            if c.keys is not None:
                arrays[f"{i}.keys"], arrays[f"{i}.values"] = c.keys[..., :c.stored, :], c.values[..., :c.stored, :]
            if c._rows:  # query rows of a segment not planned yet (or of generated tokens, for replan_every)
                arrays[f"{i}.rows"] = mx.concatenate(c._rows, axis=2) if len(c._rows) > 1 else c._rows[0]
        else:
            name = type(c).__name__
            if getattr(mlx_cache, name, None) is not type(c):
                raise bad_input("prompt_cache", f"layer {i} of class {name}", "caches of mlx_lm.models.cache or ReFreeKV")
            extra, leaves = _encode_state(i, c.state)
            arrays.update(extra)
            entry = {"class": name, "state": leaves, "meta_state": getattr(c, "meta_state", None)}
        layers.append(entry)
    mx.eval(list(arrays.values()))
    header = {"format": FORMAT, "layers": layers, "metadata": metadata or {},
              "digests": {k: _digest(v) for k, v in arrays.items()}}
    try:
        mx.save_safetensors(str(file_name), arrays, metadata={"refreekv": json.dumps(header)})
    except (RuntimeError, OSError, ValueError) as err:
        raise bad_input("file_name", f"{file_name!r}: unwritable ({type(err).__name__}: {err})",
                        "a path in an existing, writable folder") from err


def _corrupt(file_name: str, what: str) -> Exception:
    return bad_input("file_name", f"{file_name!r}: {what}", "a prompt cache written by refreekv.adapters.mlx_lm."
                     "save_prompt_cache, intact (nothing was loaded)")


def load_prompt_cache(file_name: str, model=None, return_metadata: bool = False):
    """Load a prompt cache saved by ``save_prompt_cache``, after checking the whole file: a missing,
    truncated or tampered file raises ReFreeKVError and nothing is loaded. ``model`` re-attaches
    the probes (needed to keep generating with a cache that still plans)."""
    try:
        arrays, meta = mx.load(str(file_name), return_metadata=True)
    except Exception as err:  # noqa: BLE001 - mlx raises several types for unreadable files
        raise _corrupt(str(file_name), f"unreadable ({type(err).__name__}: {err})") from err
    try:
        header = json.loads(meta["refreekv"])
        if header.get("format") != FORMAT:
            raise ValueError(f"format {header.get('format')!r}")
        digests, layers = header["digests"], header["layers"]
        if set(digests) != set(arrays):
            raise ValueError("the arrays are not the ones listed")
        for k, d in digests.items():
            if _digest(arrays[k]) != d:
                raise ValueError(f"array {k} does not match its checksum")
        cache = [_rebuild(i, entry, arrays) for i, entry in enumerate(layers)]
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as err:
        raise _corrupt(str(file_name), f"{type(err).__name__}: {err}") from err
    _connect(cache)
    if model is not None:
        probes = attach(model)
        if len(probes) != len(cache):
            raise bad_input("model", f"a model with {len(probes)} layers",
                            f"the model the cache was saved from ({len(cache)} layers)")
        for i, c in enumerate(cache):
            if isinstance(c, ReFreeKVCache):
                c.probe = probes[i]
    return (cache, header["metadata"]) if return_metadata else cache


def _check_tail(i: int, c: ReFreeKVCache) -> None:
    """A loaded layer's tail fits together (ValueError otherwise): a configuration with ``tail_bits``, codes
    of that many bits for the stored slots' head dimension, one scale and bias per group, T slots each."""
    bits = c.config.tail_bits
    if bits is None or c.keys is None:
        raise ValueError(f"layer {i}: a tail without tail_bits in its configuration or without stored slots")
    T = c.tail["k"].shape[2]
    for p, x in (("k", c.keys), ("v", c.values)):
        codes, scales, biases = c.tail[p], c.tail[f"{p}_scales"], c.tail[f"{p}_biases"]
        d, groups = x.shape[-1], scales.shape[-1]
        ok = (codes.dtype == mx.uint8 and tuple(codes.shape) == (1, x.shape[1], T, d * bits // 8) and groups >= 1
              and d % groups == 0 and tuple(scales.shape) == tuple(biases.shape) == (1, x.shape[1], T, groups)
              and scales.dtype == biases.dtype == mx.float32)
        if not ok:
            raise ValueError(f"layer {i}: tail {p} codes {tuple(codes.shape)}, scales {tuple(scales.shape)} do not fit "
                             f"{T} slots of d = {d} at {bits} bits")


def _rebuild(i: int, entry: dict, arrays: dict):
    if entry["class"] == "ReFreeKVCache":
        c = ReFreeKVCache(ReFreeKVConfig.from_dict(entry["config"]), int(entry["layer"]), None)
        c.offset, c.stored, c.planned, c.plans = (int(entry[k]) for k in ("offset", "stored", "planned", "plans"))
        c.reports = [LayerReport(**r) for r in entry["reports"]]
        if f"{i}.keys" in arrays:
            c.keys, c.values = arrays[f"{i}.keys"], arrays[f"{i}.values"]
            if c.keys.shape[2] != c.stored or c.values.shape[2] != c.stored:
                raise ValueError(f"layer {i} holds {c.keys.shape[2]} slots, its header says {c.stored}")
        elif c.stored:
            raise ValueError(f"layer {i} has no arrays but {c.stored} stored slots")
        if f"{i}.rows" in arrays:
            c._rows = [arrays[f"{i}.rows"]]
        elif entry.get("pending"):  # written before the rows were saved with the layer
            raise ValueError(f"layer {i} was saved in the middle of a prompt segment without its query rows")
        c._segment, c._last_call = int(entry.get("segment", 0)), int(entry.get("last_call", 0))
        c._segment_prompt = int(entry.get("segment_prompt", 0))
        c._turn = int(entry.get("turn", 0))
        # files written before segments were counted: a cache that planned or holds a turn is past its first
        c._segments = int(entry.get("segments", 1 if c.plans or c._turn else 0))
        runs = entry.get("runs")  # absent in files written before positions were tracked: deep trims refused
        if runs is not None:
            c.runs = [[int(p), int(k)] for p, k in runs]
            ends = [0] + [p + k for p, k in c.runs]
            if sum(k for _, k in c.runs) != c.stored or ends[-1] > c.offset or any(
                    k < 1 or p < end for (p, k), end in zip(c.runs, ends)):
                raise ValueError(f"layer {i}'s slot positions are not ascending runs that fit its {c.stored} slots "
                                 f"and offset {c.offset}")
        else:
            c.runs = None if c.plans else []
        if f"{i}.tail_k" in arrays:
            c.tail = {p: arrays[f"{i}.tail_{p}"] for p in TAIL_PARTS}
            _check_tail(i, c)
        tail_runs = entry.get("tail_runs", [])
        c.tail_runs = None if tail_runs is None else [[int(p), int(k)] for p, k in tail_runs]
        if c.tail is not None and c.tail_runs is not None and sum(k for _, k in c.tail_runs) != c.tail_slots:
            raise ValueError(f"layer {i}'s tail positions do not fit its {c.tail_slots} tail slots")
        return c
    cls = getattr(mlx_cache, entry["class"], None)
    if cls is None or not inspect.isclass(cls):
        raise ValueError(f"layer {i}: unknown cache class {entry['class']!r}")
    state = [arrays[leaf["array"]] if "array" in leaf else leaf["value"] for leaf in entry["state"]]
    if entry.get("meta_state") is not None and len(inspect.signature(cls.from_state).parameters) >= 2:
        return cls.from_state(state, entry["meta_state"])
    return cls.from_state(state)
