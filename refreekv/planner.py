"""The planner: validated requests in, per-layer decisions and compressed K/V out.

``plan`` runs ReFreeKV on L layers of one prompt as ONE batch of ``L * B`` rows: the logits are
computed per layer (each layer has its own keys; nothing is copied), then every later step
(softmax, score row, ranking, norm-ratio curve, cut, kept positions) runs once on the stack.
The number of array operations therefore grows by a few per layer (a matmul and a scale), not by
the ~30 of a whole plan, and there is one host read: the cuts together with the guard flags.

The guard: the logits (and any ranking scores, and the values when they are given) are checked
for NaN and infinity on the device, and the flags travel with the cuts. A non-finite input, or
finite inputs whose logits overflow, raise a ReFreeKVError naming the layer and argument instead
of evicting on a NaN ratio (or handing back a cache whose kept values are NaN). Only that error
path scans the inputs one by one.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from functools import partial
from typing import NamedTuple

import numpy as np

from . import core
from .backend import Array, Backend
from .core import step
from .config import ReFreeKVConfig
from .errors import bad_input
from .quantized import Quantized, QuantizedTail, quant_group
from .report import LayerReport
from .rules import RANKINGS, Scoring
from .validate import Request


@dataclass
class LayerPlan:
    """One layer's decision. ``cut``, ``prompt_lengths`` and ``start`` are host NumPy (B,); the rest
    are native arrays: a (B, H, n), order (B, Hkv, n), ratio (B, n), idx (B, Hkv, J), valid (B, J),
    with J the layer's largest cut. ``config`` is the configuration that decided it."""

    a: Array
    order: Array
    ratio: Array
    cut: np.ndarray
    idx: Array
    valid: Array
    prompt_lengths: np.ndarray
    start: np.ndarray
    config: ReFreeKVConfig


class CompressedLayer(NamedTuple):
    """What ``compress_layer`` returns: keys/values (B, Hkv, J, d), ``valid`` (B, J) bool saying
    which slots hold a kept token (None when nothing was evicted), the report, and ``tail``: with
    ``config.tail_bits``, what was evicted, quantized (a ``QuantizedTail``; else None)."""

    keys: Array
    values: Array
    valid: Array | None
    report: LayerReport
    tail: QuantizedTail | None = None


def _tail_rows(plan_: LayerPlan, keys: Array, values: Array, be: Backend, ar: Array,
               yes: Array) -> tuple[Array, Array, Array, Array]:
    """What the plan evicts, unquantized: (idx (B, Hkv, T), valid (B, T), K and V (B, Hkv, T, d)). For the
    position ranking and one sample the tail is one run of positions, taken by slicing (no sort, no gather;
    ``ar`` (n,) int64 and ``yes`` (1, n) bool, shared by the layers, give its positions and valid slots)."""
    cfg, n_b = plan_.config, plan_.prompt_lengths.astype(np.int64)
    B, Hkv, n = be.shape(plan_.order)
    s = int(plan_.start[0])
    m = min(cfg.sinks, int(n_b[0]))
    lo, hi = s + m, n - (int(plan_.cut[0]) - m)
    if RANKINGS[cfg.ranking].newest_run and B == 1 and hi > lo:  # (an empty tail is one padded slot, as below)
        idx = be.broadcast_to(be.reshape(ar[lo:hi], (1, 1, hi - lo)), (1, Hkv, hi - lo))
        return idx, yes[:, :hi - lo], keys[:, :, lo:hi, ...], values[:, :, lo:hi, ...]
    T = max(1, int((n_b - plan_.cut).max()))
    idx, valid = step(be, "tail_positions")(plan_.order, be.from_numpy(plan_.cut.astype(np.int64), "int64", like=plan_.order),
                                            be.from_numpy(n_b, "int64", like=plan_.order), T)
    tk, tv = step(be, "evict")(keys, values, idx)
    return idx, valid, tk, tv


def _quantized(be: Backend, xs: list[Array], bits: int) -> list[Quantized]:
    """``quantize`` each of ``xs`` (B, Hkv, T_i, d), all in one call: the groups lie along d, so the arrays
    are quantized joined along T and the codes split back (a constant number of operations for any number
    of layers)."""
    d = be.shape(xs[0])[-1]
    g = quant_group(d)
    joined = xs[0] if len(xs) == 1 else be.concat(xs, axis=2)
    codes, scales, biases = step(be, "quantize")(joined, bits, g)
    out, at = [], 0
    for x in xs:
        t = be.shape(x)[2]
        out.append(Quantized(codes[:, :, at:at + t, ...], scales[:, :, at:at + t, ...], biases[:, :, at:at + t, ...],
                             bits, g, be.dtype_name(x)))
        at += t
    return out


def quantized_tails(plans: list[LayerPlan], keys: list, values: list, be: Backend, bits: int) -> list[QuantizedTail]:
    """What each plan evicts from its layer's keys/values (B, Hkv, n, d), kept at ``bits`` bits: the tail's
    positions, its K and V taken and quantized per ``quant_group(d)``, every layer's in one quantize call."""
    ar = be.arange(be.shape(plans[0].order)[-1], like=plans[0].order)
    yes = (ar >= 0)[None, :]
    rows = [_tail_rows(p, k, v, be, ar, yes) for p, k, v in zip(plans, keys, values)]
    qk = _quantized(be, [r[2] for r in rows], bits)
    qv = _quantized(be, [r[3] for r in rows], bits)
    return [QuantizedTail(r[0], r[1], a, b) for r, a, b in zip(rows, qk, qv)]


def fixed_budget_cut(start: np.ndarray, n: int, halting: str, budget, sinks: int) -> np.ndarray:
    """Keep ceil(budget * n_b) ("ratio") or budget ("count") tokens, clamped to [sinks + 1, n_b]."""
    n_b = n - np.asarray(start, np.int64)
    want = np.ceil(budget * n_b).astype(np.int64) if halting == "ratio" else np.full_like(n_b, int(budget))
    return np.minimum(np.maximum(want, sinks + 1), n_b)


#: The configuration fields a ranking's order depends on (``reuse`` requires them equal).
ORDER_FIELDS = ("sinks", "query_rows", "combine", "ranking", "window", "pool_kernel")


def plan(req: Request, reuse: list[LayerPlan] | None = None) -> list[LayerPlan]:
    """Plan every layer of a validated request (module docstring). ``reuse``: plans of the same
    layers made under the same ranking configuration; their orders are taken as they are, so a
    sweep over fixed budgets scores each prompt once."""
    be, cfg = req.be, req.config
    L, B, H, Hkv, n, k = req.shape
    rule = RANKINGS[cfg.ranking]
    n_b = n - req.start
    used = np.array([cfg.rows_for(int(x)) for x in n_b], np.int64)  # score rows per sample
    kk = int(used.max())
    like = req.keys[0]
    st = be.from_numpy(req.start, "int64", like=like)
    st_all = st if L == 1 else be.from_numpy(np.tile(req.start, L), "int64", like=like)
    rows_all = be.from_numpy(np.tile(used, L), "int64", like=like)
    stack = (lambda xs: xs[0]) if L == 1 else (lambda xs: be.concat(xs, axis=0))  # noqa: E731
    # The values never enter the decision, but a cache is handed back with them: checked in the same read.
    value_flags = [] if req.values is None else [be.all_finite(x) for x in req.values]
    score_rows = [q if kk == k else q[:, :, k - kk:, ...] for q in req.q_rows]
    fused = (rule.scores is None and reuse is None and cfg.halting == "threshold"
             and not {"attention_row", "attention_rows"} & set(be.steps))
    if "attention_row" in be.steps or "attention_rows" in be.steps:  # a declared kernel: one call per layer
        used_dev = be.from_numpy(used, "int64", like=like)
        a = stack([step(be, "attention_row")(q, K, st, used_dev, sc, cfg.combine)
                   for q, K, sc in zip(score_rows, req.keys, req.scales)])
        guarded = [a]
    else:  # logits per layer (no copy of K), then everything else once for the stack
        d = be.shape(req.q_rows[0])[-1]
        scales = [1.0 / math.sqrt(d) if sc is None else sc for sc in req.scales]
        shared = len(set(scales)) == 1 and L > 1  # one scale for every layer: one multiply for the stack
        logits = stack([step(be, "attention_scores")(q, K, 1.0 if shared else sc)
                        for q, K, sc in zip(score_rows, req.keys, scales)])
        if shared:
            logits = logits * scales[0]
        guarded = [logits]
        if not fused:
            A, visible = core.softmax_rows(be, logits, st_all, rows_all)
            a = core.combine_rows(be, A, visible, cfg.combine)
    if fused:  # the paper's rule: one step from the logits to the cuts (a backend may compile it)
        a, order, ratio, cut_dev, flag = step(be, "decide")(logits, st_all, rows_all, cfg.sinks, cfg.norm_scope,
                                                             cfg.norm, cfg.heads, cfg.combine, cfg.threshold, Hkv,
                                                             cfg.mass_threshold)
        packed = be.to_numpy(be.concat([be.astype(cut_dev, "int64"), flag] + value_flags, axis=0))  # one host read
        cut, ok = packed[:L * B], packed[L * B:]
    else:
        if reuse is not None:
            order = stack([p.order for p in reuse])
        elif rule.scores is None:
            order = step(be, "position_ranking")(L * B, Hkv, n, cfg.sinks, st_all)
        else:
            scores = rule.scores(Scoring(be, cfg, req.q_rows, req.keys, req.scales, st, st_all,
                                         be.from_numpy(n_b, "int64", like=like), a, partial(step, be)))
            guarded.append(scores)
            order = step(be, "attention_ranking")(scores, cfg.sinks, cfg.window, st_all)
        ratio = step(be, "norm_ratio_curve")(a, order, cfg.sinks, cfg.norm_scope, st_all, cfg.norm, cfg.heads)
        flags = [be.all_finite(x) for x in guarded] + value_flags
        if cfg.halting == "threshold":
            cut_dev = step(be, "threshold_cut")(ratio, cfg.threshold, cfg.sinks, st_all)
            cut_dev = step(be, "mass_floor_cut")(a, order, cut_dev, cfg.mass_threshold, cfg.sinks, cfg.norm_scope,
                                                 cfg.heads, st_all)
            packed = be.to_numpy(be.concat([be.astype(cut_dev, "int64")] + flags, axis=0))  # the one host read
            cut, ok = packed[:L * B], packed[L * B:]
        else:
            ok = be.to_numpy(be.concat(flags, axis=0))
            cut = fixed_budget_cut(np.tile(req.start, L), n, cfg.halting, cfg.budget, cfg.sinks)
            cut_dev = be.from_numpy(cut, "int64", like=like)
    if not ok.all():
        _raise_non_finite(req)
    if req.keep_newest is not None and req.keep_newest.any():  # the caller's protected newest tokens
        floor = np.tile(np.minimum(n_b, np.minimum(cfg.sinks, n_b) + req.keep_newest), L)
        if (floor > cut).any():
            cut = np.maximum(cut, floor)
            cut_dev = be.from_numpy(cut, "int64", like=like)
    J = int(cut.max())
    if rule.newest_run:
        idx, valid = step(be, "position_kept_positions")(st_all, cut_dev, cfg.sinks, n, Hkv, J)
    else:
        idx, valid = step(be, "kept_positions")(order, cut_dev, J)
    plans = []
    for i in range(L):
        c = cut[i * B:(i + 1) * B].astype(np.int64)
        J_i = int(c.max())  # a layer's slots are padded to its own largest cut, as when planned alone
        one = (lambda x: x) if L == 1 else (lambda x, i=i: x[i * B:(i + 1) * B, ...])
        plans.append(LayerPlan(one(a), one(order), one(ratio), c, one(idx)[..., :J_i], one(valid)[..., :J_i],
                               n_b.astype(np.int64), req.start, cfg))
    return plans


def _raise_non_finite(req: Request) -> None:
    """The error path of the guard: name the first layer and argument at fault."""
    be, L = req.be, len(req.keys)
    for i in range(L):
        tag = "" if L == 1 else f"[{i}]"
        named = [(f"q_rows{tag}", req.q_rows[i]), (f"keys{tag}", req.keys[i])]
        if req.values is not None:
            named.append((f"values{tag}", req.values[i]))
        for name, x in named:
            if not be.to_numpy(be.all_finite(x)).all():
                raise bad_input(name, "NaN or infinite values", "finite values (check the model's prefill)")
    for i in range(L):
        tag = "" if L == 1 else f"[{i}]"
        logits = core.attention_scores(be, req.q_rows[i], req.keys[i], req.scales[i])
        if not be.to_numpy(be.all_finite(logits)).all():
            raise bad_input(f"keys{tag}", "finite values whose attention logits q.K * scale overflow "
                            f"{core.compute_dtype(be, req.keys[i])}",
                            "keys and queries whose scaled dot products are finite (check the model's prefill)")
    raise bad_input("q_rows", "finite inputs whose attention scores are not finite",
                    "scores without NaN or infinity (report this with the inputs)")


def evict(plan_: LayerPlan, keys: Array, values: Array, be: Backend) -> tuple[Array, Array]:
    """Evict what the plan keeps, the fastest valid way: two slices when the kept set is the sinks
    plus the newest run of one sample, else one gather. (B, Hkv, J, d) x2."""
    cfg = plan_.config
    if RANKINGS[cfg.ranking].newest_run and len(plan_.cut) == 1:
        m = min(cfg.sinks, int(plan_.prompt_lengths[0]))
        return step(be, "evict_runs")(keys, values, int(plan_.start[0]), m, int(plan_.cut[0]) - m)
    return step(be, "evict")(keys, values, plan_.idx)


def check_plan_fields(plan_: LayerPlan, be: Backend, B: int, Hkv: int, n: int, argument: str = "plan") -> None:
    """A LayerPlan consistent with itself and with (B, Hkv, n) keys: host (B,) ints ``start`` in
    [0, n), ``prompt_lengths = n - start``, ``cut`` in [1, prompt_lengths], and the native arrays'
    shapes (order (B, Hkv, n), idx (B, Hkv, max(cut)), valid (B, max(cut))). A plan edited by hand
    (``dataclasses.replace(plan, cut=...)``) fails here instead of evicting something else."""
    if not isinstance(plan_.config, ReFreeKVConfig):
        raise bad_input(argument, f"config of type {type(plan_.config).__name__}", "a LayerPlan whose config is a ReFreeKVConfig")
    host = {}
    for name in ("cut", "start", "prompt_lengths"):
        x = getattr(plan_, name)
        if not isinstance(x, np.ndarray) or x.shape != (B,) or x.dtype.kind not in "iu":
            got = f"{name} of shape {getattr(x, 'shape', None)} ({type(x).__name__})"
            raise bad_input(argument, got, f"a LayerPlan for B = {B} samples: {name} a host (B,) int array")
        host[name] = x.astype(np.int64)
    start, lengths, cut = host["start"], host["prompt_lengths"], host["cut"]
    if (start < 0).any() or (start >= n).any() or not np.array_equal(lengths, n - start):
        raise bad_input(argument, f"start {start.tolist()} and prompt_lengths {lengths.tolist()}",
                        f"a LayerPlan for n = {n}: start in [0, {n - 1}] and prompt_lengths = n - start")
    if (cut < 1).any() or (cut > lengths).any():
        raise bad_input(argument, f"cut {cut.tolist()}", f"counts in [1, prompt_lengths] = [1, {lengths.tolist()}]")
    J = int(cut.max())
    shapes = {"order": (B, Hkv, n), "idx": (B, Hkv, J), "valid": (B, J)}
    for name, want in shapes.items():
        got = tuple(be.shape(getattr(plan_, name)))
        if got != want:
            raise bad_input(argument, f"{name} of shape {got} with cut {cut.tolist()}",
                            f"{name} of shape {want}, as plan_layer made it (edit no field of a LayerPlan)")


def check_reuse(req: Request, reuse) -> list[LayerPlan] | None:
    """``reuse`` must hold one LayerPlan per layer of ``req``, made for the same shapes and padding
    under the same ranking configuration (``ORDER_FIELDS``)."""
    if reuse is None:
        return None
    L, B, _, Hkv, n, _ = req.shape
    if not isinstance(reuse, (list, tuple)) or len(reuse) != L or not all(isinstance(p, LayerPlan) for p in reuse):
        raise bad_input("reuse", f"type {type(reuse).__name__}", f"None or {L} LayerPlans, one per layer")
    for p in reuse:
        check_plan_fields(p, req.be, B, Hkv, n, "reuse")
        same = all(getattr(p.config, f) == getattr(req.config, f) for f in ORDER_FIELDS)
        if not same or tuple(req.be.shape(p.order)) != (B, Hkv, n) or not np.array_equal(p.start, req.start):
            raise bad_input("reuse", "plans made for other shapes, padding or ranking settings",
                            f"plans of the same layers with the same {', '.join(ORDER_FIELDS)}")
    return list(reuse)


def compress(req: Request, reuse: list[LayerPlan] | None = None) -> list[CompressedLayer]:
    """Plan and evict every layer of a validated request (values required).

    ``reuse`` as in ``plan`` (plans for every layer of the request; retained ones are not read).
    Nothing is evicted (the inputs come back as they are, ``valid`` is None) for a retained
    layer, when every sample is too short (n_b <= sinks + 1), or when the cut keeps every token.
    A layer's ``report.seconds`` is its share of the joint planning (split evenly) plus its own
    eviction.
    """
    t0 = time.perf_counter()
    be, cfg = req.be, req.config
    L, B, _, _, n, _ = req.shape
    index = [-1] * L if req.layers is None else req.layers
    n_b = (n - req.start).tolist()
    out: list[CompressedLayer | None] = [None] * L

    def unchanged(i: int, reason: str, seconds: float) -> CompressedLayer:
        size = be.nbytes(req.keys[i]) + be.nbytes(req.values[i])
        return CompressedLayer(req.keys[i], req.values[i], None,
                               LayerReport(index[i], False, reason, n_b, n_b, size, size, seconds))

    todo = []
    for i in range(L):
        if req.layers is not None and cfg.is_retained(index[i]):
            out[i] = unchanged(i, "retained layer", 0.0)
        elif max(n_b) <= cfg.sinks + 1:
            out[i] = unchanged(i, f"prompt too short (n <= sinks + 1 = {cfg.sinks + 1})", 0.0)
        else:
            todo.append(i)
    if todo:
        sub = replace(req, q_rows=[req.q_rows[i] for i in todo], keys=[req.keys[i] for i in todo],
                      values=[req.values[i] for i in todo], scales=[req.scales[i] for i in todo],
                      layers=[index[i] for i in todo])
        plans = plan(sub, None if reuse is None else [reuse[i] for i in todo])
        tails = {}
        if cfg.tail_bits is not None:  # every compressed layer's tail, quantized together
            cut = [(i, p) for i, p in zip(todo, plans) if not (p.cut == n).all()]
            if cut:
                made = quantized_tails([p for _, p in cut], [req.keys[i] for i, _ in cut],
                                       [req.values[i] for i, _ in cut], be, cfg.tail_bits)
                tails = {i: t for (i, _), t in zip(cut, made)}
        share = (time.perf_counter() - t0) / len(todo)
        for i, p in zip(todo, plans):
            t1 = time.perf_counter()
            if (p.cut == n).all():
                out[i] = unchanged(i, "the cut keeps every token", share)
                continue
            k2, v2 = evict(p, req.keys[i], req.values[i], be)
            tail = tails.get(i)
            out[i] = CompressedLayer(k2, v2, p.valid, LayerReport(
                index[i], True, "", n_b, p.cut.tolist(), be.nbytes(req.keys[i]) + be.nbytes(req.values[i]),
                be.nbytes(k2) + be.nbytes(v2) + (0 if tail is None else tail.nbytes), share + time.perf_counter() - t1),
                tail)
    return out
